"""configs/*.json and configs/tiny/*.json: load like flame's files, build, and (tiny) train a step."""

import contextlib
import glob
import json
import math
import os

import pytest
import torch

from recipe.device import configure_device

configure_device()  # before fla/triton

import fla  # noqa: E402,F401  (registers fla's model types)
import fla.layers.attn  # noqa: E402
import sdpa_flash_attn  # noqa: E402  (tests/)
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_CONFIGS = sorted(glob.glob(f"{ROOT}/configs/*.json") + glob.glob(f"{ROOT}/configs/tiny/*.json"))
TINY_CONFIGS = sorted(glob.glob(f"{ROOT}/configs/tiny/*.json")) + [f"{ROOT}/configs/gla_debug.json"]

# Parameters measured on the meta device (embeddings counted once when tied); name → (nominal, measured).
SIZES = {
    "gla_340M": (340e6, 341_707_776),  # tied embeddings, as flame's gla_340M
    "gated_deltanet_340M": (340e6, 379_888_124),  # head_dim 128 (flame's 256 measures 512M)
    "delta_net_340M": (340e6, 374_362_112),
    "retnet_340M": (340e6, 380_165_120),
    "hgrn2_340M": (340e6, 341_148_672),  # tied embeddings, as flame's hgrn2_340M
    "transformer_340M": (340e6, 373_867_520),
    "mamba2_340M": (340e6, 382_387_712),  # flame's mamba2_340M (48 layers, untied embeddings)
    "llama_360M": (360e6, 373_867_520),
    "olmo_hybrid_400M": (400e6, 412_148_384),  # 18 Gated DeltaNet + 6 attention layers (OLMo-Hybrid's 3:1)
    "gla_1B": (1.3e9, 1_365_514_240),
    "llama_1B": (1.3e9, 1_364_297_728),
}


def name(path):
    return os.path.relpath(path, f"{ROOT}/configs")


def load_config(path):
    with open(path) as f:
        values = json.load(f)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def build_on_meta(config, monkeypatch):
    if config.model_type == "transformer" or getattr(config, "attn", None):
        # fla's Attention refuses to build without flash-attn (CUDA-only, absent from CPU installs);
        # a meta build never calls the kernel, so a placeholder is enough to count parameters.
        monkeypatch.setattr(fla.layers.attn, "flash_attn_func", lambda *a, **k: None)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_every_family_has_a_340M_and_a_tiny_config():
    names = {name(p) for p in ALL_CONFIGS}
    for family in ("gla", "gated_deltanet", "delta_net", "retnet", "hgrn2", "mamba2", "transformer", "llama"):
        assert f"tiny/{family}.json" in names
        assert any(n.startswith(f"{family}_3") for n in names), family
    assert {"tiny/olmo_hybrid.json", "olmo_hybrid_400M.json"} <= names
    assert set(f"{n}.json" for n in SIZES) <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=name)
def test_config_loads_and_builds_on_meta(path, monkeypatch):
    config = load_config(path)
    model = build_on_meta(config, monkeypatch)
    n_params = sum(p.numel() for p in model.parameters())
    stem = name(path)[: -len(".json")]
    if stem in SIZES:
        nominal, measured = SIZES[stem]
        assert n_params == measured, f"{stem}: {n_params:,} parameters (expected {measured:,})"
        assert abs(n_params / nominal - 1) <= 0.25, f"{stem}: {n_params / 1e6:.1f}M vs nominal {nominal / 1e6:.0f}M"
        assert config.vocab_size == 32000
    if config.model_type == "llama":
        assert config._attn_implementation == "sdpa" and not config.tie_word_embeddings


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=name)
def test_tiny_config_shapes_allow_tp2(path, monkeypatch):
    config = load_config(path)
    assert config.num_hidden_layers == 2 and config.vocab_size == 512
    assert config.hidden_size % 64 == 0 and config.hidden_size <= 128
    if hasattr(config, "fuse_cross_entropy"):
        assert not config.fuse_cross_entropy  # fla's fused loss is CUDA-only
    model = build_on_meta(config, monkeypatch)
    # Column/row-wise sharding over 2 ranks splits every projection (heads included) in two.
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 2 == 0 and mod.out_features % 2 == 0, mod_name
    heads = [getattr(config, "num_heads", None) or getattr(config, "num_attention_heads", None)]  # Mamba1: none
    if getattr(config, "attn", None):
        heads.append(config.attn["num_heads"])
    assert all(h % 2 == 0 for h in heads if h)
    if config.model_type in ("delta_net", "gated_deltanet"):
        assert config.use_short_conv


@pytest.mark.parametrize("path", TINY_CONFIGS[:-1], ids=name)  # gla_debug.json == tiny/gla.json
def test_tiny_config_trains_one_step_on_cpu(path):
    config = load_config(path)
    # fla's softmax attention calls flash-attn (CUDA-only, absent from CPU installs): exact SDPA stand-in
    softmax = config.model_type == "transformer" or getattr(config, "attn", None)
    attention = sdpa_flash_attn.installed() if softmax else contextlib.nullcontext()
    torch.manual_seed(0)
    with attention:
        # bf16: fla's chunk_delta_rule refuses float32; the others are run the same way.
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        tokens = torch.randint(0, config.vocab_size, (1, 128))  # two 64-token chunks
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.5  # untrained: about uniform
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.float().abs().sum().item() for g in grads) > 0


def test_gla_debug_is_the_tiny_gla():
    assert json.load(open(f"{ROOT}/configs/gla_debug.json")) == json.load(open(f"{ROOT}/configs/tiny/gla.json"))
