"""Where a job runs: CUDA with NCCL, or CPU with gloo and Triton's interpreter.

torchtitan 0.2.2 assumes an accelerator: ``torchtitan.tools.utils.device_type`` falls back to
"cuda" on a CPU-only machine and ``ParallelDims``, ``distributed.utils`` and the metrics module
copy it at import. fla's kernels are Triton; without a GPU they only run under
``TRITON_INTERPRET=1``, which fla 0.6 and Triton's interpreter need three small fixes for.

This module is the one place that adapts both. ``configure_device()`` must run before fla or
Triton is imported (``train.py`` and ``tests/conftest.py`` call it first); it is idempotent.
On a CUDA machine it changes nothing.
"""

from __future__ import annotations

import ast
import os
import sys

_configured: str | None = None


def configure_device() -> str:
    """Returns the device type ("cuda" or "cpu") and, on CPU, installs the CPU path."""
    global _configured
    if _configured is not None:
        return _configured
    import logging

    import torch

    # torchao registers enums with pytree at import; torch >= 2.11 warns that this is obsolete.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

    if torch.cuda.is_available():
        _configured = "cuda"
        return _configured

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "recipe.device.configure_device() must run before triton/fla are imported on CPU "
            "(it sets TRITON_INTERPRET=1); import order is wrong"
        )
    os.environ["TRITON_INTERPRET"] = "1"
    _quiet_expected_cpu_warnings()
    _pin_triton_autotune_to_one_config()
    _make_interpreter_loop_indices_tensors()
    _patch_interpreter_language_once_per_grid()
    _point_torchtitan_at_cpu()
    _configured = "cpu"
    return _configured


def _quiet_expected_cpu_warnings() -> None:
    """Warnings that only say "this is the CPU path", repeated by every rank: not news here."""
    import logging
    import warnings

    for message in (
        "Triton is not supported on current platform",  # fla: no GPU driver (we interpret)
        "DTensor random operators may not have complete support on cpu",
        "DTensor manual_seed\\(\\) may not have complete support on cpu",
        "Set timeout is now only supported for either nccl or gloo",  # torchtitan, gloo groups
    ):
        warnings.filterwarnings("ignore", message=message)
    # torchao's CUDA-only extensions (mxfp8, cutlass) cannot load without a GPU.
    logging.getLogger("torchao").addFilter(lambda record: "Failed to load" not in record.getMessage())


def _pin_triton_autotune_to_one_config() -> None:
    """Autotuning benchmarks every config on the active GPU driver; on CPU there is none.

    Every config of a kernel computes the same result, so one is used: the one with the largest
    tiles (product of its block sizes; the first of equals). The interpreter runs every program
    instance in Python, so fewer, larger ones run faster: one forward+backward of
    configs/tiny/gated_deltanet.json at 2 x 32 took 2.7 s instead of 8.3 s with the first config,
    retnet.json 3.2 s instead of 8.6 s (2-core CPU, 2026-12-02; the same loss and gradient norm).
    """
    from triton.runtime import autotuner

    prune = autotuner.Autotuner.prune_configs
    if getattr(prune, "_flare_pinned", False):
        return

    def tile_size(config) -> int:
        size = 1
        for value in config.kwargs.values():
            if isinstance(value, int) and not isinstance(value, bool):
                size *= value
        return size

    def largest_tiles_only(self, kwargs):
        return [max(prune(self, kwargs), key=tile_size)]

    largest_tiles_only._flare_pinned = True
    autotuner.Autotuner.prune_configs = largest_tiles_only


def _make_interpreter_loop_indices_tensors() -> None:
    """Compiled Triton turns ``for i in range(n)`` indices into tensors; the interpreter leaves
    Python ints, so fla kernels that call ``i.to(tl.int64)`` fail there. Rebind the loop
    variable as a tensor at the top of each loop body, as the compiler would."""
    from triton.runtime import interpreter

    base = interpreter.FunctionRewriter.ast_transformer
    if getattr(base, "_flare_loop_tensors", False):
        return

    class LoopIndexAsTensor(type(base)):
        _flare_loop_tensors = True

        def visit_For(self, node):
            node = self.generic_visit(node)
            if isinstance(node.target, ast.Name):
                rebind = ast.Assign(
                    targets=[ast.Name(id=node.target.id, ctx=ast.Store())],
                    value=ast.Name(id=node.target.id, ctx=ast.Load()),
                )
                node.body.insert(0, self.visit_Assign(rebind))  # wraps it in to_tensor()
            return node

    interpreter.FunctionRewriter.ast_transformer = LoopIndexAsTensor()


def _patch_interpreter_language_once_per_grid() -> None:
    """The interpreter re-patches ``triton.language`` (via ``inspect.getmembers``) on every
    device-function call inside a kernel; for fla's kernels that was ~half of the CPU time.
    Patch each module's language once per launched grid instead."""
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang, "_flare_once", False):
        return
    patch_lang = interpreter._patch_lang
    grid_call = interpreter.GridExecutor.__call__
    patched_in_grid: list[set[int] | None] = [None]

    def patch_lang_once(fn):
        seen = patched_in_grid[0]
        if seen is not None:
            if id(fn.__globals__) in seen:
                return interpreter._LangPatchScope()
            seen.add(id(fn.__globals__))
        return patch_lang(fn)

    def grid_call_tracking(self, *args, **kwargs):
        patched_in_grid[0] = set()
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched_in_grid[0] = None

    patch_lang_once._flare_once = True
    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = grid_call_tracking


class _CpuDeviceModule:
    """``torch.cpu`` plus the CUDA-module calls torchtitan makes unconditionally."""

    def __getattr__(self, name):
        import torch

        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0  # torchtitan passes it as `device_ids` to barriers; gloo ignores it

    @staticmethod
    def set_device(device) -> None:
        pass


cpu_device_module = _CpuDeviceModule()


def _point_torchtitan_at_cpu() -> None:
    """Replace the "cuda" fallback in torchtitan.tools.utils and in every torchtitan module that
    copied it at import (and import those that will, so later importers see "cpu")."""
    import importlib

    utils = importlib.import_module("torchtitan.tools.utils")
    stale_type, stale_module = utils.device_type, utils.device_module
    for name in (
        "torchtitan.tools.utils",
        "torchtitan.distributed.parallel_dims",
        "torchtitan.distributed.utils",
        "torchtitan.components.metrics",
        "torchtitan.tools.profiling",
    ):
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if not name.startswith("torchtitan") or module is None:
            continue
        if getattr(module, "device_type", None) == stale_type:
            module.device_type = "cpu"
        if getattr(module, "device_module", None) is stale_module:
            module.device_module = cpu_device_module
