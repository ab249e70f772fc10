"""Per-block ``torch.compile`` that compiles the torch code around fla's Triton kernels.

Two things make compiling fla blocks slow out of the box (measured on an H200: GLA-340M had not
finished its first compiled step after 200 s):

* dynamo traces into every fla ``autograd.Function`` and hands the Triton kernels inside to
  inductor as user-defined kernels, which compiles and autotunes them again, outside fla's
  autotune cache (and on CPU cannot trace Triton's interpreter at all);
* fla layers read their integer ``layer_idx`` (``get_layer_cache``), so dynamo specialized on it
  and recompiled every layer.

So fla's kernels run as they are (each fla ``autograd.Function.forward`` is opaque to dynamo: a
graph break around the kernel call; its backward runs from autograd as in eager) and integer
module attributes may become dynamic instead of forcing a recompile. What compile fuses is the
glue: projections' epilogues, gates, reshapes, residuals, and whole HF attention blocks.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from parallelisms.tp_plans.base import is_fla_module

logger = logging.getLogger(__name__)


def raise_recompile_limit(n_blocks: int) -> None:
    """Blocks share one code object; past ``recompile_limit`` (8) dynamo silently falls back to
    eager. Leave room for a compile per layer plus shape changes, whatever a model reads."""
    cfg = torch._dynamo.config
    needed = 2 * n_blocks + 8
    cfg.recompile_limit = max(cfg.recompile_limit, needed)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * needed)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def keep_fla_kernels_opaque() -> int:
    """Make every fla ``autograd.Function`` forward opaque to dynamo (idempotent); returns how many
    were wrapped now. Functions of fla modules imported later are not covered (dynamo then traces
    them as before: slower to compile, same results)."""
    import fla  # noqa: F401 - defines the Function subclasses

    wrapped = 0
    for cls in set(_subclasses(torch.autograd.Function)):
        forward = cls.__dict__.get("forward")
        if not cls.__module__.startswith("fla.") or not isinstance(forward, staticmethod):
            continue
        if getattr(forward.__func__, "_flare_opaque", False):
            continue
        opaque = torch.compiler.disable(forward.__func__, recursive=True)
        opaque._flare_opaque = True
        cls.forward = staticmethod(opaque)
        wrapped += 1
    return wrapped


def apply_compile(blocks: nn.ModuleList, compile_config, *, final_norm: tuple[nn.Module, str] | None = None,
                  fullgraph: bool = False) -> None:
    """Compile each block (after AC, before FSDP). ``final_norm`` (parent, name) is compiled too
    when it is plain torch code; fla's norms are already fused Triton kernels."""
    raise_recompile_limit(len(blocks))
    # layer_idx (and other int attributes that differ between blocks) become symbolic on the
    # second block instead of one recompile per layer; ints that never change stay constants.
    torch._dynamo.config.allow_unspec_int_on_nn_module = True
    if any(is_fla_module(m) or getattr(m, "calls_fla_kernels", False) for block in blocks for m in block.modules()):
        n = keep_fla_kernels_opaque()
        logger.info(f"fla kernels run outside the compiled graphs ({n} autograd functions made opaque to dynamo)")
    for name, block in list(blocks.named_children()):
        blocks.register_module(name, torch.compile(block, backend=compile_config.backend, fullgraph=fullgraph))
    if final_norm is not None:
        parent, name = final_norm
        norm = getattr(parent, name)
        if not is_fla_module(norm):
            parent.register_module(name, torch.compile(norm, backend=compile_config.backend, fullgraph=True))
    logger.info(f"Compiled {len(blocks)} blocks with torch.compile (backend {compile_config.backend})")
