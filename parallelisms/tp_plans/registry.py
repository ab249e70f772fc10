"""Registry of tensor-parallel plans, keyed by ``config.model_type``."""

from __future__ import annotations

from parallelisms.tp_plans.base import TPPlan
from recipe.errors import ConfigError

_PLANS: dict[str, type[TPPlan]] = {}
# Model types with no tensor parallelism, and why in a few words (data parallelism trains them).
_REFUSED: dict[str, str] = {}


def register_tp_plan(*model_types: str):
    """Class decorator: ``@register_tp_plan("gla")`` makes the plan serve those model types."""
    if not model_types:
        raise ValueError("register_tp_plan needs at least one model_type")

    def register(cls: type[TPPlan]) -> type[TPPlan]:
        if not (isinstance(cls, type) and issubclass(cls, TPPlan)):
            raise TypeError(f"@register_tp_plan expects a TPPlan subclass, got {cls!r}")
        for model_type in model_types:
            other = _PLANS.get(model_type)
            if other is not None and other is not cls:
                raise ValueError(f"model_type '{model_type}' already has the plan {other.__name__}")
            _PLANS[model_type] = cls
        if "model_type" not in vars(cls):  # not inherited from a parent plan
            cls.model_type = model_types[0]
        return cls

    return register


def refuse_tp(model_type: str, why: str) -> None:
    """Make ``tensor_parallel_degree > 1`` a ConfigError for ``model_type`` saying ``why``."""
    _REFUSED[model_type] = why


def registered_model_types() -> list[str]:
    return sorted(_PLANS)


def find_tp_plan(model_type: str) -> type[TPPlan] | None:
    return _PLANS.get(model_type)


def get_tp_plan(model_type: str) -> type[TPPlan]:
    """The plan class for ``model_type``; ConfigError listing the registered types if none."""
    if model_type in _REFUSED:
        raise ConfigError(
            f"parallelism.tensor_parallel_degree: model_type '{model_type}' has no tensor parallelism "
            f"({_REFUSED[model_type]}); set parallelism.tensor_parallel_degree=1 (FSDP, HSDP and DDP train it)"
        )
    try:
        return _PLANS[model_type]
    except KeyError:
        raise ConfigError(
            f"model.config: model_type '{model_type}' has no tensor-parallel plan (registered: "
            f"{', '.join(registered_model_types())}); set parallelism.tensor_parallel_degree=1 or "
            f"register a TPPlan subclass with @register_tp_plan('{model_type}')"
        ) from None
