"""Kill a training job with SIGKILL at random moments, restart it with the same command, and check
that the final loss curve equals an uninterrupted run's, step for step.

    python scripts/dev/soak_resume.py                 # short: 3 kills, tiny Llama, 1 process (~1 min on CPU)
    python scripts/dev/soak_resume.py --kills 25 --nproc 2 --steps 60        # long mode
    python scripts/dev/soak_resume.py --kills 20 -- --model.config configs/gla_debug.json  # extra train.py args
    python scripts/dev/soak_resume.py --kills 25 --rollout   # also export weights after every step (gloo) to
                                                         # flare's reference receiver: kills land mid-export too

Kills land anywhere: during a step, a checkpoint write, start-up. Each restart must continue from
the newest complete checkpoint; the metrics of steps re-run after a kill replace the lost ones.
On CPU in fp32 the comparison is exact (bit-identical losses and grad norms); pass --rtol for GPUs.
Exits 0 when the curves match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipe.net import free_port  # noqa: E402


def command(dump: str, args) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    rollout = []
    if args.rollout:
        rollout = ["--hooks.post_step", "rollout", "--rollout.enable", "--rollout.interval", "1",
                   "--rollout.transport", "gloo", "--rollout.dtype", "float32", "--rollout.timeout_s", "10",
                   "--rollout.engine_port", str(args.rollout_port)]
    return [*launcher, "train.py", "--job.config_file", args.config, "--job.dump_folder", dump,
            "--training.steps", str(args.steps), "--checkpoint.enable", "--checkpoint.interval",
            str(args.interval), "--checkpoint.keep_latest_k", "2", "--metrics.log_freq", "1", *rollout,
            *args.train_args]


def start_receiver(args, log) -> subprocess.Popen | None:
    """flare's reference rollout receiver (the engine side), fresh for every trainer start."""
    if not args.rollout:
        return None
    given = args.train_args
    model = given[given.index("--model.config") + 1] if "--model.config" in given else "configs/gla_debug.json"
    ready = os.path.join(tempfile.gettempdir(), f"flare-soak-receiver-{os.getpid()}")
    if os.path.exists(ready):
        os.remove(ready)
    cmd = [sys.executable, "-m", "recipe.rollout.engine.reference_receiver", "--model_config", model, "--port",
           str(args.rollout_port), "--transport", "gloo", "--dtype", "float32", "--timeout_s", "10",
           "--ready_file", ready]
    receiver = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):  # listening: every export of the trainer can reach it
        if receiver.poll() is not None or time.monotonic() > deadline:
            fail("the rollout receiver did not start", log)
        time.sleep(0.1)
    return receiver


def logged_steps(dump: str) -> dict[int, dict]:
    """step → the last record logged for it (a re-run step replaces the killed run's record)."""
    path = os.path.join(dump, "metrics.jsonl")
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                records[record["step"]] = record
    return records


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank at once, like a preempted node."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def start(dump: str, args, log) -> subprocess.Popen:
    global _receiver
    if _receiver is not None:
        kill_job(_receiver)
    _receiver = start_receiver(args, log)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command(dump, args), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


_receiver: subprocess.Popen | None = None


def fail(message: str, log) -> None:
    log.flush()
    with open(log.name) as f:
        tail = [line for line in f.readlines() if "warn" not in line.lower()][-40:]
    raise SystemExit(f"{message}; see {log.name}, which ends:\n" + "".join(tail))


def run_to_completion(dump: str, args, log) -> None:
    proc = start(dump, args, log)
    if proc.wait(timeout=args.timeout) != 0:
        fail(f"training failed (exit {proc.returncode})", log)


def soak(dump: str, args, log, rng: random.Random, step_time: float) -> int:
    kills = 0
    while kills < args.kills:
        before = max(logged_steps(dump), default=0)
        if before >= args.steps:
            break
        proc = start(dump, args, log)
        # Wait for the job to make progress, then kill it a random time later.
        deadline = time.monotonic() + args.timeout
        while proc.poll() is None and max(logged_steps(dump), default=0) <= before:
            if time.monotonic() > deadline:
                kill_job(proc)
                fail(f"no progress within {args.timeout}s", log)
            time.sleep(0.05)
        # Within a few checkpoint intervals of the progress (mid-step, mid-save or between), and
        # before the run would end, so that every kill interrupts real work.
        remaining = (args.steps - max(logged_steps(dump), default=0)) * step_time
        time.sleep(rng.uniform(0, min(remaining / 2, 4 * args.interval * step_time)))
        if proc.poll() is None:
            kill_job(proc)
            kills += 1
            print(f"kill {kills}/{args.kills}: after step {max(logged_steps(dump), default=0)}", flush=True)
        elif proc.returncode != 0:
            fail(f"training failed (exit {proc.returncode})", log)
    run_to_completion(dump, args, log)
    return kills


def compare(reference: dict, soaked: dict, rtol: float) -> list[str]:
    problems = []
    for step, ref in sorted(reference.items()):
        got = soaked.get(step)
        if got is None:
            problems.append(f"step {step}: missing after the kills")
            continue
        for key in ("loss", "grad_norm", "tokens_seen"):
            a, b = ref[key], got[key]
            if abs(a - b) > rtol * abs(a):
                problems.append(f"step {step}: {key} {b!r} != uninterrupted {a!r}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--interval", type=int, default=3, help="checkpoint interval (small: kills hit saves)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--config", default="configs/debug.toml")
    parser.add_argument("--rtol", type=float, default=0.0, help="0: bit-identical (CPU fp32)")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--rollout", action="store_true", help="export weights every step to a reference receiver")
    parser.add_argument("--rollout-port", type=int, default=None, help="default: a free port")
    parser.add_argument("train_args", nargs="*", help="extra train.py arguments (after --)")
    args = parser.parse_args(argv)
    if not args.train_args:
        # Tiny Llama, with steps long enough (~0.2 s on CPU) that kills land inside them.
        args.train_args = ["--model.config", "configs/tiny/llama.json", "--training.seq_len", "256",
                           "--training.local_batch_size", "8"]

    if args.rollout and args.rollout_port is None:
        args.rollout_port = free_port()
    workdir = args.workdir or tempfile.mkdtemp(prefix="flare-soak-")
    os.makedirs(workdir, exist_ok=True)
    reference_dump, soak_dump = os.path.join(workdir, "reference"), os.path.join(workdir, "soaked")
    with open(os.path.join(workdir, "train.log"), "w") as log:
        run_to_completion(reference_dump, args, log)
        reference = logged_steps(reference_dump)
        step_time = sorted(r["step_time_s"] for s, r in reference.items() if s > 1)[len(reference) // 2 - 1]
        kills = soak(soak_dump, args, log, random.Random(args.seed), step_time)
    if _receiver is not None:
        kill_job(_receiver)
    problems = compare(reference, logged_steps(soak_dump), args.rtol)
    print(f"{kills} kills, {args.steps} steps: " + ("curves identical" if not problems else f"{len(problems)} mismatches"))
    for line in problems[:20]:
        print("  " + line)
    return 1 if problems or kills < args.kills else 0


if __name__ == "__main__":
    sys.exit(main())
