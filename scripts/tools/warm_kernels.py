"""Cut the time to the first training step on a fresh GPU machine: compile fla's Triton kernels in
parallel, autotune them once, and keep (or ship) the autotune results.

On a cold machine fla's first GLA-340M step took ~262 s: Triton's autotuner compiles hundreds of
kernel variants one at a time, then benchmarks them. This script does it in phases:

  compile  N worker processes (default: CPU cores, at most 16) each run one forward+backward of a
           1-layer copy of the model at the target shapes. Inside a worker no fla kernel is
           launched: every autotuned kernel's config list is split across the workers and each
           worker only compiles its share (Triton's compile-only ``warmup`` mode); plain kernels
           are compiled by one worker each. Which variants exist depends on shapes, dtypes and
           flags, never on tensor values, so the pass may run on uninitialized outputs. Results land
           in the shared on-disk Triton cache (TRITON_CACHE_DIR, default ~/.triton/cache).
  tune     one process runs the same passes for real: every variant is now a cache hit, so this
           is pure benchmarking; the winners are written to disk (Triton's ``cache_results``, which
           fla enables through FLA_CACHE_RESULTS=1) as <cache dir>/<hash>/<kernel>.autotune.json.
  check    a fresh process runs the passes once more and reports its time: what a training job's
           first step now pays for kernels (seconds instead of minutes).

Autotune keys depend on the layer shapes (heads, head dims, chunk sizes, sometimes batch and
sequence length) and on the tensor dtypes, not on the number of layers, so a 1-layer copy serves
the full model. ``--precision both`` (default) covers both of the trainer's layouts: fp32 parameters
under bf16 autocast (one GPU) and bf16 parameters (FSDP's mixed precision). Workers shrink the
vocabulary to save GPU memory; the loss kernels (plain, not autotuned) for the real vocabulary
compile in the tune phase.

Shipping results: ``--export-cache DIR`` copies only the autotune result files (a few KB each) and a
manifest; ``--import-cache DIR`` copies them into the Triton cache of another machine with the same
GPU model and software (results are keyed by Triton version, GPU target, kernel source, tuning key
and config list: mismatched ones are simply never used). After an import the compile phase compiles
only the chosen config of each kernel, and the tune phase finds every result on disk.

Exact command sequence (one GPU, GLA-340M, the trainer's shapes):

    python scripts/tools/warm_kernels.py --model configs/gla_340M.json --seq-len 4096 --batch 8 && \\
    python train.py --job.config_file configs/gla_340M.toml --training.dataset synthetic --model.tokenizer bytes

Keeping the results for later fresh machines of the same kind (carry outputs/autotune_h200 along):

    python scripts/tools/warm_kernels.py --model configs/gla_340M.json --export-cache outputs/autotune_h200
    # ... on a fresh machine:
    python scripts/tools/warm_kernels.py --model configs/gla_340M.json --import-cache outputs/autotune_h200 && \\
    torchrun --nproc_per_node=8 train.py --job.config_file configs/gla_340M.toml

(--seq-len 4096 --batch 8 are the defaults; pass the job's training.seq_len / local_batch_size.)

Every rank of a multi-GPU job reads the same on-disk cache, so one warm-up serves all of them
(per-rank shapes with FSDP equal the single-GPU ones). Tensor parallelism changes the per-rank
head count: ``--tp N`` warms a copy with heads and widths split N ways. Not covered: varlen batches
whose document count enters a tuning key (pass ``--varlen`` to warm the common kernels), and
torch.compile's own kernels.
On CPU, Triton runs through its interpreter and autotuning is pinned to one config
(recipe/device.py): there is nothing to compile or tune, so the phases are skipped (exit 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipe.autotune_cache import export_results, import_results, result_files, triton_cache_dir  # noqa: E402
WORKER_VOCAB = 4096  # workers' vocabulary: the logits are the largest allocation and select no autotuned kernel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/gla_340M.json", help="model config JSON")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="local batch (sequences per GPU)")
    p.add_argument("--seq-sweep", default="",
                   help="comma-separated seq lens at constant tokens (seq-len x batch), as bench_train.py")
    p.add_argument("--precision", choices=("both", "autocast", "bf16"), default="both",
                   help="autocast: fp32 params + bf16 autocast (1 GPU); bf16: bf16 params (FSDP)")
    p.add_argument("--varlen", action="store_true", help="also warm the varlen (cu_seqlens) kernels")
    p.add_argument("--layers", type=int, default=1, help="layers of the model copy")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree: warm the per-rank shapes (heads / tp, same head dims)")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--phases", default="compile,tune,check",
                   help="comma-separated subset of compile,tune,check (or 'none')")
    p.add_argument("--export-cache", metavar="DIR", help="copy the autotune results here at the end")
    p.add_argument("--import-cache", metavar="DIR", help="copy autotune results from here first")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "compile:I/N", "tune" or "check"
    args = p.parse_args(argv)
    tokens = args.seq_len * args.batch
    seqs = [int(s) for s in args.seq_sweep.split(",") if s] or [args.seq_len]
    if any(tokens % s for s in seqs):
        p.error(f"--seq-sweep: every seq len must divide {tokens} tokens (seq-len x batch)")
    args.shapes = [(s, tokens // s) for s in seqs]
    args.precisions = ["autocast", "bf16"] if args.precision == "both" else [args.precision]
    args.phases = [] if args.phases == "none" else args.phases.split(",")
    return args


# --------------------------------------------------------------------------- the model passes


def tp_local(config, tp: int):
    """The shapes one tensor-parallel rank's kernels see: heads, widths and MLP split ``tp`` ways,
    head dims unchanged (fla layers derive them from hidden_size / num_heads)."""
    for key in ("num_heads", "num_kv_heads", "hidden_size", "intermediate_size"):
        value = getattr(config, key, None)
        if value:
            if value % tp:
                raise SystemExit(f"--tp {tp}: {key}={value} is not divisible")
            setattr(config, key, value // tp)
    return config


def build_model(path: str, layers: int, vocab: int | None, tp: int = 1):
    import torch
    from transformers import AutoModelForCausalLM

    from recipe.model import load_model_config

    config = load_model_config(path)
    if tp > 1:
        tp_local(config, tp)
    config.num_hidden_layers = layers
    config.use_cache = False
    if vocab:
        config.vocab_size = min(config.vocab_size, vocab)
    # CPU only for the smoke test of the worker logic (interpreter: "compiling" is a no-op there).
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def forward_backward(model, seq: int, batch: int, precision: str, varlen: bool) -> None:
    """One training micro-step as recipe/trainer.py runs it (loss over num_items_in_batch)."""
    import torch

    device = next(model.parameters()).device
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    extra = {}
    if varlen:  # the trainer's varlen layout: one row, documents delimited by cu_seqlens
        tokens = tokens.view(1, -1)
        extra["cu_seqlens"] = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=device)
    n_items = torch.tensor(float(tokens.numel()), device=device)
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast"):
        loss = model(input_ids=tokens, labels=tokens, num_items_in_batch=n_items, **extra).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def run_passes(model, args) -> None:
    for seq, batch in args.shapes:
        for precision in args.precisions:
            for varlen in [False, True] if args.varlen else [False]:
                forward_backward(model, seq, batch, precision, varlen)


# --------------------------------------------------------------------------- compile-only workers


def share(name: str, key, n_items: int, index: int, count: int) -> list[int]:
    """Indices of the items (configs of one kernel and tuning key) that worker ``index`` of ``count``
    compiles. The rotation by a stable hash of (kernel, key) spreads kernels with fewer configs than
    workers over all workers instead of piling their first configs on worker 0."""
    offset = zlib.crc32(f"{name}|{key}".encode())
    return [j for j in range(n_items) if (j + offset) % count == index]


class _NoResult(Exception):
    pass


def _no_bench():
    raise _NoResult  # check_disk_cache found no stored result: stop before it benchmarks or writes


def install_compile_only(index: int, count: int, stats: dict) -> None:
    """Make this process compile its share of every Triton kernel it meets and launch none."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    jit_run = JITFunction.run

    def compile_variant(fn_run, *args, **kwargs):
        try:
            fn_run(*args, **{**kwargs, "warmup": True})
            stats["compiled"] += 1
        except Exception as e:  # noqa: BLE001  (a config the compiler rejects is skipped by autotune too)
            stats["failed"] += 1
            stats.setdefault("errors", []).append(f"{type(e).__name__}: {str(e)[:200]}")

    def autotuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
            # The tuning key, as Autotuner.run builds it (key args, then every tensor's dtype).
            named = {k: v for k, v in {**self.nargs, **kwargs}.items() if k in self.arg_names}
            key = tuple([named[k] for k in self.keys if k in named]
                        + [str(v.dtype) for v in named.values() if hasattr(v, "dtype")])
            if self.cache_results and len(configs) > 1:
                try:  # an imported result: only its winner needs compiling
                    self.check_disk_cache(key, configs, _no_bench)
                    configs = [self.cache[key]]
                except _NoResult:
                    pass
            for j in share(self.base_fn.__name__, key, len(configs), index, count):
                compile_variant(self.fn.run, *args, **kwargs, **configs[j].all_kwargs())
        finally:
            self.nargs = None

    def jit_run_share(self, *args, grid, warmup, **kwargs):
        if warmup:  # our own compile-only calls
            return jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        # A plain kernel launch: one worker per (kernel, constexpr-like kwargs, dtypes) compiles it.
        signature = (sorted((k, v) for k, v in kwargs.items() if isinstance(v, (int, float, bool, str, type(None)))),
                     [str(a.dtype) for a in args if hasattr(a, "dtype")])
        if share(self.__name__, signature, 1, index, count):
            compile_variant(lambda *a, **k: jit_run(self, *a, **k), *args, grid=grid, **kwargs)
        return None

    Autotuner.run = autotuner_run
    JITFunction.run = jit_run_share


def worker_main(args) -> int:
    """Runs in a subprocess; prints one JSON line of stats on stdout."""
    os.environ.setdefault("FLA_CACHE_RESULTS", "1")  # fla's default; read when fla is imported
    from recipe.device import configure_device

    configure_device()
    import torch

    role, _, spec = args.worker.partition(":")
    stats = {"role": args.worker, "compiled": 0, "failed": 0}
    start = time.perf_counter()
    if role == "compile":
        index, count = map(int, spec.split("/"))
        install_compile_only(index, count, stats)
    model = build_model(args.model, args.layers, WORKER_VOCAB if role == "compile" else None, args.tp)
    stats["build_s"] = time.perf_counter() - start
    passes = time.perf_counter()
    try:
        run_passes(model, args)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        if role != "compile":
            raise
        # Uninitialized outputs fed somewhere value-dependent: the tune phase compiles the rest.
        stats["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    stats["passes_s"] = time.perf_counter() - passes
    stats["errors"] = stats.get("errors", [])[:3]  # a sample of what the compiler rejected
    print(json.dumps(stats), flush=True)
    return 0


# --------------------------------------------------------------------------- autotune result files


# --------------------------------------------------------------------------- orchestration


def spawn(args, role: str) -> subprocess.Popen:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", role, "--model", args.model,
           "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--precision", args.precision,
           "--layers", str(args.layers), "--tp", str(args.tp)]
    if args.seq_sweep:
        cmd += ["--seq-sweep", args.seq_sweep]
    if args.varlen:
        cmd.append("--varlen")
    env = {**os.environ, "FLA_CACHE_RESULTS": os.environ.get("FLA_CACHE_RESULTS", "1"),
           # Worker processes each compile serially; keep torch from spawning its own thread pools.
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # Files, not pipes: 16 chatty workers read one after another could fill a pipe and stall.
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
    proc.logs = (out, err)
    return proc


def collect(proc: subprocess.Popen, role: str, fatal: bool = True) -> dict:
    """The stats line of a finished process. A failed compile worker only costs time later (the
    tune phase compiles what it missed); a failed tune or check process ends the script."""
    proc.wait()
    out, err = (_read(f) for f in proc.logs)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = "\n".join(err.strip().splitlines()[-15:])
    if fatal:
        raise SystemExit(f"warm_kernels: {role} process failed (exit {proc.returncode}):\n{tail}")
    last = err.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
    return {"role": role, "compiled": 0, "failed": 0, "build_s": 0.0, "passes_s": 0.0, "error": last[0][:300]}


def _read(file) -> str:
    file.seek(0)
    text = file.read()
    file.close()
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    start = time.perf_counter()
    from recipe.device import configure_device

    device_type = configure_device()
    cache_dir = triton_cache_dir()
    print(f"warm_kernels: {args.model}, {args.layers}-layer copy, (seq, batch) {args.shapes}, "
          f"precision {'+'.join(args.precisions)}{', varlen too' if args.varlen else ''}", flush=True)
    print(f"Triton cache: {cache_dir} ({len(result_files(cache_dir))} autotune results)", flush=True)

    if args.import_cache:
        t = time.perf_counter()
        try:
            n, warning = import_results(args.import_cache, cache_dir)
        except FileNotFoundError as e:
            raise SystemExit(f"warm_kernels: --import-cache {e}")
        print(f"[import]  {n} autotune results from {args.import_cache}: {time.perf_counter() - t:.1f} s")
        if warning:
            print(f"[import]  warning: {warning}")

    from recipe.model import load_model_config, uses_fla

    config = load_model_config(args.model)
    if device_type != "cuda":
        print("CPU: Triton runs through its interpreter and autotuning is pinned to one config "
              "(recipe/device.py): nothing to compile or tune; warm-up is a no-op here.")
        args.phases = []
    elif not uses_fla(config):
        print(f"model_type '{config.model_type}' is not an fla model: warm_kernels.py builds fla models only "
              "(any fla kernels it calls tune at its first training step).")
        args.phases = []

    if "compile" in args.phases:
        t = time.perf_counter()
        procs = [spawn(args, f"compile:{i}/{args.workers}") for i in range(args.workers)]
        stats = [collect(p, f"compile:{i}/{args.workers}", fatal=False) for i, p in enumerate(procs)]
        compiled, failed = sum(s["compiled"] for s in stats), sum(s["failed"] for s in stats)
        slowest = max(s["build_s"] + s["passes_s"] for s in stats)
        print(f"[compile] {args.workers} workers: {compiled} kernel variants compiled, {failed} rejected by the "
              f"compiler; slowest worker {slowest:.1f} s after its imports; phase {time.perf_counter() - t:.1f} s",
              flush=True)
        stopped = [s for s in stats if s.get("error")]
        if stopped:
            print(f"[compile] {len(stopped)} worker(s) stopped early, e.g. {stopped[0]['role']}: "
                  f"{stopped[0]['error']}; the tune phase compiles what they missed")
        rejected = [e for s in stats for e in s.get("errors", [])]
        if rejected:
            print(f"[compile] e.g. rejected: {rejected[0]}")

    for phase in ("tune", "check"):
        if phase not in args.phases:
            continue
        before = len(result_files(cache_dir))
        t = time.perf_counter()
        s = collect(spawn(args, phase), phase)
        what = ("benchmarked every config, results stored" if phase == "tune"
                else "a fresh process: kernels and results from disk")
        print(f"[{phase}]{' ' * (8 - len(phase))}{what}: passes {s['passes_s']:.1f} s (model build "
              f"{s['build_s']:.1f} s, phase {time.perf_counter() - t:.1f} s); autotune results on disk "
              f"{before} -> {len(result_files(cache_dir))}", flush=True)

    if args.export_cache:
        t = time.perf_counter()
        os.makedirs(args.export_cache, exist_ok=True)
        n, size = export_results(cache_dir, args.export_cache)
        print(f"[export]  {n} autotune results ({size / 1024:.0f} KiB) -> {args.export_cache}: "
              f"{time.perf_counter() - t:.1f} s")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
