"""A checkpoint written by flame's own trainer resumes in flare and continues flame's run.

tests/data/flame_checkpoint/ comes from scripts/dev/make_flame_checkpoint.py: flame (commit in
flame_run.json, on the torchtitan commit its README pins) trained a tiny GLA model on CPU in fp32
for 7 steps, saved ``checkpoint/step-4`` and logged every step's loss, gradient norm and learning
rate; flame's converter wrote ``hf/`` from step-4.

Every document of the data set is the same text and fills one row exactly, so each batch is the
same in both trainers although flare restarts the data stream (flame's data loader state cannot
be continued): steps 5-7 differ only if the model, the optimizer moments, the LR schedule or the
step count were restored wrongly.

Tolerance: both runs execute the same fla 0.6 Triton kernels (interpreted) and torch 2.13 ops in
fp32 on the same inputs in the same order, and flame's mean over the tokens and flare's token-sum
divided by the count give the same fp32 number here: the losses and gradient norms come out
bit-identical. RTOL = 1e-6 (a few fp32 ulps) leaves room for a different summation order (e.g.
another CPU thread count), far below what a wrong resume changes: resuming without the optimizer
moments moves the step-6 loss by 5e-3 relative and its gradient norm by 50%
(test_a_resume_without_the_optimizer_state_is_told_apart).
"""

import json
import os
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from recipe.checkpoint import MANIFEST, complete_checkpoints, find_damage
from recipe.config import parse_job_config
from recipe.model import load_hf_weights
from recipe.trainer import Trainer

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "flame_checkpoint")
RTOL = 1e-6

pytestmark = pytest.mark.usefixtures("single_process_group")


def flame_run() -> dict:
    with open(os.path.join(FIXTURE, "flame_run.json")) as f:
        return json.load(f)


def flare_args(dump_folder, checkpoint_folder, *extra) -> list[str]:
    """flame's job (flame_run.json) in flare's keys."""
    job = flame_run()["job"]
    return [
        "--job.dump_folder", str(dump_folder),
        "--model.config", os.path.join(FIXTURE, "gla.json"),
        "--model.tokenizer", os.path.join(FIXTURE, "tokenizer"),
        "--training.dataset", os.path.join(FIXTURE, "data.jsonl"),
        "--training.local_batch_size", str(job["training.batch_size"]),
        "--training.seq_len", str(job["training.seq_len"]),
        "--training.steps", str(job["training.steps"]),
        "--training.max_norm", str(job["training.max_norm"]),
        "--training.mixed_precision_param", job["training.mixed_precision_param"],
        "--optimizer.lr", str(job["optimizer.lr"]),
        "--optimizer.eps", str(job["optimizer.eps"]),
        "--optimizer.weight_decay", str(job["optimizer.weight_decay"]),
        "--lr_scheduler.warmup_steps", str(job["lr_scheduler.warmup_steps"]),
        "--lr_scheduler.decay_type", job["lr_scheduler.decay_type"],
        "--lr_scheduler.min_lr_factor", str(job["lr_scheduler.lr_min"]),
        "--checkpoint.enable", "--checkpoint.folder", str(checkpoint_folder),
        "--checkpoint.interval", "100",
        "--metrics.log_freq", "1",
        *extra,
    ]


def logged(dump_folder) -> dict[int, dict]:
    with open(os.path.join(dump_folder, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, filter(str.strip, f))}


def resume(tmp_path, *extra) -> dict[int, dict]:
    """Resume a copy of flame's checkpoint folder (the run saves its last step next to flame's)."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(os.path.join(FIXTURE, "checkpoint"), folder)
    trainer = Trainer(parse_job_config(flare_args(tmp_path / "run", folder, *extra)))
    trainer.train()
    trainer.close()
    assert trainer.step == flame_run()["job"]["training.steps"]
    return logged(tmp_path / "run")


def test_flame_checkpoint_resumes_with_flames_losses(tmp_path, caplog):
    run = flame_run()
    saved = run["saved_step"]
    with caplog.at_level("WARNING", logger="recipe.checkpoint"):
        ours = resume(tmp_path)
    assert any("written by flame" in r.getMessage() and "data stream restarts" in r.getMessage()
               for r in caplog.records)
    # flare's own save of the last step sits next to flame's, with its manifest; a restart takes it.
    steps = [step for step, _ in complete_checkpoints(str(tmp_path / "checkpoint"))]
    assert steps == [saved, run["job"]["training.steps"]]
    assert os.path.isfile(tmp_path / "checkpoint" / f"step-{steps[-1]}" / MANIFEST)

    assert sorted(ours) == list(range(saved + 1, run["job"]["training.steps"] + 1))  # resumed at saved + 1
    flame = {r["step"]: r for r in run["logged"]}
    for step in sorted(ours):
        # flame logs the learning rate after the schedule's step (the next step's), flare the one it used.
        assert ours[step]["lr"] == pytest.approx(flame[step - 1]["lr"], rel=1e-12), step
        assert ours[step]["loss"] == pytest.approx(flame[step]["loss"], rel=RTOL), step
        assert ours[step]["grad_norm"] == pytest.approx(flame[step]["grad_norm"], rel=RTOL), step
    # flame's tokens (all ranks) are flare's tokens on its one rank: 4 steps x 2 rows x 32 tokens more.
    job = run["job"]
    assert ours[saved + 1]["tokens_seen"] == (saved + 1) * job["training.batch_size"] * job["training.seq_len"]


def test_a_resume_without_the_optimizer_state_is_told_apart(tmp_path):
    """The comparison above can fail: without flame's Adam moments step 6 is off by far more than RTOL."""
    ours = resume(tmp_path, "--checkpoint.exclude_from_loading", "optimizer")
    flame = {r["step"]: r for r in flame_run()["logged"]}
    step = flame_run()["saved_step"] + 2  # step saved+1 equals flame's: it runs on the loaded weights
    assert ours[step]["loss"] != pytest.approx(flame[step]["loss"], rel=100 * RTOL)
    assert ours[step]["grad_norm"] != pytest.approx(flame[step]["grad_norm"], rel=100 * RTOL)


def test_a_damaged_flame_checkpoint_is_named(tmp_path):
    """flame's folders have no manifest: the byte ranges in their .metadata are what is checked."""
    step = flame_run()["saved_step"]
    path = tmp_path / f"step-{step}"
    shutil.copytree(os.path.join(FIXTURE, "checkpoint", f"step-{step}"), path)
    assert find_damage(str(path)) is None
    shard = path / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert "__0_0.distcp is truncated" in find_damage(str(path))


def dcp_model_weights() -> dict[str, torch.Tensor]:
    """The model tensors of flame's step-N, under flare's (HF) names."""
    path = os.path.join(FIXTURE, "checkpoint", f"step-{flame_run()['saved_step']}")
    meta = FileSystemReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=path)
    return {k.removeprefix("model."): v for k, v in state.items()}


def test_flame_hf_conversion_loads_through_init_from_hf(tmp_path):
    """flame's convert_dcp_to_hf output (hf/) gives flare's model step-N's weights, bit for bit."""
    hf = os.path.join(FIXTURE, "hf")
    trainer = Trainer(parse_job_config(
        flare_args(tmp_path / "run", tmp_path / "none", "--model.init_from_hf", hf, "--checkpoint.no_enable")
    ))
    load_hf_weights(trainer.model, hf)  # what Trainer.train does for model.init_from_hf at step 0
    loaded = get_model_state_dict(trainer.model)
    expected = dcp_model_weights()
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    trainer.close()


def test_flares_converter_reads_flames_checkpoint(tmp_path):
    """scripts/tools/convert_dcp_to_hf.py on flame's step-N writes the weights flame's converter wrote."""
    from safetensors.torch import load_file

    from scripts.tools.convert_dcp_to_hf import main as dcp_to_hf

    step = os.path.join(FIXTURE, "checkpoint", f"step-{flame_run()['saved_step']}")
    out = tmp_path / "hf"
    assert dcp_to_hf(["--checkpoint", step, "--config", os.path.join(FIXTURE, "gla.json"),
                      "--tokenizer", os.path.join(FIXTURE, "tokenizer"), "--output", str(out)]) == 0
    ours, flames = load_file(out / "model.safetensors"), load_file(os.path.join(FIXTURE, "hf", "model.safetensors"))
    assert sorted(ours) == sorted(flames)
    for name, tensor in flames.items():
        assert torch.equal(ours[name], tensor), name
