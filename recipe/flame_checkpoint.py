"""Checkpoints written by flame (fla-org/flame): resumed by flare's checkpoint manager.

flame saves through the torchtitan CheckpointManager its README pins (0b44d4c). Its ``step-N``
folders are DCP checkpoints like flare's, with three differences that loading bridges:

- the model's tensors are nested under ``model.`` (``model.model.embeddings.weight``); flare
  keeps them at the top level. Optimizer and LR-schedule states have the same keys in both.
- ``train_state`` is flame's ``TrainState``: ``step``, ``skipped_step``, ``token`` (tokens of all
  data-parallel ranks) and logging history; flare keeps the step, its rank's token count and
  the skipped steps.
- ``dataloader.rank_<r>`` is a pickled torchdata loader state of flame's own data pipeline, which
  flare's stream cannot continue: the data stream restarts at the start of ``training.dataset``.

flame's folders have no ``manifest.json``; they are checked against the byte ranges their
``.metadata`` records (``recipe.checkpoint.find_damage``).
"""

from __future__ import annotations

import logging

import torch
from torch.distributed.checkpoint.stateful import Stateful

logger = logging.getLogger(__name__)

MODEL_PREFIX = "model."
# Keys only flame's TrainState writes (flare's train state has neither).
_FLAME_TRAIN_STATE = ("train_state.token", "train_state.global_avg_losses")


def is_flame_checkpoint(metadata) -> bool:
    """True for a full checkpoint saved by flame's trainer (its .metadata's keys say so)."""
    keys = metadata.state_dict_metadata
    return all(key in keys for key in _FLAME_TRAIN_STATE)


def flame_layout(model_state: dict) -> dict:
    """flare's flat model keys as flame's checkpoint names them."""
    return {MODEL_PREFIX + key: value for key, value in model_state.items()}


class FlameTrainState(Stateful):
    """Reads flame's TrainState into flare's train state (``Trainer.load_state_dict``)."""

    def __init__(self, train_state: Stateful, dp_degree: int):
        self.train_state = train_state
        self.dp_degree = dp_degree

    def state_dict(self) -> dict:
        # The entries DCP fills; flame's logging history (losses, elapsed time) is not read.
        return {
            "step": torch.tensor(0, dtype=torch.int32),
            "skipped_step": torch.tensor(0, dtype=torch.int32),
            "token": torch.tensor(0, dtype=torch.int64),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_state.load_state_dict({
            "step": int(state_dict["step"]),
            "ntokens_seen": int(state_dict["token"]) // self.dp_degree,  # flare counts per rank
            "skipped_steps": int(state_dict["skipped_step"]),
            "consecutive_skips": 0,
        })


def nested_for_flame(state_dict: dict, stateful_keys, dp_degree: int) -> tuple[dict, dict]:
    """flare's flattened load request in flame's layout: (request, the flat model part of it).

    `stateful_keys` are the checkpoint manager's non-model entries (optimizer, lr_scheduler, ...);
    every other entry of `state_dict` is a model tensor.
    """
    model = {k: v for k, v in state_dict.items() if k not in stateful_keys}
    request: dict = {"model": model}
    for key in ("optimizer", "lr_scheduler"):
        if key in state_dict:
            request[key] = state_dict[key]
    if "train_state" in state_dict:
        request["train_state"] = FlameTrainState(state_dict["train_state"], dp_degree)
    return request, model
