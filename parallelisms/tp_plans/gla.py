"""GLA (``fla.layers.gla.GatedLinearAttention``).

q/k/v/g projections and the second (full-rank) gate projection ``gk_proj.1`` are head-sharded.
``gk_proj.0`` is a low-rank bottleneck (hidden -> 16) shared by all heads: sharding its 16
outputs would split the rank, not the heads, so it is replicated. Short convolutions follow
their projection's channels; the output norm has head size and is shared by all heads.
With GQA, k/v/gk have ``num_kv_heads`` heads: each rank keeps 1/tp of them, which are exactly the
kv heads its q heads use (``num_kv_groups`` is unchanged).
"""

from torch.distributed.tensor import Replicate, Shard

from fla.modules.parallel import PrepareModuleWeight
from parallelisms.tp_plans.base import TPPlan, conv_layouts, shared_layouts
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute


@register_tp_plan("gla")
class GLATPPlan(TPPlan):
    local_attrs = ("num_heads", "num_kv_heads", "key_dim", "value_dim", "key_dim_per_group", "value_dim_per_group")

    def validate(self) -> None:
        super().validate()
        c = self.config
        self.require_divisible("num_heads", c.num_heads)
        self.require_divisible("num_kv_heads", c.num_kv_heads or c.num_heads)

    def attn_plan(self, attn):
        if not hasattr(attn, "gk_proj"):
            return super().attn_plan(attn)
        plan = self.colwise_heads(attn, ("q_proj", "k_proj", "v_proj", "g_proj"))
        plan["gk_proj.0"] = PrepareModuleWeight(layouts=Replicate())
        plan["gk_proj.1"] = self.colwise()
        plan["o_proj"] = self.rowwise(output_layouts=Shard(1))
        local = conv_layouts(attn, ("q_conv1d", "k_conv1d", "v_conv1d"))
        local.update(shared_layouts(attn, ("g_norm_swish_gate", "g_norm")))
        plan[""] = (self.attn_input(), LocalCompute(local, default=None))
        return plan
