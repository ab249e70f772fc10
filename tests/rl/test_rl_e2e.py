"""Three GRPO steps end to end on CPU: ``train.py`` with ``rl.enable`` against flare's reference
engine sampling from its own forward (``--serve_rollouts``), in one process, FSDP=2 and TP=2.
The same initial weights, prompts and sampling seeds give the same completions, so every layout
must take the same losses (the parity tests' tolerance) and the engine must see every version."""

import json
import os
import subprocess
import sys

import pytest

from recipe.net import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = os.path.join(ROOT, "configs", "tiny", "llama.json")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
STEPS = 3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> str:
    """One set of initial weights for every layout (each would initialize its shards differently)."""
    import torch
    from transformers import AutoModelForCausalLM

    from recipe import hf_io
    from recipe.model import init_weights
    from recipe.tokenizer import byte_tokenizer

    folder = str(tmp_path_factory.mktemp("rl_initial"))
    tokenizer = byte_tokenizer()
    config = hf_io.load_config(LLAMA, "model.config", tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    init_weights(model)
    hf_io.write_hf(model.state_dict(), hf_io.model_spec(config), folder, tokenizer, torch.float32)
    return folder


def rl_run(tmp, initial: str, nproc: int, *layout) -> tuple[list[dict], str]:
    port = free_port()
    engine_log = os.path.join(tmp, "engine.log")
    engine = subprocess.Popen(
        [sys.executable, "-m", "recipe.rollout.engine.reference_receiver", "--model_config", LLAMA, "--port", str(port),
         "--world_size", "1", "--transport", "gloo", "--dtype", "float32", "--timeout_s", "120", "--serve_rollouts"],
        cwd=ROOT, env=ENV, stdout=open(engine_log, "w"), stderr=subprocess.STDOUT)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "train.py", "--model.config", LLAMA, "--job.dump_folder", os.path.join(tmp, "out"),
           "--training.steps", str(STEPS), "--training.mixed_precision_param", "float32",
           "--optimizer.implementation", "foreach", "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "0",
           "--metrics.log_freq", "1", "--hooks.post_step", "rollout", "--rollout.enable", "--rollout.transport",
           "gloo", "--rollout.engine_port", str(port), "--rollout.dtype", "float32", "--rollout.on_failure", "raise",
           "--rl.enable", "--rl.prompts_per_step", "4", "--rl.group_size", "4", "--rl.max_new_tokens", "6",
           "--rl.reward", "tests.rl.rewards:byte_parity", "--model.init_from_hf", initial, *layout]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert engine.wait(timeout=60) == 0  # the engine's loop ended with training
    finally:
        if engine.poll() is None:
            engine.kill()
    with open(os.path.join(tmp, "out", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(engine_log) as f:
        return rows, f.read()


@pytest.fixture(scope="module")
def single(tmp_path_factory, initial):
    return rl_run(str(tmp_path_factory.mktemp("rl_single")), initial, 1)


def test_one_process_learns_from_the_engines_samples(single):
    rows, engine_log = single
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(f"applied version {v}" in engine_log for v in range(STEPS + 1))  # the initial weights too
    assert all(r["grad_norm"] > 0 for r in rows)  # a reward a random model hits half the time: advantages
    for r in rows:
        assert 0 <= r["reward_mean"] <= 1 and r["advantage_std"] > 0
        # the trainer's log-probabilities of the sampled tokens vs the engine's (fp32 on both sides)
        assert r["logprob_gap_max"] < 1e-3 and r["clip_fraction"] == 0


@pytest.mark.parametrize("layout", [["--parallelism.data_parallel_shard_degree", "2"],
                                    ["--parallelism.tensor_parallel_degree", "2"]], ids=["fsdp2", "tp2"])
def test_every_layout_takes_the_same_rl_steps(single, initial, tmp_path, layout):
    rows, _ = rl_run(str(tmp_path), initial, 2, *layout)
    ref = single[0]
    for r, s in zip(rows, ref):
        assert r["reward_mean"] == s["reward_mean"]  # the same completions came back
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-6)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4, abs=1e-6)



@pytest.fixture(scope="module")
def kl_single(tmp_path_factory, initial):
    return rl_run(str(tmp_path_factory.mktemp("rl_kl")), initial, 1, "--rl.kl_coef", "0.5")[0]


def test_a_kl_penalty_to_the_starting_weights(single, kl_single):
    """The reference model holds the starting weights: the KL is 0 at step 1 (and adds no gradient),
    positive once the policy has moved."""
    assert kl_single[0]["kl"] == pytest.approx(0, abs=1e-7) and all(r["kl"] > 0 for r in kl_single[1:])
    assert kl_single[0]["grad_norm"] == pytest.approx(single[0][0]["grad_norm"], rel=1e-4)


def test_the_kl_reference_is_parallelized_like_the_model(kl_single, initial, tmp_path):
    rows, _ = rl_run(str(tmp_path), initial, 2, "--rl.kl_coef", "0.5", "--parallelism.tensor_parallel_degree", "2")
    for r, s in zip(rows, kl_single):
        assert r["kl"] == pytest.approx(s["kl"], rel=1e-3, abs=1e-8)
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-6)
        assert r["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4, abs=1e-6)
