"""The seeded CPU model the rollout tests export: identical in every process that builds it (the
test module, and the torchrun/subprocess scripts next to it, which must not import the test module)."""

import torch

from recipe.model import build_model_on_meta, init_weights


def materialized(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model_on_meta(cfg)
    model.to_empty(device="cpu")
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty gives each module its own tensor
    init_weights(model)
    return model
