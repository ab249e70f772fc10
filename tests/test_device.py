"""The CPU path (recipe/device.py): torchtitan pointed at CPU, fla's Triton kernels interpreted."""

import os
import sys

import torch
import triton
import triton.language as tl

from recipe.device import configure_device


def test_cpu_is_selected_and_torchtitan_follows():
    assert configure_device() == "cpu"
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.tools.utils as utils

    for module in (utils, parallel_dims, dist_utils, metrics):
        assert module.device_type == "cpu", module.__name__
    from recipe.device import cpu_device_module

    assert utils.device_module is cpu_device_module and dist_utils.device_module is cpu_device_module
    assert cpu_device_module.synchronize is torch.cpu.synchronize
    assert configure_device() == "cpu"  # idempotent


@triton.autotune(configs=[triton.Config({"BLOCK": 4}), triton.Config({"BLOCK": 8}), triton.Config({"BLOCK": 2})],
                 key=["n"])
@triton.jit
def _loop_kernel(out, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(n):
        acc += i.to(tl.int64)  # loop indices are tensors in compiled Triton; fla relies on it
    tl.store(out + offsets, acc + BLOCK * 1000)


def test_interpreter_loop_indices_and_pinned_autotune():
    out = torch.zeros(8, dtype=torch.int64)
    _loop_kernel[(1,)](out, 5)
    # The config with the largest tiles (BLOCK=8, neither the first nor the last) used without
    # benchmarking: fewest program instances for the interpreter; sum(range(5)) == 10.
    assert out.tolist() == [8010] * 8


def test_fla_chunk_kernel_matches_naive_reference():
    from fla.ops.gla import chunk_gla
    from fla.ops.gla.naive import naive_recurrent_gla

    torch.manual_seed(0)
    B, T, H, K, V = 1, 80, 2, 16, 16  # T not a multiple of the chunk size: exercises masking
    q, k, v = (torch.randn(B, T, H, d, requires_grad=True) for d in (K, K, V))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)).requires_grad_()
    out, _ = chunk_gla(q, k, v, g)
    ref = naive_recurrent_gla(q, k, v, g)[0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum(), (q, k, v, g))
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v, g))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_configure_device_refuses_late_call_after_triton_import():
    # A fresh interpreter that imports triton first, without TRITON_INTERPRET: wrong order is an error.
    import subprocess

    code = "import triton, recipe.device as d\ntry:\n d.configure_device()\nexcept RuntimeError as e:\n print('refused', e)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert "refused" in proc.stdout, proc.stderr[-2000:]
