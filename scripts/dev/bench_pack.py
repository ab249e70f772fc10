"""Host time per tensor of packing and unpacking export buckets (no transport, one process).

    python scripts/dev/bench_pack.py --model tiny-deep            # CPU: 1.5b's 219 tensors, a few KiB each
    python scripts/dev/bench_pack.py --model 1.5b --device cuda   # GPU: copies queued, host time only

Builds a Llama of ``scripts/benchmarks/bench_export.py``'s shapes, plans its export (bf16, 512 MiB buckets)
and times, per tensor: ``unpack`` (the receiver's views before ``load_weights``), ``load``
(unpack plus the reference engine's ``load_weights``, one TP rank: the receiver's whole host path
per bucket) and ``WeightSource.fill`` (the trainer's sources, views and casting copies). Medians over
``--repeats``; prints a header and one markdown table. For small tensors both are host time,
which every export pays on its path (219 tensors for a ~1B Llama).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipe.rollout.trainer.adapters import get_export_adapter  # noqa: E402
from recipe.rollout.engine.reference_receiver import build_engine  # noqa: E402
from recipe.rollout.trainer.source import WeightSource  # noqa: E402
from recipe.rollout.protocol import unpack  # noqa: E402
from scripts.benchmarks.bench_export import MODELS, llama_config  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-deep", choices=sorted(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bucket_mb", type=float, default=512)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args(argv)

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(llama_config(args.model))
    source = WeightSource(model, get_export_adapter(model.config, torch.bfloat16), int(args.bucket_mb * 2**20))
    buffers = [torch.empty(plan.nbytes + 64, dtype=torch.uint8, device=args.device) for plan in source.buckets]
    n = sum(len(plan.metas) for plan in source.buckets)
    engine = build_engine(model.config, torch.bfloat16, 0, 1, None, args.device)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def per_tensor_us(step) -> float:
        sync()
        t = time.perf_counter()
        for plan, buffer in zip(source.buckets, buffers):
            step(plan, buffer)
        elapsed = time.perf_counter() - t  # host time: nothing here waits for the device
        sync()
        return elapsed / n * 1e6

    def load(plan, buffer):
        engine.load_weights(list(unpack(buffer, plan.metas)))  # as the receiver calls it

    steps = {"unpack": lambda plan, buffer: list(unpack(buffer, plan.metas)), "load": load, "fill": source.fill}
    medians = {}
    with torch.no_grad():
        for name, step in steps.items():
            for _ in range(min(10, args.repeats)):  # warm-up
                per_tensor_us(step)
            medians[name] = statistics.median(per_tensor_us(step) for _ in range(args.repeats))
    print(f"# bucket packing host time — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"device: {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}; "
          f"command: python scripts/dev/bench_pack.py {' '.join(sys.argv[1:])}")
    print("| model | tensors | buckets | unpack µs/tensor | load µs/tensor | fill µs/tensor |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.model} | {n} | {len(source.buckets)} | {medians['unpack']:.1f} | {medians['load']:.1f} "
          f"| {medians['fill']:.1f} |")


if __name__ == "__main__":
    main()
