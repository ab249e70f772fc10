"""Apply a ``TPPlan`` to a model: parallelize_module per plan entry, then per-rank head counts,
tied embeddings, a completeness check, and async TP."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module

from parallelisms.tp_plans.base import Plan, TPPlan, check_all_distributed
from parallelisms.tp_plans.styles import materialize

logger = logging.getLogger(__name__)


def apply_plan(module: nn.Module, tp_mesh: DeviceMesh, plan: Plan) -> None:
    """``parallelize_module`` for each entry; a tuple applies several styles to one module."""
    for path, styles in plan.items():
        target = module.get_submodule(path) if path else module
        for style in styles if isinstance(styles, tuple) else (styles,):
            parallelize_module(target, tp_mesh, style)


def _tied_output(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, plan: TPPlan, *, async_tp: bool = False) -> None:
    """Shard ``model`` (on meta, before init) over ``tp_mesh`` following ``plan``."""
    plan.prepare_model(model)
    tied = _tied_output(model)
    apply_plan(model, tp_mesh, plan.model_plan(model))
    # The embeddings' output is an in-flight collective (AsyncCollectiveTensor); fed as is into a
    # compiled block, dynamo drops its autograd link and the embeddings get no gradient.
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: materialize(out))
    for block in plan.blocks(model):
        apply_plan(block, tp_mesh, plan.layer_plan(block))
        plan.localize(block)
    if tied:
        # Both styles shard the weight over the vocabulary (Shard(0)) but each made its own
        # Parameter: share the embedding's again so the tie survives.
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    check_all_distributed(model)
    model.register_forward_hook(_local_loss)
    if async_tp:
        enable_async_tp(tp_mesh)
    logger.info(
        f"Applied {'float8 ' if plan.float8 else ''}tensor parallelism ({type(plan).__name__}, "
        f"degree {tp_mesh.size()}, loss parallel: {plan.loss_parallel})"
    )


def _local_loss(module, args, output):
    """Under loss parallelism the loss is a replicated DTensor: hand the trainer a plain tensor
    (``to_local`` of a replicated value back-propagates unchanged)."""
    from torch.distributed.tensor import DTensor

    loss = getattr(output, "loss", None)
    if isinstance(loss, DTensor):
        output.loss = loss.to_local()
    return output


def enable_async_tp(tp_mesh: DeviceMesh) -> None:
    """Let inductor overlap TP all-gathers/reduce-scatters with matmuls (needs compiled blocks)."""
    torch._inductor.config._micro_pipeline_tp = True
    if tp_mesh.device_type == "cuda":
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        enable_symm_mem_for_group(tp_mesh.get_group().group_name)
    logger.info("Async tensor parallelism enabled")
