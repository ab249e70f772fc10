"""Rollout export, in one process: adapters (names, dtypes, tied weights, fused layouts), bucket
planning and packing, the reference engine's load_weights contract and TP forward, the wire
protocol over real gloo groups on threads, and the vLLM transport against a fake vLLM."""

import json
import socket
import os
import subprocess
import sys
import threading
import time
import types
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from recipe.model import build_model_on_meta, load_model_config
from recipe.net import free_port
from recipe.rollout.trainer.adapters import fuse_qkv, get_export_adapter, layer_order
from recipe.rollout.engine.reference_receiver import HFEngine, LlamaTPEngine, probe_batch
from recipe.rollout.trainer.source import Bucket, WeightSource, plan_buckets
from recipe.rollout.trainer.senders import GroupTransport, TransportError, probe_engine
from recipe.rollout.trainer.vllm_native import VLLMTransport
from recipe.rollout.engine.endpoint import ReceiverEndpoint, TrainerClosed
from recipe.rollout.protocol import ALIGN, unpack
from tests.rollout.seeded_model import materialized

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLA_FAMILIES = ["gla", "gated_deltanet", "delta_net", "retnet", "hgrn2", "mamba2"]


def tiny(family, **overrides):
    cfg = load_model_config(f"configs/tiny/{family}.json")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def export_all(model, adapter, bucket_bytes, engines):
    """Stream the model through buckets into every engine rank, as a transport would."""
    source = WeightSource(model, adapter, bucket_bytes)
    for plan in source.buckets:
        buf = torch.empty(plan.nbytes, dtype=torch.uint8)
        source.fill(plan, buf)
        for engine in engines:
            engine.load_weights(list(unpack(buf, plan.metas)))
    return source


def packed_in_one_bucket(cfg):
    """(the model's parameters by name, [(name, tensor)] unpacked from one bf16 export bucket)."""
    model = materialized(cfg)
    source = WeightSource(model, get_export_adapter(cfg, torch.bfloat16), 1 << 30)
    (plan,) = source.buckets
    buf = torch.empty(plan.nbytes, dtype=torch.uint8)
    source.fill(plan, buf)
    return dict(model.named_parameters()), list(unpack(buf, plan.metas))


# --------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("family", FLA_FAMILIES + ["llama", "olmo_hybrid"])
def test_every_checkpoint_weight_is_exported_once_in_layer_order(family):
    cfg = tiny(family)
    model = build_model_on_meta(cfg)
    items = get_export_adapter(cfg, torch.bfloat16).plan({n: tuple(p.shape) for n, p in model.named_parameters()})
    names = [it.name for it in items]
    assert len(names) == len(set(names))
    # What an HF checkpoint of this model holds (no persistent buffer is left out).
    assert set(names) == set(model.state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    layers = [int(n.split(".layers.")[1].split(".")[0]) for n in names if ".layers." in n]
    assert layers == sorted(layers)
    assert names[-1] == "lm_head.weight"


def test_layer_order_sorts_blocks_numerically_and_keeps_the_rest_in_place():
    names = ["lower_bounds", "emb", "m.layers.10.a", "m.layers.2.b", "m.layers.2.a", "norm", "lm_head"]
    assert layer_order(names) == ["lower_bounds", "emb", "m.layers.2.b", "m.layers.2.a", "m.layers.10.a",
                                  "norm", "lm_head"]


def test_dtype_per_parameter():
    cfg = tiny("gated_deltanet")
    model = build_model_on_meta(cfg)
    items = get_export_adapter(cfg, torch.bfloat16).plan({n: tuple(p.shape) for n, p in model.named_parameters()})
    fp32 = {it.name for it in items if it.dtype == torch.float32}
    assert fp32 == {f"model.layers.{i}.attn.{p}" for i in range(cfg.num_hidden_layers) for p in ("A_log", "dt_bias")}
    assert all(it.dtype == torch.bfloat16 for it in items if it.name not in fp32)
    # The packed bytes are the trainer's values cast per parameter.
    params, packed = packed_in_one_bucket(cfg)
    for name, t in packed:
        expect = params[name].detach().to(torch.float32 if name in fp32 else torch.bfloat16)
        assert t.dtype == expect.dtype and torch.equal(t, expect), name


def test_tied_embeddings_are_sent_once_and_used_as_lm_head():
    cfg = tiny("llama", tie_word_embeddings=True)
    model = materialized(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    engine = LlamaTPEngine(cfg, torch.float32)
    source = export_all(model, get_export_adapter(cfg, torch.float32), 1 << 30, [engine])
    assert "lm_head.weight" not in [it.name for it in source.items]
    engine.coverage.check()
    ids = probe_batch(cfg.vocab_size)
    assert torch.equal(engine.logits(ids), model(input_ids=ids).logits)


@pytest.mark.parametrize("n_kv", [2, 1])  # 1 KV head on 2 ranks: vLLM replicates it
def test_fused_layout_gives_each_engine_rank_the_shards_hf_names_give(n_kv):
    cfg = tiny("llama", num_key_value_heads=n_kv)
    model = materialized(cfg)
    via_names = [LlamaTPEngine(cfg, torch.float32, r, 2) for r in range(2)]
    via_fused = [LlamaTPEngine(cfg, torch.float32, r, 2) for r in range(2)]
    export_all(model, get_export_adapter(cfg, torch.float32), 1 << 20, via_names)
    source = export_all(model, get_export_adapter(cfg, torch.float32, engine_tp=2, fused=True), 1 << 20, via_fused)
    assert "model.layers.0.self_attn.qkv_proj.weight" in [it.name for it in source.items]
    assert not any(".q_proj." in it.name or ".up_proj." in it.name for it in source.items)
    for a, b in zip(via_names, via_fused):
        a.coverage.check()
        b.coverage.check()
        assert a.params.keys() == b.params.keys()
        for name in a.params:
            assert torch.equal(a.params[name], b.params[name]), name


def test_fused_qkv_layout_is_rank_after_rank():
    hd, tp = 2, 2
    q = torch.arange(4 * hd).view(-1, 1).float()  # 4 q heads
    k = 100 + torch.arange(2 * hd).view(-1, 1).float()  # 2 kv heads
    v = 200 + torch.arange(2 * hd).view(-1, 1).float()
    fused = fuse_qkv(q, k, v, tp=tp, n_heads=4, n_kv=2, head_dim=hd).flatten().tolist()
    assert fused == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]


# --------------------------------------------------------------------------- buckets


@dataclass
class Item:
    name: str
    nbytes: int
    shape: tuple = (1,)
    dtype: torch.dtype = torch.uint8


def test_buckets_respect_the_size_and_give_oversize_tensors_their_own():
    sizes = [100, 300, 50, 2000, 10, 10, 999, 1000, 1]
    items = [Item(f"t{i}", n, (n,)) for i, n in enumerate(sizes)]
    buckets = plan_buckets(items, 1000)
    assert [m.name for b in buckets for m in b.metas] == [it.name for it in items]  # order kept
    for b in buckets:
        assert all(m.offset % ALIGN == 0 for m in b.metas)
        assert b.nbytes == max(m.offset + m.nbytes for m in b.metas)
        if len(b.metas) > 1:
            assert b.nbytes <= 1000
        else:
            assert b.metas[0].offset == 0
    assert [[m.name for m in b.metas] for b in buckets if b.nbytes > 1000] == [["t3"]]
    assert ["t7"] in [[m.name for m in b.metas] for b in buckets]  # exactly one bucket's worth


def test_first_buckets_ramp_up_to_the_bucket_size():
    items = [Item(f"t{i}", 64, (64,)) for i in range(30)]
    buckets = plan_buckets(items, 1024, ramp_start=16)  # at most 64, 256, then 1024 bytes
    assert [len(b.metas) for b in buckets] == [1, 4, 16, 9]
    assert [m.name for b in buckets for m in b.metas] == [it.name for it in items]
    # an item larger than the ramp so far (an embedding, first in layer order) waits until the
    # buckets have grown to it: the first bucket stays small
    big = [Item("big", 200, (200,))] + items[:6]
    planned = [[m.name for m in b.metas] for b in plan_buckets(big, 1024, ramp_start=16)]
    assert planned == [["t0"], ["big"], ["t1", "t2", "t3", "t4", "t5"]]
    # bigger than every bucket: alone, once the ramp is over; nothing but big ones: order kept
    huge = [Item("huge", 5000, (5000,))] + items[:8]
    planned = [[m.name for m in b.metas] for b in plan_buckets(huge, 1024, ramp_start=16)]
    assert planned == [["t0"], ["t1", "t2", "t3", "t4"], ["huge"], ["t5", "t6", "t7"]]
    only_big = [Item("a", 300, (300,)), Item("b", 200, (200,))]
    assert [[m.name for m in b.metas] for b in plan_buckets(only_big, 1024, ramp_start=16)] == [["a"], ["b"]]


def test_packing_round_trips_bit_for_bit_across_dtypes():
    cfg = tiny("gated_deltanet")
    model = materialized(cfg)
    engine = HFEngine(cfg, torch.bfloat16)
    source = export_all(model, get_export_adapter(cfg, torch.bfloat16), 64 * 1024, [engine])
    assert len(source.buckets) > 3 and max(b.nbytes for b in source.buckets) > 64 * 1024  # embeddings: oversize
    engine.coverage.check()
    trained = dict(model.named_parameters())
    for name, p in engine.params.items():
        assert torch.equal(p, trained[name].detach().to(p.dtype)), name


# --------------------------------------------------------------------------- TP forward


def hf_family(model_type):
    """configs/tiny/llama.json as Qwen2 (q/k/v biases) or Qwen3 (per-head q/k norms)."""
    import json

    from transformers import AutoConfig

    with open("configs/tiny/llama.json") as f:
        values = json.load(f)
    values.pop("model_type")
    values.update(head_dim=64, attention_bias=False)
    return AutoConfig.for_model(model_type, **values)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_tp2_engine_forward_matches_the_hf_model(model_type):
    cfg = tiny("llama") if model_type == "llama" else hf_family(model_type)
    model = materialized(cfg)
    with torch.no_grad():  # HF initializes biases to 0 and norms to 1: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if model_type == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    if model_type == "qwen3":
        assert hasattr(model.model.layers[0].self_attn, "q_norm")
    store, logits = dist.HashStore(), {}

    def rank(r):
        pg = dist.ProcessGroupGloo(store, r, 2, timedelta(seconds=60))
        engine = LlamaTPEngine(cfg, torch.float32, r, 2, pg)
        export_all(model, get_export_adapter(cfg, torch.float32), 1 << 18, [engine])
        engine.coverage.check()
        logits[r] = engine.logits(probe_batch(cfg.vocab_size))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    ref = model(input_ids=probe_batch(cfg.vocab_size)).logits
    assert torch.equal(logits[0], logits[1])
    torch.testing.assert_close(logits[0], ref, rtol=1e-5, atol=1e-5)  # sharded matmuls reorder sums


def test_engine_rejects_unknown_names_and_wrong_dtypes():
    cfg = tiny("llama")
    engine = LlamaTPEngine(cfg, torch.bfloat16, 0, 2)
    with pytest.raises(KeyError):
        engine.load_weights([("model.layers.9.mlp.down_proj.weight", torch.zeros(128, 256, dtype=torch.bfloat16))])
    with pytest.raises(TypeError):
        engine.load_weights([("model.norm.weight", torch.zeros(128))])
    engine.load_weights([("model.norm.weight", torch.ones(128, dtype=torch.bfloat16))] * 2)
    with pytest.raises(RuntimeError, match="never written"):
        engine.coverage.check()


# --------------------------------------------------------------------------- protocol over gloo


@dataclass
class Cfg:
    engine_address: str = "127.0.0.1"
    engine_port: int = 0
    engine_world_size: int = 1
    timeout_s: float = 20.0
    bucket_mb: float = 0.25
    placement: str = "disaggregated"
    on_failure: str = "log"


def serve_in_thread(endpoint, load_weights, **callbacks):
    """Receive versions on a thread until the trainer closes; returns (thread, applied versions)."""
    applied = []

    def serve():
        try:
            while True:
                applied.append(endpoint.receive(load_weights, **callbacks))
        except TrainerClosed:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, applied


def send_buckets(transport, source, version, plans) -> None:
    """Start ``version`` and send ``plans`` (the caller finishes it)."""
    from recipe.rollout.trainer.source import Bucket

    transport.init()
    transport.start(version, source.buckets)
    for plan in plans:
        buf = transport.buffer(plan.nbytes)
        source.fill(plan, buf)
        transport.send(Bucket(plan.index, plan.metas, buf, plan.nbytes))


def checked_receiver():
    """A tiny Llama, a reference engine that rejects incomplete versions, its receiver serving on
    a thread, and a gloo transport to it: (cfg, model, engine, endpoint, server, applied, transport, source)."""
    cfg = tiny("llama")
    model = materialized(cfg)
    port = free_port()
    engine = LlamaTPEngine(cfg, torch.float32)
    endpoint = ReceiverEndpoint("127.0.0.1", port, 1, 2, timeout_s=20)
    server, applied = serve_in_thread(endpoint, engine.load_weights, start=lambda v: engine.coverage.reset(),
                                      finish=lambda v: engine.coverage.check())
    transport = GroupTransport(Cfg(engine_port=port, timeout_s=20))
    source = WeightSource(model, get_export_adapter(cfg, torch.float32), 1 << 18)
    return cfg, model, engine, endpoint, server, applied, transport, source


def test_protocol_rejects_a_bad_version_and_recovers_on_the_same_connection():
    cfg, model, engine, endpoint, server, applied, transport, source = checked_receiver()

    def send(version, plans):
        send_buckets(transport, source, version, plans)
        transport.finish(version)

    with pytest.raises(TransportError, match="rejected version 1"):
        send(1, source.buckets[:-1])  # a bucket short: the engine's coverage check fails
    send(2, source.buckets)
    transport.close(notify=True)
    server.join(20)
    assert applied == [2] and endpoint.version == 2 and not endpoint.dirty
    ref = model(input_ids=probe_batch(cfg.vocab_size)).logits
    assert torch.equal(engine.logits(probe_batch(cfg.vocab_size)), ref)
    endpoint.close()


def test_a_failure_after_the_last_bucket_rejects_the_version_without_a_hang():
    """Receivers end a version on their own once every announced tensor arrived and wait in the
    final agree; a trainer-side failure at that point must reject the version there (an 'abort'
    frame would wait for receivers that no longer read frames), and the connection stays usable."""
    cfg, model, engine, endpoint, server, applied, transport, source = checked_receiver()
    send_buckets(transport, source, 1, source.buckets)
    t0 = time.monotonic()
    transport.abort("a trainer rank failed after the last bucket")
    assert time.monotonic() - t0 < 5
    send_buckets(transport, source, 2, source.buckets)
    transport.finish(2)
    transport.close(notify=True)
    server.join(20)
    assert applied == [2] and endpoint.version == 2 and not endpoint.dirty  # version 1 was never applied
    endpoint.close()


def test_receiver_posts_the_next_receive_before_loading_and_loads_the_last_bucket_at_once():
    """Bucket k is loaded after the receive of k+1 is posted (its load overlaps the transfer of
    k+1 on GPUs); the last bucket is loaded as soon as it arrives, before the trainer's end
    message. A load that fails rejects the version; the next one on the same connection is
    applied whole."""
    cfg = tiny("llama")
    model = materialized(cfg)
    port = free_port()
    engine = LlamaTPEngine(cfg, torch.float32)
    endpoint = ReceiverEndpoint("127.0.0.1", port, 1, 2, timeout_s=20)
    events, fail_in = [], {1: 1}  # version -> bucket index whose load raises
    post = endpoint._receive_bucket

    def spy_post(index, nbytes, metas):
        events.append(("post", index))
        return post(index, nbytes, metas)

    endpoint._receive_bucket = spy_post
    bucket_of = {}

    def load(weights):
        weights = list(weights)
        index = bucket_of[weights[0][0]]
        events.append(("load", index))
        if fail_in.get(current[0]) == index:
            raise RuntimeError("injected load failure")
        engine.load_weights(weights)

    current = [0]
    server, applied = serve_in_thread(endpoint, load,
                                      start=lambda v: (current.__setitem__(0, v), engine.coverage.reset()),
                                      finish=lambda v: engine.coverage.check())
    transport = GroupTransport(Cfg(engine_port=port))
    source = WeightSource(model, get_export_adapter(cfg, torch.float32), 1 << 17)
    n = len(source.buckets)
    assert n >= 3, n
    for plan in source.buckets:
        bucket_of.update({m.name: plan.index for m in plan.metas})

    def send(version):
        send_buckets(transport, source, version, source.buckets)
        if version == 2:
            # every bucket is loaded before transport.finish() is called
            deadline = time.monotonic() + 10
            while events[-1] != ("load", n - 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert events[-1] == ("load", n - 1), events
        transport.finish(version)

    with pytest.raises(TransportError, match="rejected version 1"):
        send(1)
    # version 1: loads stop at the failed bucket, every receive is still posted (in step)
    assert events == [("post", 0), ("post", 1), ("load", 0), ("post", 2), ("load", 1),
                      *[("post", i) for i in range(3, n)]], events
    events.clear()
    send(2)
    expected = [("post", 0)]
    for i in range(1, n):
        expected += [("post", i), ("load", i - 1)]
    expected.append(("load", n - 1))
    assert events == expected
    transport.close(notify=True)
    server.join(20)
    assert applied == [2] and endpoint.version == 2 and not endpoint.dirty
    ref = model(input_ids=probe_batch(cfg.vocab_size)).logits
    assert torch.equal(engine.logits(probe_batch(cfg.vocab_size)), ref)
    endpoint.close()


def test_a_trainer_failing_mid_version_sends_the_rest_unfilled_and_receivers_load_none_of_it():
    """Receivers post every planned receive up front (no control message per bucket), so a
    sender that fails after bucket k must still send the rest; their trailer (0, not this
    version's start number) keeps the receivers from loading those bytes. The version is
    rejected and the next one on the same connection is applied whole."""
    cfg = tiny("llama")
    model = materialized(cfg)
    port = free_port()
    engine = LlamaTPEngine(cfg, torch.float32)
    endpoint = ReceiverEndpoint("127.0.0.1", port, 1, 2, timeout_s=20)
    loaded, aborted = [], []

    def load(weights):
        weights = list(weights)
        loaded.append(weights[0][0])
        engine.load_weights(weights)

    server, applied = serve_in_thread(endpoint, load, start=lambda v: engine.coverage.reset(),
                                      finish=lambda v: engine.coverage.check(), abort=aborted.append)
    transport = GroupTransport(Cfg(engine_port=port))
    source = WeightSource(model, get_export_adapter(cfg, torch.float32), 1 << 17)
    assert len(source.buckets) >= 4
    first = [plan.metas[0].name for plan in source.buckets]

    send_buckets(transport, source, 1, source.buckets[:2])
    transport.abort("a trainer rank failed in bucket 2")  # buckets 2.. go out unfilled
    deadline = time.monotonic() + 10
    while not aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loaded == first[:2] and aborted and endpoint.dirty
    loaded.clear()
    send_buckets(transport, source, 2, source.buckets)
    transport.finish(2)
    transport.close(notify=True)
    server.join(20)
    assert loaded == first and applied == [2] and not endpoint.dirty
    assert torch.equal(engine.logits(probe_batch(cfg.vocab_size)), model(input_ids=probe_batch(cfg.vocab_size)).logits)
    endpoint.close()


def test_the_bucket_plan_travels_once_per_connection():
    cfg, model, engine, endpoint, server, applied, transport, source = checked_receiver()
    starts = []
    for version in (1, 2):
        send_buckets(transport, source, version, source.buckets)
        transport.finish(version)
        starts.append(json.loads(transport.store.get(f"{transport.prefix}start{version}")))
    transport.close()  # a new connection: its receivers are sent the plan again
    send_buckets(transport, source, 3, source.buckets)
    transport.finish(3)
    starts.append(json.loads(transport.store.get(f"{transport.prefix}start1")))
    transport.close(notify=True)
    server.join(20)
    assert applied == [1, 2, 3] and not endpoint.dirty
    assert ["plan" in s for s in starts] == [True, False, True]
    assert len({s["plan_id"] for s in starts}) == 1
    assert len(starts[0]["plan"]) == len(source.buckets)
    endpoint.close()


@pytest.mark.parametrize("transport", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="nccl needs 2 CUDA GPUs (one per process)"))])
def test_a_trainer_that_dies_or_fails_mid_version_over_separate_processes(transport):
    """A trainer process that dies after two buckets: the receiver gives the version up at once,
    not after its 60 s timeout (with nccl its buckets' receives are all posted and would wait for
    the timeout, but the end message's receive, posted on the gloo group, fails when the socket
    closes). One that fails before bucket 2 and aborts: the version is rejected; with gloo the
    receiver loaded buckets 0-1 only (the trailers of the rest say unfilled; nccl receivers queue
    loads ahead of the bytes and trust the end message instead). Then the next trainer's version
    is applied whole, bit for bit."""
    from tests.rollout.export_trainer import tiny_llama_source

    port = free_port()
    device = "cuda:1" if transport == "nccl" else "cpu"
    if transport == "nccl":
        torch.cuda.set_device(1)
    endpoint = ReceiverEndpoint("127.0.0.1", port, 1, 2, backend=transport, timeout_s=60, device=device)
    got, gave_up = {}, []
    # clone on the device: with nccl, load_weights runs before the bytes are in (no host reads)
    server, applied = serve_in_thread(endpoint, lambda ws: got.update({n: w.clone() for n, w in ws}),
                                      start=lambda v: got.clear(), abort=lambda v: gave_up.append(time.monotonic()))

    def trainer(version, *extra):
        return subprocess.run([sys.executable, "-m", "tests.rollout.export_trainer", "--transport", transport,
                               "--port", str(port), "--version", str(version), *extra], cwd=ROOT, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])})

    def wait_gave_up(n):
        deadline = time.monotonic() + 30
        while len(gave_up) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(gave_up) == n and endpoint.dirty
        return gave_up[-1]

    source = tiny_llama_source()
    first_two = {m.name for plan in source.buckets[:2] for m in plan.metas}
    try:
        assert trainer(1, "--die_before", "2").returncode == 3
        exited = time.monotonic()
        assert wait_gave_up(1) - exited < 10
        if transport == "gloo":
            assert set(got) <= first_two
        assert trainer(2, "--abort_before", "2").returncode == 4
        wait_gave_up(2)
        if transport == "gloo":
            assert set(got) == first_two
        assert trainer(3).returncode == 0
        server.join(30)
    finally:
        endpoint.close()
        if transport == "nccl":
            torch.cuda.set_device(0)
    assert applied == [3] and not endpoint.dirty
    for plan in source.buckets:
        buf = torch.empty(plan.nbytes, dtype=torch.uint8)
        source.fill(plan, buf)
        for name, want in unpack(buf, plan.metas):
            assert torch.equal(got.pop(name).cpu(), want), name
    assert not got


def test_packed_views_are_the_bytes_at_their_offsets_in_any_dtype_and_refuse_what_does_not_fit():
    """unpack/packed_view use one as_strided per tensor on a per-dtype view of the bucket: each
    view must be exactly the slice-and-view of its bytes, also in a buffer that starts inside a
    larger allocation (IPC handles map such buffers); a tensor that would not fit is refused."""
    from recipe.rollout.protocol import TensorMeta, align, packed_view

    tensors = [("a", torch.randn(3, 5).to(torch.bfloat16)), ("b", torch.randn(7)), ("c", torch.tensor(3.5)),
               ("d", torch.arange(6, dtype=torch.int64).view(2, 3)), ("e", torch.randn(2, 0)),
               ("f", torch.randn(4, 2, 3).to(torch.float16))]
    metas, end = [], 0
    for name, t in tensors:
        offset = align(end)
        metas.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset,
                                t.numel() * t.element_size()))
        end = offset + metas[-1].nbytes
    backing = torch.zeros(3 * ALIGN + align(end) + 8, dtype=torch.uint8)
    buffer = backing[3 * ALIGN:3 * ALIGN + align(end) + 8]  # storage offset 192 bytes
    for (name, t), m in zip(tensors, metas):
        buffer[m.offset:m.offset + m.nbytes].view(t.dtype).view(t.shape).copy_(t)
    got = dict(unpack(buffer, metas))
    for (name, t), m in zip(tensors, metas):
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name
        assert got[name].is_contiguous(), name
        assert t.numel() == 0 or got[name].data_ptr() == buffer.data_ptr() + m.offset, name  # empty: data_ptr 0
    got["b"].fill_(1.0)  # a view, not a copy
    assert torch.equal(buffer[metas[1].offset:metas[1].offset + 28].view(torch.float32), torch.ones(7))
    bad = [TensorMeta("past_end", "float32", (100,), 0, 400), TensorMeta("short", "float32", (7,), 0, 24),
           TensorMeta("unaligned", "float32", (2,), 4, 8)]
    for m in bad:
        with pytest.raises(ValueError, match=m.name):
            packed_view(buffer, m, {})


def test_control_messages_round_trip_in_one_frame_or_with_a_tail():
    from recipe.rollout.protocol import _FRAME, recv_hello, recv_obj, send_hello, send_obj

    store = dist.HashStore()  # thread-safe, unlike one TCPStore client shared by two threads
    messages = [{"op": "x"}, {"op": "big", "tensors": ["w" * 100] * (2 * _FRAME // 100)},
                {"op": "edge", "pad": "p" * (_FRAME - 8 - len('{"op": "edge", "pad": ""}'))}]
    got = []

    def rank(r):
        pg = dist.ProcessGroupGloo(store, r, 2, timedelta(seconds=20))
        if r == 0:
            send_hello(pg, {"op": "hello"})
            for m in messages:
                send_obj(pg, m)
        else:
            got.append(recv_hello(pg))
            got.extend(recv_obj(pg) for _ in messages)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert got == [{"op": "hello"}, *messages]


def test_an_idle_receiver_wakes_as_soon_as_the_trainer_starts(monkeypatch):
    """Receivers idle on a store key between versions; polling it every 50 ms added up to 50 ms
    to every export. The key is now awaited (TCPStore.wait on a helper thread). With the poll
    period stretched to 30 s, a receiver that only polls (or sleeps a period through a start that
    raced its checks) wakes at least 30 s late; one woken by the watcher, far sooner. No speed
    bound: the margin is for a loaded CI machine."""
    from recipe.rollout.engine import endpoint as endpoint_module

    monkeypatch.setattr(endpoint_module, "_POLL_S", 30.0)
    endpoint = ReceiverEndpoint("127.0.0.1", free_port(), 1, 2, timeout_s=20)
    endpoint.gen = int(endpoint.store.add("flare/gen", 1))  # as if connected to generation 1
    lags = []
    for n in range(1, 4):
        set_at = []

        def trainer_start():
            time.sleep(0.225)  # not a multiple of the old 50 ms poll
            set_at.append(time.monotonic())
            endpoint.store.set(f"flare/g1/start{n}", json.dumps({"op": "start", "version": 10 * n}))

        t = threading.Thread(target=trainer_start)
        t.start()
        # the key's value is the start message: no control-group message follows
        assert endpoint._wait_start(deadline=time.monotonic() + 10) == {"op": "start", "version": 10 * n}
        lags.append(time.monotonic() - set_at[0])
        t.join()
    assert endpoint.n_started == 3
    assert max(lags) < 10, lags  # a poll would have taken 30 s
    watchers = [t for t in threading.enumerate() if t.name == "flare-watch-r1"]
    assert len(watchers) == 1, watchers  # one thread and store client for all versions
    # a deadline leaves the waiter in place for the next call; close() releases it
    monkeypatch.setattr(endpoint_module, "_POLL_S", 0.05)  # the deadline is checked once per period
    assert endpoint._wait_start(deadline=time.monotonic() + 0.1) is None
    waiter = endpoint._waiter
    assert waiter is not None and not waiter[1].is_set()
    endpoint.close()
    assert waiter[1].wait(5)


def test_packing_casts_in_one_pass_with_the_same_bits():
    params, packed = packed_in_one_bucket(tiny("llama"))
    for name, view in packed:
        assert torch.equal(view, params[name].detach().to(torch.bfloat16)), name


def test_fsdp_on_one_rank_packs_the_local_tensors_without_a_gather(single_process_group, monkeypatch):
    """The trainer's one-GPU layout (FSDP over a one-rank mesh) must pack the same bits as a plain
    model, straight from the local tensors: a per-parameter ``full_tensor()`` there is only Python
    dispatch, and it made an in-job export several times slower than the transfer itself."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    cfg = tiny("llama", tie_word_embeddings=False)
    params, expected = packed_in_one_bucket(cfg)
    dist.init_process_group("gloo", rank=0, world_size=1)
    model = materialized(cfg)
    mesh = init_device_mesh("cpu", (1,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters())

    def no_gather(self, *args, **kwargs):
        raise AssertionError("full_tensor() called on a tensor this rank holds whole")

    monkeypatch.setattr(DTensor, "full_tensor", no_gather)
    source = WeightSource(model, get_export_adapter(cfg, torch.bfloat16), 1 << 30)
    (plan,) = source.buckets
    buf = torch.empty(plan.nbytes, dtype=torch.uint8)
    source.fill(plan, buf)
    packed = list(unpack(buf, plan.metas))
    assert [n for n, _ in packed] == [n for n, _ in expected]
    for (name, got), (_, want) in zip(packed, expected):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("config, overrides, extra", [
    # odd vocabulary and MLP rows: uneven shards; the fused layout builds qkv/gate_up from gathers
    ("configs/tiny/llama.json", {"vocab_size": 509, "intermediate_size": 250}, ["--fused", "--engine_tp", "2"]),
    # float32 A_log/dt_bias next to bf16 weights in one gather; 3 heads: 1-D params split 2/1
    ("configs/tiny/gated_deltanet.json", {"num_heads": 3, "vocab_size": 509}, []),
    # HSDP over a (1, 2) mesh: the shard dimension's group
    ("configs/tiny/llama.json", {"vocab_size": 509}, ["--layout", "hsdp"]),
    # HSDP over a (2, 2) mesh (4 ranks): the other replica's shard group, without the sender, skips
    ("configs/tiny/llama.json", {"vocab_size": 509}, ["--layout", "hsdp", "--replicas", "2"]),
    # rows, columns and replicated in one bucket: the batched gather, full_tensor() and local reads;
    # then packing errors on the sender, which must not leave the other rank in a collective
    ("configs/tiny/llama.json", {"vocab_size": 509}, ["--layout", "mixed", "--pack_errors"]),
], ids=["llama-fused", "gated_deltanet", "hsdp", "hsdp-2-replicas", "mixed-layouts"])
def test_sharded_buckets_pack_the_same_bits_with_one_gather_per_bucket(tmp_path, config, overrides, extra):
    """Sharded over 2 (or 4) gloo ranks, every bucket packs exactly as from the unsharded model;
    row-split (FSDP) parameters need no per-parameter ``full_tensor()`` (one gather per bucket)."""
    out = tmp_path / "fill.json"
    nproc = 4 if "--replicas" in extra else 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "tests", "rollout", "fsdp_fill.py"), "--config", config,
           "--set", json.dumps(overrides), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["mismatched"] == [] and result["extra"] == []
    assert result["buckets"] > 2 and result["uneven"]  # several buckets; the padding path ran
    if "mixed" in extra:  # only the column-split matrices need a gather of their own
        assert 0 < result["full_tensor_calls"] < len(result["names"])
        assert result["pack_errors_raised"] == result["pack_error_buckets"] > 0
        return
    assert result["full_tensor_calls"] == 0
    if "--fused" in extra:
        assert any(".qkv_proj." in n for n in result["names"])
    if "gated_deltanet" in config:
        assert result["dtypes"] == ["torch.bfloat16", "torch.float32"]


def test_a_tensor_sharded_over_several_ranks_is_not_taken_as_whole():
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from recipe.rollout.trainer.source import held_whole

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        sharded = DTensor.from_local(torch.ones(2, 3), mesh, [Shard(0)], run_check=False)
        replicated = DTensor.from_local(torch.ones(4, 3), mesh, [Replicate()], run_check=False)
        assert held_whole(sharded) is None
        assert torch.equal(held_whole(replicated), torch.ones(4, 3))
    finally:
        dist.destroy_process_group()


def test_no_receiver_fails_at_once():
    transport = GroupTransport(Cfg(engine_port=free_port(), timeout_s=30))
    with pytest.raises(TransportError, match="no rollout receiver listening"):
        transport.init()



def test_a_run_that_stops_on_failure_waits_for_an_engine_still_starting():
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def start_late():
        time.sleep(1.0)
        server.bind(("127.0.0.1", port))
        server.listen()

    late = threading.Thread(target=start_late)
    late.start()
    try:
        t0 = time.monotonic()
        probe_engine("127.0.0.1", port, wait_s=30)
        assert time.monotonic() - t0 >= 0.9  # it did wait for the listener
    finally:
        late.join()
        server.close()
    with pytest.raises(TransportError, match=r"after waiting 1s"):
        probe_engine("127.0.0.1", free_port(), wait_s=1.0)


def test_a_bucket_outside_the_plan_is_a_transport_error_before_anything_is_sent():
    source = WeightSource(materialized(tiny("llama")), get_export_adapter(tiny("llama"), torch.float32), 1 << 17)
    transport = GroupTransport(Cfg())
    transport.buckets, transport.n_buckets_sent = source.buckets, len(source.buckets)  # the version's last was sent
    extra = source.buckets[-1]
    with pytest.raises(TransportError, match="out of plan"):
        transport.send(Bucket(len(source.buckets), extra.metas, torch.empty(0, dtype=torch.uint8), extra.nbytes))
    with pytest.raises(TransportError, match="out of plan"):  # a bucket again
        transport.send(Bucket(0, source.buckets[0].metas, torch.empty(0, dtype=torch.uint8), source.buckets[0].nbytes))

# --------------------------------------------------------------------------- vLLM transport (fake vLLM)


def fake_vllm(monkeypatch, version: str) -> None:
    for name in ("vllm", "vllm.distributed", "vllm.distributed.weight_transfer"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vllm"].__version__ = version


@pytest.mark.parametrize("version", ["0.24.1", "0.29.0", "1.0.0"])
def test_vllm_transport_names_a_vllm_outside_its_range_in_one_line(monkeypatch, version):
    fake_vllm(monkeypatch, version)
    mod = types.ModuleType("vllm.distributed.weight_transfer.nccl_engine")
    mod.NCCLWeightTransferEngine = mod.NCCLTrainerSendWeightsArgs = object
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer.nccl_engine", mod)
    with pytest.raises(TransportError, match=rf"vLLM {version} is installed") as e:
        VLLMTransport(Cfg(engine_world_size=1), client=object()).init()
    assert "\n" not in str(e.value)


def test_vllm_transport_drives_the_four_phase_api(monkeypatch):
    sent, calls = [], []

    class Engine:
        @staticmethod
        def trainer_init(info):
            calls.append(("trainer_init", info["world_size"]))
            return "group"

        @staticmethod
        def trainer_send_weights(iterator, trainer_args):
            assert trainer_args.group == "group" and trainer_args.packed
            sent.extend((n, t.clone()) for n, t in iterator)

    @dataclass
    class Args:
        group: object
        packed: bool = False
        packed_buffer_size_bytes: int = 0
        packed_num_buffers: int = 2

    mod = types.ModuleType("vllm.distributed.weight_transfer.nccl_engine")
    mod.NCCLWeightTransferEngine, mod.NCCLTrainerSendWeightsArgs = Engine, Args
    fake_vllm(monkeypatch, "0.26.0")
    monkeypatch.setitem(sys.modules, "vllm.distributed.weight_transfer.nccl_engine", mod)

    class Client:
        def get_world_size(self):
            return 2

        def init_weight_transfer_engine(self, info):
            calls.append(("init", info["rank_offset"], info["world_size"]))

        def start_weight_update(self):
            calls.append(("start",))

        def update_weights(self, info, timeout_s):
            calls.append(("update", len(info["names"]), info["packed"]))
            self.info = info

        def finish_weight_update(self):
            calls.append(("finish",))

        def reset_prefix_cache(self):
            calls.append(("reset",))

    client = Client()
    cfg = tiny("llama")
    model = materialized(cfg)
    source = WeightSource(model, get_export_adapter(cfg, torch.bfloat16), 1 << 18)
    transport = VLLMTransport(Cfg(engine_world_size=2), client=client)
    transport.init()
    transport.start(7, source.buckets)
    from recipe.rollout.trainer.source import Bucket
    for plan in source.buckets:
        buf = transport.buffer(plan.nbytes)
        source.fill(plan, buf)
        transport.send(Bucket(plan.index, plan.metas, buf, plan.nbytes))
    transport.finish(7)
    assert [c[0] for c in calls] == ["init", "trainer_init", "start", "update", "finish", "reset"] or \
        [c[0] for c in calls] == ["trainer_init", "init", "start", "update", "finish", "reset"]
    assert [n for n, _ in sent] == client.info["names"] == [m.name for plan in source.buckets for m in plan.metas]
    assert sorted(client.info["names"]) == sorted(it.name for it in source.items)
    assert [str(t.dtype).removeprefix("torch.") for _, t in sent] == client.info["dtype_names"]
    params = dict(model.named_parameters())
    for name, t in sent:
        assert torch.equal(t, params[name].detach().to(torch.bfloat16)), name


def test_a_start_key_without_a_start_message_is_a_protocol_error():
    """A trainer speaking protocol 2 wrote "1" under the start key (its start went over the control
    group): the receiver must say so, not hang or misread it."""
    endpoint = ReceiverEndpoint("127.0.0.1", free_port(), 1, 2, timeout_s=20)
    endpoint.gen = int(endpoint.store.add("flare/gen", 1))
    endpoint.store.set("flare/g1/start1", "1")
    with pytest.raises(RuntimeError, match="protocol error: start key flare/g1/start1 holds b'1'"):
        endpoint._wait_start(deadline=time.monotonic() + 10)
    endpoint.close()


def test_a_start_landing_during_the_receivers_key_check_is_taken_without_a_poll_sleep(monkeypatch):
    """The trainer's start may land right after the receiver's own key check came back empty: the
    watcher then has the message and the receiver must take it at once. Before, it read "watcher
    done" as "watcher failed" and slept a poll period (50 ms: one such export per run on GPUs)."""
    import recipe.rollout.engine.endpoint as vw

    endpoint = ReceiverEndpoint("127.0.0.1", free_port(), 1, 2, timeout_s=20)
    endpoint.gen = int(endpoint.store.add("flare/gen", 1))
    done = endpoint._start_waiter("flare/g1/start1")
    current_gen = endpoint._current_gen

    def start_lands_now():  # called by _wait_start after its key check found nothing
        if not done.is_set():
            endpoint.store.set("flare/g1/start1", json.dumps({"op": "start", "version": 7}))
            assert done.wait(10)  # the watcher has fetched the message
        return current_gen()

    monkeypatch.setattr(endpoint, "_current_gen", start_lands_now)
    slept = []
    monkeypatch.setattr(vw.time, "sleep", lambda s: slept.append(s))
    assert endpoint._wait_start(deadline=time.monotonic() + 30) == {"op": "start", "version": 7}
    assert slept == []
    endpoint.close()
