"""Meta-device build + to_empty + init_weights gives a sane, fully initialized model."""

import glob

import pytest
import torch
import torch.nn.functional as F

import sdpa_flash_attn  # tests/
from recipe.model import build_model_on_meta, init_weights, load_model_config

TINY = sorted(p for p in glob.glob("configs/tiny/*.json") if not p.endswith("transformer.json"))


@pytest.mark.parametrize("path", TINY + ["configs/gla_debug.json"])
def test_every_parameter_and_buffer_is_initialized(path):
    config = load_model_config(path)
    config.tie_word_embeddings = True  # exercise re-tying for every family
    with sdpa_flash_attn.installed():  # samba's attention layers refuse to build without flash-attn
        model = build_model_on_meta(config)
    # Poison the fresh storage so that anything init_weights misses is visible.
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
    init_weights(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{path}: {name} was not initialized"
            assert t.abs().max() < 100, f"{path}: {name} has absurd values"
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_rope_buffers_match_a_cpu_built_model():
    config = load_model_config("configs/tiny/llama.json")
    model = build_model_on_meta(config)
    model.to_empty(device="cpu")
    init_weights(model)
    reference = type(model)(config)
    for (name, buf), (_, ref) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(buf, ref, msg=name)


@pytest.mark.parametrize("family", ["mamba", "samba"])
def test_mamba1_init_writes_into_fsdp_sharded_parameters(family, single_process_group):
    """fla's Mamba1 init copies plain tensors into A_log and replaces dt_proj.bias' data, which a
    DTensor refuses (FSDP, TP); init_weights runs it on whole tensors and keeps each rank's shard.
    samba's init leaves A_log and D to the constructor: init_weights sets them as it does."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    config = load_model_config(f"configs/tiny/{family}.json")
    with sdpa_flash_attn.installed():
        model = build_model_on_meta(config)
    mesh = init_device_mesh("cpu", (1,))
    for block in model.backbone.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    init_weights(model)
    mixer = model.backbone.layers[0].mixer
    assert all(isinstance(p, DTensor) for p in model.parameters())
    states = torch.arange(1, mixer.ssm_state_size + 1, dtype=torch.float32)
    torch.testing.assert_close(mixer.A_log.full_tensor(), states.log().expand(mixer.intermediate_size, -1))
    assert (mixer.D.full_tensor() == 1).all()
    dt = F.softplus(mixer.dt_proj.bias.full_tensor())  # drawn log-uniformly in [dt_min, dt_max]
    dt_min, dt_max = (config.dt_min, config.dt_max) if family == "mamba" else (config.time_step_min,
                                                                                 config.time_step_max)
    assert dt_min * 0.99 < dt.min() < dt.max() < dt_max * 1.01 and dt.std() > 0
    assert mixer.A_log._no_weight_decay and mixer.D._no_weight_decay and mixer.dt_proj.bias._no_reinit
