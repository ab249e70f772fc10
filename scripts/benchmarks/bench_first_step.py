"""Time to the first training step, as a user launching a shipped config meets it.

Each case launches ``train.py`` in a fresh process (``torchrun`` when it needs several GPUs) with
offline overrides (synthetic corpus, byte tokenizer, no checkpoints, 2 steps, metrics every step)
and reads the wall time from the launch to the end of step 1 off ``metrics.jsonl``: imports, model
build, Triton autotuning (or the shipped autotune results), torch.compile and the first step
itself. ``--cold`` (the default) gives every run empty Triton and inductor caches, as on a fresh
machine; ``--warm`` runs every case a second time on the caches its first run filled.

    python scripts/benchmarks/bench_first_step.py                       # the cases a shipped-config user hits
    python scripts/benchmarks/bench_first_step.py --cases gla_340M,gla_340M_varlen --warm
    python scripts/benchmarks/bench_first_step.py --device cpu --cases tiny_gla   # CPU smoke run

Prints a header (device, versions, date, command), one line per run and a markdown table; rows go
to ``--out`` as JSON lines (default ``$OUT/bench_first_step.jsonl`` when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (GPUs, train.py arguments on top of the offline overrides)
CASES: dict[str, tuple[int, list[str]]] = {
    "gla_340M": (1, ["--job.config_file", "configs/gla_340M.toml"]),
    "gla_340M_varlen": (1, ["--job.config_file", "configs/gla_340M.toml", "--training.varlen"]),
    "gla_340M_compile": (1, ["--job.config_file", "configs/gla_340M.toml", "--compile.enable"]),
    "gla_1B": (1, ["--model.config", "configs/gla_1B.json"]),
    "llama_360M": (1, ["--job.config_file", "configs/llama_360M.toml"]),
    "gla_340M_tp2": (2, ["--job.config_file", "configs/gla_340M.toml", "--parallelism.tensor_parallel_degree", "2"]),
    # CPU smoke case: the same path on a tiny model.
    "tiny_gla": (1, ["--model.config", "configs/tiny/gla.json", "--training.seq_len", "64",
                     "--training.local_batch_size", "2", "--training.mixed_precision_param", "float32"]),
}
DEFAULT_CASES = ("gla_340M", "gla_340M_varlen", "gla_340M_compile", "gla_1B", "llama_360M", "gla_340M_tp2")
OFFLINE = ["--model.tokenizer", "bytes", "--training.dataset", "synthetic", "--training.steps", "2",
           "--checkpoint.no_enable", "--metrics.log_freq", "1", "--metrics.no_enable_tensorboard"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--warm", action="store_true", help="also run each case again on the caches its first run filled")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="cpu hides the GPUs")
    p.add_argument("--timeout-s", type=float, default=900, help="per run")
    p.add_argument("--out", default=None, help="JSON-lines file (default $OUT/bench_first_step.jsonl if OUT is set)")
    args = p.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "bench_first_step.jsonl")
    return args


def gpu_count(device: str | None) -> int:
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def launch(case: str, caches: str, env: dict, timeout_s: float) -> dict:
    """One fresh ``train.py`` run; seconds from launch to the end of step 1 (and of step 2)."""
    gpus, extra = CASES[case]
    with tempfile.TemporaryDirectory(prefix="first_step_") as dump:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"] \
            if gpus > 1 else [sys.executable]
        cmd = [*launcher, "train.py", *OFFLINE, *extra, "--job.dump_folder", dump]
        run_env = {**env, "TRITON_CACHE_DIR": os.path.join(caches, "triton"),
                   "TORCHINDUCTOR_CACHE_DIR": os.path.join(caches, "inductor")}
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"no first step within {timeout_s:.0f}s"}
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": f"exit {proc.returncode}: {lines[-1] if lines else ''}"[:200]}
        with open(os.path.join(dump, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        by_step = {r["step"]: r for r in records}
        return {"first_step_s": by_step[1]["time"] - start,
                "second_step_s": by_step[2]["time"] - by_step[1]["time"] if 2 in by_step else None,
                "exit_s": time.time() - start, "peak_gib": max(r["memory_gib"] for r in records)}


def environment() -> dict:
    """bench_train's header (date, device, versions, command) and the number of GPUs visible."""
    import torch

    from scripts.benchmarks.bench_train import environment as bench_environment

    return {**bench_environment(), "gpus": torch.cuda.device_count()}


COLUMNS = ("case", "caches", "first step s (from launch)", "step 2 s", "peak GiB")


def table_row(row: dict) -> list[str]:
    if row.get("error"):
        return [row["case"], row["caches"], row["error"], "", ""]
    second = "—" if row["second_step_s"] is None else f"{row['second_step_s']:.2f}"
    return [row["case"], row["caches"], f"{row['first_step_s']:.1f}", second, f"{row['peak_gib']:.1f}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    info = environment()
    print(f"# bench_first_step {info['date']}")
    print(f"device: {info['device']} x {info['gpus']}; torch {info['torch']}, triton {info['triton']}, fla {info['fla']}")
    print(f"command: {info['command']}", flush=True)
    out = None
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        out = open(args.out, "a")
        out.write(json.dumps({"header": info}) + "\n")
    gpus = gpu_count(args.device)
    rows = []
    for case in args.cases:
        with tempfile.TemporaryDirectory(prefix="first_step_caches_") as caches:
            for caches_state in ("cold", "warm") if args.warm else ("cold",):
                row = {"case": case, "caches": caches_state, "args": " ".join(CASES[case][1])}
                needed = CASES[case][0]
                if needed > 1 and gpus < needed:
                    row["error"] = f"skipped: needs {needed} GPUs, {gpus} visible"
                else:
                    row.update(launch(case, caches, env, args.timeout_s))
                rows.append(row)
                print(" ".join(table_row(row)), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(table_row(row)) + " |")
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
