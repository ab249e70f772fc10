"""Check flare's rollout export against a real vLLM: train with the hook, compare the engine after
every exported version.

This process is the engine: it starts ``vllm.LLM`` on the model config (random weights:
``load_format="dummy"``; the first version overwrites all of them) with flare's worker extension,
then for each transport in ``--transports`` runs ``train.py`` with the ``rollout`` hook (colocated
on the same GPU) and the ``ExportSnapshot`` hook, and after each applied version compares, on fixed
prompts:

* **weights**: every engine parameter (vLLM's fused ``qkv_proj``/``gate_up_proj`` split back into
  HF names) against what the trainer sent, bit for bit;
* **greedy tokens**: vLLM's against transformers' on the trainer's weights (a divergence counts
  as a near tie when transformers' log-probability margin there is below ``--tie_margin``);
* **log-probability gap**: vLLM's log-probabilities of its own samples (temperature 1) against
  transformers' on the same tokens: max and mean over all sampled tokens.

With ``--sleep`` the engine runs with ``enable_sleep_mode`` and sleeps (level 1) between versions,
waking its weights before each receive; it also checks that a receive into sleeping weights is
refused. The engine's loop ends when the trainer closes the connection at the end of training.
The first transport's trainer starts together with the engine, so that its cold Triton autotuning
(minutes for a model on fla's kernels) runs beside the engine's start and kernel warm-up; its first
export waits up to ``--engine_wait_s`` for the engine to listen.
``--timing_steps N`` adds a run that exports at every step (no comparisons) and reports the
hook's share of a step and the export bandwidth.

Prints one table, writes everything as JSON (``--out``), exits 1 when a check fails.

    python scripts/tools/check_vllm.py --model_config configs/llama_360M.json --transports ipc,gloo \\
        --steps 30 --interval 3 --sleep --out check_vllm.json

The trainer runs with this interpreter and environment; ``--trainer_pythonpath`` replaces its
PYTHONPATH (when vLLM and flare's trainer live in different site folders). ``nccl`` needs the
trainer on another GPU than the engine (disaggregated): start this script with
``CUDA_VISIBLE_DEVICES`` naming the engine's GPU and pass ``--trainer_devices`` for the trainer's
(e.g. ``CUDA_VISIBLE_DEVICES=1 python scripts/tools/check_vllm.py --transports nccl --trainer_devices 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTENSION = "recipe.rollout.engine.vllm_extension.FlareWorkerExtension"
BOS = 256  # flare's byte tokenizer: id == byte value, then <|bos|>, <|eos|>, <|pad|>
PROMPTS = [
    "The history of the river valley begins with",
    "To compute the area of a circle, multiply ",
    "In the morning the market opened and the ",
    "Researchers measured the speed of sound in",
]
PROMPT_BYTES = 40  # every prompt the same length: the references run as one batch
EXPORT_LINE = re.compile(r"rollout: exported version (\d+) \((\d+) tensors, ([\d.]+) MiB in (\d+) bucket\(s\)\) in "
                         r"([\d.]+)s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt_ids() -> list[list[int]]:
    return [[BOS, *p.encode()[:PROMPT_BYTES].ljust(PROMPT_BYTES, b" ")] for p in PROMPTS]


# ---------------------------------------------------------------- engine side (runs in the worker)


# Parameters vLLM's loaders stack from several HF weights outside packed_modules_mapping, by the
# class of the module holding them: {class: {parameter module: (HF modules, their rows)}}.
# OLMo-Hybrid: one conv1d from q_conv1d/k_conv1d/v_conv1d (layers/mamba/gdn/olmo_gdn_linear_attn.py).
LOADER_STACKED = {
    "OlmoHybridGatedDeltaNetAttention": {
        "conv1d": (("q_conv1d", "k_conv1d", "v_conv1d"), lambda m: [m.key_dim, m.key_dim, m.value_dim]),
    },
}


def engine_weights(worker) -> dict:
    """The worker's parameters under HF names: vLLM's packed modules (``packed_modules_mapping``,
    e.g. qkv_proj = q/k/v, gate_up_proj = gate/up) split by their ``output_sizes``, and the
    parameters of LOADER_STACKED split by their rows. TP=1 only."""
    model = worker.model_runner.model
    unwrap = getattr(model, "unwrap", None)
    model = unwrap() if callable(unwrap) else model
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    modules = dict(model.named_modules())
    out = {}
    for name, p in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        parent, _, last = module_name.rpartition(".")
        sizes = getattr(modules.get(module_name), "output_sizes", None)
        stacked = LOADER_STACKED.get(type(modules.get(parent)).__name__, {}).get(last)
        if stacked:
            subs, rows = stacked[0], stacked[1](modules[parent])
            for sub, piece in zip(subs, p.detach().split(rows, dim=0)):
                out[f"{parent}.{sub}.{leaf}"] = piece
        elif last in packed and sizes and len(packed[last]) == len(sizes) and sum(sizes) == p.shape[0]:
            for sub, piece in zip(packed[last], p.detach().split(list(sizes), dim=0)):
                out[f"{parent}.{sub}.{leaf}"] = piece
        else:
            out[name] = p.detach()
    return out


# Weights vLLM's loaders store transformed: HF name suffix -> (engine suffix, the same transform of
# what was sent). Mamba2: vLLM keeps A = -exp(A_log) in fp32 (layers/mamba/mamba_mixer2.py).
ENGINE_FORMS = {".A_log": (".A", lambda t: -t.float().exp())}


def as_engine_holds(name: str, sent, engine: dict):
    """(engine name, what the engine should hold) for a sent tensor; (None, None) if it has none."""
    if name in engine:
        return name, sent
    for suffix, (engine_suffix, transform) in ENGINE_FORMS.items():
        if name.endswith(suffix) and name[:-len(suffix)] + engine_suffix in engine:
            return name[:-len(suffix)] + engine_suffix, transform(sent)
    return None, None


def engine_memory(worker) -> dict:
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "device_used": total - free}


# ---------------------------------------------------------------- checks


class Reference:
    """transformers' model for the config (flare's class where it holds transformers' weights under
    the checkpoint names, as OLMo-Hybrid: recipe/olmo_hybrid.py), loaded with the trainer's
    exported weights."""

    def __init__(self, hf_dir: str):
        import torch
        import transformers

        from recipe.model import build_model

        config = transformers.AutoConfig.from_pretrained(hf_dir)
        self.model = build_model(config, dtype=torch.bfloat16).cuda().eval()

    def load(self, tensors: dict) -> None:
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        missing = [m for m in missing if not m.startswith("lm_head.")]  # tied models: the engine ties it too
        if missing or unexpected:
            raise RuntimeError(f"the snapshot does not fit transformers' model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")

    def log_probs(self, ids):
        import torch

        # autocast: fla models keep the residual stream in fp32 (residual_in_fp32) and feed it to
        # bf16 weights; the trainer's mixed precision casts it, a bare bf16 model would not
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return self.model(input_ids=ids).logits.float().log_softmax(-1)

    def greedy(self, prompts, n: int):
        import torch

        ids = torch.tensor(prompts, device="cuda")
        tokens, step_lp = [], []
        for _ in range(n):
            lp = self.log_probs(ids)[:, -1]
            nxt = lp.argmax(-1)
            tokens.append(nxt)
            step_lp.append(lp)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return torch.stack(tokens, 1).tolist(), torch.stack(step_lp, 1)  # [B, n], [B, n, V]


def compare_version(llm, ref: Reference, snapshot_path: str, args) -> dict:
    import torch
    from safetensors.torch import load_file

    sent = load_file(snapshot_path, device="cuda")
    engine = llm.collective_rpc(engine_weights)[0]
    pairs, missing, transformed = {}, [], 0
    for name, tensor in sent.items():
        engine_name, expected = as_engine_holds(name, tensor, engine)
        if engine_name is None:
            missing.append(name)
            continue
        held = engine[engine_name]
        transformed += engine_name != name
        pairs[name] = (held.reshape(expected.shape) if held.numel() == expected.numel() else held, expected,
                       engine_name == name)
    def same(held, expected, as_sent):
        if held.shape != expected.shape:
            return False
        if as_sent:
            return torch.equal(held, expected)
        # a value vLLM's loader computed, maybe on another device (gloo: the CPU): 1e-6 relative
        return torch.allclose(held, expected, rtol=1e-6, atol=0)

    differ = sorted(n for n, pair in pairs.items() if not same(*pair))
    engine_names = {as_engine_holds(n, t, engine)[0] for n, t in sent.items()}
    never_sent = sorted(set(engine) - engine_names - {"lm_head.weight"})
    result = {"tensors_sent": len(sent), "engine_tensors": len(engine), "missing_in_engine": sorted(missing)[:5],
              "transformed_by_engine": transformed, "not_bit_exact": differ[:5], "n_not_bit_exact": len(differ),
              "never_sent": never_sent[:5]}
    if differ:
        result["max_abs_diff"] = max((float((pairs[n][0].float() - pairs[n][1].float()).abs().max())
                                      for n in differ if pairs[n][0].shape == pairs[n][1].shape), default=None)
    ref.load(sent)
    del sent, engine
    result.update(generate_and_score(llm, ref, args))
    result["ok"] = (not missing and not differ and result["greedy_ok"]
                    and result["logprob_gap_max"] <= args.max_gap and result["logprob_gap_mean"] <= args.mean_gap)
    return result


def generate_and_score(llm, ref: Reference, args) -> dict:
    """Greedy tokens of the engine against the reference's, and the log-probability gap of the
    engine's samples (temperature 1) under the reference."""
    import torch
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    result = {}
    prompts = prompt_ids()
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
    engine_tokens = [list(o.outputs[0].token_ids) for o in outs]
    ref_tokens, ref_lp = ref.greedy(prompts, args.new_tokens)
    greedy_rows = []
    for b, (e, r) in enumerate(zip(engine_tokens, ref_tokens)):
        k = next((i for i, (x, y) in enumerate(zip(e, r)) if x != y), None)
        row = {"prompt": b, "equal": k is None}
        if k is not None:
            margin = float(ref_lp[b, k, r[k]] - ref_lp[b, k, e[k]])
            row.update(first_difference=k, margin=margin, near_tie=margin < args.tie_margin)
        greedy_rows.append(row)
    result["greedy"] = greedy_rows
    result["greedy_equal"] = sum(r["equal"] for r in greedy_rows)
    result["greedy_ok"] = all(r["equal"] or r["near_tie"] for r in greedy_rows)

    sample = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.new_tokens, ignore_eos=True,
                            logprobs=0, detokenize=False, seed=1234)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sample, use_tqdm=False)
    seqs, engine_lp = [], []
    for p, o in zip(prompts, outs):
        for c in o.outputs:
            seqs.append(p + list(c.token_ids))
            engine_lp.append([lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
    ids = torch.tensor(seqs, device="cuda")
    lp = ref.log_probs(ids)[:, len(prompts[0]) - 1:-1]
    ref_lp_tokens = lp.gather(-1, ids[:, len(prompts[0]):, None])[..., 0]
    gap = (torch.tensor(engine_lp, device="cuda") - ref_lp_tokens).abs()
    result["logprob_gap_max"] = float(gap.max())
    result["logprob_gap_mean"] = float(gap.mean())
    result["logprob_tokens"] = gap.numel()
    return result


# ---------------------------------------------------------------- trainer


def trainer_command(args, transport: str, port: int, steps: int, interval: int, dump: str, snapshot: bool,
                    timeout_s: float) -> list:
    hooks = "rollout,recipe.rollout.trainer.snapshot:ExportSnapshot" if snapshot else "rollout"
    return [sys.executable, "train.py", "--model.config", args.model_config, "--model.tokenizer", "bytes",
            "--training.dataset", "synthetic", "--training.steps", str(steps),
            "--training.local_batch_size", str(args.batch), "--training.seq_len", str(args.seq_len),
            "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--job.dump_folder", dump,
            "--hooks.post_step", hooks, "--rollout.enable", "--rollout.transport", transport,
            "--rollout.placement", "disaggregated" if transport == "nccl" else "colocated",
            "--rollout.interval", str(interval),
            "--rollout.engine_port", str(port), "--rollout.timeout_s", str(timeout_s),
            "--comm.train_timeout_seconds", str(int(timeout_s) + 60),  # must exceed rollout.timeout_s
            "--rollout.on_failure", "raise", *args.trainer_args]


def start_trainer(args, cmd: list, log_path: str, snapshot_dir: str | None):
    env = dict(os.environ)
    if args.trainer_pythonpath is not None:
        env["PYTHONPATH"] = args.trainer_pythonpath
    if args.trainer_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = args.trainer_devices
    if snapshot_dir:
        env["FLARE_SNAPSHOT_DIR"] = snapshot_dir
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log


def export_times(log_path: str) -> list[dict]:
    rows = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = EXPORT_LINE.search(line)
            if m:
                rows.append({"version": int(m[1]), "tensors": int(m[2]), "mib": float(m[3]), "seconds": float(m[5])})
    return rows


def step_walls(dump: str) -> list[float]:
    """Wall time between consecutive logged steps (training step, hooks and logging)."""
    times = []
    with open(os.path.join(dump, "metrics.jsonl")) as f:
        for line in f:
            try:
                times.append(json.loads(line)["time"])
            except (ValueError, KeyError):
                continue
    return [b - a for a, b in zip(times, times[1:])]


def tail(path: str, n: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


class Sleep:
    """The engine's sleep state by memory tag, so that only what sleeps is woken (waking an
    allocation that is awake maps it twice)."""

    def __init__(self, llm, enabled: bool):
        self.llm, self.enabled, self.asleep = llm, enabled, set()

    def sleep(self) -> None:
        if self.enabled and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake(self, *tags: str) -> None:
        tags = [t for t in (tags or ("weights", "kv_cache")) if t in self.asleep]
        if tags:
            self.llm.wake_up(tags=tags)
            self.asleep -= set(tags)


def launch_trainer(args, transport: str, work: str, timeout_s: float) -> dict:
    """Start train.py for one transport on a port of its own (the engine listens there later)."""
    port = free_port()
    dump = os.path.join(work, f"train_{transport}")
    snapshots = os.path.join(work, f"snapshots_{transport}")
    os.makedirs(snapshots, exist_ok=True)
    log_path = os.path.join(work, f"trainer_{transport}.log")
    cmd = trainer_command(args, transport, port, args.steps, args.interval, dump, True, timeout_s)
    trainer, log = start_trainer(args, cmd, log_path, snapshots)
    return {"transport": transport, "port": port, "trainer": trainer, "log": log, "log_path": log_path,
            "snapshots": snapshots, "t_start": time.time()}


def run_transport(llm, ref, args, launched: dict) -> dict:
    transport, port, trainer, log = launched["transport"], launched["port"], launched["trainer"], launched["log"]
    log_path, snapshots = launched["log_path"], launched["snapshots"]
    res: dict = {"transport": transport, "steps": args.steps, "interval": args.interval, "versions": []}
    llm.collective_rpc("flare_connect", args=("127.0.0.1", port, transport, float(args.timeout_s)))
    sleep = Sleep(llm, args.sleep)
    if args.sleep:
        sleep.sleep()
        try:
            llm.collective_rpc("flare_receive", args=(0.0,))
            res["refused_while_asleep"] = False
        except Exception as e:  # noqa: BLE001 - the refusal is what we want to see
            res["refused_while_asleep"] = "asleep" in str(e)
            res["refusal"] = str(e).strip().splitlines()[-1][:300]
    memory = []
    t_start = launched["t_start"]
    try:
        while True:
            sleep.wake("weights")  # a receive into sleeping weights is refused
            got = llm.collective_rpc("flare_receive", args=(5.0,))[0]
            if got["status"] == "closed":
                res["ended_by_itself"] = True
                break
            if got["status"] == "timeout":
                if trainer.poll() is not None:
                    res["ended_by_itself"] = False  # the trainer exited without closing
                    break
                if time.time() - t_start > args.deadline_s:
                    raise TimeoutError(f"{transport}: no end of training within {args.deadline_s}s")
                continue
            version = got["version"]
            sleep.wake("kv_cache")
            llm.reset_prefix_cache()  # cached KV blocks came from the old weights
            memory.append(llm.collective_rpc(engine_memory)[0])
            done = os.path.join(snapshots, f"v{version}.done")
            deadline = time.time() + 120
            while not os.path.exists(done) and trainer.poll() is None and time.time() < deadline:
                time.sleep(0.05)
            row = {"version": version}
            if os.path.exists(done):
                row.update(compare_version(llm, ref, os.path.join(snapshots, f"v{version}.safetensors"), args))
                os.remove(os.path.join(snapshots, f"v{version}.safetensors"))
            else:
                row.update(ok=False, error="the trainer wrote no snapshot of this version")
            res["versions"].append(row)
            print(f"[check] {transport} version {version}: ok={row['ok']} "
                  f"bit-exact {row.get('tensors_sent', 0) - row.get('n_not_bit_exact', 0)}/{row.get('tensors_sent', 0)} "
                  f"greedy {row.get('greedy_equal')}/{len(PROMPTS)} gap max {row.get('logprob_gap_max', float('nan')):.4f} "
                  f"mean {row.get('logprob_gap_mean', float('nan')):.4f}", flush=True)
            sleep.sleep()
        res["trainer_exit"] = trainer.wait(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        log.close()
        sleep.wake()
        llm.collective_rpc("flare_close")
    res["trainer_log_tail"] = tail(log_path) if res.get("trainer_exit") != 0 else ""
    res["exports"] = export_times(log_path)  # the trainer's own timing of each export, as logged
    expected = list(range(args.interval, args.steps + 1, args.interval))
    res["expected_versions"] = expected
    res["applied_versions"] = [v["version"] for v in res["versions"]]
    if memory:
        allocated = [m["allocated"] for m in memory]
        res["engine_memory_mib"] = {"first": allocated[0] / 2**20, "last": allocated[-1] / 2**20,
                                    "drift": (max(allocated) - min(allocated)) / 2**20, "versions": len(memory)}
    res["ok"] = (res.get("ended_by_itself") is True and res.get("trainer_exit") == 0
                 and res["applied_versions"] == expected and all(v["ok"] for v in res["versions"])
                 and (not args.sleep or res.get("refused_while_asleep") is True)
                 and (not memory or res["engine_memory_mib"]["drift"] <= args.max_memory_drift_mib))
    return res


def run_timing(llm, args, transport: str, work: str) -> dict:
    """Export at every step, no comparisons: the hook's share of a step and the export bandwidth."""
    port = free_port()
    llm.collective_rpc("flare_connect", args=("127.0.0.1", port, transport, float(args.timeout_s)))
    dump = os.path.join(work, f"timing_{transport}")
    log_path = os.path.join(work, f"timing_{transport}.log")
    cmd = trainer_command(args, transport, port, args.timing_steps, 1, dump, False, args.timeout_s)
    trainer, log = start_trainer(args, cmd, log_path, None)
    try:
        while llm.collective_rpc("flare_receive", args=(5.0,))[0]["status"] != "closed":
            if trainer.poll() is not None:
                break
        exit_code = trainer.wait(timeout=300)
    finally:
        if trainer.poll() is None:
            trainer.kill()
        log.close()
        llm.collective_rpc("flare_close")
    exports = export_times(log_path)[3:]  # the first exports map buffers and warm up
    walls = step_walls(dump)[3:]
    res = {"transport": transport, "steps": args.timing_steps, "trainer_exit": exit_code,
           "ok": exit_code == 0 and bool(exports) and bool(walls)}
    if not res["ok"]:
        res["trainer_log_tail"] = tail(log_path)
        return res
    export_s = [e["seconds"] for e in exports]
    res.update(mib=exports[0]["mib"], tensors=exports[0]["tensors"], export_ms_median=1e3 * statistics.median(export_s),
               export_ms_p10_p90=[1e3 * q for q in quantiles(export_s)],
               gib_s_median=exports[0]["mib"] / 1024 / statistics.median(export_s),
               step_wall_s_median=statistics.median(walls),
               hook_share_median=statistics.median(export_s) / statistics.median(walls))
    return res


def quantiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=10) if len(xs) > 1 else [xs[0]] * 9
    return [q[0], q[-1]]


# ---------------------------------------------------------------- main


def hf_dir_for(config_path: str, work: str) -> str:
    """A folder vLLM can start from: config.json as flare's HF export writes it (fla-only settings
    under transformers' names too, e.g. Mamba2's num_heads), for the byte tokenizer's vocabulary
    and token ids; no weights."""
    with open(config_path) as f:
        config = json.load(f)
    heads = config.get("num_attention_heads")  # none: no softmax attention (Mamba2's head_dim is its SSM's)
    head_dim = heads and (config.get("head_dim") or config.get("hidden_size", 0) // heads)
    if heads and head_dim < 32:
        raise SystemExit(f"check_vllm: {config_path}: head size {head_dim} < 32, which vLLM's Triton attention "
                         "cannot serve; use a config with head_dim >= 32 (e.g. configs/llama_360M.json)")
    import torch

    from recipe import hf_io

    try:
        spec = hf_io.model_spec(hf_io.load_config(config_path, "--model_config", hf_io.load_tokenizer("bytes")))
    except hf_io.ConversionError as e:
        raise SystemExit(f"check_vllm: {e}") from None
    path = os.path.join(work, "engine_model")
    os.makedirs(path, exist_ok=True)
    hf_io.write_hf_config(spec, path, torch.bfloat16)
    return path


def print_table(report: dict) -> None:
    print(f"\nvLLM {report['vllm']} | torch {report['torch']} | {report['gpu']} | {report['model_config']} "
          f"({report['n_params'] / 1e6:.0f}M params) | engine start {report['engine_start_s']} s, kernel warm-up "
          f"{report.get('warmup_s', float('nan'))} s")
    print("| transport | versions | weights bit-exact | greedy equal | logprob gap max / mean | "
          "export MiB, ms fastest | engine mem drift MiB | loop ended | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        vs = r["versions"]
        exact = sum(v.get("tensors_sent", 0) - v.get("n_not_bit_exact", 0) for v in vs)
        total = sum(v.get("tensors_sent", 0) for v in vs)
        greedy = sum(v.get("greedy_equal", 0) for v in vs)
        gmax = max((v.get("logprob_gap_max", float("nan")) for v in vs), default=float("nan"))
        gmean = statistics.mean(v.get("logprob_gap_mean", float("nan")) for v in vs) if vs else float("nan")
        drift = r.get("engine_memory_mib", {}).get("drift", float("nan"))
        exports = r.get("exports") or [{"mib": float("nan"), "seconds": float("nan")}]
        export = f"{exports[0]['mib']:.0f}, {1e3 * min(e['seconds'] for e in exports):.0f}"
        print(f"| {r['transport']} | {len(r['applied_versions'])}/{len(r['expected_versions'])} | {exact}/{total} | "
              f"{greedy}/{len(PROMPTS) * len(vs)} | {gmax:.3f} / {gmean:.4f} | {export} | {drift:.1f} | "
              f"{r.get('ended_by_itself')} | {r['ok']} |")
    print("(an export's time, as the trainer logs it, includes waiting for the engine to finish comparing "
          "the previous version or, for the first, to start: the fastest is the transfer; --timing_steps "
          "measures exports without comparisons)")
    for t in report.get("timing", []):
        if t["ok"]:
            print(f"timing ({t['transport']}, export every step, {t['steps']} steps): {t['mib']:.0f} MiB in "
                  f"{t['export_ms_median']:.1f} ms median (p10-p90 {t['export_ms_p10_p90'][0]:.1f}-"
                  f"{t['export_ms_p10_p90'][1]:.1f}), {t['gib_s_median']:.1f} GiB/s; hook = "
                  f"{100 * t['hook_share_median']:.1f}% of a {t['step_wall_s_median'] * 1e3:.0f} ms step")
        else:
            print(f"timing ({t['transport']}): FAILED (trainer exit {t['trainer_exit']})")
    print(f"check: {'PASSED' if report['ok'] else 'FAILED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_config", default="configs/llama_360M.json")
    ap.add_argument("--transports", default="ipc,gloo",
                    help="comma-separated: ipc, gloo (colocated on this GPU), nccl (needs --trainer_devices)")
    ap.add_argument("--trainer_devices", default=None, help="CUDA_VISIBLE_DEVICES of the trainer (default: this "
                    "process's)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq_len", type=int, default=1024)
    ap.add_argument("--timing_steps", type=int, default=0, help="also run this many steps exporting at every step")
    ap.add_argument("--timing_transport", default="ipc")
    ap.add_argument("--sleep", action="store_true", help="enable_sleep_mode; sleep (level 1) between versions")
    ap.add_argument("--gpu_memory_utilization", type=float, default=0.3)
    ap.add_argument("--max_model_len", type=int, default=512)
    ap.add_argument("--attention_backend", default="TRITON_ATTN", help="vLLM attention backend, or 'auto'")
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4, help="sampled completions per prompt for the logprob gap")
    ap.add_argument("--tie_margin", type=float, default=0.1, help="greedy divergence below this margin is a near tie")
    ap.add_argument("--max_gap", type=float, default=0.5, help="tolerance: max per-token logprob gap (nats)")
    ap.add_argument("--mean_gap", type=float, default=0.05, help="tolerance: mean per-token logprob gap (nats)")
    ap.add_argument("--max_memory_drift_mib", type=float, default=64.0)
    ap.add_argument("--timeout_s", type=float, default=60.0, help="rollout.timeout_s of the trainer")
    ap.add_argument("--engine_wait_s", type=float, default=600.0,
                    help="how long the first trainer, started with the engine, waits for it to listen")
    ap.add_argument("--deadline_s", type=float, default=900.0, help="give up on a transport after this long")
    ap.add_argument("--trainer_pythonpath", default=None)
    ap.add_argument("--work", default="/tmp/flare_check_vllm")
    ap.add_argument("--out", default=None)
    ap.add_argument("trainer_args", nargs=argparse.REMAINDER, help="after --: extra train.py arguments")
    args = ap.parse_args()
    args.trainer_args = [a for a in args.trainer_args if a != "--"]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process: tensors cross as is
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(args.work, exist_ok=True)
    if "nccl" in args.transports.split(",") and args.trainer_devices is None:
        raise SystemExit("check_vllm: --transports nccl puts the trainer on another GPU than the engine: pass "
                         "--trainer_devices (and CUDA_VISIBLE_DEVICES for the engine)")
    hf_dir = hf_dir_for(os.path.join(ROOT, args.model_config), args.work)

    import torch
    import vllm
    from vllm import LLM

    kwargs = dict(model=hf_dir, load_format="dummy", dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
                  gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len, seed=0,
                  worker_extension_cls=EXTENSION, enable_sleep_mode=args.sleep)
    if args.attention_backend != "auto":
        kwargs["attention_config"] = {"backend": args.attention_backend}
    transports = [t for t in args.transports.split(",") if t]
    # The first trainer starts with the engine: its cold kernel autotuning (minutes for a model on
    # fla's kernels) overlaps the engine's start and warm-up; its first export waits for the engine.
    first = launch_trainer(args, transports[0], args.work, max(args.timeout_s, args.engine_wait_s))
    try:
        t0 = time.time()
        llm = LLM(**kwargs)
        report = {"vllm": vllm.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name(),
                  "model_config": args.model_config, "engine_start_s": round(time.time() - t0, 1),
                  "args": {k: v for k, v in vars(args).items()}, "runs": [], "timing": []}
        ref = Reference(hf_dir)
        report["n_params"] = sum(p.numel() for p in ref.model.parameters())
        # Compile the engine's and the reference's kernels for the comparison's shapes now (on the
        # dummy weights): compiled during the first comparison (OLMo-Hybrid's GatedDeltaNet kernels
        # in vLLM: ~80 s on an H200), they held the engine past the trainer's rollout.timeout_s.
        t0 = time.time()
        generate_and_score(llm, ref, args)
        report["warmup_s"] = round(time.time() - t0, 1)
    except BaseException:
        first["trainer"].kill()  # it would wait --engine_wait_s for an engine that never comes
        first["log"].close()
        raise
    for i, transport in enumerate(transports):
        launched = first if i == 0 else launch_trainer(args, transport, args.work, args.timeout_s)
        report["runs"].append(run_transport(llm, ref, args, launched))
    if args.timing_steps:
        report["timing"].append(run_timing(llm, args, args.timing_transport, args.work))
    report["ok"] = all(r["ok"] for r in report["runs"]) and all(t["ok"] for t in report["timing"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print_table(report)
    for r in report["runs"] + report["timing"]:
        if r.get("trainer_log_tail"):
            print(f"--- trainer log ({r['transport']}), last lines:\n{r['trainer_log_tail']}")
    sys.stdout.flush()
    os._exit(0 if report["ok"] else 1)  # vLLM leaves threads behind; do not wait for them


if __name__ == "__main__":
    sys.exit(main())
