"""Trainer-side hooks for the rollout end-to-end tests (named by dotted path in --hooks.post_step).

``Gate`` (listed before ``rollout``) holds every rank at the steps in FLARE_GATE_STEPS until the
test creates ``gate<step>`` in FLARE_PROBE_DIR, so receivers can be (re)started at known points.
``Probe`` (listed after ``rollout``) writes, at every export step, rank 0's ``trainer_step<N>.pt``
with the full weights (``full_tensor()``) and the logits on the receiver's probe batch, then
``done<N>``. Both poll files only: no collective, so no trainer timeout is involved.
"""

import os
import time

import torch
from torch.distributed.tensor import DTensor

from recipe.rollout.trainer.adapters import clean_name
from recipe.rollout.engine.reference_receiver import probe_batch


def _dir() -> str:
    return os.environ["FLARE_PROBE_DIR"]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class Gate:
    def __init__(self, job_config):
        self.steps = {int(s) for s in os.environ.get("FLARE_GATE_STEPS", "").split(",") if s}

    def __call__(self, state):
        if state.step not in self.steps:
            return
        path, deadline = os.path.join(_dir(), f"gate{state.step}"), time.monotonic() + 240
        while not os.path.exists(path):
            if time.monotonic() > deadline:
                raise TimeoutError(f"test gate {path} never opened")
            time.sleep(0.05)


class Probe:
    def __init__(self, job_config):
        self.interval = job_config.rollout.interval

    @torch.no_grad()
    def __call__(self, state):
        if state.skipped or state.step % self.interval:
            return
        model = state.model
        params = {}
        for name, p in model.named_parameters():
            t = p.detach()
            params[clean_name(name)] = (t.full_tensor() if isinstance(t, DTensor) else t).clone()
        # Eval mode as an engine runs (fla picks its recurrent kernels for short inference inputs).
        model.eval()
        try:
            logits = model(input_ids=probe_batch(model.config.vocab_size)).logits  # collective under FSDP/TP
        finally:
            model.train()
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        if _rank() == 0:
            path = os.path.join(_dir(), f"trainer_step{state.step}.pt")
            torch.save({"params": params, "logits": logits.float()}, path + ".tmp")
            os.replace(path + ".tmp", path)
            open(os.path.join(_dir(), f"done{state.step}"), "w").close()
