"""The checkpoint names vLLM's OLMo-Hybrid model loads, for a model config, read from vLLM's source.

vLLM does not install without CUDA, so this reads its source instead of running it: Python's
``ast`` walks the ``__init__`` of the model's classes (``models/olmo_hybrid.py`` and the Gated
DeltaNet layer it imports, ``layers/mamba/gdn/olmo_gdn_linear_attn.py``) and collects the
parameters they create, the way the modules would register them:

* ``self.x = <Linear/Embedding/RMSNorm layer>(...)`` registers ``x.weight`` (and ``x.bias`` where
  the call's ``bias``, or the layer's default, says so); ``self.x = nn.Parameter(...)`` registers ``x``;
* ``self.x = <a class of those files>(...)`` nests that class under ``x``; ``make_layers`` builds
  ``num_hidden_layers`` of the decoder layer under ``layers.<i>``;
* ``if self.layer_type == "..."`` and ``if config.tie_word_embeddings`` are decided from the
  config; other calls (attention backends, rotary embeddings, activations) hold no loaded weights.

The vLLM names are then turned into checkpoint names by inverting the model's
``hf_to_vllm_mapper`` (``orig_to_new_stacked``: which checkpoint names a packed parameter is
loaded from, e.g. ``in_proj_qkvg`` from ``q_proj``/``k_proj``/``v_proj``/``g_proj``), read from
the same source. A tied ``lm_head`` is skipped by vLLM's loader and absent here.

    python scripts/dev/vllm_olmo_hybrid_names.py --vllm /path/to/site-packages/vllm \\
        --config configs/tiny/olmo_hybrid.json --out tests/rollout/vllm_olmo_hybrid_names.json
"""

from __future__ import annotations

import argparse
import ast
import json
import os

MODEL_FILE = "model_executor/models/olmo_hybrid.py"
GDN_FILE = "model_executor/layers/mamba/gdn/olmo_gdn_linear_attn.py"
TOP_CLASS = "OlmoHybridForCausalLM"
# Layers whose weights vLLM registers as `weight`, and whether they add a `bias` when the call does
# not say (their `bias` default in vLLM 0.26's linear.py / vocab_parallel_embedding.py; None: never).
WEIGHTED_LAYERS = {"QKVParallelLinear": True, "MergedColumnParallelLinear": True, "ColumnParallelLinear": True,
                   "RowParallelLinear": True, "ReplicatedLinear": True, "ParallelLMHead": False,
                   "VocabParallelEmbedding": None, "RMSNorm": None, "RMSNormGated": None}


def classes(paths: list[str]) -> dict[str, ast.ClassDef]:
    out = {}
    for path in paths:
        with open(path) as f:
            for node in ast.parse(f.read()).body:
                if isinstance(node, ast.ClassDef):
                    out[node.name] = node
    return out


def init_body(cls: ast.ClassDef) -> list[ast.stmt]:
    return next(n.body for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")


def call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def has_bias(call: ast.Call) -> bool:
    default = WEIGHTED_LAYERS[call_name(call)]
    if default is None:
        return False
    bias = next((k.value for k in call.keywords if k.arg == "bias"), None)
    if bias is None:
        return default
    if not isinstance(bias, ast.Constant):
        raise SystemExit(f"cannot decide `bias={ast.unparse(bias)}` of {call_name(call)}; extend has_bias")
    return bool(bias.value)


class Walker:
    def __init__(self, defs: dict[str, ast.ClassDef], config: dict):
        self.defs, self.config = defs, config

    def condition(self, test: ast.expr, layer_type: str | None) -> bool | None:
        """The branch the config takes, or None when the test is not about the config."""
        if isinstance(test, ast.Compare) and isinstance(test.left, ast.Attribute) and test.left.attr == "layer_type":
            return layer_type == test.comparators[0].value
        if isinstance(test, ast.Attribute) and test.attr == "tie_word_embeddings":
            return bool(self.config.get("tie_word_embeddings", False))
        return None

    def params(self, cls_name: str, prefix: str, layer_type: str | None = None) -> list[str]:
        cls = self.defs[cls_name]
        return self.statements(init_body(cls), prefix, layer_type)

    def statements(self, body: list[ast.stmt], prefix: str, layer_type: str | None) -> list[str]:
        out = []
        for stmt in body:
            if isinstance(stmt, ast.If):
                taken = self.condition(stmt.test, layer_type)
                if taken is None:  # e.g. `if self._use_rope:` around a rotary embedding: no weights either way
                    either = self.statements(stmt.body, prefix, layer_type) + self.statements(stmt.orelse, prefix,
                                                                                              layer_type)
                    if either:
                        raise SystemExit(f"cannot decide `{ast.unparse(stmt.test)}`, which creates {either}, from "
                                         "the config; extend Walker.condition")
                    continue
                out += self.statements(stmt.body if taken else stmt.orelse, prefix, layer_type)
            elif isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
                out += self.assignment(stmt.targets[0], stmt.value, prefix, layer_type)
        return out

    def assignment(self, target: ast.expr, call: ast.Call, prefix: str, layer_type: str | None) -> list[str]:
        name = call_name(call)
        if isinstance(target, ast.Tuple) and name == "make_layers":  # start, end, self.layers = make_layers(...)
            layer_cls = call_name(call.args[1].body)  # lambda prefix: OlmoHybridDecoderLayer(...)
            types = self.config["layer_types"]
            return [p for i in range(self.config["num_hidden_layers"])
                    for p in self.params(layer_cls, f"{prefix}{target.elts[-1].attr}.{i}.", types[i])]
        if not (isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self"):
            return []
        attr = f"{prefix}{target.attr}"
        if name == "Parameter":
            return [attr]
        if name in WEIGHTED_LAYERS:
            return [f"{attr}.weight"] + ([f"{attr}.bias"] if has_bias(call) else [])
        if name in self.defs:
            return self.params(name, f"{attr}.", layer_type)
        return []


def stacked_mapping(model_file: str) -> dict[str, tuple[str, object]]:
    """``hf_to_vllm_mapper``'s ``orig_to_new_stacked``: {checkpoint substring: (vLLM substring, shard)}."""
    with open(model_file) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "orig_to_new_stacked":
            return {k: tuple(v) for k, v in ast.literal_eval(node.value).items()}
    raise SystemExit(f"{model_file}: no orig_to_new_stacked mapping")


def checkpoint_names(vllm_names: list[str], stacked: dict[str, tuple[str, object]]) -> list[str]:
    """Each vLLM parameter as the checkpoint names its loader takes (one per packed shard)."""
    out = []
    for name in vllm_names:
        sources = [name.replace(new, orig, 1) for orig, (new, _) in stacked.items() if f"{new}." in name]
        out += sources or [name]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vllm", required=True, help="the vllm package folder (its source is read, not imported)")
    ap.add_argument("--config", default="configs/tiny/olmo_hybrid.json")
    ap.add_argument("--out", default="tests/rollout/vllm_olmo_hybrid_names.json")
    ap.add_argument("--version", default="0.26.0", help="the vLLM version read, recorded in the output")
    args = ap.parse_args(argv)
    with open(args.config) as f:
        config = json.load(f)
    model_file, gdn_file = os.path.join(args.vllm, MODEL_FILE), os.path.join(args.vllm, GDN_FILE)
    vllm_names = Walker(classes([model_file, gdn_file]), config).params(TOP_CLASS, "")
    stacked = stacked_mapping(model_file)
    names = checkpoint_names(vllm_names, stacked)
    result = {"vllm": args.version,
              "files": [MODEL_FILE, GDN_FILE], "config": args.config,
              "vllm_parameters": vllm_names, "checkpoint_names": names}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(vllm_names)} vLLM parameters, {len(names)} checkpoint names")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
