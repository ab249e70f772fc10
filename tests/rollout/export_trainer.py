"""A one-process trainer that exports a tiny Llama through a rollout transport, and can fail in
the middle of a version: ``--die_before k`` exits with status 3 once the buckets before k were
received; ``--abort_before k`` gives the version up there as the hook does after a failed bucket
(``transport.abort``) and exits with status 4. Used by tests/rollout/test_rollout_units.py."""

import argparse
import os
from types import SimpleNamespace

import torch

from recipe.model import load_model_config
from recipe.rollout.trainer.adapters import get_export_adapter
from recipe.rollout.trainer.source import Bucket, WeightSource
from recipe.rollout.trainer.senders import build_transport
from tests.rollout.seeded_model import materialized

CONFIG = "configs/tiny/llama.json"
BUCKET_BYTES = 1 << 17


def tiny_llama_source(device: str = "cpu") -> WeightSource:
    """The exported model: a seeded tiny Llama, identical in every process that builds it."""
    cfg = load_model_config(CONFIG)
    return WeightSource(materialized(cfg).to(device), get_export_adapter(cfg, torch.float32), BUCKET_BYTES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", choices=["gloo", "nccl"], required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", type=int, required=True)
    ap.add_argument("--die_before", type=int, default=-1)
    ap.add_argument("--abort_before", type=int, default=-1)
    ap.add_argument("--timeout_s", type=float, default=60)
    args = ap.parse_args()
    device = "cuda:0" if args.transport == "nccl" else "cpu"
    if args.transport == "nccl":
        torch.cuda.set_device(0)
    source = tiny_llama_source(device)
    transport = build_transport(SimpleNamespace(
        transport=args.transport, engine_address="127.0.0.1", engine_port=args.port, engine_world_size=1,
        timeout_s=args.timeout_s, bucket_mb=BUCKET_BYTES / 2**20, placement="disaggregated", on_failure="log"))
    transport.init()
    transport.start(args.version, source.buckets)
    for plan in source.buckets:
        if plan.index == args.die_before:
            if args.transport == "nccl":
                torch.cuda.synchronize()  # the buckets before this one are on the receiver
            os._exit(3)
        if plan.index == args.abort_before:
            transport.abort("injected failure")
            transport.close()  # as the hook does; no notify: training has not ended
            raise SystemExit(4)
        buffer = transport.buffer(plan.nbytes)
        source.fill(plan, buffer)
        transport.send(Bucket(plan.index, plan.metas, buffer, plan.nbytes))
    transport.finish(args.version)
    transport.close(notify=True)


if __name__ == "__main__":
    main()
