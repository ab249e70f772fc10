"""OLMo-Hybrid (``recipe/olmo_hybrid.py``: transformers' ``OlmoHybridForCausalLM``): Gated DeltaNet
blocks and softmax attention blocks in one model, both with a gated MLP.

* Gated DeltaNet blocks (``linear_attn``, pre-norm: ``input_layernorm``/``post_attention_layernorm``)
  take the Gated DeltaNet plan's mixer plan: q/k/v/g/a/b head-sharded, the per-head ``A_log``,
  ``dt_bias`` and short convolutions sharded, the gated output norm (head size) replicated. The
  forward splits the stacked convolution output by ``key_dim``/``value_dim``: per rank.
* Attention blocks (``self_attn``, post-norm: ``post_attention_layernorm``/
  ``post_feedforward_layernorm``) take the Llama plan's attention plan, except that OLMo's q/k
  norms normalize over all heads at once (not per head), so their weights are sharded with the
  heads and each norm all-reduces its sum of squares (``SplitGatedRMSNorm``, as Mamba2's gated
  norm does), which is what vLLM computes after its all-gather of q/k.

The model plan is Llama's (RoPE and masks come from the whole embedding output). Every block's
norms return local tensors: OLMo's post-norms feed a residual sum with the block's local input.
"""

from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import SequenceParallel

from parallelisms.tp_plans.base import prefixed
from parallelisms.tp_plans.gated_deltanet import GatedDeltaNetTPPlan
from parallelisms.tp_plans.llama import LlamaTPPlan
from parallelisms.tp_plans.mamba2 import SplitGatedRMSNorm
from parallelisms.tp_plans.registry import register_tp_plan
from parallelisms.tp_plans.styles import LocalCompute

LINEAR_ATTN_NORMS = ("input_layernorm", "post_attention_layernorm")
ATTN_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


@register_tp_plan("olmo_hybrid")
class OlmoHybridTPPlan(LlamaTPPlan):
    # Read by the forward of transformers' Gated DeltaNet mixer (it reshapes heads with -1).
    local_attrs = ("key_dim", "value_dim")

    def validate(self) -> None:
        super().validate()
        c = self.config
        self.require_divisible("linear_num_key_heads", c.linear_num_key_heads)
        self.require_divisible("linear_num_value_heads", c.linear_num_value_heads)

    def layer_plan(self, block):
        if hasattr(block, "linear_attn"):
            norms, name, mixer = LINEAR_ATTN_NORMS, "linear_attn", GatedDeltaNetTPPlan.attn_plan(self, block.linear_attn)
        else:
            norms, name, mixer = ATTN_NORMS, "self_attn", self.attn_plan(block.self_attn)
        plan = {n: SequenceParallel(use_local_output=True) for n in norms}
        plan.update(prefixed(name, mixer))
        plan.update(prefixed(self.mlp_name, self.mlp_plan(block.mlp)))
        return plan

    def attn_plan(self, attn):
        plan = super().attn_plan(attn)
        input_style, _ = plan[""]  # Llama's plan: (sequence all-gather, the q/k norm weights replicated)
        plan[""] = (input_style, LocalCompute({"q_norm.weight": Shard(0), "k_norm.weight": Shard(0)}, default=None))
        plan["q_norm"] = plan["k_norm"] = SplitGatedRMSNorm()
        return plan

    def localize(self, block) -> None:
        if hasattr(block, "linear_attn"):
            for name in self.local_attrs:
                setattr(block.linear_attn, name, getattr(block.linear_attn, name) // self.tp)
