"""The parts of scripts/tools/check_vllm.py that run without vLLM: how it reads vLLM's parameters
back under HF names (packed modules split, loader transforms), and its refusals before vLLM starts."""

import json
import subprocess
import sys
from types import SimpleNamespace

import torch

from scripts.tools.check_vllm import as_engine_holds, engine_weights
from tests.rollout.test_rollout_units import ROOT


class Packed(torch.nn.Module):
    """A vLLM merged linear: one weight, ``output_sizes`` rows per packed HF weight."""

    def __init__(self, sizes, cols):
        super().__init__()
        self.output_sizes = sizes
        self.weight = torch.nn.Parameter(torch.randn(sum(sizes), cols))


def test_engine_weights_split_vllm_packed_modules_back_into_hf_names():
    layer = torch.nn.Module()
    layer.self_attn = torch.nn.Module()
    layer.self_attn.qkv_proj = Packed([8, 4, 4], 8)
    layer.mlp = torch.nn.Module()
    layer.mlp.gate_up_proj = Packed([12, 12], 8)
    layer.mlp.down_proj = torch.nn.Linear(12, 8, bias=False)
    model = torch.nn.Module()
    model.layer = layer
    model.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    got = engine_weights(SimpleNamespace(model_runner=SimpleNamespace(model=model)))
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    assert sorted(got) == sorted(["layer.self_attn.q_proj.weight", "layer.self_attn.k_proj.weight",
                                  "layer.self_attn.v_proj.weight", "layer.mlp.gate_proj.weight",
                                  "layer.mlp.up_proj.weight", "layer.mlp.down_proj.weight"])
    assert torch.equal(got["layer.self_attn.k_proj.weight"], qkv[8:12])
    assert torch.equal(got["layer.self_attn.v_proj.weight"], qkv[12:])
    assert torch.equal(got["layer.mlp.up_proj.weight"], gate_up[12:])


class OlmoHybridGatedDeltaNetAttention(torch.nn.Module):
    """vLLM's OLMo-Hybrid mixer as far as check_vllm reads it: one conv1d stacking q/k/v's filters."""

    def __init__(self):
        super().__init__()
        self.key_dim, self.value_dim = 4, 8
        self.conv1d = torch.nn.Module()
        self.conv1d.weight = torch.nn.Parameter(torch.randn(16, 1, 3))
        self.in_proj_qkvg = Packed([4, 4, 8, 8], 6)


def test_engine_weights_split_olmo_hybrid_stacked_convs_back_into_hf_names():
    model = torch.nn.Module()
    model.linear_attn = OlmoHybridGatedDeltaNetAttention()
    model.packed_modules_mapping = {"in_proj_qkvg": ["q_proj", "k_proj", "v_proj", "g_proj"]}
    got = engine_weights(SimpleNamespace(model_runner=SimpleNamespace(model=model)))
    conv, qkvg = model.linear_attn.conv1d.weight, model.linear_attn.in_proj_qkvg.weight
    assert sorted(got) == sorted(f"linear_attn.{n}.weight" for n in
                                 ("q_conv1d", "k_conv1d", "v_conv1d", "q_proj", "k_proj", "v_proj", "g_proj"))
    assert torch.equal(got["linear_attn.k_conv1d.weight"], conv[4:8])
    assert torch.equal(got["linear_attn.v_conv1d.weight"], conv[8:])
    assert torch.equal(got["linear_attn.g_proj.weight"], qkvg[16:])


def test_a_weight_vllm_stores_transformed_is_compared_in_its_engine_form():
    a_log = torch.randn(4, dtype=torch.bfloat16)
    engine = {"backbone.layers.0.mixer.A": -a_log.float().exp(), "backbone.layers.0.mixer.D": torch.ones(4)}
    name, expected = as_engine_holds("backbone.layers.0.mixer.A_log", a_log, engine)
    assert name == "backbone.layers.0.mixer.A" and torch.equal(expected, engine[name])
    assert as_engine_holds("backbone.layers.0.mixer.D", engine["backbone.layers.0.mixer.D"], engine)[0].endswith(".D")
    assert as_engine_holds("backbone.layers.0.mixer.dt_bias", a_log, engine) == (None, None)


def test_check_vllm_refuses_a_head_size_vllm_cannot_serve_before_starting_anything(tmp_path):
    with open(f"{ROOT}/configs/tiny/llama.json") as f:
        config = json.load(f)
    config.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=4)  # head size 16
    path = tmp_path / "small_heads.json"
    path.write_text(json.dumps(config))
    out = subprocess.run([sys.executable, "scripts/tools/check_vllm.py", "--model_config", str(path), "--work",
                          str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"check_vllm: {path}: head size 16 < 32, which vLLM's Triton attention "
                                               "cannot serve; use a config with head_dim >= 32 (e.g. "
                                               "configs/llama_360M.json)"]


def test_check_vllm_nccl_needs_the_trainer_on_another_gpu():
    out = subprocess.run([sys.executable, "scripts/tools/check_vllm.py", "--transports", "ipc,nccl"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "check_vllm: --transports nccl puts the trainer on another GPU than the engine: pass --trainer_devices "
        "(and CUDA_VISIBLE_DEVICES for the engine)"]


def test_the_engine_folder_is_configured_as_the_hf_export_so_transformers_builds_the_trainers_shapes(tmp_path):
    """vLLM builds the engine from config.json with transformers' config class; fla's Mamba2 config
    leaves num_heads to be derived (transformers' default is 128), so the raw JSON would give vLLM
    other shapes than the trainer's."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from recipe import hf_io
    from scripts.tools.check_vllm import hf_dir_for

    folder = hf_dir_for(f"{ROOT}/configs/tiny/mamba2.json", str(tmp_path))
    written = json.load(open(f"{folder}/config.json"))
    assert written["architectures"] == ["Mamba2ForCausalLM"]
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (256, 257, 258)
    config = Mamba2Config.from_pretrained(folder)
    trainer = hf_io.model_spec(hf_io.load_config(f"{ROOT}/configs/tiny/mamba2.json", "x",
                                                 hf_io.load_tokenizer("bytes")))
    with torch.device("meta"):
        engine_shapes = {k: v.shape for k, v in Mamba2ForCausalLM(config).state_dict().items()}
    assert engine_shapes == {k: v for k, v in trainer.shapes.items() if k in engine_shapes}
    assert set(trainer.shapes) - set(engine_shapes) <= set(trainer.tied)
