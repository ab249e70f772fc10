"""Gated DeltaNet (``fla.layers.gated_deltanet.GatedDeltaNet``).

q/k (``num_heads``) and v/g/a/b (``num_v_heads``) projections are head-sharded, and so are the
per-head decay parameters ``A_log`` and ``dt_bias`` and the short convolutions. The fused q/k/v
convolution path reads the conv weights and splits by ``key_dim``/``value_dim`` inside
``forward``, so the conv weights are local for the whole forward and those dims are per rank.
"""

from torch.distributed.tensor import Shard

from parallelisms.tp_plans.base import TPPlan, conv_layouts, shared_layouts
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute


@register_tp_plan("gated_deltanet")
class GatedDeltaNetTPPlan(TPPlan):
    local_attrs = ("num_heads", "num_v_heads", "key_dim", "value_dim")

    def validate(self) -> None:
        super().validate()
        c = self.config
        self.require_divisible("num_heads", c.num_heads)
        self.require_divisible("num_v_heads", getattr(c, "num_v_heads", None) or c.num_heads)

    def attn_plan(self, attn):
        if not hasattr(attn, "A_log"):
            return super().attn_plan(attn)
        plan = self.colwise_heads(attn, ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj"))
        plan["o_proj"] = self.rowwise(output_layouts=Shard(1))
        local = {"A_log": Shard(0), "dt_bias": Shard(0)}
        local.update(conv_layouts(attn, ("q_conv1d", "k_conv1d", "v_conv1d")))
        local.update(shared_layouts(attn, ("o_norm",)))
        plan[""] = (self.attn_input(), LocalCompute(local, default=None))
        return plan
