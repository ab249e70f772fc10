"""Mamba2 (``fla.layers.mamba2.Mamba2``, blocks of ``norm`` + ``mixer``, no MLP).

Heads are sharded as in the other families, but ``in_proj`` packs five segments in one matrix,
``[z (d_inner) | x (d_inner) | B (G·N) | C (G·N) | dt (H)]``, and ``conv1d`` filters the channels
``[x | B | C]``. A rank needs its slice of every segment: z/x/dt by heads, and B/C whole, because
flare's Mamba2 has one group (``n_groups = 1``, required by ``recipe.model.check_model_config``)
shared by all heads, which every rank replicates (vLLM's ``MambaMixer2`` does the same). A contiguous
row shard would cut across segments, so these two weights are stored row-sharded like any
column-parallel weight (memory and optimizer state split over TP) and each forward all-gathers
them and takes the rank's rows of each segment; backward reduce-scatters their gradient, which
sums the replicated B/C rows' contributions of all ranks. ``A_log``, ``dt_bias``, ``D`` and the
gated norm's weight are per head (or per channel) and sharded.

The gated RMSNorm before ``out_proj`` normalizes over its group, all of d_inner with one group:
each rank sums the squares of its channels and an all-reduce gives every rank the whole sum
(one number per token) before it scales its own channels. ``out_proj`` is row-parallel and
reduce-scatters over the sequence.

The forward is fla's own torch path (its scan on fla's ``chunk_simple_gla``: recipe/mamba2_ssd.py)
on the local slices, with the counts it reshapes by (``num_heads``, ``intermediate_size``,
``conv_dim``, ``conv1d.groups``) per rank.
With ``mamba_ssm`` installed on a GPU, fla trains with ``mamba_split_conv1d_scan_combined``, a
kernel that reads ``out_proj``'s weight and normalizes over all of d_inner itself; sharded
mixers take fla's torch path instead.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from parallelisms.tp_plans.base import TPPlan, prefixed
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute
from recipe.errors import ConfigError


def packed_rows(mixer: nn.Module, rank: int, tp: int) -> dict[str, list[tuple[int, int]]]:
    """Row ranges ``[start, end)`` of TP rank ``rank`` in ``in_proj`` and ``conv1d`` (dim 0), in the
    order the local forward splits them: z, x, B, C, dt and x, B, C. Groups are sharded when
    ``tp`` divides ``n_groups`` and replicated when there is one (vLLM's ``MambaMixer2`` layout)."""
    inner, heads, groups, state = mixer.intermediate_size, mixer.num_heads, mixer.n_groups, mixer.ssm_state_size
    i0, i1 = rank * inner // tp, (rank + 1) * inner // tp
    h0, h1 = rank * heads // tp, (rank + 1) * heads // tp
    g0, g1 = (0, groups) if groups == 1 else (rank * groups // tp, (rank + 1) * groups // tp)
    gn = groups * state
    b0, b1 = g0 * state, g1 * state
    return {
        "in_proj": [(i0, i1), (inner + i0, inner + i1), (2 * inner + b0, 2 * inner + b1),
                    (2 * inner + gn + b0, 2 * inner + gn + b1), (2 * inner + 2 * gn + h0, 2 * inner + 2 * gn + h1)],
        "conv1d": [(i0, i1), (inner + b0, inner + b1), (inner + gn + b0, inner + gn + b1)],
    }


class PackedRowsParallel(ParallelStyle):
    """Column parallelism for weights whose rows pack several segments (``in_proj``, ``conv1d``).

    ``rows(module, rank, tp)`` gives ``{submodule: [(start, end), ...]}``: the rows of that
    submodule's weight (and bias) rank ``rank`` computes with. Each such parameter is stored
    ``Shard(0)``; during the module's forward it is all-gathered (autograd: its gradient, marked
    ``Partial`` because each rank used only its rows, is reduce-scattered back) and replaced by
    those rows. Inputs that are replicated DTensors (``hidden_states`` after the sequence
    all-gather) go in as local tensors whose gradient is this rank's partial sum, as a
    column-parallel linear's input gradient is.
    """

    def __init__(self, rows: Callable[[nn.Module, int, int], dict[str, list[tuple[int, int]]]]):
        super().__init__()
        self.rows = rows

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        entries = []
        rows = self.rows(module, device_mesh.get_local_rank(), device_mesh.size())
        for sub_name, ranges in rows.items():
            sub = module.get_submodule(sub_name)
            for leaf in ("weight", "bias"):
                param = sub._parameters.get(leaf)
                if param is None:
                    continue
                if isinstance(param, DTensor):
                    raise ValueError(f"{sub_name}.{leaf} of {type(module).__name__} is already a DTensor")
                data = distribute_tensor(param, device_mesh, [Shard(0)])
                sub.register_parameter(leaf, nn.Parameter(data, requires_grad=param.requires_grad))
                entries.append((sub, leaf, ranges))

        forward = module.forward

        @functools.wraps(forward)
        def rows_forward(*args, **kwargs):
            saved = [(owner, leaf, owner._parameters[leaf]) for owner, leaf, _ in entries]
            try:
                for (owner, leaf, param), (_, _, ranges) in zip(saved, entries):
                    whole = param.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
                    owner._parameters[leaf] = torch.cat([whole[a:b] for a, b in ranges])
                args = [_local_partial(a) for a in args]
                kwargs = {k: _local_partial(v) for k, v in kwargs.items()}
                return forward(*args, **kwargs)
            finally:
                for owner, leaf, param in saved:
                    owner._parameters[leaf] = param

        module.forward = rows_forward
        return module


def _local_partial(value):
    """A replicated DTensor input as a local tensor whose gradient is this rank's partial sum."""
    if isinstance(value, DTensor):
        return value.to_local(grad_placements=[Partial()])
    return value


class SplitGatedRMSNorm(ParallelStyle):
    """fla's ``RMSNormGated`` (or an ungated HF RMSNorm) over channels split across TP ranks,
    normalized over all of them.

    ``y = w · g / sqrt(mean(g²) + eps)``, with ``g = x · silu(z)`` (``norm_before_gate=False``, as
    Mamba2 and vLLM have it) or ``g = x`` and the gate applied after; the mean spans the whole
    group (all of d_inner with one group): the local sum of squares is all-reduced, and its
    gradient, which every rank's channels contribute to, is summed back. Its weight must already
    be local (``LocalCompute`` on the mixer gives the rank's channels)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        tp = device_mesh.size()
        norm_before_gate = getattr(module, "norm_before_gate", True)  # HF's RMSNorm has no gate
        eps = module.eps if hasattr(module, "eps") else module.variance_epsilon  # fla's / HF's name

        def forward(x, z=None):
            dtype = x.dtype
            g = x.float()
            if z is not None and not norm_before_gate:
                g = g * F.silu(z.float())
            squares = g.pow(2).sum(-1, keepdim=True)
            squares = DTensor.from_local(squares, device_mesh, [Partial()], run_check=False)
            squares = squares.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])
            y = g * torch.rsqrt(squares / (g.shape[-1] * tp) + eps) * module.weight.float()
            if z is not None and norm_before_gate:
                y = y * F.silu(z.float())
            return y.to(dtype)

        module.forward = forward
        return module


@register_tp_plan("mamba2")
class Mamba2TPPlan(TPPlan):
    attn_name = "mixer"
    block_norms = ("norm",)

    def validate(self) -> None:
        c = self.config  # no MLP and no hybrid attention layers: the base checks do not apply
        self.require_divisible("vocab_size", c.vocab_size)
        self.require_divisible("num_heads", c.num_heads)
        if c.n_groups != 1:  # recipe.model.check_model_config refuses it for every layout first
            raise ConfigError(
                f"parallelism.tensor_parallel_degree={self.tp}: the mamba2 plan shares one group of B/C "
                f"across ranks; n_groups={c.n_groups} in model.config is not supported, set n_groups=1"
            )

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(model.base_model_prefix).norm_f

    def model_plan(self, model: nn.Module):
        plan = super().model_plan(model)
        base = model.base_model_prefix
        plan.pop(f"{base}.norm")
        plan[f"{base}.norm_f"] = self.norm_style(self.final_norm(model), local_output=True)
        return plan

    def layer_plan(self, block: nn.Module):
        plan = {name: self.norm_style(block.get_submodule(name)) for name in self.block_norms}
        plan.update(prefixed(self.attn_name, self.attn_plan(block.get_submodule(self.attn_name))))
        return plan

    def attn_plan(self, mixer: nn.Module):
        plan = {"out_proj": self.rowwise(output_layouts=Shard(1))}
        local = {"A_log": Shard(0), "dt_bias": Shard(0), "D": Shard(0)}  # D: per head, or per channel
        if mixer.norm is not None:
            local["norm.weight"] = Shard(0)
            plan["norm"] = SplitGatedRMSNorm()
        plan[""] = (self.attn_input(), LocalCompute(local, default=None), PackedRowsParallel(packed_rows))
        return plan

    def localize(self, block: nn.Module) -> None:
        """Per-rank counts while the mixer runs. They stay global outside its forward: fla's
        ``_init_weights`` draws ``A_log`` with ``module.num_heads`` values for the global tensor."""
        mixer = block.get_submodule(self.attn_name)
        groups = mixer.n_groups if mixer.n_groups == 1 else mixer.n_groups // self.tp
        inner = mixer.intermediate_size // self.tp
        conv_dim = inner + 2 * groups * mixer.ssm_state_size
        local = [
            (mixer, {"num_heads": mixer.num_heads // self.tp, "intermediate_size": inner, "n_groups": groups,
                     "conv_dim": conv_dim}),
            (mixer.conv1d, {"in_channels": conv_dim, "out_channels": conv_dim, "groups": conv_dim}),
        ]
        forward = mixer.forward

        @functools.wraps(forward)
        def with_local_counts(*args, **kwargs):
            saved = [(obj, {k: getattr(obj, k) for k in values}) for obj, values in local]
            try:
                for obj, values in local:
                    for k, v in values.items():
                        setattr(obj, k, v)
                return forward(*args, **kwargs)
            finally:
                for obj, values in saved:
                    for k, v in values.items():
                        setattr(obj, k, v)

        mixer.forward = with_local_counts
        # mamba_ssm's fused training kernel cannot run on a rank's slice (see the module docstring).
        mixer.cuda_kernels_forward = mixer.torch_forward
