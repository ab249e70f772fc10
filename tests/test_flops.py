"""recipe/flops.py against FLOPs measured by torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode sees aten matmuls/convs only; fla's Triton kernels (chunked recurrences, short
convs, fused norms) are invisible to it. So each family is checked in two halves:
  (a) the nn.Linear part: a real forward+backward of the tiny model, whose counted matmuls must
      equal 6·N_matmul per token (within 1%): this also proves no matmul hides outside nn.Linear;
  (b) the mixer part: fla's naive chunked PyTorch reference of the same op (same chunk size, the
      head dims of the tiny model's layer) plus a torch depthwise conv1d for the short convs, under
      the counter, must equal the family formula (within 1%). The delta rule's triangular inverse
      is done element-wise in fla's naive code, so its C²/3 term is added analytically.
Softmax attention is checked whole on Llama with eager attention (plain matmuls).
"""

import json
import logging
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from recipe.device import configure_device

configure_device()  # before fla/triton

import fla  # noqa: E402,F401
import fla.layers.attn  # noqa: E402
from fla.ops.delta_rule.naive import delta_rule_chunkwise  # noqa: E402
from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule  # noqa: E402
from fla.ops.simple_gla.naive import naive_chunk_simple_gla  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from recipe import flops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLA_FAMILIES = ["gla", "gated_deltanet", "delta_net", "retnet", "hgrn2"]
C = flops.CHUNK_SIZE


def load_config(path):
    with open(path) as f:
        values = json.load(f)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def tiny(family):
    return load_config(f"{ROOT}/configs/tiny/{family}.json")


def counted(fn, *args, **kwargs) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def train_step_flops(model, seq_len):
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len))

    def step():
        model(input_ids=tokens, labels=tokens).loss.backward()

    return counted(step) / seq_len


# ---- (a) nn.Linear part, on the real model


@pytest.mark.parametrize("family", FLA_FAMILIES)
def test_matmul_part_matches_counter_on_real_train_step(family):
    config = tiny(family)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # chunk_delta_rule needs bf16
    # 64 tokens: the Linear FLOPs per token do not depend on the length; keeps the interpreter quick.
    measured = train_step_flops(model, seq_len=64)
    predicted = flops.flops_breakdown(config, 64, model)["matmul"]
    assert predicted == pytest.approx(measured, rel=0.01)
    # Built on meta from the config alone: the same Linear count.
    assert flops.flops_breakdown(config, 64)["matmul"] == predicted


# ---- (b) mixer part, on fla's naive chunked references


def _attn(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).model.layers[0].attn


def _conv_flops_per_token(attn, seq_len):
    """The layer's ShortConvolutions (nn.Conv1d subclasses) as plain causal depthwise conv1d."""
    total = 0
    for conv in (m for m in attn.modules() if isinstance(m, torch.nn.Conv1d)):
        x = torch.randn(1, conv.in_channels, seq_len + conv.kernel_size[0] - 1)  # left-padded: causal
        weight = torch.randn(conv.weight.shape)
        total += counted(F.conv1d, x, weight, groups=conv.groups)
    return total / seq_len


def _chunk_gla_reference_flops(heads, dk, dv, seq_len):
    q, k = torch.randn(1, seq_len, heads, dk), torch.randn(1, seq_len, heads, dk)
    v, g = torch.randn(1, seq_len, heads, dv), F.logsigmoid(torch.randn(1, seq_len, heads))
    return counted(naive_chunk_simple_gla, q, k, v, g, chunk_size=C) / seq_len


def _delta_rule_reference_flops(heads, dk, dv, seq_len, gated):
    q, k = torch.randn(1, seq_len, heads, dk), F.normalize(torch.randn(1, seq_len, heads, dk), dim=-1)
    v, beta = torch.randn(1, seq_len, heads, dv), torch.rand(1, seq_len, heads)
    if gated:
        g = F.logsigmoid(torch.randn(1, seq_len, heads))
        n = counted(naive_chunk_gated_delta_rule, q, k, v, g, beta, chunk_size=C)
    else:  # this one takes [B, H, T, D]
        q, k, v, beta = (x.transpose(1, 2) for x in (q, k, v, beta))
        n = counted(delta_rule_chunkwise, q, k, v, beta, chunk_size=C)
    # + the triangular inverse, done element-wise (uncounted) in the naive code.
    return n / seq_len + heads * flops.tril_inverse_flops(C)


@pytest.mark.parametrize("family", FLA_FAMILIES)
def test_mixer_part_matches_naive_chunked_reference(family):
    seq_len = 2 * C  # two chunks: intra- and inter-chunk terms both exercised
    config = tiny(family)
    attn = _attn(config)  # head dims as the layer computes them, not as flops.py derives them
    if family in ("gla", "retnet"):
        reference = _chunk_gla_reference_flops(attn.num_heads, attn.head_k_dim, attn.head_v_dim, seq_len)
    elif family == "hgrn2":
        reference = _chunk_gla_reference_flops(attn.num_heads, attn.head_f_dim, attn.head_i_dim, seq_len)
    else:
        heads = attn.num_v_heads if family == "gated_deltanet" else attn.num_heads
        reference = _delta_rule_reference_flops(
            heads, attn.head_k_dim, attn.head_v_dim, seq_len, gated=family == "gated_deltanet"
        )
    reference += _conv_flops_per_token(attn, seq_len)
    if family in ("delta_net", "gated_deltanet"):
        assert config.use_short_conv  # the conv term is part of what is being checked
    predicted = flops.MIXER_FLOPS[family](config, seq_len)
    assert predicted == pytest.approx(reference, rel=0.01)
    # Training = 3 × forward, summed over the layers.
    breakdown = flops.flops_breakdown(config, seq_len)
    assert breakdown["mixer"] == pytest.approx(3 * config.num_hidden_layers * predicted)


def test_mixer_formula_at_340M_head_dims_matches_reference():
    # Realistic head sizes (GLA-340M: dk 128, dv 256; DeltaNet-340M: 128/128), where the
    # state terms dominate: the formula must still match the reference matmul count.
    assert flops.chunk_linear_attention_flops(128, 256) == pytest.approx(
        _chunk_gla_reference_flops(1, 128, 256, 2 * C), rel=0.01
    )
    assert flops.chunk_delta_rule_flops(128, 128) == pytest.approx(
        _delta_rule_reference_flops(1, 128, 128, 2 * C, gated=False), rel=0.01
    )


# ---- Mamba2 (SSD)


def _ssd_chunked_reference(x, dt, A, B, C, chunk):
    """Mamba2's SSD as mamba_ssm's kernels chunk it, with matmuls FlopCounterMode sees: C·Bᵀ per
    group, scores·x, chunk states Bᵀ·x and C·state per head; head h reads group h // (H / G).
    x [b, T, H, P], dt [b, T, H] (after softplus), A [H] (< 0), B/C [b, T, G, N]; no D skip."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    n_chunks, per_group = T // chunk, H // G
    xdt = (x * dt[..., None]).view(b, n_chunks, chunk, H, P)
    log_decay = (dt * A).view(b, n_chunks, chunk, H).cumsum(2)  # [b, c, l, H]
    B, C = B.view(b, n_chunks, chunk, G, N), C.view(b, n_chunks, chunk, G, N)
    scores = torch.einsum("bclgn,bcsgn->bcgls", C, B).repeat_interleave(per_group, dim=2)  # [b, c, H, l, s]
    cum = log_decay.permute(0, 1, 3, 2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    decay = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    y = torch.einsum("bchls,bcshp->bclhp", scores * decay, xdt)
    to_end = torch.exp(log_decay[:, :, -1:] - log_decay)[..., None]  # decay from each step to the chunk's end
    Bh, Ch = B.repeat_interleave(per_group, dim=3), C.repeat_interleave(per_group, dim=3)
    states = torch.einsum("bclhn,bclhp->bchpn", Bh * to_end, xdt)
    state, entering = torch.zeros(b, H, P, N), []
    for i in range(n_chunks):  # element-wise: not counted
        entering.append(state)
        state = state * torch.exp(log_decay[:, i, -1])[..., None, None] + states[:, i]
    y = y + torch.einsum("bclhn,bchpn->bclhp", Ch, torch.stack(entering, 1)) * torch.exp(log_decay)[..., None]
    return y.reshape(b, T, H, P)


def _ssd_recurrence(x, dt, A, B, C):
    """The SSM step by step: h_t = exp(dt_t·A)·h_{t-1} + dt_t·x_t·B_tᵀ, y_t = h_t·C_t."""
    b, T, H, P = x.shape
    group = torch.arange(H) // (H // B.shape[2])
    h, ys = torch.zeros(b, H, P, B.shape[3]), []
    for t in range(T):
        h = torch.exp(dt[:, t, :, None, None] * A[:, None, None]) * h
        h = h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, group][:, :, None, :]
        ys.append((h * C[:, t, group][:, :, None, :]).sum(-1))
    return torch.stack(ys, 1)


def _ssd_inputs(heads, head_dim, groups, state, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, seq_len, heads, head_dim, generator=g)
    dt = F.softplus(torch.randn(1, seq_len, heads, generator=g) - 1)
    A = -torch.rand(heads, generator=g) * 2 - 0.1
    B, C = (torch.randn(1, seq_len, groups, state, generator=g) / state**0.5 for _ in range(2))
    return x, dt, A, B, C


def test_ssd_reference_is_the_recurrence():
    # 2 groups of 2 heads, 3 chunks: the grouping and the inter-chunk terms are what is checked.
    x, dt, A, B, C = _ssd_inputs(heads=4, head_dim=8, groups=2, state=8, seq_len=24)
    torch.testing.assert_close(_ssd_chunked_reference(x, dt, A, B, C, chunk=8), _ssd_recurrence(x, dt, A, B, C),
                               rtol=1e-4, atol=1e-5)


def _ssd_reference_flops(heads, head_dim, groups, state, chunk):
    seq_len = 2 * chunk
    return counted(_ssd_chunked_reference, *_ssd_inputs(heads, head_dim, groups, state, seq_len), chunk) / seq_len


def test_mamba2_mixer_matches_ssd_reference():
    config = tiny("mamba2")
    with torch.device("meta"):
        mixer = AutoModelForCausalLM.from_config(config).backbone.layers[0].mixer
    reference = _ssd_reference_flops(mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size,
                                     mixer.chunk_size)
    reference += _conv_flops_per_token(mixer, 2 * mixer.chunk_size)  # over x, B and C
    predicted = flops.MIXER_FLOPS["mamba2"](config, 2 * config.chunk_size)
    assert predicted == pytest.approx(reference, rel=0.01)
    # C·Bᵀ is computed once per group, not per head: 2 groups of 4 heads.
    assert flops.ssd_flops(8, 16, 2, 16, 64) == pytest.approx(_ssd_reference_flops(8, 16, 2, 16, 64), rel=0.01)
    # flame's 340M: 32 heads of 64, one group of state 128, chunk 256 (one head counted).
    assert flops.ssd_flops(1, 64, 1, 128, 256) == pytest.approx(_ssd_reference_flops(1, 64, 1, 128, 256), rel=0.01)


def test_mamba2_linear_and_conv_parts_match_counter_on_real_train_step():
    # fla's torch SSD path contracts with broadcast products, which the counter does not see; it
    # sees every nn.Linear (6·N_matmul) and the depthwise nn.Conv1d over x, B and C.
    config = tiny("mamba2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    seq_len, kernel = 64, config.conv_kernel
    tokens = torch.randint(0, config.vocab_size, (1, seq_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in by_op.items() if "convolution" not in op) / seq_len
    assert flops.flops_breakdown(config, seq_len, model)["matmul"] == pytest.approx(matmuls, rel=0.01)
    # nn.Conv1d pads both sides by K-1 and fla keeps the first seq_len of its seq_len+K-1 outputs.
    # Only the forward is compared: the counter's convolution_backward counts a depthwise conv as
    # a dense one (groups ignored), so backward is taken as 2 × forward as for the other families.
    conv_per_output = by_op["aten.convolution"] / (seq_len + kernel - 1)
    mixer = model.backbone.layers[0].mixer
    assert conv_per_output == config.num_hidden_layers * flops.short_conv_flops(mixer.conv1d.in_channels, kernel)


def test_gsa_mixer_is_two_chunked_gla_passes_through_the_slots():
    """fla's chunk_gsa: keys into the slots (chunk GLA, dk -> num_slots), the slot softmax, then the
    slots' values (chunk GLA, num_slots -> dv); the naive chunked GLA reference for each pass."""
    seq_len = 2 * C
    config = tiny("gsa")
    config.use_short_conv, config.conv_size = True, 4  # the conv term too
    attn = _attn(config)
    heads, dk, dv, slots = attn.num_heads, attn.head_k_dim, attn.head_v_dim, attn.num_slots
    assert slots != dk  # the two passes differ
    reference = _chunk_gla_reference_flops(heads, dk, slots, seq_len) + _chunk_gla_reference_flops(heads, slots, dv,
                                                                                                    seq_len)
    reference += _conv_flops_per_token(attn, seq_len)
    assert flops.MIXER_FLOPS["gsa"](config, seq_len) == pytest.approx(reference, rel=0.01)


def test_mamba_parts_match_counter_on_real_train_step():
    # fla's torch Mamba1 path (no mamba_ssm): nn.Linear (6·N_matmul), the readout C·h as a matmul
    # per step (2·E·N, seen by the counter) and the depthwise conv; the state update's dt·B·x
    # (the other 2·E·N of the formula) is an element-wise product there, unseen.
    config = tiny("mamba")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    seq_len, kernel = 16, config.conv_kernel
    tokens = torch.randint(0, config.vocab_size, (1, seq_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    mixer = model.backbone.layers[0].mixer
    inner, state, layers = mixer.intermediate_size, mixer.ssm_state_size, config.num_hidden_layers
    linear = sum(n for op, n in by_op.items() if op in ("aten.mm", "aten.addmm")) / seq_len
    assert flops.flops_breakdown(config, seq_len, model)["matmul"] == pytest.approx(linear, rel=0.01)
    assert by_op["aten.bmm"] / seq_len == pytest.approx(3 * layers * 2 * inner * state, rel=0.01)
    conv_per_output = by_op["aten.convolution"] / (seq_len + kernel - 1)  # padded both sides, as mamba2's
    assert conv_per_output == layers * flops.short_conv_flops(inner, kernel)
    assert flops.MIXER_FLOPS["mamba"](config, seq_len) == 4 * inner * state + flops.short_conv_flops(inner, kernel)


def test_samba_counts_mamba_layers_and_its_sliding_window_attention(monkeypatch):
    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", lambda *a, **k: None)  # meta build only
    config = tiny("samba")
    window, seq_len = config.attn["window_size"], 256
    mixer = flops.flops_breakdown(config, seq_len)["mixer"] / 3
    attention = 4 * window * config.hidden_size  # layer 1: H·4·min(seq, window)·Dh
    assert config.attn["layers"] == [1] and window < seq_len
    assert mixer == pytest.approx(flops.MIXER_FLOPS["samba"](config, seq_len) + attention)


# ---- softmax attention


def test_llama_whole_formula_matches_counter_with_eager_attention():
    config = tiny("llama")
    config._attn_implementation = "eager"  # CPU SDPA kernels are invisible to FlopCounterMode
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    seq_len = 128
    measured = train_step_flops(model, seq_len)
    predicted = flops.flops_per_token(config, seq_len, model)
    # Eager attention multiplies the full T×T scores (mask added, not skipped): the same
    # un-halved convention as the formula.
    assert predicted == pytest.approx(measured, rel=0.01)
    attention = 12 * config.num_hidden_layers * seq_len * config.hidden_size
    assert flops.flops_breakdown(config, seq_len, model)["mixer"] == attention


def test_olmo_hybrid_counts_each_layer_by_its_type():
    """OLMo-Hybrid's attention layer: the whole train step under the counter with eager attention
    (its Gated DeltaNet kernel is fla's Triton, invisible: added from fla's naive chunked delta
    rule with the layer's head dims, checked against the formula's delta-rule term)."""
    from recipe.model import build_model

    config = tiny("olmo_hybrid")
    assert config.layer_types == ["linear_attention", "full_attention"]
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = build_model(config)
    seq_len = 2 * C
    mixer = model.model.layers[0].linear_attn
    hv, dk, dv = config.linear_num_value_heads, mixer.head_k_dim, mixer.head_v_dim
    delta_rule = _delta_rule_reference_flops(hv, dk, dv, seq_len, gated=True)
    assert hv * flops.chunk_delta_rule_flops(dk, dv) == pytest.approx(delta_rule, rel=0.01)
    # The counter sees the Linear matmuls and the attention layer's T×T matmuls, forward and
    # backward. The short convs (transformers' torch conv1d) are taken from their forward: the
    # counter's convolution_backward formula ignores groups (a depthwise conv counts as dense).
    tokens = torch.randint(0, config.vocab_size, (1, seq_len))
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=tokens, labels=tokens).loss.backward()
    matmuls = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "convolution" not in str(op))
    measured = matmuls / seq_len + 3 * (delta_rule + _conv_flops_per_token(mixer, seq_len))
    assert flops.flops_per_token(config, seq_len, model) == pytest.approx(measured, rel=0.01)
    linear, attention = (flops.MIXER_FLOPS["olmo_hybrid"](config, seq_len, i) for i in (0, 1))
    assert attention == flops.MIXER_FLOPS["llama"](config, seq_len) == 4 * seq_len * config.hidden_size
    assert linear != attention
    assert flops.flops_breakdown(config, seq_len, model)["mixer"] == 3 * (linear + attention)


def test_fla_transformer_counts_like_the_same_llama(monkeypatch):
    # tiny/transformer.json has tiny/llama.json's shapes; it cannot run on CPU (flash-attn), but its
    # formula must agree with the counter-checked Llama one. A placeholder lets it build on meta.
    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", lambda *a, **k: None)
    for seq_len in (64, 256):
        assert flops.flops_per_token(tiny("transformer"), seq_len) == flops.flops_per_token(tiny("llama"), seq_len)


def test_hybrid_attention_layers_use_the_attention_term(monkeypatch):
    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", lambda *a, **k: None)  # meta build only
    config = tiny("gla")
    config.attn = {"layers": [1], "num_heads": 2}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seq_len = 256
    mixer = flops.flops_breakdown(config, seq_len, model)["mixer"] / 3
    attention = 4 * seq_len * config.hidden_size
    assert mixer == pytest.approx(flops.MIXER_FLOPS["gla"](config, seq_len) + attention)


# ---- full-size values


def test_gla_340M_at_4096():
    config = load_config(f"{ROOT}/configs/gla_340M.json")
    breakdown = flops.flops_breakdown(config, 4096)
    # Team measurement: 6 × 341.7M matmul params + ~0.05 GFLOP of chunked recurrence ≈ 2.10 GFLOP.
    assert breakdown["matmul"] == pytest.approx(6 * 341.7e6, rel=0.001)
    assert breakdown["mixer"] == pytest.approx(0.05e9, rel=0.1)
    assert sum(breakdown.values()) == pytest.approx(2.10e9, rel=0.05)
    # No quadratic term: the length does not matter.
    assert flops.flops_per_token(config, 16384) == sum(breakdown.values())


def test_llama_360M_includes_quadratic_attention():
    config = load_config(f"{ROOT}/configs/llama_360M.json")
    layers, d = config.num_hidden_layers, config.hidden_size
    short, long = flops.flops_per_token(config, 2048), flops.flops_per_token(config, 4096)
    assert long - short == pytest.approx(12 * layers * (4096 - 2048) * d)
    assert flops.flops_breakdown(config, 4096)["mixer"] == 12 * layers * 4096 * d  # torchtitan's term
    # ... and more than the GLA of the same width at that length.
    assert long > 1.5 * flops.flops_per_token(load_config(f"{ROOT}/configs/gla_340M.json"), 4096)


# ---- fallback and peak


def test_unknown_model_type_falls_back_to_6N(caplog):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 10))
    config = types.SimpleNamespace(model_type="my_model", num_hidden_layers=1)
    with caplog.at_level(logging.WARNING, logger="recipe.flops"):
        assert flops.flops_per_token(config, 128, model) == 6 * (8 * 16 + 16 * 10)
    assert "my_model" in caplog.text


def test_register_mixer_flops_adds_a_family(monkeypatch):
    monkeypatch.setitem(flops.MIXER_FLOPS, "my_model", None)
    flops.register_mixer_flops("my_model")(lambda config, seq_len: 1000.0)
    model = torch.nn.Linear(4, 4)
    config = types.SimpleNamespace(model_type="my_model", num_hidden_layers=3)
    assert flops.flops_per_token(config, 128, model) == 6 * 16 + 3 * 3 * 1000.0


def test_peak_flops():
    assert flops.peak_flops("cpu") is None and flops.peak_flops(torch.device("cpu")) is None
    assert flops.peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_for_name("NVIDIA H200") == 989e12
    assert flops.peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_flops_for_name("Some Future GPU") is None
