"""Rollout export of fla's Mamba2 to vLLM's ``Mamba2ForCausalLM``, checked on CPU without vLLM.

vLLM is not installed here, so what it loads is written out below from its source (vLLM 0.26.0),
and the same names are derived from the HF models (fla's, and transformers' ``Mamba2ForCausalLM``,
the class vLLM's mirrors and that transformers and vLLM build from an exported config.json).
"""

import json

import pytest
import torch
import transformers

from recipe import hf_io
from recipe.errors import ConfigError
from recipe.model import load_model_config
from recipe.rollout.engine.reference_receiver import HFEngine
from recipe.rollout.protocol import unpack
from recipe.rollout.trainer.adapters import get_export_adapter
from recipe.rollout.trainer.source import WeightSource
from tests.rollout.seeded_model import materialized


def vllm_mamba2_weights(c) -> dict[str, tuple[int, ...]]:
    """The weights vLLM 0.26.0's ``Mamba2ForCausalLM.load_weights`` takes, by HF name, with the shape
    its loaders copy: vllm/model_executor/models/mamba2.py (``backbone.embeddings``, ``layers.N.norm``,
    ``layers.N.mixer``, ``norm_f``, ``lm_head`` unless ``tie_word_embeddings``; ``hf_to_vllm_mapper``
    renames ``.A_log`` to ``.A``) and vllm/model_executor/layers/mamba/mamba_mixer2.py (``MambaMixer2``:
    ``in_proj`` [z, x, B, C, dt], ``conv1d`` a linear of kernel size whose weight it views as
    [conv_dim, 1, K], ``A`` = -exp(A_log) in float32, ``D`` and ``dt_bias`` per head, ``out_proj``,
    and ``Mixer2RMSNormGated``'s ``norm.weight``; biases only with use_bias / use_conv_bias)."""
    inner, heads, gn = c.expand * c.hidden_size, c.num_heads, c.n_groups * c.state_size
    conv_dim = inner + 2 * gn
    layer = {
        "norm.weight": (c.hidden_size,),
        "mixer.in_proj.weight": (inner + conv_dim + heads, c.hidden_size),
        "mixer.conv1d.weight": (conv_dim, 1, c.conv_kernel),
        "mixer.A_log": (heads,),
        "mixer.D": (heads,),
        "mixer.dt_bias": (heads,),
        "mixer.norm.weight": (inner,),
        "mixer.out_proj.weight": (c.hidden_size, inner),
    }
    if c.use_conv_bias:
        layer["mixer.conv1d.bias"] = (conv_dim,)
    if c.use_bias:
        layer["mixer.in_proj.bias"] = (inner + conv_dim + heads,)
        layer["mixer.out_proj.bias"] = (c.hidden_size,)
    out = {"backbone.embeddings.weight": (c.vocab_size, c.hidden_size), "backbone.norm_f.weight": (c.hidden_size,)}
    for i in range(c.num_hidden_layers):
        out.update({f"backbone.layers.{i}.{k}": v for k, v in layer.items()})
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    return out


def tiny(**overrides):
    cfg = load_model_config("configs/tiny/mamba2.json")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def transformers_mamba2(cfg):
    """transformers' own Mamba2 (not fla's) from the config.json flare writes."""
    values = cfg.to_dict()
    for fla_name, name in hf_io.TRANSFORMERS_NAMES["mamba2"].items():
        values[name] = values[fla_name]
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config.from_dict(values))


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"use_bias": True, "use_conv_bias": False}],
                         ids=["untied", "tied", "biases"])
def test_exported_names_are_what_vllm_loads_each_once(overrides):
    cfg = tiny(**overrides)
    model = materialized(cfg)
    items = get_export_adapter(cfg, torch.bfloat16).plan({n: tuple(p.shape) for n, p in model.named_parameters()})
    names = [it.name for it in items]
    assert len(names) == len(set(names))
    assert {it.name: it.shape for it in items} == vllm_mamba2_weights(cfg)
    # The same names from the HF models: fla's checkpoint and transformers' Mamba2.
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    assert set(names) == set(model.state_dict()) - tied == set(transformers_mamba2(cfg).state_dict()) - tied


def test_A_log_is_sent_in_float32_and_the_rest_in_the_engine_dtype():
    cfg = tiny()
    model = materialized(cfg)
    source = WeightSource(model, get_export_adapter(cfg, torch.bfloat16), 1 << 30)
    fp32 = {it.name for it in source.items if it.dtype == torch.float32}
    assert fp32 == {f"backbone.layers.{i}.mixer.A_log" for i in range(cfg.num_hidden_layers)}
    # Into the reference engine (fla's model in bf16, A_log in float32): every weight once, the
    # trainer's values cast per parameter, bit for bit.
    engine = HFEngine(cfg, torch.bfloat16)
    (plan,) = source.buckets
    buf = torch.empty(plan.nbytes, dtype=torch.uint8)
    source.fill(plan, buf)
    engine.load_weights(list(unpack(buf, plan.metas)))
    engine.coverage.check()
    params = dict(model.named_parameters())
    for name, held in engine.state().items():
        assert torch.equal(held, params[name].detach().to(torch.float32 if name in fp32 else torch.bfloat16)), name


@torch.no_grad()
def test_hf_export_is_served_by_transformers_mamba2_as_trained(tmp_path):
    """The HF folder flare writes (checkpoint.export_hf_on_finish, convert_dcp_to_hf) read by
    transformers' Mamba2 (what vLLM's was checked against on a GPU) computes fla's logits; vLLM
    reads layer_norm_epsilon, which fla calls norm_eps."""
    cfg = tiny(norm_eps=1e-3)  # not transformers' default, so the name matters
    model = materialized(cfg).eval()
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
    spec = hf_io.model_spec(cfg)
    folder = tmp_path / "hf"
    folder.mkdir()
    hf_io.write_hf({k: v.detach() for k, v in model.state_dict().items()}, spec, str(folder))
    saved = json.load(open(folder / "config.json"))
    # What vLLM 0.26.0's mamba2.py reads from the config, and the architecture it is registered as.
    for key in ("hidden_size", "state_size", "conv_kernel", "expand", "use_conv_bias", "use_bias", "n_groups",
                "num_heads", "head_dim", "layer_norm_epsilon", "hidden_act", "vocab_size", "num_hidden_layers",
                "tie_word_embeddings"):
        assert key in saved, key
    assert saved["architectures"] == ["Mamba2ForCausalLM"] and "intermediate_size" not in saved
    served = transformers.Mamba2ForCausalLM.from_pretrained(folder).eval()
    assert served.config.layer_norm_epsilon == 1e-3
    # rescale_prenorm_residual is written off: transformers' class would divide the loaded out_proj.
    assert cfg.rescale_prenorm_residual and not saved["rescale_prenorm_residual"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(served.state_dict()[name], tensor), name
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    torch.testing.assert_close(served(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,key", [
    ({"norm_before_gate": True}, "norm_before_gate"),
    ({"rmsnorm": False}, "rmsnorm"),
    ({"D_has_hdim": True}, "D_has_hdim"),
    ({"dt_limit": (0.0, 1.0)}, "dt_limit"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"intermediate_size": 512}, "intermediate_size"),
])
def test_settings_vllm_would_serve_as_another_model_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=rf"^rollout: model\.config has {key}=.* vLLM's Mamba2ForCausalLM computes"):
        get_export_adapter(tiny(**overrides), torch.bfloat16)
    with pytest.raises(ConfigError, match=r"^rollout\.engine_tp_size=3: .*num_heads=16"):
        get_export_adapter(tiny(), torch.bfloat16, engine_tp=3)
    get_export_adapter(tiny(hidden_act="swish"), torch.bfloat16, engine_tp=4)
