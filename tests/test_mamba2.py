"""Mamba2 (fla's ``mamba2``): which class flare builds, and the two settings it refuses, each with
the behaviour of fla 0.6 that makes it necessary (a test here fails when fla changes it)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from recipe.errors import ConfigError
from recipe.model import build_model_on_meta, check_model_config, check_varlen, load_model_config

TINY = "configs/tiny/mamba2.json"


def tiny(**overrides):
    cfg = load_model_config(TINY)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_model_type_mamba2_builds_fla_mamba2():
    # transformers has a "mamba2" too; fla registers its own with exist_ok=True when imported
    # (recipe.model.load_model_config imports fla first), which replaces transformers' entry.
    cfg = load_model_config(TINY)
    assert type(cfg).__module__ == "fla.models.mamba2.configuration_mamba2"
    assert type(build_model_on_meta(cfg)).__module__ == "fla.models.mamba2.modeling_mamba2"


def _ssm_heavy_mixer(n_groups):
    """Layer 0 of a tiny fla Mamba2 whose output is dominated by the SSM (dt ~ 0.7, no D skip)."""
    torch.manual_seed(0)
    cfg = tiny()
    cfg.n_groups = n_groups
    mixer = AutoModelForCausalLM.from_config(cfg).backbone.layers[0].mixer
    with torch.no_grad():
        mixer.dt_bias.zero_()
        mixer.D.zero_()
        mixer.in_proj.weight.normal_(0, 0.3)
    return mixer


def _mixer_by_recurrence(mixer, x, group_of_head):
    """fla's Mamba2 mixer written out step by step, head h reading B/C group ``group_of_head[h]``."""
    inner, groups, state, heads, head_dim = (mixer.intermediate_size, mixer.n_groups, mixer.ssm_state_size,
                                             mixer.num_heads, mixer.head_dim)
    seq = x.shape[1]
    z, xbc, dt = mixer.in_proj(x).split([inner, inner + 2 * groups * state, heads], -1)
    xbc = F.silu(mixer.conv1d(xbc.transpose(1, 2))[..., :seq].transpose(1, 2))
    xs, B, C = xbc.split([inner, groups * state, groups * state], -1)
    dt, A = F.softplus(dt + mixer.dt_bias), -torch.exp(mixer.A_log)
    xs, B, C = xs.view(1, seq, heads, head_dim), B.view(1, seq, groups, state), C.view(1, seq, groups, state)
    h, ys = torch.zeros(heads, head_dim, state), []
    for t in range(seq):
        h = torch.exp(dt[0, t, :, None, None] * A[:, None, None]) * h
        h = h + dt[0, t, :, None, None] * xs[0, t, :, :, None] * B[0, t, group_of_head][:, None, :]
        ys.append((h * C[0, t, group_of_head][:, None, :]).sum(-1) + mixer.D[:, None] * xs[0, t])
    return mixer.out_proj(mixer.norm(torch.stack(ys).reshape(1, seq, inner), z))


@torch.no_grad()
def test_fla_training_path_pairs_heads_with_groups_unlike_mamba():
    """Why n_groups > 1 is refused: fla 0.6's torch SSD path (the one flare trains with, without
    mamba_ssm and under TP) gives head h the group h % n_groups (``B.repeat``); Mamba2 as mamba_ssm,
    transformers and vLLM compute it gives head h the group h // (num_heads / n_groups)."""
    mixer = _ssm_heavy_mixer(n_groups=2)
    x = torch.randn(1, 40, mixer.hidden_size)  # 3 chunks of 16
    fla_out, _, _ = mixer.torch_forward(x)
    heads = torch.arange(mixer.num_heads)
    tiled = _mixer_by_recurrence(mixer, x, heads % 2)
    mamba = _mixer_by_recurrence(mixer, x, heads // (mixer.num_heads // 2))
    torch.testing.assert_close(fla_out, tiled, rtol=1e-4, atol=1e-5)
    assert (fla_out - mamba).abs().max() > 100 * (fla_out - tiled).abs().max()
    # With one group both pairings are the same, and fla's path is the recurrence.
    mixer = _ssm_heavy_mixer(n_groups=1)
    fla_out, _, _ = mixer.torch_forward(x)
    torch.testing.assert_close(fla_out, _mixer_by_recurrence(mixer, x, heads * 0), rtol=1e-4, atol=1e-5)


def test_n_groups_above_one_is_refused_in_one_line():
    check_model_config(tiny())
    with pytest.raises(ConfigError, match=r"^model\.config: n_groups=2: .*set n_groups=1$"):
        check_model_config(tiny(n_groups=2))


@torch.no_grad()
def test_fla_mamba2_ignores_cu_seqlens():
    """Why training.varlen is refused: a row of two packed documents gives the same outputs with
    and without their boundaries, so the second document's tokens see the first one's state."""
    torch.manual_seed(0)
    cfg = tiny()
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.dt_bias.zero_()  # make the state carry over noticeably
    ids = torch.randint(0, cfg.vocab_size, (1, 48))
    cu_seqlens = torch.tensor([0, 20, 48], dtype=torch.int32)
    packed = model(input_ids=ids, cu_seqlens=cu_seqlens).logits
    assert torch.equal(packed, model(input_ids=ids).logits)
    alone = model(input_ids=ids[:, 20:]).logits
    assert (packed[:, 20:] - alone).abs().max() > 1e-3


def test_varlen_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^training\.varlen: fla's mamba2 layer ignores cu_seqlens.*= false$"):
        check_varlen(tiny())
    check_varlen(load_model_config("configs/tiny/gla.json"))


@pytest.mark.parametrize("seq_len", [64, 100])  # whole chunks of fla's kernels, and a partial last one
def test_the_chunked_scan_equals_fla_naive_path_in_loss_and_gradients(seq_len):
    """recipe.mamba2_ssd runs the training scan on fla's chunk_simple_gla (Triton, here through its
    interpreter) instead of fla's naive PyTorch SSD; the model built by flare uses it."""
    import copy

    from recipe.mamba2_ssd import chunked_torch_forward
    from recipe.model import build_model

    torch.manual_seed(0)
    cfg = tiny()
    model = build_model(cfg, dtype=torch.float32)
    mixers = [layer.mixer for layer in model.backbone.layers]
    assert all(m.torch_forward.__func__ is chunked_torch_forward for m in mixers)
    with torch.no_grad():  # a scan that matters: large dt, decays far from 1, a D skip
        for m in mixers:
            m.dt_bias.fill_(0.5)
            m.A_log.uniform_(-1.0, 1.5)
            m.D.normal_()
            m.in_proj.weight.normal_(0, 0.2)
    naive = copy.deepcopy(model)
    for m in naive.modules():
        if hasattr(m, "A_log"):
            del m.torch_forward  # the class's own: fla's naive SSD
    assert all(m.torch_forward.__func__ is chunked_torch_forward for m in copy.deepcopy(model).modules()
               if hasattr(m, "A_log"))
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len))
    losses = []
    for m in (model, naive):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-5), losses
    for (name, p), q in zip(model.named_parameters(), naive.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), (name, (p.grad - q.grad).abs().max())
