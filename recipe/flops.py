"""Training FLOPs per token, per model family, for MFU.

flame uses the Transformer formula (6N + 12·L·H·Dh·seq) for every model, which credits linear-
attention models with a quadratic attention they never compute (hence MFU > 100%). Here:

    training FLOPs/token = 3 × forward      (backward ≈ 2 × forward, as for a matmul)
    forward              = 2 · N_matmul  +  Σ_layers mixer(layer)

* ``N_matmul``: weights of every ``nn.Linear`` in the model, lm_head included (a matmul even when
  tied to the embedding), low-rank gate projections included. Embeddings are lookups: 0 FLOPs.
  Counting modules rather than config arithmetic keeps it right for any head/MLP layout, for
  float8 (``Float8Linear`` is an ``nn.Linear``) and for TP/FSDP (DTensor ``numel`` is global).
* ``mixer``: the token-mixing work outside ``nn.Linear``, one function per ``model_type`` in
  ``MIXER_FLOPS`` (register yours with ``@register_mixer_flops("my_type")``; one marked
  ``per_layer`` also takes the layer index); each docstring gives its formula. Element-wise work
  (norms, gates, activations, softmax) is not counted.

Convention: every matmul is counted at its full dense size and masks are ignored: the causal
T×T attention and the causal C×C intra-chunk blocks are not halved. For attention this is
torchtitan's/PaLM's 12·L·H·Dh·seq (training) so MFU stays comparable with theirs; note that a
causal flash-attention kernel skips the upper-triangle tiles, i.e. executes about half of it.

Chunked linear attention is counted as fla's chunk kernels run it, chunk size C = 64, per head
with key/value head dims dk/dv (fla's layers train with these kernels; HGRN2 switches to its
recurrent kernel for seq ≤ 64, which this does not model).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

CHUNK_SIZE = 64  # fla's chunk kernels (BT = 64)

# Forward FLOPs per token of one token-mixing layer, outside nn.Linear: (config, seq_len) -> FLOPs.
MixerFlops = Callable[[object, int], float]
MIXER_FLOPS: dict[str, MixerFlops] = {}


def register_mixer_flops(*model_types: str):
    """Decorator: use ``fn(config, seq_len)`` as the per-layer mixer FLOPs of these model types."""

    def register(fn: MixerFlops) -> MixerFlops:
        for model_type in model_types:
            MIXER_FLOPS[model_type] = fn
        return fn

    return register


# ---- building blocks (forward FLOPs per token per head; tests check them against fla's naive ops)


def softmax_attention_flops(seq_len: int, head_dim: int) -> float:
    """Q·Kᵀ and P·V over the whole sequence: 2·seq·Dh + 2·seq·Dh (causal mask not halved)."""
    return 4 * seq_len * head_dim


def chunk_linear_attention_flops(dk: int, dv: int, chunk: int = CHUNK_SIZE) -> float:
    """Chunked (gated) linear attention, as fla's chunk_gla / chunk_simple_gla run it.

    intra-chunk: Q·Kᵀ (2·C·dk) and A·V (2·C·dv); inter-chunk: Q·S (2·dk·dv) and the state
    update Kᵀ·V (2·dk·dv).  Total 2·C·(dk + dv) + 4·dk·dv.
    """
    return 2 * chunk * (dk + dv) + 4 * dk * dv


def tril_inverse_flops(chunk: int = CHUNK_SIZE) -> float:
    """(I + tril(diag(β)·K·Kᵀ))⁻¹ per chunk: inverting a unit lower-triangular C×C matrix is
    ~C³/3 FLOPs, i.e. C²/3 per token."""
    return chunk * chunk / 3


def chunk_delta_rule_flops(dk: int, dv: int, chunk: int = CHUNK_SIZE) -> float:
    """Chunked delta rule (WY representation), as fla's chunk_delta_rule / chunk_gated_delta_rule.

    WY: K_β·Kᵀ (2·C·dk), the triangular inverse (C²/3), W = A·K_β (2·C·dk), U = A·V (2·C·dv);
    inter-chunk: W·S (2·dk·dv), Q·S (2·dk·dv), state update Kᵀ·(U − W·S) (2·dk·dv);
    intra-chunk output: Q·Kᵀ (2·C·dk), A·(U − W·S) (2·C·dv).
    Total 2·C·(3·dk + 2·dv) + 6·dk·dv + C²/3.
    """
    return 2 * chunk * (3 * dk + 2 * dv) + 6 * dk * dv + tril_inverse_flops(chunk)


def short_conv_flops(channels: int, kernel: int) -> float:
    """Depthwise causal conv1d: 2·kernel·channels."""
    return 2 * kernel * channels


# ---- families


@register_mixer_flops("gla")
def gla_mixer_flops(config, seq_len: int) -> float:
    """GLA: H·[2·C·(dk+dv) + 4·dk·dv] (+ 2·K·(q+k+v channels) with short conv),
    dk = hidden·expand_k/H, dv = hidden·expand_v/H; K/V heads are repeated to H before the kernel."""
    return _gla_like(config, config.expand_k, config.expand_v)


@register_mixer_flops("retnet")
def retnet_mixer_flops(config, seq_len: int) -> float:
    """RetNet (chunk_retention = chunk_simple_gla with fixed decays): same formula as GLA,
    H·[2·C·(dk+dv) + 4·dk·dv] (+ short conv), dk = hidden·expand_k/H, dv = hidden·expand_v/H."""
    return _gla_like(config, config.expand_k, config.expand_v)


def _gla_like(config, expand_k: float, expand_v: float) -> float:
    h = config.num_heads
    groups = h // (getattr(config, "num_kv_heads", None) or h)
    key_dim, value_dim = round(config.hidden_size * expand_k), round(config.hidden_size * expand_v)
    flops = h * chunk_linear_attention_flops(key_dim // h, value_dim // h)
    if getattr(config, "use_short_conv", False):
        flops += short_conv_flops(key_dim + (key_dim + value_dim) // groups, config.conv_size)
    return flops


@register_mixer_flops("hgrn2")
def hgrn2_mixer_flops(config, seq_len: int) -> float:
    """HGRN2: its recurrence is GLA's with q = output gate, k = 1 − forget gate, v = input, so
    H·[2·C·(dk+dv) + 4·dk·dv] with dk = expand_ratio (forget/state rows), dv = hidden/H
    (+ 2·K·(2·H·expand_ratio + hidden) with short conv)."""
    h, dk, dv = config.num_heads, config.expand_ratio, config.hidden_size // config.num_heads
    flops = h * chunk_linear_attention_flops(dk, dv)
    if getattr(config, "use_short_conv", False):
        flops += short_conv_flops(2 * h * dk + config.hidden_size, config.conv_size)
    return flops


@register_mixer_flops("delta_net")
def delta_net_mixer_flops(config, seq_len: int) -> float:
    """DeltaNet: H·[2·C·(3·dk + 2·dv) + 6·dk·dv + C²/3] + 2·K·(2·key_dim + value_dim) (short conv),
    dk = hidden·expand_k/H, dv = hidden·expand_v/H."""
    h = config.num_heads
    key_dim, value_dim = round(config.hidden_size * config.expand_k), round(config.hidden_size * config.expand_v)
    flops = h * chunk_delta_rule_flops(key_dim // h, value_dim // h)
    if config.use_short_conv:
        flops += short_conv_flops(2 * key_dim + value_dim, config.conv_size)
    return flops


@register_mixer_flops("gated_deltanet")
def gated_deltanet_mixer_flops(config, seq_len: int) -> float:
    """Gated DeltaNet: the delta rule's matmuls (the decay gate is element-wise), per value head:
    Hv·[2·C·(3·dk + 2·dv) + 6·dk·dv + C²/3] + 2·K·(2·H·dk + Hv·dv) (short conv),
    dk = head_dim, dv = head_dim·expand_v, Hv = num_v_heads (default num_heads)."""
    hk = config.num_heads
    hv = getattr(config, "num_v_heads", None) or hk
    dk, dv = config.head_dim, int(config.head_dim * config.expand_v)
    flops = hv * chunk_delta_rule_flops(dk, dv)
    if config.use_short_conv:
        flops += short_conv_flops(2 * hk * dk + hv * dv, config.conv_size)
    return flops


@register_mixer_flops("olmo_hybrid")
def olmo_hybrid_mixer_flops(config, seq_len: int, layer_idx: int) -> float:
    """OLMo-Hybrid, per ``config.layer_types``: a "full_attention" layer as HF Llama's attention
    (4·seq·H·Dh); a "linear_attention" layer as Gated DeltaNet's delta rule and short convs,
    Hv·[2·C·(3·dk + 2·dv) + 6·dk·dv + C²/3] + 2·K·(2·Hk·dk + Hv·dv), with Hk/Hv =
    linear_num_key/value_heads, dk/dv = linear_key/value_head_dim, K = linear_conv_kernel_dim
    (q/k heads are repeated to Hv before the kernel)."""
    if config.layer_types[layer_idx] == "full_attention":
        return llama_mixer_flops(config, seq_len)
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    return hv * chunk_delta_rule_flops(dk, dv) + short_conv_flops(2 * hk * dk + hv * dv, config.linear_conv_kernel_dim)


olmo_hybrid_mixer_flops.per_layer = True  # takes layer_idx: its layers mix tokens in two ways


def ssd_flops(heads: int, head_dim: int, groups: int, state: int, chunk: int) -> float:
    """Mamba2's state space duality (SSD) scan, chunked as mamba_ssm's kernels compute it.

    intra-chunk: C·Bᵀ once per group (2·C·N per group) and the decay-masked scores times x per
    head (2·C·P); chunk states Bᵀ·x and their contribution C·state per head (2·N·P each).
    Total 2·C·(G·N + H·P) + 4·H·N·P; passing states between chunks and the decays are element-wise.
    """
    return 2 * chunk * (groups * state + heads * head_dim) + 4 * heads * state * head_dim


@register_mixer_flops("mamba2")
def mamba2_mixer_flops(config, seq_len: int) -> float:
    """Mamba2: ssd_flops with H = num_heads, P = head_dim, G = n_groups, N = state_size, chunk C =
    chunk_size (256 in flame's configs, not fla's 64), + 2·K·(H·P + 2·G·N) for the depthwise conv
    over x, B and C. Without mamba_ssm flare's scan (recipe/mamba2_ssd.py) repeats B/C for every
    head and works in fla's 64-token chunks: it executes another count, not this one."""
    h, p, g, n = config.num_heads, config.head_dim, config.n_groups, config.state_size
    return ssd_flops(h, p, g, n, config.chunk_size) + short_conv_flops(h * p + 2 * g * n, config.conv_kernel)


@register_mixer_flops("gsa")
def gsa_mixer_flops(config, seq_len: int) -> float:
    """Gated Slot Attention: two chunked GLA passes per head (fla's chunk_gsa), keys into M =
    num_slots slots, then the slot softmax (element-wise) reading the slots' values:
    H·[2·C·(dk + M) + 4·dk·M] + H·[2·C·(M + dv) + 4·M·dv] (+ 2·K·(key_dim + (key_dim + value_dim)/groups)
    with short conv), dk = hidden·expand_k/H, dv = hidden·expand_v/H; K/V/slot gates are repeated to H.
    Like HGRN2, fla switches to its recurrent kernel for seq ≤ 64, which this does not model."""
    h = config.num_heads
    groups = h // (getattr(config, "num_kv_heads", None) or h)
    key_dim, value_dim = round(config.hidden_size * config.expand_k), round(config.hidden_size * config.expand_v)
    dk, dv = key_dim // h, value_dim // h
    slots = config.num_slots or dk  # fla's default: one slot per key dimension
    flops = h * (chunk_linear_attention_flops(dk, slots) + chunk_linear_attention_flops(slots, dv))
    if getattr(config, "use_short_conv", False):
        flops += short_conv_flops(key_dim + (key_dim + value_dim) // groups, config.conv_size)
    return flops


@register_mixer_flops("mamba", "samba")
def mamba_mixer_flops(config, seq_len: int) -> float:
    """Mamba1 (fla's ``Mamba``; samba's recurrent layers): the selective scan per channel and state,
    the state update's dt·B·x (2·E·N) and the readout C·h (2·E·N), + 2·K·E for the depthwise conv,
    E = intermediate_size (expand·hidden), N = state_size. The dt/B/C projections are nn.Linear."""
    inner, state = config.intermediate_size, config.state_size
    return 4 * inner * state + short_conv_flops(inner, config.conv_kernel)


@register_mixer_flops("transformer")
def transformer_mixer_flops(config, seq_len: int) -> float:
    """fla Transformer: causal softmax attention, 4·min(seq, window)·H·Dh, Dh = hidden/H."""
    window = getattr(config, "window_size", None) or seq_len
    return config.num_heads * softmax_attention_flops(min(seq_len, window), config.hidden_size // config.num_heads)


@register_mixer_flops("llama")
def llama_mixer_flops(config, seq_len: int) -> float:
    """HF Llama: causal softmax attention, 4·seq·H·Dh (GQA shares K/V, not the Q·Kᵀ work)."""
    h = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // h
    return h * softmax_attention_flops(seq_len, head_dim)


def _hybrid_attention_flops(spec: dict, config, seq_len: int) -> float:
    """fla's hybrid layers (config.attn): softmax attention with Dh = hidden / attn num_heads."""
    window = spec.get("window_size") or seq_len
    return spec["num_heads"] * softmax_attention_flops(min(seq_len, window), config.hidden_size // spec["num_heads"])


# ---- public API


def matmul_params(model: nn.Module) -> int:
    """Weights of all nn.Linear modules (each module once, so a tied lm_head still counts)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_breakdown(model_config, seq_len: int, model: nn.Module | None = None) -> dict[str, float]:
    """Training FLOPs per token as {"matmul": 6·N_matmul, "mixer": 3·Σ_layers mixer}."""
    if model is None:
        model = _meta_model(model_config)
    matmul = 6.0 * matmul_params(model)
    mixer_fn = MIXER_FLOPS.get(model_config.model_type)
    if mixer_fn is None:
        logger.warning(
            f"recipe.flops: no FLOPs formula for model_type '{model_config.model_type}'; using 6·N_matmul "
            "(ignores attention/recurrence). Add one with @register_mixer_flops."
        )
        return {"matmul": matmul, "mixer": 0.0}
    attn = getattr(model_config, "attn", None)  # fla hybrids: softmax attention at some layers
    mixer = 0.0
    per_layer = getattr(mixer_fn, "per_layer", False)
    for layer_idx in range(model_config.num_hidden_layers):
        spec = _attention_spec(attn, layer_idx)
        if spec:
            mixer += _hybrid_attention_flops(spec, model_config, seq_len)
        else:
            mixer += mixer_fn(model_config, seq_len, layer_idx) if per_layer else mixer_fn(model_config, seq_len)
    return {"matmul": matmul, "mixer": 3.0 * mixer}


def flops_per_token(model_config, seq_len: int, model: nn.Module | None = None) -> float:
    """Training (forward + backward) FLOPs per token; ``model`` (any device, meta is fine) gives
    the nn.Linear sizes, else the model is built on the meta device from ``model_config``."""
    return sum(flops_breakdown(model_config, seq_len, model).values())


def _attention_spec(attn, layer_idx: int) -> dict | None:
    for spec in [attn] if isinstance(attn, dict) else (attn or []):
        if layer_idx in spec["layers"]:
            return spec
    return None


def _meta_model(model_config) -> nn.Module:
    import fla  # noqa: F401  (registers fla's model types with transformers; imported late: see recipe.device)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


# ---- peak throughput

# bf16 dense tensor-core peak (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
# Most specific first: "H100 PCIe" must win over "H100".
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM / HBM3 / NVL
    ("H200", 989e12),
    ("A100", 312e12),
]


def peak_flops_for_name(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def peak_flops(device: torch.device | str) -> float | None:
    """bf16 dense peak of a CUDA device, or None when unknown.

    CPU returns None: there is no meaningful bf16 "peak" to normalise by, so MFU is reported as
    null rather than as a number that looks like a utilisation.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_flops_for_name(name)
    if peak is None:
        logger.warning(f"recipe.flops: unknown peak FLOP/s for '{name}'; MFU will not be reported")
    return peak
