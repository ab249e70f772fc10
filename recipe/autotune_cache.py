"""Triton autotune results: export them from a warmed machine, ship them, install them on a fresh one.

On a fresh GPU machine fla's first GLA step spent ~260 s in Triton's autotuner (hundreds of kernel
variants compiled and benchmarked one at a time). Triton can keep each winner on disk (fla turns
on ``cache_results``): ``<triton cache>/<hash>/<kernel>.autotune.json``, a few hundred bytes each,
where the hash covers the Triton version, GPU target, kernel source, tuning key (shapes, dtypes)
and config list. Copying those files to another machine of the same kind means its kernels compile
only the chosen config and skip benchmarking.

flare ships such sets under ``configs/autotune/<set>/`` (``MANIFEST.json`` + hash folders) and the
trainer installs the ones whose manifest matches this machine (GPU name, Triton and fla versions)
before the first step (``job.autotune_results``). A result that does not match is never read by
Triton, so installing is always safe. ``scripts/tools/warm_kernels.py`` warms kernels in parallel and
exports new sets (``--export-cache``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

logger = logging.getLogger(__name__)

RESULT_GLOB = "*/*.autotune.json"  # Triton's check_disk_cache: <cache dir>/<sha256 of the tuning inputs>/<kernel>.autotune.json
MANIFEST = "MANIFEST.json"
MATCH_KEYS = ("device", "triton", "fla")  # what the files depend on; torch builds do not enter the hash


def triton_cache_dir() -> str:
    from triton import knobs

    return knobs.cache.dir


def result_files(cache_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(cache_dir, RESULT_GLOB)))


def software() -> dict:
    import importlib.metadata as md

    import torch

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton": version("triton"),
        "torch": torch.__version__,
        "fla": version("flash-linear-attention") or version("fla-core"),
    }


def export_results(cache_dir: str, dest: str) -> tuple[int, int]:
    """Copy <cache>/<hash>/<kernel>.autotune.json to <dest>/<hash>/...; returns (files, bytes)."""
    files = result_files(cache_dir)
    size = 0
    for path in files:
        rel = os.path.relpath(path, cache_dir)
        os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(path, os.path.join(dest, rel))
        size += os.path.getsize(path)
    with open(os.path.join(dest, MANIFEST), "w") as f:
        json.dump({**software(), "files": len(files)}, f, indent=1)
    return len(files), size


def mismatch(src: str) -> dict:
    """{key: (exported, here)} for the manifest keys that differ from this machine ({} if none or no manifest)."""
    path = os.path.join(src, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        theirs = json.load(f)
    ours = software()
    return {k: (theirs.get(k), ours[k]) for k in MATCH_KEYS if theirs.get(k) != ours[k]}


def import_results(src: str, cache_dir: str, overwrite: bool = True) -> tuple[int, str | None]:
    """Copy the result files of an export into the Triton cache; returns (files copied, mismatch warning)."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: no such folder")
    diff = mismatch(src)
    warning = None
    if diff:
        warning = "exported on different hardware/software; those results will not match: " + ", ".join(
            f"{k} {a} (export) vs {b} (here)" for k, (a, b) in diff.items())
    copied = 0
    for path in result_files(src):
        target = os.path.join(cache_dir, os.path.relpath(path, src))
        if not overwrite and os.path.exists(target):
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp.{os.getpid()}"
        shutil.copy2(path, tmp)
        os.replace(tmp, target)  # a concurrent reader sees the whole file or none, as with Triton's own writes
        copied += 1
    return copied, warning


def install_shipped_results(folder: str) -> None:
    """Install every result set under ``folder`` whose manifest matches this machine; never
    overwrites results already in the cache (this machine's own tuning wins). Logs what it did."""
    if not folder or not os.path.isdir(folder):
        return
    sets = sorted(d for d in glob.glob(os.path.join(folder, "*")) if os.path.exists(os.path.join(d, MANIFEST)))
    matching = [d for d in sets if not mismatch(d)]
    if not matching:
        here = software()
        logger.info(
            f"No shipped Triton autotune results for {here['device']} / triton {here['triton']} / fla "
            f"{here['fla']} in {folder}: the first step autotunes fla's kernels (minutes on a fresh machine; "
            "scripts/tools/warm_kernels.py does it in parallel and exports a set to ship)"
        )
        return
    cache_dir = triton_cache_dir()
    for src in matching:
        copied, _ = import_results(src, cache_dir, overwrite=False)
        logger.info(f"Triton autotune results: {copied} installed from {src} into {cache_dir}")
