"""Single-device FSDP: gradient clipping and the optimizer step on the local tensors.

On one rank (``parallelism.single_device_fsdp``) FSDP2 keeps every parameter, gradient and
optimizer state as a DTensor whose local tensor is the whole tensor. DTensor dispatch of the
list ops in clipping and in the fused optimizer is host work per tensor: on an H200 host,
GLA-340M's 290 tensors took 23-25 ms of host time per step for clip + step (8-12 ms on the local
tensors; ``scripts/benchmarks/bench_train.py --timeline``, docs/benchmarks.md), time in which a
fast GPU runs dry between one step's optimizer and the next step's forward. On one rank the local
tensors are the full tensors, so the same kernels on them compute the same values; the optimizer
keeps its DTensor parameters and state (checkpoints are unchanged), it only steps on their local
tensors.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch.distributed.tensor import DTensor


def on_one_rank(params: Iterable[torch.Tensor]) -> bool:
    """Every parameter a DTensor on a one-rank mesh whose local tensor is a plain tensor (not a
    tensor subclass such as float8's training weights, whose ops must keep their dispatch)."""
    params = list(params)
    return bool(params) and all(
        isinstance(p, DTensor) and p.device_mesh.size() == 1 and type(p._local_tensor) is torch.Tensor
        for p in params
    )


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (2-norm, foreach) over the gradients' local tensors; returns
    the total norm before clipping as a plain tensor."""
    grads = [p.grad._local_tensor for p in params if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
    # torch.nn.utils.clip_grads_with_norm_'s arithmetic; it takes parameters, these are gradients
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total_norm + 1e-6), max=1.0))
    return total_norm


@contextlib.contextmanager
def optimizers_on_local_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> Iterator[None]:
    """Within this context each optimizer sees its parameters' local tensors (their gradients and
    state are the local tensors of the DTensor ones, so its in-place updates land in them). An
    optimizer with a gradient whose state does not exist yet (its first step) is left as it is:
    its state is created as DTensors by the normal path."""
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
