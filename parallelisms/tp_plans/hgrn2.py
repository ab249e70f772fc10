"""HGRN2 (``fla.layers.hgrn2.HGRN2Attention``).

q/f/i projections, their short convolutions and the heads are sharded. Unlike the other
families, HGRN2's output norm spans the whole hidden size (not one head) and is fused with
o_proj in fla's ``rms_norm_linear`` kernel, called inside ``forward``. The layer's reference to
that function is replaced by one that, when handed DTensor weights (only under this plan),
all-gathers the head-sharded output, normalizes it with DTensor ops and applies the row-parallel
o_proj, reduce-scattering over the sequence; otherwise fla's kernel runs unchanged.
The model-level ``lower_bounds`` ([layers, hidden]) gate the forget dims column-wise, so they are
sharded over columns like ``f_proj``'s outputs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel

from fla.modules.parallel import PrepareModuleWeight
from parallelisms.tp_plans.base import TPPlan, conv_layouts
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute


def _sharded_rms_norm_linear(original):
    @functools.wraps(original)
    def rms_norm_linear(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=None, eps=1e-5, **kwargs):
        if not isinstance(linear_weight, DTensor):
            return original(x, norm_weight, norm_bias, linear_weight, linear_bias, residual=residual, eps=eps, **kwargs)
        if residual is not None or kwargs.get("prenorm") or linear_bias is not None:
            raise NotImplementedError("tensor-parallel rms_norm_linear supports no residual/prenorm/bias")
        mesh = linear_weight.device_mesh
        x = DTensor.from_local(x, mesh, [Shard(-1)], run_check=False).redistribute(placements=[Replicate()])
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
        if norm_weight is not None:
            y = y * norm_weight.float()
        if norm_bias is not None:
            y = y + norm_bias.float()
        y = y.to(linear_weight.dtype).redistribute(placements=[Shard(-1)])
        return F.linear(y, linear_weight).redistribute(placements=[Shard(1)]).to_local()

    rms_norm_linear._flare_tp = True
    return rms_norm_linear


def install_sharded_rms_norm_linear() -> None:
    from fla.layers import hgrn2 as layer

    if not getattr(layer.rms_norm_linear, "_flare_tp", False):
        layer.rms_norm_linear = _sharded_rms_norm_linear(layer.rms_norm_linear)


@register_tp_plan("hgrn2")
class HGRN2TPPlan(TPPlan):
    local_attrs = ("num_heads", "forget_dim", "input_dim")

    def validate(self) -> None:
        super().validate()
        self.require_divisible("num_heads", self.config.num_heads)

    def prepare_model(self, model) -> None:
        super().prepare_model(model)
        install_sharded_rms_norm_linear()

    def model_plan(self, model):
        plan = super().model_plan(model)
        if getattr(self.config, "use_lower_bound", False):
            plan[model.base_model_prefix] = LocalCompute({"lower_bounds": Shard(1)}, default=None)
        return plan

    def attn_plan(self, attn):
        if not hasattr(attn, "f_proj"):
            return super().attn_plan(attn)
        plan = self.colwise_heads(attn, ("q_proj", "f_proj", "i_proj"))
        plan["g_norm"] = PrepareModuleWeight(layouts=Replicate())
        plan["o_proj"] = RowwiseParallel()  # only shards the weight: the function above applies it
        local = conv_layouts(attn, ("q_conv1d", "f_conv1d", "i_conv1d"))
        plan[""] = (self.attn_input(), LocalCompute(local, default=None)) if local else self.attn_input()
        return plan
