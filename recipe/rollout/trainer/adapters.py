"""Export adapters: trainer parameters → the tensors an inference engine loads, per model type.

An adapter turns the trainer's parameter list (names and global shapes, no data) into an ordered
list of ``ExportItem``s: the engine-side name, the trainer parameters it is built from, its shape
and the dtype it is sent in. ``combine`` builds the tensor from the gathered full parameters.

* HF Llama/Qwen2/Qwen3 and fla's families are trained under their HF checkpoint names, which is
  what vLLM's ``load_weights`` takes (it fuses q/k/v and gate/up itself), so names pass through.
* ``fused=True`` is for engines that load pre-fused ``qkv_proj``/``gate_up_proj`` tensors laid
  out per destination TP rank (``[q_0, k_0, v_0, q_1, k_1, v_1, ...]``): rank r's rows are one
  contiguous slice, so it can copy its shard without knowing head counts.
* Tied weights are sent once (the engine ties them itself); parameters matching ``fp32_names``
  (e.g. GatedDeltaNet's ``A_log``/``dt_bias``, Mamba2's ``A_log``) stay float32 whatever
  ``rollout.dtype`` says.

Register an adapter for a new model type with ``@register_export_adapter("my_type")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable

import torch

from recipe.errors import ConfigError
from recipe.hf_io import served_name

_ADAPTERS: dict[str, type["ExportAdapter"]] = {}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ExportItem:
    """One tensor the engine receives."""

    name: str
    sources: tuple[str, ...]  # trainer parameter names, gathered in this order
    shape: tuple[int, ...]
    dtype: torch.dtype
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None  # None: the single source as is

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n

    def build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if self.combine is None else self.combine(tensors)


def register_export_adapter(*model_types: str):
    """Class decorator: ``@register_export_adapter("gla")`` makes the adapter serve those model types."""
    if not model_types:
        raise ValueError("register_export_adapter needs at least one model_type")

    def register(cls):
        for model_type in model_types:
            other = _ADAPTERS.get(model_type)
            if other is not None and other is not cls:
                raise ValueError(f"model_type '{model_type}' already has the export adapter {other.__name__}")
            _ADAPTERS[model_type] = cls
        return cls

    return register


def registered_export_types() -> list[str]:
    return sorted(_ADAPTERS)


def export_adapter_class(model_type: str) -> type:
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ConfigError(
            f"rollout: model_type '{model_type}' has no export adapter (registered: "
            f"{', '.join(registered_export_types())}); register one with @register_export_adapter"
        ) from None


def get_export_adapter(config, dtype: torch.dtype, *, engine_tp: int = 1, fused: bool = False) -> "ExportAdapter":
    cls = export_adapter_class(config.model_type)
    return cls(config, dtype, engine_tp=engine_tp, fused=fused)


def clean_name(name: str) -> str:
    """Parameter path without the wrappers' inserted module names (AC, compile, FSDP1)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(wrapper, "")
    return name


def layer_order(names: list[str]) -> list[str]:
    """Names sorted as the model runs: what precedes the blocks, the blocks by index, the rest.
    Registration order within a block is kept (sort is stable)."""
    first_block = next((i for i, n in enumerate(names) if _LAYER.search(n)), len(names))

    def key(item):
        pos, name = item
        m = _LAYER.search(name)
        if m:
            return (1, int(m.group(1)), pos)
        return (0 if pos < first_block else 2, 0, pos)

    return [name for _, name in sorted(enumerate(names), key=key)]


class ExportAdapter:
    """Identity adapter: engine names are the trainer's (HF checkpoint) names."""

    fp32_names: tuple[str, ...] = ()  # regexes (re.search) of engine names sent in float32

    def __init__(self, config, dtype: torch.dtype, *, engine_tp: int = 1, fused: bool = False):
        if fused:
            raise ConfigError(
                f"rollout.fused_layout: model_type '{config.model_type}' has no fused layout; "
                "set rollout.fused_layout = false"
            )
        self.config, self.dtype, self.engine_tp, self.fused = config, dtype, engine_tp, fused

    def dtype_for(self, name: str) -> torch.dtype:
        return torch.float32 if any(re.search(p, name) for p in self.fp32_names) else self.dtype

    def tied_aliases(self, names: list[str]) -> set[str]:
        """Trainer names the engine does not take because it ties them to another weight.
        ``named_parameters()`` already yields a shared Parameter once; this also drops a copy
        that a wrapper may have untied, because the engine ties lm_head to the embedding itself."""
        if getattr(self.config, "tie_word_embeddings", False):
            return {n for n in names if n.startswith("lm_head.")}
        return set()

    def plan(self, shapes: dict[str, tuple[int, ...]]) -> list[ExportItem]:
        """Export items in layer order from {trainer name: global shape}."""
        names = [n for n in layer_order(list(shapes)) if n not in self.tied_aliases(list(shapes))]
        return [ExportItem(n, (n,), tuple(shapes[n]), self.dtype_for(n)) for n in names]


@register_export_adapter("gla", "delta_net", "retnet", "hgrn2")
class FlaAdapter(ExportAdapter):
    """fla models: the engine loads fla's HF checkpoints, whose names are the trainer's."""


@register_export_adapter("gated_deltanet")
class GatedDeltaNetAdapter(ExportAdapter):
    # The decay parameters feed exp()/softplus() and are kept in float32 by fla's kernels.
    fp32_names = (r"\.A_log$", r"\.dt_bias$")


def refuse_unserved(served_as: dict, architecture: str) -> None:
    """One line for the first setting (name: (this model's value, what vLLM's ``architecture``
    computes)) the engine would compute differently: it would serve another model."""
    for key, (value, served) in served_as.items():
        if value != served:
            raise ConfigError(
                f"rollout: model.config has {key}={value!r} but vLLM's {architecture} computes "
                f"{key}={served!r}, so the engine would serve another model; export is supported for "
                f"{key}={served!r}"
            )


@register_export_adapter("mamba2")
class Mamba2Adapter(ExportAdapter):
    """fla's Mamba2 for vLLM's ``Mamba2ForCausalLM`` (vLLM 0.26), which loads these HF names: it
    maps ``A_log`` to its float32 ``A`` (``-exp(A_log)``, computed from what it receives, so
    ``A_log`` is sent in float32); ``D``, ``dt_bias`` and the rest it keeps in the model dtype.

    vLLM's mixer has no setting for what some fla configs change (it gates before its norm,
    holds one ``D`` per head, does not clamp dt, and takes ``intermediate_size`` from the config
    when present): such a model would be served as another one, so it is refused.
    """

    fp32_names = (r"\.A_log$",)

    def __init__(self, config, dtype: torch.dtype, *, engine_tp: int = 1, fused: bool = False):
        super().__init__(config, dtype, engine_tp=engine_tp, fused=fused)
        c = config
        inner = c.expand * c.hidden_size
        served_as = {  # setting: (this model's value, what vLLM's Mamba2 computes)
            "norm_before_gate": (c.norm_before_gate, False),
            "rmsnorm": (c.rmsnorm, True),
            "D_has_hdim": (c.D_has_hdim, False),
            "dt_limit": (tuple(c.dt_limit), (0.0, float("inf"))),
            "hidden_act": (c.hidden_act if c.hidden_act != "swish" else "silu", "silu"),
            "intermediate_size": (getattr(c, "intermediate_size", None) or inner, inner),
        }
        refuse_unserved(served_as, "Mamba2ForCausalLM")
        if c.num_heads % engine_tp or (c.n_groups != 1 and c.n_groups % engine_tp):
            raise ConfigError(
                f"rollout.engine_tp_size={engine_tp}: vLLM's Mamba2 needs it to divide num_heads={c.num_heads} "
                f"and n_groups={c.n_groups} (or n_groups=1)"
            )


@register_export_adapter("olmo_hybrid")
class OlmoHybridAdapter(ExportAdapter):
    """OLMo-Hybrid (``recipe/olmo_hybrid.py``) for vLLM's ``OlmoHybridForCausalLM`` (vLLM 0.26), which
    loads the HF checkpoint names and packs them itself: q/k/v into ``qkv_proj``, q/k/v/g into
    ``in_proj_qkvg``, ``q_conv1d``/``k_conv1d``/``v_conv1d`` into ``conv1d``, gate/up into
    ``gate_up_proj``. Block norms go under the names vLLM loads (``input_layernorm``,
    ``post_attention_layernorm``) whatever the installed transformers calls them
    (``recipe.hf_io.SAVED_NAMES``). vLLM holds ``A_log``/``dt_bias`` in the model dtype: they are
    sent in it.

    vLLM's model has no setting for some of transformers' (its attention has no biases and heads
    of ``hidden_size / num_attention_heads``, its MLP is SiLU-gated): such a model is refused.
    """

    def __init__(self, config, dtype: torch.dtype, *, engine_tp: int = 1, fused: bool = False):
        super().__init__(config, dtype, engine_tp=engine_tp, fused=fused)
        c = config
        served_as = {  # setting: (this model's value, what vLLM's OlmoHybridForCausalLM computes)
            "attention_bias": (c.attention_bias, False),
            "head_dim": (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                         c.hidden_size // c.num_attention_heads),
            "hidden_act": (c.hidden_act, "silu"),
        }
        refuse_unserved(served_as, "OlmoHybridForCausalLM")
        for key in ("num_attention_heads", "linear_num_key_heads", "linear_num_value_heads"):
            if getattr(c, key) % engine_tp:
                raise ConfigError(f"rollout.engine_tp_size={engine_tp}: vLLM's OLMo-Hybrid needs it to divide "
                                  f"{key}={getattr(c, key)}")
        heads_per_rank(c.num_key_value_heads or c.num_attention_heads, engine_tp)

    def plan(self, shapes: dict[str, tuple[int, ...]]) -> list[ExportItem]:
        return [replace(it, name=served_name(it.name, self.config.model_type)) for it in super().plan(shapes)]


# --------------------------------------------------------------------------- HF Llama family


def heads_per_rank(n_heads: int, tp: int) -> tuple[int, int]:
    """(heads each TP rank holds, replication factor) as vLLM's QKVParallelLinear splits them:
    fewer KV heads than ranks are replicated, each rank r taking head r // (tp / n_heads)."""
    if n_heads >= tp:
        if n_heads % tp:
            raise ConfigError(f"rollout.engine_tp_size={tp} does not divide {n_heads} heads")
        return n_heads // tp, 1
    if tp % n_heads:
        raise ConfigError(f"rollout.engine_tp_size={tp} is not a multiple of {n_heads} KV heads")
    return 1, tp // n_heads


def rank_heads(t: torch.Tensor, rank: int, n_heads: int, tp: int, head_dim: int) -> torch.Tensor:
    """Rows of TP rank ``rank`` of a per-head projection (weight or bias, heads on dim 0)."""
    local, replicas = heads_per_rank(n_heads, tp)
    first = rank * local if replicas == 1 else rank // replicas
    return t[first * head_dim:(first + local) * head_dim]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, tp: int, n_heads: int, n_kv: int,
             head_dim: int) -> torch.Tensor:
    """[q_0, k_0, v_0, q_1, k_1, v_1, ...]: each destination rank's q/k/v rows, rank after rank."""
    parts = []
    for r in range(tp):
        parts += [rank_heads(q, r, n_heads, tp, head_dim), rank_heads(k, r, n_kv, tp, head_dim),
                  rank_heads(v, r, n_kv, tp, head_dim)]
    return torch.cat(parts)


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor, *, tp: int) -> torch.Tensor:
    """[gate_0, up_0, gate_1, up_1, ...] (MergedColumnParallelLinear's per-rank layout)."""
    g, u = gate.chunk(tp), up.chunk(tp)
    return torch.cat([x for r in range(tp) for x in (g[r], u[r])])


@register_export_adapter("llama", "qwen2", "qwen3")
class LlamaAdapter(ExportAdapter):
    """HF Llama/Qwen2/Qwen3: HF names (vLLM fuses them) or the per-TP fused layout."""

    def __init__(self, config, dtype: torch.dtype, *, engine_tp: int = 1, fused: bool = False):
        self.config, self.dtype, self.engine_tp, self.fused = config, dtype, engine_tp, fused
        c = config
        self.n_heads = c.num_attention_heads
        self.n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if fused:
            heads_per_rank(self.n_heads, engine_tp)
            heads_per_rank(self.n_kv, engine_tp)
            if c.intermediate_size % engine_tp:
                raise ConfigError(f"rollout.engine_tp_size={engine_tp} does not divide intermediate_size "
                                  f"{c.intermediate_size}")

    def plan(self, shapes: dict[str, tuple[int, ...]]) -> list[ExportItem]:
        items = super().plan(shapes)
        if not self.fused:
            return items
        by_name = {it.name: it for it in items}
        out, done = [], set()
        for it in items:
            if it.name in done:
                continue
            fused = self._fuse(it.name, by_name)
            if fused is None:
                out.append(it)
                continue
            out.append(fused)
            done.update(fused.sources)
        return out

    def _fuse(self, name: str, by_name: dict[str, ExportItem]) -> ExportItem | None:
        tp = self.engine_tp
        m = re.match(r"(.*\.self_attn\.)([qkv])_proj\.(weight|bias)$", name)
        if m:
            prefix, _, kind = m.groups()
            sources = tuple(f"{prefix}{p}_proj.{kind}" for p in "qkv")
            if not all(s in by_name for s in sources):
                return None
            q_rows = self.n_heads * self.head_dim
            kv_local, _ = heads_per_rank(self.n_kv, tp)
            rows = q_rows + 2 * tp * kv_local * self.head_dim
            shape = (rows, *by_name[sources[0]].shape[1:])
            kw = dict(tp=tp, n_heads=self.n_heads, n_kv=self.n_kv, head_dim=self.head_dim)
            return ExportItem(f"{prefix}qkv_proj.{kind}", sources, shape, self.dtype_for(name),
                              lambda ts: fuse_qkv(*ts, **kw))
        m = re.match(r"(.*\.mlp\.)(gate|up)_proj\.weight$", name)
        if m:
            prefix = m.group(1)
            sources = (f"{prefix}gate_proj.weight", f"{prefix}up_proj.weight")
            if not all(s in by_name for s in sources):
                return None
            gate = by_name[sources[0]]
            shape = (2 * gate.shape[0], *gate.shape[1:])
            return ExportItem(f"{prefix}gate_up_proj.weight", sources, shape, self.dtype_for(name),
                              lambda ts: fuse_gate_up(*ts, tp=tp))
        return None
