"""``ExportSnapshot``: a post-step hook that writes what the rollout export sent, for
``scripts/tools/check_vllm.py`` to compare against the engine (runs in the trainer).

List it after ``rollout`` in ``hooks.post_step``. At every export step whose number is a multiple
of ``FLARE_SNAPSHOT_EVERY`` x ``rollout.interval`` (default: every export), rank 0 writes
``$FLARE_SNAPSHOT_DIR/v<step>.safetensors``: every exported tensor under its engine name, in the
dtype the adapter sends it in, then an empty ``v<step>.done``. Gathering full tensors is a
collective, so every rank runs the hook; only rank 0 writes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from recipe.rollout.trainer.adapters import clean_name, get_export_adapter
from recipe.rollout.trainer.hook import ROLLOUT_DTYPES


class ExportSnapshot:
    def __init__(self, job_config):
        self.cfg = job_config.rollout
        self.dir = os.environ.get("FLARE_SNAPSHOT_DIR")
        if not self.dir:
            raise ValueError("ExportSnapshot needs FLARE_SNAPSHOT_DIR (the folder scripts/tools/check_vllm.py reads)")
        self.every = self.cfg.interval * int(os.environ.get("FLARE_SNAPSHOT_EVERY", "1"))
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @torch.no_grad()
    def __call__(self, state) -> None:
        if not self.cfg.enable or state.skipped or state.step % self.every:
            return
        model = state.model
        adapter = get_export_adapter(model.config, ROLLOUT_DTYPES[self.cfg.dtype],
                                     engine_tp=self.cfg.engine_tp_size, fused=self.cfg.fused_layout)
        params = {clean_name(n): p for n, p in model.named_parameters()}
        tied = adapter.tied_aliases(list(params))
        tensors = {}
        for name, p in params.items():
            t = p.detach()
            t = t.full_tensor() if isinstance(t, DTensor) else t  # collective on every rank
            if name not in tied and self.rank == 0:
                tensors[name] = t.to(adapter.dtype_for(name)).cpu().contiguous()
        if self.rank == 0:
            from safetensors.torch import save_file

            path = os.path.join(self.dir, f"v{state.step}.safetensors")
            save_file(tensors, path + ".tmp")
            os.replace(path + ".tmp", path)
            open(os.path.join(self.dir, f"v{state.step}.done"), "w").close()
