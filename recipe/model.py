"""Model building: HF/fla config JSON → causal LM on the meta device → (parallelize) → init.

Any model ``AutoModelForCausalLM`` knows works: importing fla registers its families; custom
families are registered by a module named in ``experimental.custom_import``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import torch
from torch import nn

from recipe.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

# Parameters fla models create in __init__ with a constant that their `_init_weights` does not
# reset, so `to_empty` would leave them uninitialized (HGRN/HGRN2's per-layer forget-gate bounds).
_CONSTRUCTOR_CONSTANTS = {"lower_bounds": 0.0}

# Model types of flame (fla-org/flame) that live in flame's own tree, not in fla.
_FLAME_OWN_MODELS = {"sba": "custom_models/sba"}

# flame's Mamba configs use fla's earlier names of the dt (time step) settings; fla 0.6's
# MambaConfig takes dt_* and would silently ignore them (dt_rank would fall back to hidden/16).
_MAMBA_RENAMED_KEYS = {
    "time_step_rank": "dt_rank", "time_step_scale": "dt_scale", "time_step_min": "dt_min",
    "time_step_max": "dt_max", "time_step_init_scheme": "dt_init_scheme", "time_step_floor": "dt_init_floor",
}

# Config flags of fla's fused loss kernels; they run on CUDA (and NPU/XPU) tensors only.
_CUDA_ONLY_FUSED_LOSSES = ("fuse_cross_entropy", "fuse_linear_cross_entropy")


def import_custom_module(name: str) -> None:
    """experimental.custom_import: a module that registers custom model families (AutoConfig /
    AutoModelForCausalLM.register), TP plans or hooks before the model is built."""
    if not name:
        return
    import importlib

    try:
        importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"experimental.custom_import: cannot import '{name}': {e}") from None


def load_model_config(path: str):
    """An HF ``PretrainedConfig`` from a config JSON (flame's format) or an HF model folder."""
    # Registers fla's model types with transformers' Auto classes. fla registers with
    # exist_ok=True, which replaces transformers' own class of a type both have ("mamba2"): flare
    # builds fla's Mamba2, whose parameters carry transformers' names and shapes.
    import fla  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if os.path.isdir(path):
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"model.config: cannot load an HF config from folder '{path}': {e}") from None
    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"model.config: cannot read '{path}' as JSON: {e}") from None
    model_type = values.pop("model_type", None)
    if not model_type:
        raise UserError(f"model.config: '{path}' has no \"model_type\" key (e.g. \"gla\", \"llama\")")
    if model_type not in CONFIG_MAPPING:
        raise _unknown_model_type(model_type, path)
    if model_type == "mamba":
        _rename_mamba_keys(values, path)
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as e:  # the config class refused a value
        raise UserError(f"model.config: '{path}' ({model_type}): {e}") from None


def _unknown_model_type(model_type: str, path: str) -> UserError:
    if model_type in _FLAME_OWN_MODELS:
        return UserError(
            f"model.config: model_type '{model_type}' in '{path}' is flame's own model "
            f"({_FLAME_OWN_MODELS[model_type]} in fla-org/flame), not part of fla; name a module that "
            "registers it (AutoConfig/AutoModelForCausalLM.register) in experimental.custom_import, or use "
            "fla's stick-breaking attention model, model_type 'stickbreaking_attn' (its own config keys)"
        )
    return UserError(
        f"model.config: unknown model_type '{model_type}' in '{path}': neither transformers nor fla has it; "
        "register custom models through experimental.custom_import"
    )


def _rename_mamba_keys(values: dict, path: str) -> None:
    renamed = [(old, new) for old, new in _MAMBA_RENAMED_KEYS.items() if old in values]
    for old, new in renamed:
        if new in values and values[new] != values[old]:
            raise UserError(f"model.config: '{path}' sets both {old}={values[old]} and {new}={values[new]} "
                            f"(fla's mamba reads {new}); keep one")
        values[new] = values.pop(old)
    if renamed:
        logger.info(f"model.config: read {', '.join(f'{o} as {n}' for o, n in renamed)} (fla's mamba names)")


def reconcile_with_tokenizer(config, tokenizer) -> None:
    """Make the embedding table cover the tokenizer and record its special token ids."""
    n_tokens = len(tokenizer)
    if config.vocab_size < n_tokens:
        logger.info(f"Growing vocab_size {config.vocab_size} -> {n_tokens} to cover the tokenizer")
        config.vocab_size = n_tokens
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None:
            setattr(config, name, token_id)


def disable_unsupported_fused_kernels(config, device_type: str) -> None:
    """Switch off fla kernels that cannot run on this device, saying so."""
    if device_type == "cuda":
        return
    for flag in _CUDA_ONLY_FUSED_LOSSES:
        if getattr(config, flag, False):
            logger.info(f"{flag}=False: fla's fused loss kernels need CUDA; using torch cross entropy on {device_type}")
            setattr(config, flag, False)


def uses_fla(config) -> bool:
    """True for models implemented by fla (most accept `cu_seqlens` for varlen batches)."""
    from transformers import AutoModelForCausalLM

    model_cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return model_cls is not None and model_cls.__module__.startswith("fla.")


# fla families whose layers drop `cu_seqlens`: fla 0.6's Mamba2 takes it in **kwargs and never
# uses it (its kernels get seq_idx=None), nor does its Mamba1 (mamba, samba's recurrent layers),
# so documents packed in one row would share the state.
_NO_CU_SEQLENS = ("mamba2", "mamba", "samba")


def check_varlen(config) -> None:
    """training.varlen needs a model that keeps the packed documents apart."""
    if not uses_fla(config):
        raise ConfigError(
            f"training.varlen: model_type '{config.model_type}' is not an fla model and "
            "cannot take cu_seqlens; set training.varlen = false"
        )
    if config.model_type in _NO_CU_SEQLENS:
        raise ConfigError(
            f"training.varlen: fla's {config.model_type} layer ignores cu_seqlens, so the documents packed "
            "in a row would share its recurrent state; set training.varlen = false"
        )


def check_flash_attn(config) -> None:
    """fla's softmax attention layers (``transformer``, the ``attn`` layers of hybrids such as
    samba) call flash-attn and refuse to build without it."""
    if not uses_fla(config) or not (config.model_type == "transformer" or getattr(config, "attn", None)):
        return
    import fla.layers.attn

    if fla.layers.attn.flash_attn_func is None:
        raise ConfigError(
            f"model.config: model_type '{config.model_type}' runs its softmax attention with flash-attn, which is "
            "not installed; install it on a CUDA machine: pip install flash-attn --no-build-isolation"
        )


def check_model_config(config) -> None:
    """Refuse, before anything is built, models this machine cannot build and settings flare would
    train into a model served otherwise."""
    check_flash_attn(config)
    groups = getattr(config, "n_groups", 1)
    if config.model_type == "mamba2" and uses_fla(config) and groups != 1:
        # fla 0.6's torch SSD path (the one used without mamba_ssm, and under TP) tiles B/C over
        # the heads (`B.repeat`): head h reads group h % n_groups. mamba_ssm, fla's own decode
        # step, transformers and vLLM give head h the group h // (num_heads / n_groups).
        raise ConfigError(
            f"model.config: n_groups={groups}: fla's Mamba2 training path pairs head h with group "
            "h % n_groups, but transformers and vLLM pair it with group h // (num_heads / n_groups), "
            "so the trained model would not be served as trained; set n_groups=1"
        )


def flare_model_class(model_type: str):
    """flare's class for a model type it trains under other parameter names than the class
    transformers builds (recipe/olmo_hybrid.py says why), else None."""
    if model_type == "olmo_hybrid":
        from recipe.olmo_hybrid import OlmoHybridForCausalLM

        return OlmoHybridForCausalLM
    return None


def build_model(config, **kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_config``, or flare's class of this model type."""
    from transformers import AutoModelForCausalLM

    cls = flare_model_class(config.model_type)
    if cls is not None:
        return cls._from_config(config, **kwargs)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    if config.model_type == "mamba2" and uses_fla(config):
        from recipe.mamba2_ssd import use_chunked_ssd

        use_chunked_ssd(model)  # fla's Triton scan instead of its naive one where mamba_ssm is missing
    return model


def build_model_on_meta(config) -> nn.Module:
    """The model with meta tensors: no memory is used until it is parallelized and materialized."""
    try:
        with torch.device("meta"):
            model = build_model(config, torch_dtype=torch.float32)
    except ImportError as e:  # fla layers that need an optional package (flash-attn) refuse to build
        raise ConfigError(
            f"model.config: model_type '{config.model_type}' cannot be built: {e}{_cuda_only(e)}"
        ) from None
    return model


def _cuda_only(error: ImportError) -> str:
    if "flash" in str(error).lower() and not torch.cuda.is_available():
        return " (flash-attn runs on CUDA only: train this model on a GPU machine)"
    return ""


def count_parameters(model: nn.Module) -> int:
    # Tied parameters are one Parameter object: count each once.
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# fla modules whose `_init_weights` writes plain tensors into their parameters (Mamba1: `A_log.copy_`,
# `dt_proj.bias.data = ...`), which fails on a DTensor (FSDP, TP) or would replace its shard.
_PLAIN_TENSOR_INIT = ("fla.layers.mamba.Mamba",)


def _mamba1_constructor_values(mixer: nn.Module) -> None:
    """A_log (S4D-real: log 1..N for every channel) and D = 1, as fla's Mamba1 constructor sets
    them; fla's samba `_init_weights` leaves both to the constructor, which `to_empty` undoes."""
    states = torch.arange(1, mixer.ssm_state_size + 1, dtype=torch.float32, device=mixer.A_log.device)
    mixer.A_log.copy_(states.log().expand_as(mixer.A_log))
    mixer.D.fill_(1.0)


# Parameter attributes fla's init sets, read later (optimizer grouping, no re-init).
_INIT_FLAGS = ("_no_weight_decay", "_no_reinit")


def _qualified_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


@contextlib.contextmanager
def _whole_parameters(modules: list[nn.Module]):
    """While the block runs, the DTensor parameters of ``modules`` are whole local tensors; after
    it, each rank keeps its shard of what was written into them."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    swapped = []
    for module in modules:
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if isinstance(param, DTensor):
                    whole = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
                    owner._parameters[name] = nn.Parameter(whole, requires_grad=param.requires_grad)
                    swapped.append((owner, name, param))
    try:
        yield
    finally:
        for owner, name, param in swapped:
            whole = owner._parameters[name]
            param.copy_(distribute_tensor(whole.detach(), param.device_mesh, param.placements, src_data_rank=None))
            for flag in _INIT_FLAGS:
                if hasattr(whole, flag):
                    setattr(param, flag, getattr(whole, flag))
            owner._parameters[name] = param


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """Initialize a materialized (``to_empty``) model with its own HF/fla init scheme.

    Works on DTensor-sharded parameters as well. Non-persistent buffers (RoPE frequencies) are
    recomputed too, and tied embeddings re-tied: ``to_empty`` gives every module a new tensor.
    """
    for module in model.modules():
        if hasattr(module, "_is_hf_initialized"):
            del module._is_hf_initialized
    plain_init = [m for m in model.modules() if _qualified_name(m) in _PLAIN_TENSOR_INIT]
    with _whole_parameters(plain_init):
        if hasattr(model, "initialize_weights"):
            model.initialize_weights()
        else:
            model.apply(model._init_weights)
        for module in plain_init:
            _mamba1_constructor_values(module)
    for name, param in model.named_parameters():
        value = _CONSTRUCTOR_CONSTANTS.get(name.rsplit(".", 1)[-1])
        if value is not None:
            param.fill_(value)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def load_hf_weights(model: nn.Module, folder: str) -> None:
    """Load an HF checkpoint folder (safetensors) into a materialized, possibly sharded model.

    Every rank reads the full tensors and keeps its shard (``load_full_state_dict``), so it works
    for any parallel layout. A missing or damaged shard and weights that do not fit the model
    (missing, extra, another shape) are one-line errors, found before any weight is loaded.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from recipe import hf_io

    spec = hf_io.model_spec(model.config)  # the same config the model was built from: its keys and full shapes
    state = hf_io.read_hf_weights(
        folder, spec, flag="model.init_from_hf",
        fix="the weights do not fit model.config: use the config they were saved with (normally the "
            "folder's config.json) or the HF folder of this model",
    )
    # The model's own names: get_model_state_dict drops the prefixes that torch.compile and
    # activation checkpointing wrappers add (`_orig_mod.`, `_checkpoint_wrapped_module.`).
    expected = set(get_model_state_dict(model).keys())
    load_full_state_dict(model, {k: v for k, v in state.items() if k in expected}, strict=False)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load full (unsharded) tensors, present on every rank, into a possibly sharded model.

    Each rank cuts its own shard locally (``distribute_tensor(..., src_data_rank=None)``): no
    scatter, and shards of uneven size work. ``set_model_state_dict(full_state_dict=True)``
    scatters from rank 0 and fails in torch's padded scatter when a dim splits unevenly over
    FSDP x TP (e.g. a per-head parameter with fewer heads than TP x FSDP shards).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    current = get_model_state_dict(model)
    sharded = {}
    for key, value in state.items():
        ref = current.get(key)
        if isinstance(ref, DTensor):
            value = distribute_tensor(value.to(ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
        sharded[key] = value
    set_model_state_dict(model, sharded, options=StateDictOptions(strict=strict))
