"""The training loop: build everything from the JobConfig, then step, checkpoint, log, run hooks.

One optimizer step = ``gradient_accumulation_steps`` micro-batches on each data-parallel rank.
Each micro-batch loss is its token-sum divided by the number of valid tokens of the whole step
(all micro-batches, all DP ranks), and data parallelism sums gradients, so the update equals the
single-process update on the global batch whatever the layout.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torchtitan.components.checkpoint import AsyncMode
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import build_optimizers
from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed import ParallelDims
from torchtitan.distributed import utils as dist_utils
from torchtitan.protocols.model_converter import build_model_converters
from torchtitan.tools import utils as titan_utils
from torchtitan.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling

from parallelisms import parallelize_fla, prepare_model_config, validate_parallelism
from parallelisms.local_shards import LocalShards
from recipe import flops as flops_lib
from recipe.autotune_cache import install_shipped_results
from recipe.checkpoint import AtomicCheckpointManager
from recipe.config import data_parallel_degrees, gradient_accumulation_steps
from recipe.data import build_dataloader
from recipe.device import configure_device
from recipe.errors import UserError
from recipe.fla_kernels import set_norm_backward_programs_per_sm, use_torch_gated_backward
from recipe.hooks import StepState, build_post_step_hooks, close_hooks, run_post_step_hooks
from recipe.metrics import MetricsProcessor
from recipe.model import (
    build_model_on_meta,
    check_model_config,
    check_varlen,
    import_custom_module,
    count_parameters,
    disable_unsupported_fused_kernels,
    init_weights,
    load_hf_weights,
    load_model_config,
    reconcile_with_tokenizer,
    uses_fla,
)
from recipe.net import free_port
from recipe.rl.loss import grpo_loss, token_logprobs
from recipe.rl.rollouts import RolloutSource, validate_rl
from recipe.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class TooManySkippedSteps(UserError):
    pass


def check_model_against_job(model_config, job_config, world_size: int | None = None) -> None:
    """The checks that need the model config but no devices (the trainer and --job.dry_run)."""
    from recipe.rollout.trainer.hook import check_rollout_model

    check_model_config(model_config)
    if job_config.training.varlen:
        check_varlen(model_config)
    validate_parallelism(model_config, job_config, world_size)
    validate_rl(job_config)
    check_rollout_model(model_config, job_config)


class Trainer(Stateful):
    def __init__(self, job_config):
        self.job_config = jc = job_config
        self.device_type = configure_device()

        # Everything that can be checked without devices is checked before the process group.
        import_custom_module(jc.experimental.custom_import)
        self.tokenizer = build_tokenizer(jc)
        self.model_config = load_model_config(jc.model.config)
        reconcile_with_tokenizer(self.model_config, self.tokenizer)
        check_model_against_job(self.model_config, jc)
        self._fla_in_float32_on_cpu()

        self.parallel_dims = pd = self._init_distributed()
        self.device = self._init_device()
        if self.device_type == "cuda":  # before any fla kernel autotunes
            install_shipped_results(jc.job.autotune_results)
        if pd.dp_enabled:
            batch_mesh = pd.get_mesh("batch")
            dp_degree, dp_rank = batch_mesh.size(), batch_mesh.get_local_rank()
        else:
            dp_degree, dp_rank = 1, 0
        self.accumulation_steps = gradient_accumulation_steps(jc, dp_degree)
        self.gc_handler = titan_utils.GarbageCollection(gc_freq=jc.training.gc_freq, debug=jc.training.gc_debug)
        dist_utils.set_determinism(pd, self.device, jc.debug, distinct_seed_mesh_dims=[])

        self.dataloader = build_dataloader(jc, self.tokenizer, dp_rank=dp_rank, dp_world_size=dp_degree)
        self.rl = RolloutSource(jc, self.tokenizer, dist.get_rank(), dp_rank, dp_degree) if jc.rl.enable else None

        # Model: meta → converters (float8) → parallelize → materialize → init.
        disable_unsupported_fused_kernels(self.model_config, self.device_type)
        set_norm_backward_programs_per_sm(jc.model.norm_backward_programs_per_sm)
        use_torch_gated_backward()  # only where fla refuses its own kernel (Hopper, Triton < 3.7.1)
        prepare_model_config(self.model_config, pd, jc)
        model = build_model_on_meta(self.model_config)
        self.converters = build_model_converters(jc, pd)
        self.converters.convert(model)
        n_params = count_parameters(model)
        self.flops_per_token = flops_lib.flops_per_token(self.model_config, jc.training.seq_len, model)
        logger.info(
            f"Model {jc.model.name} ({self.model_config.model_type}): {n_params:,} parameters, "
            f"{self.flops_per_token / 1e9:.3f} GFLOP/token (training)"
        )
        model = parallelize_fla(model, pd, jc)
        model.to_empty(device="cpu" if jc.training.enable_cpu_offload else self.device)
        init_weights(model)
        model.train()
        self.model = model
        self.ref_model = self._reference_model() if jc.rl.enable and jc.rl.kl_coef > 0 else None

        self.optimizers = build_optimizers([model], jc.optimizer, pd)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, jc.lr_scheduler, jc.training.steps)
        self.optimizers.register_step_post_hook(lambda *a, **k: self.converters.post_optimizer_hook([self.model]))

        # Train state saved in checkpoints (see state_dict).
        self.step = 0
        self.ntokens_seen = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._unaccounted: list[tuple[int, torch.Tensor]] = []  # (step, grad norm) not yet counted
        # FSDP (one rank, several, or HSDP): clip and step on the local shards
        # (parallelisms/local_shards.py); None: the DTensor path (tensor parallelism, DDP).
        self.local_shards = LocalShards.of(model.parameters())
        self.skip_on_device = all(
            isinstance(o, torch.optim.Adam | torch.optim.AdamW) and o.defaults.get("fused") for o in self.optimizers
        )

        self.checkpointer = AtomicCheckpointManager(
            dataloader=self.dataloader,
            model_parts=[model],
            optimizers=self.optimizers,
            lr_schedulers=self.lr_schedulers,
            states={"train_state": self},
            checkpoint_config=jc.checkpoint,
            sd_adapter=None,
            base_folder=jc.job.dump_folder,
        )
        self.metrics = MetricsProcessor(
            jc, pd, self.device, self.flops_per_token, flops_lib.peak_flops(self.device)
        )
        self.hooks = build_post_step_hooks(jc)
        self.train_context = dist_utils.get_train_context(pd.tp_enabled and not jc.parallelism.disable_loss_parallel)
        self.autocast = self._autocast_context()
        logger.info(
            f"local batch {jc.training.local_batch_size} x seq {jc.training.seq_len}, "
            f"{self.accumulation_steps} micro-batch(es)/step, DP degree {dp_degree}, "
            f"TP degree {pd.tp}, {jc.training.steps} steps"
        )

    # ------------------------------------------------------------------ setup

    def _fla_in_float32_on_cpu(self) -> None:
        """On CPU fla's Triton kernels run in Triton's interpreter, which computes bfloat16 inputs
        wrongly (fla 0.6's chunk_gla and chunk_simple_gla forward off by ~1e10 against float32,
        Triton 3.x interpreter): a model on fla's kernels (fla's own, and transformers' OLMo-Hybrid,
        whose delta rule calls fla's when installed) trains in float32 there, with one warning."""
        jc = self.job_config
        on_fla = uses_fla(self.model_config) or self.model_config.model_type == "olmo_hybrid"
        if self.device_type != "cpu" or jc.training.mixed_precision_param == "float32" or not on_fla:
            return
        logger.warning(f"training.mixed_precision_param={jc.training.mixed_precision_param}: fla's kernels run in "
                       "Triton's interpreter on CPU, which computes bfloat16 wrongly; this CPU run trains in float32")
        jc.training.mixed_precision_param = "float32"

    def _init_distributed(self) -> ParallelDims:
        jc = self.job_config
        os.makedirs(jc.job.dump_folder, exist_ok=True)
        if "RANK" not in os.environ:  # `python train.py`: a process group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        # CPU offload keeps gradients and optimizer state in host memory: the gradient norm's
        # all-reduce then runs on CPU tensors, which needs gloo beside the accelerator's backend.
        cpu_backend = jc.training.enable_cpu_offload and dist_utils.device_type != "cpu"
        world_size = dist_utils.init_distributed(jc.comm, enable_cpu_backend=cpu_backend,
                                                 base_folder=jc.job.dump_folder)
        replicate, shard = data_parallel_degrees(jc, world_size)
        pd = ParallelDims(
            dp_shard=shard, dp_replicate=replicate, cp=1, tp=jc.parallelism.tensor_parallel_degree,
            pp=1, ep=1, etp=1, world_size=world_size,
        )
        pd.build_mesh()
        return pd

    def _init_device(self) -> torch.device:
        if self.device_type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _autocast_context(self):
        """FSDP (also single-device FSDP) casts parameters itself; every other layout (DDP, TP
        alone, one device with parallelism.single_device_fsdp=false) runs the forward under
        autocast so `mixed_precision_param` is honoured there too."""
        dtype = TORCH_DTYPE_MAP[self.job_config.training.mixed_precision_param]
        if isinstance(self.model, FSDPModule) or dtype == torch.float32:
            return contextlib.nullcontext
        logger.info(f"Mixed precision: autocast to {dtype} (no FSDP)")
        return lambda: torch.autocast(self.device_type, dtype=dtype)

    # ------------------------------------------------------------------ loop

    def train(self) -> None:
        jc = self.job_config
        self.checkpointer.load(step=jc.checkpoint.load_step)
        if self.step == 0 and jc.model.init_from_hf:
            logger.info(f"Initial weights from HF folder {jc.model.init_from_hf}")
            load_hf_weights(self.model, jc.model.init_from_hf)
        if self.step >= jc.training.steps:
            logger.info(f"Nothing to do: the checkpoint is at step {self.step} of {jc.training.steps}")
            self._maybe_export_hf()
            return
        logger.info(f"Training from step {self.step + 1} to {jc.training.steps}")

        profile = maybe_enable_profiling(jc.profiling, global_step=self.step, base_folder=jc.job.dump_folder)
        snapshot = maybe_enable_memory_snapshot(jc.profiling, global_step=self.step, base_folder=jc.job.dump_folder)
        with profile as profiler, snapshot as memory_profiler:
            batches = iter(self.dataloader)
            if self.rl is not None:
                self._export_for_rl()
            while self.step < jc.training.steps:
                self.step += 1
                self.gc_handler.run(self.step)
                if self.rl is not None:
                    record = self.rl_train_step()
                else:
                    micro_batches = self._next_micro_batches(batches)
                    if micro_batches is None:
                        logger.warning(f"Data exhausted: stopping before step {self.step}")
                        self.step -= 1
                        break
                    record = self.train_step(micro_batches)
                self.checkpointer.save(self.step, last_step=self.step == jc.training.steps)
                run_post_step_hooks(self.hooks, self._step_state(record))
                if profiler:
                    profiler.step()
                if memory_profiler:
                    memory_profiler.step()
                if self.step == 1:  # first step done: compile/autotune is over, fail faster on hangs
                    dist_utils.set_pg_timeouts(timedelta(seconds=jc.comm.train_timeout_seconds), self.parallel_dims)
        self._account_skips()
        logger.info(f"Training done at step {self.step}; {self.skipped_steps} step(s) skipped for NaN/Inf")
        self._maybe_export_hf()

    def _maybe_export_hf(self) -> None:
        """checkpoint.export_hf_on_finish: gather the full weights (a collective, so every rank
        calls it) and write <dump_folder>/hf/step-N on rank 0, unless a previous run already did."""
        jc = self.job_config
        out = os.path.join(jc.job.dump_folder, "hf", f"step-{self.step}")
        if not jc.checkpoint.export_hf_on_finish or os.path.isdir(out):
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from recipe import hf_io

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            # The config as the user wrote it (not the copy adjusted for this device/layout), sized like the model.
            spec = hf_io.model_spec(hf_io.load_config(jc.model.config, "model.config", self.tokenizer))
            hf_io.check_against_spec({k: v.shape for k, v in state.items()}, spec, "the trained model")
            with hf_io.atomic_folder(out, overwrite=True) as tmp:
                hf_io.write_hf(hf_io.complete_tied(state, spec), spec, tmp, self.tokenizer,
                               TORCH_DTYPE_MAP[jc.checkpoint.export_dtype])
            logger.info(f"HF export complete: {out}")
        # No barrier: writing a large model can outlast the training-time collective timeout, and
        # nothing after this needs rank 0.

    def _next_micro_batches(self, batches):
        micro_batches = []
        for _ in range(self.accumulation_steps):
            start = time.perf_counter()
            try:
                input_dict, labels = next(batches)
            except StopIteration:
                return None
            self.metrics.data_wait_s += time.perf_counter() - start
            micro_batches.append((input_dict, labels))
        return micro_batches

    def train_step(self, micro_batches) -> dict:
        pd = self.parallel_dims
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]

        # The model shifts labels by one: the last position of each row has no target. Counted on
        # the host (the labels are CPU tensors) and summed over DP ranks without a host sync, so
        # the host keeps queuing work ahead of the GPU: torch.tensor(..., device=cuda) would wait
        # for the device, and torchtitan's dist_sum returns .item().
        local_valid = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels in micro_batches)
        global_valid = torch.tensor(float(local_valid)).to(self.device, non_blocking=True)  # staged, no device wait
        if pd.dp_enabled:
            global_valid = funcol.all_reduce(global_valid, reduceOp="sum", group=pd.get_mesh("batch"))

        losses = []
        for input_dict, labels in micro_batches:
            loss = self.forward_backward(input_dict, labels, global_valid)
            losses.append(loss)
            self._count_tokens(labels.numel())
        self.metrics.steps_since_last_log += 1

        grad_norm, found_inf = self._clip_and_step()

        if not self.metrics.should_log(self.step):
            return {"found_inf": found_inf}
        self._account_skips()
        loss = torch.stack(losses).sum()  # this rank's share of the global mean loss
        local_mean = loss * global_valid / max(local_valid, 1)
        if pd.dp_enabled:
            loss_mesh = pd.get_optional_mesh("loss")
            global_loss = dist_utils.dist_sum(loss, loss_mesh)
            loss_max = dist_utils.dist_max(local_mean, loss_mesh)
            tokens = self._global_tokens_seen(loss_mesh)
        else:
            global_loss, loss_max, tokens = loss.item(), local_mean.item(), self.ntokens_seen
        record = self.metrics.log(
            self.step, float(global_loss), float(loss_max), float(grad_norm), lr,
            {"tokens_seen": tokens, "skipped_steps": self.skipped_steps},
        )
        record["found_inf"] = found_inf
        return record

    def _count_tokens(self, n: int) -> None:
        self.ntokens_seen += n
        self.metrics.ntokens_since_last_log += n

    def _global_tokens_seen(self, loss_mesh) -> int:
        """Tokens every rank has trained on so far (a collective over the loss mesh)."""
        return int(dist_utils.dist_sum(torch.tensor(self.ntokens_seen, device=self.device, dtype=torch.float64),
                                       loss_mesh))

    def _reference_model(self):
        """rl.kl_coef: a gradient-free copy of the model, parallelized like it, holding the starting
        weights (model.init_from_hf) for the whole run, also after a resume."""
        jc = self.job_config
        ref = parallelize_fla(build_model_on_meta(self.model_config), self.parallel_dims, jc)
        ref.to_empty(device="cpu" if jc.training.enable_cpu_offload else self.device)
        init_weights(ref)
        load_hf_weights(ref, jc.model.init_from_hf)
        ref.requires_grad_(False)
        ref.eval()
        logger.info(f"rl: KL reference model loaded from {jc.model.init_from_hf} (rl.kl_coef={jc.rl.kl_coef})")
        return ref

    def _export_for_rl(self) -> None:
        """The engine samples the first step from the weights training starts with (version = the
        current step); the rollout hook exports every later step's."""
        from recipe.rollout.trainer.hook import RolloutHook

        hook = next(h for h in self.hooks if isinstance(h, RolloutHook))
        hook.export(self.model, self.step)

    def rl_train_step(self) -> dict:
        """One GRPO step on the completions the engine sampled from the previous step's weights."""
        jc, pd = self.job_config, self.parallel_dims
        start = time.perf_counter()
        batch = self.rl.next_batch(self.step - 1, self.device)
        self.metrics.data_wait_s += time.perf_counter() - start
        self.optimizers.zero_grad()
        lr = self.lr_schedulers.schedulers[0].get_last_lr()[0]
        with self.train_context():
            with self.autocast():
                logits = self.model(input_ids=batch.tokens).logits
            logp = token_logprobs(logits, batch.tokens, jc.rl.temperature)
            del logits
            ref_logp = None
            if self.ref_model is not None:
                with torch.no_grad(), self.autocast():
                    ref_logp = token_logprobs(self.ref_model(input_ids=batch.tokens).logits, batch.tokens,
                                              jc.rl.temperature)
            loss, stats = grpo_loss(logp, batch.old_logprobs, batch.advantages, batch.mask, jc.rl.clip_eps,
                                    batch.global_tokens, ref_logp, jc.rl.kl_coef)
            loss.backward()
        self._count_tokens(int(batch.mask.sum()))
        self.metrics.steps_since_last_log += 1
        grad_norm, found_inf = self._clip_and_step()
        if not self.metrics.should_log(self.step):
            return {"found_inf": found_inf}
        self._account_skips()
        loss = loss.detach()
        gap_max = stats["logprob_gap_max"]
        if pd.dp_enabled:
            loss_mesh = pd.get_optional_mesh("loss")
            global_loss = dist_utils.dist_sum(loss, loss_mesh)
            gap_max = dist_utils.dist_max(gap_max, loss_mesh)
            tokens = self._global_tokens_seen(loss_mesh)
        else:
            global_loss, gap_max, tokens = loss.item(), gap_max.item(), self.ntokens_seen
        rl_metrics = {**batch.metrics, "logprob_gap_max": float(gap_max),
                      "logprob_gap_mean": float(stats["logprob_gap_mean"]), "clip_fraction": float(stats["clip_fraction"])}
        if "kl" in stats:
            rl_metrics["kl"] = float(stats["kl"])
        record = self.metrics.log(self.step, float(global_loss), float(global_loss), float(grad_norm), lr,
                                  {"tokens_seen": tokens, "skipped_steps": self.skipped_steps, **rl_metrics})
        logger.info(f"rl step {self.step:>5}  reward {rl_metrics['reward_mean']:.3f}  exact {rl_metrics['exact_match']:.3f}  "
                    f"advantage std "
                    f"{rl_metrics['advantage_std']:.3f}  logprob gap mean {rl_metrics['logprob_gap_mean']:.4f} "
                    f"max {rl_metrics['logprob_gap_max']:.4f}  clipped {100 * rl_metrics['clip_fraction']:.1f}%")
        record["found_inf"] = found_inf
        return record

    def forward_backward(self, input_dict, labels, global_valid) -> torch.Tensor:
        inputs = input_dict["input"].to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        extra = {k: v.to(self.device) for k, v in input_dict.items() if k != "input"}
        with self.train_context():
            with self.autocast():
                out = self.model(input_ids=inputs, labels=labels, num_items_in_batch=global_valid, **extra)
            loss = out.loss
            del out  # free the logits before backward
            loss.backward()
        return loss.detach()

    def _clip_and_step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip the gradients (training.max_norm), step the optimizers and the LR schedule; returns
        the gradient norm before clipping and the step's skip flag (see ``_optimizer_step``)."""
        max_norm = self.job_config.training.max_norm if self.job_config.training.max_norm > 0 else math.inf
        if self.local_shards is not None:
            grad_norm = self.local_shards.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            grad_norm = dist_utils.clip_grad_norm_(list(self.model.parameters()), max_norm, foreach=True)
        found_inf = self._optimizer_step(grad_norm)
        self.lr_schedulers.step()
        return grad_norm, found_inf

    def _optimizer_step(self, grad_norm: torch.Tensor) -> torch.Tensor | None:
        """Step the optimizers unless ``grad_norm`` is NaN/Inf (training.skip_nan_inf).

        Returns this step's skip flag as a device tensor (None when skipping is off). fused
        Adam/AdamW take GradScaler's ``found_inf``: the kernel leaves parameters, moments and step
        counts untouched when it is 1, so deciding costs no host sync. Other implementations
        decide on the host (one sync per step). Counting and the consecutive-skip limit happen in
        ``_account_skips`` on log steps, where the loop syncs anyway. ``grad_norm`` is reduced
        over all ranks, so every rank takes the same decision.
        """
        self.checkpointer.maybe_wait_for_staging()
        if not self.job_config.training.skip_nan_inf:
            self._step_optimizers()
            return None
        found_inf = (~torch.isfinite(grad_norm)).to(torch.float32)
        if self.skip_on_device:
            for optimizer in self.optimizers:
                optimizer.found_inf = found_inf
            self._step_optimizers()
        elif not found_inf.item():
            self._step_optimizers()
        self._unaccounted.append((self.step, grad_norm.detach()))
        return found_inf

    def _step_optimizers(self) -> None:
        with self.local_shards.stepping(self.optimizers) if self.local_shards is not None else contextlib.nullcontext():
            self.optimizers.step()

    def _account_skips(self, enforce_limit: bool = True) -> None:
        """Count the skipped steps since the last call (one host sync), log them, and stop the run
        after ``training.max_consecutive_skips`` consecutive ones."""
        if not self._unaccounted:
            return
        steps = [step for step, _ in self._unaccounted]
        norms = torch.stack([norm for _, norm in self._unaccounted]).tolist()
        self._unaccounted.clear()
        for step, norm in zip(steps, norms):
            if math.isfinite(norm):
                self.consecutive_skips = 0
                continue
            self.skipped_steps += 1
            self.consecutive_skips += 1
            logger.warning(
                f"step {step}: grad norm {norm} is not finite; optimizer step skipped "
                f"({self.consecutive_skips} in a row, {self.skipped_steps} in total)"
            )
        limit = self.job_config.training.max_consecutive_skips
        if enforce_limit and limit and self.consecutive_skips >= limit:
            self._stop_after_skips(limit)

    def _stop_after_skips(self, limit: int) -> None:
        saved = ""
        if self.checkpointer.enable:
            # Skipped steps change no weights: the current state is the last good one.
            self.consecutive_skips = 0  # a resumed run starts counting afresh
            self.checkpointer._async_wait()  # an async save in flight must not race this one
            self.checkpointer.dcp_save(
                self.checkpointer._flattened_model_states_sd(),
                self.checkpointer._create_checkpoint_id(self.step),
                async_mode=AsyncMode.DISABLED,
            )
            saved = f"; the last good state is saved as step-{self.step}"
        raise TooManySkippedSteps(
            f"training.max_consecutive_skips={limit}: {limit} consecutive steps had NaN/Inf "
            f"gradients (up to step {self.step}){saved}. Lower the learning rate or inspect the data, "
            "then resume"
        )

    def _step_state(self, record: dict) -> StepState:
        return StepState(
            step=self.step,
            model=self.model,
            parallel_dims=self.parallel_dims,
            job_config=self.job_config,
            found_inf=record.get("found_inf"),
            tokens_seen=self.ntokens_seen,
            metrics={k: v for k, v in record.items() if k != "skipped"},
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        self._account_skips(enforce_limit=False)  # a checkpoint holds exact counts
        return {
            "step": self.step,
            "ntokens_seen": self.ntokens_seen,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = state_dict["step"]
        self.ntokens_seen = state_dict["ntokens_seen"]
        self.skipped_steps = state_dict.get("skipped_steps", 0)
        self.consecutive_skips = state_dict.get("consecutive_skips", 0)

    def close(self) -> None:
        if getattr(self, "rl", None) is not None:
            self.rl.close()
        close_hooks(getattr(self, "hooks", []))
        if getattr(self, "checkpointer", None) is not None:
            self.checkpointer.close()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
