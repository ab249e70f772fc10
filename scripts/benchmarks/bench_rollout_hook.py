"""Step-time cost of the ``rollout`` export hook at interval 1: ``train.py`` twice, same overrides.

    # 2 GPUs, disaggregated: trainer on GPU 0, flare's reference receiver on GPU 1 (NCCL broadcast)
    python scripts/benchmarks/bench_rollout_hook.py --transport nccl --model configs/llama_1B.json --steps 30
    # 3 GPUs: an FSDP=2 trainer on GPUs 0-1, the receiver on GPU 2
    python scripts/benchmarks/bench_rollout_hook.py --transport nccl --model configs/llama_1B.json --steps 30 --trainer-gpus 2
    # 1 GPU, colocated: the receiver maps the trainer's buffers on the same GPU (CUDA IPC)
    python scripts/benchmarks/bench_rollout_hook.py --transport ipc --model configs/llama_1B.json --steps 30
    # CPU smoke run (what tests/rollout/test_bench_rollout_hook.py does)
    python scripts/benchmarks/bench_rollout_hook.py --transport gloo --model configs/tiny/llama.json --steps 4 --warmup 1 \\
        --dtype float32 --trainer-args "--training.seq_len 64 --training.local_batch_size 2 \\
        --training.mixed_precision_param float32"

Run 1 (``no hook``) trains ``--steps`` steps on the synthetic corpus with the byte tokenizer, no
checkpoints, metrics every step. Run 2 (``hook <transport>``) is the same command plus
``--hooks.post_step rollout --rollout.enable --rollout.interval 1`` exporting every step to
``python -m recipe.rollout.engine.reference_receiver`` (the engine; started first, with a ready file). Both are one
torchrun job of ``--trainer-gpus`` ranks (default 1); ``--trainer-args`` adds train.py overrides to
both runs.

Each run's ``<dump>/metrics.jsonl`` gives ``step_time_s`` and ``tps`` per step. A logged step's
time runs from the previous step's log to its own, so it holds the previous step's export: steps
``warmup+1 .. steps`` (``warmup >= 1``) each include exactly one export, the last step's export is
not timed. The hook's cost is the difference of the median step times; ``export s`` is the median
of the hook's own "exported version N ... in X.XXXXs" log lines over the exports
inside the timed steps.

Prints a header (date, device, command) and one markdown table. Exits 1 with the tail of the log
when a run fails, or when an export failed or the receiver did not apply every version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipe.net import free_port  # noqa: E402

EXPORTED = re.compile(r"rollout: exported version (\d+) .* in ([0-9.]+)s")
FAILED = re.compile(r"rollout: export of version (\d+) failed")
APPLIED = re.compile(r"applied version (\d+)")


def device_name(gpu: str | None) -> str:
    if gpu is not None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", gpu],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
        return f"GPU {gpu}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class Failed(Exception):
    pass


def tail(path: str, n: int = 25) -> str:
    """The log's last lines before torchrun's own report of a failed rank (its traceback fills a
    plain tail and hides the rank's last words), then that report's root-cause block."""
    try:
        with open(path, errors="replace") as f:
            lines = [line for line in f if "warn" not in line.lower()]
    except OSError:
        return f"(no log at {path})\n"
    agent = next((i for i, line in enumerate(lines) if "elastic/multiprocessing/api.py" in line), len(lines))
    root = next((i for i, line in enumerate(lines) if line.startswith("Root Cause")), None)
    return "".join(lines[max(agent - n, 0):agent] + (lines[root:root + 8] if root is not None else []))


def fail(message: str, log_path: str) -> None:
    raise Failed(f"{message}; see {log_path}, which ends:\n{tail(log_path)}")


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """Let the process exit on its own (the receiver does when the trainer closes), else kill it."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process and its children only
        proc.wait()


def env_for(gpu: str | None) -> dict:
    # Keep the caller's PYTHONPATH (e.g. packages installed with --target) after the repository.
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    else:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def trainer_command(args, dump: str, hook: bool) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.trainer_gpus}",
           "train.py",
           "--model.config", args.model, "--model.tokenizer", "bytes", "--training.dataset", "synthetic",
           "--training.steps", str(args.steps), "--checkpoint.no_enable", "--metrics.log_freq", "1",
           "--metrics.no_enable_tensorboard", "--job.dump_folder", dump]
    if hook:
        cmd += ["--hooks.post_step", "rollout", "--rollout.enable", "--rollout.interval", "1",
                "--rollout.transport", args.transport, "--rollout.engine_port", str(args.port),
                "--rollout.dtype", args.dtype, "--rollout.timeout_s", str(args.rollout_timeout)]
        if args.bucket_mb is not None:
            cmd += ["--rollout.bucket_mb", str(args.bucket_mb)]
        if args.transport == "ipc":
            cmd += ["--rollout.placement", "colocated"]
    return cmd + shlex.split(args.trainer_args)


def start_receiver(args, workdir: str, gpu: str | None) -> tuple[subprocess.Popen, str]:
    log_path = os.path.join(workdir, f"receiver_{args.transport}.log")
    ready = os.path.join(workdir, f"receiver_{args.transport}.ready")
    if os.path.exists(ready):
        os.remove(ready)
    cmd = [sys.executable, "-m", "recipe.rollout.engine.reference_receiver", "--model_config", args.model, "--tokenizer", "bytes",
           "--port", str(args.port), "--transport", args.transport, "--dtype", args.dtype,
           "--timeout_s", str(args.rollout_timeout), "--ready_file", ready]
    if gpu is not None:
        cmd += ["--device", "cuda:0"]  # the one GPU it sees
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(gpu), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while not os.path.exists(ready):  # its rendezvous store listens: the trainer's exports can reach it
        if proc.poll() is not None:
            fail(f"the rollout receiver exited (code {proc.returncode}) before it was ready", log_path)
        if time.monotonic() > deadline:
            stop(proc, 0)
            fail(f"the rollout receiver was not ready within {args.timeout:.0f}s", log_path)
        time.sleep(0.1)
    return proc, log_path


def run_trainer(args, workdir: str, name: str, hook: bool, gpu: str | None) -> tuple[str, str]:
    dump = os.path.join(workdir, name)
    log_path = os.path.join(workdir, f"{name}.log")
    cmd = trainer_command(args, dump, hook)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(gpu), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            stop(proc, 0)
            fail(f"{name}: train.py did not finish within {args.timeout:.0f}s", log_path)
    if code != 0:
        fail(f"{name}: train.py failed (exit {code})", log_path)
    return dump, log_path


def read_metrics(dump: str, warmup: int, log_path: str) -> list[dict]:
    path = os.path.join(dump, "metrics.jsonl")
    if not os.path.exists(path):
        fail(f"no {path}", log_path)
    records = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            records[r["step"]] = r
    timed = [r for s, r in sorted(records.items()) if s > warmup]
    if not timed:
        fail(f"{path}: no step after the {warmup} warm-up step(s)", log_path)
    return timed


def summarize(name: str, timed: list[dict]) -> dict:
    return {"run": name, "steps": len(timed), "first": timed[0]["step"], "last": timed[-1]["step"],
            "step_s": statistics.median(r["step_time_s"] for r in timed),
            "tps": statistics.median(r["tps"] for r in timed)}


def check_exports(args, trainer_log: str, receiver_log: str, timed: list[dict]) -> dict:
    """Every step exported and applied; the median export time over the exports inside the timed steps."""
    text = open(trainer_log, errors="replace").read()
    exported = {int(v): float(s) for v, s in EXPORTED.findall(text)}
    failed = sorted(int(v) for v in FAILED.findall(text))
    applied = {int(v) for v in APPLIED.findall(open(receiver_log, errors="replace").read())}
    last = max(r["step"] for r in timed)
    if failed:
        fail(f"hook {args.transport}: export(s) of version(s) {failed} failed", trainer_log)
    missing = sorted(set(range(1, last + 1)) - set(exported))
    if missing:
        fail(f"hook {args.transport}: no export logged for step(s) {missing[:10]}", trainer_log)
    not_applied = sorted(set(exported) - applied)
    if not_applied:
        fail(f"hook {args.transport}: the receiver did not apply version(s) {not_applied[:10]}", receiver_log)
    # Step s's time holds the export of step s-1.
    inside = [exported[r["step"] - 1] for r in timed if r["step"] - 1 in exported]
    return {"exports": len(exported), "applied": len(applied),
            "export_s": statistics.median(inside) if inside else None}


def table(rows: list[dict], base: dict) -> str:
    lines = ["| run | steps timed | median step s | tokens/s | hook cost s | hook cost % | median export s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = r["step_s"] - base["step_s"]
        cost = "—" if r is base else f"{diff:+.4f}"
        pct = "—" if r is base else f"{100 * diff / base['step_s']:+.1f}%"
        export = f"{r['export_s']:.4f}" if r.get("export_s") is not None else "—"
        lines.append(f"| {r['run']} | {r['steps']} ({r['first']}–{r['last']}) | {r['step_s']:.4f} | "
                     f"{r['tps']:,.0f} | {cost} | {pct} | {export} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="configs/llama_1B.json", help="model config JSON")
    ap.add_argument("--transport", default="nccl", choices=["gloo", "nccl", "ipc"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the medians (>= 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="rollout.dtype and the receiver's dtype")
    ap.add_argument("--bucket-mb", type=float, default=None, help="rollout.bucket_mb (default: the config's)")
    ap.add_argument("--trainer-gpus", type=int, default=1,
                    help="trainer ranks (FSDP over them); with gloo, CPU processes")
    ap.add_argument("--gpus", default=None,
                    help="trainer GPUs, then the receiver's (default: CUDA_VISIBLE_DEVICES, or 0,1,...; ipc puts "
                         "the receiver on the first trainer GPU); ignored for gloo")
    ap.add_argument("--trainer-args", default="", help="extra train.py overrides for both runs, one string")
    ap.add_argument("--port", type=int, default=None, help="the receiver's rendezvous port (default: a free one)")
    ap.add_argument("--rollout-timeout", type=float, default=60.0, help="rollout.timeout_s and the receiver's")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as failed")
    ap.add_argument("--workdir", default=None, help="dump folders and logs (default: a new temp folder)")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.warmup >= args.steps:
        ap.error("--warmup must be >= 1 (step 1 holds start-up) and below --steps")
    args.port = args.port or free_port()
    args.model = os.path.relpath(os.path.abspath(args.model), ROOT) if not os.path.isabs(args.model) else args.model

    trainer_gpu = receiver_gpu = None
    n = args.trainer_gpus
    if args.transport != "gloo":
        visible = args.gpus or os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(n + 1)))
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
        need = n if args.transport == "ipc" else n + 1
        if len(gpus) < need:
            ap.error(f"--transport {args.transport} with {n} trainer GPU(s) needs {need} GPUs (--gpus)")
        trainer_gpu = ",".join(gpus[:n])
        receiver_gpu = gpus[0] if args.transport == "ipc" else gpus[n]
    workdir = args.workdir or tempfile.mkdtemp(prefix="flare-bench-hook-")
    os.makedirs(workdir, exist_ok=True)

    placement = {"gloo": "trainer and receiver on CPU",
                 "nccl": f"trainer on GPU {trainer_gpu}, receiver on GPU {receiver_gpu} (NCCL)",
                 "ipc": f"trainer on GPU {trainer_gpu}, receiver on GPU {receiver_gpu} (CUDA IPC, colocated)",
                 }[args.transport] + (f"; FSDP over {n} trainer ranks" if n > 1 else "")
    print(f"# rollout hook cost at interval 1 — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"device: {device_name(trainer_gpu.split(',')[0] if trainer_gpu else None)}; {placement}")
    print(f"command: {shlex.join([sys.executable, *sys.argv])}" if argv is None
          else f"command: bench_rollout_hook.py {shlex.join(argv)}")
    print(f"model {args.model}, {args.steps} steps, warm-up {args.warmup}, rollout dtype {args.dtype}, "
          f"workdir {workdir}", flush=True)

    receiver = None
    try:
        dump, log = run_trainer(args, workdir, "nohook", False, trainer_gpu)
        base = summarize("no hook", read_metrics(dump, args.warmup, log))
        print(f"no hook: median step {base['step_s']:.4f}s", flush=True)

        receiver, receiver_log = start_receiver(args, workdir, receiver_gpu)
        name = f"hook_{args.transport}"
        dump, log = run_trainer(args, workdir, name, True, trainer_gpu)
        stop(receiver)  # exits when the trainer closes the connection
        timed = read_metrics(dump, args.warmup, log)
        hooked = {**summarize(f"hook {args.transport}", timed), **check_exports(args, log, receiver_log, timed)}
        print(f"hook {args.transport}: median step {hooked['step_s']:.4f}s, {hooked['exports']} exports, "
              f"{hooked['applied']} applied by the receiver", flush=True)
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        if receiver is not None and receiver.poll() is None:
            stop(receiver, 0)
    print()
    print(table([base, hooked], base))
    print("\nA step's time holds the previous step's export. `median export s`: the hook's own timing on the "
          "sending rank (gather + transfer + engine ack), from its log line.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
