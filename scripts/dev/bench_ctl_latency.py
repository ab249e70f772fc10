"""Latency of the rollout control channel: what one per-bucket message costs a receiver.

The rollout export's ``ipc`` transport sends one control message per bucket on a gloo group
(``send_obj`` / ``recv_obj`` in ``recipe/rollout/protocol.py``; ``nccl`` and ``gloo`` did too
until protocol 5), posted by the trainer without waiting. This
measures how long a receiver's ``recv_obj`` takes when the message is already posted ("posted
ahead") and in lock step ("ping-pong"), next to a raw 8-byte gloo broadcast and a TCPStore
``get`` of a key that is already set (the path the start message takes). If posting ahead does not
make the receive cheaper, every message is a round trip on the receiver's critical path.

    torchrun --nproc_per_node=2 scripts/dev/bench_ctl_latency.py [--messages 200]

Rank 1 prints a markdown table (median / min / p90 in microseconds).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist


from recipe.net import free_port  # noqa: E402
from recipe.rollout.protocol import TensorMeta, recv_obj, send_obj  # noqa: E402
from recipe.shutdown import exit_without_finalizing  # noqa: E402

# A 512 MiB bucket of the 1.5b benchmark model holds ~45 tensors.
BUCKET_MSG = {"op": "bucket", "index": 0, "nbytes": 1 << 29, "tensors": [
    TensorMeta(f"model.layers.{i}.mlp.up_proj.weight", "bfloat16", (5632, 2048), i * 23068672, 23068672).to_wire()
    for i in range(45)]}


def stats(seconds: list[float]) -> tuple[float, float, float]:
    s = sorted(seconds)
    return s[len(s) // 2] * 1e6, s[0] * 1e6, s[int(len(s) * 0.9)] * 1e6


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200, help="messages per measurement")
    args = ap.parse_args(argv)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    pg = dist.new_group(backend="gloo")  # as the export: a group of its own
    n, rows = args.messages, []

    # flare control message, every one posted before the receiver asks for the first
    dist.barrier()
    if rank == 0:
        for pending in [send_obj(pg, BUCKET_MSG, async_op=True) for _ in range(n)]:
            for work, _ in pending:
                work.wait()
    else:
        time.sleep(0.5)
        rows.append(("control message (16 KiB frame), posted ahead", stats(timed(lambda: recv_obj(pg), n))))

    # the same in lock step: the sender posts the next one only when the last was taken
    dist.barrier()
    if rank == 0:
        for _ in range(n):
            send_obj(pg, BUCKET_MSG)
    else:
        rows.append(("control message, ping-pong", stats(timed(lambda: recv_obj(pg), n))))

    # a raw 8-byte gloo broadcast, posted ahead
    dist.barrier()
    if rank == 0:
        small = torch.zeros(8, dtype=torch.uint8)
        for work in [dist.broadcast(small, 0, group=pg, async_op=True) for _ in range(n)]:
            work.wait()
    else:
        time.sleep(0.5)
        buf = torch.empty(8, dtype=torch.uint8)
        rows.append(("8-byte gloo broadcast, posted ahead", stats(timed(lambda: dist.broadcast(buf, 0, group=pg), n))))

    # TCPStore get of keys that are already set
    port = torch.tensor([free_port() if rank == 0 else 0])
    dist.broadcast(port, 0)
    store = dist.TCPStore("127.0.0.1", int(port), 2, is_master=rank == 0, timeout=timedelta(seconds=60))
    value = repr(BUCKET_MSG).encode()
    if rank == 0:
        for i in range(n):
            store.set(f"k{i}", value)
    dist.barrier()
    if rank == 1:
        keys = iter(range(n))
        rows.append(("TCPStore get, key already set", stats(timed(lambda: store.get(f"k{next(keys)}"), n))))
    dist.barrier()

    if rank == 1:
        print(f"\n{n} messages per row, {torch.__version__}, host {os.uname().nodename}\n")
        print("| receive | median us | min us | p90 us |\n|---|---|---|---|")
        for name, (med, lo, p90) in rows:
            print(f"| {name} | {med:.0f} | {lo:.0f} | {p90:.0f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_without_finalizing(0)  # see recipe/shutdown.py
