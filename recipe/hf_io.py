"""HF model folders <-> DCP model-only checkpoints: read, validate against the model, write atomically.

The trainer's DCP checkpoints hold the model's own ``state_dict`` keys flat at the top level
(torchtitan's ``ModelWrapper``), beside ``optimizer.*``, ``lr_scheduler.*``, ``dataloader.*`` and
``train_state.*`` entries; a model-only checkpoint has the model keys alone. Those keys are exactly
the HF model's keys, so nothing is renamed in either direction (flame's converter nests them as
``model.model.*``, which a resumed job cannot load), except the names and splits transformers'
``save_pretrained`` writes otherwise for some model types (``SAVED_NAMES``, ``SAVED_SPLITS``). DCP stores global tensors, so one process reads
a checkpoint saved in any parallel layout, and DCP reshards a written one on load.

Every key and shape is checked against the model built (on the meta device) from the config, so a
checkpoint that does not belong to the config fails with the offending key named, before anything
is written. Outputs go to a temporary folder beside the destination and are renamed into place
only when complete.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from recipe.errors import UserError
from recipe.flame_checkpoint import MODEL_PREFIX, is_flame_checkpoint

# Top-level entries of a trainer checkpoint that are not model weights.
NON_MODEL_SECTIONS = ("optimizer", "lr_scheduler", "dataloader", "train_state")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
# Settings fla's config classes name otherwise than transformers' class of the same model_type,
# which transformers and vLLM build from config.json (they do not import fla): written under both.
TRANSFORMERS_NAMES = {
    "mamba2": {"norm_eps": "layer_norm_epsilon", "rmsnorm": "rms_norm", "dt_limit": "time_step_limit",
               "dt_min": "time_step_min", "dt_max": "time_step_max", "dt_init_floor": "time_step_floor"},
}
# Names transformers' save_pretrained writes (it reverses the renames it applies when loading),
# read under the model's own names, which are the ones written and the ones vLLM loads.
# transformers 5.24 writes OLMo-Hybrid's pre-norms as attention_layer_norm/feedforward_layer_norm
# (the attention blocks' post_attention_layernorm too), names vLLM 0.26 refuses.
SAVED_NAMES = {
    "olmo_hybrid": {"attention_layer_norm": "input_layernorm", "feedforward_layer_norm": "post_attention_layernorm"},
}
# Weights a model holds as several tensors that transformers' save_pretrained writes cut at other
# boundaries: transformers 5.24 cuts OLMo-Hybrid's stacked short convolutions [q | k | v] into
# three equal parts (so wrongly whenever value_dim != key_dim); read back joined and cut at the model's.
SAVED_SPLITS = {"olmo_hybrid": ("q_conv1d", "k_conv1d", "v_conv1d")}
# Initialization settings written switched off, because a reader applies them to loaded weights:
# transformers 5.24's Mamba2 `_init_weights` divides out_proj by sqrt(num_hidden_layers) in
# from_pretrained when rescale_prenorm_residual is set (fla's own class does not).
EXPORT_OFF = {"mamba2": ("rescale_prenorm_residual",)}


class ConversionError(UserError):
    """Bad input to a conversion; the message names the file or key."""


@dataclass
class ModelSpec:
    """What a checkpoint of this config must hold, from the model built on the meta device."""

    config: object
    architecture: str
    shapes: dict[str, torch.Size]  # every state_dict key, tied aliases included (DCP has them all)
    tied: dict[str, str]  # alias -> the key HF stores the shared tensor under (e.g. lm_head -> embeddings)
    ignore_unexpected: list[str]  # the model class's regexes of stale keys HF drops on load


# --------------------------------------------------------------------------- configs


def load_config(path: str, flag: str, tokenizer=None):
    """The model config from a JSON or HF folder; with a tokenizer, reconciled as the trainer does."""
    from recipe.model import load_model_config, reconcile_with_tokenizer

    try:
        config = load_model_config(path)
    except UserError as e:
        raise ConversionError(f"{flag}: {str(e).removeprefix('model.config: ')}") from None
    if tokenizer is not None:
        # The trainer grows vocab_size to cover the tokenizer and takes its special token ids.
        reconcile_with_tokenizer(config, tokenizer)
    return config


def load_tokenizer(spec: str):
    """`bytes`, a tokenizer folder/file, or `none`; the same values as the job's `model.tokenizer`."""
    from recipe.tokenizer import build_tokenizer

    if spec.lower() == "none":
        return None
    try:
        return build_tokenizer(SimpleNamespace(model=SimpleNamespace(tokenizer=spec)))
    except UserError as e:
        raise ConversionError(f"--tokenizer: {str(e).removeprefix('model.tokenizer: ')}") from None


def model_spec(config) -> ModelSpec:
    from recipe.model import build_model_on_meta

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation chatter
            model = build_model_on_meta(config)
    except UserError as e:  # e.g. fla's transformer without flash-attn: already one line, naming the type
        raise ConversionError(str(e).removeprefix("model.config: ")) from None
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f"cannot build model_type '{config.model_type}': {_first_line(e)}") from None
    first_name, tied = {}, {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            tied[name] = first_name[id(param)]
        else:
            first_name[id(param)] = name
    return ModelSpec(
        config=config,
        architecture=type(model).__name__,
        shapes={k: v.shape for k, v in model.state_dict().items()},
        tied=tied,
        ignore_unexpected=list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
    )


def check_against_spec(
    found: dict[str, torch.Size], spec: ModelSpec, source: str, fix: str | None = None,
    files: dict[str, str] | None = None,
) -> None:
    """Same keys (a tied alias may be absent) and shapes as the model, or a ConversionError.

    `fix` replaces the closing advice; `files` (key -> file name) names the file a wrong shape is in.
    """
    what = f"model_type '{spec.config.model_type}'"
    missing = sorted(k for k in spec.shapes if k not in found and spec.tied.get(k) not in found)
    if missing:
        raise ConversionError(
            f"{source} lacks {len(missing)} weight(s) of {what}, e.g. {missing[:3]}; "
            f"{fix or 'does the config match the checkpoint?'}"
        )
    unexpected = sorted(
        k for k in found if k not in spec.shapes and not any(re.search(p, k) for p in spec.ignore_unexpected)
    )
    if unexpected:
        raise ConversionError(
            f"{source} has {len(unexpected)} weight(s) that {what} lacks, e.g. {unexpected[:3]}; "
            f"{fix or 'does the config match the checkpoint?'}"
        )
    for key, shape in found.items():
        if key in spec.shapes and tuple(shape) != tuple(spec.shapes[key]):
            where = f" (in {files[key]})" if files and key in files else ""
            raise ConversionError(
                f"{source}: '{key}'{where} has shape {list(shape)} but {what} with this config expects "
                f"{list(spec.shapes[key])}; {fix or 'does the config (and tokenizer/vocab_size) match the checkpoint?'}"
            )


def complete_tied(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Fill absent tied aliases from the stored key; refuse aliases that differ from it."""
    for alias, stored in spec.tied.items():
        if alias not in state:
            state[alias] = state[stored]
        elif not torch.equal(state[alias], state[stored]):
            raise ConversionError(
                f"the config ties '{alias}' to '{stored}' but the checkpoint holds different values; "
                "check tie_word_embeddings in the config"
            )
    return {k: state[k] for k in spec.shapes if k in state}


# --------------------------------------------------------------------------- DCP


def read_dcp_model(path: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """The model tensors (full, in their saved dtype) of a DCP checkpoint, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ConversionError(f"--checkpoint: '{path}' is not a DCP checkpoint (no .metadata file)")
    reader = dcp.FileSystemReader(path)
    try:
        metadata = reader.read_metadata()
    except Exception as e:  # noqa: BLE001 - unpickling a damaged file raises anything
        raise ConversionError(f"--checkpoint: cannot read '{path}/.metadata' ({_first_line(e)})") from None
    # flame's checkpoints nest the model under "model." (recipe/flame_checkpoint.py); flare's do not.
    prefix = MODEL_PREFIX if is_flame_checkpoint(metadata) else ""
    tensors = {
        k.removeprefix(prefix): v
        for k, v in metadata.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
        and (k.startswith(prefix) if prefix else k.split(".", 1)[0] not in NON_MODEL_SECTIONS)
    }
    check_against_spec({k: v.size for k, v in tensors.items()}, spec, f"checkpoint '{path}'")
    keys = [k for k in tensors if k in spec.shapes]
    _check_dcp_files(path, metadata, {prefix + k for k in keys})

    state = {prefix + k: torch.empty(tensors[k].size, dtype=tensors[k].properties.dtype) for k in keys}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
            dcp.load(state, storage_reader=reader, no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - read errors come as CheckpointException, a BaseException
        raise ConversionError(f"--checkpoint: cannot read the weights in '{path}' ({_first_line(e)})") from None
    return complete_tied({k.removeprefix(prefix): v for k, v in state.items()}, spec)


def _check_dcp_files(path: str, metadata, keys: set[str]) -> None:
    """Every byte range the weights live in must exist: catches missing and truncated shard files."""
    needed: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn in keys:
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise ConversionError(f"--checkpoint: shard file '{file}' is missing")
        if os.path.getsize(file) < size:
            raise ConversionError(
                f"--checkpoint: shard file '{file}' is truncated ({os.path.getsize(file)} bytes, needs {size})"
            )


def write_dcp(state: dict[str, torch.Tensor], folder: str) -> None:
    """A model-only DCP checkpoint with the flat model keys (usable as checkpoint.initial_load_path)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=True)


# --------------------------------------------------------------------------- HF folders


def read_safetensors(folder: str, flag: str = "--hf") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of an HF folder's safetensors (one file, or the shards its index names) and the
    file each came from. A missing, truncated or corrupt file is a ConversionError naming it."""
    from safetensors import safe_open

    index_file = os.path.join(folder, SAFE_INDEX)
    if os.path.isfile(index_file):
        try:
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConversionError(f"{flag}: cannot read '{index_file}' ({_first_line(e)}); copy it again") from None
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, SAFE_WEIGHTS)):
        weight_map, files = None, [SAFE_WEIGHTS]
    else:
        raise ConversionError(f"{flag}: '{folder}' has no {SAFE_WEIGHTS} or {SAFE_INDEX} (only safetensors is read)")

    state, source = {}, {}
    for name in files:
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ConversionError(
                f"{flag}: shard '{file}' named in {SAFE_INDEX} is missing; copy it into the folder again"
            )
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
                    source[key] = name
        except Exception as e:  # noqa: BLE001 - SafetensorError for truncated/corrupt files
            raise ConversionError(
                f"{flag}: cannot read shard '{file}' ({_first_line(e)}); the file is truncated or corrupt: "
                "copy or download it again"
            ) from None
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ConversionError(
                f"{flag}: {SAFE_INDEX} lists {len(absent)} weight(s) its shards lack, e.g. {absent[:3]}; "
                "the shards and the index come from different saves: copy the folder again"
            )
    return state, source


def read_hf_weights(
    folder: str, spec: ModelSpec, flag: str = "--hf", fix: str | None = None
) -> dict[str, torch.Tensor]:
    """The safetensors weights of an HF folder (one file or an index with shards), validated."""
    state, source = read_safetensors(folder, flag)
    state, source = model_names(state, spec), model_names(source, spec)
    state = rejoin_splits(state, spec)
    where = f"HF folder '{folder}'" if flag == "--hf" else f"{flag}: '{folder}'"
    check_against_spec({k: v.shape for k, v in state.items()}, spec, where, fix, source)
    return complete_tied(state, spec)


def model_names(values: dict, spec: ModelSpec) -> dict:
    """{key: value} with either name of a SAVED_NAMES pair read as the one the model has."""
    pairs = SAVED_NAMES.get(spec.config.model_type, {})
    out = {}
    for key, value in values.items():
        for a, b in [*pairs.items(), *((b, a) for a, b in pairs.items())]:
            renamed = key.replace(f".{a}.", f".{b}.")
            if renamed != key and renamed in spec.shapes and key not in spec.shapes:
                key = renamed
                break
        out[key] = value
    return out


def rejoin_splits(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Tensors of a SAVED_SPLITS group whose shapes differ from the model's but add up to them,
    joined (dim 0) and cut at the model's boundaries."""
    parts = SAVED_SPLITS.get(spec.config.model_type)
    if not parts:
        return state
    for first in [k for k in state if k.endswith(f".{parts[0]}.weight")]:
        keys = [first[: -len(f"{parts[0]}.weight")] + f"{p}.weight" for p in parts]
        if not all(k in state and k in spec.shapes for k in keys):
            continue
        rows = [spec.shapes[k][0] for k in keys]
        if [state[k].shape[0] for k in keys] != rows and sum(state[k].shape[0] for k in keys) == sum(rows):
            for key, tensor in zip(keys, torch.cat([state[k] for k in keys]).split(rows)):
                state[key] = tensor
    return state


def served_name(name: str, model_type: str) -> str:
    """The name vLLM loads for a model parameter: SAVED_NAMES' second name, whichever the model has."""
    for saved, served in SAVED_NAMES.get(model_type, {}).items():
        name = name.replace(f".{saved}.", f".{served}.")
    return name


def write_hf(
    state: dict[str, torch.Tensor],
    spec: ModelSpec,
    folder: str,
    tokenizer=None,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int = 5 * 10**9,
) -> None:
    """config.json, generation_config.json, safetensors (sharded above max_shard_size), tokenizer."""
    from safetensors.torch import save_file

    # HF stores a tied tensor once, under the first module's name; from_pretrained re-ties it.
    weights = {
        served_name(k, spec.config.model_type): (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
        if k not in spec.tied
    }
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in weights.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        with open(os.path.join(folder, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    write_hf_config(spec, folder, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_hf_config(spec: ModelSpec, folder: str, dtype: torch.dtype) -> None:
    """config.json and generation_config.json as transformers and vLLM read them (they build the
    model from config.json without importing fla, so fla-only settings are written under
    transformers' names too, e.g. Mamba2's num_heads and time_step_limit)."""
    from transformers import GenerationConfig

    config = copy.deepcopy(spec.config)
    if type(config).__module__.startswith("fla."):
        for fla_name, name in TRANSFORMERS_NAMES.get(config.model_type, {}).items():
            setattr(config, name, getattr(config, fla_name))
        for name in EXPORT_OFF.get(config.model_type, ()):
            setattr(config, name, False)
    config.architectures = [spec.architecture]
    config.dtype = dtype
    config.save_pretrained(folder)
    _add_legacy_torch_dtype(os.path.join(folder, "config.json"), dtype)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _add_legacy_torch_dtype(config_file: str, dtype: torch.dtype) -> None:
    """transformers >= 4.56 writes "dtype"; older readers (and many serving stacks) look for "torch_dtype"."""
    with open(config_file) as f:
        values = json.load(f)
    values["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(config_file, "w") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- outputs


def check_output(path: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a destination that would clobber something."""
    real = os.path.realpath(path)
    for source in inputs:
        if source and os.path.realpath(source) == real:
            raise ConversionError(f"--output: '{path}' is the input; write elsewhere")
    if os.path.isfile(path):
        raise ConversionError(f"--output: '{path}' is a file; give a folder path")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConversionError(f"--output: '{path}' exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_folder(path: str, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path`, on failure it is removed.

    The temporary name has no ``step-N`` in it, so a trainer scanning the same folder never
    mistakes a half-written output for a checkpoint.
    """
    check_output(path, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-tmp-", dir=parent)
    try:
        yield tmp
        _umask_permissions(tmp)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".convert-old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask_permissions(folder: str) -> None:
    """mkdtemp (and safetensors' writer) make private files; give the output the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (HF's max_shard_size convention)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in units or float(match.group(1)) <= 0:
        raise ConversionError(f"--max-shard-size: cannot read {text!r}; use e.g. 5GB or 500MiB")
    return int(float(match.group(1)) * units[match.group(2).upper()])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_cli(name: str, convert, args) -> int:
    """The converters' main: print what was written, or one error line on stderr and exit code 1."""
    import sys

    try:
        print(convert(args))
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return 0
