"""HF Llama (SDPA), and Qwen2/Qwen3 which share its block structure.

Heads of q/k/v are sharded (k/v by ``num_key_value_heads``), o_proj is row-parallel; HF's
attention reshapes with ``-1`` heads, so no attribute needs localizing. HF computes RoPE
positions and the causal mask from the embeddings' sequence length, so the embedding output
stays whole (replicated) and the first block slices it into sequence shards. Qwen3's per-head
q/k norms are shared by all heads.
"""

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import PrepareModuleInput, RowwiseParallel

from parallelisms.tp_plans.base import TPPlan, shared_layouts
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute


@register_tp_plan("llama", "qwen2", "qwen3")
class LlamaTPPlan(TPPlan):
    attn_name = "self_attn"
    block_norms = ("input_layernorm", "post_attention_layernorm")

    def validate(self) -> None:
        super().validate()
        c = self.config
        self.require_divisible("num_attention_heads", c.num_attention_heads)
        self.require_divisible("num_key_value_heads", c.num_key_value_heads or c.num_attention_heads)

    def model_plan(self, model):
        base = model.base_model_prefix
        plan = {
            f"{base}.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
            f"{base}.layers.0": PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
            ),
            f"{base}.norm": self.norm_style(self.final_norm(model), local_output=True),
        }
        return {**plan, **self.output_plan(model)}

    def attn_plan(self, attn):
        plan = self.colwise_heads(attn, ("q_proj", "k_proj", "v_proj"))
        plan["o_proj"] = self.rowwise(output_layouts=Shard(1))
        local = shared_layouts(attn, ("q_norm", "k_norm"))
        plan[""] = (self.attn_input(), LocalCompute(local, default=None)) if local else self.attn_input()
        return plan
