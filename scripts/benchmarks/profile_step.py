"""Where a training step spends its time: device time per kernel category, one model, one GPU.

Builds the bare loop of ``scripts/benchmarks/bench_train.py`` (``bare-fsdp``: FSDP2 on a one-rank mesh, bf16
compute, fp32 masters, fused AdamW; the trainer's numerics without the framework), times
``--steps`` steps unprofiled, then profiles the same number of steps with ``torch.profiler`` and
prints device time per step by category (matmuls, fla's linear-attention kernels, norms, ...)
and the top kernels. Device busy time close to the unprofiled step time means the step is bound
by its kernels, not by the host: only faster kernels make it faster.

    python scripts/benchmarks/profile_step.py --model configs/gla_340M.json            # GPU
    python scripts/benchmarks/profile_step.py --model configs/tiny/gla.json --device cpu --seq-len 64 --batch 2

On CPU (a smoke run) the categories come from the self time of aten ops instead of kernels; fla's
Triton kernels, interpreted on CPU, are not aten ops and do not show.

``--host`` profiles the host instead: the same steps under cProfile, the Python functions with the
most time of their own on the main thread per step (forward, clipping, optimizer; the backward is
queued by autograd's own thread and does not show). When the GPU waits for the host
(``bench_train.py --timeline``), this says what the host is doing.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# First match wins; patterns are lower-case substrings of CUDA kernel names or aten op names.
CATEGORIES = [
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "splitkreduce", "aten::mm", "aten::addmm", "aten::bmm")),
    ("communication", ("nccl", "c10d::", "gloo")),
    ("copy / cast / fill", ("memcpy", "memset", "copy_kernel", "fillfunctor", "chunk_cat", "aten::copy_",
                            "aten::fill_", "aten::zero_", "aten::cat")),
    ("fla linear attention", ("chunk_", "fused_recurrent", "recurrent_fuse", "parallel_")),
    ("norm", ("layer_norm", "rms_norm", "rmsnorm", "group_norm")),
    ("swiglu / activation", ("swiglu", "swish", "silu", "gelu")),
    ("loss", ("cross_entropy", "logsumexp", "log_softmax", "nll_loss")),
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach")),
    ("elementwise / other", ("",)),
]


def category(name: str) -> str:
    low = name.lower()
    return next(cat for cat, patterns in CATEGORIES if any(p in low for p in patterns))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="configs/gla_340M.json", help="model config JSON")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=8, help="untimed steps (autotuning lands here)")
    p.add_argument("--steps", type=int, default=3, help="timed steps, then as many profiled steps")
    p.add_argument("--top", type=int, default=25, help="kernels (or with --host, functions) listed")
    p.add_argument("--host", action="store_true", help="cProfile the host's main thread instead of the device")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--norm-bwd-programs-per-sm", type=int, default=None,
                   help="fla's norm backward launch (recipe/fla_kernels.py); default: the trainer's; 1: fla's own")
    return p.parse_args(argv)


def device_events(prof, on_gpu: bool):
    """(name, microseconds) of every kernel (GPU) or of every op's self time (CPU)."""
    import torch

    for e in prof.events():
        if e.is_user_annotation:  # e.g. "Optimizer.step#AdamW.step": a range around kernels counted already
            continue
        if on_gpu:
            if e.device_type == torch.autograd.DeviceType.CUDA:
                yield e.name, e.device_time_total
        elif e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
            yield e.name, e.self_cpu_time_total


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from recipe.device import configure_device

    configure_device()  # on CPU: fla's Triton kernels through the interpreter (before fla is imported)
    import torch
    from torch.profiler import ProfilerActivity, profile

    from scripts.benchmarks import bench_train

    on_gpu = torch.cuda.is_available()
    bare = bench_train.bare_setup(args.model, args.seq_len, args.batch, False, "fsdp",
                                  args.warmup + 2 * args.steps, args.norm_bwd_programs_per_sm)
    batches = bare.batches
    for inputs, labels in batches[:args.warmup]:
        bare.step(inputs, labels)
    bench_train.synchronize()
    timed = batches[args.warmup:args.warmup + args.steps]
    t0 = time.perf_counter()
    for inputs, labels in timed:
        bare.step(inputs, labels)
    bench_train.synchronize()
    step_ms = 1e3 * (time.perf_counter() - t0) / len(timed)

    profiled = batches[args.warmup + args.steps:]
    if args.host:
        return host_profile(bare, profiled, step_ms, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for inputs, labels in profiled:
            bare.step(inputs, labels)
        bench_train.synchronize()

    per_cat, per_kernel, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for name, us in device_events(prof, on_gpu):
        per_cat[category(name)] += us
        per_kernel[name] += us
        calls[name] += 1
    n = len(profiled)
    busy_ms = sum(per_cat.values()) / 1e3 / n
    tokens = args.seq_len * args.batch
    where = torch.cuda.get_device_name(0) if on_gpu else "CPU (self time of aten ops)"
    print(f"{args.model}, seq {args.seq_len} x batch {args.batch}, bare-fsdp, eager, {where}")
    print(f"unprofiled step: {step_ms:.1f} ms ({tokens / step_ms * 1e3:,.0f} tokens/s); "
          f"{'device busy' if on_gpu else 'op self time'} per profiled step: {busy_ms:.1f} ms "
          f"({100 * busy_ms / step_ms:.0f}% of the unprofiled step)\n")
    print("| category | ms/step | share |\n|---|---|---|")
    for cat, us in per_cat.most_common():
        print(f"| {cat} | {us / 1e3 / n:.2f} | {100 * us / sum(per_cat.values()):.1f}% |")
    print(f"\n| kernel (top {args.top}) | category | ms/step | calls/step |\n|---|---|---|---|")
    for name, us in per_kernel.most_common(args.top):
        print(f"| `{name[:80]}` | {category(name)} | {us / 1e3 / n:.2f} | {calls[name] / n:g} |")
    return 0


def host_profile(bare, profiled, step_ms: float, args) -> int:
    import cProfile
    import pstats

    from scripts.benchmarks import bench_train

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    for inputs, labels in profiled:
        bare.step(inputs, labels)
    profiler.disable()
    bench_train.synchronize()
    n = len(profiled)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    total_s = sum(v[2] for v in stats.values())
    print(f"{args.model}, seq {args.seq_len} x batch {args.batch}, bare-fsdp, eager: host main thread under cProfile")
    print(f"unprofiled step: {step_ms:.1f} ms; profiled: {1e3 * (time.perf_counter() - t0) / n:.1f} ms per step, "
          f"{1e3 * total_s / n:.1f} ms of it in profiled functions, "
          f"{sum(v[0] for v in stats.values()) / n:,.0f} calls per step\n")
    print(f"| function (top {args.top} by own time) | own ms/step | cumulative ms/step | calls/step |\n|---|---|---|---|")
    ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:args.top]
    for (file, line, name), (calls, _, own, cum, _) in ranked:
        where = f"{os.path.basename(file)}:{line} {name}" if line else name
        print(f"| `{where[:90]}` | {1e3 * own / n:.2f} | {1e3 * cum / n:.2f} | {calls / n:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
