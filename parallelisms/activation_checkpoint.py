"""Activation checkpointing of blocks: full, selective per op, or selective every N-th block."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

logger = logging.getLogger(__name__)

_ops = torch.ops.aten
# Matmuls dominate recompute cost: half of them are kept (alternating), the other half recomputed.
MATMUL_OPS = {_ops.mm.default, _ops.addmm.default, _ops.bmm.default}
# Always kept: attention (quadratic to recompute), TP reduce-scatters (communication), and the
# amax of float8 scaling.
ALWAYS_SAVE_OPS = {
    _ops._scaled_dot_product_efficient_attention.default,
    _ops._scaled_dot_product_flash_attention.default,
    _ops._scaled_dot_product_cudnn_attention.default,
    _ops._scaled_dot_product_flash_attention_for_cpu.default,
    _ops._scaled_mm.default,
    _ops.max.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def op_policy():
    """A fresh selective-checkpoint policy (its matmul counters live in this one context)."""
    matmuls = Counter()

    def policy(ctx, func, *args, **kwargs):
        if func in MATMUL_OPS:
            phase = "recompute" if ctx.is_recompute else "forward"
            matmuls[phase] += 1
            return CheckpointPolicy.MUST_SAVE if matmuls[phase] % 2 else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in ALWAYS_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _wrap(block: nn.Module, ac_config, **kwargs) -> nn.Module:
    return checkpoint_wrapper(
        block,
        preserve_rng_state=ac_config.preserve_rng_state,
        determinism_check=ac_config.determinism_check,
        early_stop=ac_config.early_stop,
        debug=ac_config.debug,
        **kwargs,
    )


def apply_ac(blocks: nn.ModuleList, ac_config) -> int:
    """Wrap blocks per ``ac_config`` (torchtitan's ActivationCheckpoint); returns how many."""
    mode, option = ac_config.mode, ac_config.selective_ac_option
    if mode == "none":
        return 0
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpoint.mode={mode!r}: use none, full or selective")
    every = None
    if mode == "selective" and option != "op":
        if not option.isdigit() or int(option) < 1:
            raise ValueError(f"activation_checkpoint.selective_ac_option={option!r}: use 'op' or a positive integer")
        every = int(option)
    wrapped = 0
    # The layer counter is local to this call: applying AC to another model starts again at 1.
    for i, (name, block) in enumerate(list(blocks.named_children()), start=1):
        if mode == "full":
            block = _wrap(block, ac_config)
        elif every is None:
            block = _wrap(block, ac_config, context_fn=lambda: create_selective_checkpoint_contexts(op_policy()))
        elif i % every == 0:
            block = _wrap(block, ac_config)
        else:
            continue
        blocks.register_module(name, block)
        wrapped += 1
    detail = f" (option {option})" if mode == "selective" else ""
    logger.info(f"Applied {mode} activation checkpointing{detail} to {wrapped}/{len(blocks)} blocks")
    return wrapped
