"""Shipped Triton autotune results (recipe/autotune_cache.py): export, import, install-if-matching."""

import json
import logging
import os

from recipe import autotune_cache as ac


def make_cache(root, digest="ab12", kernel="chunk_fwd_kernel", text='{"key": [64], "configs_timings": []}'):
    (root / digest).mkdir(parents=True, exist_ok=True)
    (root / digest / f"{kernel}.autotune.json").write_text(text)
    (root / digest / f"{kernel}.cubin").write_bytes(b"\0" * 64)  # compiled kernels are not results
    return root


def test_export_then_import_moves_only_autotune_results(tmp_path):
    cache, export, fresh = make_cache(tmp_path / "cache"), tmp_path / "export", tmp_path / "fresh"
    assert ac.export_results(str(cache), str(export))[0] == 1
    assert sorted(os.listdir(export)) == ["MANIFEST.json", "ab12"]
    assert os.listdir(export / "ab12") == ["chunk_fwd_kernel.autotune.json"]
    n, warning = ac.import_results(str(export), str(fresh))
    assert n == 1 and warning is None  # same machine and software
    assert (fresh / "ab12" / "chunk_fwd_kernel.autotune.json").read_text().startswith('{"key"')
    manifest = json.loads((export / "MANIFEST.json").read_text())
    (export / "MANIFEST.json").write_text(json.dumps({**manifest, "triton": "0.0"}))
    assert "triton" in ac.import_results(str(export), str(fresh))[1]


def test_install_takes_matching_sets_and_keeps_local_results(tmp_path, monkeypatch, caplog):
    shipped, cache = tmp_path / "shipped", tmp_path / "cache"
    ac.export_results(str(make_cache(tmp_path / "a")), str(shipped / "this_machine"))
    ac.export_results(str(make_cache(tmp_path / "b", digest="cd34")), str(shipped / "other_gpu"))
    other = json.loads((shipped / "other_gpu" / "MANIFEST.json").read_text())
    (shipped / "other_gpu" / "MANIFEST.json").write_text(json.dumps({**other, "device": "Some Other GPU"}))
    make_cache(cache, kernel="chunk_fwd_kernel", text="mine")  # this machine's own tuning wins
    monkeypatch.setattr(ac, "triton_cache_dir", lambda: str(cache))
    with caplog.at_level(logging.INFO, logger="recipe.autotune_cache"):
        ac.install_shipped_results(str(shipped))
    assert (cache / "ab12" / "chunk_fwd_kernel.autotune.json").read_text() == "mine"
    assert not (cache / "cd34").exists()  # another GPU's set is not installed
    assert "0 installed from" in caplog.text and "this_machine" in caplog.text

    (cache / "ab12" / "chunk_fwd_kernel.autotune.json").unlink()
    ac.install_shipped_results(str(shipped))
    assert (cache / "ab12" / "chunk_fwd_kernel.autotune.json").read_text().startswith('{"key"')


def test_install_without_a_matching_set_says_what_to_do(tmp_path, monkeypatch, caplog):
    shipped = tmp_path / "shipped"
    ac.export_results(str(make_cache(tmp_path / "a")), str(shipped / "h200"))
    manifest = json.loads((shipped / "h200" / "MANIFEST.json").read_text())
    (shipped / "h200" / "MANIFEST.json").write_text(json.dumps({**manifest, "fla": "0.0.1"}))
    monkeypatch.setattr(ac, "triton_cache_dir", lambda: str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="recipe.autotune_cache"):
        ac.install_shipped_results(str(shipped))
        ac.install_shipped_results(str(tmp_path / "missing"))  # no folder: nothing, no error
    assert not (tmp_path / "cache").exists()
    assert "No shipped Triton autotune results" in caplog.text and "warm_kernels.py" in caplog.text


def test_shipped_sets_are_well_formed():
    # Every set in the repository has a manifest naming what it was made on, and only result files.
    root = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "autotune")
    sets = [os.path.join(root, d) for d in sorted(os.listdir(root))] if os.path.isdir(root) else []
    for s in sets:
        manifest = json.load(open(os.path.join(s, "MANIFEST.json")))
        assert all(manifest.get(k) for k in ac.MATCH_KEYS), s
        files = ac.result_files(s)
        assert len(files) == manifest["files"] > 0, s
        for f in files:
            json.load(open(f))  # each is a Triton result file
