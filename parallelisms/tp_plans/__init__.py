"""Tensor-parallel plans: the ``TPPlan`` base, its registry, and one plan per model family."""

from parallelisms.tp_plans.base import TPPlan
from parallelisms.tp_plans.registry import find_tp_plan, get_tp_plan, register_tp_plan, registered_model_types
from parallelisms.tp_plans.styles import LocalCompute, SequenceParallelLinearLoss

# Importing a family module registers its plan.
from parallelisms.tp_plans import (  # noqa: E402,F401
    delta_net,
    gated_deltanet,
    gla,
    hgrn2,
    llama,
    mamba2,
    olmo_hybrid,
    refused,
    retnet,
    transformer,
)

__all__ = [
    "LocalCompute",
    "SequenceParallelLinearLoss",
    "TPPlan",
    "find_tp_plan",
    "get_tp_plan",
    "register_tp_plan",
    "registered_model_types",
]
