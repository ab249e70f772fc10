"""Gradient clipping and the optimizer step on FSDP2's local shards.

FSDP2 keeps every parameter, gradient and optimizer state as a DTensor. DTensor dispatch of the
list ops in clipping and in the fused optimizer is host work per tensor: on an H200 host, one-rank
FSDP (``parallelism.single_device_fsdp``) spent 23-25 ms of host time per step on GLA-340M's 290
tensors for clip + step, 8-12 ms on the local tensors (``scripts/benchmarks/bench_train.py
--timeline``, docs/benchmarks.md), time in which a fast GPU runs dry between one step's optimizer
and the next step's forward.

The local tensors give the same values: the optimizer is elementwise, so each rank stepping its
own shard is what DTensor dispatch does; the gradient norm reduces each tensor's local norm over
the ranks that shard the tensors with DTensor's own arithmetic, in one all-reduce (none on one
rank). The optimizer keeps its DTensor parameters and state (checkpoints are unchanged);
it only steps on their local tensors.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

_NORM_TYPE = 2.0  # the trainer clips the 2-norm


class LocalShards:
    """Clip and step on the local tensors of parameters that FSDP2 shards over ``group`` (None:
    each rank holds the whole tensors: FSDP on one rank, or data-parallel replicas only)."""

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group

    @classmethod
    def of(cls, params: Iterable[torch.Tensor]) -> LocalShards | None:
        """A ``LocalShards`` when the parameters' local tensors can stand for them: every parameter a
        DTensor on one mesh with the same placements, sharded along at most one mesh dimension of
        more than one rank and replicated along the others (FSDP, HSDP, one-rank FSDP), whose local
        tensor is a plain tensor (not a subclass such as float8's training weights, whose ops must
        keep their dispatch). None otherwise (tensor parallelism, plain tensors): the DTensor path."""
        params = list(params)
        if not params or not all(isinstance(p, DTensor) and type(p._local_tensor) is torch.Tensor for p in params):
            return None
        mesh, placements = params[0].device_mesh, params[0].placements
        if any(p.device_mesh is not mesh or p.placements != placements for p in params):
            return None
        if not all(pl.is_shard() or pl.is_replicate() for pl in placements):
            return None
        sharded = [dim for dim, pl in enumerate(placements) if pl.is_shard() and mesh.size(dim) > 1]
        if len(sharded) > 1:
            return None
        return cls(mesh.get_group(sharded[0]) if sharded else None)

    def clip_grad_norm_(self, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ (2-norm, foreach) over the gradients' local tensors;
        returns the total norm before clipping as a plain tensor, the same on every rank."""
        grads = [p.grad._local_tensor for p in params if p.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        norms = torch.stack(torch._foreach_norm(grads, _NORM_TYPE))
        if self.group is not None:
            # As DTensor reduces the partial per-tensor norms (torch's _NormPartial: p-th power,
            # sum, p-th root) before their norm: the same bits, in one all-reduce.
            norms = norms**_NORM_TYPE
            dist.all_reduce(norms, op=dist.ReduceOp.SUM, group=self.group)
            norms = norms ** (1.0 / _NORM_TYPE)
        total_norm = torch.linalg.vector_norm(norms, _NORM_TYPE)  # torch.nn.utils.get_total_norm's
        # torch.nn.utils.clip_grads_with_norm_'s arithmetic; it takes parameters, these are gradients
        torch._foreach_mul_(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
        return total_norm

    @staticmethod
    @contextlib.contextmanager
    def stepping(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
        """Within this context each optimizer sees its parameters' local tensors (their gradients
        and state are the local tensors of the DTensor ones, so its in-place updates land in them).
        An optimizer with a gradient whose state does not exist yet (its first step) is left as it
        is: its state is created as DTensors by the normal path."""
        swapped = []
        try:
            for optimizer in optimizers:
                state = optimizer.state
                groups = [group["params"] for group in optimizer.param_groups]
                if any(p.grad is not None and p not in state for params in groups for p in params):
                    continue
                swapped.append((optimizer, groups, state))
                local_state = defaultdict(dict)
                for group in optimizer.param_groups:
                    local_params = []
                    for p in group["params"]:
                        local = p._local_tensor
                        local.grad = None if p.grad is None else p.grad._local_tensor
                        if p in state:
                            local_state[local] = {k: v._local_tensor if isinstance(v, DTensor) else v
                                                  for k, v in state[p].items()}
                        local_params.append(local)
                    group["params"] = local_params
                optimizer.state = local_state
            yield
        finally:
            for optimizer, groups, state in swapped:
                for group, params in zip(optimizer.param_groups, groups):
                    if group["params"] is not params:
                        for local in group["params"]:
                            local.grad = None
                        group["params"] = params
                optimizer.state = state
