"""DCP checkpoints: torchtitan's CheckpointManager, made atomic and checked before loading.

torchtitan writes ``step-N`` in place. Here a synchronous save goes to ``step-N.partial`` and is
renamed to ``step-N`` only after every rank has finished writing, so a job killed mid-save (or a
full disk) leaves the last good checkpoint as the newest complete one. Before the rename, rank 0
writes ``manifest.json`` into the folder: every file and its size (and, with
``checkpoint.verify``, its SHA-256).

Before loading, a checkpoint is checked against its manifest (older ones and async saves, which
have none: every file ``.metadata`` names must hold the byte ranges it records), and the shapes in
its ``.metadata`` are compared with the model's. A damaged newest checkpoint stops the job with
one line naming the newest good one, or with ``checkpoint.fallback`` the job resumes from it.
Nothing is deleted for it: purging (``keep_latest_k``) counts whole checkpoints only and never
removes a damaged one, and a save of the same step moves a damaged folder to ``step-N.damaged``.
Async saves stay in place (DCP writes ``.metadata`` last, and loading only considers folders that
have it). ``step-N`` folders written by flame's trainer load too (recipe/flame_checkpoint.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torchtitan.components.checkpoint import DATALOADER, MODEL, AsyncMode, CheckpointManager

from recipe.errors import UserError
from recipe.flame_checkpoint import flame_layout, is_flame_checkpoint, nested_for_flame

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
DAMAGED_SUFFIX = ".damaged"
MANIFEST = "manifest.json"
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
    keys = FileSystemReader(checkpoint_dir).read_metadata().state_dict_metadata
    return sum(k.startswith(f"{DATALOADER}.dp_rank_") for k in keys) or None


# --------------------------------------------------------------------------- integrity


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(folder: str, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large buffers: one thread per file reads several shards at once.
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        return dict(zip(names, pool.map(lambda name: _sha256(os.path.join(folder, name)), names)))


def write_manifest(folder: str, checksums: bool = False) -> None:
    """Record every file of a finished save (relative path, size; SHA-256 with `checksums`)."""
    names = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, files in os.walk(folder)
        for name in files
    )
    names = [name for name in names if name != MANIFEST]
    files = {name: {"size": os.path.getsize(os.path.join(folder, name))} for name in names}
    if checksums:
        for name, digest in _checksums(folder, names).items():
            files[name]["sha256"] = digest
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def find_damage(path: str, verify: bool = False) -> str | None:
    """What is wrong with the DCP checkpoint folder `path`, in a few words; None when it looks whole.

    Cheap: file sizes against the manifest, or for a folder without one (saved before manifests,
    or asynchronously) the byte ranges its ``.metadata`` records. With `verify`, also every file's
    SHA-256 where the manifest has them (a full read).
    """
    manifest_file = os.path.join(path, MANIFEST)
    if os.path.isfile(manifest_file):
        try:
            with open(manifest_file) as f:
                files = json.load(f)["files"]
            sizes = {name: int(entry["size"]) for name, entry in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"{MANIFEST} cannot be read ({_first_line(e)})"
        for name, size in sorted(sizes.items()):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return f"{name} is missing"
            if os.path.getsize(file) != size:
                return f"{name} has {os.path.getsize(file)} bytes, {MANIFEST} recorded {size}"
        recorded = {name: entry["sha256"] for name, entry in files.items() if "sha256" in entry}
        if verify and recorded:
            for name, digest in sorted(_checksums(path, sorted(recorded)).items()):
                if digest != recorded[name]:
                    return f"{name} does not match its SHA-256 in {MANIFEST}"
        return None

    if not os.path.isfile(os.path.join(path, ".metadata")):
        return "it has no .metadata (not a finished DCP checkpoint)"
    try:
        metadata = FileSystemReader(path).read_metadata()
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises anything
        return f".metadata cannot be read ({_first_line(e)})"
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name}, named in .metadata, is missing"
        if os.path.getsize(file) < size:
            return f"{name} is truncated ({os.path.getsize(file)} bytes, .metadata needs {size})"
    return None


def _first_line(error: BaseException) -> str:
    if isinstance(error, CheckpointException) and error.failures:
        error = next(iter(error.failures.values()))[0]  # the first rank's own exception, not DCP's report
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text.splitlines()[0]}" if text else name


def _unused_name(path: str) -> str:
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


# --------------------------------------------------------------------------- manager


class AtomicCheckpointManager(CheckpointManager):
    def __init__(self, *args, checkpoint_config, **kwargs):
        super().__init__(*args, checkpoint_config=checkpoint_config, **kwargs)
        self.verify = getattr(checkpoint_config, "verify", False)
        self.fallback = getattr(checkpoint_config, "fallback", False)
        self._reported_damage: set[str] = set()

    def load(self, step: int = -1) -> bool:
        if not self.enable:
            return super().load(step)
        if os.path.exists(self.folder):
            step = self._agreed(self._step_to_load, step)
            if step == -1:
                return super().load(step)
        elif self.initial_load_path:
            self._agreed(self._check_initial_load_path)
        # The data stream is sharded per DP rank; DCP would fail on the missing/extra ranks' keys.
        dataloader = self.states.get(DATALOADER)
        if dataloader is not None and DATALOADER not in self.exclude_from_loading and step > 0:
            path = self._create_checkpoint_id(step)
            saved = saved_data_parallel_degree(path)
            if saved is not None and saved != dataloader.dp_world_size:
                raise UserError(
                    f"checkpoint: {path} holds a data stream of data-parallel degree {saved}, this job has "
                    f"{dataloader.dp_world_size}; keep the DP degree (tensor_parallel_degree may change) or "
                    "restart the stream with --checkpoint.exclude_from_loading dataloader"
                )
        return super().load(step)

    @staticmethod
    def _agreed(decide, *args):
        """Rank 0 inspects the files (checksums are a full read) and every rank takes its answer."""
        answer = [None]
        if _is_rank0():
            try:
                answer[0] = ("ok", decide(*args))
            except UserError as e:
                answer[0] = ("error", str(e))
            except OSError as e:  # the other ranks wait in the broadcast: they must hear of it too
                answer[0] = ("error", f"checkpoint: cannot inspect the checkpoints ({_first_line(e)})")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(answer, src=0)
        kind, value = answer[0]
        if kind == "error":
            raise UserError(value)
        return value

    def _step_to_load(self, requested: int) -> int:
        """The step to resume from: `requested` (checkpoint.load_step) or the newest whole checkpoint."""
        found = complete_checkpoints(self.folder)
        if requested != -1:
            path = self._create_checkpoint_id(requested)
            if not os.path.isdir(path):
                steps = ", ".join(str(s) for s, _ in found) or "none"
                raise UserError(
                    f"checkpoint.load_step={requested}: there is no {path} (complete checkpoints: {steps}); "
                    "pick one of those, or -1 for the newest"
                )
            problem = find_damage(path, self.verify)
            if problem:
                raise UserError(
                    f"checkpoint: {path} is damaged ({problem}); load another step with "
                    "--checkpoint.load_step N, or move the folder out of the checkpoint folder"
                )
            return requested
        if not found:
            return -1
        damaged = []
        for step, path in reversed(found):
            problem = find_damage(path, self.verify)
            if problem is None:
                break
            damaged.append((path, problem))
        else:
            step = -1
        if not damaged:
            return step
        newest, problem = damaged[0]
        names = ", ".join(os.path.basename(path) for path, _ in damaged)
        if step == -1:
            raise UserError(
                f"checkpoint: {newest} is damaged ({problem}) and no older checkpoint in {self.folder} is whole; "
                f"move {names} out of that folder to start from scratch"
            )
        if not self.fallback:
            raise UserError(
                f"checkpoint: the newest checkpoint {newest} is damaged ({problem}); resume from the newest "
                f"good one with --checkpoint.load_step {step} (or checkpoint.fallback = true), or move "
                f"{names} out of {self.folder}"
            )
        for path, problem in damaged:
            logger.warning(
                f"checkpoint: {path} is damaged ({problem}); resuming from step-{step} (checkpoint.fallback). "
                f"The folder is kept; a save of the same step moves it to {os.path.basename(path)}{DAMAGED_SUFFIX}"
            )
        return step

    def _check_initial_load_path(self) -> None:
        problem = find_damage(self.initial_load_path, self.verify)
        if problem:
            raise UserError(
                f"checkpoint.initial_load_path: {self.initial_load_path} is damaged ({problem}); "
                "write it again (e.g. scripts/tools/convert_hf_to_dcp.py) or point the key at another checkpoint"
            )

    def dcp_load(self, state_dict, checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        try:
            metadata = None if from_hf else FileSystemReader(checkpoint_id).read_metadata()
            if metadata is not None and is_flame_checkpoint(metadata):
                return self._load_flame(state_dict, checkpoint_id, metadata)
            if metadata is not None:
                self._check_fits(state_dict, checkpoint_id, metadata)
            super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)
        except UserError:
            raise
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            fix = (
                "write it again or point checkpoint.initial_load_path at another checkpoint"
                if self._is_initial_load(checkpoint_id)
                else "resume from an older checkpoint with --checkpoint.load_step N, or move the folder out of "
                "the checkpoint folder"
            )
            raise UserError(
                f"checkpoint: loading {checkpoint_id} failed ({_first_line(e)}); its files are damaged in a way "
                f"their sizes do not show: {fix}"
            ) from e

    def _load_flame(self, state_dict: dict, checkpoint_id: str, metadata) -> None:
        """A checkpoint flame's trainer wrote (recipe/flame_checkpoint.py): model, optimizer, LR
        schedule and step; flame's data stream state cannot be continued here."""
        dp_degree = getattr(self.states.get(DATALOADER), "dp_world_size", 1)
        request, model = nested_for_flame(state_dict, set(self.states) - {MODEL}, dp_degree)
        self._check_fits(flame_layout(model), checkpoint_id, metadata)
        if DATALOADER in state_dict and _is_rank0():
            logger.warning(
                f"checkpoint: {checkpoint_id} was written by flame; its data loader state is flame's own, "
                "so the data stream restarts at the beginning of training.dataset"
            )
        dcp.load(request, checkpoint_id=checkpoint_id)
        self.states[MODEL].load_state_dict(model)
        if _is_rank0():
            logger.info(f"checkpoint: loaded {', '.join(request)} from flame's {checkpoint_id}")

    def _is_initial_load(self, checkpoint_id: str) -> bool:
        initial = self.initial_load_path
        return bool(initial) and os.path.abspath(checkpoint_id) == os.path.abspath(initial)

    def _check_fits(self, state_dict: dict, checkpoint_id: str, metadata) -> None:
        """Every model tensor is in the checkpoint with the model's shape, and the checkpoint holds no
        model tensor the model lacks: DCP's .metadata has the saved shapes; nothing is read yet."""
        saved = metadata.state_dict_metadata
        not_model = {key for key in self.states if key != MODEL}
        fix = "use the model.config and model.tokenizer it was saved with" + (
            "" if self._is_initial_load(checkpoint_id) else ", or a new job.dump_folder for this model"
        )
        for key, value in state_dict.items():
            if not isinstance(value, torch.Tensor):
                continue  # optimizer, data stream, ...: Stateful objects, sized by the model
            entry = saved.get(key)
            if not isinstance(entry, TensorStorageMetadata):
                raise UserError(
                    f"checkpoint: {checkpoint_id} does not fit this model: it has no '{key}' "
                    f"(model: {list(value.shape)}); {fix}"
                )
            if tuple(entry.size) != tuple(value.shape):
                raise UserError(
                    f"checkpoint: {checkpoint_id} does not fit this model: '{key}' is {list(entry.size)} there, "
                    f"{list(value.shape)} in the model; {fix}"
                )
        for key, entry in saved.items():
            if (isinstance(entry, TensorStorageMetadata) and key.split(".", 1)[0] not in not_model
                    and key not in state_dict):
                raise UserError(
                    f"checkpoint: {checkpoint_id} does not fit this model: it holds '{key}' "
                    f"({list(entry.size)}), which the model lacks; {fix}"
                )

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
            write_manifest(partial, checksums=self.verify)
            if os.path.exists(checkpoint_id):
                problem = find_damage(checkpoint_id, self.verify)
                if problem:  # kept for the user: a damaged folder is never deleted
                    aside = _unused_name(checkpoint_id + DAMAGED_SUFFIX)
                    os.replace(checkpoint_id, aside)
                    logger.warning(f"checkpoint: {checkpoint_id} was damaged ({problem}); moved it to {aside}")
                else:
                    shutil.rmtree(checkpoint_id)  # an older save of this same step is superseded
            os.replace(partial, checkpoint_id)
            _fsync_dir(os.path.dirname(checkpoint_id) or ".")
            logger.info(f"Checkpoint complete: {checkpoint_id}")
        _barrier()
        return None

    def _purge_stale_checkpoints(self):
        if self.keep_latest_k <= 0 or not _is_rank0():
            return
        # Only whole checkpoints count, and a damaged one is never deleted: it stays for the user.
        whole = []
        for step, path in complete_checkpoints(self.folder):
            problem = find_damage(path)
            if problem is None:
                whole.append((step, path))
            elif path not in self._reported_damage:
                self._reported_damage.add(path)
                logger.warning(f"checkpoint: {path} is damaged ({problem}); keep_latest_k leaves it alone")
        for _, path in whole[: -self.keep_latest_k]:
            self.purge_queue.put(path)
        newest = whole[-1][0] if whole else -1
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
