"""RetNet (``fla.layers.multiscale_retention.MultiScaleRetention``).

Projections, short convolutions and heads are sharded like GLA's, but retention's per-head decay
is not a parameter: fla's retention ops derive it from the head *index*,
``gamma_h = 1 - 2**(-5 - h)`` with ``h`` in ``range(q.shape[2])``. On rank r the local heads are
global heads ``r*H/tp + j``, so the ops called by that layer are replaced by versions that take
the rank's head offset from a context variable, set while a sharded retention layer runs. With
offset 0 (no TP, or TP rank 0) fla's own op runs unchanged.
"""

from __future__ import annotations

import contextvars
import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ParallelStyle

from parallelisms.tp_plans.base import conv_layouts, shared_layouts
from parallelisms.tp_plans.gla import GLATPPlan
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute

_HEAD_OFFSET: contextvars.ContextVar[int] = contextvars.ContextVar("flare_retention_head_offset", default=0)


def _decays(offset: int, n_heads: int, device) -> torch.Tensor:
    heads = torch.arange(offset, offset + n_heads, dtype=torch.float, device=device)
    return (1 - 2.0 ** (-5.0 - heads)).log()


def _at_head_offset(original, simple_gla_op, *, per_token: bool):
    """``original`` retention op, or ``simple_gla_op`` with decays of the global head indices."""

    @functools.wraps(original)
    def retention(q, k, v, **kwargs):
        offset = _HEAD_OFFSET.get()
        if offset == 0:
            return original(q=q, k=k, v=v, **kwargs)
        decay = _decays(offset, q.shape[2], q.device)
        if per_token:  # the parallel op takes a per-token gate instead of a constant decay
            kwargs["g"] = decay[None, None, :].expand(q.shape[0], q.shape[1], q.shape[2])
        else:
            kwargs["g_gamma"] = decay
        return simple_gla_op(q=q, k=k, v=v, **kwargs)

    retention._flare_head_offset = True
    return retention


def install_head_offset_ops() -> None:
    """Point fla's retention layer at offset-aware ops (idempotent)."""
    from fla.layers import multiscale_retention as layer
    from fla.ops.simple_gla import (
        chunk_simple_gla,
        fused_chunk_simple_gla,
        fused_recurrent_simple_gla,
        parallel_simple_gla,
    )

    ops = {
        "chunk_retention": (chunk_simple_gla, False),
        "fused_chunk_retention": (fused_chunk_simple_gla, False),
        "fused_recurrent_retention": (fused_recurrent_simple_gla, False),
        "parallel_retention": (parallel_simple_gla, True),
    }
    for name, (op, per_token) in ops.items():
        original = getattr(layer, name)
        if not getattr(original, "_flare_head_offset", False):
            setattr(layer, name, _at_head_offset(original, op, per_token=per_token))


class RetentionHeadOffset(ParallelStyle):
    """While the layer runs, tell the retention ops which global head its first local head is."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        offset = device_mesh.get_local_rank() * (module.num_heads // device_mesh.size())
        forward = module.forward

        @functools.wraps(forward)
        def with_offset(*args, **kwargs):
            token = _HEAD_OFFSET.set(offset)
            try:
                return forward(*args, **kwargs)
            finally:
                _HEAD_OFFSET.reset(token)

        module.forward = with_offset
        return module


@register_tp_plan("retnet")
class RetNetTPPlan(GLATPPlan):
    """GLA's head layout and checks; retention itself needs the rank's head offset (below)."""

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        install_head_offset_ops()

    def attn_plan(self, attn):
        from fla.layers.multiscale_retention import MultiScaleRetention

        if not isinstance(attn, MultiScaleRetention):
            return super().attn_plan(attn)
        plan = self.colwise_heads(attn, ("q_proj", "k_proj", "v_proj", "g_proj"))
        plan["o_proj"] = self.rowwise(output_layouts=Shard(1))
        local = conv_layouts(attn, ("q_conv1d", "k_conv1d", "v_conv1d"))
        local.update(shared_layouts(attn, ("g_norm_swish_gate", "g_norm")))
        plan[""] = (self.attn_input(), LocalCompute(local, default=None), RetentionHeadOffset())
        return plan
