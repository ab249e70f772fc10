"""fla's Transformer (``fla.layers.attn.Attention``, needs flash-attn): q/k/v head-sharded,
o_proj row-parallel; optional per-head q/k norms shared by all heads (see
``TPPlan.softmax_attn_plan``, also used for the softmax layers of fla hybrid models)."""

from parallelisms.tp_plans.base import TPPlan
from parallelisms.tp_plans.registry import register_tp_plan


@register_tp_plan("transformer")
class TransformerTPPlan(TPPlan):
    def validate(self) -> None:
        super().validate()
        c = self.config
        self.require_divisible("num_heads", c.num_heads)
        self.require_divisible("num_kv_heads", c.num_kv_heads or c.num_heads)
