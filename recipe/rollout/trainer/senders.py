"""flare's senders: how the sending trainer rank moves buckets to the engine (runs in the trainer).

All share one small interface, used only on the sending rank (global rank 0):

    init()                 connect (idempotent; after a failure the hook calls close() and the
                           next init() starts a fresh connection)
    start(version, buckets) the version's bucket plan (index, nbytes, metas of each bucket)
    buffer(nbytes)         a flat uint8 buffer to pack the next bucket into
    send(bucket)
    finish(version)        raises unless every receiver applied the whole version
    close()

``gloo``, ``nccl`` and ``ipc`` speak flare's protocol (``recipe/rollout/protocol.py``) to flare receivers
(the reference receiver or vLLM workers running ``FlareWorkerExtension``): rendezvous on the
receivers' TCPStore and groups of their own, never the trainer's default group. ``vllm``
(``vllm_native.py``) drives vLLM's native weight-transfer API instead.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from recipe.rollout.trainer.source import Bucket
from recipe.rollout.protocol import (
    PROTOCOL_VERSION,
    agree,
    ipc_handle,
    make_groups,
    plan_to_wire,
    send_hello,
    send_obj,
    shutdown_group,
    tag_bucket,
    wire_nbytes,
)

logger = logging.getLogger(__name__)

class TransportError(RuntimeError):
    """The transfer failed (receiver gone, timeout, rejected version); training continues."""


class Transport:
    name = "base"

    def __init__(self, cfg):
        self.cfg = cfg
        self.timeout = timedelta(seconds=cfg.timeout_s)

    def init(self) -> None:
        raise NotImplementedError

    def start(self, version: int, buckets: list) -> None:
        raise NotImplementedError

    def buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def send(self, bucket: Bucket) -> None:
        raise NotImplementedError

    def finish(self, version: int) -> None:
        raise NotImplementedError

    def close(self, notify: bool = False) -> None:
        """Drop the connection; with ``notify``, tell the receivers training has ended."""


def engine_wait_s(cfg) -> float:
    """How long a connection waits for an engine still starting: rollout.timeout_s where a failed
    export stops the run (on_failure = "raise"), else nothing (fail at once, retry next interval)."""
    return cfg.timeout_s if cfg.on_failure == "raise" else 0.0


def probe_engine(address: str, port: int, wait_s: float = 0.0) -> None:
    """Fail at once when nothing listens (a TCPStore client would retry until the timeout).

    With ``wait_s`` > 0, poll that long for an engine still starting: a run that stops on a failed
    export (rollout.on_failure = "raise", RL) would otherwise fail when launched next to the engine."""
    deadline = time.monotonic() + wait_s
    logged = False
    while True:
        try:
            with socket.create_connection((address, port), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait_s:.0f}s" if wait_s > 0 else ""
                raise TransportError(f"no rollout receiver listening on {address}:{port}{waited} ({e})") from None
            if not logged:
                logger.info(f"rollout: waiting up to {wait_s:.0f}s for the engine at {address}:{port}")
                logged = True
            time.sleep(0.2)


class GroupTransport(Transport):
    """flare's protocol over groups built on the receivers' store; gloo moves data itself.

    ``nccl`` and ``gloo`` send no control message per bucket (protocol 5): the start message
    carries the bucket plan, each bucket ends in a trailer with the start number, and one ``end``
    (or ``abort``) message follows the last bucket. ``ipc`` overrides the per-bucket part."""

    name = "gloo"
    backend = "gloo"
    # Control messages posted but not yet taken by every receiver (ipc posts one per bucket). Two
    # match the two data buffers in rotation: the sender runs at most one bucket ahead of the
    # receivers' host, and a receiver that died is noticed within two buckets.
    max_pending_ctl = 2

    def __init__(self, cfg):
        super().__init__(cfg)
        self.world_size = 1 + cfg.engine_world_size
        self.store = self.ctl = self.data = None
        self.n_started = 0
        self.host_buffer: torch.Tensor | None = None
        self.pending_ctl: collections.deque = collections.deque()
        self.buckets: list = []  # this version's plan (BucketPlan-like: index, nbytes, metas)
        self.n_buckets_sent = 0
        self.in_version = False  # receivers were told to expect self.buckets
        self.broken = False  # a transfer op failed: the groups are not used again
        self._plan_cache: tuple | None = None  # (plan object, its id, its wire form)
        self.plan_sent: str | None = None  # id of the plan this connection's receivers hold

    def init(self) -> None:
        if self.ctl is not None:
            return
        cfg = self.cfg
        probe_engine(cfg.engine_address, cfg.engine_port, engine_wait_s(cfg))
        t0 = time.perf_counter()
        try:
            self.store = dist.TCPStore(cfg.engine_address, cfg.engine_port, is_master=False, timeout=self.timeout,
                                       wait_for_workers=False)
            if self.store.check(["flare/world_size"]):
                theirs = int(self.store.get("flare/world_size"))
                if theirs != self.world_size:
                    raise TransportError(f"the engine has {theirs - 1} receiving rank(s), rollout.engine_world_size "
                                         f"is {self.world_size - 1}")
            gen = int(self.store.add("flare/gen", 1))
            self.prefix = f"flare/g{gen}/"
            # Blocks until every receiver rank has joined, at most the group timeout.
            self.ctl, self.data = make_groups(self.store, self.prefix, 0, self.world_size, self.backend, self.timeout)
            send_hello(self.ctl, {"op": "hello", "protocol": PROTOCOL_VERSION, "backend": self.backend})
        except Exception as e:
            self.close()
            raise TransportError(f"rendezvous with {self.world_size - 1} receiver rank(s) on "
                                 f"{cfg.engine_address}:{cfg.engine_port} failed: {e}") from e
        self.n_started, self.plan_sent, self.broken = 0, None, False
        logger.info(f"rollout: connected to {self.world_size - 1} receiver rank(s) over {self.name} "
                    f"(generation {gen}, {time.perf_counter() - t0:.1f}s)")

    def _post(self, msg: dict) -> None:
        """Send a control message without waiting for the receivers to take it (see max_pending_ctl)."""
        self.pending_ctl.append(send_obj(self.ctl, msg, async_op=True))
        while len(self.pending_ctl) > self.max_pending_ctl:
            self._wait_ctl(self.pending_ctl.popleft())

    def _drain_ctl(self) -> None:
        while self.pending_ctl:
            self._wait_ctl(self.pending_ctl.popleft())

    @staticmethod
    def _wait_ctl(pending: list) -> None:
        for work, _tensor in pending:
            work.wait()  # bounded by the group's timeout; raises if a receiver is gone

    def _plan_fields(self, buckets: list) -> dict:
        """The start message's plan: in full the first time this connection sees it, else its id."""
        if self._plan_cache is None or self._plan_cache[0] is not buckets:  # the hook passes one list
            wire = plan_to_wire((b.nbytes, b.metas) for b in buckets)
            plan_id = hashlib.sha1(json.dumps(wire).encode()).hexdigest()[:16]
            self._plan_cache = (buckets, plan_id, wire)
        _, plan_id, wire = self._plan_cache
        if plan_id == self.plan_sent:
            return {"plan_id": plan_id}
        self.plan_sent = plan_id
        return {"plan_id": plan_id, "plan": wire}

    def start(self, version: int, buckets: list) -> None:
        self.n_started += 1
        self.buckets, self.n_buckets_sent = buckets, 0
        # Receivers idle on this key between versions, not in a collective (no timeout while
        # training); its value is the start message, so one store write wakes them and tells them
        # the version and its buckets. The first bucket is gathered while they wake up. "t":
        # receivers report start() → start seen as stats["start_delay"].
        msg = {"op": "start", "version": version, "n_tensors": sum(len(b.metas) for b in buckets),
               "t": time.time(), **self._plan_fields(buckets)}
        self.store.set(f"{self.prefix}start{self.n_started}", json.dumps(msg))
        self.in_version = True

    def buffer(self, nbytes: int) -> torch.Tensor:
        # gloo's broadcast is synchronous (send() returns once every receiver has the bytes), so
        # one host buffer serves the whole export; a fresh one per bucket page-faulted on every fill.
        if self.host_buffer is None or self.host_buffer.numel() < wire_nbytes(nbytes):
            self.host_buffer = None
            self.host_buffer = torch.empty(wire_nbytes(nbytes), dtype=torch.uint8)
        return self.host_buffer

    def send(self, bucket: Bucket) -> None:
        if (bucket.index != self.n_buckets_sent or bucket.index >= len(self.buckets)
                or bucket.nbytes != self.buckets[bucket.index].nbytes):
            raise TransportError(f"bucket {bucket.index} ({bucket.nbytes} bytes) sent out of plan: expected bucket "
                                 f"{self.n_buckets_sent}")
        self._send_tagged(bucket, self.n_started)

    def _send_tagged(self, bucket: Bucket, tag: int) -> None:
        tag_bucket(bucket.buffer, bucket.nbytes, tag)
        try:
            self._send_data(bucket)
        except Exception:
            self.broken = True
            raise
        self.n_buckets_sent += 1

    def _send_data(self, bucket: Bucket) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.data.broadcast([bucket.buffer[:wire_nbytes(bucket.nbytes)]], opts).wait()

    def _send_unfilled(self) -> None:
        """The planned buckets not sent yet, tagged 0: receivers posted their receives from the
        plan, so they must get every bucket; the tag tells them not to load it."""
        for plan in self.buckets[self.n_buckets_sent:]:
            self._send_tagged(Bucket(plan.index, plan.metas, self.buffer(plan.nbytes), plan.nbytes), 0)

    def _end(self, msg: dict, ok: bool) -> bool:
        """Complete the version's buckets, send ``msg`` (end/abort) and agree on the outcome."""
        self.in_version = False
        try:
            self._send_unfilled()  # receivers posted every planned receive
            self._post(msg)
            ok = agree(self.ctl, ok)
            self._drain_ctl()
            return ok
        except Exception:
            self.broken = True
            raise
        finally:
            self.host_buffer = None  # not held between exports

    def finish(self, version: int) -> None:
        # "end" tells the receivers every bucket was filled (nccl receivers then stop checking
        # trailers); a version ended early is aborted instead: its weights are incomplete.
        complete = self.n_buckets_sent == len(self.buckets)
        msg = {"op": "end"} if complete else {"op": "abort", "reason": "the trainer ended the version early"}
        if not self._end(msg, complete):
            raise TransportError(f"a receiver rejected version {version} (see the receiver's log)")

    def abort(self, reason: str) -> None:
        """Drop the partial version: receivers get the rest of the plan unfilled (gloo receivers
        load none of it; nccl ones may have queued loads of it) and reject the version with us.
        Skipped when the groups are broken (close() follows)."""
        if self.ctl is not None and self.in_version and not self.broken:
            try:
                self._end({"op": "abort", "reason": reason[:1000]}, False)
            except Exception:  # noqa: BLE001 - the group is broken; close() follows
                pass
        self.in_version = False

    def close(self, notify: bool = False) -> None:
        if notify and self.ctl is not None:
            try:
                # Receivers idle on the store between versions (a version that did not finish was
                # aborted first): the close takes the place of the next start message.
                self.n_started += 1
                self.store.set(f"{self.prefix}start{self.n_started}", json.dumps({"op": "close"}))
            except Exception:  # noqa: BLE001
                pass
        for pg in {id(p): p for p in (self.ctl, self.data) if p is not None}.values():
            shutdown_group(pg)
        self.ctl = self.data = self.store = None
        self.host_buffer = None
        self.pending_ctl.clear()
        self.in_version = False


class NcclTransport(GroupTransport):
    """Flat GPU buckets broadcast on a dedicated NCCL group, two buffers in rotation: while
    bucket k is being broadcast (NCCL's stream), bucket k+1 is gathered and packed into the other
    buffer (compute stream). A buffer is refilled only after its previous broadcast completed:
    the compute stream waits for that broadcast on the device, so the host never blocks per bucket
    (a host poll with 1 ms sleeps left the link idle between buckets). The host waits, bounded by
    the timeout, once per export in ``finish``; a dead receiver cannot stall a device-side wait
    past the group's own timeout either (the communicator is then aborted, see make_groups)."""

    name = "nccl"
    backend = "nccl"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.slots: list[torch.Tensor | None] = [None, None]
        self.works: list = [None, None]
        self.turn = 0

    def buffer(self, nbytes: int) -> torch.Tensor:
        i = self.turn
        self.turn ^= 1
        work, self.works[i] = self.works[i], None
        if work is not None:
            work.wait()  # device-side: the fill into slot i is queued after its previous broadcast
        if self.slots[i] is None or self.slots[i].numel() < wire_nbytes(nbytes):
            self.slots[i] = torch.empty(wire_nbytes(nbytes), dtype=torch.uint8, device="cuda")
        return self.slots[i]

    def _wait_host(self, works: list) -> None:
        deadline = time.monotonic() + self.timeout.total_seconds()
        for work in works:
            while not work.is_completed():  # bounded host wait: a dead receiver must not hang us
                if time.monotonic() > deadline:
                    raise TransportError(f"NCCL broadcast did not complete within {self.cfg.timeout_s}s")
                time.sleep(0.00005)
            work.wait()  # raises if the communicator was aborted

    def _send_data(self, bucket: Bucket) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        # Async: ProcessGroupNCCL orders the broadcast after the packing copies on this stream.
        work = self.data.broadcast([bucket.buffer[:wire_nbytes(bucket.nbytes)]], opts)
        slot = next(i for i, s in enumerate(self.slots) if s is not None and s.data_ptr() == bucket.buffer.data_ptr())
        self.works[slot] = work

    def _end(self, msg: dict, ok: bool) -> bool:
        # The receivers ack once every load is queued (often before the last bytes are in), so the
        # export ends when our own broadcasts complete: one bounded host poll, after the agree.
        # After a failure nothing waits for them: close() aborts the communicator.
        try:
            ok = super()._end(msg, ok)
            works = [w for w in self.works if w is not None]
            self._wait_host(works)
            return ok
        finally:
            self.slots, self.works = [None, None], [None, None]  # back to the allocator for training

    def close(self, notify: bool = False) -> None:
        super().close(notify)
        self.slots, self.works = [None, None], [None, None]


class IpcTransport(GroupTransport):
    """Colocated engine: buckets stay in the trainer's GPU memory and receivers map them through
    CUDA IPC handles, one control message per bucket. Each bucket is acknowledged after the
    receivers copied it; a buffer is refilled only after the ack of the bucket that used it (two
    buffers in rotation, so the receivers load bucket k while the trainer gathers bucket k+1)."""

    name = "ipc"
    backend = "ipc"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.slots: list[torch.Tensor | None] = [None, None]
        self.turn = 0
        self.unacked = False
        # Tensors announced in the start message and sent since: receivers end the version on
        # their own once the count is reached (protocol 4), and then wait in the final agree.
        self.n_announced = self.n_sent = 0

    def _plan_fields(self, buckets: list) -> dict:
        return {}  # each bucket's message carries its tensors

    def start(self, version: int, buckets: list) -> None:
        super().start(version, buckets)
        self.n_announced, self.n_sent = sum(len(b.metas) for b in buckets), 0

    def buffer(self, nbytes: int) -> torch.Tensor:
        i = self.turn
        self.turn ^= 1
        # Slot i was last used by bucket k-2, acknowledged before bucket k-1 was sent.
        if self.slots[i] is None or self.slots[i].numel() < nbytes:
            self.slots[i] = None
            torch.cuda.ipc_collect()  # a replaced buffer may still be mapped by a receiver
            self.slots[i] = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        return self.slots[i]

    def _collect_ack(self) -> None:
        if self.unacked:
            self.unacked = False
            if not agree(self.ctl, True):
                raise TransportError("a receiver failed to load a bucket (see the receiver's log)")

    def send(self, bucket: Bucket) -> None:
        torch.cuda.current_stream().synchronize()  # packed bytes visible to the other process
        self._collect_ack()  # receivers are done with bucket k-1: its buffer may be refilled next
        self._post({"op": "bucket", "index": bucket.index, "nbytes": bucket.nbytes,
                    "tensors": [m.to_wire() for m in bucket.metas], "ipc": ipc_handle(bucket.buffer)})
        self.unacked = True
        self.n_sent += len(bucket.metas)

    @property
    def receivers_in_final_agree(self) -> bool:
        return self.n_started > 0 and self.n_sent == self.n_announced

    def finish(self, version: int) -> None:
        self.in_version = False
        try:
            self._collect_ack()
            self._drain_ctl()
            if not self.receivers_in_final_agree:  # ended early: receivers wait for more buckets
                send_obj(self.ctl, {"op": "finish", "version": version})
            if not agree(self.ctl, True):
                raise TransportError(f"a receiver rejected version {version} (see the receiver's log)")
        finally:
            self._release()

    def abort(self, reason: str) -> None:
        if self.ctl is not None:
            try:
                if self.receivers_in_final_agree:  # every bucket went out: reject in the final agree
                    self._collect_ack()  # the last bucket's ack comes before the final agree
                    self._drain_ctl()
                    agree(self.ctl, False)
                else:
                    send_obj(self.ctl, {"op": "abort", "reason": reason[:1000]})
            except Exception:  # noqa: BLE001 - the group is broken; close() follows
                pass
        self.in_version = False

    def _release(self) -> None:
        self.slots = [None, None]
        torch.cuda.ipc_collect()  # free buffers whose last receiver mapping is now closed

    def close(self, notify: bool = False) -> None:
        super().close(notify)
        self.unacked = False
        if torch.cuda.is_available():
            self._release()


TRANSPORTS = {"gloo": GroupTransport, "nccl": NcclTransport, "ipc": IpcTransport}


def build_transport(cfg) -> Transport:
    if cfg.transport == "vllm":
        from recipe.rollout.trainer.vllm_native import VLLMTransport

        return VLLMTransport(cfg)
    try:
        return TRANSPORTS[cfg.transport](cfg)
    except KeyError:
        raise ValueError(f"rollout.transport={cfg.transport!r}: use one of {sorted(TRANSPORTS) + ['vllm']}") from None
