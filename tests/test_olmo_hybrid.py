"""OLMo-Hybrid as flare builds it (recipe/olmo_hybrid.py): transformers' model with the short
convolutions held as q_conv1d/k_conv1d/v_conv1d computes exactly what transformers' own class
(one stacked conv1d) computes, and training.varlen is refused."""

import pytest
import torch
from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridForCausalLM as TransformersOlmoHybrid

from recipe.errors import ConfigError
from recipe.model import build_model, build_model_on_meta, check_varlen, init_weights, load_model_config

CONVS = ("q_conv1d", "k_conv1d", "v_conv1d")


def tiny():
    return load_model_config("configs/tiny/olmo_hybrid.json")


def stacked(state: dict) -> dict:
    """flare's state under transformers' names: conv1d = [q | k | v] filters."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".q_conv1d.weight")]:
        prefix = key[: -len("q_conv1d.weight")]
        out[f"{prefix}conv1d.weight"] = torch.cat([out.pop(f"{prefix}{c}.weight") for c in CONVS])
    return out


def test_flare_model_computes_transformers_model_exactly():
    cfg = tiny()
    torch.manual_seed(0)
    model = build_model(cfg)
    init_weights(model)
    mixer = model.model.layers[0].linear_attn
    assert [getattr(mixer, c).weight.shape[0] for c in CONVS] == [32, 32, 64]  # key_dim, key_dim, value_dim
    assert not hasattr(model.model.layers[1], "linear_attn")  # layer_types: linear, then full attention
    reference = TransformersOlmoHybrid._from_config(cfg, dtype=torch.float32)
    reference.load_state_dict(stacked(model.state_dict()), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 80))  # > 64 tokens: two chunks of fla's kernel
    ours, theirs = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert torch.equal(ours.logits, theirs.logits)
    ours.loss.backward()
    theirs.loss.backward()
    grads = stacked({n: p.grad for n, p in model.named_parameters()})
    for name, p in reference.named_parameters():
        assert torch.equal(grads[name], p.grad), name


def test_meta_build_initializes_like_transformers():
    """build_model_on_meta + init_weights (the trainer's path) gives every parameter transformers'
    init: the convolutions normal(0, initializer_range), A_log in log([a_log_min, a_log_max])."""
    cfg = tiny()
    model = build_model_on_meta(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    init_weights(model)
    mixer = model.model.layers[0].linear_attn
    conv = torch.cat([getattr(mixer, c).weight.flatten() for c in CONVS])
    assert abs(conv.std().item() - cfg.initializer_range) < 0.005 and abs(conv.mean().item()) < 0.005
    assert (mixer.A_log.exp() <= cfg.linear_a_log_max).all() and (mixer.A_log.exp() >= cfg.linear_a_log_min).all()
    assert torch.equal(model.model.layers[1].post_feedforward_layernorm.weight, torch.ones(cfg.hidden_size))


def test_varlen_is_refused_in_one_line():
    """flare's varlen hands fla's `cu_seqlens` to the model; transformers' OLMo-Hybrid takes packed
    documents only through flash-attention's kwargs (and its torch short convolution without the
    causal-conv1d package ignores them)."""
    with pytest.raises(ConfigError, match=r"^training\.varlen: model_type 'olmo_hybrid' is not an fla model .*= false$"):
        check_varlen(tiny())
