"""Training throughput: flare's Trainer against a bare PyTorch loop on the same model.

For every model config x (seq_len, batch) x compile setting it measures, in one process, each row
``--repeats`` times interleaved (A, B, C, A, B, C, ...):

* ``trainer``: ``recipe.trainer.Trainer`` built from the model's shipped recipe (``configs/<model>.toml``
  next to the JSON when there is one: its FSDP reshard policy, dataloader workers, pinned memory)
  with offline overrides (synthetic corpus, byte tokenizer, no checkpoints, metrics every
  ``--log-freq`` steps) and driven through its own ``train()`` loop, untouched. Throughput is the
  median ``tps`` of its logged windows after the warm-up steps; on one GPU the trainer runs FSDP
  over a one-rank mesh (bf16 compute, fp32 masters; ``trainer-autocast``: the same with
  ``--parallelism.single_device_fsdp false``, fp32 parameters under bf16 autocast), under torchrun
  FSDP over all ranks (``--tp 2`` adds tensor parallelism).
* ``bare`` / ``bare-bf16`` / ``bare-fsdp``: the ceiling: ``AutoModelForCausalLM.from_config`` on the
  device, the same synthetic batches (pinned), fused AdamW, grad clipping, per-block
  ``torch.compile`` when compile is on (``parallelisms.compile.apply_compile``, as the trainer
  does), nothing else; the timed steps run back to back with one sync per window of ``--log-freq``
  steps (the trainer's logging cadence). ``bare`` keeps fp32 parameters under bf16 autocast,
  ``bare-flame`` is ``bare`` with fla's own kernel launches (the loop flame runs: the reference a
  flame user compares with), ``bare-bf16`` holds bf16 parameters and optimizer state,
  ``bare-fsdp`` wraps the model in FSDP2 on a one-rank mesh as one unit (bf16 compute, fp32
  masters, clip and step on the local tensors: the trainer's one-GPU default and its numerics
  under FSDP; ``bare`` is ``trainer-autocast``'s). Under torchrun every rank runs them alone,
  without communication: a per-GPU ceiling.
* ``bare-fsdp-dp`` (on request, under torchrun): the same loop with FSDP2 over all ranks (real
  all-gathers and reduce-scatters, FSDP's defaults): the ceiling of a data-parallel job. Between
  it and ``bare-fsdp`` lies the cost of communication; between it and ``trainer``, the framework's.

Columns: tokens/s per GPU (median window; p10/p90 in the JSON rows), MFU (``recipe.flops`` FLOPs/token over the
device's bf16 dense peak), peak memory (CUDA reserved; process peak RSS on CPU), the wall time of the
first step (Triton autotuning and torch.compile land there; later rows reuse what earlier rows
compiled and what is cached on disk, see scripts/tools/warm_kernels.py), and trainer/bare (the trainer's
tokens/s over the best bare variant of the same model, shape, compile setting and repeat). A summary
table follows with one line per row over its repeats: median, p10 and p90 of the pooled windows, the
range of the runs' medians, and the trainer's ratio to each bare variant with its range over runs.

    python scripts/benchmarks/bench_train.py        # GLA-340M, seq 4096 x 8, eager: trainer, bare-flame, bare, bare-fsdp
    python scripts/benchmarks/bench_train.py --models configs/gla_340M.json --compile on --impls trainer,bare
    python scripts/benchmarks/bench_train.py --models configs/gla_340M.json --seq-sweep 2048,4096,8192,16384,32768
    torchrun --nproc_per_node=2 scripts/benchmarks/bench_train.py --models configs/gla_340M.json [--tp 2]
    python scripts/benchmarks/bench_train.py --device cpu --models configs/tiny/llama.json --seq-len 64 --batch 2 \\
        --steps 3 --warmup 1 --log-freq 1 --repeats 1              # CPU smoke run (fp32, compile off)

Rank 0 prints a header (device, versions, date, command), one line per finished run, and a markdown
table at the end; rows go to ``--out`` as JSON lines (appended, one header line per invocation;
default ``$OUT/bench_train.jsonl`` when OUT is set) as soon as each run ends, so a run cut short by
a time limit keeps what it finished. ``--budget-s`` skips the runs that would start after that many
seconds (one process only). On CPU the runs compute in fp32 and compile defaults to off.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recipe.shutdown import exit_without_finalizing  # noqa: E402
from scripts.benchmarks.step_timeline import StepTimeline  # noqa: E402

IMPLS = ("trainer", "trainer-autocast", "bare", "bare-flame", "bare-bf16", "bare-fsdp", "bare-fsdp-dp")
DEFAULT_IMPLS = ("trainer", "bare-flame", "bare", "bare-fsdp")  # bare-fsdp-dp needs several ranks
# trainer rows: extra train.py arguments of each (after --trainer-args)
TRAINER_IMPLS = {"trainer": "", "trainer-autocast": "--parallelism.single_device_fsdp false"}
BARE_PRECISION = {"bare": "autocast", "bare-flame": "autocast", "bare-bf16": "bf16", "bare-fsdp": "fsdp",
                  "bare-fsdp-dp": "fsdp-dp"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="configs/gla_340M.json", help="comma-separated model config JSONs")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="local batch (sequences per GPU per step)")
    p.add_argument("--seq-sweep", default="",
                   help="comma-separated seq lens at constant tokens per batch (seq-len x batch); "
                        "batch = tokens / seq")
    p.add_argument("--compile", default="off", help="off, on, or off,on")
    p.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of every row, interleaved (row A, B, C, then A, B, C again ...): the spread "
                        "between repeats is the noise a difference must beat")
    p.add_argument("--log-freq", type=int, default=10,
                   help="trainer rows: metrics.log_freq (a real job's cadence; --warmup must be a multiple)")
    p.add_argument("--varlen", action="store_true", help="trainer rows pack each batch into one row (fla models)")
    p.add_argument("--tp", type=int, default=1, help="trainer rows: parallelism.tensor_parallel_degree")
    p.add_argument("--trainer-config", default="auto",
                   help="trainer rows: TOML job config under the overrides; auto (default) = configs/<model>.toml "
                        "next to the model JSON when it exists, none = the trainer's defaults")
    p.add_argument("--trainer-args", default="",
                   help='extra trainer overrides, e.g. "--model.converters quantize.linear.float8" (a single '
                        'flag needs the = form: --trainer-args=--parallelism.enable_async_tensor_parallel)')
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cpu hides the GPUs (default: cuda when available)")
    p.add_argument("--out", default=None, help="JSON-lines file (default $OUT/bench_train.jsonl if OUT is set)")
    p.add_argument("--budget-s", type=float, default=None, help="start no run after this many seconds")
    p.add_argument("--timeline", action="store_true",
                   help="rows also keep a per-step host/GPU timeline of the timed steps: where the GPU waited "
                        "for the host (scripts/benchmarks/step_timeline.py)")
    p.add_argument("--verbose", action="store_true", help="show the trainer's log")
    args = p.parse_args(argv)
    if args.warmup % args.log_freq or args.steps % args.log_freq:
        p.error(f"--warmup {args.warmup} and --steps {args.steps} must be multiples of --log-freq {args.log_freq} "
                "(the trainer's throughput is read from its logged windows)")
    if not set(args.compile.split(",")) <= {"off", "on"}:
        p.error(f"--compile {args.compile}: use off, on, or off,on")
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: use 1 or more")
    args.models = [m for m in args.models.split(",") if m]
    args.impls = [i for i in args.impls.split(",") if i]
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"--impls: unknown {sorted(unknown)}; choose from {IMPLS}")
    if "trainer-autocast" in args.impls and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        p.error("--impls trainer-autocast: one GPU only (parallelism.single_device_fsdp applies to one "
                "process; under torchrun the trainer runs FSDP over all ranks)")
    if args.seq_sweep:
        tokens = args.seq_len * args.batch
        args.shapes = []
        for seq in map(int, args.seq_sweep.split(",")):
            if tokens % seq:
                p.error(f"--seq-sweep: {seq} does not divide {tokens} tokens per batch (seq-len x batch)")
            args.shapes.append((seq, tokens // seq))
    else:
        args.shapes = [(args.seq_len, args.batch)]
    if args.out is None and os.environ.get("OUT"):
        args.out = os.path.join(os.environ["OUT"], "bench_train.jsonl")
    return args


# --------------------------------------------------------------------------- helpers


def synchronize():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory():
    """Drop everything the previous run left: compiled graphs, cached blocks, Python cycles."""
    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device) -> float:
    from recipe.metrics import MemoryMonitor

    return MemoryMonitor(device).peak_gib()


def recipe_toml(model: str, choice: str = "auto") -> str | None:
    """The job config the trainer rows start from (``--trainer-config``)."""
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    toml = os.path.splitext(model)[0] + ".toml"
    return toml if os.path.isfile(toml) else None


def job_args(model: str, seq: int, batch: int, steps: int, compile_on: bool, varlen: bool, tp: int,
             dump_folder: str, log_freq: int = 10, config_file: str | None = None) -> list[str]:
    """The trainer's overrides: ``config_file`` (or the project's defaults) as an offline,
    checkpoint-free benchmark job."""
    args = ["--job.config_file", config_file] if config_file else []
    args += [
        "--model.config", model, "--model.tokenizer", "bytes", "--training.dataset", "synthetic",
        "--training.seq_len", str(seq), "--training.local_batch_size", str(batch),
        "--training.steps", str(steps), "--checkpoint.no_enable", "--metrics.log_freq", str(log_freq),
        "--metrics.no_enable_tensorboard", "--job.dump_folder", dump_folder,
        # After step 1 the trainer tightens collective timeouts; a later run's first step (another
        # compile) must not trip them while ranks wait for each other.
        "--comm.train_timeout_seconds", "900",
        "--compile.enable" if compile_on else "--compile.no_enable",
    ]
    if varlen:
        args.append("--training.varlen")
    if tp > 1:
        args += ["--parallelism.tensor_parallel_degree", str(tp)]
    if not _on_gpu():
        # fla's fused CPU backward does not re-enter autocast (bf16/fp32 mismatch), and bf16 buys
        # nothing on CPU: configs/debug.toml trains in fp32 there too.
        args += ["--training.mixed_precision_param", "float32"]
    elif not config_file:
        # As the shipped recipes do: tokenize and pack in worker processes, pinned host batches.
        args += ["--training.dataloader.num_workers", "2", "--training.dataloader.pin_memory"]
    return args


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------- the two implementations


def run_trainer(model: str, seq: int, batch: int, compile_on: bool, args, config_file: str | None = None) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from recipe.config import parse_job_config
    from recipe.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_train_") as dump:
        jc = parse_job_config(job_args(model, seq, batch, args.warmup + args.steps, compile_on, args.varlen,
                                       args.tp, dump, args.log_freq, config_file)
                              + shlex.split(args.trainer_args))
        start = time.perf_counter()
        trainer = Trainer(jc)
        setup_s = time.perf_counter() - start
        step_s = []
        train_step = trainer.train_step

        def timed_train_step(micro_batches):
            # Only the first step is timed here (with a sync); throughput comes from the trainer's
            # own metrics, so later steps run exactly as in a real job.
            if step_s:
                return train_step(micro_batches)
            t0 = time.perf_counter()
            record = train_step(micro_batches)
            synchronize()
            step_s.append(time.perf_counter() - t0)
            return record

        trainer.train_step = timed_train_step
        timeline = None
        if args.timeline:
            timeline = StepTimeline(_on_gpu())
            trainer.train_step = timeline.wrap(timed_train_step, "step", "train_step_end")
            # the model's forward is an instance attribute now: FSDP's hooks still run around it
            trainer.model.forward = timeline.wrap(trainer.model.forward, None, "forward")
            trainer.forward_backward = timeline.wrap(trainer.forward_backward, None, "backward")
            trainer._clip_and_step = timeline.wrap(trainer._clip_and_step, None, "clip_and_step")
        try:
            trainer.train()
        finally:
            trainer.close()
        path = os.path.join(dump, "metrics.jsonl")
        records = []
        if os.path.exists(path):  # rank 0 writes it
            with open(path) as f:
                records = [json.loads(line) for line in f]
        timed = [r for r in records if r["step"] > args.warmup]
        row = {
            **window_stats([r["tps"] for r in timed]),
            "peak_gib": max((r["memory_gib"] for r in records), default=None),
            # per timed window: a retry frees the allocator's cache and syncs the device (a dip's suspect)
            "alloc_retries": [r.get("alloc_retries") for r in timed],
            "first_step_s": step_s[0],
            "setup_s": setup_s,
            "loss_first": records[0]["loss"] if records else None,
            "loss_last": records[-1]["loss"] if records else None,
            "flops_per_token": trainer.flops_per_token,
            "fsdp": isinstance(trainer.model, FSDPModule),
        }
        if timeline:
            synchronize()
            row["timeline"] = timeline.summary(skip=args.warmup)
    return row


def synthetic_batches(model: str, seq: int, batch: int, n: int):
    """The trainer's own data path (synthetic corpus, byte tokenizer), this rank's share."""
    from recipe.config import parse_job_config
    from recipe.data import build_dataset
    from recipe.tokenizer import build_tokenizer

    jc = parse_job_config(job_args(model, seq, batch, n, False, False, 1, tempfile.gettempdir()))
    tokenizer = build_tokenizer(jc)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    stream = iter(build_dataset(jc, tokenizer, dp_rank=rank, dp_world_size=world))
    batches = [next(stream) for _ in range(n)]
    return tokenizer, [(inputs["input"], labels) for inputs, labels in batches]


def init_distributed(device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            from recipe.net import free_port

            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def world_mesh(device):
    """A DeviceMesh over every rank (bare-fsdp-dp: FSDP with its communication)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    init_distributed(device)
    return DeviceMesh.from_group(dist.group.WORLD, device.type)


def one_rank_mesh(device):
    """A DeviceMesh holding only this rank (FSDP with no communication), under torchrun or not."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    init_distributed(device)
    if dist.get_world_size() == 1:
        group = dist.group.WORLD
    else:
        group, _ = dist.new_subgroups(group_size=1)
    return DeviceMesh.from_group(group, device.type)


def bare_setup(model_path: str, seq: int, batch: int, compile_on: bool, precision: str, n_batches: int,
               norm_backward_programs_per_sm: int | None = None, timeline: StepTimeline | None = None):
    """The bare loop's model, optimizer step and batches (also used by scripts/benchmarks/profile_step.py).

    precision: "autocast" (fp32 params, bf16 autocast), "bf16" (bf16 params and optimizer), or
    "fsdp" (FSDP2 on a one-rank mesh: bf16 compute, fp32 masters, as the trainer on one GPU).
    ``timeline`` gets a mark at each phase of every step."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    from recipe import flops as flops_lib
    from recipe.model import disable_unsupported_fused_kernels, load_model_config, reconcile_with_tokenizer

    device = bench_device()
    on_gpu = device.type == "cuda"
    if on_gpu:  # as the trainer does: the shipped Triton autotune results, or the first bare step tunes cold
        from recipe.autotune_cache import install_shipped_results
        from recipe.job_config import Job

        install_shipped_results(Job.autotune_results)
    # By default the trainer's launch of fla's norm backward (recipe/fla_kernels.py), so that the
    # bare loop stays the ceiling of the same kernels.
    from recipe.fla_kernels import set_norm_backward_programs_per_sm, use_torch_gated_backward
    from recipe.job_config import Model

    set_norm_backward_programs_per_sm(norm_backward_programs_per_sm or Model.norm_backward_programs_per_sm)
    use_torch_gated_backward()  # as the trainer: where fla refuses its gated backward kernel
    tokenizer, batches = synthetic_batches(model_path, seq, batch, n_batches)
    if on_gpu:
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    start = time.perf_counter()
    config = load_model_config(model_path)
    reconcile_with_tokenizer(config, tokenizer)
    config.use_cache = False  # HF models would build a KV cache in every training forward
    disable_unsupported_fused_kernels(config, device.type)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if precision == "bf16":
        model.to(torch.bfloat16)
    model.train()
    flops_per_token = flops_lib.flops_per_token(config, seq, model)
    blocks = model.get_submodule(model.base_model_prefix).layers
    if compile_on:
        # The same per-block compile as the trainer's (plain torch.compile per block, fla's
        # kernels kept out of the graphs, no recompile per layer_idx): the settings are
        # process-wide, so a bare row after a trainer row would get them anyway, and without them
        # inductor re-compiles fla's kernels for minutes on a fresh machine.
        from parallelisms.compile import apply_compile

        apply_compile(blocks, argparse.Namespace(backend="inductor"))
    if precision in ("fsdp", "fsdp-dp"):
        mesh = one_rank_mesh(device) if precision == "fsdp" else world_mesh(device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if on_gpu else torch.float32,
                                  reduce_dtype=torch.float32)
        if precision == "fsdp":  # the trainer's own wrapping (on one rank: one unit, kept unsharded)
            from parallelisms.data_parallel import apply_fsdp

            apply_fsdp(model, mesh, embeddings=model.get_input_embeddings(), blocks=blocks, head=[], tied=False,
                       param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype)
        else:
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(model, mesh=mesh, mp_policy=mp)
    params = list(model.parameters())
    # The trainer's optimizer settings (torchtitan defaults), fused implementation.
    optimizer = torch.optim.AdamW(params, lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast" and on_gpu)
    setup_s = time.perf_counter() - start
    mark = timeline.mark if timeline else (lambda name: None)

    # One-rank FSDP: clip and step on the local tensors, as the trainer does (parallelisms/local_shards.py)
    from parallelisms.local_shards import LocalShards

    local = LocalShards.of(params) if precision == "fsdp" else None

    def step(inputs, labels):
        mark("step")
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            loss = model(input_ids=inputs, labels=labels).loss
        mark("forward")
        loss.backward()
        mark("backward")
        if local is not None:
            local.clip_grad_norm_(params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        mark("clip")
        with local.stepping([optimizer]) if local is not None else contextlib.nullcontext():
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mark("optimizer")
        return loss.detach()

    return argparse.Namespace(step=step, batches=batches, device=device, model=model,
                              flops_per_token=flops_per_token, setup_s=setup_s)


def run_bare(model_path: str, seq: int, batch: int, compile_on: bool, precision: str, args,
             norm_backward_programs_per_sm: int | None = None) -> dict:
    """One bare-loop run (see bare_setup for ``precision``)."""
    timeline = StepTimeline(_on_gpu()) if args.timeline else None
    bare = bare_setup(model_path, seq, batch, compile_on, precision, args.warmup + args.steps,
                      norm_backward_programs_per_sm, timeline)
    step, batches, device = bare.step, bare.batches, bare.device
    losses = []
    gc_enabled = gc.isenabled()
    gc.disable()  # as in the trainer (torchtitan collects every training.gc_freq steps): no GC pauses
    try:
        t0 = time.perf_counter()
        losses.append(step(*batches[0]))
        synchronize()
        first_step_s = time.perf_counter() - t0
        for inputs, labels in batches[1:args.warmup]:
            losses.append(step(inputs, labels))
        # Timed in windows of --log-freq steps, one sync at each window's end: the cadence at which
        # the trainer syncs to log, so both give a distribution over the same windows.
        synchronize()
        windows = []
        timed = batches[max(args.warmup, 1):]
        for i in range(0, len(timed), args.log_freq):
            window = timed[i:i + args.log_freq]
            t0 = time.perf_counter()
            for inputs, labels in window:
                losses.append(step(inputs, labels))
            synchronize()
            windows.append(batch * seq * len(window) / (time.perf_counter() - t0))
    finally:
        if gc_enabled:
            gc.enable()
    return {
        **window_stats(windows),
        **({"timeline": timeline.summary(skip=max(args.warmup, 1))} if timeline else {}),
        "peak_gib": peak_memory_gib(device),
        "first_step_s": first_step_s,
        "setup_s": bare.setup_s,
        "loss_first": float(losses[0]),
        "loss_last": float(losses[-1]),
        "flops_per_token": bare.flops_per_token,
    }


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (``statistics.quantiles`` needs two values)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def window_stats(windows: list[float]) -> dict:
    """tokens/s of a run: the median window, p10/p90, and every window (for pooling repeats)."""
    if not windows:
        return {"tokens_per_s": None, "tps_p10": None, "tps_p90": None, "windows": []}
    return {"tokens_per_s": statistics.median(windows), "tps_p10": percentile(windows, 10),
            "tps_p90": percentile(windows, 90), "windows": windows}


def bench_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# --------------------------------------------------------------------------- reporting


def environment() -> dict:
    import importlib.metadata as md

    import torch

    from recipe.flops import peak_flops

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    device = bench_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": name,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        "torch": torch.__version__,
        "triton": version("triton"),
        "fla": version("flash-linear-attention") or version("fla-core"),
        "transformers": version("transformers"),
        "torchtitan": version("torchtitan"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "peak_bf16_tflops": (peak_flops(device) or 0) / 1e12 or None,
    }


COLUMNS = ("model", "seq", "batch", "compile", "impl", "tokens/s/GPU", "MFU %", "peak GiB", "first-step s",
           "trainer/bare")


def table_row(row: dict) -> list[str]:
    def num(v, fmt):
        return "—" if v is None else format(v, fmt)

    impl = row["impl"] + "".join(f" ({tag})" for tag, on in (
        (os.path.basename(row.get("trainer_config") or ""), row.get("trainer_config")),
        ("fsdp", row.get("fsdp")), ("varlen", row.get("varlen")), (f"tp {row['tp']}", row.get("tp", 1) > 1),
        (row.get("trainer_args"), row.get("trainer_args"))) if on)
    if row.get("error"):
        error = row["error"] if row["error"].startswith("skipped") else f"failed: {row['error'][:80]}"
        return [row["model"], str(row["seq"]), str(row["batch"]), "on" if row["compile"] else "off", impl,
                error, "", "", "", ""]
    return [
        row["model"], str(row["seq"]), str(row["batch"]), "on" if row["compile"] else "off", impl,
        num(row["tokens_per_s"], ",.0f"), num(row["mfu_pct"], ".1f"), num(row["peak_gib"], ".1f"),
        num(row["first_step_s"], ".1f"), num(row.get("trainer_over_bare"), ".3f"),
    ]


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
    return "\n".join(lines)


def run_row(args, env, model, name, n_params, is_fla, seq, batch, compile_on, impl, repeat, started) -> dict:
    """One run of one row: its settings, and its measurements or the reason it did not run."""
    row = {"model": name, "config": model, "params": n_params, "seq": seq, "batch": batch, "compile": compile_on,
           "impl": impl, "repeat": repeat, "varlen": impl in TRAINER_IMPLS and args.varlen and is_fla,
           "tp": args.tp if impl in TRAINER_IMPLS else 1, "world_size": env["world_size"],
           "trainer_args": (" ".join(filter(None, (args.trainer_args, TRAINER_IMPLS[impl])))
                            if impl in TRAINER_IMPLS else ""),
           "trainer_config": recipe_toml(model, args.trainer_config) if impl in TRAINER_IMPLS else None}
    if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
        row["error"] = f"skipped: --budget-s {args.budget_s:g} spent"
    elif impl in TRAINER_IMPLS and args.varlen and not is_fla:
        row["error"] = "skipped: varlen needs an fla model"
    elif impl == "bare-fsdp-dp" and env["world_size"] == 1:
        row["error"] = "skipped: bare-fsdp-dp needs several ranks (torchrun); on one it is bare-fsdp"
    else:
        free_memory()
        try:
            if impl in TRAINER_IMPLS:
                args_for_run = argparse.Namespace(**{**vars(args), "varlen": row["varlen"],
                                                     "trainer_args": row["trainer_args"]})
                row.update(run_trainer(model, seq, batch, compile_on, args_for_run, row["trainer_config"]))
            else:
                # bare-flame: fla's own launch of its norm backward, as flame runs it
                row.update(run_bare(model, seq, batch, compile_on, BARE_PRECISION[impl], args,
                                    1 if impl == "bare-flame" else None))
        except Exception as e:  # noqa: BLE001  (one failed run, e.g. OOM, must not end the sweep)
            row["error"] = f"{type(e).__name__}: {e}".strip().splitlines()[0]
            traceback.print_exc()  # the row keeps one line; the log keeps the why
        free_memory()
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """One line per row over its repeats: pooled windows (median, p10, p90), the range of the
    repeats' medians, and the trainer's ratio to each bare variant (pooled, and its range over
    repeats paired by repeat number)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("tokens_per_s"):
            groups.setdefault((r["model"], r["seq"], r["batch"], r["compile"], r["impl"]), []).append(r)
    out = []
    for key, runs in groups.items():
        pooled = [w for r in runs for w in r["windows"]]
        medians = [r["tokens_per_s"] for r in runs]
        line = {"model": key[0], "seq": key[1], "batch": key[2], "compile": key[3], "impl": key[4],
                "repeats": len(runs), **{k: v for k, v in window_stats(pooled).items() if k != "windows"},
                "repeat_min": min(medians), "repeat_max": max(medians),
                "mfu_pct": statistics.median(r["mfu_pct"] for r in runs) if runs[0].get("mfu_pct") else None,
                "peak_gib": max(r["peak_gib"] or 0 for r in runs), "first_step_s": runs[0]["first_step_s"],
                "ratios": {}}
        if key[4] in TRAINER_IMPLS:
            for (m, sq, b, c, impl), bare_runs in groups.items():
                if impl in TRAINER_IMPLS or (m, sq, b, c) != key[:4]:
                    continue
                bare_pooled = statistics.median(w for r in bare_runs for w in r["windows"])
                by_repeat = {r["repeat"]: r["tokens_per_s"] for r in bare_runs}
                paired = [r["tokens_per_s"] / by_repeat[r["repeat"]] for r in runs if r["repeat"] in by_repeat]
                line["ratios"][impl] = (line["tokens_per_s"] / bare_pooled, min(paired), max(paired))
        out.append(line)
    return out


SUMMARY_COLUMNS = ("model", "seq x batch", "compile", "impl", "runs", "tokens/s median", "p10-p90",
                   "run medians", "MFU %", "peak GiB", "first step s", "trainer / bare (range over runs)")


def summary_markdown(lines: list[dict]) -> str:
    table = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for ln in lines:
        ratios = "; ".join(f"/{impl} {r:.3f} ({lo:.3f}-{hi:.3f})" for impl, (r, lo, hi) in ln["ratios"].items())
        table.append("| " + " | ".join([
            ln["model"], f"{ln['seq']} x {ln['batch']}", "on" if ln["compile"] else "off", ln["impl"],
            str(ln["repeats"]), f"{ln['tokens_per_s']:,.0f}", f"{ln['tps_p10']:,.0f}-{ln['tps_p90']:,.0f}",
            f"{ln['repeat_min']:,.0f}-{ln['repeat_max']:,.0f}",
            "—" if ln["mfu_pct"] is None else f"{ln['mfu_pct']:.1f}", f"{ln['peak_gib']:.1f}",
            f"{ln['first_step_s']:.1f}", ratios or "—"]) + " |")
    return "\n".join(table)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initializes CUDA: the trainer follows
    from recipe.device import configure_device

    configure_device()  # before fla/triton are imported
    import logging

    import torch
    import torch.distributed as dist

    from recipe import flops as flops_lib
    from recipe.model import build_model_on_meta, load_model_config, uses_fla

    if not args.verbose:
        logging.disable(logging.WARNING)  # the trainer's per-step log lines; errors still show
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    device = bench_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torch.compile on CPU takes minutes even for tiny models; ask for it explicitly there.
    args.compile = [{"off": False, "on": True}[c] for c in args.compile.split(",") if c]
    rank = int(os.environ.get("RANK", 0))
    speak = rank == 0
    env = environment()
    peak = flops_lib.peak_flops(device)

    def say(text=""):
        if speak:
            print(text, flush=True)

    say(f"# bench_train {env['date']}")
    say(f"device: {env['device']} x {env['world_size']}; torch {env['torch']}, triton {env['triton']}, "
        f"fla {env['fla']}, transformers {env['transformers']}, torchtitan {env['torchtitan']}")
    say(f"command: {env['command']}")
    say(f"warm-up {args.warmup} + timed {args.steps} steps in windows of {args.log_freq}, {args.repeats} "
        f"interleaved repeat(s); MFU vs "
        f"{env['peak_bf16_tflops'] or 'n/a'} TFLOP/s bf16 dense peak")
    if device.type == "cpu":
        say("CPU: trainer and bare compute in fp32 (no bf16 autocast); bare-bf16 holds bf16 parameters")
    if args.budget_s is not None and env["world_size"] > 1:
        # Ranks must agree on every run they start (the trainer's collectives); elapsed times differ.
        say("--budget-s is ignored under torchrun")
        args.budget_s = None
    out = None
    if speak and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        out = open(args.out, "a")
        out.write(json.dumps({"header": env}) + "\n")
        out.flush()

    started = time.perf_counter()
    rows: list[dict] = []
    for model in args.models:
        name = os.path.splitext(os.path.basename(model))[0]
        model_config = load_model_config(model)
        is_fla = uses_fla(model_config)
        n_params = sum(p.numel() for p in build_model_on_meta(model_config).parameters())
        for seq, batch in args.shapes:
            for compile_on in args.compile:
                for repeat in range(args.repeats):
                    # Bare variants first: the trainer row can then carry its ratio as soon as it ends.
                    for impl in sorted(args.impls, key=lambda i: i in TRAINER_IMPLS):
                        row = run_row(args, env, model, name, n_params, is_fla, seq, batch, compile_on, impl,
                                      repeat, started)
                        if row.get("tokens_per_s") and peak:
                            row["mfu_pct"] = 100 * row["flops_per_token"] * row["tokens_per_s"] / peak
                        else:
                            row.setdefault("mfu_pct", None)
                        if impl in TRAINER_IMPLS and row.get("tokens_per_s"):
                            bare = [r["tokens_per_s"] for r in rows
                                    if r["impl"] not in TRAINER_IMPLS and r.get("tokens_per_s")
                                    and (r["model"], r["seq"], r["compile"], r["repeat"]) ==
                                    (name, seq, compile_on, repeat)]
                            row["trainer_over_bare"] = row["tokens_per_s"] / max(bare) if bare else None
                        rows.append(row)
                        say(" ".join(table_row(row)))
                        if out:
                            out.write(json.dumps(row) + "\n")
                            out.flush()
    say()
    say(markdown(rows))
    say()
    say(summary_markdown(summarize(rows)))
    if out:
        out.close()
        say(f"\nrows appended to {args.out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_without_finalizing(main() or 0)  # see recipe/shutdown.py
