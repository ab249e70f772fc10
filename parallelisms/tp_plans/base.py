"""``TPPlan``: how one model family is split across a tensor-parallel group.

Layout (Megatron-style with sequence parallelism, as torchtitan's llama):

* Between blocks, activations are sharded over the sequence (``Shard(1)``): embeddings are
  row-parallel over the vocabulary and reduce-scatter into sequence shards; norms run per token.
* Each token mixer ("attention") all-gathers the sequence, projects with column-parallel
  (head-sharded) linears, runs its kernel on the rank's heads, and reduce-scatters back with a
  row-parallel output projection. The MLP does the same over its hidden dimension.
* ``lm_head`` is column-parallel over the vocabulary; with loss parallelism the logits stay
  vocab-sharded and cross entropy runs under ``torch.distributed.tensor.parallel.loss_parallel``.

A subclass supplies ``attn_plan`` (and overrides anything else). Plans are dicts of
``{module path: ParallelStyle | tuple of styles}`` relative to the model, a block or a submodule
("" is that module itself). Everything runs on the meta device before weights are materialized.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from parallelisms.tp_plans.styles import LocalCompute, SequenceParallelLinearLoss
from recipe.errors import ConfigError

Plan = dict  # {path: ParallelStyle | tuple[ParallelStyle, ...]}


def prefixed(prefix: str, plan: Plan) -> Plan:
    """Re-root a submodule's plan under ``prefix`` ("" stands for the submodule itself)."""
    return {(f"{prefix}.{k}" if k else prefix): v for k, v in plan.items()}


def is_fla_module(module: nn.Module) -> bool:
    """fla modules compute with Triton kernels, which cannot take DTensors."""
    return type(module).__module__.startswith("fla.")


def param_layouts(module: nn.Module, prefix: str, placement) -> Plan:
    """{"<prefix>.<param>": placement} for every parameter of ``module``."""
    return {f"{prefix}.{n}": placement for n, _ in module.named_parameters()}


def gated_mlp_intermediate_size(config) -> int:
    """The hidden size fla's GatedMLP will build (it rounds the default to a multiple of 256)."""
    if getattr(config, "intermediate_size", None) is not None:
        return config.intermediate_size
    ratio = getattr(config, "hidden_ratio", None) or 4
    size = int(config.hidden_size * ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


class TPPlan:
    """Tensor-parallel plan of one model family; register subclasses with ``@register_tp_plan``."""

    model_type: ClassVar[str] = ""
    # Names inside one block (fla's convention; HF llama overrides them).
    attn_name: ClassVar[str] = "attn"
    mlp_name: ClassVar[str] = "mlp"
    block_norms: ClassVar[tuple[str, ...]] = ("attn_norm", "mlp_norm")
    # Attention attributes counting heads (or heads x head size) that forward code reads; each
    # rank only holds 1/tp of them, so ``localize`` divides them after sharding.
    local_attrs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, tp_degree: int = 1, *, loss_parallel: bool = True, float8: bool = False):
        self.config = config
        self.tp = tp_degree
        self.loss_parallel = loss_parallel
        self.float8 = float8
        if float8:
            # float8 all-gathers for tensorwise scaling (torchao); cannot run without CUDA.
            from torchao.float8.float8_tensor_parallel import (
                Float8ColwiseParallel,
                Float8RowwiseParallel,
                PrepareFloat8ModuleInput,
            )

            self.colwise, self.rowwise, self.prepare_mlp_input = (
                Float8ColwiseParallel,
                Float8RowwiseParallel,
                PrepareFloat8ModuleInput,
            )
        else:
            self.colwise, self.rowwise, self.prepare_mlp_input = ColwiseParallel, RowwiseParallel, PrepareModuleInput

    # ------------------------------------------------------------------ hooks

    def validate(self) -> None:
        """Raise ConfigError when this config cannot be split ``self.tp`` ways."""
        c = self.config
        if getattr(c, "attnres_block_size", None) is not None:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree={self.tp}: attention residuals (attnres_block_size) "
                "are not supported with tensor parallelism; set tensor_parallel_degree=1"
            )
        self.require_divisible("vocab_size", c.vocab_size)
        self.require_divisible("intermediate_size", gated_mlp_intermediate_size(c))
        attn = getattr(c, "attn", None)
        if attn:  # fla hybrid models: some layers are softmax attention
            self.require_divisible("attn.num_heads", attn["num_heads"])
            self.require_divisible("attn.num_kv_heads", attn.get("num_kv_heads") or attn["num_heads"])

    def prepare_config(self) -> list[str]:
        """Switch off fused kernels this layout cannot run; returns one message per switch."""
        c, switched = self.config, []
        if self.loss_parallel and getattr(c, "fuse_cross_entropy", False) and not getattr(
            c, "fuse_linear_cross_entropy", False
        ):
            c.fuse_cross_entropy = False
            switched.append(
                "fuse_cross_entropy=False: fla's fused cross entropy cannot take vocab-sharded (loss "
                "parallel) logits; using torch's vocab-parallel cross entropy"
            )
        return switched

    def require_divisible(self, key: str, value: int) -> None:
        if value % self.tp:
            raise ConfigError(
                f"parallelism.tensor_parallel_degree={self.tp} does not divide {key}={value} of this "
                f"{self.config.model_type} model; use a tensor_parallel_degree that divides {value}"
            )

    def prepare_model(self, model: nn.Module) -> None:
        """Adjust the built (meta) model before sharding; fla's linear-CE needs a criterion module."""
        if getattr(self.config, "fuse_linear_cross_entropy", False) and getattr(model, "criterion", 0) is None:
            from fla.modules import FusedLinearCrossEntropyLoss

            model.criterion = FusedLinearCrossEntropyLoss(use_l2warp=getattr(self.config, "use_l2warp", False))

    # ------------------------------------------------------------------ structure

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(f"{model.base_model_prefix}.layers")

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.get_submodule(model.base_model_prefix), "norm", None)

    @staticmethod
    def path_of(model: nn.Module, module: nn.Module) -> str:
        for name, m in model.named_modules():
            if m is module:
                return name
        raise ValueError(f"{type(module).__name__} is not part of the model")

    # ------------------------------------------------------------------ plans

    def norm_style(self, norm: nn.Module, *, local_output: bool = False):
        """Sequence parallelism for a per-token norm; fla's Triton norms run on local shards."""
        if is_fla_module(norm):
            return LocalCompute()
        return SequenceParallel(use_local_output=local_output)

    def attn_input(self):
        """Token mixers see the whole sequence: all-gather the sequence shards of hidden_states."""
        return PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        )

    def model_plan(self, model: nn.Module) -> Plan:
        base = model.base_model_prefix
        plan = {
            self.path_of(model, model.get_input_embeddings()): RowwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(1)
            ),
            f"{base}.norm": self.norm_style(self.final_norm(model), local_output=True),
        }
        return {**plan, **self.output_plan(model)}

    def output_plan(self, model: nn.Module) -> Plan:
        if getattr(self.config, "fuse_linear_cross_entropy", False):
            # Logits are never built: lm_head only holds the (vocab-sharded) weight for the loss.
            return {
                "lm_head": ColwiseParallel(input_layouts=Shard(1)),
                "criterion": SequenceParallelLinearLoss(),
            }
        lp = self.loss_parallel
        return {
            "lm_head": ColwiseParallel(
                input_layouts=Shard(1),
                output_layouts=Shard(-1) if lp else Replicate(),
                use_local_output=not lp,
            )
        }

    def layer_plan(self, block: nn.Module) -> Plan:
        plan = {name: self.norm_style(block.get_submodule(name)) for name in self.block_norms}
        plan.update(prefixed(self.attn_name, self.attn_plan(block.get_submodule(self.attn_name))))
        plan.update(prefixed(self.mlp_name, self.mlp_plan(block.get_submodule(self.mlp_name))))
        return plan

    def attn_plan(self, attn: nn.Module) -> Plan:
        """Plan of the token mixer, relative to it. fla hybrid layers use softmax attention."""
        from fla.layers.attn import Attention

        if isinstance(attn, Attention):
            return self.softmax_attn_plan(attn)
        raise NotImplementedError(f"{type(self).__name__} has no plan for {type(attn).__name__}")

    def softmax_attn_plan(self, attn: nn.Module) -> Plan:
        """fla's ``Attention`` (flash-attn): heads sharded; optional q/k norms are per-head."""
        plan = {p: self.colwise() for p in ("q_proj", "k_proj", "v_proj")}
        plan["o_proj"] = self.rowwise(output_layouts=Shard(1))
        local = {}
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                local.update(param_layouts(attn.get_submodule(name), name, Replicate()))
        plan[""] = (self.attn_input(), LocalCompute(local, default=None)) if local else self.attn_input()
        return plan

    def mlp_plan(self, mlp: nn.Module) -> Plan:
        """Gated MLP (fla's GatedMLP, HF's LlamaMLP): gate/up column-, down row-parallel."""
        # With float8, torchao all-gathers the MLP input already cast to float8. fla's MLP calls
        # its fused kernels, which compile leaves outside the graph (parallelisms/compile.py): the
        # float8 input then becomes a graph output whose gradient arrives as a plain tensor, and
        # AOTAutograd fails in backward (seen on 2 H200s). Gather it in bf16 there instead; the
        # float8 column-parallel projections cast it locally.
        prepare = PrepareModuleInput if is_fla_module(mlp) else self.prepare_mlp_input
        plan = {
            "": prepare(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "gate_proj": self.colwise(),
            "up_proj": self.colwise(),
        }
        if getattr(mlp, "fuse_swiglu", False):
            # fla's fused SwiGLU+down-projection kernel reads down_proj.weight directly: run it on
            # the rank's hidden slice and reduce-scatter the partial sums (down_proj has no bias).
            if mlp.down_proj.bias is not None:
                raise NotImplementedError("fused SwiGLU with a down_proj bias cannot be tensor-parallel")
            fused = LocalCompute({"down_proj.weight": Shard(1)}, default=None, partial_output=Shard(1))
            plan[""] = (plan[""], fused)
        else:
            plan["down_proj"] = self.rowwise(output_layouts=Shard(1))
        return plan

    def colwise_heads(self, attn: nn.Module, names: tuple[str, ...]) -> Plan:
        """Column-parallel (head-sharded) projections among ``names`` that ``attn`` has."""
        return {n: self.colwise() for n in names if isinstance(getattr(attn, n, None), nn.Linear)}

    def localize(self, block: nn.Module) -> None:
        """Divide head counts read by the sharded token mixer's forward by the TP degree."""
        from fla.layers.attn import Attention

        attn = block.get_submodule(self.attn_name)
        names = ("num_heads", "num_kv_heads", "kv_dim") if isinstance(attn, Attention) else self.local_attrs
        for name in names:
            value = getattr(attn, name, None)
            if isinstance(value, int):
                setattr(attn, name, value // self.tp)


def conv_layouts(attn: nn.Module, names: tuple[str, ...]) -> Plan:
    """Depthwise short convolutions: channels follow the head-sharded projection they filter."""
    out = {}
    for n in names:
        conv = getattr(attn, n, None)
        if conv is not None:
            out.update(param_layouts(conv, n, Shard(0)))
    return out


def shared_layouts(attn: nn.Module, names: tuple[str, ...]) -> Plan:
    """Norms shared by all heads (weight of head size): replicated, gradients summed."""
    out = {}
    for n in names:
        mod = getattr(attn, n, None)
        if isinstance(mod, nn.Module):
            out.update(param_layouts(mod, n, Replicate()))
    return out


def check_all_distributed(model: nn.Module) -> None:
    """Every parameter must be a DTensor after TP, else a plan missed a module (wrong grads)."""
    from torch.distributed.tensor import DTensor

    missed = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if missed:
        raise RuntimeError(
            f"tensor-parallel plan of {model.config.model_type} left parameters unsharded: {missed[:5]}"
            f"{' ...' if len(missed) > 5 else ''}; extend its TPPlan"
        )


__all__ = [
    "Plan",
    "TPPlan",
    "check_all_distributed",
    "conv_layouts",
    "gated_mlp_intermediate_size",
    "is_fla_module",
    "param_layouts",
    "prefixed",
    "shared_layouts",
]
