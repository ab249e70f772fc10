"""The training loop in one process: accumulation, clipping, NaN/Inf skipping, hooks, precision.

The tiny HF Llama config keeps these fast (no Triton interpreter); the loop is model-agnostic.
The fla default path is covered end to end by tests/test_train_e2e.py.
"""

import pytest
import torch
import torch.distributed as dist

from recipe.config import parse_job_config
from recipe.trainer import Trainer, TooManySkippedSteps

LLAMA = "configs/tiny/llama.json"


pytestmark = pytest.mark.usefixtures("single_process_group")


def make_trainer(tmp_path, *extra):
    args = ["--model.config", LLAMA, "--job.dump_folder", str(tmp_path), "--training.seq_len", "32",
            "--training.local_batch_size", "4", "--training.steps", "4", "--training.mixed_precision_param",
            "float32", "--optimizer.implementation", "foreach", "--debug.seed", "0",
            "--lr_scheduler.warmup_steps", "0", "--metrics.log_freq", "1", *extra]
    trainer = Trainer(parse_job_config(args))
    trainer.checkpointer.load()
    return trainer


def micro_batches(trainer, n_steps=1):
    batches = iter(trainer.dataloader)
    return [trainer._next_micro_batches(batches) for _ in range(n_steps)]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulation_matches_one_big_batch(tmp_path):
    big = make_trainer(tmp_path / "a")
    (batch,) = micro_batches(big)
    big.step = 1
    big_record = big.train_step(batch)
    big_grads = grads(big.model)
    big.close()
    dist.destroy_process_group()

    small = make_trainer(tmp_path / "b", "--training.local_batch_size", "2",
                         "--training.gradient_accumulation_steps", "2")
    (mbs,) = micro_batches(small)
    assert torch.equal(torch.cat([x["input"] for x, _ in mbs]), batch[0][0]["input"])  # same tokens
    small.step = 1
    small_record = small.train_step(mbs)
    small_grads = grads(small.model)
    small.close()
    assert small_record["loss"] == pytest.approx(big_record["loss"], rel=1e-5)
    assert small_record["grad_norm"] == pytest.approx(big_record["grad_norm"], rel=1e-4)
    for name, g in big_grads.items():
        torch.testing.assert_close(small_grads[name], g, rtol=1e-4, atol=1e-6)


def test_gradients_are_clipped_to_max_norm(tmp_path):
    trainer = make_trainer(tmp_path, "--training.max_norm", "0.01", "--optimizer.lr", "0")
    (batch,) = micro_batches(trainer)
    trainer.step = 1
    record = trainer.train_step(batch)
    total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads(trainer.model).values()]))
    assert record["grad_norm"] > 0.1  # the logged norm is the pre-clip norm
    assert total.item() == pytest.approx(0.01, rel=1e-4)
    trainer.close()


def poison_loss(trainer, steps_to_poison):
    """Make the loss NaN on the given steps (the forward stays real)."""
    forward = trainer.model.forward

    def forward_with_nan(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step in steps_to_poison:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = forward_with_nan


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_nan_steps_are_skipped_and_counted(tmp_path, implementation):
    # fused: the optimizer kernel skips on a device flag (no host sync); foreach: decided on the host.
    trainer = make_trainer(tmp_path, "--optimizer.implementation", implementation)
    assert trainer.skip_on_device == (implementation == "fused")
    poison_loss(trainer, {2})
    batches = micro_batches(trainer, 3)
    before = None
    for step, batch in enumerate(batches, start=1):
        if step == 2:
            before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.step = step
        record = trainer.train_step(batch)
        if step == 2:
            assert bool(record["found_inf"]) and trainer.skipped_steps == 1
            for n, p in trainer.model.named_parameters():
                assert torch.equal(p, before[n]), f"{n} changed on a skipped step"
            state = trainer.optimizers.optimizers[0].state
            assert all(int(s["step"]) == 1 for s in state.values())  # the skipped step is not counted
    assert not bool(record["found_inf"]) and trainer.consecutive_skips == 0 and trainer.skipped_steps == 1
    assert all(int(s["step"]) == 2 for s in trainer.optimizers.optimizers[0].state.values())
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    trainer.close()


def test_too_many_consecutive_skips_stop_with_a_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, "--training.max_consecutive_skips", "2", "--checkpoint.enable")
    poison_loss(trainer, {2, 3, 4})
    with pytest.raises(TooManySkippedSteps, match="training.max_consecutive_skips=2.*step-3"):
        trainer.train()
    trainer.close()
    assert (tmp_path / "checkpoint" / "step-3" / ".metadata").exists()


def test_skip_limit_is_checked_on_log_steps(tmp_path):
    # Skips are counted where the loop syncs anyway (log steps): with log_freq 3 the two skips at
    # steps 2-3 are found at step 3; a good step in between resets the count.
    trainer = make_trainer(tmp_path, "--training.max_consecutive_skips", "2", "--metrics.log_freq", "3",
                           "--training.steps", "6", "--optimizer.implementation", "fused")
    poison_loss(trainer, {2, 3})
    with pytest.raises(TooManySkippedSteps, match="up to step 3"):
        trainer.train()
    trainer.close()
    trainer = make_trainer(tmp_path / "b", "--training.max_consecutive_skips", "2", "--metrics.log_freq", "3",
                           "--training.steps", "6", "--optimizer.implementation", "fused")
    poison_loss(trainer, {2, 4, 6})
    trainer.train()
    assert trainer.skipped_steps == 3 and trainer.consecutive_skips == 1
    trainer.close()


CALLS = []


def record_step(state):
    CALLS.append((state.step, state.skipped, type(state.model).__name__, state.parallel_dims.world_size))


class CountingHook:
    def __init__(self, job_config):
        self.every = job_config.training.steps
        self.seen, self.closed = 0, False

    def __call__(self, state):
        self.seen += 1

    def close(self):
        self.closed = True


def test_post_step_hooks_by_dotted_path(tmp_path):
    CALLS.clear()
    trainer = make_trainer(tmp_path, "--hooks.post_step", "test_trainer:record_step,test_trainer.CountingHook")
    trainer.train()
    counting = trainer.hooks[1]
    trainer.close()
    assert [c[0] for c in CALLS] == [1, 2, 3, 4]
    assert CALLS[0][1:] == (False, "LlamaForCausalLM", 1)
    assert counting.seen == 4 and counting.closed and counting.every == 4


def test_bad_hook_path_is_a_config_error(tmp_path):
    from recipe.errors import ConfigError

    with pytest.raises(ConfigError, match="hooks.post_step: cannot load 'no_such_module:Hook'"):
        make_trainer(tmp_path, "--hooks.post_step", "no_such_module:Hook")


def lm_head_dtypes(trainer):
    """(weight dtype during the forward, output dtype) of lm_head for one training step."""
    seen = []
    trainer.model.lm_head.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, o.dtype)))
    (batch,) = micro_batches(trainer)
    trainer.step = 1
    trainer.train_step(batch)
    return seen


def test_single_device_fsdp_computes_in_bf16_with_fp32_masters(tmp_path):
    # One device, bf16, the default (parallelism.single_device_fsdp): FSDP2 over a one-rank mesh
    # computes with bf16 weights cast once per step and keeps fp32 masters (lighter than autocast).
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    trainer = make_trainer(tmp_path, "--training.mixed_precision_param", "bfloat16")
    assert isinstance(trainer.model, FSDPModule)
    # one unit: per-block units only add host work per step where there is nothing to shard
    assert [m for m in trainer.model.modules() if isinstance(m, FSDPModule)] == [trainer.model]
    assert lm_head_dtypes(trainer) == [(torch.bfloat16, torch.bfloat16)]
    params = list(trainer.model.parameters())
    trainer.close()
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in params)  # fp32 master weights


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_single_device_fsdp_clips_and_steps_on_local_tensors_with_the_same_result(tmp_path, implementation):
    # Clip and optimizer step on the DTensors' local tensors (parallelisms/local_shards.py): the
    # same kernels on the same values, so the same norms, weights and optimizer state bit for bit,
    # and the optimizer keeps DTensor parameters and state (what checkpoints save).
    from torch.distributed.tensor import DTensor

    def full(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    runs = {}
    for local in (True, False):
        trainer = make_trainer(tmp_path / str(local), "--training.mixed_precision_param", "bfloat16",
                               "--optimizer.implementation", implementation, "--training.max_norm", "0.05")
        assert trainer.local_shards is not None and trainer.local_shards.group is None  # the one-device default
        if not local:
            trainer.local_shards = None  # the DTensor path
        norms = []
        for step, batch in enumerate(micro_batches(trainer, 3), start=1):
            trainer.step = step
            norms.append(trainer.train_step(batch)["grad_norm"])
        (optimizer,) = trainer.optimizers
        assert all(isinstance(p, DTensor) and p.grad is not None for g in optimizer.param_groups for p in g["params"])
        assert all(isinstance(v, DTensor) for st in optimizer.state.values() for k, v in st.items() if k != "step")
        runs[local] = (norms, {n: full(p) for n, p in trainer.model.named_parameters()},
                       [full(v) for st in optimizer.state.values() for v in st.values()])
        trainer.close()
    (norms, weights, state), (ref_norms, ref_weights, ref_state) = runs[True], runs[False]
    assert norms == ref_norms and min(norms) > 0.05  # clipping was active on every step
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[n], ref_weights[n]) for n in weights)
    assert len(state) == len(ref_state) and all(torch.equal(a, b) for a, b in zip(state, ref_state))


def test_stepping_on_local_shards_leaves_a_first_step_alone_and_restores_on_error():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parallelisms.local_shards import LocalShards

    model = torch.nn.Linear(4, 4)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    shards = LocalShards.of(model.parameters())
    assert shards is not None
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    params = optimizer.param_groups[0]["params"]
    with shards.stepping([optimizer]):  # no state yet: the normal path makes it
        assert optimizer.param_groups[0]["params"] is params
        optimizer.step()
    state = optimizer.state
    with pytest.raises(RuntimeError, match="boom"):
        with shards.stepping([optimizer]):
            assert optimizer.param_groups[0]["params"] is not params and optimizer.state is not state
            raise RuntimeError("boom")
    assert optimizer.param_groups[0]["params"] is params and optimizer.state is state
    assert all(p._local_tensor.grad is None and p.grad is not None for p in params)


def test_mixed_precision_without_fsdp_uses_autocast(tmp_path):
    # flame #29: single-device/DDP runs silently trained in fp32. Without FSDP (one device with
    # parallelism.single_device_fsdp false) the forward runs under autocast: fp32 weights, bf16 matmuls.
    trainer = make_trainer(tmp_path, "--training.mixed_precision_param", "bfloat16",
                           "--parallelism.single_device_fsdp", "false")
    assert lm_head_dtypes(trainer) == [(torch.float32, torch.bfloat16)]
    trainer.close()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_nan_skip_on_device_with_fsdp(tmp_path):
    # The fused optimizer's found_inf flag on DTensor parameters (single-device FSDP).
    trainer = make_trainer(tmp_path, "--training.mixed_precision_param", "bfloat16",
                           "--optimizer.implementation", "fused", "--parallelism.single_device_fsdp")
    assert trainer.skip_on_device
    poison_loss(trainer, {2})
    batches = micro_batches(trainer, 3)
    for step, batch in enumerate(batches, start=1):
        if step == 2:
            before = {n: p.detach().full_tensor().clone() for n, p in trainer.model.named_parameters()}
        trainer.step = step
        trainer.train_step(batch)
        if step == 2:
            for n, p in trainer.model.named_parameters():
                assert torch.equal(p.full_tensor(), before[n]), f"{n} changed on a skipped step"
    assert trainer.skipped_steps == 1
    assert any(not torch.equal(p.full_tensor(), before[n]) for n, p in trainer.model.named_parameters())
    trainer.close()


def test_steps_between_log_steps_read_nothing_back_to_the_host(tmp_path, monkeypatch):
    # No .item()/.tolist() on a step that does not log: on a GPU each one waits for the device and
    # stops the host from queuing the next step ahead of it (torchtitan's dist_sum is one).
    trainer = make_trainer(tmp_path, "--training.mixed_precision_param", "bfloat16",
                           "--optimizer.implementation", "fused", "--metrics.log_freq", "100")
    batches = micro_batches(trainer, 3)
    trainer.step = 1
    trainer.train_step(batches[0])  # step 1 logs
    reads = []
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name: reads.append(_n) or _o(t, *a))
    for step, batch in ((2, batches[1]), (3, batches[2])):
        trainer.step = step
        trainer.train_step(batch)
    assert reads == []
    trainer.close()


def test_varlen_needs_an_fla_model(tmp_path):
    from recipe.errors import ConfigError

    with pytest.raises(ConfigError, match="training.varlen: model_type 'llama' is not an fla model"):
        make_trainer(tmp_path, "--training.varlen")
    assert not dist.is_initialized()  # refused before any process group


@pytest.mark.parametrize("n_groups,varlen,message", [
    (1, True, "training.varlen: fla's mamba2 layer ignores cu_seqlens"),
    (2, False, "model.config: n_groups=2"),
])  # why: tests/test_mamba2.py
def test_mamba2_refusals_come_before_any_process_group(tmp_path, n_groups, varlen, message):
    import json

    from recipe.errors import ConfigError

    config = json.load(open("configs/tiny/mamba2.json"))
    config["n_groups"] = n_groups
    (tmp_path / "mamba2.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        make_trainer(tmp_path, "--model.config", str(tmp_path / "mamba2.json"), *(["--training.varlen"] * varlen))
    assert not dist.is_initialized()


@pytest.mark.parametrize("wrapper", [["--activation_checkpoint.mode", "full"], ["--compile.enable"]])
def test_init_from_hf_through_wrapped_blocks(tmp_path, wrapper):
    # AC and compile wrap the blocks (`_checkpoint_wrapped_module.`, `_orig_mod.`): HF names must still match.
    from transformers import AutoModelForCausalLM

    from recipe.model import load_model_config

    hf = AutoModelForCausalLM.from_config(load_model_config(LLAMA))
    hf.save_pretrained(tmp_path / "hf")
    trainer = make_trainer(tmp_path / "run", "--model.init_from_hf", str(tmp_path / "hf"), *wrapper)
    from recipe.model import load_hf_weights

    load_hf_weights(trainer.model, str(tmp_path / "hf"))
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    loaded = get_model_state_dict(trainer.model)
    for name, tensor in hf.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    trainer.close()


def test_custom_model_family_by_dotted_path(tmp_path):
    import json

    config = json.load(open(LLAMA))
    config["model_type"] = "my_llama"
    path = tmp_path / "my_llama.json"
    path.write_text(json.dumps(config))
    trainer = make_trainer(tmp_path / "run", "--model.config", str(path),
                           "--experimental.custom_import", "tests.custom_family")
    assert type(trainer.model).__name__ == "MyLlamaForCausalLM"
    trainer.close()


def test_bad_custom_import_is_one_line(tmp_path):
    from recipe.errors import UserError

    with pytest.raises(UserError, match="experimental.custom_import: cannot import 'no_such_pkg'"):
        make_trainer(tmp_path, "--experimental.custom_import", "no_such_pkg")


def test_float8_converter_swaps_linears(tmp_path):
    # torchtitan's name is quantize.linear.float8; emulation runs the float8 casts on CPU.
    from torchao.float8.float8_linear import Float8Linear

    trainer = make_trainer(tmp_path, "--model.converters", "quantize.linear.float8",
                           "--quantize.linear.float8.emulate")
    swapped = [n for n, m in trainer.model.named_modules() if isinstance(m, Float8Linear)]
    assert "model.layers.0.self_attn.q_proj" in swapped and "model.layers.0.mlp.down_proj" in swapped
    (batch,) = micro_batches(trainer)
    trainer.step = 1
    assert torch.isfinite(torch.tensor(trainer.train_step(batch)["loss"]))
    trainer.close()


def test_unknown_converter_is_one_line(tmp_path):
    from recipe.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown converter 'float8'; did you mean 'quantize.linear.float8'"):
        make_trainer(tmp_path, "--model.converters", "float8")


def test_an_fla_model_on_cpu_trains_in_float32_whatever_the_precision_asked(tmp_path, caplog):
    """Triton's interpreter (fla's kernels on CPU) computes bfloat16 wrongly: GLA's chunk forward is
    off by ~1e10 against float32. An HF model (no Triton) keeps the precision asked."""
    import logging

    from fla.ops.gla import chunk_gla

    q, k, v = (torch.randn(1, 64, 2, 16) for _ in range(3))
    g = -torch.rand(1, 64, 2, 16)
    wrong = (chunk_gla(q.bfloat16(), k.bfloat16(), v.bfloat16(), g=g)[0].float() - chunk_gla(q, k, v, g=g)[0]).abs()
    assert wrong.max() > 1.0  # the interpreter's error this guards against, still there

    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tmp_path / "gla", "--model.config", "configs/tiny/gla.json",
                               "--training.mixed_precision_param", "bfloat16")
    assert trainer.job_config.training.mixed_precision_param == "float32"
    assert lm_head_dtypes(trainer) == [(torch.float32, torch.float32)]
    assert "trains in float32" in caplog.text
    trainer.close()
    trainer = make_trainer(tmp_path / "llama", "--training.mixed_precision_param", "bfloat16")
    assert trainer.job_config.training.mixed_precision_param == "bfloat16"
    trainer.close()


def test_cuda_allocation_retries_are_counted_per_log_window_and_warned(tmp_path, monkeypatch, caplog):
    # A retry of the CUDA caching allocator frees its cache and synchronizes the device: a stall
    # a user should see in the log and in metrics.jsonl. The counter is cumulative; each log
    # reports the retries since the previous one (CUDA's counter stood in for on CPU).
    from recipe.metrics import MemoryMonitor

    cumulative = iter([0, 3, 3, 5])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: {"num_alloc_retries": next(cumulative)})
    cuda = MemoryMonitor(torch.device("cuda"))
    assert [cuda.alloc_retries() for _ in range(4)] == [0, 3, 0, 2]
    assert MemoryMonitor(torch.device("cpu")).alloc_retries() is None

    trainer = make_trainer(tmp_path)
    monkeypatch.setattr(trainer.metrics.memory, "alloc_retries", lambda: 2)
    with caplog.at_level("WARNING"):
        record = trainer.metrics.log(step=1, loss=1.0, loss_max=1.0, grad_norm=1.0, lr=1e-3, extra={})
    trainer.close()
    assert record["alloc_retries"] == 2
    assert "step 1: 2 CUDA memory allocation retries since the last log" in caplog.text


@pytest.mark.parametrize("device_type,offload,cpu_backend", [
    ("cuda", True, True), ("cuda", False, False), ("cpu", True, False),
])
def test_cpu_offload_on_an_accelerator_adds_gloo_for_host_tensors(tmp_path, monkeypatch, device_type, offload,
                                                                   cpu_backend):
    # Offloaded gradients are host tensors: the gradient norm's all-reduce needs a CPU backend beside
    # NCCL (torchtitan's own trainer asks for it the same way); on a CPU machine gloo is the backend.
    from types import SimpleNamespace

    from recipe import trainer as trainer_module

    seen = {}

    def init_distributed(comm, enable_cpu_backend=False, base_folder=""):
        seen["cpu_backend"] = enable_cpu_backend
        raise RuntimeError("stop after init_distributed")

    monkeypatch.setattr(trainer_module.dist_utils, "init_distributed", init_distributed)
    monkeypatch.setattr(trainer_module.dist_utils, "device_type", device_type)
    extra = ["--training.enable_cpu_offload"] if offload else []
    jc = parse_job_config(["--model.config", LLAMA, "--job.dump_folder", str(tmp_path), *extra])
    with pytest.raises(RuntimeError, match="stop after init_distributed"):
        Trainer._init_distributed(SimpleNamespace(job_config=jc))
    assert seen == {"cpu_backend": cpu_backend}
