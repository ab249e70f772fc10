"""Every parallel layout trains like one process: same per-step loss, same full gradients.

CPU, gloo, fp32, AdamW, 3 optimizer steps from the same initial weights, each data-parallel rank
fed its rows of the same global batch (see parallel_harness.py). Layouts of one world size run
in one spawned process group (module-scoped fixtures); each (model, layout) is its own test.
Tolerance: rtol 1e-4 / atol 1e-5 (parallel_harness.RTOL/ATOL); measured maxima are ~1e-6. fla's
own linear cross entropy under TP compares the gradients after the first step with atol 1e-4
(see FLA_LINEAR_CE_LATER_GRAD_TOL). fla's transformer runs its attention with an exact SDPA
stand-in for flash-attn (CUDA-only): tests/sdpa_flash_attn.py, installed by the harness.
"""

import pytest

import parallel_harness as H

pytestmark = pytest.mark.slow

RUNNABLE = ["gla", "gated_deltanet", "delta_net", "retnet", "hgrn2", "mamba2", "llama", "olmo_hybrid"]
# fla families with tensor parallelism refused (parallelisms/tp_plans/refused.py): data parallel only.
# samba's sliding-window attention layers run with the SDPA stand-in's exact window mask.
DATA_PARALLEL_ONLY = ["gsa", "mamba", "samba"]


def _ac(mode, option="2"):
    return ("--activation_checkpoint.mode", mode, "--activation_checkpoint.selective_ac_option", option)


LAYOUTS = {
    "tp2": H.Layout("tp2", tp=2),
    "tp2_no_loss_parallel": H.Layout("tp2_no_loss_parallel", tp=2, args=("--parallelism.disable_loss_parallel",)),
    "tp2_ac_op": H.Layout("tp2_ac_op", tp=2, args=_ac("selective", "op")),
    "tp2_compile": H.Layout("tp2_compile", tp=2, args=("--compile.enable", "--compile.backend", "inductor")),
    "fsdp2": H.Layout("fsdp2", dp_shard=2),
    "fsdp2_compile": H.Layout("fsdp2_compile", dp_shard=2, args=("--compile.enable", "--compile.backend", "inductor")),
    "fsdp2_ac_full": H.Layout("fsdp2_ac_full", dp_shard=2, args=_ac("full")),
    "fsdp2_reshard_never": H.Layout("fsdp2_reshard_never", dp_shard=2,
                                    args=("--parallelism.fsdp_reshard_after_forward", "never")),
    "ddp2": H.Layout("ddp2", dp_replicate=2),
    "ddp2_ac_every2": H.Layout("ddp2_ac_every2", dp_replicate=2, args=_ac("selective", "2")),
    "fsdp2_tp2": H.Layout("fsdp2_tp2", dp_shard=2, tp=2),
    "hsdp2x2": H.Layout("hsdp2x2", dp_replicate=2, dp_shard=2),
    "fsdp2_cpu_offload": H.Layout("fsdp2_cpu_offload", dp_shard=2, args=("--training.enable_cpu_offload",)),
}

# name: (config file, model_config overrides, setup function in parallel_harness)
MODELS = {family: (family, {}, "") for family in [*RUNNABLE, *DATA_PARALLEL_ONLY]}
MODELS["gla"] = ("gla", {"use_short_conv": True}, "")  # cover GLA's short convolutions too
MODELS["llama_tied"] = ("llama", {"tie_word_embeddings": True}, "")
MODELS["qwen3"] = ("llama", {"model_type": "qwen3"}, "")  # per-head q/k norms
MODELS["gla_linear_ce"] = ("gla", {"fuse_linear_cross_entropy": True}, "linear_ce_standin")
# fla's own FusedLinearCrossEntropyLoss (Triton kernels, interpreted on CPU), in the reference too
MODELS["gla_fla_linear_ce"] = ("gla", {"fuse_linear_cross_entropy": True}, "")
# fla's softmax attention with GQA (2 kv heads for 4 query heads: one kv head per TP rank serving
# two query heads) and per-head q/k norms; flash-attn is CUDA-only, so the reference and every
# rank run it with the exact SDPA stand-in of tests/sdpa_flash_attn.py (H.softmax_attention).
MODELS["transformer"] = ("transformer", {"num_heads": 4, "num_kv_heads": 2, "qk_norm": True}, "")

DENSE = ["fsdp2", "fsdp2_ac_full", "tp2_ac_op", "ddp2", "ddp2_ac_every2"]
JOBS2 = (
    [(m, "tp2") for m in RUNNABLE]
    + [(m, layout) for m in ("gla", "llama") for layout in DENSE]
    + [("llama", "tp2_no_loss_parallel"), ("llama", "fsdp2_reshard_never"), ("llama", "tp2_compile")]
    + [("gla", "tp2_compile"), ("gla", "fsdp2_compile")]  # compiled glue around fla's kernels
    + [("llama_tied", "tp2"), ("llama_tied", "fsdp2"), ("qwen3", "tp2"), ("gla_linear_ce", "tp2")]
    + [("transformer", "tp2")]
    # every other plan with activation checkpointing under DDP: AC wraps each family's blocks
    + [(m, "ddp2_ac_every2") for m in ("gated_deltanet", "delta_net", "retnet", "hgrn2", "mamba2", "transformer",
                                       "olmo_hybrid")]
    + [(m, "fsdp2") for m in DATA_PARALLEL_ONLY]
)
# Every TP plan also under FSDP: 2-D (dp_shard x tp) DTensors on every sharded parameter.
JOBS4 = ([(m, "fsdp2_tp2") for m in [*RUNNABLE, "transformer"]]
         + [(m, "hsdp2x2") for m in [*RUNNABLE, "transformer"]])


def _run_group(jobs, world, batch, seq, tmp_dir):
    models = sorted({m for m, _ in jobs})
    refs, to_run = {}, []
    for m in models:
        file, overrides, setup = MODELS[m]
        cfg = H.model_config(file, **overrides)
        batches = H.make_batches(cfg.vocab_size, batch, seq)
        refs[m] = H.reference(cfg, batches, setup=setup)
        to_run += [
            H.Job(key=f"{m}/{layout}", family=file, cfg=cfg, layout=LAYOUTS[layout], init=refs[m]["init"],
                  batches=batches, setup=setup)
            for mm, layout in jobs if mm == m
        ]
    return refs, H.run_jobs(to_run, world, str(tmp_dir))


def _selected(request, *test_names):
    """(model, layout) of the collected tests of ``test_names``: ``-k`` runs only what it selects."""
    return sorted({(i.callspec.params["model"], i.callspec.params["layout"]) for i in request.session.items
                   if getattr(i, "originalname", None) in test_names})


@pytest.fixture(scope="module")
def two_ranks(request, tmp_path_factory):
    jobs = _selected(request, "test_two_ranks", "test_fsdp_cpu_offload", "test_fla_linear_cross_entropy_tp")
    return _run_group(jobs, 2, batch=2, seq=32, tmp_dir=tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def four_ranks(request, tmp_path_factory):
    jobs = _selected(request, "test_four_ranks")
    return _run_group(jobs, 4, batch=4, seq=16, tmp_dir=tmp_path_factory.mktemp("four_ranks"))


def _check(group, model, layout, record_property, **tolerances):
    refs, results = group
    stats = H.compare(refs[model], results[f"{model}/{layout}"], **tolerances)
    stats["seconds"] = round(results[f"{model}/{layout}"]["seconds"], 1)
    record_property("parity", stats)
    print(f"{model}/{layout}: {stats}")
    return results[f"{model}/{layout}"]


# Losses and the first step's gradients (identical weights) are held to the suite's bounds. After
# AdamW's first update (about lr*sign(grad), which turns summation-order noise into weight
# differences of lr) a few gradient elements drift past atol 1e-5: RetNet FSDP2xTP2, one v_proj
# element of 8192 by 1.5e-5; on an AMD EPYC (AVX2) host, HGRN2 TP2 and the fla transformer FSDP2xTP2,
# 1-2 embedding elements of 32768 at step 2 by 1.7-1.9e-5, where other hosts passed. A wrong shard
# or reduction shows at the size of the gradients themselves (max 0.05-0.16 for those embeddings).
LATER_GRAD_TOL = (H.RTOL, 5e-5)
# Mamba2 starts with many gradients near zero (A_log and dt_bias 1e-10..1e-8, 2.5k of the 19k
# in_proj elements below 1e-6: the SSM's share of the output is small at dt ~ 0.001..0.1), so
# AdamW's first update sets those weights by summation-order noise. Later gradients then differ by
# up to 1.9e-4 under TP=2 and 1.1e-4 under DDP=2, which only reorders the data-parallel sum, both
# on conv1d.bias (gradients up to 0.8), with the suite's data; 4.5e-5 at most with 4 other data seeds.
LATER_GRAD_TOL_BY_MODEL = {"mamba2": (H.RTOL, 5e-4)}


@pytest.mark.parametrize("model,layout", JOBS2, ids=[f"{m}-{lay}" for m, lay in JOBS2])
def test_two_ranks(two_ranks, model, layout, record_property):
    _check(two_ranks, model, layout, record_property,
           later_grad_tol=LATER_GRAD_TOL_BY_MODEL.get(model, LATER_GRAD_TOL))


@pytest.mark.parametrize("model,layout", JOBS4, ids=[f"{m}-{lay}" for m, lay in JOBS4])
def test_four_ranks(four_ranks, model, layout, record_property):
    _check(four_ranks, model, layout, record_property,
           later_grad_tol=LATER_GRAD_TOL_BY_MODEL.get(model, LATER_GRAD_TOL))


@pytest.mark.parametrize("model,layout", [("gla", "fsdp2_cpu_offload")])
def test_fsdp_cpu_offload(two_ranks, model, layout, record_property):
    """``training.enable_cpu_offload``: FSDP2's CPUOffloadPolicy reaches every parameter and the
    run trains like one process. On a CPU-only machine the mesh is already on CPU, so FSDP's
    offload code path runs (sharded parameters/gradients kept on CPU, host-to-device copies of the
    all-gather inputs, gradients copied to CPU after reduce-scatter) but every copy is CPU to CPU:
    actual transfers, pinned memory (needs an accelerator; off on CPU meshes) and the trainer's
    materialization on CPU instead of the GPU are only exercised on a GPU machine."""
    got = _check(two_ranks, model, layout, record_property)
    fsdp = got["fsdp"]
    n_params = len(two_ranks[0][model]["grads"][0])
    assert fsdp["params"] == n_params, fsdp  # every parameter is FSDP-managed ...
    assert fsdp["offload_to_cpu"] == n_params, f"CPUOffloadPolicy not applied: {fsdp}"  # ... and offloaded
    assert fsdp["pin_memory"] == 0, fsdp  # pin_memory() raises without an accelerator


# fla's linear cross entropy accumulates each chunk's logit gradients with addmm: fp32 sums in
# another order than torch's, on each rank's half of the tokens. From the same weights (the first
# step) gradients agree to ~4e-7. AdamW's first update is ~lr * sign(grad), so an element whose
# gradient is within that noise of zero moves by up to lr=3e-3 in one run and not in the other;
# later gradients then differ by up to 3.5e-5 in this test (4 data seeds; 2.3e-5 with the suite's seed, on
# one embedding element). Not specific to fla's kernel: with data seed 2 the plain GLA TP=2 run
# (torch's cross entropy) differs by 5.4e-5 after the first step too. Losses and the first step's
# gradients use the suite's tolerance, later gradients atol 1e-4: an error in how the loss or the
# lm_head gradient is combined across ranks is of the size of the gradients themselves (>1e-2).
FLA_LINEAR_CE_LATER_GRAD_TOL = (H.RTOL, 1e-4)


@pytest.mark.parametrize("model,layout", [("gla_fla_linear_ce", "tp2")])
def test_fla_linear_cross_entropy_tp(two_ranks, model, layout, record_property):
    """fla's real FusedLinearCrossEntropyLoss (Triton, interpreted on CPU) under TP=2, through
    ``SequenceParallelLinearLoss`` (fla's LinearLossParallel, made exact), vs one process using
    the same fla loss."""
    got = _check(two_ranks, model, layout, record_property, later_grad_tol=FLA_LINEAR_CE_LATER_GRAD_TOL)
    assert got["criterion"] == "fla.modules.fused_linear_cross_entropy.ops.FusedLinearCrossEntropyLoss", got[
        "criterion"]
