"""CPU smoke test of scripts/benchmarks/bench_export.py over gloo: the trainer exports through the real hook to
the reference TP engine, whose logits must match the trainer's, and both tables are printed."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout, trainer_ranks", [("fsdp", 1), ("plain", 1), ("fsdp", 2)])
def test_bench_export_gloo(layout, trainer_ranks):
    cmd = [sys.executable, "scripts/benchmarks/bench_export.py", "--transport", "gloo", "--model", "tiny", "--bucket_mb", "0.25",
           "--repeats", "2", "--check", "--trainer_layout", layout, "--trainer_gpus", str(trainer_ranks)]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"trainer layout {layout}" in out.stdout
    row, phases = [line for line in out.stdout.splitlines() if line.startswith("| gloo | tiny |")]  # both tables
    assert f"| {trainer_ranks}/1 |" in phases, phases
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[6] == f"{trainer_ranks}/1", row
    assert int(cells[4]) > 3 and float(cells[7]) > 0 and float(cells[9]) > 0, row  # buckets, export s, fill-only s
    assert re.fullmatch(r"max dlogit \S+ of \S+ ok", cells[11]), row  # the engine computes what the trainer does


def test_plain_layout_needs_one_trainer_rank():
    out = subprocess.run([sys.executable, "scripts/benchmarks/bench_export.py", "--transport", "gloo", "--trainer_layout",
                          "plain", "--trainer_gpus", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--trainer_layout plain needs" in out.stderr


def test_bench_pack_prints_host_time_per_tensor():
    out = subprocess.run([sys.executable, "scripts/dev/bench_pack.py", "--model", "tiny-deep", "--repeats", "3"], cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| tiny-deep |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "219" and float(cells[3]) > 0 and float(cells[4]) > 0, row
