"""Damaged state on disk: checkpoints, checkpoints of another model, HF folders, metrics.jsonl.

Every case ends with one line naming the file and the fix (exit code 2 for train.py, 1 for the
converters), no traceback, and every file on disk exactly as it was. With checkpoint.fallback a
job resumes from the newest whole checkpoint, bit-exactly (CPU fp32).

One trained run (tiny Llama, 6 steps, checkpoints at steps 2, 4, 6, with checksums) serves every
test; each test damages a copy. train.py runs in-process through its main() except where a test
needs a fresh interpreter (exit code of the real command, bit-exact resume).
"""

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from recipe.checkpoint import DAMAGED_SUFFIX, MANIFEST, complete_checkpoints, find_damage
from test_checkpoint import build, process_group, save_at  # noqa: F401  (process_group: a fixture)

pytestmark = pytest.mark.slow

LLAMA = os.path.join(ROOT, "configs", "tiny", "llama.json")
JOB = ["--job.config_file", os.path.join(ROOT, "configs", "debug.toml"), "--model.config", LLAMA,
       "--training.seq_len", "32", "--checkpoint.interval", "2"]
SHARD = "__0_0.distcp"  # one rank: one shard file per checkpoint


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, glob.glob(os.path.join(ROOT, "scripts", "*", f"{name}.py"))[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_subprocess(dump, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "train.py", *JOB, "--job.dump_folder", str(dump), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dump = tmp_path_factory.mktemp("trained") / "run"
    rc, output = train_subprocess(dump, "--training.steps", "6", "--checkpoint.verify")
    assert rc == 0, output[-3000:]
    assert [s for s, _ in complete_checkpoints(str(dump / "checkpoint"))] == [2, 4, 6]
    return dump


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def tree(folder):
    """{relative path: SHA-256} of every file under `folder`."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def train_in_process(capfd, dump, *extra):
    import train

    capfd.readouterr()
    rc = train.main([*JOB, "--job.dump_folder", str(dump), *extra])
    out, err = capfd.readouterr()
    return rc, out + err


def one_error_line(output, prefix="flare: error: "):
    assert "Traceback" not in output, output[-4000:]
    lines = [line for line in output.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, output[-4000:]
    return lines[0]


def truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def zero_first_bytes(path, n=4096):
    """Damage that keeps the size: only a checksum sees it."""
    with open(path, "r+b") as f:
        f.write(b"\0" * n)


# --------------------------------------------------------------------------- damaged checkpoints


def test_truncated_newest_checkpoint_stops_with_one_line(run):
    step6 = run / "checkpoint" / "step-6"
    size = os.path.getsize(step6 / SHARD)
    truncate(step6 / SHARD)
    before = tree(run)
    rc, output = train_subprocess(run, "--training.steps", "8")
    assert rc == 2
    assert one_error_line(output) == (
        f"flare: error: checkpoint: the newest checkpoint {step6} is damaged ({SHARD} has {size // 2} bytes, "
        f"{MANIFEST} recorded {size}); resume from the newest good one with --checkpoint.load_step 4 "
        f"(or checkpoint.fallback = true), or move step-6 out of {run / 'checkpoint'}"
    )
    assert tree(run) == before


def legacy(run):
    """Checkpoints as saved before manifests existed."""
    for step in (2, 4, 6):
        os.remove(run / "checkpoint" / f"step-{step}" / MANIFEST)


@pytest.mark.parametrize("damage,message", [
    ("missing_shard", f"{SHARD} is missing"),
    ("legacy_truncated", f"{SHARD} is truncated ("),
    ("legacy_empty", f"{SHARD} is truncated (0 bytes"),
    ("legacy_missing", f"{SHARD}, named in .metadata, is missing"),
    ("legacy_garbled_metadata", ".metadata cannot be read"),
])
def test_damaged_newest_checkpoint_is_named_with_both_fixes(run, capfd, single_process_group, damage, message):
    step6 = run / "checkpoint" / "step-6"
    if damage.startswith("legacy"):
        legacy(run)
    if damage in ("missing_shard", "legacy_missing"):
        os.remove(step6 / SHARD)
    elif damage == "legacy_truncated":
        truncate(step6 / SHARD)
    elif damage == "legacy_empty":
        truncate(step6 / SHARD, 0)
    elif damage == "legacy_garbled_metadata":
        (step6 / ".metadata").write_bytes(b"not a pickle")
    before = tree(run)
    rc, output = train_in_process(capfd, run, "--training.steps", "8")
    assert rc == 2
    line = one_error_line(output)
    assert f"the newest checkpoint {step6} is damaged ({message}" in line, line
    assert "--checkpoint.load_step 4" in line and "checkpoint.fallback = true" in line and "move step-6 out of" in line
    assert tree(run) == before


def test_damage_the_sizes_do_not_show(run, capfd, single_process_group):
    step6 = run / "checkpoint" / "step-6"
    zero_first_bytes(step6 / SHARD)
    before = tree(run)
    # The quick check passes; DCP fails while reading: one line naming the folder.
    rc, output = train_in_process(capfd, run, "--training.steps", "8")
    assert rc == 2
    line = one_error_line(output)
    assert line.startswith(f"flare: error: checkpoint: loading {step6} failed (") and "--checkpoint.load_step" in line
    # checkpoint.verify compares the checksums recorded at save time: found before loading.
    rc, output = train_in_process(capfd, run, "--training.steps", "8", "--checkpoint.verify")
    assert rc == 2
    line = one_error_line(output)
    assert f"{step6} is damaged ({SHARD} does not match its SHA-256 in {MANIFEST})" in line, line
    assert "--checkpoint.load_step 4" in line
    assert tree(run) == before


def test_load_step_of_a_missing_or_damaged_checkpoint(run, capfd, single_process_group):
    truncate(run / "checkpoint" / "step-4" / SHARD)
    before = tree(run)
    rc, output = train_in_process(capfd, run, "--training.steps", "8", "--checkpoint.load_step", "5")
    assert rc == 2
    assert "checkpoint.load_step=5: there is no" in one_error_line(output)
    assert "complete checkpoints: 2, 4, 6" in one_error_line(output)
    rc, output = train_in_process(capfd, run, "--training.steps", "8", "--checkpoint.load_step", "4")
    assert rc == 2
    assert f"{run / 'checkpoint' / 'step-4'} is damaged ({SHARD} has" in one_error_line(output)
    assert tree(run) == before


def test_no_whole_checkpoint_left(run, capfd, single_process_group):
    for step in (2, 4, 6):
        truncate(run / "checkpoint" / f"step-{step}" / SHARD)
    before = tree(run)
    rc, output = train_in_process(capfd, run, "--training.steps", "8", "--checkpoint.fallback")
    assert rc == 2
    line = one_error_line(output)
    assert "and no older checkpoint in" in line and "move step-6, step-4, step-2 out of that folder" in line
    assert tree(run) == before


def read_metrics(dump):
    with open(dump / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_fallback_resumes_from_the_newest_good_one_exactly(trained, run):
    checkpoint = run / "checkpoint"
    truncate(checkpoint / "step-6" / SHARD)
    before = tree(run)
    with open(run / "metrics.jsonl", "rb") as f:
        metrics_before = f.read()

    rc, output = train_subprocess(run, "--training.steps", "6", "--checkpoint.fallback")
    assert rc == 0, output[-3000:]
    assert "step-6 is damaged" in output and "resuming from step-4 (checkpoint.fallback)" in output
    assert "Training from step 5 to 6" in output and "Traceback" not in output

    # The resumed steps equal the uninterrupted run's, bit for bit.
    reference, resumed = read_metrics(trained), read_metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in resumed[-2:]] == [(r["loss"], r["grad_norm"]) for r in reference[4:]]

    # Nothing that was on disk is lost: the damaged step-6 was moved aside when step 6 was saved
    # again, byte for byte; the rest is untouched, and metrics.jsonl was only appended to.
    after = tree(run)
    for path, digest in before.items():
        if path.startswith(os.path.join("checkpoint", "step-6") + os.sep):
            moved = path.replace("step-6", f"step-6{DAMAGED_SUFFIX}", 1)
            assert after[moved] == digest, moved
        elif path != "metrics.jsonl":
            assert after[path] == digest, path
    with open(run / "metrics.jsonl", "rb") as f:
        assert f.read().startswith(metrics_before)
    assert [s for s, _ in complete_checkpoints(str(checkpoint))] == [2, 4, 6]
    assert (checkpoint / "step-6" / MANIFEST).exists() and find_damage(str(checkpoint / "step-6")) is None


def test_keep_latest_k_counts_whole_checkpoints_and_keeps_damaged_ones(tmp_path, process_group):  # noqa: F811
    manager, model, data = build(tmp_path, keep_latest_k=2)
    for step in (10, 20, 30):
        save_at(manager, model, data, step)
    manager.close()
    folder = tmp_path / "checkpoint"
    assert [s for s, _ in complete_checkpoints(str(folder))] == [20, 30]
    truncate(folder / "step-30" / SHARD)
    damaged = tree(folder / "step-30")

    # The fallback loads step 20; a save of step 40 keeps 20 (one of the two newest whole ones;
    # counting the damaged step-30 would purge it) and leaves step-30 alone.
    manager, model, data = build(tmp_path, keep_latest_k=2)
    manager.fallback = True
    assert manager.load()
    assert model.weight.eq(20.0).all() and data.position == 20
    save_at(manager, model, data, 40)
    manager.close()
    assert sorted(os.listdir(folder)) == ["step-20", "step-30", "step-40"]
    assert tree(folder / "step-30") == damaged

    # Saving step 30 again moves the damaged folder aside instead of deleting it.
    manager, model, data = build(tmp_path, keep_latest_k=2)
    save_at(manager, model, data, 30)
    manager.close()
    assert tree(folder / f"step-30{DAMAGED_SUFFIX}") == damaged
    assert [s for s, _ in complete_checkpoints(str(folder))] == [30, 40]


# --------------------------------------------------------------------------- another model


@pytest.mark.parametrize("change,message", [
    ({"vocab_size": 1024}, "'model.embed_tokens.weight' is [512, 128] there, [1024, 128] in the model"),
    ({"num_hidden_layers": 1}, "it holds 'model.layers.1."),
    ({"num_hidden_layers": 3}, "it has no 'model.layers.2."),
])
def test_checkpoint_of_another_model(run, tmp_path, capfd, single_process_group, change, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.load(open(LLAMA)), **change}))
    before = tree(run)
    rc, output = train_in_process(capfd, run, "--training.steps", "8", "--model.config", str(config))
    assert rc == 2
    line = one_error_line(output)
    assert f"checkpoint: {run / 'checkpoint' / 'step-6'} does not fit this model: " in line and message in line, line
    assert "model.config" in line
    assert tree(run) == before


# --------------------------------------------------------------------------- HF folders


@pytest.fixture(scope="module")
def hf_folder(trained, tmp_path_factory):
    """The trained weights as a sharded HF folder (several safetensors + index)."""
    out = tmp_path_factory.mktemp("hf") / "hf"
    rc = load_script("convert_dcp_to_hf").main(["--checkpoint", str(trained / "checkpoint" / "step-6"),
                                               "--config", LLAMA, "--output", str(out), "--max-shard-size", "1MB"])
    assert rc == 0
    assert os.path.isfile(out / "model.safetensors.index.json")
    return out


def damage_hf(hf_folder, tmp_path, damage):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    shard = folder / "model-00002-of-00002.safetensors"
    if damage == "missing_shard":
        os.remove(shard)
    elif damage == "truncated_shard":
        truncate(shard)
    elif damage == "vocab_mismatch":  # config.json says one thing, the weights another
        config = json.load(open(folder / "config.json"))
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 1024}))
    elif damage == "missing_tensor":
        config = json.load(open(folder / "config.json"))
        (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    return folder, shard


HF_DAMAGE = [
    ("missing_shard", "shard '{shard}' named in model.safetensors.index.json is missing; copy it"),
    ("truncated_shard", "cannot read shard '{shard}' ("),
    ("vocab_mismatch", "'model.embed_tokens.weight' (in model-00001-of-00002.safetensors) has shape [512, 128]"),
    ("missing_tensor", "lacks 9 weight(s)"),
]


@pytest.mark.parametrize("damage,message", HF_DAMAGE)
def test_init_from_a_damaged_hf_folder(hf_folder, tmp_path, capfd, single_process_group, damage, message):
    folder, shard = damage_hf(hf_folder, tmp_path, damage)
    before = tree(tmp_path)
    # The job's model.config is the (edited) folder itself: its config.json no longer matches its weights.
    config = str(folder) if damage in ("vocab_mismatch", "missing_tensor") else LLAMA
    rc, output = train_in_process(capfd, tmp_path / "job", "--training.steps", "1", "--checkpoint.no_enable",
                                  "--model.init_from_hf", str(folder), "--model.config", config)
    assert rc == 2
    line = one_error_line(output)
    assert line.startswith("flare: error: model.init_from_hf: ") and message.format(shard=shard) in line, line
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("job" + os.sep)} == before
    assert not (tmp_path / "job" / "metrics.jsonl").exists()  # stopped before any step


@pytest.mark.parametrize("damage,message", HF_DAMAGE)
def test_convert_a_damaged_hf_folder(hf_folder, tmp_path, capfd, damage, message):
    folder, shard = damage_hf(hf_folder, tmp_path, damage)
    before = tree(tmp_path)
    capfd.readouterr()
    rc = load_script("convert_hf_to_dcp").main(["--hf", str(folder), "--output", str(tmp_path / "out" / "step-0")])
    out, err = capfd.readouterr()
    assert rc == 1
    line = one_error_line(out + err, "convert_hf_to_dcp: error: ")
    assert message.format(shard=shard) in line, line
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_convert_a_checkpoint_damaged_beyond_its_sizes(run, tmp_path, capfd):
    step6 = run / "checkpoint" / "step-6"
    zero_first_bytes(step6 / SHARD, os.path.getsize(step6 / SHARD))  # the size stays
    before = tree(run)
    capfd.readouterr()
    rc = load_script("convert_dcp_to_hf").main(["--checkpoint", str(step6), "--config", LLAMA,
                                               "--output", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert rc == 1
    assert f"cannot read the weights in '{step6}'" in one_error_line(out + err, "convert_dcp_to_hf: error: ")
    assert tree(run) == before and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- metrics.jsonl


def test_metrics_line_cut_by_a_kill(run, capfd, single_process_group):
    path = run / "metrics.jsonl"
    truncate(path, os.path.getsize(path) - 40)  # the step-6 record loses its end and newline
    with open(path, "rb") as f:
        cut = f.read()

    rc, output = train_in_process(capfd, run, "--training.steps", "7")
    assert rc == 0 and "the last line was cut off" in output
    with open(path, "rb") as f:
        content = f.read()
    assert content.startswith(cut + b"\n")  # the cut line is kept, the next record starts a new line
    lines = content.decode().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1])["step"] == 7

    proc = subprocess.run([sys.executable, "scripts/tools/summarize_metrics.py", "--skip", "0", f"run={path}"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"summarize_metrics: {path} line 6 is not a complete record (cut by a kill?); skipped"
    assert "| run | 7 |" in proc.stdout

    bench = run / "bench.jsonl"
    bench.write_text('{"header": {"device": "cpu"}}\n{"model": "a", "tokens_per_s": 5.0}\n{"model": "b", "tok')
    capfd.readouterr()
    rows = load_script("plot_bench").load_rows([str(bench)])
    assert [r["model"] for r in rows] == ["a"]
    assert f"plot_bench: {bench} line 3 is not a complete record; skipped" in capfd.readouterr().err
