"""Post-step hooks: user code that runs after every optimizer step.

A hook is any callable taking a ``StepState``; it may also define ``close()``. Hooks are named in
the TOML (``[hooks] post_step = ["my_pkg.hooks:LogWeights", "rollout"]``) by dotted path or by a
name registered with ``@register_post_step_hook("name")``. A class is constructed with the
JobConfig; a plain function is used as it is. The rollout weight export is one such hook.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from recipe.errors import ConfigError

_REGISTRY: dict[str, Callable] = {}

# Hooks flare ships, imported on first use so that a job without them does not pay for them.
_BUILTIN_MODULES = {"rollout": "recipe.rollout.trainer.hook"}


@dataclass
class StepState:
    """What a hook sees after optimizer step ``step``."""

    step: int
    model: torch.nn.Module  # the parallelized model (DTensor parameters under FSDP/TP)
    parallel_dims: Any  # torchtitan ParallelDims
    job_config: Any
    tokens_seen: int  # on this data-parallel rank
    metrics: dict = field(default_factory=dict)  # this step's logged metrics ({} on non-log steps)
    found_inf: torch.Tensor | None = None  # device flag, 1.0 when the step was skipped (None: skipping off)

    @property
    def skipped(self) -> bool:
        """The optimizer step was skipped (NaN/Inf gradients). Reading it waits for the step to
        finish on the device: hooks that act only every N steps should check the step first."""
        return self.found_inf is not None and bool(self.found_inf)


class PostStepHook(Protocol):
    def __call__(self, state: StepState) -> None: ...


def register_post_step_hook(name: str):
    """Class/function decorator: make a hook addressable by a short name in the TOML."""

    def register(obj):
        if name in _REGISTRY and _REGISTRY[name] is not obj:
            raise ValueError(f"post-step hook '{name}' is already registered ({_REGISTRY[name]})")
        _REGISTRY[name] = obj
        return obj

    return register


def resolve_hook(spec: str) -> Callable:
    """A registered name, "pkg.module:attr" or "pkg.module.attr" → the object it names."""
    if spec in _BUILTIN_MODULES and spec not in _REGISTRY:
        importlib.import_module(_BUILTIN_MODULES[spec])  # registers itself
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(
            f"hooks.post_step: '{spec}' is neither a registered hook ({sorted(_REGISTRY) or 'none'}) "
            "nor a dotted path like 'my_pkg.hooks:MyHook'"
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"hooks.post_step: cannot load '{spec}': {e}") from None


def build_post_step_hooks(job_config) -> list[PostStepHook]:
    hooks = []
    for spec in job_config.hooks.post_step:
        obj = resolve_hook(spec)
        hooks.append(obj(job_config) if inspect.isclass(obj) else obj)
    return hooks


def run_post_step_hooks(hooks: list[PostStepHook], state: StepState) -> None:
    for hook in hooks:
        hook(state)


def close_hooks(hooks: list[PostStepHook]) -> None:
    for hook in hooks:
        close = getattr(hook, "close", None)
        if callable(close):
            close()
