"""DeltaNet (``fla.layers.delta_net.DeltaNet``): q/k/v/g/beta projections and short convolutions
head-sharded; the output norm (head size) is shared by all heads."""

from torch.distributed.tensor import Shard

from parallelisms.tp_plans.base import TPPlan, conv_layouts, shared_layouts
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute


@register_tp_plan("delta_net")
class DeltaNetTPPlan(TPPlan):
    local_attrs = ("num_heads", "key_dim", "value_dim")

    def validate(self) -> None:
        super().validate()
        self.require_divisible("num_heads", self.config.num_heads)

    def attn_plan(self, attn):
        if not hasattr(attn, "qk_norm"):
            return super().attn_plan(attn)
        plan = self.colwise_heads(attn, ("q_proj", "k_proj", "v_proj", "b_proj", "g_proj"))
        plan["o_proj"] = self.rowwise(output_layouts=Shard(1))
        local = conv_layouts(attn, ("q_conv1d", "k_conv1d", "v_conv1d"))
        local.update(shared_layouts(attn, ("o_norm",)))
        plan[""] = (self.attn_input(), LocalCompute(local, default=None))
        return plan
