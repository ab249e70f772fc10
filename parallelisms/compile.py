"""Per-block ``torch.compile``. Blocks share their code, but fla and HF layers keep an integer
layer index, so dynamo builds one graph per layer and the first step compiles every layer
(inductor's on-disk cache makes restarts on the same machine fast)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from parallelisms.tp_plans.base import is_fla_module

logger = logging.getLogger(__name__)


def raise_recompile_limit(n_blocks: int) -> None:
    """Blocks share one code object, and fla layers branch on their integer ``layer_idx``, so
    dynamo specializes (recompiles) once per layer; past ``recompile_limit`` (8) it silently
    falls back to eager. Allow one compile per layer plus margin for shape changes."""
    cfg = torch._dynamo.config
    needed = 2 * n_blocks + 8
    cfg.recompile_limit = max(cfg.recompile_limit, needed)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * needed)


def apply_compile(blocks: nn.ModuleList, compile_config, *, final_norm: tuple[nn.Module, str] | None = None,
                  fullgraph: bool = False) -> None:
    """Compile each block (after AC, before FSDP). ``final_norm`` (parent, name) is compiled too
    when it is plain torch code; fla's norms are already fused Triton kernels."""
    raise_recompile_limit(len(blocks))
    for name, block in list(blocks.named_children()):
        blocks.register_module(name, torch.compile(block, backend=compile_config.backend, fullgraph=fullgraph))
    if final_norm is not None:
        parent, name = final_norm
        norm = getattr(parent, name)
        if not is_fla_module(norm):
            parent.register_module(name, torch.compile(norm, backend=compile_config.backend, fullgraph=True))
    logger.info(f"Compiled {len(blocks)} blocks with torch.compile (backend {compile_config.backend})")
