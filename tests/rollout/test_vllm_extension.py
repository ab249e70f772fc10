"""flare's vLLM worker extension without vLLM: what it imports, the end-of-training signal the
driver's loop ends on, and the refusal to receive into sleeping weights. The same extension
inside a real vLLM is checked on a GPU by ``scripts/tools/check_vllm.py``."""

import json
import subprocess
import sys
import threading
import types
from types import SimpleNamespace

import pytest
import torch

from recipe.net import free_port
from recipe.rollout.engine.reference_receiver import LlamaTPEngine
from recipe.rollout.engine.vllm_extension import EngineAsleep, FlareWorkerExtension
from recipe.rollout.trainer.adapters import get_export_adapter
from recipe.rollout.trainer.senders import GroupTransport
from recipe.rollout.trainer.source import WeightSource
from tests.rollout.seeded_model import materialized
from tests.rollout.test_rollout_units import ROOT, Cfg, send_buckets, tiny

ENGINE_SIDE = ["recipe.rollout.engine.vllm_extension", "recipe.rollout.engine.endpoint", "recipe.rollout.protocol"]


@pytest.mark.parametrize("module", ENGINE_SIDE)
def test_engine_side_modules_import_only_torch_and_the_standard_library(module):
    """vLLM imports the extension by name in its workers, where flare's training dependencies
    (torchtitan, fla, transformers, ...) need not be installed."""
    probe = f"""
import json, sys
import torch, torch.distributed  # the baseline: whatever torch itself pulls in
before = set(sys.modules)
import {module}
new = sorted(set(sys.modules) - before)
print(json.dumps(new))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    new = json.loads(out.stdout.strip().splitlines()[-1])
    ours = {"recipe", "recipe.rollout", "recipe.rollout.engine", *ENGINE_SIDE}
    foreign = [m for m in new if m not in ours and m.split(".")[0] not in sys.stdlib_module_names]
    assert not foreign, f"{module} imports {foreign}"


class FakeWorker(FlareWorkerExtension):
    """The attributes of vLLM's GPU worker the extension uses."""

    def __init__(self, model):
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(world_size=1))
        self.rank = 0
        self.device = torch.device("cpu")
        self.model_runner = SimpleNamespace(model=model)


def test_the_driver_loop_ends_when_the_trainer_ends_training():
    cfg = tiny("llama")
    model = materialized(cfg)
    engine = LlamaTPEngine(cfg, torch.float32)
    worker, port = FakeWorker(engine), free_port()
    assert worker.flare_connect("127.0.0.1", str(port), "gloo", "20") == 0  # JSON-ish arguments are cast
    assert worker.flare_receive(wait_s="0.2") == {"status": "timeout", "version": None}

    source = WeightSource(model, get_export_adapter(cfg, torch.float32), 1 << 18)
    transport = GroupTransport(Cfg(engine_port=port, timeout_s=20))

    def trainer():
        for version in (5, 10):
            send_buckets(transport, source, version, source.buckets)
            transport.finish(version)
        transport.close(notify=True)  # what the hook does when training ends

    thread = threading.Thread(target=trainer, daemon=True)
    thread.start()
    seen = []
    while (got := worker.flare_receive())["status"] != "closed":  # the documented loop
        seen.append(got)
    thread.join(20)
    assert seen == [{"status": "applied", "version": 5}, {"status": "applied", "version": 10}]
    assert got == {"status": "closed", "version": 10} and worker.flare_weight_version() == 10
    ref = dict(model.named_parameters())
    assert all(torch.equal(t, ref[n].detach()) for n, t in engine.state().items() if n in ref)
    worker.flare_close()


@pytest.fixture
def fake_cumem(monkeypatch):
    """vLLM's CuMemAllocator as far as the extension reads it: allocations with a tag and a flag."""
    allocation = SimpleNamespace(tag="weights", is_asleep=False)
    allocator = SimpleNamespace(pointer_to_data={1: allocation, 2: SimpleNamespace(tag="kv_cache", is_asleep=True)})
    module = types.ModuleType("vllm.device_allocator.cumem")
    module.CuMemAllocator = type("CuMemAllocator", (), {"instance": allocator})
    for name in ("vllm", "vllm.device_allocator"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.device_allocator.cumem", module)
    return allocation


def test_a_receive_into_sleeping_weights_is_refused_in_one_line(fake_cumem):
    worker = FakeWorker(LlamaTPEngine(tiny("llama"), torch.float32))
    worker.flare_connect("127.0.0.1", free_port(), "gloo", 20)
    fake_cumem.is_asleep = True
    with pytest.raises(EngineAsleep) as e:
        worker.flare_receive(wait_s=0.1)
    assert "wake_up(tags=['weights'])" in str(e.value) and "\n" not in str(e.value)
    fake_cumem.is_asleep = False  # weights awake, KV cache still asleep: receiving is fine
    assert worker.flare_receive(wait_s=0.1)["status"] == "timeout"
    worker.flare_close()


def test_receive_before_connect_says_what_to_call():
    with pytest.raises(RuntimeError, match="flare_connect"):
        FakeWorker(None).flare_receive(wait_s=0)


@pytest.mark.parametrize("transport", ["nccl", "vllm"])
def test_a_colocated_engine_over_nccl_is_refused_before_training(transport):
    """vLLM's own transport is NCCL too: neither can put the trainer and the engine on one GPU."""
    from recipe.errors import ConfigError
    from recipe.rollout.trainer.hook import validate_rollout

    rollout = SimpleNamespace(interval=1, bucket_mb=512, engine_world_size=1, engine_tp_size=1, timeout_s=60,
                              placement="colocated", transport=transport)
    job = SimpleNamespace(rollout=rollout, comm=SimpleNamespace(train_timeout_seconds=100))
    with pytest.raises(ConfigError, match=f"colocated with transport={transport}: NCCL cannot join"):
        validate_rollout(job)



def test_loaders_that_take_the_shard_only_as_an_argument_get_it_from_the_weight():
    """vLLM 0.26.0's AutoWeightsLoader calls weight_loader(param, weight), the shard of a stacked
    weight on the tensor; OLMo-Hybrid's fused conv1d loader (written as below) took it only as an
    argument. After the extension connects, such loaders read it from the weight; a loader given
    the shard explicitly is called as it was."""
    from recipe.rollout.engine.vllm_extension import pass_stacked_shard_ids

    dims = [2, 2, 4]

    def fused_conv_loader(param, loaded_weight, loaded_shard_id=None):  # vLLM 0.26.0's shape of it
        offset = sum(dims[:loaded_shard_id])
        param.data[offset:offset + dims[loaded_shard_id]].copy_(loaded_weight)

    model = torch.nn.Module()
    model.conv = torch.nn.Parameter(torch.zeros(8, 3))
    model.conv.weight_loader = fused_conv_loader
    model.plain = torch.nn.Parameter(torch.zeros(3))
    model.plain.weight_loader = lambda param, w: param.data.copy_(w)

    def auto_weights_loader(shard, value):
        weight = torch.full((dims[shard], 3), float(value))
        weight.shard_id = shard  # what vLLM's WeightsMapper.apply attaches
        model.conv.weight_loader(model.conv, weight)

    with pytest.raises(TypeError):
        auto_weights_loader(1, 5.0)
    assert pass_stacked_shard_ids(model) == 1 and pass_stacked_shard_ids(model) == 0  # once
    for shard, value in enumerate((1.0, 2.0, 3.0)):
        auto_weights_loader(shard, value)
    assert model.conv.tolist() == [[1.0] * 3] * 2 + [[2.0] * 3] * 2 + [[3.0] * 3] * 4
    model.conv.weight_loader(model.conv, torch.full((2, 3), 7.0), 0)  # explicit shard: as before
    assert model.conv[:2].eq(7.0).all() and model.conv[2:4].eq(2.0).all()
