"""Fast checks (one process): config validation, the plan registry, config preparation,
activation-checkpoint wrapping, compile settings, and the sharding each plan produces on the meta
device (a fake 2-rank process group)."""

import types

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils.checkpoint import CheckpointPolicy
from torchtitan.distributed import ParallelDims

import parallel_harness as H
from parallelisms import (
    TPPlan,
    get_tp_plan,
    make_plan,
    prepare_model_config,
    register_tp_plan,
    registered_model_types,
    validate_parallelism,
)
from parallelisms.activation_checkpoint import apply_ac, op_policy
from parallelisms.compile import apply_compile, raise_recompile_limit
from parallelisms.tensor_parallel import apply_tp
from parallelisms.tp_plans import registry
from recipe.errors import ConfigError

REGISTERED = ["delta_net", "gated_deltanet", "gla", "hgrn2", "llama", "mamba2", "olmo_hybrid", "qwen2", "qwen3",
              "retnet", "transformer"]


def job(family="gla", *, world=2, tp=1, dp_replicate=1, dp_shard=-1, extra=()):
    """A validated JobConfig for ``world`` ranks (dp_shard=-1 takes the rest)."""
    from recipe.config import parse_job_config

    args = ["--model.config", H.config_path(family), "--parallelism.tensor_parallel_degree", str(tp),
            "--parallelism.data_parallel_replicate_degree", str(dp_replicate),
            "--parallelism.data_parallel_shard_degree", str(dp_shard), "--training.seq_len", "32", *extra]
    return parse_job_config(args, world_size=world)


def dims(tp=1, dp_shard=1, dp_replicate=1):
    return ParallelDims(dp_shard=dp_shard, dp_replicate=dp_replicate, cp=1, tp=tp, pp=1, ep=1, etp=1,
                        world_size=tp * dp_shard * dp_replicate)


# ---------------------------------------------------------------- validate_parallelism


@pytest.mark.parametrize(
    "family,key",
    [("gla", "num_heads"), ("gated_deltanet", "num_heads"), ("delta_net", "num_heads"), ("retnet", "num_heads"),
     ("hgrn2", "num_heads"), ("llama", "num_attention_heads"), ("transformer", "num_heads")],
)
def test_tp_must_divide_heads(family, key):
    cfg = H.model_config(family)  # 2 heads; hidden, MLP and vocab are divisible by 4
    with pytest.raises(ConfigError, match=rf"^parallelism\.tensor_parallel_degree=4 does not divide {key}=2 "):
        validate_parallelism(cfg, job(family, world=4, tp=4), world_size=4)


@pytest.mark.parametrize(
    "family,overrides,key",
    [("gla", {"num_kv_heads": 1}, "num_kv_heads=1"), ("llama", {"num_key_value_heads": 1}, "num_key_value_heads=1"),
     ("gla", {"vocab_size": 511}, "vocab_size=511"), ("llama", {"intermediate_size": 129}, "intermediate_size=129"),
     ("olmo_hybrid", {"linear_num_key_heads": 1, "linear_num_value_heads": 1}, "linear_num_key_heads=1")],
)
def test_tp_must_divide_kv_heads_vocab_and_mlp(family, overrides, key):
    cfg = H.model_config(family, **overrides)
    with pytest.raises(ConfigError, match=rf"tensor_parallel_degree=2 does not divide {key}"):
        validate_parallelism(cfg, job(family, tp=2), world_size=2)


def test_valid_layouts_pass():
    cfg = H.model_config("gla")
    validate_parallelism(cfg, job(tp=2), world_size=2)
    validate_parallelism(cfg, job(world=8, tp=2, dp_replicate=2, dp_shard=2), world_size=8)  # HSDP x TP
    validate_parallelism(cfg, job(world=2, dp_replicate=2, dp_shard=1), world_size=2)  # DDP


def test_ddp_with_tp_is_refused():
    with pytest.raises(ConfigError, match=r"^parallelism\.data_parallel_replicate_degree=2 .*DDP cannot be combined"):
        validate_parallelism(H.model_config("gla"), job(world=4, tp=2, dp_replicate=2, dp_shard=1), world_size=4)


def test_unregistered_model_type_lists_plans():
    cfg = types.SimpleNamespace(model_type="rwkv7")
    with pytest.raises(ConfigError, match="model_type 'rwkv7' has no tensor-parallel plan") as e:
        validate_parallelism(cfg, job(tp=2), world_size=2)
    assert f"registered: {', '.join(REGISTERED)}" in str(e.value)
    assert "parallelism.tensor_parallel_degree=1" in str(e.value)
    validate_parallelism(cfg, job(world=2), world_size=2)  # without TP any model is fine


def test_mamba2_tp_refusals():
    cfg = H.model_config("mamba2", head_dim=64)  # expand 2 x hidden 64 / 64: 2 heads
    with pytest.raises(ConfigError, match=r"^parallelism\.tensor_parallel_degree=4 does not divide num_heads=2 "):
        validate_parallelism(cfg, job("mamba2", world=4, tp=4), world_size=4)
    with pytest.raises(ConfigError, match=r"^parallelism\.tensor_parallel_degree=2: .*n_groups=2 .*set n_groups=1$"):
        validate_parallelism(H.model_config("mamba2", n_groups=2), job("mamba2", tp=2), world_size=2)
    validate_parallelism(H.model_config("mamba2"), job("mamba2", tp=2), world_size=2)


def test_other_refusals():
    with pytest.raises(ConfigError, match="attention residuals"):
        validate_parallelism(H.model_config("gla", attnres_block_size=2), job(tp=2), world_size=2)
    with pytest.raises(ConfigError, match=r"^parallelism\.disable_loss_parallel=false: .*use_l2warp"):
        validate_parallelism(H.model_config("gla", use_l2warp=True), job(tp=2), world_size=2)
    with pytest.raises(ConfigError, match=r"^training\.enable_cpu_offload needs FSDP"):
        validate_parallelism(H.model_config("gla"), job(tp=2, extra=("--training.enable_cpu_offload",)),
                             world_size=2)


# ---------------------------------------------------------------- registry


def test_registry_lists_every_family():
    assert registered_model_types() == REGISTERED
    assert get_tp_plan("qwen2") is get_tp_plan("llama")


def test_register_custom_plan():
    @register_tp_plan("my_gla")
    class MyPlan(get_tp_plan("gla")):
        pass

    try:
        assert get_tp_plan("my_gla") is MyPlan and MyPlan.model_type == "my_gla"
        register_tp_plan("my_gla")(MyPlan)  # same class again: fine
        with pytest.raises(ValueError, match="already has the plan MyPlan"):
            register_tp_plan("my_gla")(type("Other", (TPPlan,), {}))
        with pytest.raises(TypeError, match="TPPlan subclass"):
            register_tp_plan("not_a_plan")(object)
    finally:
        registry._PLANS.pop("my_gla", None)


# ---------------------------------------------------------------- prepare_model_config


def test_prepare_model_config_switches():
    cfg = H.model_config("gla", fuse_cross_entropy=True, use_cache=True)
    switched = prepare_model_config(cfg, dims(tp=2), job(tp=2))
    assert not cfg.fuse_cross_entropy and not cfg.use_cache
    assert [m.split(":")[0] for m in switched] == ["use_cache=False", "fuse_cross_entropy=False"]

    cfg = H.model_config("gla", fuse_cross_entropy=True)
    assert prepare_model_config(cfg, dims(tp=2), job(tp=2, extra=("--parallelism.disable_loss_parallel",))) == []
    assert cfg.fuse_cross_entropy  # logits are whole without loss parallelism: the fused CE works
    assert prepare_model_config(cfg, dims(dp_shard=2), job()) == [] and cfg.fuse_cross_entropy


# ---------------------------------------------------------------- activation checkpointing


def _ac_config(mode, option="2"):
    return job("llama", extra=("--activation_checkpoint.mode", mode,
                               "--activation_checkpoint.selective_ac_option", option)).activation_checkpoint


@pytest.mark.parametrize(
    "mode,option,wrapped",
    [("none", "2", []), ("full", "2", [0, 1, 2, 3]), ("selective", "op", [0, 1, 2, 3]),
     ("selective", "1", [0, 1, 2, 3]), ("selective", "2", [1, 3]), ("selective", "3", [2])],
)
@pytest.mark.parametrize("family", ["llama", "mamba2", "olmo_hybrid"])
def test_ac_wraps_the_right_blocks(mode, option, wrapped, family):
    for _ in range(2):  # a second model gets the same layers: no counter leaks across calls
        cfg = H.model_config(family, num_hidden_layers=4)
        model = H.build(cfg)
        blocks = make_plan(cfg, job(family), 1).blocks(model)
        assert apply_ac(blocks, _ac_config(mode, option)) == len(wrapped)
        assert [i for i, b in enumerate(blocks) if isinstance(b, CheckpointWrapper)] == wrapped


def test_op_policy_saves_every_other_matmul_per_context():
    aten = torch.ops.aten
    forward, recompute = types.SimpleNamespace(is_recompute=False), types.SimpleNamespace(is_recompute=True)
    save, recompute_ = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    policy = op_policy()
    assert [policy(forward, aten.mm.default) for _ in range(4)] == [save, recompute_, save, recompute_]
    assert policy(recompute, aten.mm.default) == save  # recomputation counts on its own
    assert policy(forward, aten.add.Tensor) == recompute_
    assert policy(forward, aten._scaled_dot_product_flash_attention_for_cpu.default) == save
    assert op_policy()(forward, aten.mm.default) == save  # a new context starts afresh


def test_recompile_limit_grows_with_layers():
    cfg = torch._dynamo.config
    old = cfg.recompile_limit, cfg.accumulated_recompile_limit
    try:
        raise_recompile_limit(48)
        assert cfg.recompile_limit >= 48 and cfg.accumulated_recompile_limit >= 4 * 48
    finally:
        cfg.recompile_limit, cfg.accumulated_recompile_limit = old


# A kernel launch of fla each family's blocks make: (module, function). OLMo-Hybrid has no fla
# module, only transformers' mixer calling fla's chunked delta rule.
FLA_LAUNCH = {"olmo_hybrid": ("fla.ops.gated_delta_rule.chunk", "chunk_gated_delta_rule_fwd")}


def _compile_tiny(family: str, n_layers: int, monkeypatch) -> dict:
    """Compile a tiny model's blocks with apply_compile and run it once: dynamo's graph count,
    whether dynamo traced into an fla kernel launch (RMSNorm's unless FLA_LAUNCH says), and the
    largest logit difference."""
    import importlib

    from torch._dynamo.utils import counters

    from recipe.model import build_model

    module, fn = FLA_LAUNCH.get(family, ("fla.modules.norm.layernorm", "layer_norm_fwd"))
    fla_module = importlib.import_module(module)
    traced = []
    launch = getattr(fla_module, fn)

    def spy(*args, **kwargs):  # a plain function: dynamo traces it like the code around it
        traced.append(torch.compiler.is_compiling())
        return launch(*args, **kwargs)

    monkeypatch.setattr(fla_module, fn, spy)
    torch._dynamo.reset()
    counters.clear()
    cfg = H.model_config(family, num_hidden_layers=n_layers)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 80))  # > 64 tokens: GLA's chunked kernels; Mamba2: 5 chunks
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        traced.clear()
        apply_compile(make_plan(cfg, job(family), 1).blocks(model), types.SimpleNamespace(backend="eager"))
        compiled = model(input_ids=ids).logits
    return {"graphs": counters["stats"]["unique_graphs"], "launches": len(traced), "traced": any(traced),
            "diff": (compiled - eager).abs().max().item()}


@pytest.mark.parametrize("family", ["gla", "mamba2", "olmo_hybrid"])
def test_compile_keeps_fla_kernels_opaque(family, monkeypatch):
    """Dynamo compiles the torch code around fla's kernels and never traces into them (it used to,
    and handed the Triton kernels to inductor: minutes of compiling; on CPU, Triton's interpreter
    is not even traceable), and fla blocks compile once, not once per ``layer_idx``."""
    cfg = torch._dynamo.config
    old = cfg.allow_unspec_int_on_nn_module
    try:
        two, four = _compile_tiny(family, 2, monkeypatch), _compile_tiny(family, 4, monkeypatch)
    finally:
        cfg.allow_unspec_int_on_nn_module = old
        torch._dynamo.reset()
    assert two["launches"] > 0 and not two["traced"] and not four["traced"]
    assert two["graphs"] == four["graphs"] > 0
    assert two["diff"] == 0.0 and four["diff"] == 0.0


# ---------------------------------------------------------------- plans on the meta device


@pytest.fixture
def tp_mesh():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        yield init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    finally:
        dist.destroy_process_group()


R, S0, S1 = Replicate(), Shard(0), Shard(1)
EXPECTED = {
    # model: (config file, overrides, {parameter: placement}, {layer-0 mixer attribute: local value})
    "gla": ("gla", {"use_short_conv": True}, {
        "model.embeddings.weight": S0, "lm_head.weight": S0, "model.norm.weight": R,
        "model.layers.0.attn_norm.weight": R, "model.layers.0.attn.q_proj.weight": S0,
        "model.layers.0.attn.k_proj.weight": S0, "model.layers.0.attn.g_proj.weight": S0,
        "model.layers.0.attn.gk_proj.0.weight": R, "model.layers.0.attn.gk_proj.1.weight": S0,
        "model.layers.0.attn.gk_proj.1.bias": S0, "model.layers.0.attn.q_conv1d.weight": S0,
        "model.layers.0.attn.g_norm_swish_gate.weight": R, "model.layers.0.attn.o_proj.weight": S1,
        "model.layers.0.mlp.gate_proj.weight": S0, "model.layers.0.mlp.down_proj.weight": S1,
    }, {"num_heads": 1, "key_dim": 16, "value_dim": 32}),
    "gated_deltanet": ("gated_deltanet", {}, {
        "model.layers.0.attn.A_log": S0, "model.layers.0.attn.dt_bias": S0, "model.layers.0.attn.a_proj.weight": S0,
        "model.layers.0.attn.b_proj.weight": S0, "model.layers.0.attn.v_conv1d.weight": S0,
        "model.layers.0.attn.o_norm.weight": R, "model.layers.0.attn.o_proj.weight": S1,
    }, {"num_heads": 1, "num_v_heads": 1, "key_dim": 32, "value_dim": 64}),
    "delta_net": ("delta_net", {}, {
        "model.layers.0.attn.b_proj.weight": S0, "model.layers.0.attn.k_conv1d.weight": S0,
        "model.layers.0.attn.o_norm.weight": R, "model.layers.0.attn.o_proj.weight": S1,
    }, {"num_heads": 1, "key_dim": 32}),
    "retnet": ("retnet", {}, {
        "model.layers.0.attn.q_proj.weight": S0, "model.layers.0.attn.g_proj.weight": S0,
        "model.layers.0.attn.g_norm_swish_gate.weight": R, "model.layers.0.attn.o_proj.weight": S1,
    }, {"num_heads": 1}),
    "hgrn2": ("hgrn2", {}, {
        "model.lower_bounds": S1, "model.layers.0.attn.f_proj.weight": S0, "model.layers.0.attn.i_proj.weight": S0,
        "model.layers.0.attn.g_norm.weight": R, "model.layers.0.attn.o_proj.weight": S1,
    }, {"num_heads": 1, "forget_dim": 32}),
    "transformer": ("transformer", {}, {
        "model.layers.0.attn.q_proj.weight": S0, "model.layers.0.attn.k_proj.weight": S0,
        "model.layers.0.attn.o_proj.weight": S1, "model.layers.0.mlp.up_proj.weight": S0,
    }, {"num_heads": 1, "num_kv_heads": 1}),
    # in_proj/conv1d pack several segments: stored row-sharded, each rank computes with its rows
    # of every segment (test_mamba2_rows_of_each_segment); its counts are local only inside forward.
    "mamba2": ("mamba2", {}, {
        "backbone.embeddings.weight": S0, "backbone.norm_f.weight": R, "lm_head.weight": S0,
        "backbone.layers.0.norm.weight": R, "backbone.layers.0.mixer.in_proj.weight": S0,
        "backbone.layers.0.mixer.conv1d.weight": S0, "backbone.layers.0.mixer.conv1d.bias": S0,
        "backbone.layers.0.mixer.A_log": S0, "backbone.layers.0.mixer.dt_bias": S0, "backbone.layers.0.mixer.D": S0,
        "backbone.layers.0.mixer.norm.weight": S0, "backbone.layers.0.mixer.out_proj.weight": S1,
    }, {"num_heads": 8, "intermediate_size": 128}),
    "llama": ("llama", {}, {
        "model.embed_tokens.weight": S0, "model.layers.0.input_layernorm.weight": R,
        "model.layers.0.self_attn.q_proj.weight": S0, "model.layers.0.self_attn.o_proj.weight": S1,
        "model.layers.0.mlp.down_proj.weight": S1, "lm_head.weight": S0,
    }, {}),
    "qwen3": ("llama", {"model_type": "qwen3"}, {
        "model.layers.0.self_attn.q_norm.weight": R, "model.layers.0.self_attn.k_proj.weight": S0,
    }, {}),
    # layer 0: Gated DeltaNet (the gated_deltanet plan's mixer); layer 1: attention whose q/k norms
    # span all heads, so their weights are sharded with the heads
    "olmo_hybrid": ("olmo_hybrid", {}, {
        "model.embed_tokens.weight": S0, "lm_head.weight": S0, "model.norm.weight": R,
        "model.layers.0.input_layernorm.weight": R, "model.layers.0.post_attention_layernorm.weight": R,
        "model.layers.0.linear_attn.q_proj.weight": S0, "model.layers.0.linear_attn.g_proj.weight": S0,
        "model.layers.0.linear_attn.a_proj.weight": S0, "model.layers.0.linear_attn.q_conv1d.weight": S0,
        "model.layers.0.linear_attn.v_conv1d.weight": S0, "model.layers.0.linear_attn.A_log": S0,
        "model.layers.0.linear_attn.dt_bias": S0, "model.layers.0.linear_attn.o_norm.weight": R,
        "model.layers.0.linear_attn.o_proj.weight": S1, "model.layers.0.mlp.down_proj.weight": S1,
        "model.layers.1.self_attn.q_norm.weight": S0, "model.layers.1.self_attn.k_norm.weight": S0,
        "model.layers.1.self_attn.v_proj.weight": S0, "model.layers.1.self_attn.o_proj.weight": S1,
        "model.layers.1.post_attention_layernorm.weight": R, "model.layers.1.post_feedforward_layernorm.weight": R,
    }, {"linear_attn.key_dim": 16, "linear_attn.value_dim": 32}),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_plan_shards_heads(tp_mesh, name, monkeypatch):
    import fla.layers.attn

    monkeypatch.setattr(fla.layers.attn, "flash_attn_func", object())  # only to construct (never run) it
    file, overrides, placements, local = EXPECTED[name]
    cfg = H.model_config(file, **overrides)
    model = H.build(cfg)
    plan = make_plan(cfg, job(file, tp=2), 2)
    apply_tp(model, tp_mesh, plan)
    params = dict(model.named_parameters())
    assert all(isinstance(p, DTensor) for p in params.values())
    for pname, placement in placements.items():
        assert params[pname].placements == (placement,), pname
    block = plan.blocks(model)[0]
    for attr, value in local.items():
        path, _, leaf = attr.rpartition(".")  # relative to the block, or to its mixer (attn_name)
        assert getattr(block.get_submodule(path or plan.attn_name), leaf) == value, attr


def test_mamba2_rows_of_each_segment():
    """Rank r's rows of in_proj ([z | x | B | C | dt]) and conv1d ([x | B | C]): its heads' slice of
    z, x and dt, and the one group of B/C, which every rank takes whole (vLLM's layout too)."""
    from parallelisms.tp_plans.mamba2 import packed_rows

    mixer = types.SimpleNamespace(intermediate_size=8, num_heads=4, n_groups=1, ssm_state_size=3)
    segments = {"z": range(0, 8), "x": range(8, 16), "B": range(16, 19), "C": range(19, 22), "dt": range(22, 26)}
    for rank in range(2):
        rows = packed_rows(mixer, rank, 2)
        got = [i for a, b in rows["in_proj"] for i in range(a, b)]
        heads = slice(4 * rank, 4 * rank + 4)
        assert got == [*segments["z"][heads], *segments["x"][heads], *segments["B"], *segments["C"],
                       *segments["dt"][2 * rank:2 * rank + 2]]
        conv = [i for a, b in rows["conv1d"] for i in range(a, b)]
        assert conv == [*range(4 * rank, 4 * rank + 4), *range(8, 14)]
    # Groups that TP divides are sharded with their heads (4 heads, 2 groups: one each).
    mixer.n_groups = 2
    assert packed_rows(mixer, 1, 2)["in_proj"][2:4] == [(16 + 3, 16 + 6), (22 + 3, 22 + 6)]


def test_tied_embeddings_stay_tied(tp_mesh):
    cfg = H.model_config("llama", tie_word_embeddings=True)
    model = H.build(cfg)
    apply_tp(model, tp_mesh, make_plan(cfg, job("llama", tp=2), 2))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.placements == (S0,)


def test_fused_linear_cross_entropy_gets_a_criterion(tp_mesh):
    from fla.modules import FusedLinearCrossEntropyLoss

    cfg = H.model_config("gla", fuse_linear_cross_entropy=True)
    model = H.build(cfg)
    apply_tp(model, tp_mesh, make_plan(cfg, job(tp=2), 2))
    assert isinstance(model.criterion, FusedLinearCrossEntropyLoss)
    assert model.lm_head.weight.placements == (S0,)


def test_float8_uses_torchao_styles():
    from torch.distributed.tensor.parallel import PrepareModuleInput
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    cfg = H.model_config("llama")
    tensorwise = job("llama", tp=2, extra=("--model.converters", "quantize.linear.float8"))
    rowwise = job("llama", tp=2, extra=("--model.converters", "quantize.linear.float8",
                                        "--quantize.linear.float8.recipe_name", "rowwise"))
    assert make_plan(cfg, tensorwise, 2).float8 and not make_plan(cfg, rowwise, 2).float8
    model = H.build(cfg)
    plan = make_plan(cfg, tensorwise, 2).layer_plan(model.model.layers[0])
    assert isinstance(plan["self_attn.q_proj"], Float8ColwiseParallel)
    assert isinstance(plan["mlp.down_proj"], Float8RowwiseParallel)
    assert isinstance(plan["mlp"], PrepareFloat8ModuleInput)  # float8 all-gather of the MLP input

    # fla's MLP runs its fused kernels outside compiled graphs: its input is gathered in bf16.
    gla_cfg = H.model_config("gla")
    gla_plan = make_plan(gla_cfg, job("gla", tp=2, extra=("--model.converters", "quantize.linear.float8")), 2)
    mlp_plan = gla_plan.layer_plan(H.build(gla_cfg).model.layers[0])
    prepare = mlp_plan["mlp"][0] if isinstance(mlp_plan["mlp"], tuple) else mlp_plan["mlp"]
    assert type(prepare) is PrepareModuleInput and isinstance(mlp_plan["mlp.gate_proj"], Float8ColwiseParallel)


def test_docs_example_plan(tp_mesh):
    """The worked example of docs/parallelisms.md registers and shards fla's SimpleGLA mixer."""
    import os
    import re

    from fla.layers.simple_gla import SimpleGatedLinearAttention

    from parallelisms.tensor_parallel import apply_plan

    with open(os.path.join(H.ROOT, "docs", "parallelisms.md")) as f:
        (code,) = re.findall(r"```python\n(from torch.distributed.tensor import Shard\n.*?)```", f.read(), re.S)
    try:
        exec(compile(code, "docs/parallelisms.md", "exec"), {})
        cfg = types.SimpleNamespace(model_type="my_simple_gla", num_heads=2, num_kv_heads=None, vocab_size=512,
                                    intermediate_size=128)
        plan = get_tp_plan("my_simple_gla")(cfg, 2)
        plan.validate()
        with torch.device("meta"):
            block = torch.nn.Module()
            block.attn = SimpleGatedLinearAttention(hidden_size=64, num_heads=2, use_short_conv=True)
        apply_plan(block.attn, tp_mesh, plan.attn_plan(block.attn))
        plan.localize(block)
        attn = block.attn
        assert attn.gk_proj.weight.placements == (S0,) and attn.gk_proj.bias.placements == (S0,)
        assert attn.q_conv1d.weight.placements == (S0,) and attn.o_proj.weight.placements == (S1,)
        assert attn.g_norm_swish_gate.weight.placements == (R,)
        assert (attn.num_heads, attn.key_dim) == (1, 32)
    finally:
        registry._PLANS.pop("my_simple_gla", None)


# ---------------------------------------------------------------- SDPA stand-in for flash-attn


def test_sdpa_flash_attn_standin_is_causal_gqa_attention():
    """tests/sdpa_flash_attn.py (fla's transformer in the parity runs) against attention written
    out: query head h reads kv head h // groups, causal, scale head_dim ** -0.5; varlen attends
    within each sequence; what it does not implement raises."""
    import sdpa_flash_attn as S

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7, n, 8, generator=g, dtype=torch.float64) for n in (4, 2, 2))

    def naive(q, k, v, window=None):
        kv = torch.arange(q.shape[2]) // (q.shape[2] // k.shape[2])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k[:, :, kv]) * q.shape[-1] ** -0.5
        causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
        if window is not None:  # query i sees keys i - window .. i
            causal &= ~torch.ones_like(causal).tril(-window - 1)
        return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), v[:, :, kv])

    torch.testing.assert_close(S.flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)), naive(q, k, v))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = S.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, causal=True)
    torch.testing.assert_close(packed, torch.cat([naive(q[:, :3], k[:, :3], v[:, :3])[0],
                                                  naive(q[:, 3:], k[:, 3:], v[:, 3:])[0]]))
    torch.testing.assert_close(S.flash_attn_func(q, k, v, causal=True, window_size=(2, 0)), naive(q, k, v, window=2))
    assert not torch.allclose(naive(q, k, v, window=2), naive(q, k, v))
    for bad in ({"window_size": (3, 1)}, {"window_size": (-1, 0)}, {"dropout_p": 0.1}, {"softcap": 1.0}):
        with pytest.raises(NotImplementedError):
            S.flash_attn_func(q, k, v, causal=True, **bad)
    with pytest.raises(NotImplementedError):
        S.flash_attn_func(q, k[:, :5], v[:, :5], causal=True)
