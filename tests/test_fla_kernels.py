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


# ---------------------------------------------------------------- gated chunk backward in PyTorch


def dqkwg_inputs(B, T, H, HV, K, V, cu_seqlens=None, delta=True, seed=0):
    """Random inputs of fla's chunk_bwd_dqkwg with states of the right chunk count."""
    gen = torch.Generator().manual_seed(seed)
    bounds = [0, *((i + 1) * T for i in range(B))] if cu_seqlens is None else cu_seqlens.tolist()
    n_chunks = sum(-(-(eos - bos) // 64) for bos, eos in zip(bounds[:-1], bounds[1:]))

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    g = -torch.rand(B, T, HV, generator=gen).cumsum(1) * 0.1  # decaying cumulative gates
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, HV, V), do=r(B, T, HV, V),
                h=r(n_chunks, HV, K, V) * 0.3, dh=r(n_chunks, HV, K, V) * 0.3, w=r(B, T, HV, K) if delta else None,
                g=g, dv=r(B, T, HV, V) if delta else None, scale=K ** -0.5, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("case", [
    dict(B=2, T=100, H=2, HV=2, K=32, V=16),  # a partial last chunk
    dict(B=1, T=128, H=1, HV=2, K=16, V=32),  # grouped value heads (q/k heads shared)
    dict(B=1, T=150, H=2, HV=2, K=32, V=16, cu_seqlens=torch.tensor([0, 37, 100, 150])),  # varlen
    dict(B=2, T=70, H=2, HV=2, K=32, V=16, delta=False),  # no dw (simple GLA's call)
], ids=["partial", "gqa", "varlen", "no_dw"])
def test_torch_gated_backward_matches_flas_triton_kernel(case):
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg
    from recipe.fla_kernels import chunk_bwd_dqkwg_torch

    inputs = dqkwg_inputs(**case)
    if inputs["cu_seqlens"] is not None:
        inputs["h"], inputs["dh"] = inputs["h"][None], inputs["dh"][None]
    else:
        n = inputs["h"].shape[0] // case["B"]
        inputs["h"] = inputs["h"].view(case["B"], n, *inputs["h"].shape[1:])
        inputs["dh"] = inputs["dh"].view(case["B"], n, *inputs["dh"].shape[1:])
    expected = chunk_bwd_dqkwg(**inputs)  # fla's Triton kernel (the interpreter on CPU)
    got = chunk_bwd_dqkwg_torch(**inputs)
    # fla's backward runs under the forward's autocast (the trainer's one-GPU default): the same
    # fp32 result, not bf16 products
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got_autocast = chunk_bwd_dqkwg_torch(**inputs)
    for name, e, o, a in zip(("dq", "dk", "dw", "dg"), expected, got, got_autocast):
        if e is None:
            assert o is None and a is None, name
            continue
        assert o.shape == e.shape and o.dtype == e.dtype and a.dtype == e.dtype, name
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4, msg=name)
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=f"{name} under autocast")


def _gated_delta_rule(q, k, v, g, beta):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g=g, beta=beta)[0]


def _simple_gla(q, k, v, g, beta):  # Mamba2's scan (recipe/mamba2_ssd.py): k unnormalized, scale 1
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(q, k * beta[..., None], v, g=g, scale=1.0)[0]


@pytest.mark.parametrize("op", [_gated_delta_rule, _simple_gla], ids=["gated_delta_rule", "simple_gla"])
def test_gated_ops_train_the_same_through_the_torch_backward(op):
    """Gradients of fla's gated chunk ops (GatedDeltaNet/OLMo-Hybrid; Mamba2's scan), fla's kernels vs
    the PyTorch route through fla's backend registry (what runs on Hopper with Triton < 3.7.1)."""
    import fla.backends

    from recipe import fla_kernels

    torch.manual_seed(0)
    B, T, H, K, V = 2, 96, 2, 32, 32
    q, k = torch.randn(B, T, H, K), torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    v, beta = torch.randn(B, T, H, V), torch.rand(B, T, H).sigmoid()
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H))

    def grads():
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        o = op(*leaves)
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
        return [x.grad for x in leaves]

    expected = grads()
    registry = fla.backends._operation_registries["common"]
    before = dict(registry._backends)
    try:
        assert fla_kernels.use_torch_gated_backward(force=True)
        calls = []
        backend = registry._backends["flare_torch_gated_bwd"]
        original = backend.chunk_bwd_dqkwg
        backend.chunk_bwd_dqkwg = lambda *a, **kw: calls.append(1) or original(*a, **kw)
        got = grads()
    finally:
        registry._backends.clear()
        registry._backends.update(before)
        fla_kernels._gated_backward_installed = False
    assert calls, "the gated backward did not go through the PyTorch route"
    for name, e, o in zip(("dq", "dk", "dv", "dg", "dbeta"), expected, got):
        torch.testing.assert_close(o, e, rtol=1e-4, atol=1e-4, msg=name)


def test_the_torch_gated_backward_is_only_routed_where_fla_refuses_its_kernel():
    from recipe import fla_kernels

    assert not fla_kernels.gated_backward_refused()  # no Hopper GPU here
    assert not fla_kernels.use_torch_gated_backward()
