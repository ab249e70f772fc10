"""``--job.dry_run``: what a job would build, without a process group, a GPU or data.

It makes the checks the trainer makes before its process group (the config, the model config
against the layout), builds the model on the meta device and reports its parameters, training
FLOPs per token (recipe/flops.py), the plan ``parallelize_fla`` would apply for this config and
world size, and the memory per rank that parameters, gradients and optimizer state take. Datasets
are not opened; a tokenizer is loaded only when it is local ("bytes", or a file or folder here).
"""

from __future__ import annotations

import os

import torch
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims

from parallelisms.parallelize import loss_parallel_enabled, make_plan, prepare_model_config, single_device_fsdp
from recipe import flops as flops_lib
from recipe.config import data_parallel_degrees, gradient_accumulation_steps
from recipe.data import parse_sources
from recipe.model import (
    build_model_on_meta,
    count_parameters,
    import_custom_module,
    load_model_config,
    reconcile_with_tokenizer,
)
from recipe.tokenizer import build_tokenizer
from recipe.trainer import check_model_against_job

# Adam/AdamW keep two moments (exp_avg, exp_avg_sq) per parameter, in the parameter's dtype.
ADAM_STATES = 2
# flare builds fp32 parameters (master weights) on every layout; training.dtype is refused.
MASTER_BYTES = 4


def parallel_dims(job_config, world_size: int) -> ParallelDims:
    """The trainer's ParallelDims for this config and world size, without building a mesh."""
    replicate, shard = data_parallel_degrees(job_config, world_size)
    return ParallelDims(
        dp_shard=shard, dp_replicate=replicate, cp=1, tp=job_config.parallelism.tensor_parallel_degree,
        pp=1, ep=1, etp=1, world_size=world_size,
    )


def data_parallel_kind(job_config, pd: ParallelDims) -> str:
    """Which data parallelism parallelize_fla applies (same branches)."""
    if pd.fsdp_enabled:
        return "HSDP" if pd.dp_replicate_enabled else "FSDP"
    if single_device_fsdp(pd, job_config):
        return "single-device FSDP"
    if pd.dp_replicate_enabled:
        return "DDP"
    return "none"


def memory_per_rank(n_params: int, job_config, pd: ParallelDims) -> dict[str, int]:
    """Bytes per rank of parameters, gradients and optimizer state (fp32 masters).

    FSDP/HSDP shard all three over ``dp_shard``; TP is counted as splitting every parameter
    ``tp`` ways (norms and other replicated parameters make the real figure slightly higher).
    DDP adds its gradient buckets (a second copy of the gradients). With
    ``training.enable_cpu_offload`` FSDP keeps all of it in host memory instead of the device.
    """
    kind = data_parallel_kind(job_config, pd)
    shards = pd.tp * (pd.dp_shard if kind in ("FSDP", "HSDP") else 1)
    per_param = n_params * MASTER_BYTES / shards
    out = {
        "parameters": int(per_param),
        "gradients": int(per_param),
        "optimizer state": int(ADAM_STATES * per_param),
    }
    if kind == "DDP":
        out["DDP gradient buckets"] = int(per_param)
    return out


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**27 else f"{n_bytes / 2**20:.2f} MiB"


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _tokenizer_or_note(job_config):
    """The tokenizer when it can be loaded here; a hub-style name that is no local file or folder
    is not looked up (a dry run reads nothing from the network) and is reported instead."""
    spec = job_config.model.tokenizer
    if spec == "bytes" or os.path.exists(os.path.expanduser(spec)):
        return build_tokenizer(job_config), None
    return None, (
        f"model.tokenizer '{spec}' is no local file or folder here: not loaded, so the vocabulary is "
        "model.config's; training loads tokenizers from local files only (recipe/tokenizer.py)"
    )


def _plan_lines(job_config, model_config, model, pd: ParallelDims) -> list[str]:
    jc, t, p = job_config, job_config.training, job_config.parallelism
    lines = []
    if pd.tp_enabled:
        plan = make_plan(model_config, jc, pd.tp)
        extras = [f"loss parallel {'on' if loss_parallel_enabled(pd, jc) else 'off'}"]
        if p.enable_async_tensor_parallel:
            extras.append("async TP")
        if plan.float8:
            extras.append("float8 all-gathers")
        lines.append(f"tensor parallel: degree {pd.tp}, {type(plan).__name__} with sequence parallelism, "
                     + ", ".join(extras))
    else:
        lines.append("tensor parallel: off")

    kind = data_parallel_kind(jc, pd)
    param, reduce = _short(t.mixed_precision_param), _short(t.mixed_precision_reduce)
    if kind in ("FSDP", "HSDP", "single-device FSDP"):
        degrees = (f"{pd.dp_replicate} replicas x {pd.dp_shard} shards" if kind == "HSDP"
                   else f"{pd.dp_shard} shards" if kind == "FSDP" else "one rank")
        offload = ", CPU offload" if t.enable_cpu_offload else ""
        lines.append(f"data parallel: {kind} ({degrees}), compute {param}, gradient reduction {reduce}, "
                     f"reshard after forward: {p.fsdp_reshard_after_forward}{offload}")
    else:
        what = f"DDP over {pd.dp_replicate} replicas (gradients summed)" if kind == "DDP" else "none"
        autocast = f"autocast to {param}" if TORCH_DTYPE_MAP[t.mixed_precision_param] != torch.float32 else "fp32"
        lines.append(f"data parallel: {what}; precision: {autocast} (fp32 parameters)")

    n_blocks = len(make_plan(model_config, jc, 1).blocks(model))
    ac = jc.activation_checkpoint
    if ac.mode == "none":
        lines.append("activation checkpointing: none")
    elif ac.mode == "full":
        lines.append(f"activation checkpointing: full, {n_blocks}/{n_blocks} blocks")
    elif ac.selective_ac_option == "op":
        lines.append(f"activation checkpointing: selective per op, {n_blocks}/{n_blocks} blocks")
    else:
        every = int(ac.selective_ac_option)
        lines.append(f"activation checkpointing: selective, 1 block in {every}, {n_blocks // every}/{n_blocks} blocks")

    if jc.compile.enable and "model" in jc.compile.components:
        lines.append(f"compile: {n_blocks} blocks (and a plain-torch final norm), backend {jc.compile.backend}")
    else:
        lines.append("compile: off")
    lines.append(f"converters: {', '.join(jc.model.converters) if jc.model.converters else 'none'}")
    return lines


def report(job_config, world_size: int) -> str:
    """Run the checks and build the report; raises UserError (one line) for bad input."""
    jc, t = job_config, job_config.training
    not_checked = []

    import_custom_module(jc.experimental.custom_import)
    tokenizer, note = _tokenizer_or_note(jc)
    if note:
        not_checked.append(note)
    model_config = load_model_config(jc.model.config)
    if tokenizer is not None:
        reconcile_with_tokenizer(model_config, tokenizer)
    check_model_against_job(model_config, jc, world_size)
    specs, _ = parse_sources(jc)
    if any(spec.path != "synthetic" for spec in specs):  # the built-in corpus has nothing to open
        not_checked.append(f"datasets are not opened (training.dataset = '{t.dataset}')")

    pd = parallel_dims(jc, world_size)
    dp_degree = pd.dp_replicate * pd.dp_shard
    accumulation = gradient_accumulation_steps(jc, dp_degree)
    switched = prepare_model_config(model_config, pd, jc)
    model = build_model_on_meta(model_config)
    n_params = count_parameters(model)
    flops = flops_lib.flops_per_token(model_config, t.seq_len, model)
    tokens_per_step = t.local_batch_size * t.seq_len * accumulation * dp_degree

    source = jc.job.config_file or "defaults and command line"
    lines = [
        f"flare dry run: {source}, world size {world_size} (no process group, no GPU work, no data read)",
        f"model: {jc.model.name} ({model_config.model_type}, {jc.model.config}): {n_params:,} parameters",
        f"FLOPs per token: {flops:,.0f} ({flops / 1e9:.3f} GFLOP, training, seq_len {t.seq_len}; recipe/flops.py)",
        f"batch: {t.local_batch_size} x {t.seq_len} tokens per rank, {accumulation} micro-batch(es) per step, "
        f"data-parallel degree {dp_degree}: {tokens_per_step:,} tokens per step, {t.steps:,} steps",
        "parallel plan:",
        *(f"  {line}" for line in _plan_lines(jc, model_config, model, pd)),
    ]
    lines += [f"  model config: {message}" for message in switched]

    memory = memory_per_rank(n_params, jc, pd)
    lines.append(f"memory per rank, estimated ({jc.optimizer.name}, fp32 masters), excluding activations, "
                 "gathered/low-precision weight copies and communication buffers:")
    lines += [f"  {name}: {_size(size)}" for name, size in memory.items()]
    if t.enable_cpu_offload:
        lines.append(f"  total: {_size(sum(memory.values()))} in host memory (training.enable_cpu_offload), "
                     "none of it on the device")
    else:
        lines.append(f"  total: {_size(sum(memory.values()))} on the device")
    if jc.job.save_config_file:
        not_checked.append(f"job.save_config_file '{jc.job.save_config_file}' is written by a training run only")
    if not_checked:
        lines += ["not checked:", *(f"  {item}" for item in not_checked)]
    return "\n".join(lines)

