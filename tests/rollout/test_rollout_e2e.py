"""Rollout export end to end on CPU: ``train.py`` under torchrun (gloo) with the ``rollout`` hook,
exporting to reference receiver processes (``python -m recipe.rollout.engine.reference_receiver``) that hold a
different tensor-parallel layout than the trainer.

After every export, each receiver rank's parameters must equal the trainer's ``full_tensor()``
bit for bit (sliced the way vLLM shards them), and the receiver's logits on a fixed batch must
equal the trainer's. A receiver that dies or hangs mid-transfer must cost the trainer at most
the timeout, and the next export must reach a restarted receiver.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from recipe.net import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = os.path.join(ROOT, "configs", "tiny", "llama.json")
HERE = os.path.dirname(os.path.abspath(__file__))
HOOKS = "tests.rollout.probe_hooks:Gate,recipe.rollout.trainer.hook:RolloutHook,tests.rollout.probe_hooks:Probe"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}

pytestmark = pytest.mark.slow


class Run:
    """A trainer and its receivers in one temporary folder."""

    def __init__(self, tmp, port=None):
        self.tmp, self.port = str(tmp), port or free_port()
        self.procs: list[subprocess.Popen] = []
        self.trainer_out: list[str] = []

    def receivers(self, config, world, tag, *extra, dtype="float32", timeout_s=30):
        procs = []
        for r in range(world):
            module = "tests.rollout.faulty_receiver" if "--fail_version" in extra else \
                "recipe.rollout.engine.reference_receiver"
            cmd = [sys.executable, "-m", module, "--model_config", config,
                   "--port", str(self.port), "--rank", str(r), "--world_size", str(world), "--transport", "gloo",
                   "--dtype", dtype, "--timeout_s", str(timeout_s), "--dump_dir", self.tmp,
                   "--ready_file", os.path.join(self.tmp, f"ready_{tag}{r}"), *extra]
            log = open(os.path.join(self.tmp, f"receiver_{tag}{r}.log"), "w")
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT))
        self.procs += procs
        return procs

    def trainer(self, nproc, config, steps, interval, gates, *extra, timeout_s=30):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
               "--model.config", config, "--job.dump_folder", os.path.join(self.tmp, "out"),
               "--training.steps", str(steps), "--training.seq_len", "32", "--training.local_batch_size", "2",
               "--training.mixed_precision_param", "float32", "--optimizer.implementation", "foreach",
               "--lr_scheduler.warmup_steps", "0", "--metrics.log_freq", "1", "--hooks.post_step", HOOKS,
               "--rollout.enable", "--rollout.transport", "gloo", "--rollout.interval", str(interval),
               "--rollout.engine_port", str(self.port), "--rollout.dtype", "float32",
               "--rollout.bucket_mb", "0.25", "--rollout.timeout_s", str(timeout_s), *extra]
        env = {**ENV, "FLARE_PROBE_DIR": self.tmp, "FLARE_GATE_STEPS": ",".join(map(str, gates))}
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=lambda: self.trainer_out.extend(proc.stdout), daemon=True).start()
        self.procs.append(proc)
        return proc

    def wait_for(self, *names, timeout=180):
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(os.path.join(self.tmp, n)) for n in names):
            dead = [p for p in self.procs if p.poll() not in (None, 0, 3, -signal.SIGKILL)]
            if dead or time.monotonic() > deadline:
                raise AssertionError(f"waiting for {names}: {self.logs()}")
            time.sleep(0.1)

    def open_gate(self, step):
        open(os.path.join(self.tmp, f"gate{step}"), "w").close()

    def finish(self, trainer, timeout=240):
        try:
            rc = trainer.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        for p in self.procs:
            if p is not trainer:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    pass
        assert rc == 0, f"trainer exit {rc}: {self.logs()}"

    def logs(self) -> str:
        out = "".join(self.trainer_out)[-6000:]
        for name in sorted(os.listdir(self.tmp)):
            if name.endswith(".log"):
                with open(os.path.join(self.tmp, name)) as f:
                    out += f"\n--- {name}\n" + f.read()[-3000:]
        return out

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path)
    yield r
    r.cleanup()


def expected_shard(full: dict, name: str, rank: int, tp: int) -> torch.Tensor:
    """vLLM's TP layout of one engine parameter, from the trainer's full HF weights (equal head
    counts on every rank in these configs, so plain chunks are the right slices)."""
    chunk = lambda key, dim=0: full[key].chunk(tp, dim=dim)[rank]  # noqa: E731
    if ".qkv_proj." in name:
        return torch.cat([chunk(name.replace("qkv_proj", f"{p}_proj")) for p in "qkv"])
    if ".gate_up_proj." in name:
        return torch.cat([chunk(name.replace("gate_up_proj", p)) for p in ("gate_proj", "up_proj")])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return chunk(name, dim=1)
    if name.endswith("embed_tokens.weight") or name.startswith("lm_head."):
        return chunk(name)
    return full[name]


def check_version(run, version, world, tp, exact_logits):
    trainer = torch.load(os.path.join(run.tmp, f"trainer_step{version}.pt"))
    for r in range(world):
        dump = torch.load(os.path.join(run.tmp, f"v{version}.rank{r}.pt"))
        assert dump["version"] == version
        for name, got in dump["params"].items():
            want = expected_shard(trainer["params"], name, r, tp)
            assert got.dtype == want.dtype and torch.equal(got, want), f"v{version} rank {r} {name}"
        if r == 0:
            logits = dump["logits"].float()
            if exact_logits:
                assert torch.equal(logits, trainer["logits"])
            else:  # the trainer's or the engine's TP sharding reorders sums
                torch.testing.assert_close(logits, trainer["logits"], rtol=1e-5, atol=1e-5)
    return trainer


@pytest.mark.parametrize("placement", ["disaggregated", "colocated"])
def test_fsdp2_trainer_to_a_tp2_engine(run, placement):
    """colocated: the trainer ranks meet on a gloo group before each bucket (RolloutHook._lockstep)."""
    receivers = run.receivers(LLAMA, 2, "a")
    trainer = run.trainer(2, LLAMA, 4, 2, [2], "--rollout.engine_world_size", "2", "--rollout.engine_tp_size", "2",
                          "--rollout.placement", placement)
    run.wait_for("ready_a0", "ready_a1")
    run.open_gate(2)
    run.finish(trainer)
    assert all(p.returncode == 0 for p in receivers), run.logs()  # exited on the trainer's close
    before = check_version(run, 2, 2, 2, exact_logits=False)
    after = check_version(run, 4, 2, 2, exact_logits=False)
    assert not torch.equal(before["params"]["lm_head.weight"], after["params"]["lm_head.weight"])  # it trained
    out = "".join(run.trainer_out)
    assert "rollout: exported version 2" in out and "rollout: exported version 4" in out
    assert ("buckets in lockstep" in out) == (placement == "colocated")


def test_fsdp2_x_tp2_trainer_to_a_tp1_engine(run):
    run.receivers(LLAMA, 1, "a")
    trainer = run.trainer(4, LLAMA, 2, 2, [2], "--parallelism.tensor_parallel_degree", "2",
                          "--parallelism.data_parallel_shard_degree", "2")
    run.wait_for("ready_a0")
    run.open_gate(2)
    run.finish(trainer)
    check_version(run, 2, 1, 1, exact_logits=False)


def test_fla_gated_deltanet_fp32_decay_params_and_logits(run):
    with open(os.path.join(ROOT, "configs", "tiny", "gated_deltanet.json")) as f:
        values = json.load(f)
    values.update(hidden_size=64, intermediate_size=128)  # Triton's CPU interpreter is slow
    config = os.path.join(run.tmp, "gdn.json")
    with open(config, "w") as f:
        json.dump(values, f)
    run.receivers(config, 1, "a")
    trainer = run.trainer(1, config, 1, 1, [1])
    run.wait_for("ready_a0")
    run.open_gate(1)
    run.finish(trainer)
    check_version(run, 1, 1, 1, exact_logits=True)


def test_olmo_hybrid_tp2_trainer_to_an_engine_under_vllms_names(run):
    """OLMo-Hybrid trained under TP=2 (both mixer plans) into transformers' model in the engine:
    every weight arrives bit for bit under the names vLLM loads, and the logits agree."""
    config = os.path.join(ROOT, "configs", "tiny", "olmo_hybrid.json")
    run.receivers(config, 1, "a")
    trainer = run.trainer(2, config, 1, 1, [1], "--parallelism.tensor_parallel_degree", "2")
    run.wait_for("ready_a0")
    run.open_gate(1)
    run.finish(trainer)
    check_version(run, 1, 1, 1, exact_logits=False)
    with open(os.path.join(HERE, "vllm_olmo_hybrid_names.json")) as f:
        served = json.load(f)["checkpoint_names"]
    assert sorted(torch.load(os.path.join(run.tmp, "v1.rank0.pt"))["params"]) == sorted(served)


def test_a_receiver_that_dies_or_hangs_costs_at_most_the_timeout(run):
    timeout_s = 5
    # A dies (process exit) in bucket 1 of version 2; B hangs (SIGSTOP) in bucket 1 of version 4;
    # C is healthy. Gates hold the trainer before each export until its receiver is ready.
    run.receivers(LLAMA, 1, "a", "--fail_version", "2", "--fail_mode", "exit")
    trainer = run.trainer(2, LLAMA, 6, 2, [2, 4, 6], timeout_s=timeout_s)
    run.wait_for("ready_a0")
    run.open_gate(2)
    run.wait_for("done2")
    (b,) = run.receivers(LLAMA, 1, "b", "--fail_version", "4", "--fail_mode", "hang")
    run.wait_for("ready_b0")
    run.open_gate(4)
    run.wait_for("done4")
    b.kill()  # a stopped process keeps the port until it is gone
    b.wait()
    run.receivers(LLAMA, 1, "c")
    run.wait_for("ready_c0")
    run.open_gate(6)
    run.finish(trainer)
    out = "".join(run.trainer_out)
    failed = {int(v): float(s) for v, s in re.findall(r"export of version (\d+) failed after ([\d.]+)s", out)}
    assert set(failed) == {2, 4}, "\n".join(line for line in run.trainer_out if "rollout" in line)
    print(f"failed exports (version: seconds): {failed}")
    assert failed[2] < timeout_s  # a closed connection is noticed at once
    assert failed[4] < timeout_s + 3  # a silent receiver: the group timeout
    assert "rollout: exported version 6" in out
    assert "trainer closed the connection" in open(os.path.join(run.tmp, "receiver_c0.log")).read()
    check_version(run, 6, 1, 1, exact_logits=True)
    assert not os.path.exists(os.path.join(run.tmp, "v2.rank0.pt")) and not os.path.exists(
        os.path.join(run.tmp, "v4.rank0.pt"))
