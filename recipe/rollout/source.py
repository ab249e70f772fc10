"""Trainer side of the export: the model's weights as a stream of flat buckets.

The bucket layout is planned once from names, global shapes and dtypes (no data moves), so every
rank knows the whole sequence of gathers up front and the receivers can be told each bucket's
metadata before its bytes. Filling a bucket gathers one parameter at a time: ``full_tensor()`` is
a collective, so *every* trainer rank calls ``fill`` for every bucket in the same order; only the
sending rank passes a buffer and keeps the result. Peak extra memory on the sender is the buffers
in flight (the transport rotates at most two) plus the largest gathered parameter.

Parameters are cast to the engine dtype *before* the gather (a sharded, elementwise cast), which
halves the gather traffic for bf16 engines and gives the same bits as casting afterwards.

The first buckets ramp up (1/16, 1/4, then the full bucket size): nothing is on the wire while the
first bucket is filled, so a small first bucket starts the transfer sooner, and each bucket is
filled while the smaller one before it is sent (filling is ~8x faster than the wire: a 512 MiB
bucket of fp32 cast to bf16 took 0.5 ms on an H200, its broadcast ~1.5 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from recipe.rollout.adapters import ExportAdapter, ExportItem, clean_name
from recipe.rollout.vllm_worker import TensorMeta, align, dtype_name

# Bucket i holds at most bucket_bytes * RAMP_GROWTH**i / RAMP_START (capped at bucket_bytes); 1 = no ramp.
RAMP_START = 16
RAMP_GROWTH = 4


@dataclass
class BucketPlan:
    index: int
    entries: list[tuple[ExportItem, TensorMeta]]
    nbytes: int

    @property
    def metas(self) -> list[TensorMeta]:
        return [m for _, m in self.entries]


@dataclass
class Bucket:
    """A filled bucket, as transports send it."""

    index: int
    metas: list[TensorMeta]
    buffer: torch.Tensor  # uint8, at least ``nbytes`` long
    nbytes: int


def plan_buckets(items: list[ExportItem], bucket_bytes: int, ramp_start: int = 1) -> list[BucketPlan]:
    """Consecutive items packed into buckets of at most ``bucket_bytes`` (offsets aligned); an
    item larger than a bucket gets a bucket of its own. With ``ramp_start`` > 1 the first bucket
    holds ``bucket_bytes / ramp_start`` and each next one RAMP_GROWTH times more, up to ``bucket_bytes``."""
    if bucket_bytes <= 0 or ramp_start < 1:
        raise ValueError("bucket size and ramp start must be positive")
    buckets: list[BucketPlan] = []
    entries: list[tuple[ExportItem, TensorMeta]] = []
    end = 0

    def capacity() -> int:
        return min(bucket_bytes, max(bucket_bytes * RAMP_GROWTH ** len(buckets) // ramp_start, 1))

    def flush():
        nonlocal entries, end
        if entries:
            buckets.append(BucketPlan(len(buckets), entries, end))
        entries, end = [], 0

    for item in items:
        offset = align(end)
        if entries and offset + item.nbytes > capacity():
            flush()
            offset = 0
        meta = TensorMeta(item.name, dtype_name(item.dtype), tuple(item.shape), offset, item.nbytes)
        entries.append((item, meta))
        end = offset + item.nbytes
        if item.nbytes >= capacity():  # oversize (or exactly full): nothing else fits after it
            flush()
    flush()
    return buckets


class WeightSource:
    """The export plan of one model; ``fill`` streams it bucket by bucket (collective)."""

    def __init__(self, model: torch.nn.Module, adapter: ExportAdapter, bucket_bytes: int,
                 ramp_start: int | None = None):
        self.params = {clean_name(n): p for n, p in model.named_parameters()}
        self.items = adapter.plan({n: tuple(p.shape) for n, p in self.params.items()})
        self.buckets = plan_buckets(self.items, bucket_bytes, RAMP_START if ramp_start is None else ramp_start)
        self.total_bytes = sum(it.nbytes for it in self.items)
        self.max_bucket_bytes = max((b.nbytes for b in self.buckets), default=0)

    def gather(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        p = self.params[name].detach()
        if p.dtype != dtype:
            p = p.to(dtype)
        return p.full_tensor() if isinstance(p, DTensor) else p

    @torch.no_grad()
    def fill(self, plan: BucketPlan, out: torch.Tensor | None) -> None:
        """Gather the bucket's parameters (on every rank) and, given ``out``, pack them into it."""
        for item, meta in plan.entries:
            if item.combine is None and not isinstance(p := self.params[item.sources[0]], DTensor):
                # Nothing to gather or combine: cast while packing, one pass over the parameter
                # and no temporary (``.to`` then ``copy_`` read and wrote it twice). Same rounding.
                if tuple(p.shape) != meta.shape:
                    raise RuntimeError(f"rollout: {item.name} is {tuple(p.shape)}, planned {meta.shape}")
                if out is not None:
                    out[meta.offset:meta.offset + meta.nbytes].view(item.dtype).view(meta.shape).copy_(p.detach())
                continue
            tensor = item.build([self.gather(s, item.dtype) for s in item.sources])
            if tuple(tensor.shape) != meta.shape or tensor.dtype != item.dtype:
                raise RuntimeError(f"rollout: {item.name} came out {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"planned {meta.shape} {item.dtype}")
            if out is not None:
                out[meta.offset:meta.offset + meta.nbytes].view(item.dtype).view(meta.shape).copy_(tensor)
            del tensor
