"""The ``rollout`` post-step hook: export the weights to an inference engine every N steps.

Every trainer rank runs the hook (the gathers are collectives); global rank 0 sends. A failed
export (no receiver, receiver died, timeout, rejected version) is logged and training goes on;
the next interval reconnects and retries with that step as a fresh version. Every rank learns
the sender's outcome after each phase through a one-integer all-reduce on the trainer's group,
so all ranks stop gathering at the same bucket and none is left in a collective.

Enable with ``[rollout] enable = true`` and ``[hooks] post_step = ["rollout"]`` (or the dotted
path ``recipe.rollout.trainer.hook:RolloutHook``).
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from recipe.errors import ConfigError, UserError
from recipe.hooks import StepState, register_post_step_hook
from recipe.rollout.trainer.adapters import export_adapter_class, get_export_adapter
from recipe.rollout.trainer.source import Bucket, WeightSource
from recipe.rollout.trainer.senders import build_transport

logger = logging.getLogger(__name__)

ROLLOUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RolloutExportError(UserError):
    """rollout.on_failure = "raise" and an export failed."""


def validate_rollout(job_config) -> None:
    r = job_config.rollout
    if r.interval <= 0:
        raise ConfigError(f"rollout.interval={r.interval}: must be a positive integer")
    if r.bucket_mb <= 0:
        raise ConfigError(f"rollout.bucket_mb={r.bucket_mb}: must be positive")
    if r.engine_world_size < 1 or r.engine_tp_size < 1:
        raise ConfigError("rollout.engine_world_size and rollout.engine_tp_size must be >= 1")
    if r.engine_world_size % r.engine_tp_size:
        raise ConfigError(f"rollout.engine_world_size={r.engine_world_size} is not a multiple of "
                          f"rollout.engine_tp_size={r.engine_tp_size}")
    if r.timeout_s <= 0:
        raise ConfigError(f"rollout.timeout_s={r.timeout_s}: must be positive")
    limit = job_config.comm.train_timeout_seconds
    if r.timeout_s >= limit:
        # The non-sending ranks wait in a trainer collective while rank 0 waits on the engine.
        raise ConfigError(f"rollout.timeout_s={r.timeout_s} must be below comm.train_timeout_seconds={limit}, "
                          "or the other trainer ranks time out while rank 0 waits for the engine")
    if r.placement == "colocated" and r.transport in ("nccl", "vllm"):
        # vllm: the transport drives vLLM's NCCL weight-transfer engine, with the same limit
        raise ConfigError(f"rollout.placement=colocated with transport={r.transport}: NCCL cannot join two "
                          "processes on one GPU; use transport ipc")
    if r.placement == "disaggregated" and r.transport == "ipc":
        raise ConfigError("rollout.transport=ipc needs the engine on the same GPUs: set placement = colocated")
    if r.transport in ("nccl", "ipc", "vllm") and not torch.cuda.is_available():
        raise ConfigError(f"rollout.transport={r.transport} needs CUDA; use gloo on CPU")


def rollout_hook_listed(job_config) -> bool:
    """rollout.enable, with the rollout hook in hooks.post_step (by name or class path)."""
    return job_config.rollout.enable and any(h == "rollout" or h.endswith("RolloutHook")
                                             for h in job_config.hooks.post_step)


def check_rollout_model(model_config, job_config) -> None:
    """Before any training: a model type with no export adapter cannot be exported (the hook
    would otherwise fail at its first export)."""
    if rollout_hook_listed(job_config):
        export_adapter_class(model_config.model_type)


@register_post_step_hook("rollout")
class RolloutHook:
    def __init__(self, job_config):
        self.cfg = job_config.rollout
        self.enabled = self.cfg.enable
        if not self.enabled:
            logger.info("rollout hook listed but rollout.enable = false: no exports")
            return
        validate_rollout(job_config)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.transport = build_transport(self.cfg) if self.rank == 0 else None
        self.source: WeightSource | None = None
        self.host_group = None  # colocated engine, several trainer ranks: see _lockstep
        self.exported: list[int] = []  # versions the engine applied
        self.failed: list[int] = []
        # Host seconds per phase of the last export (scripts/benchmarks/bench_export.py prints them). With an
        # asynchronous transport (nccl) "send" is only the launch and "buffer" a device-side wait;
        # the transfer time shows up in "finish" (drain + final ack).
        self.last_phases: dict[str, float] = {}

    def __call__(self, state: StepState) -> None:
        # The step test first: reading `skipped` waits for the device.
        if not self.enabled or state.step % self.cfg.interval or state.skipped:
            return
        self.export(state.model, state.step)

    # ------------------------------------------------------------------ export

    def _source(self, model) -> WeightSource:
        if self.source is None:  # names, shapes and dtypes are fixed: plan once
            adapter = get_export_adapter(model.config, ROLLOUT_DTYPES[self.cfg.dtype], engine_tp=self.cfg.engine_tp_size,
                                         fused=self.cfg.fused_layout)
            self.source = WeightSource(model, adapter, max(int(self.cfg.bucket_mb * 2**20), 1))
        return self.source

    def _lockstep(self):
        """A gloo group of the trainer ranks when the engine shares their GPUs, else None.

        A trainer rank that runs ahead leaves an NCCL kernel waiting on its GPU (its next
        gather, the final agreement) until the sender catches up, while the sender waits for
        the engine. The colocated engine is another process: its copies on that GPU then get
        only time slices next to the waiting kernel. 1.5b over ``ipc`` took 0.55 s with an
        FSDP=2 trainer and a 2-rank engine, 35 ms with one trainer rank (2x H200, 2026-11).
        So the ranks meet on the host (this group) before each bucket's gather and agree on it."""
        if self.host_group is None and self.cfg.placement == "colocated" and self.world > 1:
            self.host_group = dist.new_group(backend="gloo")  # every rank's first export: collective
            if self.rank == 0:
                logger.info(f"rollout: colocated engine, {self.world} trainer ranks: buckets in lockstep on the host")
        return self.host_group

    def _agree(self, ok: bool) -> bool:
        """Rank 0's outcome (and anyone's failure) on every rank."""
        if self.world == 1:
            return ok
        if self.host_group is not None:  # on the host: nothing waits on the GPU (see _lockstep)
            flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.host_group)
            return bool(flag.item())
        # A CUDA tensor suits "nccl" and "cuda:nccl,cpu:gloo" (torchtitan's) alike.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _attempt(self, fn, *args) -> str | None:
        """Run a transport call on the sender; the error text instead of an exception."""
        try:
            fn(*args)
            return None
        except Exception as e:  # noqa: BLE001 - any engine-side failure must not stop training
            return f"{type(e).__name__}: {e}"

    def export(self, model, version: int) -> bool:
        """Send the current weights as ``version``; True when the engine applied all of them."""
        source = self._source(model)
        lockstep = self._lockstep()
        sender = self.transport is not None
        t0 = time.perf_counter()
        phases = self.last_phases = dict.fromkeys(("start", "buffer", "fill", "send", "agree", "finish"), 0.0)
        clock = [t0]

        def lap(phase: str) -> None:
            now = time.perf_counter()
            phases[phase] += now - clock[0]
            clock[0] = now

        error, sent = None, 0
        if sender:
            error = self._attempt(self.transport.init) or self._attempt(self.transport.start, version,
                                                                        source.buckets)
        lap("start")
        ok = self._agree(error is None)
        lap("agree")
        if ok:
            # No per-bucket agreement (it would be a host sync per bucket): a sender that fails
            # mid-version keeps filling without a buffer, so every rank runs the same gathers, and
            # the outcome is agreed once at the end.
            for plan in source.buckets:
                # The bucket's gather is launched before waiting for a free buffer: it does not
                # touch the buffer, so it overlaps the broadcast still reading it (nccl).
                if lockstep is not None:
                    dist.barrier(group=lockstep)  # see _lockstep
                gathered = source.gather_rows(plan, keep=sender and error is None)  # collective
                lap("fill")
                buffer = None
                if sender and error is None:  # may raise too (a failed broadcast surfaces here)
                    try:
                        buffer = self.transport.buffer(plan.nbytes)
                    except Exception as e:  # noqa: BLE001 - not a training error
                        error = f"{type(e).__name__}: {e}"
                lap("buffer")
                try:
                    source.pack(plan, gathered, buffer)  # collective on every rank
                except Exception as e:  # noqa: BLE001 - packing failed on the sender, after the collectives
                    if buffer is None:
                        raise  # a failed collective: not an export error
                    error, buffer = f"{type(e).__name__}: {e}", None
                gathered = None  # the gather buffer goes back before the next bucket's is allocated
                lap("fill")
                if buffer is not None:
                    error = self._attempt(self.transport.send, Bucket(plan.index, plan.metas, buffer, plan.nbytes))
                    sent += plan.nbytes if error is None else 0
                lap("send")
            if sender and error is None:
                error = self._attempt(self.transport.finish, version)
            lap("finish")
            ok = self._agree(error is None)
            lap("agree")
        seconds = time.perf_counter() - t0
        if ok:
            self.exported.append(version)
            if sender:
                logger.info(f"rollout: exported version {version} ({len(source.items)} tensors, "
                            f"{source.total_bytes / 2**20:.1f} MiB in {len(source.buckets)} bucket(s)) in "
                            f"{seconds:.4f}s ({source.total_bytes / max(seconds, 1e-9) / 2**30:.2f} GiB/s)")
            return True
        self.failed.append(version)
        if sender:
            if hasattr(self.transport, "abort"):
                self.transport.abort(error or "failed")
            self.transport.close()  # the next export reconnects from scratch
            logger.warning(f"rollout: export of version {version} failed after {seconds:.2f}s "
                           f"({sent / 2**20:.1f} MiB sent): {error or 'another rank failed'}; training continues, "
                           f"next attempt at step {version + self.cfg.interval}")
        if self.cfg.on_failure == "raise":
            raise RolloutExportError(f"rollout: export of version {version} failed (rollout.on_failure = raise)")
        return False

    def close(self) -> None:
        if getattr(self, "transport", None) is not None:
            self.transport.close(notify=True)
