"""flare's receiver inside vLLM: a ``worker_extension_cls`` whose methods the driver calls on every
worker with ``llm.collective_rpc(name, args=...)``.

Runs in the inference engine. Imports only torch, the standard library and flare's engine-side
modules (``recipe.rollout.protocol``, ``recipe.rollout.engine.endpoint``), so a vLLM environment
needs the flare checkout on ``PYTHONPATH`` but none of flare's training dependencies; vLLM itself
is imported lazily. Tested with vLLM 0.26.0 (offline ``LLM``, V1 engine with its V2 GPU model
runner); it relies only on ``self.model_runner.model.load_weights``, ``self.rank``,
``self.device`` and ``self.vllm_config.parallel_config`` of vLLM's GPU worker.

The driver's loop (the engine ends it when the trainer ends training)::

    llm = LLM(model=..., worker_extension_cls="recipe.rollout.engine.vllm_extension.FlareWorkerExtension")
    llm.collective_rpc("flare_connect", args=("10.0.0.7", 29650, "nccl", 60.0))
    while True:
        got = llm.collective_rpc("flare_receive")[0]      # blocks until a version or the end
        if got["status"] == "closed":                     # the trainer finished training
            break
        llm.reset_prefix_cache()                          # cached KV blocks came from old weights
        ...generate with policy version got["version"]...
    llm.collective_rpc("flare_close")

With ``enable_sleep_mode`` the weights must be awake while they are received:
``llm.wake_up(tags=["weights"])`` before ``flare_receive``, ``llm.wake_up(tags=["kv_cache"])``
before generating, ``llm.sleep(level=1)`` after. A receive into sleeping weights would write into
released memory and waking would restore the old weights, so ``flare_receive`` refuses it.
"""

from __future__ import annotations

import inspect
import logging

from recipe.rollout.engine.endpoint import ReceiverEndpoint, TrainerClosed

logger = logging.getLogger(__name__)


class EngineAsleep(RuntimeError):
    """``flare_receive`` was called while vLLM's weights were asleep."""


def _show_logs_inside_vllm() -> None:
    """vLLM configures only its own ``vllm`` logger; without this, the endpoint's INFO lines
    ("connected", "trainer closed", rejected versions) vanish. Reuses vLLM's handlers."""
    ours = logging.getLogger("recipe.rollout")
    theirs = logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


def _weights_asleep() -> bool:
    """True when vLLM's sleep mode has released the memory tagged "weights" (vLLM's CuMemAllocator
    marks each allocation ``is_asleep``); False when sleep mode is off or the API is not there."""
    try:
        from vllm.device_allocator.cumem import CuMemAllocator
    except Exception:  # noqa: BLE001 - another vLLM, or no sleep mode support: nothing to check
        return False
    allocator = getattr(CuMemAllocator, "instance", None)
    if allocator is None:
        return False
    return any(getattr(d, "is_asleep", False) and getattr(d, "tag", None) == "weights"
               for d in getattr(allocator, "pointer_to_data", {}).values())


def pass_stacked_shard_ids(model) -> int:
    """Make loaders that take the shard of a stacked checkpoint weight only as an argument read
    it from the weight too; returns how many were wrapped.

    vLLM's ``AutoWeightsLoader`` calls ``param.weight_loader(param, weight)`` with two arguments and
    leaves the shard of a weight stacked into a fused parameter on the tensor (``weight.shard_id``,
    set by the model's ``WeightsMapper``). vLLM 0.26.0's OLMo-Hybrid conv1d loader (q/k/v_conv1d
    into one ``conv1d``) reads it only from its third argument, so every load of those weights
    fails ("list indices must be integers or slices, not NoneType"; fixed upstream by vLLM pull
    request 55858). Loaders called with the shard (vLLM's merged linears) behave as before."""
    wrapped = 0
    for param in model.parameters() if hasattr(model, "parameters") else ():
        loader = getattr(param, "weight_loader", None)
        if loader is None or getattr(loader, "flare_passes_shard_id", False):
            continue
        try:
            if "loaded_shard_id" not in inspect.signature(loader).parameters:
                continue
        except (TypeError, ValueError):  # a builtin without a signature
            continue

        def with_shard_id(p, weight, *args, _loader=loader, **kwargs):
            if not args and "loaded_shard_id" not in kwargs and getattr(weight, "shard_id", None) is not None:
                args = (weight.shard_id,)
            return _loader(p, weight, *args, **kwargs)

        with_shard_id.flare_passes_shard_id = True
        try:
            param.weight_loader = with_shard_id
        except AttributeError:  # vLLM's parameter classes hold it as a read-only property
            continue
        wrapped += 1
    return wrapped


class FlareWorkerExtension:
    """Methods vLLM mixes into its GPU worker (names start with ``flare_``: vLLM refuses an
    extension attribute that clashes with the worker's own). Return values are plain dicts and
    ints, so they also cross vLLM's multiprocessing engine core.

    ``rollout.engine_world_size`` on the trainer must equal the number of workers (TP x PP x DP);
    worker ``w`` joins the transfer group as rank ``1 + w`` and worker 0 hosts the rendezvous
    store on ``address:port``. Weights arrive under HF checkpoint names; vLLM's ``load_weights``
    fuses q/k/v and gate/up and takes its own TP shard. Only unquantized models: quantized ones
    need vLLM's layerwise reload (the trainer's ``vllm`` transport).
    """

    def flare_connect(self, address: str, port: int, backend: str = "nccl", timeout_s: float = 600.0) -> int:
        """Start listening for the trainer; returns this worker's index."""
        _show_logs_inside_vllm()
        parallel = self.vllm_config.parallel_config  # type: ignore[attr-defined]
        world_per_dp = parallel.world_size
        dp_rank = getattr(parallel, "data_parallel_rank", 0) or 0
        worker_rank = dp_rank * world_per_dp + self.rank  # type: ignore[attr-defined]
        n_workers = world_per_dp * (getattr(parallel, "data_parallel_size", 1) or 1)
        if getattr(self, "_flare", None) is not None:
            self._flare.close()
        backend = str(backend)
        # gloo receives into host memory; load_weights copies to the GPU
        device = self.device if backend in ("nccl", "ipc") else "cpu"  # type: ignore[attr-defined]
        self._flare = ReceiverEndpoint(str(address), int(port), 1 + worker_rank, 1 + n_workers, backend=backend,
                                       timeout_s=float(timeout_s), device=device)
        logger.info(f"flare: worker {worker_rank} of {n_workers} listening for the trainer on {address}:{port} "
                    f"({backend})")
        if wrapped := pass_stacked_shard_ids(self.model_runner.model):  # type: ignore[attr-defined]
            logger.info(f"flare: {wrapped} weight loader(s) now read a stacked weight's shard from the weight")
        return worker_rank

    def flare_receive(self, wait_s: float | None = None) -> dict:
        """Apply the trainer's next complete version through the model's ``load_weights``.

        Returns ``{"status": "applied", "version": step}``; ``{"status": "closed", ...}`` once
        the trainer ended training (close the loop: nothing more will come on this connection;
        a new trainer run connects again and a later call receives from it); or
        ``{"status": "timeout", ...}`` when ``wait_s`` seconds passed without a version.
        """
        if getattr(self, "_flare", None) is None:
            raise RuntimeError("flare_receive before flare_connect: call "
                               "collective_rpc('flare_connect', args=(address, port, backend, timeout_s)) first")
        if _weights_asleep():
            raise EngineAsleep("flare_receive: vLLM's weights are asleep (llm.sleep()); call "
                               "llm.wake_up(tags=['weights']) before receiving and wake_up(tags=['kv_cache']) "
                               "before generating")
        model = self.model_runner.model  # type: ignore[attr-defined]
        wait = None if wait_s is None else float(wait_s)
        try:
            version = self._flare.receive(model.load_weights, wait_s=wait)
        except TrainerClosed:
            return {"status": "closed", "version": self._flare.version}
        if version is None:
            return {"status": "timeout", "version": self._flare.version}
        return {"status": "applied", "version": version}

    def flare_weight_version(self) -> int | None:
        """The last version applied completely (None before the first)."""
        return self._flare.version

    def flare_close(self) -> None:
        if getattr(self, "_flare", None) is not None:
            self._flare.close()
            self._flare = None
