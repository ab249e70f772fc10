"""No config key is accepted and then ignored: every torchtitan key is acted on or refused in one
line; job.print_config prints, job.dry_run reports without a process group; every flare key has help."""

import json
import re
import subprocess
import sys
from dataclasses import fields, is_dataclass
from typing import Literal, get_args, get_origin

import pytest
import torch
import torch.distributed as dist
from torchtitan.config import JobConfig as TorchtitanJobConfig

import train
from recipe import job_config as flare_sections
from recipe import torchtitan_keys
from recipe.config import parse_job_config
from recipe.errors import ConfigError

from conftest import ROOT

# Keys flare once accepted and ignored (written out here, independent of recipe/torchtitan_keys.py,
# so that dropping one from REFUSED without making flare act on it fails below).
IGNORED_BEFORE = [
    "validation.enable",
    "validation.freq",
    "training.dataset_path",
    "model.hf_assets_path",
    "model.flavor",
    "fault_tolerance.enable",
    "fault_tolerance.process_group",
    "fault_tolerance.process_group_timeout_ms",
    "fault_tolerance.replica_id",
    "fault_tolerance.group_size",
    "fault_tolerance.min_replica_size",
    "fault_tolerance.semi_sync_method",
    "memory_estimation.enable",
    "comm.mode",
    "optimizer.early_step_in_backward",
    "training.dtype",
    "checkpoint.create_seed_checkpoint",
    "checkpoint.initial_load_in_hf",
    "experimental.custom_args_module",
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns",
    "debug.moe_force_load_balance",
]


def leaf_fields(cls, prefix=""):
    """{dotted key: (field type, default)} for every leaf of a JobConfig dataclass."""
    out = {}
    instance = cls()
    for f in fields(cls):
        value = getattr(instance, f.name)
        if is_dataclass(f.type):
            out.update(leaf_fields(f.type, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (f.type, value)
    return out


TITAN = leaf_fields(TorchtitanJobConfig)


def other_value(ftype, default):
    """A value of `ftype` different from `default`, valid for torchtitan's own checks."""
    if get_origin(ftype) is Literal:
        return next(v for v in get_args(ftype) if v != default)
    options = [t for t in get_args(ftype) if t is not type(None)] or [ftype]
    kind = options[0]
    if kind is bool:
        return not default
    if kind is int:
        return 1 if default in (None, -1) else default + 1
    if kind is float:
        return 0.75 if default is None else default / 2
    if kind is str:
        return "x"
    if get_origin(kind) is list:
        return [["x"], ["y"]] if get_origin(get_args(kind)[0]) is list else ["x"]
    raise AssertionError(f"no alternative value for {ftype}")


def toml_for(key, value):
    *sections, name = key.split(".")
    return f"[{'.'.join(sections)}]\n{name} = {json.dumps(value)}\n"


def test_every_torchtitan_key_is_acted_on_or_refused():
    refused, acted = set(torchtitan_keys.REFUSED), {k for k in TITAN if torchtitan_keys.acted_on_entry(k)}
    assert refused <= set(TITAN), f"not torchtitan keys: {sorted(refused - set(TITAN))}"
    assert not refused & acted, f"both refused and acted on: {sorted(refused & acted)}"
    assert set(TITAN) == refused | acted, f"unclassified: {sorted(set(TITAN) - refused - acted)}"
    for entry in torchtitan_keys.ACTED_ON:  # no stale entries
        assert any(k == entry or k.startswith(entry + ".") for k in TITAN), entry
    assert set(torchtitan_keys.REFUSED_VALUES) <= acted
    assert set(IGNORED_BEFORE) <= set(TITAN)


@pytest.mark.parametrize("key", sorted(set(torchtitan_keys.REFUSED) | set(IGNORED_BEFORE)))
def test_refused_key_stops_the_job_with_one_line(key, tmp_path, capsys):
    ftype, default = TITAN[key]
    value = other_value(ftype, default)
    toml = tmp_path / "job.toml"
    toml.write_text(toml_for(key, value))
    out = tmp_path / "out"
    # --job.dry_run: were the key accepted, the job would end after a report, not train
    assert train.main(["--job.config_file", str(toml), "--job.dump_folder", str(out), "--job.dry_run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"flare: error: {key}="), err
    assert not out.exists()


def test_refused_keys_at_their_defaults_are_accepted(tmp_path):
    toml, sections = tmp_path / "job.toml", {}
    for key in torchtitan_keys.REFUSED:
        default = TITAN[key][1]
        if default is not None:  # TOML has no null: such a key can only be left out
            section, _, name = key.rpartition(".")
            sections.setdefault(section, []).append(f"{name} = {json.dumps(default)}")
    toml.write_text("".join(f"[{section}]\n" + "\n".join(lines) + "\n" for section, lines in sections.items()))
    assert sum(len(lines) for lines in sections.values()) > 40
    parse_job_config(["--job.config_file", str(toml)])


@pytest.mark.parametrize(
    "args, key",
    [
        (["--validation.enable"], "validation.enable=true: flare has no validation loop"),
        (["--training.dataset_path", "/data/c4"], "training.dataset_path='/data/c4': flare does not read it"),
        (["--model.hf_assets_path", "assets/llama"], "model.hf_assets_path='assets/llama'"),
        (["--fault_tolerance.enable"], "fault_tolerance.enable=true: flare does not integrate TorchFT"),
        (["--compile.components", "loss"], "compile.components=['loss']"),
        (["--model.converters", "quantize.grouped_mm.float8"], "model.converters=['quantize.grouped_mm.float8']"),
    ],
)
def test_refused_on_the_command_line(args, key):
    with pytest.raises(ConfigError) as err:
        parse_job_config(args)
    assert str(err.value).startswith(key) and "\n" not in str(err.value)


def test_values_flare_acts_on_are_accepted():
    assert parse_job_config(["--compile.components", "model"]).compile.components == ["model"]
    assert parse_job_config(["--validation.enable", "false", "--parallelism.pipeline_parallel_degree", "1"])


# ------------------------------------------------------------------ job.print_config


def test_print_config_prints_the_resolved_config_on_rank_0_and_continues(tmp_path, capsys, monkeypatch):
    args = ["--job.config_file", "configs/debug.toml", "--training.steps", "7", "--job.print_config",
            "--job.dry_run", "--job.dump_folder", str(tmp_path / "out")]
    monkeypatch.setenv("RANK", "0")
    assert train.main(args) == 0
    stdout = capsys.readouterr().out
    printed, end = json.JSONDecoder().raw_decode(stdout[stdout.index("{\n"):])
    assert printed == parse_job_config(args).to_dict()
    assert printed["training"]["steps"] == 7 and printed["model"]["config"] == "configs/gla_debug.json"
    assert "flare dry run:" in stdout[stdout.index("{\n") + end:]  # the job went on after printing

    monkeypatch.setenv("RANK", "1")
    assert train.main(args) == 0
    assert capsys.readouterr().out.strip() == ""  # rank 0 speaks for the job


def test_save_config_file_writes_the_resolved_config(tmp_path):
    cfg = parse_job_config(["--job.dump_folder", str(tmp_path), "--job.save_config_file", "cfg/job.json"])
    train.save_config(cfg)
    assert json.loads((tmp_path / "cfg" / "job.json").read_text()) == cfg.to_dict()


# ------------------------------------------------------------------ job.dry_run


def real_parameter_count(model_config_path):
    from transformers import AutoModelForCausalLM

    from recipe.model import load_model_config, reconcile_with_tokenizer
    from recipe.tokenizer import byte_tokenizer

    cfg = load_model_config(model_config_path)
    reconcile_with_tokenizer(cfg, byte_tokenizer())
    model = AutoModelForCausalLM.from_config(cfg)  # materialized on the CPU
    return sum(p.numel() for p in model.parameters()), cfg, model


@pytest.fixture
def no_process_group(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not create a process group")

    monkeypatch.setattr(dist, "init_process_group", refuse)
    yield
    assert not dist.is_initialized()


def test_dry_run_reports_the_real_model_without_a_process_group(tmp_path, capsys, monkeypatch, no_process_group):
    from recipe.flops import flops_per_token

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "out"
    assert train.main(["--job.config_file", "configs/debug.toml", "--job.dry_run", "--job.dump_folder", str(out)]) == 0
    report = capsys.readouterr().out
    n_params, cfg, model = real_parameter_count("configs/gla_debug.json")
    assert f": {n_params:,} parameters" in report
    assert f"FLOPs per token: {flops_per_token(cfg, 64, model):,.0f}" in report
    assert "world size 1" in report and "data parallel: none; precision: fp32" in report
    assert "total:" in report and "excluding activations" in report
    assert not out.exists()  # nothing written


@pytest.mark.parametrize(
    "world, args, expected",
    [
        (4, ["--parallelism.tensor_parallel_degree", "2"],
         ["tensor parallel: degree 2, GLATPPlan", "data parallel: FSDP (2 shards), compute bf16"]),
        (2, ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1",
             "--activation_checkpoint.mode", "full"],
         ["data parallel: DDP over 2 replicas", "activation checkpointing: full, 2/2 blocks", "DDP gradient buckets"]),
        (1, ["--compile.enable", "--activation_checkpoint.mode", "selective",
             "--activation_checkpoint.selective_ac_option", "2"],
         ["data parallel: single-device FSDP (one rank), compute bf16", "compile: 2 blocks",
          "selective, 1 block in 2, 1/2 blocks"]),
        (1, ["--parallelism.single_device_fsdp", "false"],
         ["data parallel: none; precision: autocast to bf16 (fp32 parameters)"]),
    ],
)
def test_dry_run_plan_follows_config_and_world_size(world, args, expected, capsys, monkeypatch, no_process_group):
    monkeypatch.setenv("WORLD_SIZE", str(world))  # as under torchrun, without MASTER_ADDR: nothing may connect
    monkeypatch.setenv("RANK", "0")
    argv = ["--model.config", "configs/gla_debug.json", "--training.seq_len", "64", "--training.mixed_precision_param",
            "bfloat16", "--job.dry_run", *args]
    assert train.main(argv) == 0
    report = capsys.readouterr().out
    for needle in expected:
        assert needle in report, (needle, report)


def test_memory_estimate_per_layout():
    from recipe.dry_run import memory_per_rank, parallel_dims

    n = 1_000_000

    def total(world, *args):
        cfg = parse_job_config(["--training.mixed_precision_param", "bfloat16", *args], world_size=world)
        return sum(memory_per_rank(n, cfg, parallel_dims(cfg, world)).values())

    assert total(1) == 16 * n  # fp32 params + grads + two AdamW moments
    assert total(4) == 16 * n // 4  # FSDP shards all of it
    assert total(4, "--parallelism.tensor_parallel_degree", "2") == 16 * n // 4
    ddp = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"]
    assert total(2, *ddp) == 20 * n  # replicated, plus DDP's gradient buckets
    hsdp = ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]
    assert total(4, *hsdp) == 16 * n // 2


def test_dry_run_of_the_shipped_340M_config_as_documented():
    proc = subprocess.run(
        [sys.executable, "train.py", "--job.config_file", "configs/gla_340M.toml", "--job.dry_run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"model: fla \(gla, configs/gla_340M.json\): [\d,]+ parameters", proc.stdout)
    assert "not checked:" in proc.stdout and "datasets are not opened" in proc.stdout


# ------------------------------------------------------------------ --help


def help_texts(text):
    """{option: description} from tyro's --help (boxed, wrapped)."""
    out, names, desc = {}, [], []

    def flush():
        for name in names:
            out[name] = " ".join(desc)

    for raw in text.splitlines():
        line = raw.strip().strip("│").strip()
        if line.startswith(("╭", "╰")):  # a section's box: its description belongs to no option
            flush()
            names, desc = [], []
        elif line.startswith("--"):
            if desc:
                flush()
                names, desc = [], []
            names += [part.split()[0].rstrip(",") for part in line.split(", ") if part.startswith("--")]
        elif line and names:
            desc.append(line)
    flush()
    return {name: re.sub(r"\(default:.*?\)\s*$", "", d).strip() for name, d in out.items()}


def flare_keys(cls=flare_sections.JobConfig, prefix=""):
    for f in fields(cls):
        if is_dataclass(f.type):
            yield from flare_keys(f.type, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_flare_key_has_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit):
        parse_job_config(["--help"])
    helps = help_texts(capsys.readouterr().out)
    keys = list(flare_keys())
    assert len(keys) > 20 and "job.dry_run" in keys
    for key in keys:
        option = "--" + key.replace("_", "-")
        assert option in helps, option
        assert helps[option], f"{option} has no help"
    # flare's text, not torchtitan's, for keys flare redefines; refusals are stated in the help too
    assert helps["--model.name"].startswith("Free-form label")
    assert "flare refuses any value but the default" in helps["--validation.enable"]
    assert "flare refuses" not in helps["--training.dataloader.num-workers"]
