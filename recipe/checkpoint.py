"""DCP checkpoints: torchtitan's CheckpointManager, made atomic.

torchtitan writes ``step-N`` in place. Here a synchronous save goes to ``step-N.partial`` and is
renamed to ``step-N`` only after every rank has finished writing, so a job killed mid-save (or a
full disk) leaves the last good checkpoint as the newest complete one. Only complete checkpoints
(those with DCP's ``.metadata``) count for ``keep_latest_k``, so purging never deletes the last
good one to make room for a broken one. Async saves stay in place (DCP writes ``.metadata`` last,
and loading only considers folders that have it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch.distributed as dist
from torchtitan.components.checkpoint import DATALOADER, AsyncMode, CheckpointManager

from recipe.errors import UserError

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _step_dirs(folder: str, marker: str) -> list[tuple[int, str]]:
    """(step, path) of the `step-N` folders (exactly that name) in `folder` holding `marker`, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _STEP_DIR.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(os.path.join(path, marker)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def complete_checkpoints(folder: str) -> list[tuple[int, str]]:
    """(step, path) of the finished DCP checkpoints in `folder`, oldest first."""
    return _step_dirs(folder, ".metadata")


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def saved_data_parallel_degree(checkpoint_dir: str) -> int | None:
    """How many data-parallel ranks wrote the data stream state of a checkpoint (None: no state)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    return sum(k.startswith(f"{DATALOADER}.dp_rank_") for k in keys) or None


class AtomicCheckpointManager(CheckpointManager):
    def load(self, step: int = -1) -> bool:
        # The data stream is sharded per DP rank; DCP would fail on the missing/extra ranks' keys.
        dataloader = self.states.get(DATALOADER) if self.enable else None
        if dataloader is not None and DATALOADER not in self.exclude_from_loading:
            found = step if step != -1 else self._find_load_step()
            path = self._create_checkpoint_id(found)
            saved = saved_data_parallel_degree(path) if found > 0 and os.path.isdir(path) else None
            if saved is not None and saved != dataloader.dp_world_size:
                raise UserError(
                    f"checkpoint: {path} holds a data stream of data-parallel degree {saved}, this job has "
                    f"{dataloader.dp_world_size}; keep the DP degree (tensor_parallel_degree may change) or "
                    "restart the stream with --checkpoint.exclude_from_loading dataloader"
                )
        return super().load(step)

    def _find_load_step(self, folder: str = "") -> int:
        """The newest complete ``step-N``. torchtitan's own search matches ``step-(\\d+)`` anywhere
        in a name, so a ``step-N.partial`` whose ``.metadata`` was written before a kill (the rename
        had not happened yet) was picked, and the restart failed looking for ``step-N``."""
        folder = folder or self.folder
        # As torchtitan: DCP checkpoints, and HF-format saves (safetensors index).
        found = complete_checkpoints(folder) + _step_dirs(folder, "model.safetensors.index.json")
        return max((step for step, _ in found), default=-1)

    def dcp_save(self, state_dict, checkpoint_id, async_mode, enable_garbage_collection=False, to_hf=False):
        if async_mode != AsyncMode.DISABLED:
            return super().dcp_save(state_dict, checkpoint_id, async_mode, enable_garbage_collection, to_hf)
        partial = checkpoint_id + PARTIAL_SUFFIX
        if _is_rank0() and os.path.exists(partial):
            shutil.rmtree(partial)  # left by an interrupted save of the same step
        _barrier()
        super().dcp_save(state_dict, partial, async_mode, enable_garbage_collection, to_hf)
        _barrier()  # every rank's shards are on disk
        if _is_rank0():
            if os.path.exists(checkpoint_id):
                shutil.rmtree(checkpoint_id)  # an older save of this same step is superseded
            os.replace(partial, checkpoint_id)
            _fsync_dir(os.path.dirname(checkpoint_id) or ".")
            logger.info(f"Checkpoint complete: {checkpoint_id}")
        _barrier()
        return None

    def _purge_stale_checkpoints(self):
        if self.keep_latest_k <= 0 or not _is_rank0():
            return
        complete = complete_checkpoints(self.folder)
        for _, path in complete[: -self.keep_latest_k]:
            self.purge_queue.put(path)
        newest = complete[-1][0] if complete else -1
        for name in os.listdir(self.folder):
            stem = name.removesuffix(PARTIAL_SUFFIX)
            match = _STEP_DIR.match(stem)
            if name.endswith(PARTIAL_SUFFIX) and match and int(match.group(1)) < newest:
                self.purge_queue.put(os.path.join(self.folder, name))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
