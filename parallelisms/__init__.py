"""flare's parallelisms: tensor/sequence/loss parallelism from per-family ``TPPlan``s,
activation checkpointing, per-block compile, and FSDP2/HSDP/DDP (see docs/parallelisms.md)."""

from parallelisms.parallelize import (
    loss_parallel_enabled,
    make_plan,
    parallelize_fla,
    prepare_model_config,
    validate_parallelism,
)
from parallelisms.tp_plans import TPPlan, get_tp_plan, register_tp_plan, registered_model_types

__all__ = [
    "TPPlan",
    "get_tp_plan",
    "loss_parallel_enabled",
    "make_plan",
    "parallelize_fla",
    "prepare_model_config",
    "register_tp_plan",
    "registered_model_types",
    "validate_parallelism",
]
