"""fla-org/flame's job-config keys, read by flare.

flame (github.com/fla-org/flame) parses torchtitan's older config layout plus keys of its own. Every
key its ``flame/config_manager.py`` defines, and the few its own job files set beyond those, is
listed in ``KEYS`` as one of:

- ``Same``: flare has a key of that name with the same meaning; it passes unchanged.
- ``Mapped``: renamed to one or more flare keys (the value converted where needed); startup logs
  ``flame key X -> flare key Y``.
- ``Refused``: no flare equivalent and it changes training; any value but flame's default stops
  the job with a one-line ``<key>=<value>: <reason>``. At flame's default it is dropped with a notice.
- ``Cosmetic``: changes nothing flare does; dropped with a notice.

``translate_toml`` and ``translate_cli`` rewrite a job file's values and the command line before
flare checks for unknown keys. A flame key and the flare key it maps to may both be set in one
place (the same file, or the command line) only with equal values; otherwise that is a one-line
error naming both. Across places the usual precedence holds: the command line over the file.
``tests/test_flame_keys.py`` checks ``KEYS`` against the list of flame's keys in
``tests/data/flame_keys.json`` (written by ``scripts/dev/flame_key_list.py``) and
``docs/from_flame.md``'s table against ``KEYS``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from recipe.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Same:
    note: str = ""


@dataclass(frozen=True)
class Mapped:
    targets: tuple[str, ...]
    note: str = ""
    convert: Callable[[Any], Any] | None = None  # flame value -> flare value (raises ConfigError)


@dataclass(frozen=True)
class Refused:
    default: Any  # flame's default: accepted (and dropped)
    reason: str


@dataclass(frozen=True)
class Cosmetic:
    note: str


def _to(*targets: str, note: str = "", convert=None) -> Mapped:
    return Mapped(tuple(targets), note, convert)


def _custom_import(value: str) -> str:
    """flame imports a file path or a dotted module; flare's experimental.custom_import a dotted module."""
    if "/" in value or value.endswith(".py"):
        raise ConfigError(
            f"experimental.custom_model_path={value!r}: flare imports a dotted module, not a file; set "
            "experimental.custom_import = '<package.module>' (importable from flare's root or PYTHONPATH)"
        )
    return value


_PP = "pipeline parallelism is not supported by flare; remove it"
_CP = "context parallelism is not supported by flare; remove it"

KEYS: dict[str, Same | Mapped | Refused | Cosmetic] = {
    # [job]
    "job.config_file": Same(),
    "job.description": Same(),
    "job.dump_folder": Same("flame's default is ./torchtitan/outputs, flare's ./outputs"),
    "job.print_args": _to("job.print_config", note="rank 0 prints the resolved config as JSON"),
    "job.use_for_integration_test": Cosmetic("marks torchtitan's own integration tests; flare has none to mark"),
    # [model]
    "model.name": Same("a label in flare; the architecture comes from model.config"),
    "model.config": Same("a local HF config JSON or model folder (flare does not download configs)"),
    "model.tokenizer_path": _to("model.tokenizer", note="a local HF tokenizer folder, a hub name, or 'bytes'"),
    "model.converters": Same("flame's 'float8' converter is named 'quantize.linear.float8' in torchtitan 0.2.2"),
    "model.print_after_conversion": Same(),
    # [profiling]
    "profiling.enable_profiling": Same(),
    "profiling.save_traces_folder": Same(),
    "profiling.profile_freq": Same(),
    "profiling.enable_memory_snapshot": Same(),
    "profiling.save_memory_snapshot_folder": Same(),
    # [optimizer]
    "optimizer.name": Same("Adam or AdamW"),
    "optimizer.eps": Same(),
    "optimizer.lr": Same(),
    "optimizer.beta1": Same(),
    "optimizer.beta2": Same(),
    "optimizer.weight_decay": Same(),
    "optimizer.implementation": Same(),
    "optimizer.early_step_in_backward": Same("refused by flare when true (it would bypass clipping)"),
    # [lr_scheduler]
    "lr_scheduler.warmup_steps": Same(),
    "lr_scheduler.decay_ratio": Same(),
    "lr_scheduler.decay_type": Same(),
    "lr_scheduler.lr_min": _to("lr_scheduler.min_lr_factor", note="the same fraction of optimizer.lr"),
    # [training]
    "training.batch_size": _to("training.local_batch_size", note="sequences per data-parallel rank"),
    "training.seq_len": Same(),
    "training.context_len": Same("flame's default is 2048, flare's seq_len; read only with varlen in both"),
    "training.varlen": Same(),
    "training.gradient_accumulation_steps": Same(),
    "training.steps": Same(),
    "training.max_norm": Same(),
    "training.skip_nan_inf": Same("flame's default is false, flare's true"),
    "training.dataset": Same(),
    "training.dataset_name": Same(),
    "training.dataset_split": Same(),
    "training.data_dir": Same(),
    "training.data_files": Same(),
    "training.data_probs": Same(),
    "training.streaming": Same(),
    "training.num_workers": _to("training.dataloader.num_workers", note="dataloader worker processes"),
    "training.prefetch_factor": _to(
        "training.dataloader.prefetch_factor", note="dropped when num_workers is 0 (no workers to prefetch)"
    ),
    "training.pin_memory": _to("training.dataloader.pin_memory"),
    "training.persistent_workers": _to(
        "training.dataloader.persistent_workers", note="dropped when num_workers is 0 (no workers to keep)"
    ),
    "training.data_parallel_replicate_degree": _to("parallelism.data_parallel_replicate_degree"),
    "training.data_parallel_shard_degree": _to("parallelism.data_parallel_shard_degree"),
    "training.enable_cpu_offload": Same(),
    "training.tensor_parallel_degree": _to("parallelism.tensor_parallel_degree"),
    "training.disable_loss_parallel": _to("parallelism.disable_loss_parallel"),
    "training.fsdp_reshard_after_forward": _to("parallelism.fsdp_reshard_after_forward"),
    "training.mixed_precision_param": Same("on one device flare computes with bf16 parameters through FSDP"),
    "training.mixed_precision_reduce": Same(),
    "training.compile": _to("compile.enable", note="compiles each block"),
    "training.gc_freq": Same(),
    "training.seed": _to(
        "debug.seed", "training.data_seed", note="flame seeds both the model and the data order with it"
    ),
    "training.deterministic": _to("debug.deterministic"),
    # [metrics]
    "metrics.log_freq": Same(),
    "metrics.enable_tensorboard": Same(),
    "metrics.disable_color_printing": Same(),
    "metrics.save_tb_folder": Same(),
    "metrics.save_for_all_ranks": Same(),
    "metrics.enable_wandb": Same(),
    # [experimental]
    "experimental.enable_async_tensor_parallel": _to("parallelism.enable_async_tensor_parallel"),
    "experimental.pipeline_parallel_degree": Refused(1, _PP),
    "experimental.pipeline_parallel_split_points": Refused([], _PP),
    "experimental.pipeline_parallel_schedule": Refused("1F1B", _PP),
    "experimental.pipeline_parallel_schedule_csv": Refused("", _PP),
    "experimental.pipeline_parallel_microbatches": Refused(None, _PP),
    "experimental.enable_compiled_autograd": Refused(
        False, "flare does not compile the backward with compiled autograd; remove it (compile.enable compiles "
        "each block's forward and backward)"
    ),
    "experimental.context_parallel_degree": Refused(1, _CP),
    "experimental.context_parallel_rotate_method": Refused("allgather", _CP),
    "experimental.custom_model_path": _to(
        "experimental.custom_import", note="a dotted module (flare imports no file paths)", convert=_custom_import
    ),
    # [checkpoint]
    "checkpoint.enable_checkpoint": _to("checkpoint.enable"),
    "checkpoint.folder": Same(),
    "checkpoint.initial_load_path": Same(),
    "checkpoint.initial_load_model_weights_only": _to("checkpoint.initial_load_model_only"),
    "checkpoint.interval": Same(),
    "checkpoint.interval_type": Cosmetic(
        "read by neither flame nor flare; both checkpoint every checkpoint.interval steps"
    ),
    "checkpoint.last_save_model_weights_only": _to("checkpoint.last_save_model_only"),
    "checkpoint.model_weights_only": _to(
        "checkpoint.last_save_model_only", note="torchtitan's older name; flame's own code does not read it"
    ),
    "checkpoint.export_dtype": Same(),
    "checkpoint.create_seed_checkpoint": Same("refused by flare when true"),
    "checkpoint.async_mode": Same(),
    "checkpoint.keep_latest_k": Same("flame's default is 0 (keep all), flare's 10"),
    "checkpoint.load_step": Same(),
    "checkpoint.exclude_from_loading": Same(),
    # [activation_checkpoint]
    "activation_checkpoint.mode": Same("flame's default is selective, flare's none"),
    "activation_checkpoint.selective_ac_option": Same(),
    "activation_offload.mode": Refused(
        "none", "flare has no activation offloading; remove it (activation_checkpoint.mode saves activation memory)"
    ),
    # [float8]
    "float8.enable_fsdp_float8_all_gather": _to("quantize.linear.float8.enable_fsdp_float8_all_gather"),
    "float8.precompute_float8_dynamic_scale_for_fsdp": _to(
        "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp"
    ),
    "float8.force_recompute_fp8_weight_in_bwd": Refused(
        False, "torchtitan 0.2.2's float8 converter has no such option; remove it"
    ),
    "float8.recipe_name": _to("quantize.linear.float8.recipe_name"),
    # [comm]
    "comm.init_timeout_seconds": Same(),
    "comm.train_timeout_seconds": Same(),
    "comm.trace_buf_size": Same(),
    # [memory_estimation]
    "memory_estimation.enabled": Refused(
        False, "flare has no FSDP memory-estimation run; --job.dry_run prints parameter, gradient and optimizer "
        "memory per rank"
    ),
    "memory_estimation.disable_fake_mode": Same("refused by flare when true"),
    # [fault_tolerance]: torchtitan 0.2.2 has the same keys; flare refuses them when set.
    "fault_tolerance.enable": Same("refused by flare when true"),
    "fault_tolerance.replica_id": Same("refused by flare when set"),
    "fault_tolerance.group_size": Same("refused by flare when set"),
    "fault_tolerance.min_replica_size": Same("refused by flare when set"),
}

# Mapped values a DataLoader without worker processes refuses (torch raises on them).
_WORKER_ONLY = ("training.dataloader.prefetch_factor", "training.dataloader.persistent_workers")


@dataclass
class Translation:
    """What one parse took from flame: notices to log, and the flare keys set through flame keys."""

    notices: list[str] = field(default_factory=list)
    from_flame: dict[str, str] = field(default_factory=dict)  # flare key -> flame key

    def note(self, text: str) -> None:
        if text not in self.notices:
            self.notices.append(text)


# --------------------------------------------------------------------------- values


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return list(value)


def _same_as_default(value: Any, default: Any) -> bool:
    if isinstance(default, list):
        return _string_list(value) == default
    if isinstance(default, bool):
        return value is default
    return value == default


def _cli_value(raw: str, default: Any) -> Any:
    """A command-line string read as flame's parser would type it (its default's type)."""
    if isinstance(default, bool):
        return _bool(raw)
    if isinstance(default, list):
        return _string_list(raw)
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(raw)
            except ValueError:
                return raw
    return None if default is None and raw.lower() == "none" else raw


def _bool(raw: str) -> bool | None:
    return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(raw.strip().lower())


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _refuse(key: str, entry: Refused, value: Any, t: Translation) -> None:
    if not _same_as_default(value, entry.default):
        raise ConfigError(f"{key}={_toml_repr(value)}: {entry.reason}")
    t.note(f"flame key {key} = {_toml_repr(value)}: flame's default, nothing to do in flare")


def _mapping_notice(key: str, entry: Mapped) -> str:
    return f"flame key {key} -> flare key {', '.join(entry.targets)}"


# --------------------------------------------------------------------------- TOML


def _get_nested(values: dict, dotted: str) -> tuple[bool, Any]:
    *sections, name = dotted.split(".")
    for s in sections:
        values = values.get(s)
        if not isinstance(values, dict):
            return False, None
    return (name in values), values.get(name)


def _set_nested(values: dict, dotted: str, value: Any) -> None:
    *sections, name = dotted.split(".")
    for s in sections:
        values = values.setdefault(s, {})
    values[name] = value


def translate_toml(values: dict, where: str, t: Translation) -> dict:
    """`values` (a parsed job file) with flame's keys replaced by flare's; raises ConfigError."""
    out = {s: (dict(body) if isinstance(body, dict) else body) for s, body in values.items()}
    set_by: dict[str, tuple[str, Any]] = {}  # flare key -> (flame key, value) set from this file
    for section, body in values.items():
        if not isinstance(body, dict):
            continue
        for name, value in body.items():
            key = f"{section}.{name}"
            entry = KEYS.get(key)
            if entry is None or isinstance(entry, Same):
                continue
            del out[section][name]
            if isinstance(entry, Refused):
                _refuse(key, entry, value, t)
            elif isinstance(entry, Cosmetic):
                t.note(f"flame key {key}: ignored ({entry.note})")
            else:
                flare_value = entry.convert(value) if entry.convert else value
                for target in entry.targets:
                    _check_agreement_toml(values, where, key, flare_value, target, set_by)
                    set_by[target] = (key, flare_value)
                    _set_nested(out, target, flare_value)
                    t.from_flame[target] = key
                t.note(_mapping_notice(key, entry))
            if not out[section]:
                del out[section]
    return out


def _check_agreement_toml(values, where, key, value, target, set_by) -> None:
    present, flare_value = _get_nested(values, target)
    if present and flare_value != value:
        raise ConfigError(
            f"{where}: {key}={_toml_repr(value)} (flame's name for {target}) and {target}="
            f"{_toml_repr(flare_value)} disagree; keep one of them"
        )
    if target in set_by and set_by[target][1] != value:
        other, other_value = set_by[target]
        raise ConfigError(
            f"{where}: {key}={_toml_repr(value)} and {other}={_toml_repr(other_value)} both set {target} "
            "and disagree; keep one of them"
        )


# --------------------------------------------------------------------------- command line


def _flame_flag(key: str) -> bool:
    """Is `key` a flame on/off flag (store_true/store_false)? Known from its default or flare type."""
    entry = KEYS[key]
    if isinstance(entry, Refused):
        return isinstance(entry.default, bool)
    return key in _FLAGS


# flame's store_true/store_false arguments among the mapped and cosmetic keys (and the boolean keys
# its job files set beyond its parser): on the command line they take no value, or true/false.
_FLAGS = {
    "job.print_args", "job.use_for_integration_test", "training.compile", "training.deterministic",
    "training.disable_loss_parallel", "experimental.enable_async_tensor_parallel",
    "checkpoint.enable_checkpoint", "checkpoint.initial_load_model_weights_only",
    "checkpoint.last_save_model_weights_only", "checkpoint.model_weights_only",
    "training.pin_memory", "training.persistent_workers",
    "float8.enable_fsdp_float8_all_gather", "float8.precompute_float8_dynamic_scale_for_fsdp",
}


def _split_cli(args: list[str]) -> list[tuple[str, bool, str | None, list[str]]]:
    """[(key, negated, value after '=', following non-option tokens)] for each --option in `args`."""
    items = []
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            items.append([key.replace("-", "_"), eq and value, []])
        elif items:
            items[-1][2].append(arg)
        else:
            items.append([None, None, [arg]])  # flare's own check reports it
    return [(k, v if v != "" else None, rest) for k, v, rest in items]


def _flame_key_of(key: str) -> tuple[str | None, bool]:
    """(flame key, negated) for a command-line key, accepting flame's `--section.no_flag` form."""
    if key in KEYS and not isinstance(KEYS[key], Same):
        return key, False
    if ".no_" in key:
        plain = key.replace(".no_", ".", 1)
        if plain in KEYS and not isinstance(KEYS[plain], Same) and _flame_flag(plain):
            return plain, True
    return None, False


def _render(key: str | None, eq_value: str | None, rest: list[str]) -> list[str]:
    if key is None:
        return rest
    head = f"--{key}" if eq_value is None else f"--{key}={eq_value}"
    return [head, *rest]


def translate_cli(args: list[str], cls: type, t: Translation) -> list[str]:
    """`args` with flame's `--section.key [value]` options rewritten as flare's; raises ConfigError."""
    from recipe.config import _cli_value_problem, _lookup

    out: list[str] = []
    set_by: dict[str, tuple[str, str]] = {}  # flare key -> (flame option, value as given)
    flare_given: dict[str, str] = {}  # flare key -> value as given on the command line
    for key, eq_value, rest in _split_cli(args):
        flame_key, negated = _flame_key_of(key) if key else (None, False)
        if flame_key is None:
            out += _render(key, eq_value, rest)
            if key:
                ftype, _ = _lookup(cls, key)
                if ftype is None and ".no_" in key and _lookup(cls, key.replace(".no_", ".", 1))[0] is bool:
                    flare_given[key.replace(".no_", ".", 1)] = "false"
                elif ftype is bool:
                    given = eq_value or (rest[0] if rest else "true")
                else:
                    given = eq_value if eq_value is not None else (rest[0] if rest else None)
                if given is not None:
                    flare_given[key] = given
            continue
        entry = KEYS[flame_key]
        raw, rest = _take_value(flame_key, negated, eq_value, rest)
        out += rest
        if isinstance(entry, Refused):
            _refuse(flame_key, entry, _cli_value(raw, entry.default), t)
        elif isinstance(entry, Cosmetic):
            t.note(f"flame key {flame_key}: ignored ({entry.note})")
        else:
            value = entry.convert(raw) if entry.convert else raw
            for target in entry.targets:
                ftype, _ = _lookup(cls, target)
                problem = _cli_value_problem(value, ftype) if ftype is not bool else None
                if problem:
                    raise ConfigError(f"--{flame_key}: {problem}")
                if target in set_by and not _equal(set_by[target][1], value, ftype):
                    raise ConfigError(
                        f"--{flame_key} {value} and --{set_by[target][0]} {set_by[target][1]} both set {target} "
                        "and disagree on the command line; keep one of them"
                    )
                set_by[target] = (flame_key, value)
                out.append(f"--{target}={value}")
                t.from_flame[target] = flame_key
            t.note(_mapping_notice(flame_key, entry))
    for target, (flame_key, value) in set_by.items():
        ftype, _ = _lookup(cls, target)
        if target in flare_given and not _equal(flare_given[target], value, ftype):
            raise ConfigError(
                f"--{flame_key} {value} (flame's name for {target}) and --{target} {flare_given[target]} "
                "disagree on the command line; keep one of them"
            )
    return out


def _take_value(key: str, negated: bool, eq_value: str | None, rest: list[str]) -> tuple[str, list[str]]:
    """(the option's value as a string, the tokens after it that are not its value)."""
    if _flame_flag(key):
        if negated:
            return "false", rest
        raw = eq_value if eq_value is not None else (rest[0] if rest else None)
        if raw is None:
            return "true", rest
        truth = _bool(raw)
        if truth is None:
            raise ConfigError(f"--{key}: must be true or false, got {raw!r}")
        return ("true" if truth else "false"), (rest if eq_value is not None else rest[1:])
    if eq_value is not None:
        return eq_value, rest
    if not rest:
        raise ConfigError(f"--{key}: missing value")
    entry = KEYS[key]
    if isinstance(entry, Refused) and isinstance(entry.default, list):
        return ",".join(rest), []  # flame's nargs="+" lists
    return rest[0], rest[1:]


def _equal(a: str, b: str, ftype: Any) -> bool:
    if ftype is bool:
        return _bool(a) == _bool(b)
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


# --------------------------------------------------------------------------- after parsing


def settle(config, t: Translation) -> None:
    """Fix-ups that need the resolved config, then log the notices (rank 0 logs at INFO)."""
    loader = config.training.dataloader
    if loader.num_workers == 0:
        for target in _WORKER_ONLY:
            if target in t.from_flame:
                name = target.rpartition(".")[2]
                setattr(loader, name, None if name == "prefetch_factor" else False)
                t.note(
                    f"flame key {t.from_flame[target]}: dropped, training.dataloader.num_workers = 0 "
                    "loads data in the main process"
                )
    for line in t.notices:
        logger.info(line)


# --------------------------------------------------------------------------- docs/from_flame.md


def doc_table() -> str:
    """The key map as docs/from_flame.md shows it (`python -m recipe.flame_keys` prints it)."""
    rows = ["| flame key | in flare | notes |", "|---|---|---|"]
    for key, entry in KEYS.items():
        if isinstance(entry, Same):
            flare, note = "same key", entry.note
        elif isinstance(entry, Mapped):
            flare, note = ", ".join(f"`{t}`" for t in entry.targets), entry.note
        elif isinstance(entry, Refused):
            default = "unset" if entry.default is None else f"`{_toml_repr(entry.default)}`"
            flare, note = f"refused unless {default}", entry.reason
        else:
            flare, note = "ignored, with a notice", entry.note
        rows.append(f"| `{key}` | {flare} | {note} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(doc_table(), end="")
