"""Pack a seeded tiny model's export buckets twice in each torchrun rank (gloo): from the plain
model, then after sharding it over all ranks, with ``DTensor.full_tensor`` counting its calls.
``--layout fsdp``: ``fully_shard`` per block and root; ``hsdp``: the same over a (replicas,
world / replicas) mesh (replicate, shard): with 2 replicas only rank 0's shard group gathers. ``--layout mixed``: every matrix split by rows or by columns in turn, vectors
replicated, so one bucket mixes the batched all-gather, the per-parameter ``full_tensor()`` and
local reads. Then, with ``--pack_errors``, one more pass (the model in one bucket) in which rank
0's packing fails at the first tensor: ``fill`` must still run the bucket's remaining collectives
(else the other rank hangs) and raise afterwards. Rank 0 writes what differs as JSON. Used by
tests/rollout/test_rollout_units.py.

    torchrun --nproc_per_node=2 tests/rollout/fsdp_fill.py --config configs/tiny/llama.json --out r.json
"""

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from recipe.model import load_model_config
from recipe.rollout.trainer.adapters import get_export_adapter
from recipe.rollout.trainer.source import WeightSource
from recipe.rollout.protocol import unpack
from recipe.shutdown import exit_without_finalizing
from tests.rollout.seeded_model import materialized


def packed(source: WeightSource) -> dict[str, torch.Tensor]:
    tensors = {}
    for plan in source.buckets:
        buf = torch.zeros(plan.nbytes, dtype=torch.uint8) if dist.get_rank() == 0 else None
        source.fill(plan, buf)
        if buf is not None:
            tensors.update((name, t.clone()) for name, t in unpack(buf, plan.metas))
    return tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", default="{}", help="JSON of config fields to override")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--engine_tp", type=int, default=1)
    ap.add_argument("--fused", action="store_true")
    ap.add_argument("--bucket_bytes", type=int, default=1 << 15)
    ap.add_argument("--layout", choices=["fsdp", "hsdp", "mixed"], default="fsdp")
    ap.add_argument("--replicas", type=int, default=1, help="hsdp: replicate dimension (the rest shards)")
    ap.add_argument("--pack_errors", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    cfg = load_model_config(args.config)
    for key, value in json.loads(args.set).items():
        setattr(cfg, key, value)
    model = materialized(cfg)
    adapter = get_export_adapter(cfg, getattr(torch, args.dtype), engine_tp=args.engine_tp, fused=args.fused)
    want = packed(WeightSource(model, adapter, args.bucket_bytes))

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if args.layout == "hsdp":
        mesh = init_device_mesh("cpu", (args.replicas, dist.get_world_size() // args.replicas),
                                mesh_dim_names=("replicate", "shard"))
    if args.layout in ("fsdp", "hsdp"):
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        matrices = 0
        for module in list(model.modules()):
            for name, p in list(module.named_parameters(recurse=False)):
                placement = Replicate() if p.dim() < 2 else Shard(matrices % 2)
                matrices += p.dim() >= 2
                module.register_parameter(name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])))
    calls = [0]
    full_tensor = DTensor.full_tensor

    def counted(self, *a, **kw):
        calls[0] += 1
        return full_tensor(self, *a, **kw)

    DTensor.full_tensor = counted
    source = WeightSource(model, adapter, args.bucket_bytes)
    got = packed(source)
    raised, failing_source = 0, None
    if args.pack_errors:
        pack = WeightSource._pack

        def failing(item, meta, *rest):
            if meta.offset == 0:  # the first tensor of each bucket
                raise RuntimeError("injected packing error")
            pack(item, meta, *rest)

        # One bucket for the whole model: gathers follow the tensor whose packing fails.
        failing_source = WeightSource(model, adapter, 1 << 20, ramp_start=1)
        failing_source._pack = failing  # rank 0 is the only rank that packs
        for plan in failing_source.buckets:
            try:
                failing_source.fill(plan, torch.zeros(plan.nbytes, dtype=torch.uint8) if dist.get_rank() == 0 else None)
            except RuntimeError:
                raised += 1
        dist.barrier()  # both ranks got here: no collective was left unmatched
    if dist.get_rank() == 0:
        world = dist.get_world_size()
        with open(args.out, "w") as f:
            json.dump({
                "buckets": len(source.buckets),
                "names": sorted(want),
                "mismatched": sorted(n for n in want if n not in got or got[n].dtype != want[n].dtype
                                     or not torch.equal(got[n], want[n])),
                "extra": sorted(set(got) - set(want)),
                "uneven": sorted(n for n, p in model.named_parameters() if p.shape[0] % world),
                "dtypes": sorted({str(t.dtype) for t in want.values()}),
                "full_tensor_calls": calls[0],
                "pack_errors_raised": raised,
                "pack_error_buckets": len(failing_source.buckets) if args.pack_errors else 0,
            }, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_without_finalizing(0)  # a gloo worker outliving the group aborted a finished rank in finalization
