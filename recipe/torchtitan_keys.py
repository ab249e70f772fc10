"""What flare does with each key of torchtitan 0.2.2's JobConfig: acted on, or refused.

flare parses torchtitan's whole JobConfig, but its trainer is its own, so a torchtitan key is only
honoured where flare (or a torchtitan component flare calls) reads it. Every key is listed below,
in ``REFUSED`` or in ``ACTED_ON``; ``tests/test_config_honesty.py`` checks that the two together
cover torchtitan's JobConfig exactly, so a torchtitan upgrade that adds keys fails until they are
sorted in. ``recipe.config.validate`` stops a job whose refused key is set to anything but
torchtitan's default (defaults keep working), with the one-line error ``<key>=<value>: <reason>``.
"""

from __future__ import annotations

from typing import Any, Callable

_PP = "pipeline parallelism is not supported by flare; remove it"
_CP = "context parallelism is not supported by flare; remove it"
_EP = "expert parallelism is not supported by flare (its models have no torchtitan MoE layers); remove it"
_FT = "flare does not integrate TorchFT fault tolerance; remove it (restarts resume from the newest checkpoint)"
_VALIDATION = (
    "flare has no validation loop; remove [validation] (evaluate saved checkpoints separately, e.g. the "
    "HF folder written by checkpoint.export_hf_on_finish)"
)
_NO_SD_ADAPTER = (
    "needs a torchtitan state-dict adapter, which flare's models do not have; start from HF weights "
    "with model.init_from_hf = '<HF folder>'"
)
_GROUPED_MM = "MoE grouped-GEMM quantization does not apply to flare's models (they have no MoE layers); remove it"
_MEMORY_BUDGET = "only read by activation_checkpoint.mode = 'memory_budget', which flare does not support; remove it"

# Keys flare does not act on: key -> why, and what to do instead.
REFUSED: dict[str, str] = {
    # [model]: flare builds the model from an HF config and loads its own tokenizer.
    "model.flavor": (
        "flare builds the architecture from model.config (an HF config JSON), not a torchtitan flavor; remove it"
    ),
    "model.hf_assets_path": (
        "flare does not read torchtitan's HF assets folder; use model.tokenizer (tokenizer), model.config "
        "(config.json) and model.init_from_hf (safetensors weights)"
    ),
    # [optimizer]
    "optimizer.early_step_in_backward": (
        "flare accumulates micro-batches, clips the gradient norm and skips NaN/Inf steps after backward, "
        "which an optimizer step inside backward would bypass; remove it"
    ),
    # [training]
    "training.dataset_path": "flare does not read it; set training.dataset = '<local file or folder>' instead",
    "training.dtype": (
        "flare keeps fp32 master weights and optimizer state; for bf16 compute set "
        "training.mixed_precision_param = 'bfloat16' (the default) and remove training.dtype"
    ),
    # [parallelism]
    "parallelism.pipeline_parallel_degree": "pipeline parallelism is not supported by flare; set it to 1",
    "parallelism.module_fqns_per_model_part": _PP,
    "parallelism.pipeline_parallel_first_stage_less_layers": _PP,
    "parallelism.pipeline_parallel_last_stage_less_layers": _PP,
    "parallelism.pipeline_parallel_layers_per_stage": _PP,
    "parallelism.pipeline_parallel_schedule": _PP,
    "parallelism.pipeline_parallel_schedule_csv": _PP,
    "parallelism.pipeline_parallel_microbatch_size": _PP,
    "parallelism.pipeline_parallel_expert_parallel_overlap": _PP,
    "parallelism.context_parallel_degree": "context parallelism is not supported by flare; set it to 1",
    "parallelism.context_parallel_load_balancer": _CP,
    "parallelism.context_parallel_rotate_method": _CP,
    "parallelism.expert_parallel_degree": "expert parallelism is not supported by flare; set it to 1",
    "parallelism.expert_tensor_parallel_degree": _EP,
    "parallelism.expert_parallel_comm_backend": _EP,
    # [checkpoint]
    "checkpoint.enable_ft_dataloader_checkpoints": (
        "only read with TorchFT fault tolerance, which flare does not integrate; remove it"
    ),
    "checkpoint.initial_load_in_hf": _NO_SD_ADAPTER,
    "checkpoint.initial_load_in_hf_quantized": _NO_SD_ADAPTER,
    "checkpoint.last_save_in_hf": (
        "needs a torchtitan state-dict adapter, which flare's models do not have; set "
        "checkpoint.export_hf_on_finish = true (or use scripts/tools/convert_dcp_to_hf.py)"
    ),
    "checkpoint.create_seed_checkpoint": (
        "flare initializes the weights from debug.seed on every layout, so no seed checkpoint is needed; "
        "remove it (for fixed initial weights use model.init_from_hf or checkpoint.initial_load_path)"
    ),
    # [activation_checkpoint]
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": (
        "flare's per-op policy (parallelisms/activation_checkpoint.py) has no forced-recompute list; remove it"
    ),
    "activation_checkpoint.memory_budget": _MEMORY_BUDGET,
    "activation_checkpoint.visualize_memory_budget_pareto": _MEMORY_BUDGET,
    # [quantize]: grouped GEMMs exist only in MoE layers.
    "quantize.grouped_mm.float8.fqns": _GROUPED_MM,
    "quantize.grouped_mm.mx.fqns": _GROUPED_MM,
    # [comm]
    "comm.mode": "flare trains with real process groups only; use --job.dry_run to check a config without GPUs",
    # [memory_estimation]
    "memory_estimation.enable": (
        "flare has no FSDP memory-estimation run; --job.dry_run prints parameter, gradient and optimizer "
        "memory per rank"
    ),
    "memory_estimation.disable_fake_mode": "flare has no FSDP memory-estimation run; remove it (see --job.dry_run)",
    # [fault_tolerance]
    "fault_tolerance.enable": _FT,
    "fault_tolerance.process_group": _FT,
    "fault_tolerance.process_group_timeout_ms": _FT,
    "fault_tolerance.replica_id": _FT,
    "fault_tolerance.group_size": _FT,
    "fault_tolerance.min_replica_size": _FT,
    "fault_tolerance.semi_sync_method": _FT,
    # [experimental]
    "experimental.custom_args_module": "deprecated by torchtitan and not read by flare; use job.custom_config_module",
    # [validation]
    "validation.enable": _VALIDATION,
    "validation.dataset": _VALIDATION,
    "validation.dataset_path": _VALIDATION,
    "validation.local_batch_size": _VALIDATION,
    "validation.seq_len": _VALIDATION,
    "validation.freq": _VALIDATION,
    "validation.steps": _VALIDATION,
    "validation.dataloader.num_workers": _VALIDATION,
    "validation.dataloader.persistent_workers": _VALIDATION,
    "validation.dataloader.pin_memory": _VALIDATION,
    "validation.dataloader.prefetch_factor": _VALIDATION,
    # [debug]
    "debug.moe_force_load_balance": "flare's models have no torchtitan MoE layers; remove it",
}


def _compile_components_acted_on(value: list[str]) -> bool:
    return set(value) <= {"model", "loss"} and ("model" in value or "loss" not in value)


def _converters_acted_on(value: list[str]) -> bool:
    return not any(name.startswith("quantize.grouped_mm.") for name in value)


# Keys flare acts on, but not for every value: key -> (values acted on, why the others are refused).
REFUSED_VALUES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "compile.components": (
        _compile_components_acted_on,
        "flare compiles the model's blocks ('model'); the loss is computed inside the model's forward and "
        "is not compiled on its own, so use ['model'] (or compile.enable = false)",
    ),
    "model.converters": (
        _converters_acted_on,
        "the quantize.grouped_mm converters rewrite MoE grouped GEMMs, which flare's models do not have; "
        "remove them",
    ),
}

# Keys flare acts on (a section name covers all its keys): where each is read.
ACTED_ON: dict[str, str] = {
    "job.config_file": "recipe/config.py",
    "job.dump_folder": "recipe/trainer.py (outputs, checkpoints, metrics.jsonl)",
    "job.description": "train.py (logged when the job starts)",
    "job.print_config": "train.py (rank 0 prints the resolved config as JSON)",
    "job.save_config_file": "train.py (rank 0 writes the resolved config as JSON under job.dump_folder)",
    "job.custom_config_module": "recipe/config.py",
    "profiling": "torchtitan.tools.profiling (Trainer.train)",
    "metrics.log_freq": "recipe/metrics.py",
    "metrics.enable_tensorboard": "torchtitan.components.metrics._build_metric_logger (recipe/metrics.py)",
    "metrics.disable_color_printing": "flare's log lines carry no colour codes, so this changes nothing",
    "metrics.save_tb_folder": "torchtitan.components.metrics._build_metric_logger",
    "metrics.save_for_all_ranks": "torchtitan.components.metrics._build_metric_logger",
    "metrics.enable_wandb": "torchtitan.components.metrics._build_metric_logger",
    "model.name": "recipe/trainer.py (flare's label, logged with the parameter count)",
    "model.converters": "torchtitan.protocols.model_converter.build_model_converters (recipe/trainer.py)",
    "model.tokenizer_path": "recipe/flame_keys.py (flame's name for model.tokenizer)",
    "model.print_after_conversion": "torchtitan.protocols.model_converter (ModelConvertersContainer.convert)",
    "optimizer.name": "torchtitan.components.optimizer.build_optimizers (Adam or AdamW: recipe/config.py)",
    "optimizer.lr": "build_optimizers",
    "optimizer.beta1": "build_optimizers",
    "optimizer.beta2": "build_optimizers",
    "optimizer.eps": "build_optimizers",
    "optimizer.weight_decay": "build_optimizers",
    "optimizer.implementation": "build_optimizers; fused also skips NaN/Inf steps on the device (recipe/trainer.py)",
    "lr_scheduler": "torchtitan.components.lr_scheduler.build_lr_schedulers",
    "training.dataset": "recipe/data.py (flare's meaning: comma-separated datasets)",
    "training.local_batch_size": "recipe/data.py, recipe/config.py",
    "training.global_batch_size": "recipe/config.py (gradient accumulation)",
    "training.seq_len": "recipe/data.py, recipe/flops.py",
    "training.max_norm": "recipe/trainer.py",
    "training.steps": "recipe/trainer.py, build_lr_schedulers",
    "training.enable_cpu_offload": "parallelisms/data_parallel.py (FSDP CPUOffloadPolicy)",
    "training.mixed_precision_param": "parallelisms/parallelize.py (FSDP), recipe/trainer.py (autocast)",
    "training.mixed_precision_reduce": "parallelisms/parallelize.py (FSDP)",
    "training.gc_freq": "torchtitan.tools.utils.GarbageCollection (recipe/trainer.py)",
    "training.gc_debug": "torchtitan.tools.utils.GarbageCollection (recipe/trainer.py)",
    "training.dataloader": "recipe/data.py (passed to torchtitan's ParallelAwareDataloader)",
    "parallelism.data_parallel_replicate_degree": "recipe/config.py, recipe/trainer.py (ParallelDims)",
    "parallelism.data_parallel_shard_degree": "recipe/config.py, recipe/trainer.py (ParallelDims)",
    "parallelism.fsdp_reshard_after_forward": "parallelisms/data_parallel.py",
    "parallelism.tensor_parallel_degree": "recipe/trainer.py (ParallelDims), parallelisms/",
    "parallelism.disable_loss_parallel": "parallelisms/parallelize.py, recipe/trainer.py",
    "parallelism.enable_async_tensor_parallel": "parallelisms/tensor_parallel.py",
    "checkpoint.enable": "torchtitan.components.checkpoint.CheckpointManager (recipe/checkpoint.py)",
    "checkpoint.folder": "CheckpointManager",
    "checkpoint.interval": "CheckpointManager",
    "checkpoint.initial_load_path": "CheckpointManager",
    "checkpoint.initial_load_model_only": "CheckpointManager",
    "checkpoint.last_save_model_only": "CheckpointManager (flare's default: false)",
    "checkpoint.export_dtype": "CheckpointManager, recipe/trainer.py (checkpoint.export_hf_on_finish)",
    "checkpoint.async_mode": "CheckpointManager",
    "checkpoint.keep_latest_k": "CheckpointManager, recipe/checkpoint.py",
    "checkpoint.load_step": "recipe/trainer.py (CheckpointManager.load)",
    "checkpoint.exclude_from_loading": "CheckpointManager, recipe/checkpoint.py",
    "checkpoint.enable_first_step_checkpoint": "CheckpointManager",
    "checkpoint.load_only": "CheckpointManager",
    "activation_checkpoint.mode": "parallelisms/activation_checkpoint.py (memory_budget refused in recipe/config.py)",
    "activation_checkpoint.selective_ac_option": "parallelisms/activation_checkpoint.py",
    "activation_checkpoint.early_stop": "parallelisms/activation_checkpoint.py (checkpoint_wrapper)",
    "activation_checkpoint.preserve_rng_state": "parallelisms/activation_checkpoint.py (checkpoint_wrapper)",
    "activation_checkpoint.determinism_check": "parallelisms/activation_checkpoint.py (checkpoint_wrapper)",
    "activation_checkpoint.debug": "parallelisms/activation_checkpoint.py (checkpoint_wrapper)",
    "compile.enable": "parallelisms/parallelize.py",
    "compile.components": "parallelisms/parallelize.py ('model'; see REFUSED_VALUES)",
    "compile.backend": "parallelisms/compile.py",
    "quantize.linear": "torchtitan's float8 / MX converters when model.converters lists them",
    "quantize.grouped_mm.mx.recipe_name": (
        "has one possible value ('mxfp8'); its converter is refused in model.converters"
    ),
    "comm.init_timeout_seconds": "torchtitan.distributed.utils.init_distributed (recipe/trainer.py)",
    "comm.train_timeout_seconds": "recipe/trainer.py (set_pg_timeouts after the first step)",
    "comm.trace_buf_size": "torchtitan.distributed.utils.init_distributed (NCCL flight recorder)",
    "comm.save_traces_folder": "torchtitan.distributed.utils.init_distributed (NCCL flight recorder)",
    "comm.save_traces_file_prefix": "torchtitan.distributed.utils.init_distributed (NCCL flight recorder)",
    "experimental.custom_import": "recipe/model.py (import_custom_module)",
    "debug.seed": "torchtitan.distributed.utils.set_determinism (recipe/trainer.py)",
    "debug.deterministic": "torchtitan.distributed.utils.set_determinism",
    "debug.deterministic_warn_only": "torchtitan.distributed.utils.set_determinism",
}


def acted_on_entry(key: str) -> str | None:
    """The ACTED_ON entry covering `key` (the key itself or a section above it), if any."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ACTED_ON:
            return prefix
    return None
