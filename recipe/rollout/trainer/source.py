"""Trainer side of the export: the model's weights as a stream of flat buckets.

The bucket layout is planned once from names, global shapes and dtypes (no data moves), so every
rank knows the whole sequence of gathers up front and the receivers can be told each bucket's
metadata before its bytes. Filling a bucket is collective: *every* trainer rank calls ``fill`` for
every bucket in the same order; only the sending rank passes a buffer and keeps the result.

How a parameter reaches the bucket depends on its layout:
- held whole by this rank (a plain tensor; FSDP on one GPU; HSDP with a shard group of one): read
  from the local tensor, cast in the packing copy. No collective, no DTensor dispatch.
- split by rows (``Shard(0)`` over one mesh dimension, whole across the others: FSDP, HSDP, a TP
  column-parallel weight): all such parameters of a bucket travel in **one** gather to the
  sending rank (a batch of sends and receives), each rank's rows cast to the engine dtype into a
  flat send buffer, as FSDP gathers its own units. One ``full_tensor()`` per parameter costs a
  collective launch plus ~0.1-0.3 ms of DTensor dispatch each, several times the transfer itself
  for a ~1B model. Groups without the sender (HSDP's other replicas) skip the gather.
- anything else (TP ``Shard(1)``, FSDP x TP, ``_StridedShard``): ``full_tensor()`` per parameter.

Peak extra memory on the sender is the buffers in flight (the transport rotates at most two), one
bucket's gather buffer and the largest parameter gathered on its own; on the other ranks, one
bucket's share of the gather.

Parameters are cast to the engine dtype *before* they are gathered (an elementwise cast of the
shard), which halves the gather traffic for bf16 engines and gives the same bits as casting after.

The first buckets ramp up (1/16, 1/4, then the full bucket size): nothing is on the wire while the
first bucket is filled, so a small first bucket starts the transfer sooner, and each bucket is
filled while the smaller one before it is sent (filling is ~8x faster than the wire: a 512 MiB
bucket of fp32 cast to bf16 took 0.5 ms on an H200, its broadcast ~1.5 ms). A tensor bigger than
the ramp so far waits for it: in layer order the embedding comes first, and a 125 MiB embedding
(1.5b Llama shapes) as bucket 0 put ~0.4 ms of wire time ahead of everything else.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from recipe.rollout.trainer.adapters import ExportAdapter, ExportItem, clean_name
from recipe.rollout.protocol import TensorMeta, align, dtype_name, packed_view

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
    """Items packed in order into buckets of at most ``bucket_bytes`` (offsets aligned); an
    item larger than a bucket gets a bucket of its own. With ``ramp_start`` > 1 the first bucket
    holds ``bucket_bytes / ramp_start`` and each next one RAMP_GROWTH times more, up to
    ``bucket_bytes``; an item too big for the ramp so far (the embedding, first in layer order)
    waits until the buckets have grown to it, else it would be the first bucket and no ramp at all."""
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

    def place(item: ExportItem) -> None:
        nonlocal end
        offset = align(end)
        meta = TensorMeta(item.name, dtype_name(item.dtype), tuple(item.shape), offset, item.nbytes)
        entries.append((item, meta))
        end = offset + item.nbytes
        if item.nbytes >= capacity():  # oversize (or exactly full): nothing else fits after it
            flush()

    pending = collections.deque(items)
    deferred: collections.deque[ExportItem] = collections.deque()  # waiting for the ramp, in order
    while pending or deferred:
        ramping = capacity() < bucket_bytes
        # A new bucket starts with the first waiting item once the ramp has grown to it.
        if not entries and deferred and (not ramping or deferred[0].nbytes <= capacity() or not pending):
            place(deferred.popleft())
        elif not pending:
            flush()
        elif ramping and pending[0].nbytes > capacity():
            deferred.append(pending.popleft())
        elif entries and align(end) + pending[0].nbytes > capacity():
            flush()
        else:
            place(pending.popleft())
    flush()
    return buckets


def held_whole(p: torch.Tensor) -> torch.Tensor | None:
    """``p`` as a plain tensor when this rank holds all of it, else None (a gather is needed).
    A DTensor is whole on every rank when each mesh dimension either replicates it or has one rank."""
    if not isinstance(p, DTensor):
        return p
    mesh = p.device_mesh
    if all(pl.is_replicate() or mesh.size(dim) == 1 for dim, pl in enumerate(p.placements)):
        local = p.to_local()
        if local.shape == p.shape:  # padding or an uneven layout would show here
            return local
    return None


def chunk_rows(n: int, world: int, index: int) -> tuple[int, int]:
    """``Shard(0)``'s split of ``n`` rows over ``world`` ranks (``torch.chunk``): (rows per chunk,
    rows rank ``index`` holds; the last ranks may hold fewer or none)."""
    chunk = -(-n // world)
    return chunk, max(0, min(chunk, n - index * chunk))


def row_split_dim(p: torch.Tensor) -> int | None:
    """The mesh dimension ``p`` is split over by rows (``Shard(0)``: FSDP, HSDP, a TP column-parallel
    weight), when that is its only split; None for any other layout."""
    if not isinstance(p, DTensor) or p.dim() == 0:
        return None
    mesh = p.device_mesh
    split = [dim for dim, pl in enumerate(p.placements) if not (pl.is_replicate() or mesh.size(dim) == 1)]
    if len(split) != 1:
        return None
    placement = p.placements[split[0]]
    return split[0] if type(placement) is Shard and placement.dim == 0 else None  # not _StridedShard


@dataclass
class Gathered:
    """A parameter from a bucket-wide all-gather: rank q's rows (padded to ``chunk``) are row q of
    ``pieces``, a [world, chunk * row] view of the receive buffer."""

    pieces: torch.Tensor
    shape: tuple[int, ...]
    chunk: int

    @property
    def padded(self) -> bool:
        """Whether the rows do not split evenly (the last ranks' slots are partly empty)."""
        return self.shape[0] != self.pieces.shape[0] * self.chunk

    def copy_to(self, dst: torch.Tensor) -> torch.Tensor:
        world, width = self.pieces.shape
        n = self.shape[0]
        if not self.padded:  # one strided copy
            dst.view(world, width).copy_(self.pieces)
            return dst
        rows_of = dst.view(n, -1)
        for q in range(world):
            _, rows = chunk_rows(n, world, q)
            if rows:
                rows_of[q * self.chunk:q * self.chunk + rows].copy_(self.pieces[q, :rows * rows_of.shape[1]].view(rows, -1))
        return dst

    def full(self) -> torch.Tensor:
        return self.copy_to(torch.empty(self.shape, dtype=self.pieces.dtype, device=self.pieces.device))


@dataclass
class GatherSlot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunk: int  # rows per rank (torch.chunk sizes; the last ranks may hold fewer)
    width: int  # elements per rank's padded slot: chunk * row length
    offset: int  # bytes into each rank's part of the send buffer
    local: TensorMeta  # this rank's rows in its send buffer (its local shape, cast)


@dataclass
class GatherRoute:
    """Where the row-split parameters of one mesh dimension go: to the sending rank, when it is in
    this rank's group along that dimension (else nobody in the group needs them)."""

    group: object  # the process group along the mesh dimension
    ranks: list[int]  # its members' global ranks, by group rank
    dst: int | None  # the sender's group rank; None: the sender is not in this group
    me: int  # this rank's group rank


@dataclass
class GatherGroup:
    """The row-split (FSDP-style) parameters of one bucket that share a mesh dimension: one gather."""

    route: GatherRoute
    slots: list[GatherSlot]
    nbytes: int  # per rank


class WeightSource:
    """The export plan of one model; ``fill`` streams it bucket by bucket (collective)."""

    def __init__(self, model: torch.nn.Module, adapter: ExportAdapter, bucket_bytes: int,
                 ramp_start: int | None = None, sender: int = 0):
        self.sender = sender  # the global rank that packs and sends (the hook's rank 0)
        self.params = {clean_name(n): p for n, p in model.named_parameters()}
        self.items = adapter.plan({n: tuple(p.shape) for n, p in self.params.items()})
        self.buckets = plan_buckets(self.items, bucket_bytes, RAMP_START if ramp_start is None else ramp_start)
        self.total_bytes = sum(it.nbytes for it in self.items)
        self.max_bucket_bytes = max((b.nbytes for b in self.buckets), default=0)
        # Layouts are fixed for the model's life: decide per parameter once, not per export.
        self.whole = {n for n, p in self.params.items() if held_whole(p) is not None}
        self.row_dims = self._row_split(self.params)
        self.routes: dict[tuple, GatherRoute] = {}
        self.gathers = [self._plan_gathers(plan) for plan in self.buckets]

    @staticmethod
    def _row_split(params: dict[str, torch.Tensor]) -> dict[str, int]:
        """Parameters to gather as row slots, with their mesh dimension: ``Shard(0)`` ones whose
        local rows on *every* rank are the ``torch.chunk`` rows the slots assume (a DTensor built
        with ``from_local`` may split unevenly; it is gathered with ``full_tensor()`` instead).
        Collective (one all-reduce) when any candidate exists: every rank must decide the same."""
        candidates = {n: d for n, p in params.items() if (d := row_split_dim(p)) is not None}
        if not candidates:
            return {}
        ok = []
        for name, dim in candidates.items():
            p = params[name]
            _, rows = chunk_rows(p.shape[0], p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim))
            ok.append(tuple(p.to_local().shape) == (rows, *p.shape[1:]))
        flags = torch.tensor(ok, dtype=torch.int32, device=params[next(iter(candidates))].to_local().device)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        return {name: dim for (name, dim), good in zip(candidates.items(), flags.tolist()) if good}

    def _plan_gathers(self, plan: BucketPlan) -> list[GatherGroup]:
        groups: dict[tuple, GatherGroup] = {}  # insertion order = the plan's, the same on every rank
        seen: set[tuple[str, torch.dtype]] = set()
        for item, _ in plan.entries:
            for name in item.sources:
                if name not in self.row_dims or (name, item.dtype) in seen:
                    continue
                seen.add((name, item.dtype))
                p, dim = self.params[name], self.row_dims[name]
                key = (p.device_mesh, dim)
                if key not in groups:
                    groups[key] = GatherGroup(self._route(p.device_mesh, dim), [], 0)
                group = groups[key]
                shape = tuple(p.shape)
                chunk, rows = chunk_rows(shape[0], p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim))
                row = p.numel() // shape[0] if shape[0] else 0
                width, offset = chunk * row, align(group.nbytes)
                local = TensorMeta(name, dtype_name(item.dtype), (rows, *shape[1:]), offset,
                                   rows * row * item.dtype.itemsize)  # _row_split checked the local shape
                group.slots.append(GatherSlot(name, item.dtype, shape, chunk, width, offset, local))
                group.nbytes = align(offset + width * item.dtype.itemsize)
        return list(groups.values())

    def _route(self, mesh, dim: int) -> GatherRoute:
        if (mesh, dim) not in self.routes:
            group = mesh.get_group(dim)
            ranks = dist.get_process_group_ranks(group)
            self.routes[(mesh, dim)] = GatherRoute(group, ranks, ranks.index(self.sender) if self.sender in ranks
                                                   else None, ranks.index(dist.get_rank()))
        return self.routes[(mesh, dim)]

    @torch.no_grad()
    def gather_rows(self, plan: BucketPlan, keep: bool) -> dict[tuple[str, torch.dtype], Gathered]:
        """One gather to the sender per mesh group for the bucket's row-split parameters (see the
        module docstring); with ``keep`` (the sender) their gathered views by (name, dtype), else
        an empty dict. The sender receives every other rank's rows in one batch of receives and
        casts its own in place; nobody else receives anything. An all-gather also sent the
        sender's rows out, over the links its broadcast to the engine uses: on H200s a broadcast
        0 -> 2 took 1.5-1.7x as long next to an all-gather on GPUs 0-1, 1.1-1.4x next to a send
        1 -> 0 (scripts/dev/bench_link_overlap.py)."""
        out: dict[tuple[str, torch.dtype], Gathered] = {}
        for group in self.gathers[plan.index]:
            route = group.route
            if route.dst is None:  # the sender is not in this group: nobody here needs these rows
                continue
            world = len(route.ranks)
            locals_ = [self.params[slot.name].to_local() for slot in group.slots]  # no detach(): see _source
            device = locals_[0].device
            rows = None
            if route.me == route.dst:  # every rank's rows land here, this rank's own cast in place
                rows = torch.empty(world * group.nbytes, dtype=torch.uint8, device=device).view(world, group.nbytes)
                send = rows[route.me]
            else:
                send = torch.empty(group.nbytes, dtype=torch.uint8, device=device)
            typed: dict = {}
            copy_all([packed_view(send, slot.local, typed) for slot in group.slots], locals_)  # cast into it
            if rows is not None:
                ops = [dist.P2POp(dist.irecv, rows[q], route.ranks[q], route.group)
                       for q in range(world) if q != route.me]
            else:
                ops = [dist.P2POp(dist.isend, send, route.ranks[route.dst], route.group)]
            for work in dist.batch_isend_irecv(ops):
                work.wait()  # NCCL: the current stream waits (the host does not)
            if keep and rows is not None:
                for slot in group.slots:
                    view = rows[:, slot.offset:slot.offset + slot.width * slot.dtype.itemsize].view(slot.dtype)
                    out[(slot.name, slot.dtype)] = Gathered(view, slot.shape, slot.chunk)
        return out

    def _source(self, name: str, dtype: torch.dtype, gathered: dict):
        """One source parameter of an item: a Gathered view, this rank's whole tensor (not yet cast),
        or the result of ``full_tensor()``, a collective every rank runs; None when not kept."""
        if (name, dtype) in gathered:
            return gathered[(name, dtype)]
        if name in self.row_dims:
            return None  # in the bucket's all-gather; only the sender keeps it
        # No detach(): fill runs under no_grad, where to_local() returns the local tensor as it is,
        # and a DTensor's detach() is a dispatched op (~50 us on the CPU VM, x219 params per export).
        p = self.params[name]
        if name in self.whole:
            return p.to_local() if isinstance(p, DTensor) else p
        if any(pl.is_partial() for pl in p.placements):
            return p.full_tensor()  # sum first, in the parameter's dtype; cast when packing
        return (p.to(dtype) if p.dtype != dtype else p).full_tensor()

    @torch.no_grad()
    def fill(self, plan: BucketPlan, out: torch.Tensor | None) -> None:
        """Gather the bucket's parameters (on every rank) and, given ``out``, pack them into it.
        A packing error (only the sender packs) is raised after the bucket's last collective, so
        the other ranks are never left waiting in one."""
        self.pack(plan, self.gather_rows(plan, keep=out is not None), out)

    @torch.no_grad()
    def pack(self, plan: BucketPlan, gathered: dict, out: torch.Tensor | None) -> None:
        """``fill`` after ``gather_rows``: the rest of the bucket's collectives (``full_tensor()``
        of the other layouts, every rank) and, given ``out``, the packing. Split from the gather
        so a sender can wait for ``out`` to be free after launching the gather, not before."""
        error = None
        typed: dict = {}  # dtype views of ``out`` (packed_view)
        copies: tuple[list, list] = ([], [])  # straight copies, launched together at the end
        for item, meta in plan.entries:
            sources = [self._source(name, item.dtype, gathered) for name in item.sources]
            if out is None or error is not None:
                continue
            try:
                self._pack(item, meta, sources, out, typed, copies)
            except Exception as e:  # noqa: BLE001 - re-raised below
                error = e
        if error is not None:
            raise error
        copy_all(*copies)

    @staticmethod
    def _pack(item: ExportItem, meta: TensorMeta, sources: list, out: torch.Tensor, typed: dict,
              copies: tuple[list, list]) -> None:
        """Pack one item into ``out``: a straight copy is appended to ``copies`` (dst, src lists)."""
        dst = packed_view(out, meta, typed)
        if item.combine is None:  # straight into the bucket; the cast happens in this copy
            (source,) = sources
            if tuple(source.shape) != meta.shape:
                raise RuntimeError(f"rollout: {item.name} is {tuple(source.shape)}, planned {meta.shape}")
            if isinstance(source, Gathered):
                if source.padded:
                    source.copy_to(dst)
                    return
                dst, source = dst.view(source.pieces.shape), source.pieces
            copies[0].append(dst)
            copies[1].append(source)
            return
        tensor = item.build([s.full() if isinstance(s, Gathered) else s.to(item.dtype) for s in sources])
        if tuple(tensor.shape) != meta.shape or tensor.dtype != item.dtype:
            raise RuntimeError(f"rollout: {item.name} came out {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {meta.shape} {item.dtype}")
        dst.copy_(tensor)


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src)`` for each pair (casting), one ``_foreach_copy_`` per (dst, src) dtype pair:
    on CUDA one multi-tensor kernel for same-layout pairs, else a loop in C++. A bucket holds ~30
    tensors of a ~1B model; a launch each from Python was most of the sender's host time."""
    by_dtypes: dict[tuple, tuple[list, list]] = {}
    for dst, src in zip(dsts, srcs):
        if dst.numel():
            pair = by_dtypes.setdefault((dst.dtype, src.dtype), ([], []))
            pair[0].append(dst)
            pair[1].append(src)
    for dst_list, src_list in by_dtypes.values():
        torch._foreach_copy_(dst_list, src_list)
