"""flame's job files and command-line flags in flare (recipe/flame_keys.py): every key flame defines
is mapped, refused or noticed; flame's own job file and README command train; conflicts and
refusals are one line."""

import json
import logging
import os
import subprocess
import sys

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from recipe import flame_keys
from recipe.config import config_class, field_docs, parse_job_config
from recipe.errors import ConfigError
from recipe.flame_keys import KEYS, Cosmetic, Mapped, Refused, Same

from conftest import ROOT

DATA = os.path.join(ROOT, "tests", "data")
FLAME = json.load(open(os.path.join(DATA, "flame_keys.json")))["keys"]
FLA_TOML = os.path.join(DATA, "flame_fla.toml")  # flame/models/fla.toml at flame e11e7be
FLARE = field_docs(config_class())  # {flare key: default}


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ the table against flame's schema


def test_every_flame_key_is_mapped_refused_or_noticed():
    assert len(FLAME) > 100
    assert set(KEYS) == set(FLAME), (
        f"missing from recipe/flame_keys.py: {sorted(set(FLAME) - set(KEYS))}; "
        f"not flame keys: {sorted(set(KEYS) - set(FLAME))}"
    )
    for key, entry in KEYS.items():
        assert isinstance(entry, (Same, Mapped, Refused, Cosmetic)), key
        if isinstance(entry, Refused):  # refused only away from flame's own default
            assert entry.default == FLAME[key]["default"], key
            assert entry.reason and "\n" not in entry.reason, key


def test_table_targets_are_flare_keys_and_renamed_keys_are_not():
    for key, entry in KEYS.items():
        if isinstance(entry, Same):
            assert key in FLARE, f"{key}: marked same, but flare has no such key"
        elif isinstance(entry, Mapped):
            for target in entry.targets:
                assert target in FLARE, f"{key} -> {target}: not a flare key"
        # A flame key flare translates must not shadow a flare key of another meaning. The one
        # shared name is torchtitan's model.tokenizer_path, which means the tokenizer in both.
        if not isinstance(entry, Same) and key != "model.tokenizer_path":
            assert key not in FLARE, key
    assert KEYS["model.tokenizer_path"].targets == ("model.tokenizer",)


def test_flame_flags_are_known_as_flags():
    # flame's store_true/store_false options take no value on its command line; flare must not
    # swallow the next option as their value.
    flags = {k for k, v in FLAME.items() if v["flag"] and isinstance(KEYS[k], (Mapped, Cosmetic))}
    # keys flame's job files set beyond its parser: booleans there are flags
    with open(FLA_TOML, "rb") as f:
        toml = tomllib.load(f)
    toml_booleans = {k for k, v in FLAME.items() if v["source"] == "toml"
                     and isinstance(toml[k.split(".")[0]][k.split(".")[1]], bool)}
    assert flame_keys._FLAGS == flags | toml_booleans
    for key, entry in KEYS.items():
        if isinstance(entry, Refused):
            assert isinstance(entry.default, bool) == FLAME[key]["flag"], key


def test_doc_table_matches_the_module():
    doc = open(os.path.join(ROOT, "docs", "from_flame.md")).read()
    table = flame_keys.doc_table()
    assert table in doc, "docs/from_flame.md: regenerate the table with `python -m recipe.flame_keys`"
    assert len(table.splitlines()) == len(KEYS) + 2


# ------------------------------------------------------------------ values reach flare's keys


def parse(args, caplog=None):
    if caplog is not None:
        caplog.set_level(logging.INFO, logger="recipe.flame_keys")
    return parse_job_config(args)


def test_flame_job_file_maps_with_one_notice_per_key(caplog):
    cfg = parse(["--job.config_file", FLA_TOML, "--model.config", "configs/tiny/gla.json",
                 "--model.tokenizer_path", "bytes"], caplog)
    t = cfg.training
    assert t.local_batch_size == 32 and t.seq_len == 2048 and t.steps == 20480
    assert t.dataloader.num_workers == 32 and t.dataloader.prefetch_factor == 2
    assert cfg.debug.seed == 42 and t.data_seed == 42
    assert cfg.optimizer.eps == 1e-15 and cfg.lr_scheduler.min_lr_factor == 0.1
    assert cfg.checkpoint.enable and cfg.checkpoint.interval == 2048 and not cfg.checkpoint.last_save_model_only
    assert cfg.job.print_config and cfg.model.tokenizer == "bytes" and cfg.activation_checkpoint.mode == "none"
    lines = [r.getMessage() for r in caplog.records if r.name == "recipe.flame_keys"]
    for key in ("training.batch_size", "checkpoint.enable_checkpoint", "job.print_args", "model.tokenizer_path",
                "lr_scheduler.lr_min", "training.num_workers", "checkpoint.model_weights_only"):
        entry = KEYS[key]
        assert lines.count(f"flame key {key} -> flare key {', '.join(entry.targets)}") == 1, (key, lines)
    assert "flame key checkpoint.interval_type: ignored (" in "\n".join(lines)
    assert "flame key experimental.pipeline_parallel_degree = 1: flame's default, nothing to do in flare" in lines


def test_flame_flags_on_the_command_line():
    cfg = parse(["--training.batch_size", "4", "--training.compile", "--training.seed=3",
                 "--checkpoint.enable_checkpoint", "--checkpoint.no_initial_load_model_weights_only",
                 "--training.data_parallel_shard_degree", "1", "--training.num_workers", "2",
                 "--training.prefetch_factor", "3", "--lr_scheduler.lr_min", "0.25", "--training.deterministic",
                 "false", "--job.print_args", "--training.varlen"])
    assert cfg.training.local_batch_size == 4 and cfg.compile.enable and cfg.training.varlen
    assert cfg.debug.seed == 3 and cfg.training.data_seed == 3 and not cfg.debug.deterministic
    assert cfg.checkpoint.enable and not cfg.checkpoint.initial_load_model_only
    assert cfg.parallelism.data_parallel_shard_degree == 1 and cfg.lr_scheduler.min_lr_factor == 0.25
    assert cfg.training.dataloader.num_workers == 2 and cfg.training.dataloader.prefetch_factor == 3
    assert cfg.job.print_config


def test_flame_and_flare_keys_mix_and_cli_overrides_the_file(tmp_path):
    toml = write(tmp_path, "[training]\nbatch_size = 4\nseq_len = 32\nlocal_batch_size = 4\n"
                 "[lr_scheduler]\nlr_min = 0.1\nmin_lr_factor = 0.1\n[debug]\nseed = 5\n")
    cfg = parse(["--job.config_file", toml])
    assert cfg.training.local_batch_size == 4 and cfg.lr_scheduler.min_lr_factor == 0.1 and cfg.debug.seed == 5
    # the command line wins over the file, flame's name or flare's
    cfg = parse(["--job.config_file", toml, "--training.local_batch_size", "2", "--lr_scheduler.lr_min", "0.5"])
    assert cfg.training.local_batch_size == 2 and cfg.lr_scheduler.min_lr_factor == 0.5


def test_torchtitan_tokenizer_path_is_read_as_the_tokenizer():
    assert parse(["--model.tokenizer_path", "bytes"]).model.tokenizer == "bytes"


def test_worker_options_are_dropped_without_workers(caplog):
    cfg = parse(["--training.prefetch_factor", "2", "--training.persistent_workers"], caplog)
    loader = cfg.training.dataloader
    assert loader.num_workers == 0 and loader.prefetch_factor is None and loader.persistent_workers is False
    assert any("flame key training.prefetch_factor: dropped" in r.getMessage() for r in caplog.records)


def test_custom_model_path_becomes_custom_import():
    assert parse(["--experimental.custom_model_path", "tests.custom_family"]).experimental.custom_import == (
        "tests.custom_family"
    )


# ------------------------------------------------------------------ one-line errors


@pytest.mark.parametrize(
    "args, toml, message",
    [
        ([], "[training]\nbatch_size = 8\nlocal_batch_size = 4\n",
         "training.batch_size=8 (flame's name for training.local_batch_size) and training.local_batch_size=4 "
         "disagree; keep one of them"),
        ([], "[training]\nseed = 1\n[debug]\nseed = 2\n",
         "training.seed=1 (flame's name for debug.seed) and debug.seed=2 disagree"),
        ([], "[checkpoint]\nmodel_weights_only = true\nlast_save_model_weights_only = false\n",
         "both set checkpoint.last_save_model_only and disagree"),
        (["--training.batch_size", "8", "--training.local_batch_size", "4"], None,
         "--training.batch_size 8 (flame's name for training.local_batch_size) and --training.local_batch_size 4 "
         "disagree on the command line; keep one of them"),
        (["--checkpoint.enable_checkpoint", "--checkpoint.enable", "false"], None,
         "--checkpoint.enable_checkpoint true (flame's name for checkpoint.enable) and --checkpoint.enable false"),
        (["--training.batch_size", "eight"], None, "--training.batch_size: must be an integer, got 'eight'"),
        (["--training.compile", "maybe"], None, "--training.compile: must be true or false, got 'maybe'"),
        (["--training.batch_size"], None, "--training.batch_size: missing value"),
        ([], "[experimental]\npipeline_parallel_degree = 2\n",
         "experimental.pipeline_parallel_degree=2: pipeline parallelism is not supported by flare; remove it"),
        (["--experimental.pipeline_parallel_split_points", "layers.1", "layers.2"], None,
         "experimental.pipeline_parallel_split_points=['layers.1', 'layers.2']: pipeline parallelism"),
        (["--experimental.context_parallel_degree", "2"], None,
         "experimental.context_parallel_degree=2: context parallelism is not supported"),
        (["--activation_offload.mode", "full"], None,
         "activation_offload.mode='full': flare has no activation offloading"),
        (["--memory_estimation.enabled"], None, "memory_estimation.enabled=true: flare has no FSDP memory-estimation"),
        (["--experimental.enable_compiled_autograd"], None, "experimental.enable_compiled_autograd=true:"),
        ([], "[float8]\nforce_recompute_fp8_weight_in_bwd = true\n", "float8.force_recompute_fp8_weight_in_bwd=true:"),
        (["--experimental.custom_model_path", "my_models/model_x"], None,
         "experimental.custom_model_path='my_models/model_x': flare imports a dotted module"),
        (["--model.converters", "float8"], None, "did you mean 'quantize.linear.float8'?"),
    ],
)
def test_conflicts_and_refusals_are_one_line(tmp_path, args, toml, message):
    if toml is not None:
        args = ["--job.config_file", write(tmp_path, toml)] + args
    with pytest.raises(ConfigError) as err:
        parse_job_config(args)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_refused_keys_at_flame_defaults_are_accepted(tmp_path):
    lines = {}
    for key, entry in KEYS.items():
        if isinstance(entry, Refused) and entry.default is not None:
            section, _, name = key.partition(".")
            lines.setdefault(section, []).append(f"{name} = {json.dumps(entry.default)}")
    toml = write(tmp_path, "".join(f"[{s}]\n" + "\n".join(body) + "\n" for s, body in lines.items()))
    parse_job_config(["--job.config_file", toml])


# ------------------------------------------------------------------ end to end


# flame's README training command (flame e11e7be), its flags in its order, with local and tiny
# values: the byte tokenizer, the built-in corpus, seq_len 64, 2 steps, no dataloader workers.
# --training.compile is left out (compiling on the CPU costs ~40 s; its mapping is checked above).
README_COMMAND = [
    "--job.config_file", FLA_TOML,
    "--model.config", "configs/tiny/gla.json",
    "--model.tokenizer_path", "bytes",
    "--optimizer.name", "AdamW",
    "--optimizer.eps", "1e-15",
    "--optimizer.lr", "1e-3",
    "--lr_scheduler.warmup_steps", "1",
    "--lr_scheduler.lr_min", "0.1",
    "--lr_scheduler.decay_type", "cosine",
    "--training.batch_size", "1",
    "--training.seq_len", "64",
    "--training.context_len", "32",
    "--training.varlen",
    "--training.gradient_accumulation_steps", "1",
    "--training.steps", "2",
    "--training.max_norm", "1.0",
    "--training.skip_nan_inf",
    "--training.dataset", "synthetic",
    "--training.dataset_name", "sample-100BT",
    "--training.dataset_split", "train",
    "--training.num_workers", "0",
    "--training.prefetch_factor", "2",
    "--training.seed", "42",
    "--checkpoint.interval", "2",
    "--checkpoint.load_step", "-1",
    "--checkpoint.keep_latest_k", "2",
    "--metrics.log_freq", "1",
]


@pytest.mark.slow
def test_flame_job_file_and_readme_command_train(tmp_path):
    dump = tmp_path / "exp"
    # fla.toml turns on W&B and the profiler; the CPU computes in fp32 (as configs/debug.toml)
    local = ["--job.dump_folder", str(dump), "--metrics.enable_wandb", "false", "--profiling.enable_profiling",
             "false", "--training.mixed_precision_param", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "train.py", *README_COMMAND, *local], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    for key in ("model.tokenizer_path", "training.batch_size", "training.seed", "lr_scheduler.lr_min",
                "training.num_workers", "checkpoint.enable_checkpoint", "job.print_args",
                "training.data_parallel_shard_degree", "float8.enable_fsdp_float8_all_gather"):
        assert f"flame key {key} -> flare key {', '.join(KEYS[key].targets)}" in log, key
    assert "flame key training.prefetch_factor: dropped" in log

    printed, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{\n"):])  # job.print_args
    t = printed["training"]
    assert t["local_batch_size"] == 1 and t["varlen"] and t["context_len"] == 32 and t["data_seed"] == 42
    assert printed["optimizer"]["eps"] == 1e-15 and printed["lr_scheduler"]["min_lr_factor"] == 0.1

    records = [json.loads(line) for line in open(dump / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["tokens_seen"] == 2 * 64
    assert all(r["loss"] == r["loss"] and 0 < r["loss"] < 10 for r in records)
    assert sorted(os.listdir(dump / "checkpoint")) == ["step-2"]  # fla.toml: enable_checkpoint = true
