"""Meta-device build + to_empty + init_weights gives a sane, fully initialized model."""

import glob

import pytest
import torch

from recipe.model import build_model_on_meta, init_weights, load_model_config

TINY = sorted(p for p in glob.glob("configs/tiny/*.json") if not p.endswith("transformer.json"))


@pytest.mark.parametrize("path", TINY + ["configs/gla_debug.json"])
def test_every_parameter_and_buffer_is_initialized(path):
    config = load_model_config(path)
    config.tie_word_embeddings = True  # exercise re-tying for every family
    model = build_model_on_meta(config)
    # Poison the fresh storage so that anything init_weights misses is visible.
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
    init_weights(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{path}: {name} was not initialized"
            assert t.abs().max() < 100, f"{path}: {name} has absurd values"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_rope_buffers_match_a_cpu_built_model():
    config = load_model_config("configs/tiny/llama.json")
    model = build_model_on_meta(config)
    model.to_empty(device="cpu")
    init_weights(model)
    reference = type(model)(config)
    for (name, buf), (_, ref) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(buf, ref, msg=name)
