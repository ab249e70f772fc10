"""Rollout and HF export of OLMo-Hybrid for vLLM's ``OlmoHybridForCausalLM``, checked on CPU without vLLM.

What vLLM 0.26.0 loads for configs/tiny/olmo_hybrid.json is read from its source by
scripts/dev/vllm_olmo_hybrid_names.py into vllm_olmo_hybrid_names.json (next to this file).
"""

import json
import os

import pytest
import torch
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridForCausalLM as TransformersOlmoHybrid

from recipe import hf_io
from recipe.errors import ConfigError
from recipe.model import load_model_config
from recipe.rollout.engine.reference_receiver import HFEngine
from recipe.rollout.protocol import unpack
from recipe.rollout.trainer.adapters import get_export_adapter
from recipe.rollout.trainer.source import WeightSource
from tests.rollout.seeded_model import materialized

HERE = os.path.dirname(os.path.abspath(__file__))
VLLM_NAMES = json.load(open(os.path.join(HERE, "vllm_olmo_hybrid_names.json")))


def tiny(**overrides):
    cfg = load_model_config("configs/tiny/olmo_hybrid.json")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def shapes(model):
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_exported_names_are_what_vllm_loads_each_once():
    assert VLLM_NAMES["config"] == "configs/tiny/olmo_hybrid.json"
    cfg = tiny()
    names = [it.name for it in get_export_adapter(cfg, torch.bfloat16).plan(shapes(materialized(cfg)))]
    assert len(names) == len(set(names))
    expected = VLLM_NAMES["checkpoint_names"]
    assert len(expected) == len(set(expected))
    assert sorted(names) == sorted(expected)
    # vLLM packs these names itself: the three short convolutions included (its fused conv1d
    # loader needs them apart), and the linear blocks' pre-norm under input_layernorm.
    assert "model.layers.0.linear_attn.conv1d.weight" in VLLM_NAMES["vllm_parameters"]
    assert {f"model.layers.0.linear_attn.{c}_conv1d.weight" for c in "qkv"} <= set(names)


def test_norms_go_under_vllms_names_whatever_transformers_calls_them():
    """transformers versions before 5.24 name the linear blocks' norms attention_layer_norm /
    feedforward_layer_norm in the model (5.24 still writes them so); vLLM 0.26 loads only
    input_layernorm / post_attention_layernorm."""
    cfg = tiny()
    renamed = {n.replace(".input_layernorm.", ".attention_layer_norm.").replace(
        ".post_attention_layernorm.", ".feedforward_layer_norm."): s for n, s in shapes(materialized(cfg)).items()}
    items = get_export_adapter(cfg, torch.bfloat16).plan(renamed)
    assert sorted(it.name for it in items) == sorted(VLLM_NAMES["checkpoint_names"])
    item = next(it for it in items if it.name == "model.layers.0.input_layernorm.weight")
    assert item.sources == ("model.layers.0.attention_layer_norm.weight",)


def test_tied_embeddings_are_sent_once():
    cfg = tiny(tie_word_embeddings=True)
    names = {it.name for it in get_export_adapter(cfg, torch.bfloat16).plan(shapes(materialized(cfg)))}
    assert names == set(VLLM_NAMES["checkpoint_names"]) - {"lm_head.weight"}


def test_reference_engine_receives_every_weight_in_the_engine_dtype():
    """vLLM creates A_log and dt_bias in the model dtype, so they are sent in it like the rest."""
    cfg = tiny()
    model = materialized(cfg)
    source = WeightSource(model, get_export_adapter(cfg, torch.bfloat16), 1 << 30)
    assert {it.dtype for it in source.items} == {torch.bfloat16}
    engine = HFEngine(cfg, torch.bfloat16)
    (plan,) = source.buckets
    buf = torch.empty(plan.nbytes, dtype=torch.uint8)
    source.fill(plan, buf)
    engine.load_weights(list(unpack(buf, plan.metas)))
    engine.coverage.check()
    params = dict(model.named_parameters())
    for name, held in engine.state().items():
        assert torch.equal(held, params[name].detach().to(torch.bfloat16)), name


@torch.no_grad()
def test_hf_export_is_what_vllm_and_transformers_load(tmp_path):
    """The HF folder flare writes (checkpoint.export_hf_on_finish, convert_dcp_to_hf) holds exactly
    vLLM's checkpoint names, and transformers' own class (fused conv1d, which it concatenates on
    load) computes flare's logits from it, bit for bit."""
    cfg = tiny()
    model = materialized(cfg).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
    folder = tmp_path / "hf"
    folder.mkdir()
    hf_io.write_hf({k: v.detach() for k, v in model.state_dict().items()}, hf_io.model_spec(cfg), str(folder))
    stored, _ = hf_io.read_safetensors(str(folder))
    assert sorted(stored) == sorted(VLLM_NAMES["checkpoint_names"])
    saved = json.load(open(folder / "config.json"))
    assert saved["architectures"] == ["OlmoHybridForCausalLM"] and saved["model_type"] == "olmo_hybrid"
    served, info = TransformersOlmoHybrid.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    assert torch.equal(served.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("overrides,key", [
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 16}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_settings_vllm_would_serve_as_another_model_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=rf"^rollout: model\.config has {key}=.* vLLM's OlmoHybridForCausalLM"):
        get_export_adapter(tiny(**overrides), torch.bfloat16)
    with pytest.raises(ConfigError, match=r"^rollout\.engine_tp_size=4: .*num_attention_heads=2"):
        get_export_adapter(tiny(), torch.bfloat16, engine_tp=4)
    with pytest.raises(ConfigError, match=r"^rollout\.fused_layout"):
        get_export_adapter(tiny(), torch.bfloat16, fused=True)
    get_export_adapter(tiny(), torch.bfloat16, engine_tp=2)
