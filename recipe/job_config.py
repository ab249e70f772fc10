"""flare's additions to torchtitan 0.2.2's JobConfig.

This file has the shape of a torchtitan ``custom_config_module``: a ``JobConfig`` dataclass whose
sections are merged into torchtitan's (fields of the same section are added, same-named fields
override the default). ``recipe.config.parse_job_config`` always merges it, so users get these
keys without passing ``--job.custom_config_module``; they may still pass one of their own.
"""


from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Job:
    autotune_results: str = "configs/autotune"
    """Folder of shipped Triton autotune result sets (recipe/autotune_cache.py): on a GPU the sets
    made on this kind of machine with this Triton/fla are installed into the Triton cache before the
    first step, which then skips fla's minutes of autotuning. Empty: install nothing."""

    dry_run: bool = False
    """Check the config, build the model on the meta device, print parameters, FLOPs per token, the
    parallel plan and a per-rank memory estimate, and exit: no process group, no GPU work, no data read."""


@dataclass
class Model:
    config: str = "configs/gla_debug.json"
    """HF config JSON (with `model_type`, flame's format) or an HF model folder holding config.json."""

    tokenizer: str = "bytes"
    """Tokenizer: "bytes" (built-in byte-level, offline) or a local HF tokenizer folder/tokenizer.json."""

    init_from_hf: str | None = None
    """HF model folder (safetensors) whose weights initialize the model, for fine-tuning/RL starts.
    Used only when no checkpoint exists yet in the dump folder."""

    name: str = "fla"
    """Free-form label for logs; the architecture comes from `model.config`."""

    norm_backward_programs_per_sm: int = 4
    """Programs per SM of fla's fused norm backward (recipe/fla_kernels.py). fla launches 1, which
    leaves the kernel waiting on memory; 4 made it 3x faster and a GLA-340M step 2% faster on
    H200. 1 = fla as shipped."""


@dataclass
class Training:
    dataset: str = "synthetic"
    """Comma-separated datasets: "synthetic" (built-in, offline), a local folder or file
    (json/jsonl/parquet/txt/arrow) or an HF hub name. Several entries are mixed by `data_probs`."""

    dataset_name: str | None = None
    """Comma-separated HF dataset config names, one per dataset (empty entries allowed)."""

    dataset_split: str = "train"
    """Comma-separated splits, one per dataset (or one for all)."""

    data_dir: str | None = None
    """Comma-separated `data_dir` arguments for `datasets.load_dataset`, one per dataset."""

    data_files: str | None = None
    """Comma-separated `data_files` arguments for `datasets.load_dataset`, one per dataset."""

    data_probs: str | None = None
    """Comma-separated sampling probabilities for mixing several datasets (default: uniform)."""

    streaming: bool = False
    """Stream datasets instead of downloading/materializing them."""

    text_column: str = "text"
    """Column holding raw text. A dataset with an `input_ids` column is used without tokenizing."""

    varlen: bool = False
    """Pack the batch into one row with `cu_seqlens` so documents do not attend across boundaries."""

    context_len: int | None = None
    """With varlen: split documents longer than this many tokens (default: seq_len)."""

    data_seed: int = 42
    """Seed for dataset shuffling and mixing (independent of the model seed)."""

    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step. Default: derived from global_batch_size."""

    skip_nan_inf: bool = True
    """Skip the optimizer step when the loss or grad norm is NaN/Inf (counted and logged)."""

    max_consecutive_skips: int = 20
    """Stop the run after this many consecutive skipped steps (0 disables the limit)."""



@dataclass
class Checkpoint:
    last_save_model_only: bool = False
    """torchtitan defaults to a weights-only final checkpoint, which cannot be resumed or extended;
    flare keeps the full state. Set true for a smaller export."""

    export_hf_on_finish: bool = False
    """When training ends, also write the final weights as an HF folder (config.json, safetensors,
    tokenizer; loadable by from_pretrained) to <dump_folder>/hf/step-N, in checkpoint.export_dtype."""

    fallback: bool = False
    """When the newest checkpoint is damaged (a file missing or of another size than recorded at
    save time), resume from the newest whole one with a warning instead of stopping. The damaged
    folder is kept (a later save of its step moves it to step-N.damaged)."""

    verify: bool = False
    """Record each checkpoint file's SHA-256 at save time and compare before loading (a full read
    of the checkpoint on rank 0, both times). Off: sizes only."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["selective", "full", "memory_budget", "none"] = "none"
    """torchtitan defaults to selective AC (every 2nd block): GLA-340M trained at 112.7k instead of
    128.8k tokens/s with it on one H200 (docs/benchmarks.md); flare makes activation checkpointing opt-in."""


@dataclass
class Parallelism:
    single_device_fsdp: bool = True
    """On one device with training.mixed_precision_param below float32. true: FSDP2 over a one-rank
    mesh, the whole model one unit, whose mixed-precision policy computes with bf16 parameters cast
    once per step (fp32 master weights and gradients; clipping and the optimizer step run on the
    local tensors, parallelisms/local_shards.py): on one H200 (2026-12-02/03) GLA-340M at 8 x 4096
    trained at 151k-156k tokens/s in 34.0 GiB (1.10-1.12x the loop flame runs), though its step
    needs as much host time as GPU time there and some runs dip 5-8% (p10) when the host falls
    behind (docs/benchmarks.md, one-GPU precision layouts). false: fp32 parameters under bf16
    autocast (flame's precision), 139k-143k tokens/s in 42.3 GiB there, steadier: more GPU work per
    step for the same host work."""


@dataclass
class Hooks:
    post_step: list[str] = field(default_factory=list)
    """Dotted paths ("pkg.module:Name" or "pkg.module.Name") of post-step hooks, run in order
    after every optimizer step. A class is constructed with the JobConfig; a function is called."""


@dataclass
class Rollout:
    """Weight export to an inference engine after optimizer steps (docs/rollout.md). Takes effect
    when `enable` is true and the `rollout` hook is listed in `hooks.post_step`."""

    enable: bool = False
    """Export the weights every `interval` steps."""

    interval: int = 1
    """Export after every N-th optimizer step (skipped steps are not exported)."""

    transport: Literal["gloo", "nccl", "ipc", "vllm"] = "nccl"
    """gloo: CPU (tests, small models); nccl: GPU broadcast to a separate engine; ipc: CUDA IPC
    handles to an engine on the same GPUs; vllm: vLLM's own weight-transfer API."""

    engine_address: str = "127.0.0.1"
    """Host of the engine's rendezvous (flare receivers) or of the vLLM HTTP server (transport vllm)."""

    engine_port: int = 29650
    """Port of the engine's rendezvous store (flare receivers) or of the vLLM HTTP server."""

    engine_world_size: int = 1
    """Receiving processes: engine workers (TP x PP x DP) that all take part in the transfer."""

    engine_tp_size: int = 1
    """The engine's tensor-parallel size (used by fused_layout to regroup q/k/v and gate/up)."""

    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the engine holds weights in; parameters the adapter keeps in fp32 (A_log, dt_bias) stay fp32."""

    bucket_mb: float = 512.0
    """Size of one flat transfer buffer; a larger parameter is sent in a bucket of its own."""

    timeout_s: float = 60.0
    """Bound on every rendezvous/transfer wait; must stay below comm.train_timeout_seconds."""

    on_failure: Literal["log", "raise"] = "log"
    """log: report a failed export, keep training and retry at the next interval; raise: stop (a
    connection then waits up to timeout_s for an engine still starting)."""

    placement: Literal["colocated", "disaggregated"] = "disaggregated"
    """colocated: engine shares the trainer's GPUs (sleeps while training; ipc or gloo transport);
    with several trainer ranks they then step through the buckets in lockstep on the host.
    disaggregated: engine on its own GPUs or nodes (nccl, gloo or vllm transport)."""

    fused_layout: bool = False
    """Send q/k/v and gate/up pre-fused per engine TP rank (qkv_proj, gate_up_proj) instead of HF
    names; for engines that load fused shards directly (vLLM takes HF names: keep false)."""


@dataclass
class RL:
    """On-policy reinforcement learning from the engine's rollouts (docs/rl.md): every step the
    trainer exports its weights (the `rollout` hook), asks the engine for `group_size` completions
    of each prompt with their log-probabilities, scores them, and takes a GRPO step."""

    enable: bool = False
    """Train on the engine's rollouts instead of the dataset (needs the rollout hook, interval 1)."""

    task: str = "reverse"
    """Prompts: a built-in task ("reverse": reverse a digit string, "add": add two numbers) or a
    JSON-lines file with "prompt" and "answer" fields."""

    prompts_per_step: int = 8
    """Prompts per optimizer step (all data-parallel ranks together)."""

    group_size: int = 8
    """Completions sampled per prompt; advantages are relative to the group's mean reward."""

    max_new_tokens: int = 8
    """Longest completion; generation also stops after a newline or EOS."""

    temperature: float = 1.0
    """Sampling temperature of the engine (the engine's log-probabilities are at this temperature)."""

    reward: str = "recipe.rl.tasks:exact_match"
    """Dotted path of the reward function: f(completion: str, answer: str) -> float."""

    normalize_std: bool = True
    """Divide each group's advantages by its reward standard deviation (GRPO); false: mean only."""

    clip_eps: float = 0.2
    """Clip range of the importance ratio between the trainer's and the engine's token probabilities."""

    kl_coef: float = 0.0
    """Weight of a KL penalty to the frozen starting weights (model.init_from_hf, held as a second,
    gradient-free copy of the model); 0: no reference model."""

    seed: int = 0
    """Seed of prompt sampling and of the engine's sampling (offset by the weight version)."""

    request_timeout_s: float = 300.0
    """How long the trainer waits for the engine's completions of one step."""


@dataclass
class Debug:
    traceback: bool = False
    """Show full tracebacks for configuration and input errors (default: one line)."""


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    parallelism: Parallelism = field(default_factory=Parallelism)
    hooks: Hooks = field(default_factory=Hooks)
    rollout: Rollout = field(default_factory=Rollout)
    rl: RL = field(default_factory=RL)
    debug: Debug = field(default_factory=Debug)
