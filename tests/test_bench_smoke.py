"""CPU smoke tests of scripts/benchmarks/bench_train.py and scripts/tools/warm_kernels.py on tiny models.

The two subprocess runs (the benchmark, and a compile-only warm-up worker, which patches Triton
globally) start together when the module's fixture is first used; the rest runs in-process.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from recipe.net import free_port

SMOKE_BENCH = ["scripts/benchmarks/bench_train.py", "--device", "cpu", "--models", "configs/tiny/llama.json",
               "--seq-len", "64", "--batch", "2", "--steps", "3", "--warmup", "1",
               "--log-freq", "1", "--repeats", "1"]
WORKER = ["scripts/tools/warm_kernels.py", "--worker", "compile:0/1", "--model", "configs/tiny/gla.json",
          "--seq-len", "64", "--batch", "2", "--precision", "bf16", "--varlen"]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, glob.glob(os.path.join(ROOT, "scripts", "*", f"{name}.py"))[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    out_dp = tmp_path_factory.mktemp("bench_dp") / "bench.jsonl"
    out_first = tmp_path_factory.mktemp("first_step") / "first_step.jsonl"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    procs = {
        "bench": subprocess.Popen([sys.executable, *SMOKE_BENCH, "--repeats", "2", "--impls",
                                   "trainer,trainer-autocast,bare,bare-flame,bare-bf16,bare-fsdp", "--timeline",
                                   "--out", str(out)], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "bench_dp": subprocess.Popen([*torchrun, *SMOKE_BENCH, "--impls", "bare-fsdp,bare-fsdp-dp", "--out", str(out_dp)],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "worker": subprocess.Popen([sys.executable, *WORKER], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "first_step": subprocess.Popen([sys.executable, "scripts/benchmarks/bench_first_step.py", "--device", "cpu",
                                        "--cases", "tiny_gla,gla_340M_tp2", "--out", str(out_first)], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout, stderr)
    results["bench_out"], results["bench_dp_out"], results["first_step_out"] = out, out_dp, out_first
    return results


def test_bench_train_cpu_smoke(runs):
    rc, stdout, stderr = runs["bench"]
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    columns = "model | seq | batch | compile | impl | tokens/s/GPU | MFU % | peak GiB | first-step s | trainer/bare"
    assert f"| {columns} |" in stdout
    assert "device: CPU" in stdout and "command: " in stdout
    with open(runs["bench_out"]) as f:
        header, *rows = [json.loads(line) for line in f]
    assert header["header"]["device"] == "CPU" and header["header"]["torch"]
    impls = ["bare", "bare-bf16", "bare-flame", "bare-fsdp", "trainer", "trainer-autocast"]
    # Interleaved: every row once, then every row again (trainer rows last in each round, for their ratio).
    assert [r["repeat"] for r in rows] == [0] * 6 + [1] * 6
    assert sorted(r["impl"] for r in rows[:6]) == sorted(r["impl"] for r in rows[6:]) == impls
    assert {r["impl"]: r["trainer_args"] for r in rows}["trainer-autocast"] == "--parallelism.single_device_fsdp false"
    for row in rows:
        assert "error" not in row, row
        assert (row["model"], row["seq"], row["batch"], row["compile"]) == ("llama", 64, 2, False)
        assert row["tokens_per_s"] > 0 and row["first_step_s"] > 0 and row["peak_gib"] > 0
        assert len(row["windows"]) == 3  # one per timed step at --log-freq 1
        assert row["tps_p10"] <= row["tokens_per_s"] <= row["tps_p90"]
        assert row["mfu_pct"] is None  # no bf16 peak on CPU
        assert row["loss_last"] == row["loss_last"]  # not NaN
        # --timeline: every timed step but the last (no next step to end it), host columns only on CPU
        timeline = row["timeline"]
        assert len(timeline["step_host_ms"]) == 2 and all(ms > 0 for ms in timeline["step_host_ms"])
        assert timeline["step_gpu_ms"] == [None, None] and timeline["step_starved"] is None
        phases = (["forward", "backward", "clip_and_step", "train_step_end", "loop"] if row["impl"].startswith("trainer")
                  else ["forward", "backward", "clip", "optimizer", "loop"])
        assert list(timeline["phases"]) == phases
    trainer = next(r for r in rows if r["impl"] == "trainer")
    assert trainer["trainer_over_bare"] > 0
    assert trainer["alloc_retries"] == [None] * 3  # per window, from metrics.jsonl; CUDA only
    summary = stdout[stdout.index("| model | seq x batch |"):]
    assert len([line for line in summary.splitlines() if line.startswith("| llama |")]) == 6  # one summary line per impl
    assert "/bare-flame " in summary and "/bare-fsdp " in summary


def test_step_timeline_finds_where_the_gpu_waited_for_the_host():
    from scripts.benchmarks.step_timeline import StepTimeline

    class Event:  # a CUDA event the GPU reached at ``ms``
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, other):
            return other.ms - self.ms

    timeline = StepTimeline(on_gpu=True)
    # host ms at each mark, and when the GPU got there: a queue of 14-18 ms, drained while the host
    # took 20 ms between the second forward and the third step
    for name, host_ms, gpu_ms in [("step", 0, 0.1), ("forward", 10, 24.1), ("step", 20, 38.1),
                                  ("forward", 30, 48.1), ("step", 50, 50.6), ("forward", 60, 64.1)]:
        timeline.marks.append((name, host_ms / 1e3, host_ms / 2e3, Event(gpu_ms)))
    steps = timeline.steps()
    assert len(steps) == 2  # the third has no next step to end it
    assert [p["phase"] for p in steps[0]] == ["forward", "loop"]
    assert [round(p["behind_ms"], 3) for s in steps for p in s] == [14.0, 18.0, 18.0, 0.5]
    assert [p["starved"] for s in steps for p in s] == [False, False, False, True]
    assert [round(p["gpu_ms"], 3) for s in steps for p in s] == [24.0, 14.0, 10.0, 2.5]
    summary = timeline.summary()
    assert summary["step_starved"] == [0, 1] and summary["step_min_behind_ms"] == [14.0, 0.5]
    assert summary["step_host_ms"] == [20.0, 30.0] and summary["step_cpu_ms"] == [10.0, 15.0]
    assert summary["step_gpu_ms"] == [38.0, 12.5]
    assert summary["phases"]["loop"]["starved_frac"] == 0.5


def test_bench_train_summary_pools_repeats_and_pairs_ratios_by_repeat():
    bench = load_script("bench_train")

    def run(impl, repeat, windows):
        return {"model": "m", "seq": 8, "batch": 2, "compile": False, "impl": impl, "repeat": repeat,
                "mfu_pct": None, "peak_gib": 1.0, "first_step_s": 2.0, **bench.window_stats(windows)}

    rows = [run("bare", 0, [100, 100, 100]), run("trainer", 0, [110, 110, 120]),
            run("bare", 1, [200, 200, 200]), run("trainer", 1, [180, 180, 180])]
    lines = {ln["impl"]: ln for ln in bench.summarize(rows)}
    trainer = lines["trainer"]
    assert trainer["repeats"] == 2 and (trainer["repeat_min"], trainer["repeat_max"]) == (110, 180)
    assert trainer["tokens_per_s"] == 150  # median of the six pooled windows
    assert trainer["tps_p10"] == 110 and trainer["tps_p90"] == 180
    ratio, lo, hi = trainer["ratios"]["bare"]
    assert ratio == 1.0 and (lo, hi) == (0.9, 1.1)  # 180/200 and 110/100, paired by repeat
    assert lines["bare"]["ratios"] == {}
    assert bench.percentile([1, 2, 3, 4], 50) == 2.5 and bench.percentile([5], 90) == 5


def test_bench_train_bare_fsdp_dp_runs_over_two_ranks(runs):
    """bare-fsdp-dp shards over every rank (the data-parallel ceiling); bare-fsdp stays per rank."""
    rc, stdout, stderr = runs["bench_dp"]
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    with open(runs["bench_dp_out"]) as f:
        header, *rows = [json.loads(line) for line in f]
    assert header["header"]["world_size"] == 2
    assert sorted(r["impl"] for r in rows) == ["bare-fsdp", "bare-fsdp-dp"]
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["world_size"] == 2 for r in rows), rows


def test_bench_first_step_times_a_fresh_launch_and_skips_what_needs_more_gpus(runs):
    rc, stdout, stderr = runs["first_step"]
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    with open(runs["first_step_out"]) as f:
        header, tiny, tp2 = [json.loads(line) for line in f]
    assert header["header"]["device"] == "CPU"
    assert "error" not in tiny, tiny
    # From the launch: imports and model build come before the first step, so it takes longer than step 2.
    assert tiny["first_step_s"] > tiny["second_step_s"] > 0 and tiny["exit_s"] > tiny["first_step_s"]
    assert tp2["error"] == "skipped: needs 2 GPUs, 0 visible"


def test_bench_train_seq_sweep_keeps_tokens_per_batch():
    bench = load_script("bench_train")
    args = bench.parse_args(["--seq-len", "4096", "--batch", "8", "--seq-sweep", "2048,4096,32768"])
    assert args.shapes == [(2048, 16), (4096, 8), (32768, 1)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--seq-sweep", "3000"])


def test_bench_train_refuses_the_autocast_trainer_row_under_torchrun(monkeypatch, capsys):
    # single_device_fsdp only applies to one process: under torchrun the row would be FSDP again.
    bench = load_script("bench_train")
    assert bench.parse_args(["--impls", "trainer,trainer-autocast"]).impls == ["trainer", "trainer-autocast"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "trainer,trainer-autocast"])
    assert "trainer-autocast: one GPU only" in capsys.readouterr().err


def test_trainer_rows_start_from_the_models_shipped_recipe(monkeypatch):
    from recipe.config import parse_job_config

    bench = load_script("bench_train")
    monkeypatch.chdir(ROOT)
    assert bench.recipe_toml("configs/gla_340M.json") == "configs/gla_340M.toml"
    assert bench.recipe_toml("configs/gla_1B.json") is None  # no recipe shipped: the trainer's defaults
    assert bench.recipe_toml("configs/gla_340M.json", "none") is None
    jc = parse_job_config(bench.job_args("configs/gla_340M.json", 64, 2, 4, False, False, 1, "/tmp/x",
                                         config_file=bench.recipe_toml("configs/gla_340M.json")))
    assert jc.parallelism.fsdp_reshard_after_forward == "never"  # the recipe's, not torchtitan's default
    assert (jc.training.dataset, jc.model.tokenizer, jc.training.steps) == ("synthetic", "bytes", 4)
    assert not jc.checkpoint.enable
    defaults = parse_job_config(bench.job_args("configs/gla_340M.json", 64, 2, 4, False, False, 1, "/tmp/x"))
    assert defaults.parallelism.fsdp_reshard_after_forward == "default"
    # On a GPU the recipe's precision and dataloader stand (fp32 is the CPU runs' setting only).
    monkeypatch.setattr(bench, "_on_gpu", lambda: True)
    gpu = parse_job_config(bench.job_args("configs/gla_340M.json", 64, 2, 4, False, False, 1, "/tmp/x",
                                          config_file="configs/gla_340M.toml"))
    assert gpu.training.mixed_precision_param == "bfloat16" and gpu.training.dataloader.num_workers == 4
    gpu_defaults = parse_job_config(bench.job_args("configs/gla_340M.json", 64, 2, 4, False, False, 1, "/tmp/x"))
    assert gpu_defaults.training.mixed_precision_param == "bfloat16"
    assert gpu_defaults.training.dataloader.num_workers == 2 and gpu_defaults.training.dataloader.pin_memory


def test_warm_kernels_is_a_no_op_on_cpu(capsys):
    warm = load_script("warm_kernels")
    assert warm.main(["--model", "configs/tiny/gla.json", "--seq-len", "64", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "nothing to compile or tune" in out and "[compile]" not in out


def test_compile_only_worker_runs_the_passes(runs):
    rc, stdout, stderr = runs["worker"]
    assert rc == 0, stderr[-3000:]
    stats = json.loads(stdout.strip().splitlines()[-1])
    # Under the interpreter "compiling" is a no-op, but every autotuned kernel went through the
    # compile-only path (tuning key, pruning, share) and the fwd+bwd ran to the end without them.
    assert stats["compiled"] > 0 and stats["failed"] == 0 and "error" not in stats


def test_worker_shares_cover_every_config_once():
    warm = load_script("warm_kernels")
    for n_configs in (1, 3, 16, 40):
        for workers in (1, 4, 16):
            key = (64, "torch.bfloat16")
            taken = [j for i in range(workers) for j in warm.share("kernel", key, n_configs, i, workers)]
            assert sorted(taken) == list(range(n_configs))


def test_plot_bench_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="optional: pip install -e '.[plot]'")
    plot = load_script("plot_bench")
    results = tmp_path / "bench.jsonl"
    rows = [{"header": {"device": "CPU"}}] + [
        {"model": m, "seq": seq, "batch": 1, "compile": False, "impl": "trainer", "tokens_per_s": tps}
        for m, seq, tps in (("gla", 2048, 10.0), ("gla", 4096, 9.0), ("llama", 2048, 8.0), ("llama", 4096, 4.0))
    ] + [{"model": "llama", "seq": 8192, "compile": False, "impl": "trainer", "error": "OOM"}]
    results.write_text("\n".join(json.dumps(r) for r in rows))
    assert plot.main([str(results), "--out", str(tmp_path / "sweep.png")]) == 0
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(plot.series(plot.load_rows([str(results)]), "seq")) == {"gla (trainer, eager)", "llama (trainer, eager)"}


def test_plot_bench_size_sweep_joins_models_per_layout(tmp_path):
    pytest.importorskip("matplotlib", reason="optional: pip install -e '.[plot]'")
    plot = load_script("plot_bench")
    results = tmp_path / "sizes.jsonl"
    rows = [
        {"model": m, "params": n, "seq": 4096, "compile": False, "impl": "trainer", "world_size": w, "tp": tp,
         "tokens_per_s": tps, "peak_gib": gib}
        for m, n, w, tp, tps, gib in (("gla_340M", 3.4e8, 1, 1, 150.0, 32.0), ("gla_1B", 1.3e9, 1, 1, 53.0, 75.0),
                                      ("gla_340M", 3.4e8, 4, 2, 60.0, 20.0), ("gla_1B", 1.3e9, 4, 2, 38.0, 41.0))
    ]
    results.write_text("\n".join(json.dumps(r) for r in rows))
    lines = plot.series(plot.load_rows([str(results)]), "params")
    assert lines == {"1 GPU (trainer, eager)": [(3.4e8, 150.0), (1.3e9, 53.0)],
                     "FSDP=2 x TP=2 (trainer, eager)": [(3.4e8, 60.0), (1.3e9, 38.0)]}
    assert plot.series(plot.load_rows([str(results)]), "params", "peak_gib")["1 GPU (trainer, eager)"][1] == (1.3e9, 75.0)
    assert plot.main([str(results), "--x", "params", "--out", str(tmp_path / "sizes.png")]) == 0
    assert (tmp_path / "sizes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warm_kernels_tp_local_shapes_keep_head_dims():
    """--tp N warms what one tensor-parallel rank runs: heads and widths split, head dims kept."""
    from recipe.model import load_model_config

    warm = load_script("warm_kernels")
    full = load_model_config(os.path.join(ROOT, "configs/gla_340M.json"))
    local = warm.tp_local(load_model_config(os.path.join(ROOT, "configs/gla_340M.json")), 2)
    assert (local.num_heads, local.hidden_size) == (full.num_heads // 2, full.hidden_size // 2)
    head_k = lambda c: int(c.hidden_size * c.expand_k) // c.num_heads  # noqa: E731
    assert head_k(local) == head_k(full) and local.hidden_size // local.num_heads == full.hidden_size // full.num_heads
    with pytest.raises(SystemExit, match="num_heads=4 is not divisible"):
        warm.tp_local(load_model_config(os.path.join(ROOT, "configs/gla_340M.json")), 3)


def test_profile_step_cpu_smoke():
    """scripts/benchmarks/profile_step.py: the category table covers all profiled time; matmuls are found."""
    import re

    cmd = [sys.executable, "scripts/benchmarks/profile_step.py", "--model", "configs/tiny/llama.json", "--device", "cpu",
           "--seq-len", "32", "--batch", "2", "--warmup", "1", "--steps", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    shares = dict(re.findall(r"^\| ([a-z /]+) \| [\d.]+ \| ([\d.]+)% \|$", proc.stdout, re.M))
    assert "matmul" in shares and float(shares["matmul"]) > 0, proc.stdout
    assert abs(sum(map(float, shares.values())) - 100) < 0.5, shares
    assert "unprofiled step:" in proc.stdout


def test_profile_step_host_cpu_smoke():
    """profile_step.py --host: the main thread's functions by own time, the model's forward among them."""
    cmd = [sys.executable, "scripts/benchmarks/profile_step.py", "--model", "configs/tiny/llama.json", "--device", "cpu",
           "--seq-len", "32", "--batch", "2", "--warmup", "1", "--steps", "2", "--host", "--top", "200"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| function (top 200 by own time) | own ms/step | cumulative ms/step | calls/step |" in proc.stdout
    assert "modeling_llama.py" in proc.stdout and "clip_grad_norm_" in proc.stdout  # forward and the local clip


@pytest.mark.parametrize("ranks,layouts", [
    (1, ["plain", "fsdp per block", "fsdp one unit", "fsdp one unit, local clip + step"]),
    (2, ["fsdp per block", "fsdp per block, local clip + step"]),
])
def test_bench_fsdp_host_runs_every_layout(ranks, layouts):
    cmd = [sys.executable, "scripts/benchmarks/bench_fsdp_host.py", "--blocks", "2", "--tensors-per-block", "2",
           "--warmup", "1", "--steps", "2", "--repeats", "1", "--ranks", str(ranks)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [line.split(" | ")[0].strip("| ") for line in proc.stdout.splitlines() if line.startswith("| ") and " | 6 | " in line]
    assert rows == layouts, proc.stdout
