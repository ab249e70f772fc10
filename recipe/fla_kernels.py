"""Launch settings of fla kernels that flare changes, each measured (docs/benchmarks.md).

fla 0.6's fused LayerNorm/RMSNorm backward for feature dims > 512 (``layer_norm_bwd_kernel_row``,
the block norms of every fla model) launches one program per SM, and each program walks its
~T/SMs rows one at a time, waiting on memory: on an H200, 308 us for 32k x 1024 bf16 rows with a
fused residual, about a third of HBM bandwidth. With four programs per SM it takes 105 us, dx is
the same bit for bit (dw sums more partial rows) and a GLA-340M training step 2% faster.
"""

from __future__ import annotations

import logging

from recipe.errors import ConfigError

logger = logging.getLogger(__name__)

_fla_sm_count = None  # fla's own function, kept to undo the change


def set_norm_backward_programs_per_sm(n: int) -> None:
    """fla's fused norm backward launches ``n`` programs per SM (1: as fla ships)."""
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"model.norm_backward_programs_per_sm={n!r}: use an integer >= 1 (1 = fla's own launch)")
    try:
        import fla.modules.norm.layernorm as layernorm
    except ImportError:  # not an fla install this applies to
        return
    global _fla_sm_count
    if _fla_sm_count is None:
        _fla_sm_count = getattr(layernorm, "get_multiprocessor_count", None)
        if _fla_sm_count is None:
            logger.warning("model.norm_backward_programs_per_sm: this fla's norm module has no "
                           "get_multiprocessor_count; its backward launch is left as it is")
            return
    if n == 1:
        layernorm.get_multiprocessor_count = _fla_sm_count
        return

    # In fla 0.6 this module calls it only to size layer_norm_bwd's grid (one program per SM).
    def programs(*args, **kwargs):
        return n * _fla_sm_count(*args, **kwargs)

    layernorm.get_multiprocessor_count = programs
