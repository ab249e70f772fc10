"""The box's raw NCCL broadcast bandwidth between GPUs: the reference for scripts/benchmarks/bench_export.py.

    torchrun --nproc_per_node=2 scripts/benchmarks/bench_nccl_broadcast.py [--sizes-mb 64,512,1024] [--repeats 10]

Rank 0 broadcasts a bf16 buffer of each size to every other rank; prints the median time and GB/s
(bytes / time, 1 GB = 1e9 bytes) as a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", default="64,512,1024")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rows = []
    for mb in map(float, args.sizes_mb.split(",")):
        buf = torch.ones(int(mb * 2**20) // 2, dtype=torch.bfloat16, device="cuda")
        for _ in range(3):  # warm-up: communicator setup, first-use allocations
            dist.broadcast(buf, src=0)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.broadcast(buf, src=0)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append((mb, t, buf.numel() * 2 / t / 1e9))
    if dist.get_rank() == 0:
        print(f"{torch.cuda.get_device_name()} x {dist.get_world_size()}, torch {torch.__version__}, NCCL "
              f"{'.'.join(map(str, torch.cuda.nccl.version()))}")
        print("| MiB | median s | GB/s |\n|---|---|---|")
        for mb, t, gbs in rows:
            print(f"| {mb:g} | {t:.5f} | {gbs:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
