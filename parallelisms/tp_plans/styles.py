"""Tensor-parallel styles for modules whose math runs in fla's Triton kernels.

torch's ColwiseParallel/RowwiseParallel/SequenceParallel compute with DTensors. A Triton kernel
cannot take a DTensor (it has no storage: "Attempted to access the data pointer on an invalid
python storage"), and fla's own ``NormParallel``/``SwiGLULinearParallel`` hand DTensors to their
kernels, so they fail the same way (measured with torch 2.13). The styles here keep the *parameters* DTensors
(so FSDP, optimizers and distributed checkpoints see the global tensors) but run the module on
plain local tensors, then say how the gradients and outputs combine across the TP group.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.utils._pytree import tree_map_only

from fla.modules.fused_linear_cross_entropy import LinearLossParallel


def _wait(t: torch.Tensor) -> torch.Tensor:
    return t.trigger_wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


class _Materialize(torch.autograd.Function):
    """Identity that waits on in-flight collectives: the value in forward, the gradient in
    backward. Triton kernels need real storage, which ``AsyncCollectiveTensor`` (the result of
    an async all-gather/reduce-scatter, in either direction) lacks."""

    @staticmethod
    def forward(ctx, t):
        return _wait(t)

    @staticmethod
    def backward(ctx, grad):
        return _wait(grad)


def materialize(tree):
    """Plain tensors in ``tree`` through ``_Materialize`` (DTensors are left to DTensor)."""

    def one(t):
        if isinstance(t, DTensor):
            return t
        return _Materialize.apply(t) if t.requires_grad else _wait(t)

    return tree_map_only(torch.Tensor, one, tree)


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


class LocalCompute(ParallelStyle):
    """Run ``module.forward`` on local tensors while its parameters stay DTensors.

    ``layouts`` maps parameter names (relative to the module, e.g. ``"q_conv1d.weight"``) to
    their placement; parameters not named use ``default`` (None: leave them to other styles).
    During forward each named parameter is swapped for its local tensor:

    * ``Shard(d)``: the rank's slice (per-head conv channels, ``A_log``, ...): its gradient is
      exactly the slice's gradient.
    * ``Replicate()``: the whole tensor (a norm weight shared by all heads, or by all tokens under
      sequence parallelism). Each rank saw only its heads/tokens, so its gradient is a partial
      sum: it is marked ``Partial`` (as torch's own SequenceParallel norms do) and reduced by
      FSDP, the optimizer or ``full_tensor()``.

    ``partial_output``: the module returns a per-rank partial sum (e.g. a fused SwiGLU+down
    projection over the rank's hidden slice); it is reduced to this placement (``Shard(1)``:
    reduce-scatter over the sequence) and returned as a local tensor.
    """

    def __init__(
        self,
        layouts: Mapping[str, Placement] | None = None,
        *,
        default: Placement | None = Replicate(),
        partial_output: Placement | None = None,
    ):
        super().__init__()
        self.layouts = dict(layouts or {})
        self.default = default
        self.partial_output = partial_output

    def _placements(self, module: nn.Module) -> dict[str, Placement]:
        names = [n for n, _ in module.named_parameters()]
        unknown = set(self.layouts) - set(names)
        if unknown:
            raise ValueError(f"LocalCompute on {type(module).__name__}: no parameters {sorted(unknown)}")
        out = {n: self.layouts.get(n, self.default) for n in names}
        return {n: p for n, p in out.items() if p is not None}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        entries = []
        for name, placement in self._placements(module).items():
            owner, leaf = _owner(module, name)
            param = owner._parameters[leaf]
            if isinstance(param, DTensor):
                raise ValueError(f"{name} of {type(module).__name__} is already a DTensor: two styles claim it")
            if placement.is_replicate():
                # Plans are applied on the meta device (or to identical replicas): no broadcast needed.
                data = DTensor.from_local(param, device_mesh, [Replicate()], run_check=False)
            else:
                data = distribute_tensor(param, device_mesh, [placement])
            owner.register_parameter(leaf, nn.Parameter(data, requires_grad=param.requires_grad))
            entries.append((owner, leaf, placement.is_replicate()))

        forward = module.forward
        partial_output = self.partial_output

        @functools.wraps(forward)
        def local_forward(*args, **kwargs):
            # Read the parameters at call time: FSDP swaps in unsharded ones before forward.
            saved = [(owner, leaf, owner._parameters[leaf]) for owner, leaf, _ in entries]
            try:
                for (owner, leaf, param), (_, _, replicated) in zip(saved, entries):
                    grad = [Partial()] if replicated else None
                    owner._parameters[leaf] = param.to_local(grad_placements=grad)
                out = materialize(forward(*materialize(args), **materialize(kwargs)))
            finally:
                for owner, leaf, param in saved:
                    owner._parameters[leaf] = param
            if partial_output is not None:
                out = reduce_partial_to(out, device_mesh, partial_output)
            return out

        module.forward = local_forward
        return module


class SequenceParallelLinearLoss(LinearLossParallel):
    """fla's fused linear cross entropy on each rank's sequence shard, made exact under TP.

    fla's ``LinearLossParallel`` computes the loss of the local tokens with a replicated
    ``lm_head`` weight, but declares that weight's gradient replicated although each rank only
    saw its tokens, and returns the local loss. Here the weight (of any TP placement) is
    gathered, its gradient is marked ``Partial`` (summed across ranks), and the returned loss has
    the value of the whole sequence's loss while back-propagating only through the local part.
    Exact for ``reduction="sum"`` (what fla uses when ``num_items_in_batch`` is given); for
    "mean" it is the mean of the ranks' means.
    """

    @staticmethod
    def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
        x, target, weight, bias = inputs

        def seq_local(t):
            if not isinstance(t, DTensor):
                return t  # already this rank's sequence shard
            return t.redistribute(placements=sequence_sharding).to_local()

        x = seq_local(x)
        if not isinstance(target, DTensor):
            # labels are given whole on every TP rank: keep this rank's sequence shard
            target = DTensor.from_local(target, device_mesh, [Replicate()], run_check=False)
        target = target.redistribute(placements=sequence_sharding).to_local()

        def gathered(p):
            if p is None:
                return None
            if not isinstance(p, DTensor):
                p = DTensor.from_local(p, device_mesh, [Replicate()], run_check=False)
            return p.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])

        return x, target, gathered(weight), gathered(bias)

    @staticmethod
    def _prepare_output_fn(use_local_output, mod, outputs, device_mesh):
        total = funcol.all_reduce(outputs.detach(), "sum", device_mesh)
        if getattr(mod, "reduction", "sum") == "mean":
            total = total / device_mesh.size()
        # value: the whole sequence's loss; gradient: only through this rank's tokens
        return outputs + (total - outputs.detach())


def reduce_partial_to(tensor: torch.Tensor, device_mesh: DeviceMesh, placement: Placement = Shard(1)) -> torch.Tensor:
    """A per-rank partial sum (plain tensor) reduced to ``placement``, returned local."""
    out = DTensor.from_local(tensor, device_mesh, [Partial()], run_check=False)
    return out.redistribute(placements=[placement]).to_local()
