"""Clipping and the optimizer step on FSDP2's local shards (parallelisms/local_shards.py) give the
DTensor path's norms, weights and optimizer state bit for bit, on several ranks (FSDP over 2, HSDP
2 x 2), with uneven and empty shards; layouts whose local tensors cannot stand for the parameters
keep the DTensor path."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from recipe.net import free_port

STEPS, MAX_NORM = 3, 0.05


def _model() -> nn.Module:
    torch.manual_seed(0)
    # dim 0 of 3 and 1 rows: uneven shards over 2 ranks, and an empty one
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1), nn.Linear(1, 4))


def _train(mesh, rank: int, implementation: str, local: bool):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed import utils as dist_utils

    from parallelisms.local_shards import LocalShards

    model = _model()
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    params = list(model.parameters())
    shards = LocalShards.of(params)
    assert shards is not None and dist.get_world_size(shards.group) == 2
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, **{implementation: True})
    norms = []
    for step in range(STEPS):
        torch.manual_seed(100 * step + rank)  # each rank its own rows
        model(torch.randn(4, 6)).square().sum().backward()
        if local:
            norms.append(shards.clip_grad_norm_(params, MAX_NORM))
            with shards.stepping([optimizer]):
                optimizer.step()
        else:
            norms.append(dist_utils.clip_grad_norm_(params, MAX_NORM, foreach=True))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert all(isinstance(p, DTensor) for p in params)
    assert all(isinstance(v, DTensor) for st in optimizer.state.values() for k, v in st.items() if k != "step")
    weights = [p.full_tensor() for p in params]
    state = [v.full_tensor() if isinstance(v, DTensor) else v for st in optimizer.state.values() for v in st.values()]
    return norms, weights, state


def _worker(rank: int, world: int, port: int, mesh_shape: tuple[int, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        names = ("dp_replicate", "dp_shard")[-len(mesh_shape):]
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
        for implementation in ("foreach", "fused"):
            norms, weights, state = _train(mesh, rank, implementation, local=True)
            ref_norms, ref_weights, ref_state = _train(mesh, rank, implementation, local=False)
            assert min(ref_norms) > MAX_NORM, "clipping must be active on every step"
            for got, ref in ((norms, ref_norms), (weights, ref_weights), (state, ref_state)):
                assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref)), implementation
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [(2,), (2, 2)], ids=["fsdp2", "hsdp2x2"])
def test_local_shards_clip_and_step_like_dtensors_on_several_ranks(mesh_shape):
    world = math.prod(mesh_shape)
    mp.start_processes(_worker, args=(world, free_port(), mesh_shape), nprocs=world, join=True, start_method="spawn")


def test_layouts_without_local_shards_keep_the_dtensor_path(single_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from parallelisms.local_shards import LocalShards

    dist.init_process_group("gloo", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    assert LocalShards.of([]) is None
    assert LocalShards.of(nn.Linear(2, 2).parameters()) is None  # plain tensors (DDP, one device)
    # tensor parallelism: parameters with different placements
    mixed = [distribute_tensor(torch.ones(2, 2), mesh, [Shard(0)]), distribute_tensor(torch.ones(2), mesh, [Replicate()])]
    assert LocalShards.of(mixed) is None
    model = nn.Linear(4, 4)
    fully_shard(model, mesh=mesh)
    one_rank = LocalShards.of(model.parameters())
    assert one_rank is not None and one_rank.group is None  # one rank holds whole tensors: no reduction
