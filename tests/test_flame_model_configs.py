"""flame's model configs (tests/data/flame_configs: fla-org/flame's configs/ folder), shrunk alike,
through flare's model path in one process: each builds and trains 2 steps, or is refused in one
line naming the model type and the fix.

Shrinking keeps every key and setting of the file and only changes sizes: hidden 128, 2 layers,
vocabulary 512, 2 heads (kv heads in the same ratio, at least 1), and smaller head/state/slot/low-rank sizes;
hybrid attention layers keep the indices below 2. Configs that shrink to the same model (flame's
340M and 1B of a family often do) are trained once. fla's softmax attention runs with the exact
SDPA stand-in for flash-attn (tests/sdpa_flash_attn.py), after checking that without flash-attn
the model is refused in one line.
"""

import contextlib
import re
import glob
import json
import math
import os

import pytest
import torch

from recipe.device import configure_device

configure_device()  # before fla/triton

import fla.layers.attn  # noqa: E402
import sdpa_flash_attn  # noqa: E402  (tests/)

from parallelisms.tp_plans import find_tp_plan, get_tp_plan  # noqa: E402
from recipe import flops  # noqa: E402
from recipe.errors import ConfigError, UserError  # noqa: E402
from recipe.model import (  # noqa: E402
    build_model_on_meta,
    check_model_config,
    disable_unsupported_fused_kernels,
    init_weights,
    load_model_config,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "flame_configs")
FLAME_CONFIGS = sorted(os.path.basename(p)[: -len(".json")] for p in glob.glob(f"{DATA}/*.json"))
VOCAB, SEQ = 512, 16  # small: fla's Triton kernels run interpreted on CPU

# Configs that do not train, and the one-line error they stop with.
REFUSED = {
    "sba_340m": (UserError, r"^model\.config: model_type 'sba' in '.*' is flame's own model \(custom_models/sba "
                            r"in fla-org/flame\), not part of fla; .*experimental\.custom_import, "
                            r"or use fla's .*'stickbreaking_attn'"),
}
SMALLER = {"head_dim": 32, "time_step_rank": 8, "state_size": 16, "num_slots": 16, "expand_ratio": 32,
           "chunk_size": 16}


def _fewer_heads(spec: dict) -> dict:
    spec = dict(spec)
    heads = spec["num_heads"]
    spec["num_heads"] = 2
    if spec.get("num_kv_heads"):
        spec["num_kv_heads"] = max(1, spec["num_kv_heads"] * 2 // heads)
    return spec


def shrink(values: dict) -> dict:
    values = {**values, "hidden_size": 128, "num_hidden_layers": 2, "vocab_size": VOCAB}
    if values.get("num_heads"):
        values = _fewer_heads(values)
    if values.get("intermediate_size"):
        values["intermediate_size"] = 256
    values.update({k: min(values[k], n) for k, n in SMALLER.items() if k in values})
    if values.get("attn"):
        attn = _fewer_heads(values["attn"])
        attn["layers"] = [i for i in attn["layers"] if i < values["num_hidden_layers"]]
        values["attn"] = attn
    return values


def shrunk_file(name: str, tmp_path) -> str:
    with open(f"{DATA}/{name}.json") as f:
        values = shrink(json.load(f))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(values, sort_keys=True))
    return str(path)


def uses_softmax_attention(config) -> bool:
    return config.model_type == "transformer" or bool(getattr(config, "attn", None))


def train_two_steps(config) -> dict:
    """Build as the trainer does (meta, materialize, the model's own init) and take 2 AdamW steps
    on one repeated batch; fp32 as flare's CPU jobs."""
    torch.manual_seed(0)
    model = build_model_on_meta(config)
    model.to_empty(device="cpu")
    init_weights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, config.vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    losses, grads = [], None
    for _ in range(2):
        optimizer.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
        if grads is None:
            grads = {n: p.grad for n, p in model.named_parameters()}
        optimizer.step()
    return {"losses": losses, "grads": grads, "class": type(model).__module__}


_TRAINED: dict[str, dict] = {}  # canonical shrunk config -> result (identical models train once)


@pytest.mark.parametrize("name", FLAME_CONFIGS)
def test_flame_config_trains_two_steps_or_is_refused(name, tmp_path):
    path = shrunk_file(name, tmp_path)
    if name in REFUSED:
        error, message = REFUSED[name]
        with pytest.raises(error, match=message) as info:
            load_model_config(path)
        assert "\n" not in str(info.value)
        return
    config = load_model_config(path)
    if uses_softmax_attention(config) and fla.layers.attn.flash_attn_func is None:
        with pytest.raises(ConfigError, match=rf"^model\.config: model_type '{config.model_type}' runs its softmax "
                                              r"attention with flash-attn, .*pip install flash-attn"):
            check_model_config(config)
        with pytest.raises(ConfigError, match=rf"^model\.config: model_type '{config.model_type}' cannot be built: "
                                              r".*flash-attn.*\(flash-attn runs on CUDA only: .*\)$"):
            build_model_on_meta(config)  # the build's own refusal, for layers check_model_config does not know
    with sdpa_flash_attn.installed() if uses_softmax_attention(config) else contextlib.nullcontext():
        check_model_config(config)
        disable_unsupported_fused_kernels(config, "cpu")
        key = json.dumps(config.to_dict(), sort_keys=True, default=str)
        if key not in _TRAINED:
            _TRAINED[key] = train_two_steps(config)
    result = _TRAINED[key]
    assert result["class"].startswith("fla.models."), result["class"]
    first, second = result["losses"]
    assert abs(first - math.log(VOCAB)) < 0.5, first  # untrained: about uniform
    assert second < first, result["losses"]  # the same batch again, after one step
    assert all(g is not None and torch.isfinite(g).all() for g in result["grads"].values())
    # Every family flame ships has an honest FLOPs formula and either a TP plan or a one-line refusal.
    assert config.model_type in flops.MIXER_FLOPS
    if find_tp_plan(config.model_type) is None:
        refusal = (rf"^parallelism\.tensor_parallel_degree: model_type '{config.model_type}' has no tensor "
                   r"parallelism \(.*\); set parallelism\.tensor_parallel_degree=1 \(FSDP, HSDP and DDP train it\)$")
        with pytest.raises(ConfigError, match=refusal):
            get_tp_plan(config.model_type)


def test_flame_mamba_time_step_keys_are_read_as_fla_dt_keys(tmp_path):
    """flame's mamba configs name the dt settings time_step_*; fla 0.6's MambaConfig reads dt_* and
    would ignore them (dt_rank would become hidden/16 = 64 instead of flame's 128 at 340M)."""
    config = load_model_config(f"{DATA}/mamba_340M.json")
    assert (config.dt_rank, config.dt_min, config.dt_max, config.dt_init_floor) == (128, 0.001, 0.1, 0.0001)
    assert not hasattr(config, "time_step_rank")
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"model_type": "mamba", "time_step_rank": 128, "dt_rank": 64}))
    with pytest.raises(UserError, match=r"^model\.config: '.*' sets both time_step_rank=128 and dt_rank=64"):
        load_model_config(str(both))


def _job(*args):
    from recipe.config import parse_job_config

    return parse_job_config(["--job.config_file", "configs/debug.toml", *args], world_size=2)


@pytest.mark.parametrize("family", ["gsa", "mamba", "samba"])
def test_data_parallel_only_families_refuse_tp_and_have_no_export_adapter(family, monkeypatch):
    """gsa, mamba and samba train with FSDP/DDP (tests/parallel parity); TP=2 and the rollout
    export are refused in one line before anything is built, as the trainer and --job.dry_run check."""
    from recipe.trainer import check_model_against_job

    monkeypatch.chdir(ROOT)
    config = load_model_config(f"configs/tiny/{family}.json")
    with sdpa_flash_attn.installed():  # samba's attention layers: past the flash-attn check
        check_model_against_job(config, _job("--parallelism.data_parallel_shard_degree", "2"), world_size=2)
        with pytest.raises(ConfigError, match=rf"^parallelism\.tensor_parallel_degree: model_type '{family}' has no "
                                              r"tensor parallelism \(.*\); set parallelism\.tensor_parallel_degree=1 "
                                              r"\(FSDP, HSDP and DDP train it\)$"):
            check_model_against_job(config, _job("--parallelism.tensor_parallel_degree", "2"), world_size=2)
        rollout = ("--rollout.enable", "--hooks.post_step", "rollout")
        with pytest.raises(ConfigError, match=rf"^rollout: model_type '{family}' has no export adapter "
                                              r"\(registered: .*\); register one with @register_export_adapter$"):
            check_model_against_job(config, _job(*rollout), world_size=2)
    check_model_against_job(load_model_config("configs/tiny/gla.json"), _job(*rollout), world_size=2)  # gla has one


@torch.no_grad()
def test_fla_mamba1_ignores_cu_seqlens_so_varlen_is_refused(monkeypatch):
    """fla 0.6's Mamba1 mixer (mamba, and samba's recurrent layers) never reads cu_seqlens: two
    documents packed in a row give the outputs of one sequence, so training.varlen is refused."""
    from transformers import AutoModelForCausalLM

    from recipe.model import check_varlen

    monkeypatch.chdir(ROOT)
    config = load_model_config("configs/tiny/mamba.json")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 24))
    packed = model(input_ids=ids, cu_seqlens=torch.tensor([0, 10, 24], dtype=torch.int32)).logits
    assert torch.equal(packed, model(input_ids=ids).logits)
    assert (packed[:, 10:] - model(input_ids=ids[:, 10:]).logits).abs().max() > 1e-3
    for family in ("mamba", "samba"):
        with pytest.raises(ConfigError, match=rf"^training\.varlen: fla's {family} layer ignores cu_seqlens.*= false$"):
            check_varlen(load_model_config(f"configs/tiny/{family}.json"))


# flame's README training command (tests/test_flame_keys.py: README_COMMAND), through train.py, for
# every model config: the same flags with the model swapped, no checkpoint (its saving is covered there).
FLAME_COMMAND_FLAGS = [
    "--job.config_file", "tests/data/flame_fla.toml", "--model.tokenizer_path", "bytes", "--optimizer.name", "AdamW",
    "--optimizer.eps", "1e-15", "--optimizer.lr", "1e-3", "--lr_scheduler.warmup_steps", "1",
    "--lr_scheduler.lr_min", "0.1", "--lr_scheduler.decay_type", "cosine", "--training.batch_size", "1",
    "--training.seq_len", "64", "--training.context_len", "32", "--training.varlen",
    "--training.gradient_accumulation_steps", "1", "--training.steps", "2", "--training.max_norm", "1.0",
    "--training.skip_nan_inf", "--training.dataset", "synthetic", "--training.dataset_name", "sample-100BT",
    "--training.dataset_split", "train", "--training.num_workers", "0", "--training.prefetch_factor", "2",
    "--training.seed", "42", "--metrics.log_freq", "1", "--metrics.enable_wandb", "false",
    "--profiling.enable_profiling", "false", "--training.mixed_precision_param", "float32",
    "--checkpoint.enable_checkpoint", "false",
]


def command_refusal(name: str) -> str | None:
    """The one line flame's README command stops with for this config here, or None if it trains."""
    model_type = name.rsplit("_", 1)[0]
    if model_type == "sba":
        return r"model_type 'sba' .* is flame's own model"
    if model_type in ("transformer", "samba") and fla.layers.attn.flash_attn_func is None:
        return rf"model_type '{model_type}' runs its softmax attention with flash-attn, which is not installed"
    if model_type in ("mamba", "mamba2", "samba"):  # the command packs documents (--training.varlen)
        return rf"training\.varlen: fla's {model_type} layer ignores cu_seqlens"
    return None


@pytest.mark.slow
def test_flame_readme_command_trains_every_flame_config_or_stops_in_one_line(tmp_path):
    import subprocess
    import sys

    configs, seen = [], set()
    for name in FLAME_CONFIGS:  # configs that shrink to the same file run once
        path = shrunk_file(name, tmp_path)
        content = open(path).read()
        if content not in seen:
            seen.add(content)
            configs.append(path)
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "tests/flame_command_runner.py", str(out), *configs, "--",
                           *FLAME_COMMAND_FLAGS], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in map(json.loads, (ln for ln in proc.stdout.splitlines()
                                                       if ln.startswith('{"name":')))}
    assert sorted(results) == sorted(os.path.basename(p)[: -len(".json")] for p in configs)
    trained = set()
    for name, result in results.items():
        refusal = command_refusal(name)
        if refusal:
            assert result["rc"] == 2, result
            assert re.match(rf"^flare: error: .*{refusal}", result["last_stderr"]), result
            continue
        assert result["rc"] == 0, result
        records = [json.loads(line) for line in open(out / name / "metrics.jsonl")]
        assert [r["step"] for r in records] == [1, 2], name
        assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records), (name, records)
        trained.add(name.rsplit("_", 1)[0])
    assert trained >= {"delta_net", "gated_deltanet", "gla", "gsa", "hgrn2"}, trained
