"""Job config: torchtitan 0.2.2's ConfigManager/JobConfig plus flare's sections, validated.

Precedence is torchtitan's: CLI (``--section.key value``) > TOML (``--job.config_file``) > defaults.
Everything a user can get wrong is checked here, before any process group or device work, and
reported as a ``ConfigError`` whose one-line message names the key (or file) and the fix.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import sys
import types
import typing
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from torchtitan.config import ConfigManager

from recipe import flame_keys
from recipe import job_config as flare_sections
from recipe import torchtitan_keys
from recipe.errors import ConfigError


def field_docstrings(module: types.ModuleType) -> dict[tuple[type, str], str]:
    """{(dataclass, field name): its docstring, whitespace collapsed} for the dataclasses of `module`."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):  # no source (e.g. a compiled module)
        return {}
    docs = {}
    for node in tree.body:
        cls = getattr(module, node.name, None) if isinstance(node, ast.ClassDef) else None
        if not is_dataclass(cls):
            continue
        for stmt, doc in zip(node.body, node.body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(doc, ast.Expr)
                and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)
            ):
                docs[(cls, stmt.target.id)] = " ".join(doc.value.value.split())
    return docs


def _set_help(cls: type, name: str, text: str) -> None:
    f = cls.__dataclass_fields__[name]
    f.metadata = types.MappingProxyType({**f.metadata, "help": text})


def docstrings_as_help(module: types.ModuleType) -> None:
    """Copy each dataclass field's docstring in `module` into its ``metadata["help"]``.

    tyro reads a field's help from the docstrings of its class and that class's bases. torchtitan's
    merge puts flare's fields into new subclasses of torchtitan's sections, so ``--help`` showed
    nothing for flare's additions there and torchtitan's text for the fields flare overrides. The
    merge keeps the Field objects, and tyro prefers ``metadata["help"]`` to docstrings.
    """
    for (cls, name), doc in field_docstrings(module).items():
        if "help" not in cls.__dataclass_fields__[name].metadata:
            _set_help(cls, name, doc)


_REFUSED_MARK = "flare refuses any value but the default:"


def refusals_in_help() -> None:
    """Append flare's refusal (recipe/torchtitan_keys.py) to the ``--help`` text of each refused
    torchtitan key, except in classes torchtitan uses for several sections (its DataLoader)."""
    from torchtitan.config import job_config as titan

    docs = field_docstrings(titan)
    uses: dict[type, int] = {}

    def count(cls):
        for f in fields(cls):
            if is_dataclass(f.type):
                uses[f.type] = uses.get(f.type, 0) + 1
                count(f.type)

    count(titan.JobConfig)
    for key, reason in torchtitan_keys.REFUSED.items():
        *sections, name = key.split(".")
        cls = titan.JobConfig
        for section in sections:
            cls = cls.__dataclass_fields__[section].type
        current = cls.__dataclass_fields__[name].metadata.get("help", docs.get((cls, name), ""))
        if uses.get(cls, 0) == 1 and _REFUSED_MARK not in current:
            _set_help(cls, name, f"{current} [{_REFUSED_MARK} {reason}]".strip())


class FlareConfigManager(ConfigManager):
    """torchtitan's ConfigManager that always merges flare's sections (recipe/job_config.py).

    `toml_values`, when given, stand for the job file's contents (flame's keys already translated).
    """

    def __init__(self, toml_values: dict | None = None):
        super().__init__()
        self._toml_values = toml_values

    def _maybe_load_toml(self, args):
        return self._toml_values if self._toml_values is not None else super()._maybe_load_toml(args)

    def _maybe_add_custom_config(self, args, toml_values):
        docstrings_as_help(flare_sections)
        refusals_in_help()
        merged = self._merge_configs(self.config_cls, flare_sections.JobConfig)
        user_module = _custom_config_module(args, toml_values)
        if user_module:
            try:
                module = importlib.import_module(user_module)
                user_cls = module.JobConfig
            except (ImportError, AttributeError) as e:
                raise ConfigError(
                    f"job.custom_config_module: cannot import JobConfig from '{user_module}' ({e})"
                ) from None
            docstrings_as_help(module)
            merged = self._merge_configs(merged, user_cls)
        return merged

    def _validate_config(self) -> None:
        # torchtitan's version warns about its own tokenizer assets; flare has its own tokenizer key.
        pass


def config_class(args: list[str] | None = None, toml_values: dict | None = None) -> type:
    """The merged JobConfig dataclass (torchtitan + flare + an optional user module)."""
    return FlareConfigManager()._maybe_add_custom_config(args or [], toml_values)


def parse_job_config(args: list[str] | None = None, world_size: int | None = None):
    """Parse and validate a job config from CLI args (default: sys.argv[1:])."""
    args = list(sys.argv[1:] if args is None else args)
    if any(a in ("-h", "--help") for a in args):
        return FlareConfigManager().parse_args(args)  # tyro prints the full reference and exits

    toml_path, toml_values = _load_toml(args)
    cls = config_class(args, toml_values)
    flame = flame_keys.Translation()  # flame's keys -> flare's (recipe/flame_keys.py)
    if toml_values:
        toml_values = flame_keys.translate_toml(toml_values, toml_path, flame)
        _check_toml(cls, toml_values, toml_path)
    tyro_args = _normalize_cli(cls, flame_keys.translate_cli(args, cls, flame))

    manager = FlareConfigManager(toml_values)
    try:
        config = manager.parse_args(tyro_args)
    except SystemExit as e:  # tyro found something our pre-checks missed
        raise ConfigError(f"command line: could not parse {' '.join(args)!r} (exit {e.code})") from None
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, world_size)
    flame_keys.settle(config, flame)
    return config


# --------------------------------------------------------------------------- TOML


def _custom_config_module(args: list[str], toml_values: dict | None) -> str:
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key in ("--job.custom_config_module", "--job.custom-config-module"):
            return value or (args[i + 1] if i + 1 < len(args) else "")
    if toml_values and isinstance(toml_values.get("job"), dict):
        return toml_values["job"].get("custom_config_module", "") or ""
    return ""


def _load_toml(args: list[str]) -> tuple[str | None, dict | None]:
    path = None
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if key in ("--job.config_file", "--job.config-file"):
            if sep:
                path = value
            elif i + 1 < len(args):
                path = args[i + 1]
            else:
                raise ConfigError("job.config_file: missing value; pass --job.config_file configs/X.toml")
    if path is None:
        return None, None
    if not os.path.isfile(path):
        raise ConfigError(f"job.config_file: no such file '{path}'; pass an existing TOML (see configs/)")
    try:
        with open(path, "rb") as f:
            return path, tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _check_toml(cls: type, values: dict, path: str | None) -> None:
    where = path or "TOML"
    known = {f.name: f for f in fields(cls)}
    for section, body in values.items():
        if section not in known:
            raise ConfigError(f"{where}: unknown section [{section}]{_did_you_mean(section, known)}")
        section_type = _resolve(cls, known[section])
        if not isinstance(body, dict):
            raise ConfigError(f"{where}: '{section}' must be a [{section}] table, got {body!r}")
        _check_table(section_type, body, f"{where}: {section}")


def _check_table(cls: type, body: dict, prefix: str) -> None:
    known = {f.name: f for f in fields(cls)}
    for key, value in body.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown key{_did_you_mean(key, known)}")
        ftype = _resolve(cls, known[key])
        if is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}.{key}: must be a table, got {value!r}")
            _check_table(ftype, value, f"{prefix}.{key}")
            continue
        problem = _type_problem(value, ftype)
        if problem:
            raise ConfigError(f"{prefix}.{key}: {problem}")


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(options))}"


def _resolve(cls: type, f) -> Any:
    if not isinstance(f.type, str):
        return f.type
    return typing.get_type_hints(cls).get(f.name, f.type)


def _type_problem(value: Any, ftype: Any) -> str | None:
    """None if `value` (from TOML) fits `ftype`, else a short description of the mismatch."""
    origin = typing.get_origin(ftype)
    if ftype is Any:
        return None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(ftype)
        if value is None and type(None) in options:
            return None
        problems = [_type_problem(value, t) for t in options if t is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if origin is Literal:
        allowed = typing.get_args(ftype)
        return None if value in allowed else f"must be one of {list(allowed)}, got {value!r}"
    if origin is list:
        (item,) = typing.get_args(ftype) or (Any,)
        if isinstance(value, str) and item is str:
            return None  # "a,b" is accepted like on the CLI
        if not isinstance(value, list):
            return f"must be a list, got {value!r}"
        for v in value:
            p = _type_problem(v, item)
            if p:
                return f"list item {v!r}: {p}"
        return None
    if ftype is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if ftype is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if ftype is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if ftype is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    return None


# --------------------------------------------------------------------------- CLI


def _normalize_cli(cls: type, args: list[str]) -> list[str]:
    """Check every `--section.key [value]` and rewrite it into the form tyro expects.

    Accepted: `--a.b v`, `--a.b=v`, hyphens or underscores, and for booleans `--a.b`,
    `--a.b true|false` and `--a.no_b`. Unknown keys and unparsable values raise ConfigError.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: unexpected argument {arg!r}; use --section.key value")
        key, has_eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        negated = False
        ftype, canonical = _lookup(cls, key)
        if ftype is None and ".no_" in key:
            ftype, canonical = _lookup(cls, key.replace(".no_", ".", 1))
            negated = ftype is bool
            if not negated:
                ftype = None
        if ftype is None:
            raise ConfigError(f"--{key}: unknown option{_cli_suggestion(cls, key)}")
        i += 1
        if ftype is bool:
            if negated:
                out.append(f"--{_tyro_name(canonical, negate=True)}")
                continue
            if not has_eq and i < len(args) and not args[i].startswith("--"):
                value, has_eq = args[i], True
                i += 1
            truth = True if not has_eq else _parse_bool(key, value)
            out.append(f"--{_tyro_name(canonical, negate=not truth)}")
            continue
        if not has_eq:
            if i >= len(args) or (args[i].startswith("--") and not _looks_numeric(args[i])):
                raise ConfigError(f"--{key}: missing value")
            value = args[i]
            i += 1
        problem = _cli_value_problem(value, ftype)
        if problem:
            raise ConfigError(f"--{key}: {problem}")
        out += [f"--{canonical}", value]
    return out


def _lookup(cls: type, dotted: str) -> tuple[Any, str]:
    parts = dotted.split(".")
    current = cls
    for n, part in enumerate(parts):
        if not is_dataclass(current):
            return None, dotted
        f = {f.name: f for f in fields(current)}.get(part)
        if f is None:
            return None, dotted
        current = _resolve(current, f)
    if is_dataclass(current):
        return None, dotted
    return current, dotted


def _cli_suggestion(cls: type, key: str) -> str:
    options = []

    def walk(c, prefix):
        for f in fields(c):
            t = _resolve(c, f)
            if is_dataclass(t):
                walk(t, f"{prefix}{f.name}.")
            else:
                options.append(prefix + f.name)

    walk(cls, "")
    close = difflib.get_close_matches(key, options, n=1)
    return f"; did you mean --{close[0]}?" if close else "; see python train.py --help"


def _tyro_name(canonical: str, negate: bool = False) -> str:
    if not negate:
        return canonical
    section, _, leaf = canonical.rpartition(".")
    return f"{section}.no-{leaf}" if section else f"no-{leaf}"


def _parse_bool(key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ConfigError(f"--{key}: must be true or false, got {value!r}")


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _cli_value_problem(value: str, ftype: Any) -> str | None:
    origin = typing.get_origin(ftype)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(ftype) if t is not type(None)]
        if value.lower() == "none" and type(None) in typing.get_args(ftype):
            return None
        problems = [_cli_value_problem(value, t) for t in options]
        return None if any(p is None for p in problems) else problems[0]
    if origin is Literal:
        allowed = [str(a) for a in typing.get_args(ftype)]
        return None if value in allowed else f"must be one of {allowed}, got {value!r}"
    if ftype is int:
        try:
            int(value)
        except ValueError:
            return f"must be an integer, got {value!r}"
    if ftype is float:
        try:
            float(value)
        except ValueError:
            return f"must be a number, got {value!r}"
    return None


# --------------------------------------------------------------------------- semantics


def gradient_accumulation_steps(config, dp_degree: int) -> int:
    """Micro-batches per optimizer step, from training.gradient_accumulation_steps or global_batch_size."""
    t = config.training
    per_step = t.local_batch_size * dp_degree
    if t.gradient_accumulation_steps is not None:
        steps = t.gradient_accumulation_steps
        if t.global_batch_size > 0 and t.global_batch_size != per_step * steps:
            raise ConfigError(
                f"training.global_batch_size={t.global_batch_size} disagrees with local_batch_size "
                f"({t.local_batch_size}) x data-parallel degree ({dp_degree}) x "
                f"gradient_accumulation_steps ({steps}) = {per_step * steps}; set only one of them"
            )
        return steps
    if t.global_batch_size <= 0:
        return 1
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} is not a multiple of local_batch_size "
            f"({t.local_batch_size}) x data-parallel degree ({dp_degree}) = {per_step}"
        )
    return t.global_batch_size // per_step


def data_parallel_degrees(config, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) with dp_shard=-1 resolved, as ParallelDims will."""
    p = config.parallelism
    others = p.data_parallel_replicate_degree * p.tensor_parallel_degree
    others *= p.context_parallel_degree * p.pipeline_parallel_degree
    shard = p.data_parallel_shard_degree
    if shard == -1:
        if world_size % others:
            raise ConfigError(
                f"parallelism: world size {world_size} is not divisible by data_parallel_replicate_degree "
                f"x tensor_parallel_degree = {others}; change the degrees or --nproc_per_node"
            )
        shard = world_size // others
    return p.data_parallel_replicate_degree, shard


def _validate_converters(names: list[str]) -> None:
    """model.converters names torchtitan's registry (flame's older "float8" is now
    "quantize.linear.float8"); an unknown name would otherwise be a KeyError deep in the trainer."""
    import torchtitan.components.quantization  # noqa: F401  (registers the float8/mx converters)
    from torchtitan.protocols.model_converter import _registry_model_converter_cls as registry

    for name in names:
        if name not in registry:
            close = [k for k in registry if k.endswith("." + name)] or difflib.get_close_matches(name, registry, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"model.converters: unknown converter '{name}'; {hint}registered: {', '.join(sorted(registry))}"
            )


def _get(config, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _toml_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def check_refused_keys(config) -> None:
    """torchtitan keys flare does not act on (recipe/torchtitan_keys.py) must keep torchtitan's default."""
    from torchtitan.config import JobConfig as TorchtitanJobConfig

    defaults = TorchtitanJobConfig()
    for key, reason in torchtitan_keys.REFUSED.items():
        value = _get(config, key)
        if value != _get(defaults, key):
            raise ConfigError(f"{key}={_toml_repr(value)}: {reason}")
    for key, (acted_on, reason) in torchtitan_keys.REFUSED_VALUES.items():
        value = _get(config, key)
        if not acted_on(value):
            raise ConfigError(f"{key}={_toml_repr(value)}: {reason}")


def validate(config, world_size: int) -> None:
    """Cross-field checks that need no devices and no process group."""
    t, p, c = config.training, config.parallelism, config.checkpoint

    check_refused_keys(config)

    for key, value in (
        ("training.steps", t.steps),
        ("training.local_batch_size", t.local_batch_size),
        ("training.seq_len", t.seq_len),
        ("metrics.log_freq", config.metrics.log_freq),
        ("checkpoint.interval", c.interval),
        ("training.gc_freq", t.gc_freq),
        ("model.norm_backward_programs_per_sm", config.model.norm_backward_programs_per_sm),
    ):
        if value <= 0:
            raise ConfigError(f"{key}={value}: must be a positive integer")
    if t.gradient_accumulation_steps is not None and t.gradient_accumulation_steps <= 0:
        raise ConfigError("training.gradient_accumulation_steps: must be a positive integer")
    if t.max_norm < 0:
        raise ConfigError(f"training.max_norm={t.max_norm}: must be >= 0 (0 disables clipping)")
    if c.keep_latest_k == 1 or c.keep_latest_k < 0:
        raise ConfigError(
            f"checkpoint.keep_latest_k={c.keep_latest_k}: use 0 (keep all) or >= 2 "
            "(the newest checkpoint may be the one being written)"
        )

    if config.optimizer.name not in ("Adam", "AdamW"):
        raise ConfigError(f"optimizer.name={config.optimizer.name!r}: torchtitan builds 'Adam' or 'AdamW'")
    if config.lr_scheduler.warmup_steps < 0:
        raise ConfigError(f"lr_scheduler.warmup_steps={config.lr_scheduler.warmup_steps}: must be >= 0")

    _validate_converters(config.model.converters)

    for key in ("data_parallel_replicate_degree", "tensor_parallel_degree"):
        if getattr(p, key) < 1:
            raise ConfigError(f"parallelism.{key}={getattr(p, key)}: must be >= 1")
    if p.data_parallel_shard_degree == 0 or p.data_parallel_shard_degree < -1:
        raise ConfigError(
            f"parallelism.data_parallel_shard_degree={p.data_parallel_shard_degree}: must be -1 (infer) or >= 1"
        )
    replicate, shard = data_parallel_degrees(config, world_size)
    product = replicate * shard * p.tensor_parallel_degree
    if product != world_size:
        raise ConfigError(
            f"parallelism: data_parallel_replicate_degree ({replicate}) x data_parallel_shard_degree ({shard}) "
            f"x tensor_parallel_degree ({p.tensor_parallel_degree}) = {product}, but the world size is "
            f"{world_size}; make the product equal --nproc_per_node x nodes"
        )
    if p.enable_async_tensor_parallel:
        if p.tensor_parallel_degree == 1:
            raise ConfigError("parallelism.enable_async_tensor_parallel needs tensor_parallel_degree > 1")
        if not config.compile.enable:
            raise ConfigError("parallelism.enable_async_tensor_parallel needs compile.enable = true")
    if p.tensor_parallel_degree > 1 and t.seq_len % p.tensor_parallel_degree:
        raise ConfigError(
            f"training.seq_len={t.seq_len} must be divisible by tensor_parallel_degree "
            f"({p.tensor_parallel_degree}) for sequence parallelism"
        )
    gradient_accumulation_steps(config, replicate * shard)

    if t.varlen:
        if t.context_len is not None and not 0 < t.context_len <= t.seq_len:
            raise ConfigError(
                f"training.context_len={t.context_len}: with varlen it must be in (0, seq_len={t.seq_len}]"
            )
    elif t.context_len is not None and t.context_len <= 0:
        raise ConfigError(f"training.context_len={t.context_len}: must be positive")
    if t.max_consecutive_skips < 0:
        raise ConfigError("training.max_consecutive_skips: must be >= 0 (0 disables the limit)")

    ac = config.activation_checkpoint
    if ac.mode == "selective" and ac.selective_ac_option != "op":
        if not ac.selective_ac_option.isdigit() or int(ac.selective_ac_option) < 1:
            raise ConfigError(
                f"activation_checkpoint.selective_ac_option={ac.selective_ac_option!r}: use 'op' or a "
                "positive integer N (checkpoint every N-th layer)"
            )
    if ac.mode == "memory_budget":
        raise ConfigError("activation_checkpoint.mode=memory_budget is not supported; use none, full or selective")

    if not os.path.exists(config.model.config):
        raise ConfigError(
            f"model.config: no such file or folder '{config.model.config}'; point it at an HF config JSON "
            "(see configs/*.json) or an HF model folder"
        )
    if config.model.init_from_hf and not os.path.isdir(config.model.init_from_hf):
        raise ConfigError(f"model.init_from_hf: no such folder '{config.model.init_from_hf}'")
    tok = config.model.tokenizer
    if tok.startswith(("/", "./", "../", "~")) and not os.path.exists(os.path.expanduser(tok)):
        raise ConfigError(
            f"model.tokenizer: no such file or folder '{tok}'; use \"bytes\" for the built-in byte "
            "tokenizer, a local HF tokenizer folder or a hub name"
        )
    if c.initial_load_path and not os.path.isdir(c.initial_load_path):
        raise ConfigError(f"checkpoint.initial_load_path: no such folder '{c.initial_load_path}'")


def field_docs(cls: type) -> dict[str, Any]:
    """{section.key: default} for every leaf field (used by the README's config reference test)."""
    out = {}
    for f in fields(cls):
        t = _resolve(cls, f)
        if is_dataclass(t):
            for k, v in field_docs(t).items():
                out[f"{f.name}.{k}"] = v
        else:
            out[f.name] = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return out
