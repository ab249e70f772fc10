"""Launch settings of fla kernels that flare changes, each measured (docs/benchmarks.md).

fla 0.6's fused LayerNorm/RMSNorm backward for feature dims > 512 (``layer_norm_bwd_kernel_row``,
the block norms of every fla model) launches one program per SM, and each program walks its
~T/SMs rows one at a time, waiting on memory: on an H200, 308 us for 32k x 1024 bf16 rows with a
fused residual, about a third of HBM bandwidth. With four programs per SM it takes 105 us, dx is
the same bit for bit (dw sums more partial rows) and a GLA-340M training step 2% faster.

fla 0.6 refuses its gated ``chunk_bwd_dqkwg`` Triton kernel on Hopper with Triton >= 3.4, < 3.7.1
(miscompiled there), so GatedDeltaNet, OLMo-Hybrid and Mamba2's scan (``chunk_simple_gla``,
recipe/mamba2_ssd.py) could not train on such a machine without tilelang and nvcc. There flare
routes that one backward function to a PyTorch version of the same computation through fla's
backend registry (``use_torch_gated_backward``); everywhere else fla's kernel runs untouched.
"""

from __future__ import annotations

import logging

import torch

from recipe.errors import ConfigError

logger = logging.getLogger(__name__)

_fla_sm_count = None  # fla's own function, kept to undo the change


def set_norm_backward_programs_per_sm(n: int) -> None:
    """fla's fused norm backward launches ``n`` programs per SM (1: as fla ships)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"model.norm_backward_programs_per_sm={n!r}: use an integer >= 1 (1 = fla's own launch)")
    try:
        import fla.modules.norm.layernorm as layernorm
    except ImportError:  # not an fla install this applies to
        return
    global _fla_sm_count
    if _fla_sm_count is None:
        _fla_sm_count = getattr(layernorm, "get_multiprocessor_count", None)
        if _fla_sm_count is None:
            logger.warning("model.norm_backward_programs_per_sm: this fla's norm module has no "
                           "get_multiprocessor_count; its backward launch is left as it is")
            return
    if n == 1:
        layernorm.get_multiprocessor_count = _fla_sm_count
        return

    # In fla 0.6 this module calls it only to size layer_norm_bwd's grid (one program per SM).
    def programs(*args, **kwargs):
        return n * _fla_sm_count(*args, **kwargs)

    layernorm.get_multiprocessor_count = programs


# --------------------------------------------------------------------------- gated chunk backward

def gated_backward_refused() -> bool:
    """True where fla 0.6 refuses its gated ``chunk_bwd_dqkwg`` Triton kernel: Hopper GPUs with
    Triton >= 3.4.0 and < 3.7.1, whose compiler miscompiles it (fla #640). Every model on fla's
    gated delta rule (GatedDeltaNet, OLMo-Hybrid, Comba) then cannot train unless tilelang (which
    also needs nvcc) takes the call."""
    try:
        from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1
    except ImportError:
        return False
    return bool(IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1)


def chunk_bwd_dqkwg_torch(*args, **kwargs):
    """fla's gated ``chunk_bwd_dqkwg`` in PyTorch (see :func:`_chunk_bwd_dqkwg_fp32`), in fp32 even
    inside bf16 autocast: fla's backward runs under the forward's autocast, which would turn the
    einsums into bf16 products."""
    device_type = args[0].device.type if args else kwargs["q"].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        return _chunk_bwd_dqkwg_fp32(*args, **kwargs)


def _chunk_bwd_dqkwg_fp32(q, k, v, do, h, dh, w=None, g=None, g_gamma=None, dv=None, scale=None,
                          state_v_first=False, cu_seqlens=None, chunk_size=64, chunk_indices=None):
    """fla's gated ``chunk_bwd_dqkwg`` (fla/ops/common/chunk_o.py) in PyTorch, chunk by chunk.

    The same computation as the Triton kernel with ``g`` given: per chunk of ``chunk_size`` tokens
    of one sequence, dq/dk from the chunk's states ``h``/``dh`` and from the intra-chunk scores,
    decayed by ``exp2`` of the cumulative gates, dw (delta rule), and dg with the chunk's last row
    carrying the state terms. Accumulates in fp32 and returns the kernel's dtypes and shapes."""
    B, T, H, K = k.shape
    HV = v.shape[2]
    BT = chunk_size
    scale = K ** -0.5 if scale is None else scale
    bounds = [0, *((i + 1) * T for i in range(B))] if cu_seqlens is None else cu_seqlens.tolist()
    # Chunks of every sequence in order: the order of h's chunk axis in both layouts.
    spans = [(s, min(s + BT, eos)) for bos, eos in zip(bounds[:-1], bounds[1:]) for s in range(bos, eos, BT)]
    starts, ends = torch.tensor(spans, device=k.device).unbind(1)
    idx = starts[:, None] + torch.arange(BT, device=k.device)  # [N, BT] token positions
    valid = idx < ends[:, None]
    idx = torch.where(valid, idx, ends[:, None] - 1)  # a real row; masked below

    def chunks(x, heads):  # [B, T, heads, D] -> [N, BT, HV, D] fp32, zero outside the chunk
        x = x.reshape(B * T, heads, -1)[idx].float()
        if heads != HV:
            x = x.repeat_interleave(HV // heads, dim=2)
        return x * valid[:, :, None, None]

    qc, kc, vc, doc = chunks(q, H), chunks(k, H), chunks(v, HV), chunks(do, HV)
    hs, dhs = h.reshape(-1, HV, *h.shape[-2:]).float(), dh.reshape(-1, HV, *dh.shape[-2:]).float()
    if state_v_first:  # [.., V, K] -> [.., K, V]
        hs, dhs = hs.transpose(-1, -2), dhs.transpose(-1, -2)
    gc = g.reshape(B * T, HV)[idx].float() * valid[:, :, None]  # [N, BT, HV]
    g_last = g.reshape(B * T, HV)[ends - 1].float()  # [N, HV]

    dq = torch.einsum("nthv,nhkv->nthk", doc, hs) * torch.exp2(gc)[..., None] * scale
    decay_to_end = torch.where(valid[:, :, None], torch.exp2(g_last[:, None] - gc), 0)
    dk = torch.einsum("nthv,nhkv->nthk", vc, dhs) * decay_to_end[..., None]
    dg_last = (hs * dhs).sum((-2, -1)) * torch.exp2(g_last) + (dk * kc).sum((1, 3))  # [N, HV]
    causal = torch.tril(torch.ones(BT, BT, dtype=torch.bool, device=k.device))
    mask = causal & valid[:, :, None] & valid[:, None, :]  # [N, i, j]
    ds = torch.einsum("nihv,njhv->nhij", doc, vc)
    decay = torch.exp2(gc.permute(0, 2, 1)[..., :, None] - gc.permute(0, 2, 1)[..., None, :])  # [N, HV, i, j]
    ds = torch.where(mask[:, None], ds * decay, 0) * scale
    ds = ds.to(k.dtype).float()  # the kernel multiplies the scores in the inputs' dtype
    dq = dq + torch.einsum("nhij,njhk->nihk", ds, kc)
    dk = dk + torch.einsum("nhij,nihk->njhk", ds, qc)
    dg = (dq * qc).sum(-1) - (dk * kc).sum(-1)  # [N, BT, HV]
    last = torch.arange(BT, device=k.device) == (ends - starts - 1)[:, None]  # each chunk's last row
    dg = dg + torch.where(last[:, :, None], dg_last[:, None, :], 0)

    def unchunk(x, dtype):  # [N, BT, HV, ...] -> [B, T, HV, ...]
        out = torch.zeros(B * T, *x.shape[2:], dtype=torch.float32, device=x.device)
        out[idx[valid]] = x[valid]
        return out.reshape(B, T, *x.shape[2:]).to(dtype)

    dq_out, dk_out = unchunk(dq, q.dtype), unchunk(dk, q.dtype)
    if H != HV:
        dq_out = dq_out.view(B, T, H, HV // H, K).sum(3)
        dk_out = dk_out.view(B, T, H, HV // H, K).sum(3)
    dw_out = None
    if w is not None:
        dvc = chunks(dv, HV)
        dw_out = unchunk(-torch.einsum("nthv,nhkv->nthk", dvc, hs), w.dtype)
    return dq_out, dk_out, dw_out, unchunk(dg, torch.float32)


_gated_backward_installed = False


def use_torch_gated_backward(force: bool = False) -> bool:
    """Route fla's gated ``chunk_bwd_dqkwg`` to :func:`chunk_bwd_dqkwg_torch` where fla refuses its
    Triton kernel (see :func:`gated_backward_refused`), through fla's backend registry; fla's
    tilelang backend keeps precedence where it is usable. ``force`` routes it everywhere (tests).
    Returns whether the route is in place."""
    global _gated_backward_installed
    if not (force or gated_backward_refused()):
        return False
    if _gated_backward_installed:
        return True
    try:
        from fla.backends import BaseBackend, register
        import fla.ops.common.chunk_o  # noqa: F401  (creates the "common" registry the kernel dispatches on)
    except ImportError:
        return False

    class TorchGatedBackward(BaseBackend):
        backend_type = "flare_torch_gated_bwd"
        priority = 10  # after tilelang's 5: the fused kernel wins where it runs

        @classmethod
        def is_available(cls) -> bool:
            return True

        def chunk_bwd_dqkwg_verifier(self, q, k, v, do, h, dh, w=None, g=None, g_gamma=None, *args, **kwargs):
            if g is None or g_gamma is not None:
                return False, "only the gated case (g given) is refused by fla"
            return True, None

        def chunk_bwd_dqkwg(self, *args, **kwargs):
            return chunk_bwd_dqkwg_torch(*args, **kwargs)

    register("common")(TorchGatedBackward)
    _gated_backward_installed = True
    logger.info("fla's gated chunk backward (chunk_bwd_dqkwg) runs in PyTorch: fla refuses its Triton kernel on "
                "Hopper with Triton < 3.7.1; Triton >= 3.7.1 or a usable tilelang restores the fused kernel")
    return True
