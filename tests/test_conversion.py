"""scripts/tools/convert_hf_to_dcp.py and scripts/tools/convert_dcp_to_hf.py (recipe/hf_io.py).

1. HF -> DCP -> the trainer's checkpoint manager (load as initial_load_path, save; 0 steps) ->
   DCP -> HF is bit-identical for every key (fp32), for tiny Llama and tiny GLA (the fla path).
2. A real FSDP x TP run (4 gloo ranks, 2 steps) converted with the script loads in plain
   transformers, and its logits on a fixed batch equal the trainer's own (the final checkpoint
   reloaded into a single-process Trainer): exactly in fp32, and exactly in bf16 against the
   trainer's weights cast to bf16. The trainer's checkpoint.export_hf_on_finish writes the same tensors.
3. Every model family of configs/tiny converts both ways with no missing/unexpected keys.
4. Bad input: exit code 1, one line on stderr, nothing written to the destination.

The scripts run in-process through their main() (no interpreter start-up per case); one case runs
them as real subprocesses for the exit code.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import fla.layers.attn  # registers fla's models; imported here so its import-time warnings stay out of the checks
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from conftest import ROOT
from recipe.hf_io import load_config
from recipe.tokenizer import byte_tokenizer

TINY = os.path.join(ROOT, "configs", "tiny")
FAMILIES = ["llama", "gla", "delta_net", "gated_deltanet", "retnet", "hgrn2", "mamba2", "transformer", "olmo_hybrid"]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, glob.glob(os.path.join(ROOT, "scripts", "*", f"{name}.py"))[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DCP_TO_HF, HF_TO_DCP = _script("convert_dcp_to_hf"), _script("convert_hf_to_dcp")


def run(capsys, script, *args):
    capsys.readouterr()
    rc = script.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def convert_ok(capsys, script, *args):
    rc, out, err = run(capsys, script, *args)
    assert rc == 0, err
    assert out.startswith("wrote "), out


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """fla's transformer refuses to build without flash-attn (CUDA only); conversion never runs
    attention, so a stand-in that fails if called lets its keys and shapes be checked here."""
    import fla.layers.attn as attn

    def not_on_cpu(*args, **kwargs):
        raise AssertionError("flash-attn called during conversion")

    if attn.flash_attn_func is None:
        monkeypatch.setattr(attn, "flash_attn_func", not_on_cpu)


def random_model(config_path, **overrides):
    """A tiny model (as the trainer builds it) with every tensor random (norm weights included), and its config."""
    from recipe.model import build_model

    config = load_config(config_path, "--config", byte_tokenizer())
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model, config


def make_hf_folder(folder, family, **overrides):
    model, _ = random_model(os.path.join(TINY, f"{family}.json"), **overrides)
    model.save_pretrained(folder)  # transformers' own writer: the input format users have
    byte_tokenizer().save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


def hf_tensors(folder):
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    out = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def dcp_tensors(folder):
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in meta.items()
             if isinstance(v, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=folder, no_dist=True)
    return state


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def as_transformers_holds(state: dict) -> dict:
    """OLMo-Hybrid: transformers' own class holds the three short convolutions as one conv1d [q|k|v]."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".q_conv1d.weight")]:
        prefix = key[: -len("q_conv1d.weight")]
        out[f"{prefix}conv1d.weight"] = torch.cat([out.pop(f"{prefix}{c}_conv1d.weight") for c in "qkv"])
    return out


def assert_identical(actual: dict, expected: dict):
    from torch.distributed.tensor import DTensor

    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        value = actual[key].full_tensor() if isinstance(actual[key], DTensor) else actual[key]  # FSDP-wrapped trainer
        assert value.dtype == tensor.dtype, key
        assert torch.equal(value, tensor), f"{key} differs"


# --------------------------------------------------------------------------- 1. round trip


@pytest.mark.parametrize("family", ["llama", "gla"])
def test_hf_dcp_trainer_dcp_hf_is_bit_identical(tmp_path, capsys, single_process_group, family):
    from recipe.config import parse_job_config
    from recipe.trainer import Trainer

    hf, init, dump, out = tmp_path / "hf", tmp_path / "init" / "step-0", tmp_path / "run", tmp_path / "out"
    source = make_hf_folder(hf, family)
    convert_ok(capsys, HF_TO_DCP, "--hf", hf, "--output", init)
    assert sorted(dcp_tensors(init)) == sorted(source)  # flat HF keys, nothing nested

    # The trainer takes the DCP as its initial weights and saves its own full checkpoint at step 0.
    trainer = Trainer(parse_job_config([
        "--model.config", str(hf), "--model.tokenizer", str(hf), "--job.dump_folder", str(dump),
        "--checkpoint.enable", "--checkpoint.initial_load_path", str(init), "--training.seq_len", "32",
        "--training.local_batch_size", "2", "--training.mixed_precision_param", "float32",
    ]))
    assert trainer.checkpointer.load()
    trainer.checkpointer.save(0, last_step=True)
    trainer.close()
    saved = dump / "checkpoint" / "step-0"
    assert any(k.startswith("optimizer.") for k in dcp_tensors(saved))  # a full trainer checkpoint

    convert_ok(capsys, DCP_TO_HF, "--checkpoint", saved, "--config", hf, "--tokenizer", hf, "--output", out)
    hf_source = hf_tensors(hf)
    assert_identical(hf_tensors(out), hf_source)
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["architectures"] == [json.load(open(hf / "config.json"))["architectures"][0]]
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert {"generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))


def test_hf_to_dcp_output_works_as_checkpoint_step_0(tmp_path, capsys, single_process_group):
    """The other way to start from it: <dump_folder>/checkpoint/step-0 (torchtitan loads a step-0
    checkpoint as model-only); flat keys are what make this work (flame #48)."""
    from recipe.config import parse_job_config
    from recipe.trainer import Trainer

    source = make_hf_folder(tmp_path / "hf", "llama")
    convert_ok(capsys, HF_TO_DCP, "--hf", tmp_path / "hf", "--output", tmp_path / "run" / "checkpoint" / "step-0")
    trainer = Trainer(parse_job_config([
        "--model.config", str(tmp_path / "hf"), "--job.dump_folder", str(tmp_path / "run"), "--checkpoint.enable",
        "--training.seq_len", "32", "--training.local_batch_size", "2",
    ]))
    assert trainer.checkpointer.load() and trainer.step == 0
    assert_identical({k: v.detach() for k, v in trainer.model.state_dict().items()}, source)
    trainer.close()


# --------------------------------------------------------------------------- 2. trained, multi-rank


@pytest.mark.slow
def test_fsdp_tp_checkpoint_converts_to_matching_logits(tmp_path, capsys, single_process_group):
    dump, llama = tmp_path / "run", os.path.join(TINY, "llama.json")
    job = ["--job.config_file", os.path.join(ROOT, "configs", "debug.toml"), "--model.config", llama,
           "--job.dump_folder", str(dump), "--training.steps", "2", "--training.seq_len", "32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "train.py", *job,
           "--parallelism.tensor_parallel_degree", "2", "--checkpoint.export_hf_on_finish"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DP degree 2, TP degree 2" in proc.stdout + proc.stderr

    checkpoint, fp32, bf16 = dump / "checkpoint" / "step-2", tmp_path / "hf32", tmp_path / "hf16"
    convert_ok(capsys, DCP_TO_HF, "--checkpoint", checkpoint, "--config", llama, "--output", fp32)
    convert_ok(capsys, DCP_TO_HF, "--checkpoint", checkpoint, "--config", llama,
               "--output", bf16, "--dtype", "bfloat16")
    # The trainer's own export (live sharded weights, gathered) holds the very same tensors.
    assert_identical(hf_tensors(dump / "hf" / "step-2"), hf_tensors(fp32))

    # Reference: the final checkpoint reloaded (resharded) into a single-process Trainer.
    from recipe.config import parse_job_config
    from recipe.trainer import Trainer

    trainer = Trainer(parse_job_config([*job, "--checkpoint.exclude_from_loading", "dataloader"]))
    assert trainer.checkpointer.load() and trainer.step == 2
    reference = trainer.model.eval()
    trainer.close()

    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert torch.equal(load_hf(fp32)(input_ids=ids).logits, expected)  # tolerance 0 in fp32
        # bf16: the trainer's weights cast to bf16 (parameters only: from_pretrained keeps RoPE's
        # inv_freq buffer in fp32, as the trainer's model does), then the same math.
        for p in reference.parameters():
            p.data = p.data.to(torch.bfloat16)
        model_bf16 = load_hf(bf16)
        assert model_bf16.dtype == torch.bfloat16
        assert torch.equal(model_bf16(input_ids=ids).logits, reference(input_ids=ids).logits)


# --------------------------------------------------------------------------- 3. every family


@pytest.mark.parametrize("family,overrides", [(f, {}) for f in FAMILIES] + [("llama", {"tie_word_embeddings": True})],
                         ids=FAMILIES + ["llama_tied"])
def test_every_family_converts_both_ways(tmp_path, capsys, fake_flash_attn, family, overrides):
    model, _ = random_model(os.path.join(TINY, f"{family}.json"), **overrides)
    config_file = tmp_path / "config.json"
    with open(config_file, "w") as f:  # the job's model.config
        json.dump({**json.load(open(os.path.join(TINY, f"{family}.json"))), **overrides}, f)
    # A trainer-layout model-only checkpoint: get_model_state_dict's flat keys.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    source = {k: v.clone() for k, v in get_model_state_dict(model).items()}
    dcp.save(source, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)

    hf, back = tmp_path / "hf", tmp_path / "back" / "step-0"
    convert_ok(capsys, DCP_TO_HF, "--checkpoint", tmp_path / "ckpt", "--config", config_file, "--output", hf,
               "--max-shard-size", "200KB")
    assert os.path.isfile(hf / "model.safetensors.index.json")  # several shards
    stored = hf_tensors(hf)
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in stored  # HF stores a tied tensor once
    loaded = load_hf(hf)
    assert_identical({k: v for k, v in loaded.state_dict().items()},
                     as_transformers_holds(source) if family == "olmo_hybrid" else source)
    if overrides.get("tie_word_embeddings"):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    convert_ok(capsys, HF_TO_DCP, "--hf", hf, "--output", back)
    assert_identical(dcp_tensors(back), source)  # tied aliases included, as the trainer saves them


def test_olmo_hybrid_folder_saved_by_transformers_reads_under_the_model_names(tmp_path, capsys):
    """transformers 5.24's save_pretrained writes OLMo-Hybrid's block norms as attention_layer_norm /
    feedforward_layer_norm and its conv1d as q/k/v_conv1d of equal sizes (what it joins on load;
    the model's are 32/32/64); flare reads them as the tensors its model has, and writes them back
    under the names vLLM loads."""
    from transformers.models.olmo_hybrid.modeling_olmo_hybrid import OlmoHybridForCausalLM

    config = load_config(os.path.join(TINY, "olmo_hybrid.json"), "--config", byte_tokenizer())
    torch.manual_seed(0)
    model = OlmoHybridForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf")
    saved = hf_tensors(tmp_path / "hf")
    assert "model.layers.0.attention_layer_norm.weight" in saved
    assert [saved[f"model.layers.0.linear_attn.{c}_conv1d.weight"].shape[0] for c in "qkv"] == [43, 43, 42]
    convert_ok(capsys, HF_TO_DCP, "--hf", tmp_path / "hf", "--output", tmp_path / "dcp")
    back = dcp_tensors(tmp_path / "dcp")
    assert "model.layers.0.input_layernorm.weight" in back
    assert_identical(as_transformers_holds(back), model.state_dict())
    convert_ok(capsys, DCP_TO_HF, "--checkpoint", tmp_path / "dcp", "--config", tmp_path / "hf" / "config.json",
               "--output", tmp_path / "again")
    assert hf_tensors(tmp_path / "again").keys() == back.keys()


# --------------------------------------------------------------------------- 4. bad input


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny Llama as an HF folder and as a model-only DCP checkpoint."""
    root = tmp_path_factory.mktemp("sources")
    make_hf_folder(root / "hf", "llama")
    assert HF_TO_DCP.main(["--hf", str(root / "hf"), "--output", str(root / "dcp")]) == 0
    return root


def snapshot(folder):
    """Every folder and file (with its size) under `folder`."""
    entries = []
    for d, dirs, files in os.walk(folder):
        entries += [os.path.relpath(os.path.join(d, x), folder) + "/" for x in dirs]
        entries += [f"{os.path.relpath(os.path.join(d, x), folder)} {os.path.getsize(os.path.join(d, x))}" for x in files]
    return sorted(entries)


def corrupt(kind, src, dst):
    """A damaged copy of a checkpoint folder."""
    shutil.copytree(src, dst)
    if kind == "no_config":
        os.remove(dst / "config.json")
    elif kind == "truncated_safetensors":
        with open(dst / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(dst / "model.safetensors") // 2)
    elif kind == "garbled_safetensors":
        with open(dst / "model.safetensors", "r+b") as f:
            f.write(b"\xff" * 64)  # the header length and start of the JSON header
    elif kind == "wrong_model_type":
        config = json.load(open(dst / "config.json"))
        config.update(json.load(open(os.path.join(TINY, "gla.json"))))
        json.dump(config, open(dst / "config.json", "w"))
    elif kind == "truncated_distcp":
        (shard,) = [p for p in os.listdir(dst) if p.endswith(".distcp")]
        with open(dst / shard, "r+b") as f:
            f.truncate(1000)
    elif kind == "missing_distcp":
        for shard in [p for p in os.listdir(dst) if p.endswith(".distcp")]:
            os.remove(dst / shard)
    elif kind == "garbled_metadata":
        (dst / ".metadata").write_bytes(b"not a pickle")
    return dst


def expect_refusal(capsys, tmp_path, script, args, output, message):
    before = snapshot(tmp_path)
    rc, out, err = run(capsys, script, *args, "--output", output)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script.__name__}: error:"), err
    assert message in lines[0], lines[0]
    assert snapshot(tmp_path) == before  # no output, no temporary folder, inputs untouched


@pytest.mark.parametrize("kind,message", [
    ("missing", "no such folder"),
    ("no_config", "has no config.json"),
    ("truncated_safetensors", "cannot read shard"),
    ("garbled_safetensors", "cannot read shard"),
    ("wrong_model_type", "lacks"),
])
def test_hf_to_dcp_refuses_bad_input(tmp_path, capsys, sources, kind, message):
    src = tmp_path / "missing" if kind == "missing" else corrupt(kind, sources / "hf", tmp_path / "bad")
    expect_refusal(capsys, tmp_path, HF_TO_DCP, ["--hf", src], tmp_path / "out" / "step-0", message)


@pytest.mark.parametrize("kind,config,message", [
    ("missing", "llama", "no such folder"),
    ("ok", None, "has no config.json"),  # --config names a folder without config.json
    ("ok", "gla", "lacks"),  # another family's config
    ("ok", "llama_1_layer", "that model_type 'llama' lacks"),  # fewer layers than the checkpoint
    ("ok", "llama_hidden_64", "has shape"),
    ("truncated_distcp", "llama", "truncated"),
    ("missing_distcp", "llama", "is missing"),
    ("garbled_metadata", "llama", "cannot read"),
])
def test_dcp_to_hf_refuses_bad_input(tmp_path, capsys, sources, kind, config, message):
    if kind == "missing":
        ckpt = tmp_path / "missing"
    elif kind in ("truncated_distcp", "missing_distcp", "garbled_metadata"):
        ckpt = corrupt(kind, sources / "dcp", tmp_path / "bad")
    else:
        ckpt = sources / "dcp"
    if config is None:
        (tmp_path / "cfg").mkdir()
        config_path = tmp_path / "cfg"
    else:
        values = json.load(open(os.path.join(TINY, f"{config.split('_')[0]}.json")))
        values.update({"llama_1_layer": {"num_hidden_layers": 1},
                       "llama_hidden_64": {"hidden_size": 64, "head_dim": 32}}.get(config, {}))
        config_path = tmp_path / "config.json"
        json.dump(values, open(config_path, "w"))
    expect_refusal(capsys, tmp_path, DCP_TO_HF, ["--checkpoint", ckpt, "--config", config_path], tmp_path / "out", message)


@pytest.mark.skipif(fla.layers.attn.flash_attn_func is not None, reason="flash-attn is installed")
def test_transformer_without_flash_attn_is_refused_clearly(tmp_path, capsys, sources):
    expect_refusal(capsys, tmp_path, DCP_TO_HF, ["--checkpoint", sources / "dcp", "--config",
                   os.path.join(TINY, "transformer.json")], tmp_path / "out", "install Flash Attention")


def test_non_empty_output_needs_overwrite(tmp_path, capsys, sources):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, err = run(capsys, DCP_TO_HF, "--checkpoint", sources / "dcp", "--config", sources / "hf", "--output", out)
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert os.listdir(out) == ["keep.txt"]
    rc, _, err = run(capsys, HF_TO_DCP, "--hf", sources / "hf", "--output", out)
    assert rc == 1 and "--overwrite" in err and os.listdir(out) == ["keep.txt"]

    convert_ok(capsys, DCP_TO_HF, "--checkpoint", sources / "dcp", "--config", sources / "hf", "--output", out,
               "--overwrite")
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the replaced folder is gone too


def test_real_exit_codes(tmp_path, sources):
    """As commands: exit code 1 and the error as the last stderr line (import-time warnings of
    the CPU stack may come before it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    early = subprocess.run([sys.executable, "scripts/tools/convert_hf_to_dcp.py", "--hf", str(tmp_path / "nope"),
                            "--output", str(out)], cwd=ROOT, capture_output=True, text=True, env=env)
    assert early.returncode == 1
    assert early.stderr.splitlines() == [f"convert_hf_to_dcp: error: --hf: no such folder '{tmp_path / 'nope'}'"]
    late = subprocess.run([sys.executable, "scripts/tools/convert_dcp_to_hf.py", "--checkpoint", str(sources / "dcp"),
                           "--config", os.path.join(TINY, "gla.json"), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert late.returncode == 1
    errors = [line for line in late.stderr.splitlines() if line.startswith("convert_dcp_to_hf:")]
    assert len(errors) == 1 and late.stderr.splitlines()[-1] == errors[0], late.stderr
    assert errors[0].startswith("convert_dcp_to_hf: error: checkpoint") and "lacks" in errors[0]
    assert not out.exists()
