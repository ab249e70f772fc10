"""Per-step metrics: console line, TensorBoard/W&B (torchtitan's loggers) and ``metrics.jsonl``.

``<dump_folder>/metrics.jsonl`` gets one JSON object per logged step (rank 0 writes it, a
resumed run appends; after a last line cut by a kill it starts a new line, and readers skip the
cut one). Keys always present: step, loss, grad_norm, lr, tps, mfu, memory_gib; also
loss_max, tflops, tokens_seen, skipped_steps, step_time_s, data_wait_s, alloc_retries, eta_s, time.
``tps`` is tokens/s per device; ``mfu`` is in percent, from ``recipe.flops`` and the device's
bf16 dense peak, and null where that peak is unknown (CPU). ``memory_gib`` is the peak since the
previous log: CUDA reserved memory, or the process's peak RSS on CPU. ``alloc_retries`` counts the
CUDA caching allocator's retries since the previous log (each one frees its cache and waits for the
device; null on CPU), with a warning when there are any.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time

import torch
import torch.distributed as dist
from torchtitan.components.metrics import _build_metric_logger

logger = logging.getLogger(__name__)


class MemoryMonitor:
    """Peak memory of this rank's device (CUDA) or process (CPU), in GiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self._retries_seen = 0

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def alloc_retries(self) -> int | None:
        """CUDA allocation retries since the previous call (None off CUDA). A retry means the
        caching allocator found no free block, released its cache and synchronized the device:
        the host stalls and the GPU idles."""
        if self.device.type != "cuda":
            return None
        total = torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0)
        since, self._retries_seen = total - self._retries_seen, total
        return since


class MetricsProcessor:
    """Accumulates throughput counters between log steps and writes every sink."""

    def __init__(self, job_config, parallel_dims, device: torch.device, flops_per_token: float, peak_flops: float | None):
        self.job_config = job_config
        self.parallel_dims = parallel_dims
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.memory = MemoryMonitor(device)
        self.sink = _build_metric_logger(job_config, parallel_dims)  # TensorBoard / W&B / nothing
        self.is_writer = not dist.is_initialized() or dist.get_rank() == 0
        self.jsonl_path = os.path.join(job_config.job.dump_folder, "metrics.jsonl")
        self.jsonl_cut = self.is_writer and _ends_mid_line(self.jsonl_path)
        if self.jsonl_cut:
            logger.warning(f"{self.jsonl_path}: the last line was cut off (a killed run); appending from a new line")
        self.ntokens_since_last_log = 0
        self.data_wait_s = 0.0
        self.steps_since_last_log = 0
        self.time_last_log = time.perf_counter()

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.job_config.metrics.log_freq == 0

    def log(self, step: int, loss: float, loss_max: float, grad_norm: float, lr: float, extra: dict) -> dict:
        elapsed = time.perf_counter() - self.time_last_log
        steps = max(self.steps_since_last_log, 1)
        # Ranks of one TP group see the same tokens: count them once per model replica.
        tps = self.ntokens_since_last_log / (elapsed * self.parallel_dims.non_data_parallel_size)
        tflops = self.flops_per_token * tps / 1e12
        mfu = 100 * self.flops_per_token * tps / self.peak_flops if self.peak_flops else None
        step_time = elapsed / steps
        remaining = self.job_config.training.steps - step
        record = {
            "step": step,
            "loss": loss,
            "loss_max": loss_max,
            "grad_norm": grad_norm,
            "lr": lr,
            "tps": tps,
            "tflops": tflops,
            "mfu": mfu,
            "memory_gib": self.memory.peak_gib(),
            "step_time_s": step_time,
            "data_wait_s": self.data_wait_s / steps,
            "alloc_retries": self.memory.alloc_retries(),
            "eta_s": remaining * step_time,
            **extra,
            "time": time.time(),
        }
        self.sink.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step)
        if self.is_writer:
            with open(self.jsonl_path, "a") as f:
                # The cut line stays as it is (nothing written is changed); the records go after it.
                f.write(("\n" if self.jsonl_cut else "") + json.dumps(_json_safe(record)) + "\n")
            self.jsonl_cut = False
        if record["alloc_retries"]:
            logger.warning(
                f"step {step}: {record['alloc_retries']} CUDA memory allocation retries since the last log (each one "
                "synchronizes the device): lower the memory use or set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
            )
        mfu_text = f"{mfu:.1f}%" if mfu is not None else "n/a"
        logger.info(
            f"step {step:>6}  loss {loss:8.4f}  grad_norm {grad_norm:8.4f}  lr {lr:.2e}  "
            f"tps {tps:,.0f}  tflops {tflops:.2f}  mfu {mfu_text}  mem {record['memory_gib']:.2f}GiB  "
            f"eta {_hms(record['eta_s'])}"
        )
        self.ntokens_since_last_log = 0
        self.data_wait_s = 0.0
        self.steps_since_last_log = 0
        self.time_last_log = time.perf_counter()
        self.memory.reset()
        return record

    def close(self) -> None:
        self.sink.close()


def _ends_mid_line(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except FileNotFoundError:
        return False


def _json_safe(record: dict) -> dict:
    # JSON has no NaN/Infinity: write them as strings so every line stays parseable.
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
