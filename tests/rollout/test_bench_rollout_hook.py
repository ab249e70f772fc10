"""CPU smoke test of scripts/benchmarks/bench_rollout_hook.py: both train.py runs finish, every step's export
reaches flare's reference receiver (gloo), and the markdown table is printed."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("trainer_ranks", [1, 2])
def test_bench_rollout_hook_gloo(tmp_path, trainer_ranks):
    steps = 4
    cmd = [sys.executable, "scripts/benchmarks/bench_rollout_hook.py", "--transport", "gloo", "--model", "configs/tiny/llama.json",
           "--steps", str(steps), "--warmup", "1", "--dtype", "float32", "--timeout", "120",
           "--trainer-gpus", str(trainer_ranks),
           "--workdir", str(tmp_path), "--trainer-args",
           "--training.seq_len 64 --training.local_batch_size 2 --training.mixed_precision_param float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout

    assert "# rollout hook cost at interval 1" in text and "device: CPU" in text and "command:" in text
    assert ("FSDP over 2 trainer ranks" in text) == (trainer_ranks == 2), text
    assert "| run | steps timed | median step s |" in text
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| (no hook|hook gloo) \|.*$", text, re.M)}
    assert set(rows) == {"no hook", "hook gloo"}, text
    assert f"| 3 (2–{steps}) |" in rows["no hook"] and f"| 3 (2–{steps}) |" in rows["hook gloo"], text
    assert re.search(r"\| [+-]\d+\.\d{4} \| [+-]\d+\.\d%", rows["hook gloo"]), text  # cost columns filled
    assert "hook gloo: median step" in text and f"{steps} exports, {steps} applied by the receiver" in text

    # Both runs logged every step; the receiver applied every version and exited on the trainer's close.
    for run in ("nohook", "hook_gloo"):
        with open(tmp_path / run / "metrics.jsonl") as f:
            assert len(f.readlines()) == steps
    receiver = (tmp_path / "receiver_gloo.log").read_text()
    assert [f"applied version {v}" in receiver for v in range(1, steps + 1)] == [True] * steps
    assert "trainer closed the connection" in receiver
    hook_log = (tmp_path / "hook_gloo.log").read_text()
    assert "rollout: export of version" not in hook_log  # no failed export
    assert ("Applied FSDP to the model" in hook_log) == (trainer_ranks == 2)  # the trainer ran on 2 ranks
