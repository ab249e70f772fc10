"""AtomicCheckpointManager: saves become visible only when complete; purging keeps the last good one."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from recipe.checkpoint import PARTIAL_SUFFIX, AtomicCheckpointManager, complete_checkpoints
from recipe.config import parse_job_config


class Counter:
    """A stateful stand-in for the dataloader: its state must round-trip too."""

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.fixture()
def process_group(tmp_path):
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def build(tmp_path, keep_latest_k=2):
    from torchtitan.components.lr_scheduler import build_lr_schedulers
    from torchtitan.components.optimizer import build_optimizers
    from torchtitan.distributed import ParallelDims

    cfg = parse_job_config(["--checkpoint.enable", "--checkpoint.interval", "10",
                            "--checkpoint.keep_latest_k", str(keep_latest_k),
                            "--job.dump_folder", str(tmp_path), "--optimizer.implementation", "foreach"])
    pd = ParallelDims(dp_shard=1, dp_replicate=1, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=1)
    model = torch.nn.Linear(4, 4)
    optimizers = build_optimizers([model], cfg.optimizer, pd)
    schedulers = build_lr_schedulers(optimizers, cfg.lr_scheduler, 100)
    data = Counter()
    manager = AtomicCheckpointManager(
        dataloader=data, model_parts=[model], optimizers=optimizers, lr_schedulers=schedulers,
        states={}, checkpoint_config=cfg.checkpoint, sd_adapter=None, base_folder=str(tmp_path),
    )
    return manager, model, data


def save_at(manager, model, data, step):
    with torch.no_grad():
        model.weight.fill_(float(step))
    data.position = step
    manager.save(step)


def test_save_load_round_trip_and_keep_latest_k(tmp_path, process_group):
    manager, model, data = build(tmp_path, keep_latest_k=2)
    for step in (10, 20, 30):
        save_at(manager, model, data, step)
    manager.close()  # joins the purge thread
    folder = tmp_path / "checkpoint"
    assert [s for s, _ in complete_checkpoints(str(folder))] == [20, 30]
    assert not any(name.endswith(PARTIAL_SUFFIX) for name in os.listdir(folder))

    manager, model, data = build(tmp_path)
    assert manager.load()
    assert model.weight.eq(30.0).all() and data.position == 30
    manager.close()


def test_interrupted_save_never_replaces_the_last_good_one(tmp_path, process_group, monkeypatch):
    manager, model, data = build(tmp_path, keep_latest_k=2)
    save_at(manager, model, data, 10)
    save_at(manager, model, data, 20)

    real_save = dcp.save

    def save_then_die(state_dict, *, checkpoint_id=None, **kwargs):
        os.makedirs(checkpoint_id, exist_ok=True)
        (open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb")).write(b"half a shard")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", save_then_die)
    with pytest.raises(OSError, match="No space left"):
        save_at(manager, model, data, 30)
    monkeypatch.setattr(dcp, "save", real_save)
    folder = tmp_path / "checkpoint"
    assert not (folder / "step-30").exists()
    assert (folder / f"step-30{PARTIAL_SUFFIX}").exists()
    # A folder from an older torchtitan-style in-place save that never finished: no .metadata.
    (folder / "step-40").mkdir()

    # The next good save purges the oldest *complete* checkpoint only; the broken ones do not count.
    save_at(manager, model, data, 50)
    manager.close()
    assert [s for s, _ in complete_checkpoints(str(folder))] == [20, 50]
    assert not (folder / f"step-30{PARTIAL_SUFFIX}").exists()  # stale partial of an older step: removed

    manager, model, data = build(tmp_path)
    assert manager.load()
    assert model.weight.eq(50.0).all() and data.position == 50
    manager.close()


def test_a_kill_between_metadata_and_rename_resumes_from_the_last_complete_one(tmp_path, process_group):
    # DCP writes .metadata last, but into step-N.partial: a kill before the rename leaves a
    # partial folder that looks finished. torchtitan's unanchored step-(\d+) search picked it and
    # the restart failed with "checkpoint .../step-N is not found" (seen in soak_resume).
    import shutil

    manager, model, data = build(tmp_path, keep_latest_k=2)
    save_at(manager, model, data, 10)
    save_at(manager, model, data, 20)
    manager.close()
    folder = tmp_path / "checkpoint"
    shutil.copytree(folder / "step-20", folder / f"step-30{PARTIAL_SUFFIX}")  # .metadata and all

    manager, model, data = build(tmp_path)
    assert manager._find_load_step() == 20
    assert manager.load()
    assert model.weight.eq(20.0).all() and data.position == 20
    manager.close()


def test_resave_of_same_step_replaces_it_whole(tmp_path, process_group):
    manager, model, data = build(tmp_path)
    save_at(manager, model, data, 10)
    with torch.no_grad():
        model.weight.fill_(7.0)
    manager.save(10)
    manager.close()
    manager, model, data = build(tmp_path)
    manager.load()
    assert model.weight.eq(7.0).all()
    manager.close()
