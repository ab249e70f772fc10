"""Parity harness: a single-process reference run vs the same training run in a parallel layout.

Every layout starts from the reference's initial weights (``recipe.model.load_full_state_dict``, as
``model.init_from_hf`` loads), trains the same global batches with AdamW in fp32, each data-parallel rank taking
its rows, and reports per-step global losses and full gradients (``DTensor.full_tensor()``).
Layouts sharing a world size run one after another in one spawned gloo process group.
fla's softmax attention (``transformer``) runs with an exact SDPA stand-in for flash-attn, which
is CUDA-only (``softmax_attention``, tests/sdpa_flash_attn.py).
"""

from recipe.device import configure_device

configure_device()  # before fla/triton: spawned workers import this module first

import copy  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import sdpa_flash_attn  # noqa: E402  (tests/, on sys.path in pytest and in the spawned workers)
from recipe.net import free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS, LR = 3, 3e-3
# fp32 on CPU; sharded matmuls and collectives only reorder sums. Measured max differences are
# ~1e-6 (see docs/parallelisms.md); these bounds leave an order of magnitude of margin.
RTOL, ATOL = 1e-4, 1e-5


def config_path(family: str) -> str:
    return os.path.join(ROOT, "configs", "tiny", f"{family}.json")


def model_config(family: str, model_type: str | None = None, **overrides):
    """configs/tiny/<family>.json shrunk to hidden 64 (Triton's CPU interpreter is slow);
    ``model_type`` reuses a family's file for a look-alike (qwen3 from llama)."""
    import fla  # noqa: F401  (registers fla model types)
    from transformers import AutoConfig

    with open(config_path(family)) as f:
        values = json.load(f)
    model_type = model_type or values.pop("model_type")
    values.pop("model_type", None)
    # use_cache=False as parallelisms.prepare_model_config sets it (the reference must match)
    small = {"hidden_size": 64, "intermediate_size": 128, "fuse_cross_entropy": False,
             "fuse_linear_cross_entropy": False, "use_cache": False}
    if model_type == "hgrn2":
        small.update(expand_ratio=32, num_heads=2)
    if model_type in ("llama", "qwen2", "qwen3"):
        small.update(head_dim=32)
    values.update(small)
    values.update(overrides)
    types = values.get("layer_types")
    if types and len(types) != values["num_hidden_layers"]:  # OLMo-Hybrid: repeat the file's pattern
        values["layer_types"] = [types[i % len(types)] for i in range(values["num_hidden_layers"])]
    return AutoConfig.for_model(model_type, **values)


def make_batches(vocab: int, batch: int, seq: int = 32, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[torch.rand(batch, seq, generator=g) < 0.1] = -100  # some ignored tokens
        out.append((ids, labels))
    return out


def clean(name: str) -> str:
    """Parameter path without the AC/compile wrappers' inserted module names."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def full_grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if isinstance(g, DTensor):
            g = g.full_tensor()
        out[clean(name)] = None if g is None else g.detach().clone()
    return out


def train_steps(model, batches, *, dp_rank=0, dp_size=1, context=nullcontext, loss_group=None):
    opt = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    losses, grads = [], []
    for input_ids, labels in batches:
        n_valid = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
        rows = slice(dp_rank * len(input_ids) // dp_size, (dp_rank + 1) * len(input_ids) // dp_size)
        opt.zero_grad(set_to_none=True)
        with context():
            out = model(input_ids=input_ids[rows], labels=labels[rows], num_items_in_batch=n_valid)
            loss = out.loss
            loss.backward()
        loss = loss.detach().clone()
        if loss_group is not None:
            dist.all_reduce(loss, group=loss_group)
        losses.append(loss.item())
        grads.append(full_grads(model))
        opt.step()
    return losses, grads


def softmax_attention(cfg):
    """Context in which a model of ``cfg`` is built and trained: fla's softmax attention
    (``transformer``, the ``attn`` layers of hybrid models) calls flash-attn, CUDA-only and absent
    from CPU installs, so it gets the exact SDPA stand-in of tests/sdpa_flash_attn.py (in the
    reference and in every worker rank). The plans under test do not depend on the kernel."""
    if cfg.model_type == "transformer" or getattr(cfg, "attn", None):
        return sdpa_flash_attn.installed()
    return nullcontext()


def build(cfg):
    from recipe.model import build_model_on_meta

    return build_model_on_meta(cfg)


def retie(model) -> None:
    """``to_empty`` replaces each module's parameter with its own new one, untying
    ``tie_word_embeddings``; HF's tie_weights ties them again (a no-op for untied configs)."""
    model.tie_weights()


@torch.no_grad()
def _fix_uninitialized(model) -> None:
    """recipe.model.init_weights leaves HGRN2's ``lower_bounds`` (created with zeros in __init__,
    so empty after meta materialization) uninitialized; give it fla's initial value."""
    base = model.get_submodule(model.base_model_prefix)
    if isinstance(getattr(base, "lower_bounds", None), torch.nn.Parameter):
        base.lower_bounds.zero_()


class LinearCrossEntropy(torch.nn.Module):
    """Torch stand-in with the call signature of fla's FusedLinearCrossEntropyLoss, to test the
    tensor-parallel style around it apart from fla's kernels (fla's own loss, interpreted on CPU,
    is tested too: ``gla_fla_linear_ce`` in test_parallel_parity.py)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, x, target, weight, bias=None):
        logits = torch.nn.functional.linear(x, weight, bias).float()
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


def linear_ce_standin(model) -> None:
    model.criterion = LinearCrossEntropy()


def reference(cfg, batches, seed: int = 0, setup: str = "") -> dict:
    with softmax_attention(cfg):
        return _reference(cfg, batches, seed, setup)


def _reference(cfg, batches, seed: int, setup: str) -> dict:
    from recipe.model import init_weights

    torch.manual_seed(seed)
    model = build(cfg)
    if setup:
        globals()[setup](model)
    model.to_empty(device="cpu")
    init_weights(model)
    retie(model)
    _fix_uninitialized(model)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.time()
    losses, grads = train_steps(model, batches)
    return {"init": init, "losses": losses, "grads": grads, "seconds": time.time() - t0}


@dataclass
class Layout:
    name: str
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    args: tuple[str, ...] = ()

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp

    def job_config(self, family: str, seq: int):
        from recipe.config import parse_job_config

        args = [
            "--model.config", config_path(family),
            "--parallelism.data_parallel_replicate_degree", str(self.dp_replicate),
            "--parallelism.data_parallel_shard_degree", str(self.dp_shard),
            "--parallelism.tensor_parallel_degree", str(self.tp),
            "--training.mixed_precision_param", "float32",
            "--training.seq_len", str(seq),
            "--activation_checkpoint.mode", "none",
            *self.args,
        ]
        return parse_job_config(args, world_size=self.world)


@dataclass
class Job:
    """One layout of one model: what a worker runs."""

    key: str
    family: str
    cfg: object
    layout: Layout
    init: dict
    batches: list
    setup: str = ""  # name of a function in this module applied to the model before parallelizing
    results: dict = field(default_factory=dict)


def fsdp_offload_counts(model) -> dict[str, int]:
    """How many FSDP-managed parameters are offloaded to CPU (and pinned): FSDP's own per-parameter
    flags, so a test sees whether ``training.enable_cpu_offload`` reached ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    counts = {"params": 0, "offload_to_cpu": 0, "pin_memory": 0}
    groups = {}  # by id: fully_shard([norm, lm_head]) gives both modules one state
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group  # private: no public accessor in torch 2.13
            if group is not None:
                groups[id(group)] = group
    for group in groups.values():
        for fsdp_param in group.fsdp_params:
            counts["params"] += 1
            counts["offload_to_cpu"] += bool(fsdp_param.offload_to_cpu)
            counts["pin_memory"] += bool(fsdp_param.pin_memory)
    return counts


def run_job(job: Job) -> dict:
    with softmax_attention(job.cfg):
        return _run_job(job)


def _run_job(job: Job) -> dict:
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed import utils as dist_utils

    from parallelisms import parallelize_fla, prepare_model_config, validate_parallelism
    from recipe.model import init_weights, load_full_state_dict

    layout, cfg = job.layout, copy.deepcopy(job.cfg)
    jc = layout.job_config(job.family, seq=job.batches[0][0].shape[1])
    validate_parallelism(cfg, jc, world_size=layout.world)
    pd = ParallelDims(dp_shard=layout.dp_shard, dp_replicate=layout.dp_replicate, cp=1, tp=layout.tp,
                      pp=1, ep=1, etp=1, world_size=layout.world)
    pd.build_mesh()
    prepare_model_config(cfg, pd, jc)
    model = build(cfg)
    if job.setup:
        globals()[job.setup](model)
    model = parallelize_fla(model, pd, jc)
    model.to_empty(device="cpu")
    init_weights(model)
    retie(model)
    load_full_state_dict(model, dict(job.init))  # as model.init_from_hf loads
    if pd.dp_enabled:
        batch = pd.get_mesh("batch")
        dp_rank, dp_size, loss_group = batch.get_local_rank(), batch.size(), pd.get_mesh("loss").get_group()
    else:
        dp_rank, dp_size, loss_group = 0, 1, None
    context = dist_utils.get_train_context(pd.tp_enabled and not jc.parallelism.disable_loss_parallel)
    t0 = time.time()
    losses, grads = train_steps(model, job.batches, dp_rank=dp_rank, dp_size=dp_size, context=context,
                                loss_group=loss_group)
    criterion = getattr(model, "criterion", None)
    return {"losses": losses, "grads": grads, "seconds": time.time() - t0,
            "fsdp": fsdp_offload_counts(model) if jc.training.enable_cpu_offload else None,
            "criterion": None if criterion is None else f"{type(criterion).__module__}.{type(criterion).__name__}"}


def _worker(rank: int, world: int, port: int, jobs_path: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        jobs = torch.load(jobs_path, weights_only=False)
        results = {}
        for job in jobs:
            try:
                results[job.key] = run_job(job)
            except Exception as e:  # report per job; the others still run
                import traceback

                results[job.key] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
            dist.barrier()
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def run_jobs(jobs: list[Job], world: int, tmp_dir: str) -> dict[str, dict]:
    """Run ``jobs`` (all of world size ``world``) in one spawned gloo group; results by key."""
    jobs_path, out_path = os.path.join(tmp_dir, f"jobs{world}.pt"), os.path.join(tmp_dir, f"out{world}.pt")
    torch.save(jobs, jobs_path)
    mp.start_processes(_worker, args=(world, free_port(), jobs_path, out_path), nprocs=world, join=True,
                       start_method="spawn")
    return torch.load(out_path, weights_only=False)


def compare(ref: dict, got: dict, *, later_grad_tol: tuple[float, float] | None = None) -> dict:
    """Max differences between two runs; raises AssertionError beyond RTOL/ATOL.

    ``later_grad_tol``: (rtol, atol) for the gradients after the first optimizer step (losses and
    the first step's gradients, from identical weights, always use RTOL/ATOL)."""
    if "error" in got:
        raise AssertionError(got["error"])
    assert len(got["losses"]) == len(ref["losses"]) == len(got["grads"]) == len(ref["grads"]) == STEPS
    loss_diff = max(abs(a - b) for a, b in zip(ref["losses"], got["losses"]))
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=ATOL)
    worst, per_step, worst_rel = (0.0, ""), [0.0] * len(ref["grads"]), 0.0
    for step, (gref, ggot) in enumerate(zip(ref["grads"], got["grads"])):
        assert set(gref) == set(ggot), f"parameter sets differ: {set(gref) ^ set(ggot)}"
        rtol, atol = later_grad_tol if step > 0 and later_grad_tol else (RTOL, ATOL)
        for name, a in gref.items():
            b = ggot[name]
            assert (a is None) == (b is None), f"step {step} {name}: gradient missing in one run"
            if a is None:
                continue
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m: f"step {step} grad {name}: {m}")
            diff = (a - b).abs().max().item()
            per_step[step] = max(per_step[step], diff)
            worst_rel = max(worst_rel, diff / max(a.abs().max().item(), 1e-30))  # relative to the tensor's scale
            if diff > worst[0]:
                worst = (diff, f"step {step} {name}")
    return {"max_loss_diff": loss_diff, "max_grad_diff": worst[0], "worst": worst[1],
            "max_grad_diff_per_step": per_step, "max_grad_rel_diff": worst_rel}
