"""flare's weight-export wire protocol: what both ends share (the trainer's senders in
``recipe/rollout/trainer/senders.py`` and the engine's ``recipe/rollout/engine/endpoint.py``).

Imports only torch and the standard library, so that the engine side runs inside an inference
engine (vLLM) without flare's training dependencies.

Protocol (transfer group: the trainer's sending rank is rank 0, receivers are ranks 1..R):

* The receivers host the rendezvous ``TCPStore`` (engine rank 0 listens on the engine address/port).
  A trainer connects as a client and bumps ``flare/gen``; every receiver that sees a new
  generation builds the groups under the prefix ``flare/g<gen>/``. A dead or restarted peer is
  therefore handled by starting a new generation, never by reusing a broken group.
* Receivers idle on the store between versions (``flare/g<gen>/start<n>`` keys, watched by a
  blocking ``TCPStore.wait`` on a helper thread), not inside a collective, so a long training
  interval never trips a collective timeout. The key's value is the ``start`` message (or
  ``close`` when the trainer ends).
* ``nccl`` and ``gloo`` (protocol 5): the start message carries the version's bucket plan (each
  bucket's size and tensor list: name, dtype, shape, offset, nbytes), once per connection, and
  later starts name it by id. Receivers post every bucket's receive from the plan; no control
  message travels per bucket. A bucket is one flat ``uint8`` broadcast: the packed tensors, then an
  8-byte trailer holding the version's start number. A sender that fails mid-version still sends
  the remaining planned buckets, unfilled and with a 0 trailer, so every posted receive completes.
  After the last bucket is queued the sender broadcasts an ``end`` message (every bucket was
  filled) or ``abort`` on the gloo control group. ``gloo`` receivers load a bucket once its bytes
  are in and the trailer matches. ``nccl`` receivers queue each bucket's loads behind its bytes
  on the device without waiting for them, one bucket behind the posted receives (``load_weights``
  must not read values on the host: vLLM's only queues copies), and let the ``end`` message vouch
  for the trailers; they post its receive at the start, so a trainer that dies mid-version fails
  it at once instead of leaving them in an NCCL wait until the timeout.
* ``ipc``: the per-bucket control message carries the bucket's tensor list and a CUDA IPC handle
  of the trainer's buffer, and each bucket is acknowledged (an all-reduce) so the trainer never
  overwrites a buffer a receiver is still reading; ``finish`` when a sender ends early, ``abort``.
  Control messages are JSON broadcast from rank 0 on a gloo group (CPU, with timeouts), one
  fixed-size frame each (``send_obj``; the ``hello`` keeps version 1's framing). JSON, not pickle:
  a receiver must not execute what arrives on a socket.
* A version ends with an all-reduce(MIN) of every rank's status: it counts as applied only if
  every receiver accepted every bucket. ``nccl`` receivers take part once every load is queued
  and wait for the loads after it; ``receive()`` returns only with the weights in place.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 5  # 2: one-broadcast message frames (the hello keeps version 1's framing); 3: the start
# (or close) message is the value of the store key receivers idle on, not a control-group message;
# 4: a version ends when the start message's tensor count has arrived (no 'finish' round trip);
# 5: nccl/gloo buckets follow a plan sent in the start message, tagged by a trailer, no per-bucket messages
ALIGN = 64  # byte alignment of tensors in a bucket: any dtype view of a slice is legal
TRAILER = 8  # bytes after a bucket's data on the wire (nccl/gloo): the start number it was filled for

_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
                 "bool", "float8_e4m3fn", "float8_e5m2")
    if hasattr(torch, name)
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype '{name}' in a weight bucket") from None


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives in a bucket's flat buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_wire(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]

    @classmethod
    def from_wire(cls, item: list) -> "TensorMeta":
        name, dtype, shape, offset, nbytes = item
        return cls(name, dtype, tuple(shape), int(offset), int(nbytes))


def wire_nbytes(nbytes: int) -> int:
    """Bytes a bucket of ``nbytes`` of tensors occupies on the wire: data, padding, trailer."""
    return align(nbytes) + TRAILER


def tag_bucket(buffer: torch.Tensor, nbytes: int, tag: int) -> None:
    """Write the trailer: the start number the bucket was filled for (0: not filled, do not load)."""
    buffer[align(nbytes):align(nbytes) + TRAILER].view(torch.int64).fill_(tag)


def read_tag(buffer: torch.Tensor, nbytes: int) -> int:
    return int(buffer[align(nbytes):align(nbytes) + TRAILER].view(torch.int64).item())


def plan_to_wire(buckets: Iterable[tuple[int, list["TensorMeta"]]]) -> list:
    return [[nbytes, [m.to_wire() for m in metas]] for nbytes, metas in buckets]


def plan_from_wire(wire: list) -> list[tuple[int, list["TensorMeta"]]]:
    return [(int(nbytes), [TensorMeta.from_wire(t) for t in tensors]) for nbytes, tensors in wire]


def packed_view(buffer: torch.Tensor, meta: TensorMeta, typed: dict) -> torch.Tensor:
    """The tensor ``meta`` places in the uint8 ``buffer``, as a view. One ``as_strided`` on a view
    of the whole buffer per dtype (cached in ``typed``, one dict per buffer) instead of a slice and
    two views: a third of the host time, paid per tensor on both ends of every export (219 tensors
    for a ~1B Llama). Offsets are ALIGN-aligned, so every dtype view of the buffer lines up."""
    dtype = dtype_from_name(meta.dtype)
    flat = typed.get(dtype)
    if flat is None:
        flat = typed[dtype] = buffer[:buffer.numel() // dtype.itemsize * dtype.itemsize].view(dtype)
    numel = 1
    for d in meta.shape:
        numel *= d
    if numel * dtype.itemsize != meta.nbytes or meta.offset + meta.nbytes > buffer.numel() or meta.offset % ALIGN:
        raise ValueError(f"{meta.name}: {meta.shape} {meta.dtype} at byte {meta.offset} ({meta.nbytes} bytes) does "
                         f"not fit a {buffer.numel()}-byte bucket")
    strides, stride = [], 1
    for d in reversed(meta.shape):
        strides.append(stride)
        stride *= d
    return flat.as_strided(meta.shape, strides[::-1], flat.storage_offset() + meta.offset // dtype.itemsize)


def unpack(buffer: torch.Tensor, metas: Iterable[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of the tensors packed in ``buffer`` (no copy): what ``load_weights`` receives."""
    typed: dict = {}
    for m in metas:
        yield m.name, packed_view(buffer, m, typed)


# --------------------------------------------------------------------------- control channel


def _bcast(pg, tensor: torch.Tensor, async_op: bool = False):
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    work = pg.broadcast([tensor], opts)
    if async_op:
        return work, tensor  # the tensor must outlive the work
    work.wait()


# A control message is one broadcast of a fixed-size frame: 8 bytes of length, then the JSON; a
# message longer than the frame sends its tail in a second broadcast. A gloo broadcast returns on
# the root only once every receiver took it, a round trip: the sender posts bucket messages
# without waiting (``async_op``) and collects them later, so its host never waits for the
# receivers' host per bucket. 16 KiB holds a bucket of ~150 tensors and costs the same time as
# 8 bytes on loopback.
_FRAME = 16384


def send_obj(pg, obj: dict, async_op: bool = False) -> list | None:
    """Rank 0: broadcast a JSON message on the (gloo) control group. With ``async_op``, returns
    the pending (work, tensor) pairs; the caller waits on them (in order) later."""
    data = json.dumps(obj).encode()
    frame = bytearray(_FRAME)
    frame[:8] = len(data).to_bytes(8, "little")
    head = data[:_FRAME - 8]
    frame[8:8 + len(head)] = head
    pending = [_bcast(pg, torch.frombuffer(frame, dtype=torch.uint8), async_op)]
    if len(data) > _FRAME - 8:
        pending.append(_bcast(pg, torch.frombuffer(bytearray(data[_FRAME - 8:]), dtype=torch.uint8), async_op))
    return pending if async_op else None


def post_recv_obj(pg) -> tuple:
    """Post the receive of a control message's frame now; ``take_obj`` waits for it."""
    return _bcast(pg, torch.empty(_FRAME, dtype=torch.uint8), async_op=True)


def take_obj(posted: tuple, pg=None) -> dict:
    """Wait for a posted control message. A message longer than one frame has its tail in a
    second broadcast, received here on ``pg`` (without it such a message is a protocol error)."""
    work, frame = posted
    work.wait()
    raw = frame.numpy().tobytes()
    n = int.from_bytes(raw[:8], "little")
    data = raw[8:8 + min(n, _FRAME - 8)]
    if n > _FRAME - 8:
        if pg is None:
            raise RuntimeError(f"protocol error: a {n}-byte message where one frame was expected")
        tail = torch.empty(n - (_FRAME - 8), dtype=torch.uint8)
        _bcast(pg, tail)
        data += tail.numpy().tobytes()
    return json.loads(data)


def recv_obj(pg) -> dict:
    return take_obj(post_recv_obj(pg), pg)


def send_hello(pg, obj: dict) -> None:
    """The connection's first message, in version 1's framing (length, then body) whatever the
    version, so that a trainer and a receiver of different versions read each other's hello
    and fail with a clear protocol mismatch instead of a broadcast size error."""
    data = json.dumps(obj).encode()
    _bcast(pg, torch.tensor([len(data)], dtype=torch.int64))
    _bcast(pg, torch.frombuffer(bytearray(data), dtype=torch.uint8))


def recv_hello(pg) -> dict:
    n = torch.zeros(1, dtype=torch.int64)
    _bcast(pg, n)
    data = torch.empty(int(n.item()), dtype=torch.uint8)
    _bcast(pg, data)
    return json.loads(bytes(data.numpy()))


def agree(pg, ok: bool) -> bool:
    """All-reduce(MIN) of every rank's status on the control group: True only if all are ok."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MIN
    pg.allreduce([flag], opts).wait()
    return bool(flag.item())


@contextlib.contextmanager
def _nccl_errors_do_not_kill_the_process():
    """ProcessGroupNCCL reads TORCH_NCCL_ASYNC_ERROR_HANDLING when it is constructed; the default (3)
    tears the whole process down when a collective times out. A transfer group whose peer died
    must instead fail its work (mode 2: abort the communicator only), so the trainer or engine
    survives and reconnects. The variable is restored right after construction."""
    old = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
        else:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = old


def make_groups(store, prefix: str, rank: int, world_size: int, backend: str, timeout: timedelta):
    """(control gloo group, data group) for one generation, built directly on the store: never the
    process's default group, which belongs to the trainer (or the engine)."""
    ctl = dist.ProcessGroupGloo(dist.PrefixStore(prefix + "ctl/", store), rank, world_size, timeout)
    if backend == "gloo":
        return ctl, ctl
    if backend == "nccl":
        nccl = getattr(dist, "ProcessGroupNCCL", None)
        if nccl is None:
            raise RuntimeError("rollout transport 'nccl' needs a CUDA build of torch")
        opts = nccl.Options()
        opts._timeout = timeout
        with _nccl_errors_do_not_kill_the_process():
            data = nccl(dist.PrefixStore(prefix + "data/", store), rank, world_size, opts)
        return ctl, data
    if backend == "ipc":
        return ctl, None  # data moves through CUDA IPC handles sent on the control group
    raise ValueError(f"unknown transport backend '{backend}'")


def shutdown_group(pg) -> None:
    """Release a transfer group. NCCL communicators are aborted (a peer may be gone, and an
    abort never waits for it); gloo groups just lose their last reference: their abort waits
    for in-flight work up to the timeout, which is exactly what a dead peer turns into a stall."""
    if pg is not None and pg.name().lower() == "nccl":
        with contextlib.suppress(Exception):
            pg.abort()


# --------------------------------------------------------------------------- CUDA IPC handles


def ipc_handle(buffer: torch.Tensor) -> dict:
    """A JSON-able CUDA IPC handle of ``buffer`` (``reduce_tensor``'s fields, bytes in base64).

    Each call takes one reference on the producer's IPC ref-counter; the consumer releases it in
    ``open_ipc_handle``. The device is also named by UUID because the consumer may see the GPU
    under another index (CUDA_VISIBLE_DEVICES differs between trainer and engine processes)."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(buffer)
    (_, size, stride, offset, _, dtype, device, handle, storage_bytes, storage_offset,
     _, ref_handle, ref_offset, event_handle, event_sync) = args
    b64 = lambda b: None if b is None else base64.b64encode(b).decode()  # noqa: E731
    return {
        "size": list(size), "stride": list(stride), "offset": offset, "dtype": dtype_name(dtype),
        "device": device, "uuid": str(torch.cuda.get_device_properties(device).uuid),
        "handle": b64(handle), "storage_bytes": storage_bytes, "storage_offset": storage_offset,
        "ref_handle": b64(ref_handle), "ref_offset": ref_offset,
        "event_handle": b64(event_handle), "event_sync": event_sync,
    }


def open_ipc_handle(h: dict) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = h["device"]
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == h["uuid"]:
            device = i
            break
    d = lambda s: None if s is None else base64.b64decode(s)  # noqa: E731
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(h["size"]), tuple(h["stride"]), h["offset"], torch.storage.TypedStorage,
        dtype_from_name(h["dtype"]), device, d(h["handle"]), h["storage_bytes"], h["storage_offset"],
        False, d(h["ref_handle"]), h["ref_offset"], d(h["event_handle"]), h["event_sync"],
    )


# --------------------------------------------------------------------------- generation requests (RL)
# The trainer asks the engine for completions of the version it just exported: it numbers its
# requests with a counter on the engine's store and writes request n as JSON under its key; the
# engine serves them in order and writes the reply under the reply key. The counter lives in the
# engine's store, so a restarted trainer continues the numbering.

RL_COUNTER = "flare/rl/requests"


def rl_request_key(n: int) -> str:
    return f"flare/rl/request{n}"


def rl_reply_key(n: int) -> str:
    return f"flare/rl/reply{n}"
