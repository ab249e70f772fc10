"""recipe/fla_kernels.py: fla's norm backward launched with more programs gives the same gradients."""

import pytest
import torch

import fla.modules.norm.layernorm as layernorm
from fla.modules import RMSNorm
from recipe.errors import ConfigError
from recipe.fla_kernels import set_norm_backward_programs_per_sm


def norm_grads(x, residual, weight):
    norm = RMSNorm(x.shape[-1], eps=1e-6)
    norm.weight.data.copy_(weight)
    x, residual = x.clone().requires_grad_(), residual.clone().requires_grad_()
    y, residual_out = norm(x, residual, prenorm=True)  # the fused-residual path of fla's blocks
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(residual_out.square().sum()).backward()
    return x.grad, residual.grad, norm.weight.grad


def test_wider_norm_backward_launch_gives_the_same_gradients():
    torch.manual_seed(0)
    # D > 512 selects fla's row kernel, the one whose grid this sizes.
    x, residual, weight = torch.randn(2, 24, 1024), torch.randn(2, 24, 1024), torch.rand(1024) + 0.5
    original = layernorm.get_multiprocessor_count
    try:
        set_norm_backward_programs_per_sm(1)
        per_sm = layernorm.get_multiprocessor_count(0)
        expected = norm_grads(x, residual, weight)
        set_norm_backward_programs_per_sm(4)
        assert layernorm.get_multiprocessor_count(0) == 4 * per_sm
        got = norm_grads(x, residual, weight)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])  # dx: same rows, same math
        torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-6)  # dw: more partial sums
        set_norm_backward_programs_per_sm(1)
        assert layernorm.get_multiprocessor_count(0) == per_sm
    finally:
        layernorm.get_multiprocessor_count = original


@pytest.mark.parametrize("bad", [0, -2, 1.5])
def test_bad_programs_per_sm_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="model.norm_backward_programs_per_sm"):
        set_norm_backward_programs_per_sm(bad)
