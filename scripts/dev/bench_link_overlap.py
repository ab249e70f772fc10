"""Does gathering an FSDP trainer's shards slow the export's broadcast to the engine? (3 GPUs)

    torchrun --nproc_per_node=3 scripts/dev/bench_link_overlap.py [--bucket-mb 512] [--buckets 5]

Rank 0 stands for the sending trainer rank, rank 1 for its FSDP peer, rank 2 for the engine.
Per bucket: a broadcast 0 -> 2 of the bucket, and the gather of the next bucket's shards between
ranks 0 and 1 (each holds half), either as an all-gather (both ranks receive the other's half) or
as one send 1 -> 0 (what ``recipe.rollout.trainer.source`` does). Prints the median time of ``--buckets``
buckets for each pattern alone and for gather and broadcast issued together, as a markdown table.
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
    ap.add_argument("--bucket-mb", type=float, default=512)
    ap.add_argument("--buckets", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=6)
    args = ap.parse_args()
    rank = int(os.environ["RANK"])
    if int(os.environ["WORLD_SIZE"]) != 3:
        raise SystemExit("run with torchrun --nproc_per_node=3")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    trainer, export = dist.new_group([0, 1]), dist.new_group([0, 2])
    nbytes = int(args.bucket_mb * 2**20) // 2 * 2
    half = torch.ones(nbytes // 2, dtype=torch.uint8, device="cuda")
    gathered = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    bucket = torch.ones(nbytes, dtype=torch.uint8, device="cuda")

    def all_gather():
        if rank in (0, 1):
            dist.all_gather_into_tensor(gathered, half, group=trainer)

    def send_to_sender():
        if rank == 0:
            dist.recv(gathered[nbytes // 2:], 1, group=trainer)
        elif rank == 1:
            dist.send(half, 0, group=trainer)

    def broadcast():
        if rank in (0, 2):
            dist.broadcast(bucket, 0, group=export)

    def median_ms(ops) -> float:
        times = []
        for _ in range(args.repeats + 1):  # the first run creates the communicators
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.buckets):
                for op in ops:
                    op()
            torch.cuda.synchronize()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]) * 1e3

    patterns = [("broadcast 0 -> 2", [broadcast]), ("all-gather 0 <-> 1", [all_gather]),
                ("send 1 -> 0", [send_to_sender]), ("all-gather + broadcast", [all_gather, broadcast]),
                ("send + broadcast", [send_to_sender, broadcast])]
    rows = [(name, median_ms(ops)) for name, ops in patterns]
    if rank == 0:
        print(f"{args.buckets} buckets of {args.bucket_mb:g} MiB, {torch.cuda.get_device_name()}, torch {torch.__version__}")
        print("| pattern | ms | bucket bytes / ms, GB/s |\n|---|---|---|")
        for name, ms in rows:
            print(f"| {name} | {ms:.2f} | {args.buckets * nbytes / ms / 1e6:.0f} |")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
