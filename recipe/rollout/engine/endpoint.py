"""The receiving end of flare's weight export: one ``ReceiverEndpoint`` per engine rank.

Runs inside the inference engine (a vLLM worker through ``vllm_extension.py``, or flare's
reference receiver). Imports only torch, the standard library and ``recipe.rollout.protocol``.
The protocol itself is described in ``recipe/rollout/protocol.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from datetime import timedelta
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from recipe.rollout.protocol import (
    PROTOCOL_VERSION,
    TensorMeta,
    _bcast,
    agree,
    make_groups,
    open_ipc_handle,
    plan_from_wire,
    post_recv_obj,
    read_tag,
    recv_hello,
    recv_obj,
    shutdown_group,
    take_obj,
    unpack,
    wire_nbytes,
)

logger = logging.getLogger(__name__)
_POLL_S = 0.05  # how often an idle receiver re-checks the store while its watcher thread waits


class TransferAborted(RuntimeError):
    """The trainer abandoned the version being received (its weights are partially applied)."""


class TrainerClosed(RuntimeError):
    """The trainer ended the connection (end of training)."""


class _StartSignal(threading.Event):
    """Set by the receiver's watcher thread once the start key exists; ``value`` is the key's value."""

    value: bytes | None = None


class ReceiverEndpoint:
    """One receiving rank: joins trainer connections and applies complete versions.

    ``rank`` is this process's rank in the transfer group (1..world_size-1); rank 1 hosts the
    rendezvous store on (address, port). ``receive()`` blocks until one version has been fully
    applied with ``load_weights`` and returns its number.
    """

    def __init__(self, address: str, port: int, rank: int, world_size: int, *, backend: str = "gloo",
                 timeout_s: float = 600.0, device: torch.device | str | None = None):
        if not 1 <= rank < world_size:
            raise ValueError(f"receiver rank {rank} must be in [1, {world_size}) (rank 0 is the trainer)")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = timedelta(seconds=timeout_s)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if backend in ("nccl", "ipc") else torch.device("cpu"))
        # The store outlives trainer connections; it only listens, so waiting here is cheap.
        self.store = dist.TCPStore(address, port, is_master=rank == 1, timeout=timedelta(days=365),
                                   wait_for_workers=False)
        self._address, self._port = address, port
        self._waiter: tuple[str, threading.Event] | None = None  # see _wait_start
        self._watch: tuple[queue.SimpleQueue, threading.Thread] | None = None  # (keys, thread)
        # Receive buffers, two in rotation (see _receive_bucket), held for one version only.
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._loaded: list = [None, None]  # CUDA event: the last load out of that buffer is done
        self._turn = 0
        self._load_stream = None
        # Host seconds per phase of the last version (scripts/benchmarks/bench_export.py prints them).
        self.stats: dict[str, float] = {}
        if rank == 1:  # lets a trainer configured for another engine size fail with a clear message
            self.store.set("flare/world_size", str(world_size))
        self.gen = 0
        self._ipc_mapped: dict[str, torch.Tensor] = {}
        self.ctl = self.data = None
        self.n_started = 0
        self._plans: dict = {}
        self._arrivals: list = []  # CUDA timing events, one per bucket of the current version
        self._posted: tuple | None = None  # (host time, CUDA event) of bucket 0's post
        self._start_msg: dict = {}
        self._end_msg: dict | None = None  # the trainer's end/abort message, once it has arrived
        self.version: int | None = None  # last completely applied version
        self.dirty = False  # a version was partially applied and not completed

    # ---- connection handling

    def _current_gen(self) -> int:
        return int(self.store.add("flare/gen", 0))

    def _unmap(self) -> None:
        if self._ipc_mapped:
            self._ipc_mapped.clear()
            torch.cuda.ipc_collect()

    def _drop(self) -> None:
        self._unmap()
        self._release_buffers()
        for pg in {id(p): p for p in (self.ctl, self.data) if p is not None}.values():
            shutdown_group(pg)
        self.ctl = self.data = None

    def _join(self, deadline: float | None) -> bool:
        """Wait for a trainer generation newer than the last one seen, then build its groups."""
        while True:
            gen = self._current_gen()
            if gen > self.gen:
                break
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        self.gen, self.n_started = gen, 0
        self._plans = {}  # bucket plans by id, sent once per connection
        prefix = f"flare/g{gen}/"
        try:
            self.ctl, self.data = make_groups(self.store, prefix, self.rank, self.world_size, self.backend,
                                              self.timeout)
            hello = recv_hello(self.ctl)
        except Exception as e:  # noqa: BLE001 - a trainer that vanished during rendezvous
            logger.warning(f"rollout receiver rank {self.rank}: joining generation {gen} failed: {e}")
            self._drop()
            return True
        if hello.get("protocol") != PROTOCOL_VERSION or hello.get("backend") != self.backend:
            logger.error(f"rollout receiver rank {self.rank}: trainer speaks {hello}, this receiver expects "
                         f"protocol {PROTOCOL_VERSION} over {self.backend}; dropping the connection")
            self._drop()
        else:
            logger.info(f"rollout receiver rank {self.rank}: connected to trainer (generation {gen})")
        return True

    def _start_waiter(self, key: str) -> _StartSignal:
        """An event set as soon as ``key`` exists. One daemon thread per endpoint blocks in
        ``TCPStore.wait`` on a client of its own (a client is not thread-safe), one key after the
        other: the server answers the moment the trainer sets the key. Polling ``check`` every
        _POLL_S instead added up to 50 ms (about 25 ms on average, a full 50 ms for back-to-back
        exports) to every export; a wait with a timeout would log two C++ warnings per timeout
        while idle; a thread and a store connection per version cost ~1 ms of set-up each."""
        if self._waiter is not None and self._waiter[0] == key:
            return self._waiter[1]
        self._release_waiter()
        done = _StartSignal()
        if self._watch is None or not self._watch[1].is_alive():
            keys: queue.SimpleQueue = queue.SimpleQueue()

            def watch():
                client = None
                while (item := keys.get()) is not None:
                    wanted, event = item
                    try:
                        if client is None:
                            client = dist.TCPStore(self._address, self._port, is_master=False,
                                                   timeout=timedelta(days=365), wait_for_workers=False)
                        client.wait([wanted])
                        event.value = client.get(wanted)
                    except Exception:  # noqa: BLE001 - store gone: the main loop notices on its own
                        client = None
                    finally:
                        event.set()

            thread = threading.Thread(target=watch, name=f"flare-watch-r{self.rank}", daemon=True)
            thread.start()
            self._watch = (keys, thread)
        self._watch[0].put((key, done))
        self._waiter = (key, done)
        return done

    def _release_waiter(self) -> None:
        """Wake a waiter whose key the trainer will never set (stale generation, closing)."""
        if self._waiter is not None:
            key, done = self._waiter
            self._waiter = None
            if not done.is_set():
                with contextlib.suppress(Exception):
                    self.store.set(key, "released")  # that generation's groups are already dropped

    def _wait_start(self, deadline: float | None) -> dict | None:
        """Idle on the store (not in a collective) until the trainer starts the next version;
        returns its start (or close) message, the key's value. None: deadline, or the trainer
        reconnected (this group is stale)."""
        key = f"flare/g{self.gen}/start{self.n_started + 1}"
        done = self._start_waiter(key)
        while True:
            # The watcher's signal wakes us at once with the value; checking the key every poll
            # period as well covers a watcher stuck on an earlier key or whose store client failed.
            done.wait(_POLL_S)
            raw = done.value
            if raw is None and self.store.check([key]):
                raw = self.store.get(key)
            if raw is not None:
                break
            if self._current_gen() > self.gen:  # the trainer reconnected: this group is stale
                self._drop()
                self._release_waiter()
                return None
            # The watcher ended without a value (its store client failed): poll. Not merely
            # is_set(): the watcher may have fetched the key since the check above (it stores the
            # value before it sets the event), and sleeping then cost a whole poll period.
            if done.is_set() and done.value is None:
                time.sleep(_POLL_S)
            if deadline is not None and time.monotonic() > deadline:
                return None  # the waiter stays: the next receive() waits on the same key
        self._waiter = None
        self.n_started += 1
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = None
        if not isinstance(msg, dict) or msg.get("op") not in ("start", "close"):
            raise RuntimeError(f"protocol error: start key {key} holds {bytes(raw)[:80]!r}")
        return msg

    # ---- receiving

    def receive(self, load_weights: Callable[[Iterable[tuple[str, torch.Tensor]]], object], *,
                start: Callable[[int], None] | None = None, finish: Callable[[int], None] | None = None,
                abort: Callable[[int], None] | None = None, wait_s: float | None = None) -> int | None:
        """Apply the next complete version; returns its number (None if ``wait_s`` elapsed first).

        ``start``/``finish`` bracket a version (``finish`` may raise to reject it, e.g. when a
        weight is missing); ``abort`` is called when a version ends incomplete. Failed or aborted
        versions are logged and the endpoint keeps waiting for the next one.
        """
        deadline = None if wait_s is None else time.monotonic() + wait_s
        while True:
            if self.ctl is None:
                if not self._join(deadline):
                    return None
                if self.ctl is None:
                    continue
            try:
                start_msg = self._wait_start(deadline)
            except RuntimeError as e:  # a value this receiver cannot read: drop, wait for a reconnect
                logger.error(f"rollout receiver rank {self.rank}: {e}")
                self._drop()
                continue
            if start_msg is None:
                if self.ctl is not None:
                    return None  # deadline
                continue
            try:
                version = self._receive_version(start_msg, load_weights, start, finish)
            except TrainerClosed:
                logger.info(f"rollout receiver rank {self.rank}: trainer closed the connection")
                self._drop()
                raise
            except TransferAborted as e:
                self.dirty = True
                logger.warning(f"rollout receiver rank {self.rank}: {e}")
                if abort is not None:
                    abort(-1)
                continue
            except Exception as e:  # noqa: BLE001 - a broken group: wait for a new connection
                self.dirty = True
                logger.warning(f"rollout receiver rank {self.rank}: transfer failed ({type(e).__name__}: {e}); "
                               "waiting for the trainer to reconnect")
                self._drop()
                if abort is not None:
                    abort(-1)
                continue
            finally:
                if self.ctl is not None:
                    # Watch for the next start now, not only when the caller comes back.
                    self._start_waiter(f"flare/g{self.gen}/start{self.n_started + 1}")
            if version is not None:
                self.version, self.dirty = version, False
                return version

    def _receive_version(self, msg: dict, load_weights, start, finish) -> int | None:
        if msg["op"] == "close":
            raise TrainerClosed()
        if msg["op"] != "start":
            raise RuntimeError(f"protocol error: expected 'start', got '{msg['op']}'")
        version = int(msg["version"])
        plan = None if self.backend == "ipc" else self._plan(msg)
        self._start_msg = msg
        self.dirty = True
        error = None
        # wait: waiting for the trainer (a control message, or a bucket's bytes); data: posting a
        # bucket's receive (host time: for NCCL only the launch); load: load_weights; finish:
        # final sync + ack
        stats = self.stats = dict.fromkeys(("wait", "data", "load", "finish"), 0.0)
        stats["start_delay"] = time.time() - msg["t"] if "t" in msg else 0.0  # trainer's start() to here
        try:
            if start is not None:
                start(version)
        except Exception as e:  # noqa: BLE001 - report through the final status, stay in step
            error = e
        if plan is None:
            return self._receive_ipc_version(version, int(msg.get("n_tensors", -1)), load_weights, error, finish)
        return self._receive_planned_version(version, plan, load_weights, error, finish)

    def _plan(self, msg: dict) -> list[tuple[int, list[TensorMeta]]]:
        """The bucket plan a start message names; the trainer sends it once per connection."""
        plan_id = msg.get("plan_id")
        if "plan" in msg:
            self._plans = {plan_id: plan_from_wire(msg["plan"])}
        try:
            return self._plans[plan_id]
        except KeyError:
            raise RuntimeError(f"protocol error: the start message names bucket plan {plan_id!r}, "
                               "which this connection never sent") from None

    def _receive_planned_version(self, version: int, plan, load_weights, error, finish) -> int | None:
        """nccl/gloo: post every bucket's receive from the plan, no control message per bucket.

        nccl: each bucket's ``load_weights`` is called once the next bucket's receive is posted,
        on a side stream that waits for its bytes on the device, so the host never waits for a
        bucket and its per-tensor work (one copy launch each) runs ahead of the wire. Waiting for each
        bucket's bytes to check its trailer first left the host idle early on and its loads late:
        the receiver's host, not the wire, then ended the export (~1 ms of ~10 ms for ~1B). The
        trainer's ``end`` message vouches for every bucket instead; a version that ends otherwise
        (abort, or a trainer gone) may have loaded unfilled buckets and is rejected, leaving the
        engine dirty until the next complete version, as any incomplete version does.

        gloo: bucket k is loaded once its bytes are in and its trailer names this version."""
        tag = self.n_started
        self._arrivals, self._end_msg = [], None
        # The end message comes on the gloo control group after the last bucket is queued. With
        # nccl, data travels elsewhere, so its receive is posted now: it usually arrives while
        # buckets are still on the wire, and if the trainer dies mid-version this receive fails at
        # once (closed socket) instead of leaving us in an NCCL wait until the timeout.
        end = post_recv_obj(self.ctl) if self.ctl is not self.data else None
        # Bucket k is loaded after the receive of k+1 is posted: with nccl the wire then never
        # waits for this host's load_weights of k (with gloo, posting is receiving).
        received = None  # posted, not loaded yet
        for index, (nbytes, metas) in enumerate(plan):
            arriving = self._receive_bucket(index, nbytes, metas)
            error = self._load(received, load_weights, error, tag, end)
            received = arriving
        error = self._load(received, load_weights, error, tag, end)
        t0 = time.perf_counter()
        msg = self._end_msg or (take_obj(end) if end is not None else recv_obj(self.ctl))
        self.stats["wait"] += time.perf_counter() - t0
        if msg.get("op") == "abort":
            self._sync_loads()
            self._release_buffers()
            agree(self.ctl, False)
            raise TransferAborted(f"trainer aborted version {version}: {msg.get('reason', '')}")
        if msg.get("op") != "end":
            raise RuntimeError(f"protocol error: expected 'end' after the last bucket, got '{msg.get('op')}'")
        return self._complete(version, error, finish, ack_queued=self.device.type == "cuda")

    def _early_end(self, end) -> dict | None:
        """The trainer's end (or abort) message, if it has arrived (nccl only)."""
        if self._end_msg is None and end is not None and end[0].is_completed():
            self._end_msg = take_obj(end)  # raises if the trainer is gone
        return self._end_msg

    def _receive_ipc_version(self, version: int, n_tensors: int, load_weights, error, finish) -> int | None:
        """ipc: one control message per bucket (its tensors and IPC handle), acknowledged after
        the load. The version is complete once the start message's tensor count has arrived; a
        sender that ends early sends 'finish' (the missing weights then reject the version)."""
        n_seen = 0
        while n_seen != n_tensors:
            t0 = time.perf_counter()
            msg = recv_obj(self.ctl)
            self.stats["wait"] += time.perf_counter() - t0
            op = msg["op"]
            if op == "bucket":
                n_seen += len(msg["tensors"])
                error = self._receive_ipc_bucket(msg, load_weights, error)
            elif op == "finish":
                break
            elif op == "abort":
                self._unmap()
                raise TransferAborted(f"trainer aborted version {version}: {msg.get('reason', '')}")
            else:  # "close" comes as a start key's value (protocol 3), never mid-version
                raise RuntimeError(f"protocol error: unexpected message '{op}'")
        return self._complete(version, error, finish)

    def _sync_loads(self) -> None:
        if self.device.type == "cuda":  # the copies into the weights are done before we ack
            if self._load_stream is not None:
                self._load_stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()

    def _complete(self, version: int, error, finish, ack_queued: bool = False) -> int | None:
        """Wait for the loads, check the version (``finish``), and agree with every rank on it.

        ``ack_queued`` (nccl): agree once every load is queued, then wait for them. The trainer
        needs the verdict, not the copies: its buffers are free once its own broadcasts are done,
        and what runs next on this engine is ordered after the loads on the device. Acking after
        the sync put the last bucket's copies, a host sync and a round trip on the trainer's path
        (~1.4 ms of a 10 ms export for ~1B). ``receive()`` still returns only with the weights in
        place. ipc acks after the sync: the producer frees the buffers we read right after it."""
        t0 = time.perf_counter()
        if ack_queued and self._load_stream is not None:
            # finish, and whatever the caller runs next, see the loads (device-side ordering)
            torch.cuda.current_stream(self.device).wait_stream(self._load_stream)
        else:
            self._sync_loads()
            self._unmap()  # before the ack: the producer frees its buffers right after it
        if error is None and finish is not None:
            try:
                finish(version)
            except Exception as e:  # noqa: BLE001
                error = e
        if error is not None:
            logger.error(f"rollout receiver rank {self.rank}: version {version} rejected: {error}")
        ok = agree(self.ctl, error is None)
        if ack_queued:
            self._sync_loads()
        if len(self._arrivals) > 1:  # device time from the first bucket's bytes to the last's
            self.stats["arrivals"] = self._arrivals[0].elapsed_time(self._arrivals[-1]) / 1e3
        if self._posted is not None and self._arrivals and "t" in self._start_msg:
            # trainer's start() to bucket 0's bytes: host time to its post, then device time
            posted_at, posted = self._posted
            self.stats["first_bucket"] = (posted_at - self._start_msg["t"]
                                          + posted.elapsed_time(self._arrivals[0]) / 1e3)
        self._arrivals, self._posted = [], None
        self._release_buffers()
        if "t" in self._start_msg:  # trainer's start() to the weights in place here
            self.stats["applied"] = time.time() - self._start_msg["t"]
        self.stats["finish"] += time.perf_counter() - t0
        if not ok:
            if error is None:
                logger.warning(f"rollout receiver rank {self.rank}: version {version} failed on another rank")
            return None
        return version

    def _receive_ipc_bucket(self, msg: dict, load_weights, error):
        stats = self.stats
        metas = [TensorMeta.from_wire(t) for t in msg["tensors"]]
        nbytes = int(msg["nbytes"])
        t0 = time.perf_counter()
        mapped = open_ipc_handle(msg["ipc"])
        # Keep the mapping for the rest of the version: the trainer rotates two buffers, and a
        # live mapping makes the next open of the same handle a cache hit instead of a new
        # cudaIpcOpenMemHandle (slow, above all across GPUs).
        self._ipc_mapped[f'{msg["ipc"]["handle"]}@{msg["ipc"]["storage_offset"]}'] = mapped  # torch's cache key
        t1 = time.perf_counter()
        stats["data"] += t1 - t0
        if error is None:
            try:
                load_weights(list(unpack(mapped[:nbytes], metas)))
                torch.cuda.current_stream().synchronize()  # copies done before the producer reuses it
            except Exception as e:  # noqa: BLE001
                error = e
                # The refused ack makes the trainer abort the version: this line is the only
                # record of why, and the traceback points into the engine's loader.
                logger.error(f"rollout receiver rank {self.rank}: load_weights failed: {type(e).__name__}: {e}",
                             exc_info=True)
        agree(self.ctl, error is None)  # the ack that lets the producer refill this buffer
        stats["load"] += time.perf_counter() - t1
        return error

    def _receive_bucket(self, index: int, nbytes: int, metas: list[TensorMeta]) -> tuple:
        """Post the receive of one planned bucket (always, even after an error, to stay in step
        with the sender); returns what ``_load`` needs once the bytes are in."""
        t0 = time.perf_counter()
        slot, buffer = self._buffer(wire_nbytes(nbytes))
        if index == 0 and self.device.type == "cuda":  # times the first bucket (see _complete)
            self._posted = (time.time(), torch.cuda.current_stream(self.device).record_event(
                torch.cuda.Event(enable_timing=True)))
        _bcast(self.data, buffer)  # NCCL: the current stream now waits for the bytes (host returns)
        arrived = None
        if self.device.type == "cuda":
            arrived = torch.cuda.Event(enable_timing=True)  # also times the arrivals (see _complete)
            torch.cuda.current_stream(self.device).record_event(arrived)
            self._arrivals.append(arrived)
        self.stats["data"] += time.perf_counter() - t0
        return index, slot, buffer, nbytes, metas, arrived

    def _load(self, received: tuple | None, load_weights, error, tag: int, end):
        """``load_weights`` on a received bucket (gloo: once its trailer names this version; nccl:
        queued behind its bytes). Skipped after an error in this version: the remaining buckets
        are only received, to stay in step."""
        if received is None or error is not None:
            return error
        index, slot, buffer, nbytes, metas, arrived = received
        t0 = time.perf_counter()
        # gloo: the broadcast returned with the bytes, read the trailer; nccl: nothing to wait
        # for, the loads queue behind the bytes and the end message vouches for them
        sent_for = read_tag(buffer, nbytes) if arrived is None else None
        t1 = time.perf_counter()
        self.stats["wait"] += t1 - t0
        if index == 0 and sent_for is not None and "t" in self._start_msg:  # trainer's start() to bucket 0's bytes
            self.stats["first_bucket"] = time.time() - self._start_msg["t"]
        if self._early_end(end) is not None and self._end_msg.get("op") != "end":
            return RuntimeError(f"the trainer aborted the version before bucket {index}")
        if sent_for is not None and sent_for != tag:
            return RuntimeError(f"bucket {index} arrived unfilled (trailer {sent_for}, expected {tag}): the trainer "
                                "failed mid-version")
        buffer = buffer[:nbytes]
        try:
            if self.device.type == "cuda":
                # Load on a side stream, after this bucket's bytes and nothing later (the current
                # stream waits for the next buckets): copies out of bucket k overlap the broadcast
                # of k+1. The event lets the broadcast into this buffer two buckets
                # later wait for these copies (see _buffer); finish synchronizes this stream.
                self._load_stream.wait_event(arrived)
                with torch.cuda.stream(self._load_stream):
                    try:
                        load_weights(list(unpack(buffer, metas)))
                    finally:  # also after a failure: what was queued still reads the buffer
                        self._loaded[slot] = self._load_stream.record_event()
            else:
                load_weights(list(unpack(buffer, metas)))
        except Exception as e:  # noqa: BLE001
            error = e
        self.stats["load"] += time.perf_counter() - t1
        return error

    def _buffer(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """One of two receive buffers, reused for the whole version. A fresh tensor per bucket
        costs page faults on the host (gloo) on every bucket; on CUDA the rotation lets loads out
        of one buffer run while the next bucket arrives in the other. ``load_weights`` copies out
        of the views it is given (vLLM's contract), so nothing keeps a view past the call."""
        i = self._turn
        self._turn ^= 1
        if self._loaded[i] is not None:  # the broadcast into it waits for the loads out of it
            torch.cuda.current_stream(self.device).wait_event(self._loaded[i])
            self._loaded[i] = None
        if self._bufs[i] is None or self._bufs[i].numel() < nbytes:
            self._bufs[i] = None
            self._bufs[i] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            if self.device.type == "cuda":
                if self._load_stream is None:
                    self._load_stream = torch.cuda.Stream(self.device)
                # Freed (at the end of a version, or after a failure) only once the loads queued
                # on the side stream are done.
                self._bufs[i].record_stream(self._load_stream)
        return i, self._bufs[i][:nbytes]

    def _release_buffers(self) -> None:
        """Back to the allocator between versions (the engine needs the memory for inference)."""
        self._bufs, self._loaded, self._turn = [None, None], [None, None], 0

    def close(self) -> None:
        self._release_waiter()
        if self._watch is not None:
            self._watch[0].put(None)  # the watcher ends after the released key
            self._watch = None
        self._drop()
