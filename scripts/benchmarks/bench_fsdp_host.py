"""Host time per training step of FSDP2's layouts, measured on the CPU with negligible compute.

    python scripts/benchmarks/bench_fsdp_host.py [--blocks 24] [--tensors-per-block 12] [--steps 30] [--repeats 5]
    python scripts/benchmarks/bench_fsdp_host.py --ranks 2   # FSDP over 2 processes (gloo)

One-rank FSDP (``parallelism.single_device_fsdp``) computes with bf16 copies of fp32 master
weights; its cost is host work (hooks, copy-in/out, DTensor dispatch in clipping and the
optimizer), which leaves a GPU idle when the host cannot keep ahead of the kernels. This measures
that host work alone: a stand-in with a model's tensor count (default GLA-340M: 24 blocks x 12
tensors + embeddings and head = 290) and tiny shapes, so compute is negligible, on the CPU (gloo).
Rows: plain tensors, FSDP with one unit per block resharded after forward (the multi-rank layout),
one unit kept unsharded (the layout ``parallelisms/data_parallel.py`` uses on one rank), and that
unit with clipping and the optimizer step on the local tensors (``parallelisms/local_shards.py``,
what the trainer does on one rank). With ``--ranks N`` the model is sharded over N processes and
the rows are the per-block layout with clip and step through DTensor dispatch or on the local
shards (what the trainer does under FSDP); rank 0 prints.
Prints the median milliseconds of forward+backward, gradient clipping and fused AdamW as a
markdown table: the median over ``--repeats`` interleaved repeats of each row's per-repeat median,
with the range of the totals (a small shared host is noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn


def stand_in(blocks: int, per_block: int, width: int = 8, vocab: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(per_block)]) for _ in range(blocks)]
    return nn.Sequential(nn.Embedding(vocab, width), *layers, nn.Linear(width, vocab, bias=False))


def wrap(model: nn.Sequential, layout: str, mesh) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if layout == "plain":
        return
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if layout.startswith("fsdp per block"):
        for block in list(model)[1:-1]:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    else:  # "fsdp one unit", also the row that clips and steps on the local tensors
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)


def measure(layout: str, args, mesh) -> dict:
    model = stand_in(args.blocks, args.tensors_per_block)
    wrap(model, layout, mesh)
    from parallelisms.local_shards import LocalShards

    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    local = LocalShards.of(params) if layout.endswith("local clip + step") else None
    x = torch.randint(0, 16, (2, 4))
    times: dict[str, list[float]] = {"forward+backward": [], "clip": [], "optimizer": []}
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        model(x).float().sum().backward()
        t1 = time.perf_counter()
        if local is not None:
            local.clip_grad_norm_(params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        t2 = time.perf_counter()
        with local.stepping([optimizer]) if local is not None else contextlib.nullcontext():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= args.warmup:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(dt * 1e3)
    row = {key: statistics.median(v) for key, v in times.items()}
    row["total"] = sum(row.values())
    return {"layout": layout, "tensors": len(params), **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=24)
    ap.add_argument("--tensors-per-block", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=1, help="processes to shard over (gloo)")
    args = ap.parse_args()
    from recipe.net import free_port

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if args.ranks == 1:
        run(0, args)
    else:
        import torch.multiprocessing as mp

        mp.start_processes(run, args=(args,), nprocs=args.ranks, join=True, start_method="spawn")


def run(rank: int, args) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (args.ranks,))
    if args.ranks == 1:
        layouts = ("plain", "fsdp per block", "fsdp one unit", "fsdp one unit, local clip + step")
    else:
        layouts = ("fsdp per block", "fsdp per block, local clip + step")
    runs = {layout: [] for layout in layouts}
    for _ in range(args.repeats):
        for layout in layouts:
            runs[layout].append(measure(layout, args, mesh))
    dist.destroy_process_group()
    if rank:
        return
    print(f"host ms per step on rank 0 of {args.ranks}: median of {args.repeats} interleaved repeats of each "
          f"repeat's median over {args.steps} steps ({os.cpu_count()} CPU cores, torch {torch.__version__})")
    print("| layout | tensors | forward+backward | clip | optimizer | total | total min-max |")
    print("|---|---|---|---|---|---|---|")
    for layout, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("forward+backward", "clip", "optimizer", "total")}
        totals = [r["total"] for r in rs]
        print(f"| {layout} | {rs[0]['tensors']} | {med['forward+backward']:.1f} | {med['clip']:.1f} | "
              f"{med['optimizer']:.1f} | {med['total']:.1f} | {min(totals):.1f}-{max(totals):.1f} |")


if __name__ == "__main__":
    main()
