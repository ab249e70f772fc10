"""Faults a long run meets: preemption (SIGKILL at random moments) and a rank that dies."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_random_kills_resume_to_the_identical_loss_curve(tmp_path):
    # scripts/dev/soak_resume.py's short mode: a reference run, then a run SIGKILLed (launcher and
    # ranks) at random points and restarted until done; per-step losses must be bit-identical.
    # Every step also exports its weights to a reference rollout receiver, so kills land mid-step,
    # mid-checkpoint and mid-export.
    proc = subprocess.run(
        [sys.executable, "scripts/dev/soak_resume.py", "--kills", "2", "--steps", "24", "--rollout",
         "--workdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "2 kills, 24 steps: curves identical" in proc.stdout
    log = (tmp_path / "train.log").read_text()
    assert log.count("Training from step") >= 4  # reference, first start, two restarts
    assert log.count("rollout: exported version") >= 24


def test_a_dead_rank_ends_the_job_with_its_rank_named(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--job.config_file", "configs/debug.toml", "--model.config", "configs/tiny/llama.json",
           "--job.dump_folder", str(tmp_path), "--training.steps", "20", "--checkpoint.no_enable",
           "--hooks.post_step", "tests.fault_hooks:kill_rank1_after_step2", "--comm.train_timeout_seconds", "30"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank      : 1 (local_rank: 1)" in output and "Signal 9 (SIGKILL)" in output, output[-3000:]
    assert elapsed < 120, f"the surviving rank hung for {elapsed:.0f}s"
