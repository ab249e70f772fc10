"""The README's main command, for real: torchrun, 2 CPU ranks (gloo, FSDP), the fla GLA debug model
on the built-in corpus. Checks metrics.jsonl, checkpoints, and that a restarted job resumes
exactly where an uninterrupted one would be (CPU fp32 is deterministic: identical losses)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

REQUIRED_KEYS = {"step", "loss", "grad_norm", "lr", "tps", "mfu", "memory_gib"}


def torchrun(dump_folder, steps, *extra, expect_ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", "--job.config_file", "configs/debug.toml", "--job.dump_folder", str(dump_folder),
           "--training.steps", str(steps), "--training.seq_len", "32", "--checkpoint.interval", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert (proc.returncode == 0) == expect_ok, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def read_metrics(dump_folder):
    with open(os.path.join(dump_folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_debug_job_trains_checkpoints_and_resumes_exactly(tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"

    # The job dies (every rank SIGKILLed) right after step 4 and its checkpoint.
    torchrun(interrupted, 6, "--hooks.post_step", "tests.fault_hooks:kill_every_rank_after_step4", expect_ok=False)
    first = read_metrics(interrupted)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    for record in first:
        assert REQUIRED_KEYS <= record.keys()
        assert record["tps"] > 0 and record["memory_gib"] > 0 and record["mfu"] is None  # CPU: no peak
    assert sorted(os.listdir(interrupted / "checkpoint")) == ["step-2", "step-4"]

    log = torchrun(interrupted, 6)  # the same command, restarted
    assert "Training from step 5 to 6" in log
    resumed = read_metrics(interrupted)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]  # appended, not overwritten

    torchrun(straight, 6)
    reference = read_metrics(straight)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in reference]
    assert reference[-1]["loss"] < reference[0]["loss"] - 0.5  # it learns
    assert resumed[-1]["tokens_seen"] == reference[-1]["tokens_seen"] == 6 * 2 * 2 * 32
