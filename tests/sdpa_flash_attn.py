"""Test stand-in for flash-attn: exact causal softmax attention with torch's SDPA.

fla's ``transformer`` (``fla.layers.attn.Attention``, also the softmax layers of fla hybrid
models) imports ``flash_attn_func``/``flash_attn_varlen_func`` from flash-attn at module level and
refuses to build when the import failed; flash-attn is CUDA-only and cannot be installed on the
CPU test machines. What the tests check with these models (tensor-parallel head sharding, GQA kv
heads, rotary, per-head q/k norms, data-parallel layouts, a training step) does not depend on
which kernel computes the attention, so tests install these two functions in ``fla.layers.attn``
(``installed()``) instead. Tests only: library code never uses this module.

Same layout and semantics as flash-attn 2: q [batch, seq, heads, head_dim], k/v with
``heads / groups`` kv heads (query head ``h`` reads kv head ``h // groups``), causal mask aligned
at the top left (only square attention is supported, so this equals flash-attn's bottom-right
alignment), and causal sliding windows ``window_size=(left, 0)`` (query i sees keys i - left .. i,
as flash-attn computes them for fla's ``window_size`` attention). Anything else flash-attn offers
(dropout, other windows, softcap, ALiBi, attention probabilities, different q/k lengths) raises
instead of being approximated.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAMES = ("flash_attn_func", "flash_attn_varlen_func")


def _unsupported(dropout_p, causal, window_size, options) -> None:
    defaults = {"softcap": 0.0, "alibi_slopes": None, "return_attn_probs": False, "block_table": None,
                "deterministic": None}
    bad = {k: v for k, v in options.items() if k not in defaults or (k != "deterministic" and v != defaults[k])}
    if dropout_p:
        bad["dropout_p"] = dropout_p
    left, right = window_size
    if (left, right) != (-1, -1) and not (causal and left >= 0 and right == 0):
        bad["window_size"] = tuple(window_size)
    if bad:
        raise NotImplementedError(f"SDPA stand-in for flash-attn does not support {bad}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **options):
    """flash_attn.flash_attn_func: [batch, seq, heads, head_dim] in and out."""
    _unsupported(dropout_p, causal, window_size, options)
    if q.shape[1] != k.shape[1] and causal:
        raise NotImplementedError(f"SDPA stand-in: causal attention needs q_len == k_len, got {q.shape[1]} "
                                  f"and {k.shape[1]} (flash-attn aligns the mask at the bottom right)")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"number of query heads {heads} is not a multiple of kv heads {kv_heads}")
    groups = heads // kv_heads
    if groups > 1:  # GQA: query head h reads kv head h // groups
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    mask = None
    if causal and window_size[0] >= 0:  # query i sees keys i - left .. i
        pos = torch.arange(q.shape[1], device=q.device)
        offset = pos[:, None] - pos[None, :]
        mask = (offset >= 0) & (offset <= window_size[0])
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=causal and mask is None, scale=softmax_scale)
    return o.transpose(1, 2).contiguous()


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **options):
    """flash_attn.flash_attn_varlen_func: packed [tokens, heads, head_dim], sequences bounded by
    cu_seqlens (the same for q and k: no KV cache); each sequence attends only within itself."""
    _unsupported(dropout_p, causal, window_size, options)
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("SDPA stand-in: cu_seqlens_q and cu_seqlens_k must be equal")
    bounds = cu_seqlens_q.tolist()
    outs = [flash_attn_func(q[None, s:e], k[None, s:e], v[None, s:e], softmax_scale=softmax_scale, causal=causal,
                            window_size=window_size)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)


_MISSING = object()


@contextlib.contextmanager
def installed():
    """Use the stand-in as fla's flash-attn inside the block (also over a real flash-attn, which
    cannot run on CPU tensors); restores what was there before."""
    import fla.layers.attn as attn

    saved = {name: getattr(attn, name, _MISSING) for name in NAMES}
    attn.flash_attn_func, attn.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                delattr(attn, name)
            else:
                setattr(attn, name, value)
