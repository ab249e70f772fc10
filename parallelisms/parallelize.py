"""``parallelize_fla``: torchtitan's parallelize_fn for HF/fla causal LMs, with its config checks.

Order (as torchtitan's llama): tensor parallelism -> activation checkpointing -> per-block
compile -> FSDP/HSDP or DDP. The model arrives on the meta device and is materialized after.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from parallelisms.activation_checkpoint import apply_ac
from parallelisms.compile import apply_compile
from parallelisms.data_parallel import apply_ddp, apply_fsdp
from parallelisms.tensor_parallel import apply_tp
from parallelisms.tp_plans import TPPlan, find_tp_plan, get_tp_plan
from recipe.errors import ConfigError

logger = logging.getLogger(__name__)


def _float8_tp(job_config) -> bool:
    """Float8 all-gathers in TP only for tensorwise scaling (rowwise gathers in high precision)."""
    if "quantize.linear.float8" not in job_config.model.converters:
        return False
    return job_config.quantize.linear.float8.recipe_name not in ("rowwise", "rowwise_with_gw_hp")


def make_plan(model_config, job_config, tp_degree: int) -> TPPlan:
    """The registered plan (required when tp_degree > 1); without TP any HF causal LM works,
    using the base plan only for its module layout (blocks, final norm)."""
    if tp_degree > 1:
        cls = get_tp_plan(model_config.model_type)
    else:
        cls = find_tp_plan(model_config.model_type) or TPPlan
    return cls(
        model_config,
        tp_degree,
        loss_parallel=not job_config.parallelism.disable_loss_parallel,
        float8=_float8_tp(job_config),
    )


def loss_parallel_enabled(parallel_dims, job_config) -> bool:
    """Whether the trainer must run forward/backward under ``loss_parallel()``."""
    return parallel_dims.tp_enabled and not job_config.parallelism.disable_loss_parallel


def validate_parallelism(model_config, job_config, world_size: int | None = None) -> None:
    """Checks needing the model config, before any process group; raises one-line ConfigErrors."""
    from recipe.config import data_parallel_degrees

    p = job_config.parallelism
    tp = p.tensor_parallel_degree
    world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    replicate, shard = data_parallel_degrees(job_config, world_size)
    if tp > 1 and replicate > 1 and shard == 1:
        raise ConfigError(
            f"parallelism.data_parallel_replicate_degree={replicate} with tensor_parallel_degree={tp}: DDP "
            "cannot be combined with tensor parallelism; use HSDP (data_parallel_shard_degree > 1) or "
            "FSDP (data_parallel_replicate_degree=1)"
        )
    if tp > 1:
        plan = make_plan(model_config, job_config, tp)
        plan.validate()
        if not p.disable_loss_parallel and getattr(model_config, "use_l2warp", False) and not getattr(
            model_config, "fuse_linear_cross_entropy", False
        ):
            raise ConfigError(
                "parallelism.disable_loss_parallel=false: the model's use_l2warp needs whole logits; set "
                "parallelism.disable_loss_parallel=true or use_l2warp=false in model.config"
            )
    if job_config.training.enable_cpu_offload and not (shard > 1):
        raise ConfigError(
            "training.enable_cpu_offload needs FSDP (data_parallel_shard_degree > 1, or -1 with more ranks "
            "than the other degrees use)"
        )


def prepare_model_config(model_config, parallel_dims, job_config) -> list[str]:
    """Switch off what the training layout cannot run (before building); logs each switch."""
    switched = []
    if getattr(model_config, "use_cache", False):
        # HF models (fla ones do not) build a KV cache in every training forward when the config
        # says use_cache; activation-checkpoint recomputation then finds it filled and computes
        # attention over twice the keys.
        model_config.use_cache = False
        switched.append("use_cache=False: training never reads the KV cache (it would break activation checkpointing)")
    if parallel_dims.tp_enabled:
        switched += make_plan(model_config, job_config, parallel_dims.tp).prepare_config()
    for message in switched:
        logger.info(message)
    return switched


def single_device_fsdp(parallel_dims, job_config) -> bool:
    """One process and a low-precision param dtype: FSDP2 over a one-rank mesh is how the model
    gets bf16 compute weights with fp32 masters (see ``parallelism.single_device_fsdp``)."""
    from torchtitan.config import TORCH_DTYPE_MAP

    return (
        parallel_dims.world_size == 1
        and job_config.parallelism.single_device_fsdp
        and TORCH_DTYPE_MAP[job_config.training.mixed_precision_param] != torch.float32
    )


def _fsdp_mesh(parallel_dims, job_config):
    if parallel_dims.fsdp_enabled:
        names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
        return parallel_dims.get_mesh(names)
    if single_device_fsdp(parallel_dims, job_config):
        return parallel_dims.world_mesh  # 1-D, one rank
    return None


def parallelize_fla(model: nn.Module, parallel_dims, job_config) -> nn.Module:
    """Apply TP, activation checkpointing, compile and data parallelism (torchtitan signature)."""
    from torchtitan.config import TORCH_DTYPE_MAP

    plan = make_plan(model.config, job_config, parallel_dims.tp)
    if parallel_dims.tp_enabled:
        apply_tp(
            model,
            parallel_dims.get_mesh("tp"),
            plan,
            async_tp=job_config.parallelism.enable_async_tensor_parallel,
        )

    blocks = plan.blocks(model)
    apply_ac(blocks, job_config.activation_checkpoint)

    compile_enabled = job_config.compile.enable and "model" in job_config.compile.components
    if compile_enabled:
        base = model.get_submodule(model.base_model_prefix)
        apply_compile(blocks, job_config.compile, final_norm=(base, "norm") if hasattr(base, "norm") else None)

    embeddings, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    fsdp_mesh = _fsdp_mesh(parallel_dims, job_config)
    if fsdp_mesh is not None:
        t = job_config.training
        apply_fsdp(
            model,
            fsdp_mesh,
            embeddings=embeddings,
            blocks=blocks,
            head=[plan.final_norm(model), lm_head],
            tied=lm_head is not None and lm_head.weight is embeddings.weight,
            param_dtype=TORCH_DTYPE_MAP[t.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[t.mixed_precision_reduce],
            cpu_offload=t.enable_cpu_offload,
            reshard_after_forward_policy=job_config.parallelism.fsdp_reshard_after_forward,
        )
        kind = "HSDP" if parallel_dims.dp_replicate_enabled else "FSDP" if parallel_dims.fsdp_enabled else (
            "single-device FSDP (bf16 compute with fp32 master weights)")
        logger.info(f"Applied {kind} to the model")
    elif parallel_dims.dp_replicate_enabled:
        if parallel_dims.tp_enabled:
            raise ConfigError("DDP cannot be combined with tensor parallelism; use HSDP or FSDP")
        apply_ddp(model, parallel_dims.get_mesh("dp_replicate"), compile_enabled=compile_enabled)
    return model
