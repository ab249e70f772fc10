"""The ``vllm`` transport: vLLM's own weight-transfer API instead of flare's protocol.

Runs in the trainer (sending rank). vLLM's HTTP control routes (``vllm serve`` with
``VLLM_SERVER_DEV_MODE=1 --weight-transfer-config '{"backend": "nccl"}'``) and its NCCL data plane
(``NCCLWeightTransferEngine``'s static trainer helpers). vLLM is imported lazily, only here.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import urllib.request

import torch

from recipe.net import free_port
from recipe.rollout.protocol import unpack
from recipe.rollout.trainer.senders import Transport, TransportError, engine_wait_s, probe_engine
from recipe.rollout.trainer.source import Bucket

# vLLM releases whose weight-transfer API (four-phase control plane + static NCCL trainer helpers)
# this transport is written against; see docs/rollout.md.
VLLM_SUPPORTED = (0, 25), (0, 29)  # [first, last) minor releases


class VLLMHttpClient:
    """vLLM's weight-sync control plane over its HTTP routes (``vllm serve`` with
    ``VLLM_SERVER_DEV_MODE=1 --weight-transfer-config '{"backend": "nccl"}'``)."""

    def __init__(self, address: str, port: int, timeout_s: float, wait_s: float = 0.0):
        self.address, self.port, self.wait_s = address, port, wait_s
        self.base_url, self.timeout_s = f"http://{address}:{port}", timeout_s

    def _call(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base_url}/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
            text = resp.read().decode()
        return json.loads(text) if text else None

    def get_world_size(self) -> int:
        probe_engine(self.address, self.port, self.wait_s)  # the first call of a connection
        return int(self._call("GET", "get_world_size")["world_size"])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._call("POST", "init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._call("POST", "start_weight_update", {"is_checkpoint_format": True})

    def update_weights(self, update_info: dict, timeout_s: float) -> None:
        self._call("POST", "update_weights", {"update_info": update_info}, timeout_s=timeout_s)

    def finish_weight_update(self) -> None:
        self._call("POST", "finish_weight_update", {})

    def reset_prefix_cache(self) -> None:
        self._call("POST", "reset_prefix_cache")


def check_vllm_version(version: str) -> None:
    """One line naming the installed vLLM when its weight-transfer API is not the one targeted."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return  # a source build with an unusual version string: try it
    first, last = VLLM_SUPPORTED
    if not first <= major_minor < last:
        raise TransportError(f"rollout.transport='vllm' targets vLLM {first[0]}.{first[1]} to {last[0]}.{last[1] - 1} "
                             f"(static NCCLWeightTransferEngine trainer helpers); vLLM {version} is installed: use "
                             "transport nccl with flare's worker extension, or a vLLM in that range")


def _import_vllm_nccl():
    try:
        import vllm
        from vllm.distributed.weight_transfer.nccl_engine import (
            NCCLTrainerSendWeightsArgs,
            NCCLWeightTransferEngine,
        )
    except ImportError as e:
        raise TransportError(f"rollout.transport='vllm' needs vLLM installed in the trainer's environment ({e})") \
            from None
    check_vllm_version(getattr(vllm, "__version__", ""))
    if not hasattr(NCCLWeightTransferEngine, "trainer_send_weights"):
        raise TransportError(f"vLLM {vllm.__version__} has no NCCLWeightTransferEngine.trainer_send_weights; "
                             "see docs/rollout.md for the vLLM versions flare targets")
    return NCCLWeightTransferEngine, NCCLTrainerSendWeightsArgs


def _local_ip_towards(address: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))  # no packet is sent: this only picks the outgoing interface
        return s.getsockname()[0]


class VLLMTransport(Transport):
    """vLLM's own weight-transfer engine: HTTP control plane (init/start/update/finish), NCCL data
    plane with vLLM's packed producer. vLLM packs tensors itself, so buckets are unpacked into
    (name, tensor) views and fed to its producer thread through a bounded queue."""

    name = "vllm"

    def __init__(self, cfg, client=None):
        super().__init__(cfg)
        self.client = client or VLLMHttpClient(
            cfg.engine_address, cfg.engine_port, cfg.timeout_s, engine_wait_s(cfg))
        self.group = None
        self.bucket_bytes = max(int(cfg.bucket_mb * 2**20), 1)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"

    def init(self) -> None:
        if self.group is not None:
            return
        engine, _ = _import_vllm_nccl()
        cfg = self.cfg
        world = self.client.get_world_size() + 1
        if world - 1 != cfg.engine_world_size:
            raise TransportError(f"vLLM reports {world - 1} workers, rollout.engine_world_size is "
                                 f"{cfg.engine_world_size}")
        info = {"master_address": _local_ip_towards(cfg.engine_address), "master_port": free_port(""),
                "world_size": world}
        # The engine joins from inside the HTTP call while the trainer joins here: run both at once.
        errors: list[BaseException] = []
        call = threading.Thread(target=self._guard(errors, self.client.init_weight_transfer_engine),
                                args=({**info, "rank_offset": 1},), daemon=True)
        call.start()
        self.group = engine.trainer_init(info)
        call.join(cfg.timeout_s)
        if call.is_alive() or errors:
            self.group = None
            raise TransportError(f"vLLM init_weight_transfer_engine failed: {errors or 'timeout'}")

    @staticmethod
    def _guard(errors, fn):
        def run(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                errors.append(e)
        return run

    def start(self, version: int, buckets: list) -> None:
        engine, args_cls = _import_vllm_nccl()
        manifest = [m for b in buckets for m in b.metas]
        self.client.start_weight_update()
        update = {"names": [m.name for m in manifest], "dtype_names": [m.dtype for m in manifest],
                  "shapes": [list(m.shape) for m in manifest], "packed": True,
                  "packed_buffer_size_bytes": self.bucket_bytes, "packed_num_buffers": 2}
        self.errors: list[BaseException] = []
        self.update_call = threading.Thread(
            target=self._guard(self.errors, self.client.update_weights), args=(update, self.cfg.timeout_s), daemon=True)
        self.update_call.start()
        self.queue: queue.Queue = queue.Queue(maxsize=1)  # back-pressure: one bucket ahead at most

        def tensors():
            while (item := self.queue.get()) is not None:
                yield from item

        def produce():
            if torch.cuda.is_available():
                torch.cuda.set_device(self.device)
            engine.trainer_send_weights(tensors(), args_cls(group=self.group, packed=True,
                                                            packed_buffer_size_bytes=self.bucket_bytes,
                                                            packed_num_buffers=2))

        self.producer = threading.Thread(target=self._guard(self.errors, produce), daemon=True)
        self.producer.start()

    def buffer(self, nbytes: int) -> torch.Tensor:
        # A fresh buffer per bucket: vLLM's producer may still read the previous one.
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def send(self, bucket: Bucket) -> None:
        if self.errors:
            raise TransportError(f"vLLM transfer failed: {self.errors[0]}")
        try:
            self.queue.put(list(unpack(bucket.buffer, bucket.metas)), timeout=self.cfg.timeout_s)
        except queue.Full:
            raise TransportError(f"vLLM producer made no progress in {self.cfg.timeout_s}s") from None

    def finish(self, version: int) -> None:
        self.queue.put(None, timeout=self.cfg.timeout_s)
        for thread in (self.producer, self.update_call):
            thread.join(self.cfg.timeout_s)
            if thread.is_alive():
                raise TransportError(f"vLLM weight update did not complete within {self.cfg.timeout_s}s")
        if self.errors:
            raise TransportError(f"vLLM transfer failed: {self.errors[0]}")
        self.client.finish_weight_update()
        self.client.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def close(self, notify: bool = False) -> None:
        q = getattr(self, "queue", None)
        if q is not None:
            try:
                q.put_nowait(None)  # let a producer blocked on an abandoned update return
            except queue.Full:
                pass
        # vLLM's communicator is released with its last reference; the engine side of an
        # abandoned update ends on its own timeout, and the next init() starts a new group.
        self.group = None
