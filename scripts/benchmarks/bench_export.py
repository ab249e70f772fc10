"""Benchmark the rollout weight export on GPUs: time, bandwidth and sender memory per transport.

    # disaggregated: trainer on GPU 0, a TP-1 engine on GPU 1 (NCCL); colocated: both on GPU 0 (IPC)
    python scripts/benchmarks/bench_export.py                      # the default table (needs 2 GPUs for nccl rows)
    python scripts/benchmarks/bench_export.py --transport nccl --model 7b --bucket_mb 256 --trainer_gpus 2 --engine_gpus 2
    python scripts/benchmarks/bench_export.py --transport gloo --model tiny   # CPU smoke test of the same path
    python scripts/benchmarks/bench_export.py --transport gloo --model tiny-deep --repeats 9   # CPU: host time per tensor

Each row spawns trainer ranks (a Llama-shaped HF model in fp32 with random weights, FSDP2 over
``--trainer_gpus`` as ``train.py`` shards it: one GPU is a one-rank mesh, whose DTensors the
source reads without a gather but with their host overhead; ``--trainer_layout plain`` keeps
plain tensors on one GPU, the layout of the older 1/1 rows in docs/results) and reference receiver ranks
(``recipe.rollout.engine.reference_receiver.LlamaTPEngine``, vLLM's TP layout, bf16, on the next GPUs for nccl or
the trainer's GPUs for ipc). The trainer exports
through the real ``rollout`` hook (gather → pack → transport → load_weights → ack) ``--repeats``
times after a warm-up. ``fill s`` is the same gathers and packing with no transport: an export
close to it means the transfer hid behind the gathers. With ``--check`` (small models) the
engine's TP forward must reproduce the trainer's logits.

A second table splits each export into phases (median over the repeats, milliseconds of host
time). Trainer (sending rank): ``start`` (connect check + start message), ``buffer`` (waiting
for a free bucket buffer: gloo/ipc on the host; nccl only queues a device-side wait), ``fill``
(gather + cast + pack launch), ``send`` (data: the whole transfer for gloo, a launch for nccl;
control message, sync + ack for ipc), ``agree`` (trainer ranks agreeing on the outcome),
``finish`` (end message and the receivers' final ack, then the sender's own broadcasts; nccl
receivers ack once every load is queued, ipc ones once the last bucket is loaded). Receiver
(engine rank 0): ``start lag`` (trainer's start() to the receiver seeing it), ``first bucket``
(the trainer's start() to bucket 0's bytes; nccl/gloo), ``arrivals`` (nccl: *device* time from
bucket 0's bytes to the last bucket's, i.e. the wire with any gaps between buckets), ``wait``
(waiting for the trainer: a bucket's bytes for gloo, the end message for nccl, the next control
message for ipc), ``data`` (posting a receive: for nccl only the launch), ``load``
(``load_weights``), ``finish`` (ack + final sync), ``applied`` (the trainer's start() to the
weights in place on this receiver: the engine-side end of the export, against the trainer-side
``export ms``). For nccl most device time surfaces in the trainer's ``finish`` and
the receiver's ``finish``.

Exports run back to back by default: a receiver may then still be finishing the previous version's
ack when the trainer starts the next one, which shows as ``start lag``. In a job a training step
separates two exports; ``--gap_ms`` idles that long between them.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from recipe.net import free_port  # noqa: E402

MODELS = {  # Llama shapes: hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (256, 2, 4, 4, 512, 1024),
    "tiny-deep": (64, 24, 4, 4, 128, 256),  # 1.5b's 219 tensors, a few KiB each: fill-only s is host time
    "0.5b": (1024, 24, 16, 16, 2816, 32000),
    "1.5b": (2048, 24, 16, 16, 5632, 32000),
    "7b": (4096, 32, 32, 32, 11008, 32000),
}
# Columns of the phase table: the hook's ``last_phases`` and the receiver's ``stats`` keys.
PHASES = ["start", "buffer", "fill", "send", "agree", "finish"]
RECV_PHASES = ["start_delay", "first_bucket", "arrivals", "wait", "data", "load", "finish", "applied"]
DEFAULT_ROWS = [  # transport, model, bucket MiB, trainer GPUs, engine GPUs
    ("ipc", "tiny", 64, 1, 1), ("nccl", "tiny", 64, 1, 1),
    ("nccl", "1.5b", 64, 1, 1), ("nccl", "1.5b", 256, 1, 1), ("nccl", "1.5b", 1024, 1, 1),
    ("ipc", "1.5b", 256, 1, 1), ("ipc", "1.5b", 256, 2, 2), ("nccl", "7b", 512, 1, 1), ("ipc", "7b", 512, 1, 1),
]


def llama_config(name: str):
    from transformers import LlamaConfig

    h, n, heads, kv, inter, vocab = MODELS[name]
    return LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
                       intermediate_size=inter, vocab_size=vocab, tie_word_embeddings=False, use_cache=False)


def probe_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- trainer side


def trainer(rank: int, args, port: int, store_port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from recipe.rollout.trainer.hook import RolloutHook

    gpu = args.transport != "gloo"
    if gpu:
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", store_port, args.trainer_gpus, rank == 0)
    dist.init_process_group("nccl" if gpu else "gloo", store=store, rank=rank, world_size=args.trainer_gpus)
    device = torch.device("cuda", rank) if gpu else torch.device("cpu")
    from transformers import AutoModelForCausalLM

    cfg = llama_config(args.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if args.trainer_layout == "fsdp":
        mesh = init_device_mesh(device.type, (args.trainer_gpus,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg).to(device)  # to_empty left RoPE's buffer empty
    rollout = SimpleNamespace(enable=True, interval=1, transport=args.transport, engine_address="127.0.0.1",
                              engine_port=port, engine_world_size=args.engine_gpus, engine_tp_size=args.engine_gpus,
                              dtype="bfloat16", bucket_mb=args.bucket_mb, timeout_s=120.0, on_failure="raise",
                              placement="colocated" if args.transport == "ipc" else "disaggregated",
                              fused_layout=False)
    hook = RolloutHook(SimpleNamespace(rollout=rollout, comm=SimpleNamespace(train_timeout_seconds=600)))
    deadline = time.monotonic() + 300
    while rank == 0:  # the engine's rendezvous store must listen before the first export
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    if args.ramp_start is not None:
        import recipe.rollout.trainer.source

        recipe.rollout.trainer.source.RAMP_START = args.ramp_start
    source = hook._source(model)

    def sync():
        if gpu:
            torch.cuda.synchronize()
        dist.barrier()

    # fill only: the same gathers and packing into two rotating buffers, nothing sent
    slots = [None, None]
    fills = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for i, plan in enumerate(source.buckets):
            if rank == 0:
                if slots[i % 2] is None or slots[i % 2].numel() < plan.nbytes:
                    size = max(plan.nbytes, source.max_bucket_bytes)
                    slots[i % 2] = torch.empty(size, dtype=torch.uint8, device=device)
                source.fill(plan, slots[i % 2])
            else:
                source.fill(plan, None)
        sync()
        fills.append(time.perf_counter() - t0)
    del slots

    times, peaks, phases = [], [], []
    for version in range(args.repeats + 1):  # version 0 warms up (rendezvous, NCCL communicators)
        if args.gap_ms:
            time.sleep(args.gap_ms / 1e3)  # stands for the training step between two exports
        sync()
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if gpu else 0
        t0 = time.perf_counter()
        hook.export(model, version)
        sync()
        if version:
            times.append(time.perf_counter() - t0)
            peaks.append((torch.cuda.max_memory_allocated() - base) if gpu else 0)
            phases.append(dict(hook.last_phases))

    logits = None
    if args.check:
        with torch.no_grad():
            logits = model(input_ids=probe_ids(cfg.vocab_size).to(device)).logits.float().cpu()
    hook.close()
    if rank == 0:
        torch.save({"times": times, "fills": fills, "peaks": peaks, "phases": phases, "bytes": source.total_bytes,
                    "buckets": len(source.buckets), "largest": max(it.nbytes for it in source.items),
                    "params": sum(p.numel() for p in model.parameters()), "logits": logits},
                   os.path.join(out, "trainer.pt"))
    dist.destroy_process_group()


# --------------------------------------------------------------------------- engine side


def engine(rank: int, args, port: int, out: str) -> None:
    from datetime import timedelta

    from recipe.rollout.engine.reference_receiver import LlamaTPEngine
    from recipe.rollout.engine.endpoint import ReceiverEndpoint, TrainerClosed

    gpu = args.transport != "gloo"
    device = "cpu"
    if gpu:
        gpu_index = rank if args.transport == "ipc" else args.trainer_gpus + rank
        torch.cuda.set_device(gpu_index)
        device = f"cuda:{gpu_index}"
    endpoint = ReceiverEndpoint("127.0.0.1", port, 1 + rank, 1 + args.engine_gpus, backend=args.transport,
                                timeout_s=120, device=device)
    group = None
    if args.engine_gpus > 1:
        group = dist.ProcessGroupGloo(dist.PrefixStore("engine/", endpoint.store), rank, args.engine_gpus,
                                      timedelta(seconds=120))
    cfg = llama_config(args.model)
    eng = LlamaTPEngine(cfg, torch.bfloat16, rank, args.engine_gpus, group, device)
    last, stats = None, []
    while True:
        try:
            last = endpoint.receive(eng.load_weights, start=lambda v: eng.coverage.reset(),
                                    finish=lambda v: eng.coverage.check())
        except TrainerClosed:
            break
        stats.append(dict(endpoint.stats))
    if rank == 0:
        torch.save(stats[1:], os.path.join(out, "engine_stats.pt"))  # the first version is the warm-up
    if args.check and last is not None:
        logits = eng.logits(probe_ids(cfg.vocab_size)).float().cpu()
        if rank == 0:
            torch.save({"logits": logits, "version": last}, os.path.join(out, "engine.pt"))
    endpoint.close()


def _run(role, rank, args, port, store_port, out):
    import logging

    logging.basicConfig(level=logging.INFO, format=f"[{role} {rank}] %(message)s")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.transport == "gloo" and "OMP_NUM_THREADS" not in os.environ:
        # CPU runs: every process's intra-op pool on all cores oversubscribes them (on a 2-core
        # box a 1 MiB fp32->bf16 copy took 10-15 ms with 2 threads per process, 0.1 ms with 1).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (args.trainer_gpus + args.engine_gpus)))
    if role == "trainer":
        trainer(rank, args, port, store_port, out)
    else:
        engine(rank, args, port, out)


def _entry(index, args, port, store_port, out):
    if index < args.trainer_gpus:
        _run("trainer", index, args, port, store_port, out)
    else:
        _run("engine", index - args.trainer_gpus, args, port, store_port, out)


def bench(args) -> dict:
    out = tempfile.mkdtemp(prefix="bench_export_")
    n = args.trainer_gpus + args.engine_gpus
    if args.transport == "nccl" and n > torch.cuda.device_count():
        return {"skip": f"needs {n} GPUs"}
    mp.start_processes(_entry, args=(args, free_port(), free_port(), out), nprocs=n, join=True, start_method="spawn")
    res = torch.load(os.path.join(out, "trainer.pt"))
    path = os.path.join(out, "engine_stats.pt")
    res["engine_stats"] = torch.load(path) if os.path.exists(path) else []
    if args.check:
        eng = torch.load(os.path.join(out, "engine.pt"))
        diff = (eng["logits"] - res["logits"]).abs().max().item()
        scale = res["logits"].abs().max().item()
        ok = diff <= 0.02 * scale  # a bf16 engine against the fp32 trainer
        res["check"] = f"max dlogit {diff:.1e} of {scale:.1e} {'ok' if ok else 'FAIL'}"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=["nccl", "ipc", "gloo"])
    ap.add_argument("--model", choices=sorted(MODELS), default="1.5b")
    ap.add_argument("--bucket_mb", type=float, default=256)
    ap.add_argument("--trainer_gpus", type=int, default=1)
    ap.add_argument("--engine_gpus", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trainer_layout", choices=["fsdp", "plain"], default="fsdp",
                    help="fsdp: FSDP2 over the trainer ranks, as train.py (one GPU: a one-rank mesh); "
                         "plain: plain tensors, one trainer GPU only")
    ap.add_argument("--check", action="store_true", help="compare engine logits with the trainer's")
    ap.add_argument("--ramp_start", type=int, default=None,
                    help="first bucket = bucket_mb / ramp_start, growing 4x per bucket (default: the hook's, "
                         "recipe.rollout.trainer.source.RAMP_START; 1 = every bucket full size)")
    ap.add_argument("--gap_ms", type=float, default=0.0,
                    help="idle time between exports, as a training step gives in a real job (back to back, the "
                         "receivers may still be acknowledging the previous version when the next one starts)")
    args = ap.parse_args()
    if args.trainer_layout == "plain" and (args.trainer_gpus != 1 or not args.transport):
        ap.error("--trainer_layout plain needs --transport and --trainer_gpus 1")
    if args.transport:
        rows = [(args.transport, args.model, args.bucket_mb, args.trainer_gpus, args.engine_gpus)]
    else:
        rows = DEFAULT_ROWS
    print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s)"
          + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
          + f"; trainer layout {args.trainer_layout}", flush=True)
    header = ("| transport | model | params | sent GiB | buckets | bucket MiB | trainer/engine GPUs | export s "
              "| GiB/s | fill-only s | sender peak extra MiB | check |")
    lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
    print("\n".join(lines), flush=True)
    breakdown = []
    for transport, model, bucket, tg, eg in rows:
        a = argparse.Namespace(**{**vars(args), "transport": transport, "model": model, "bucket_mb": bucket,
                                  "trainer_gpus": tg, "engine_gpus": eg,
                                  "check": args.check or model == "tiny"})
        try:
            r = bench(a)
        except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
            print(e, file=sys.stderr, flush=True)
            r = {"skip": f"error: {type(e).__name__} (traceback above)"}
        if "skip" in r:
            line = f"| {transport} | {model} | | | | {bucket:g} | {tg}/{eg} | | | | | {r['skip']} |"
        else:
            t, gib = statistics.median(r["times"]), r["bytes"] / 2**30
            line = (f"| {transport} | {model} | {r['params'] / 1e9:.2f}B | {gib:.2f} | {r['buckets']} | {bucket:g} "
                    f"| {tg}/{eg} | {t:.3f} | {gib / t:.1f} | {statistics.median(r['fills']):.3f} "
                    f"| {max(r['peaks']) / 2**20:.0f} | {r.get('check', '')} |")
            spread = f"{1e3 * t:.1f} ({1e3 * min(r['times']):.1f}-{1e3 * max(r['times']):.1f})"
            breakdown.append(phase_row(f"| {transport} | {model} | {bucket:g} | {tg}/{eg} | {spread} ", r))
        print(line, flush=True)
    if breakdown:
        print("\nPhases (median ms, host time except recv arrivals; trainer = sending rank, receiver = engine rank 0):", flush=True)
        header = ("| transport | model | bucket MiB | GPUs | export ms (min-max) | " + " | ".join(PHASES) + " | "
                  + " | ".join(f"recv {c.replace('start_delay', 'start lag').replace('_', ' ')}" for c in RECV_PHASES)
                  + " |")
        print(header + "\n|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|", flush=True)
        print("\n".join(breakdown), flush=True)


def phase_row(prefix: str, r: dict) -> str:
    def med(rows: list[dict], key: str) -> str:
        vals = [row[key] for row in rows if key in row]
        return f"{1e3 * statistics.median(vals):.1f}" if vals else ""

    return (prefix + "| " + " | ".join(med(r.get("phases", []), c) for c in PHASES) + " | "
            + " | ".join(med(r.get("engine_stats", []), c) for c in RECV_PHASES) + " |")


if __name__ == "__main__":
    main()
