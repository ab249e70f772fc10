"""CPU smoke test of scripts/dev/bench_ctl_latency.py: two gloo ranks, every row of the table measured."""

import os
import re
import subprocess
import sys

from recipe.net import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_ctl_latency_prints_every_row():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "scripts/dev/bench_ctl_latency.py", "--messages", "5"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = re.findall(r"^\| (.+?) \| (\d+) \| (\d+) \| (\d+) \|$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["control message (16 KiB frame), posted ahead", "control message, ping-pong",
                                    "8-byte gloo broadcast, posted ahead", "TCPStore get, key already set"], out.stdout
    assert all(int(med) > 0 for _, med, _, _ in rows)
