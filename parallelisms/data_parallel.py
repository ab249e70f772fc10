"""Data parallelism: FSDP2 / HSDP (``fully_shard``) or DDP (``replicate``).

The trainer divides each microbatch's token-sum loss by the *global* number of valid tokens,
so gradients must be summed over data-parallel ranks, not averaged.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

logger = logging.getLogger(__name__)


def _reshard_after_forward(policy: str) -> bool:
    if policy not in ("default", "always", "never"):
        raise ValueError(f"parallelism.fsdp_reshard_after_forward={policy!r}: use default, always or never")
    return policy != "never"  # "default": reshard (no pipeline parallelism here)


def apply_fsdp(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    *,
    embeddings: nn.Module,
    blocks: nn.ModuleList,
    head: list[nn.Module],
    tied: bool,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    cpu_offload: bool = False,
    reshard_after_forward_policy: str = "default",
) -> None:
    """One FSDP unit per block, one for the embeddings, one for ``head`` (final norm + lm_head),
    and the root for the rest (e.g. HGRN2's lower bounds). On a one-rank mesh (single-device FSDP)
    the whole model is one unit.

    Tied embeddings: the shared weight is used first by the embeddings and last by lm_head; it
    must live in one unit, so both stay with the root (unsharded from the first use to backward).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = {"mesh": dp_mesh, "mp_policy": mp}
    if cpu_offload:
        # Pinned host memory needs an accelerator (pin_memory() raises "Cannot access accelerator
        # device when none is available"); on a CPU mesh the "offload" copies are no-ops anyway.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=dp_mesh.device_type != "cpu")
    reshard = _reshard_after_forward(reshard_after_forward_policy)

    if dp_mesh.size() == 1:
        # One rank (single-device FSDP): there is no communication to overlap and nothing to
        # shard, so per-block units only add host work per step (FSDP2's pre/post hooks and
        # copy-in/out per unit). One unit kept unsharded from forward to backward: the bf16 copy
        # of the model is made once per step. Host time per step for GLA-340M's 290 tensors on a
        # 2-core CPU: 115 ms per block and resharding, 80 ms in one unit, 32 ms as plain tensors
        # (scripts/benchmarks/bench_fsdp_host.py).
        fully_shard(model, **kwargs, reshard_after_forward=reshard_after_forward_policy == "always")
        _set_reductions(model, dp_mesh)
        return
    if not tied:
        fully_shard(embeddings, **kwargs, reshard_after_forward=reshard)
    for block in blocks.children():
        fully_shard(block, **kwargs, reshard_after_forward=reshard)
    head = [m for m in head if m is not None and any(True for _ in m.parameters())]
    if head and not tied:
        # Backward needs these right after forward: keep them unless the user wants "always".
        fully_shard(head, **kwargs, reshard_after_forward=reshard_after_forward_policy == "always")
    fully_shard(model, **kwargs)
    _set_reductions(model, dp_mesh)


def _set_reductions(model: nn.Module, dp_mesh: DeviceMesh) -> None:
    # Plain sums: with factor 1 FSDP would use PREMUL_SUM(1.0), which gloo (CPU) lacks.
    force_sum = dp_mesh.device_type == "cpu"
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if force_sum:
                module.set_force_sum_reduction_for_comms(True)


def _allreduce_sum_hook(group, bucket):
    """DDP comm hook: sum the bucket (DDP's default hook divides by the world size).
    Unannotated on purpose: DDP compares the annotation with ``dist.GradBucket`` itself."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, *, compile_enabled: bool = False) -> None:
    if compile_enabled:
        torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    replicate(model, device_mesh=dp_mesh, bucket_cap_mb=100)
    model.register_comm_hook(dp_mesh.get_group(), _allreduce_sum_hook)
    logger.info("Applied DDP (gradients summed over data-parallel ranks)")
