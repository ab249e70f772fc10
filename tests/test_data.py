"""Data pipeline: packing, varlen boundaries, HF sources, mixing, DP sharding, exact resume, errors."""

import json
import os
import pickle
from collections import Counter

import datasets
import pytest
import torch

from conftest import ROOT
from recipe import synthetic_corpus
from recipe.config import parse_job_config
from recipe.data import _row_doc, build_dataloader, build_dataset
from recipe.errors import ConfigError, UserError
from recipe.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path, monkeypatch):
    # Keep `datasets`' arrow cache out of the user's home; never touch the network.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def config(*args, seq_len=64, batch=2):
    return parse_job_config([
        "--model.config", os.path.join(ROOT, "configs/gla_debug.json"),
        "--training.seq_len", str(seq_len), "--training.local_batch_size", str(batch), *args,
    ])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def framed(text):
    return [BOS, *text.encode("utf-8"), EOS]


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def stream(batch_list):
    """The flat token stream of a list of batches (rows in order)."""
    return [t for inputs, _ in batch_list for t in inputs["input"].flatten().tolist()]


def split_docs(tokens):
    """Complete documents (bos..eos) in a token stream, as text; the partial last one is dropped."""
    docs, cur = [], None
    for t in tokens:
        if t == BOS:
            cur = []
        elif t == EOS and cur is not None:
            docs.append(bytes(cur).decode("utf-8"))
            cur = None
        elif cur is not None:
            cur.append(t)
    return docs


DOCS = [f"Document {i}: " + "word " * (i % 7) + "end." for i in range(12)]


# --------------------------------------------------------------------------- packing


def test_synthetic_corpus_is_deterministic_and_varied():
    docs = [synthetic_corpus.document(1, i) for i in range(400)]
    assert docs == [synthetic_corpus.document(1, i) for i in range(400)]
    assert docs != [synthetic_corpus.document(2, i) for i in range(400)]
    assert len(set(docs)) == len(docs)
    assert any(len(d) > 2048 for d in docs) and any(len(d) < 200 for d in docs)
    assert sum(c.isdigit() for d in docs for c in d) > 1000


def test_packing_is_the_concatenated_document_stream():
    cfg = config("--training.data_seed", "7", seq_len=64, batch=3)
    got = batches(build_dataloader(cfg, TOK, 0, 1), 12)
    for inputs, labels in got:
        assert set(inputs) == {"input"}
        assert inputs["input"].shape == (3, 64) and inputs["input"].dtype == torch.long
        assert torch.equal(labels, inputs["input"])  # unshifted: the model shifts
    expected = []
    i = 0
    while len(expected) < 12 * 3 * 64:  # synthetic source 0 with seed 7 reads documents 0, 1, 2, ...
        expected += framed(synthetic_corpus.document(7 * 1000, i))
        i += 1
    assert stream(got) == expected[: 12 * 3 * 64]


@pytest.mark.parametrize("streaming", [False, True])
def test_local_jsonl_with_a_document_longer_than_seq_len(tmp_path, streaming):
    docs = DOCS + ["long " * 60]  # 300 bytes > seq_len
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    cfg = config("--training.dataset", path, *(["--training.streaming"] if streaming else []), seq_len=32)
    epoch_tokens = sum(len(framed(d)) for d in docs)
    got = batches(build_dataloader(cfg, TOK, 0, 1), epoch_tokens // 64 + 3)
    seen = split_docs(stream(got))
    assert Counter(seen[: len(docs)]) == Counter(docs)  # one epoch = every row exactly once
    if streaming:
        assert seen[: len(docs)] == docs  # streaming keeps file order
    else:
        assert seen[: len(docs)] != docs  # materialized datasets are shuffled (seeded)


def test_varlen_cu_seqlens_and_context_len_splitting():
    seq_len, batch, ctx = 128, 2, 40
    base = batches(build_dataloader(config(seq_len=seq_len, batch=batch), TOK, 0, 1), 6)
    cfg = config("--training.varlen", "--training.context_len", str(ctx), seq_len=seq_len, batch=batch)
    got = batches(build_dataloader(cfg, TOK, 0, 1), 6)
    assert stream(got) == stream(base)  # same tokens, only the layout differs
    for inputs, labels in got:
        x, cu = inputs["input"], inputs["cu_seqlens"]
        assert x.shape == (1, seq_len * batch) and torch.equal(labels, x)
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == x.numel()
        lens = cu.diff()
        assert (lens > 0).all() and (lens <= ctx).all()
        # Boundaries = row start, every document start (bos), and context_len cuts inside a document.
        starts = [0] + [p for p, t in enumerate(x[0].tolist()) if t == BOS and p > 0] + [x.numel()]
        expected = [p for a, b in zip(starts, starts[1:]) for p in range(a, b, ctx)] + [x.numel()]
        assert cu.tolist() == expected
    assert any(len(range(a, b, ctx)) > 1 for a, b in zip(starts, starts[1:]))  # a split happened


def test_varlen_default_context_len_is_seq_len():
    cfg = config("--training.varlen", seq_len=32, batch=4)
    inputs, _ = batches(build_dataloader(cfg, TOK, 0, 1), 1)[0]
    assert inputs["input"].shape == (1, 128)
    assert inputs["cu_seqlens"].diff().max() <= 32
    # A document cut at the end of the row continues at the start of the next row.
    nxt, _ = batches(build_dataloader(cfg, TOK, 0, 1), 2)[1]
    row1, row2 = inputs["input"][0].tolist(), nxt["input"][0].tolist()
    expected = [t for i in range(3) for t in framed(synthetic_corpus.document(42 * 1000, i))]
    assert EOS not in row1 and row1 + row2 == expected[:256]  # document 0 is longer than one row


# --------------------------------------------------------------------------- HF rows


def test_empty_and_non_text_rows_are_skipped_and_counted(tmp_path):
    rows = [{"text": ""}, {"text": None}, {"text": "   "}, {"text": "kept one"}, {"text": None}, {"text": "kept two"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    loader = build_dataloader(config("--training.dataset", path, "--training.streaming", seq_len=6, batch=1), TOK, 0, 1)
    got = batches(loader, 3)  # 18 tokens: all of "kept one" (10) and part of "kept two"
    assert split_docs(stream(got)) == ["kept one"]
    assert loader.dataset.skipped_rows == 4
    assert _row_doc({"text": 5}, "text", "text") is None
    assert _row_doc({"text": ["a"]}, "text", "text") is None
    assert _row_doc({"input_ids": [1, "x"]}, "input_ids", "text") is None
    assert _row_doc({"other": "x"}, None, "text") is None
    assert _row_doc({"text": "ok"}, None, "text") == "ok"


def test_dataset_without_usable_rows_is_a_user_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"text": None}])
    loader = build_dataloader(config("--training.dataset", path), TOK, 0, 1)
    with pytest.raises(UserError, match="training.dataset"):
        batches(loader, 1)
    path = write_jsonl(tmp_path / "e.jsonl", [{"body": "hello"}])
    with pytest.raises(UserError, match="training.text_column"):
        build_dataloader(config("--training.dataset", path), TOK, 0, 1)
    ok = build_dataloader(config("--training.dataset", path, "--training.text_column", "body", seq_len=4), TOK, 0, 1)
    assert stream(batches(ok, 1))[:6] == framed("hello")[:6]


def test_pretokenized_input_ids_are_used_as_is(tmp_path):
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [BOS, 8, 9, EOS]}, {"input_ids": []}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    loader = build_dataloader(config("--training.dataset", path, "--training.streaming", seq_len=10, batch=1), TOK, 0, 1)
    assert stream(batches(loader, 1)) == [BOS, 5, 6, 7, EOS, BOS, 8, 9, EOS, BOS]  # bos/eos added only if missing
    assert loader.dataset.skipped_rows == 1
    path = write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, 2, 999]}])
    with pytest.raises(UserError, match="input_ids outside"):
        batches(build_dataloader(config("--training.dataset", path), TOK, 0, 1), 1)


def test_other_local_formats(tmp_path):
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.txt").write_text("\n".join(DOCS) + "\n")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "part-0.jsonl", [{"text": d} for d in DOCS])
    for name in ("d.parquet", "d.txt", "saved", "folder"):
        cfg = config("--training.dataset", str(tmp_path / name), "--training.streaming", seq_len=16)
        assert split_docs(stream(batches(build_dataloader(cfg, TOK, 0, 1), 8)))[:3] == DOCS[:3], name


# --------------------------------------------------------------------------- mixing and sharding


def test_mixture_probabilities_and_determinism(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "A" + d} for d in DOCS])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "B" + d} for d in DOCS])
    args = ["--training.dataset", f"{a},{b}", "--training.data_probs", "0.8,0.2"]

    def picks(*extra):
        ds = build_dataset(config(*args, *extra), TOK)
        ds._setup()
        return "".join(chr(ds._next_doc()[1]) for _ in range(2000))

    first = picks()
    assert abs(first.count("A") / 2000 - 0.8) < 0.04
    assert picks() == first  # deterministic given data_seed
    assert picks("--training.data_seed", "3") != first


@pytest.mark.parametrize("source", ["synthetic", "jsonl", "jsonl-streaming"])
def test_dp_ranks_see_disjoint_data(tmp_path, source):
    args = []
    if source != "synthetic":
        docs = [f"row {i} " + "x" * (i % 5) for i in range(40)]
        args = ["--training.dataset", write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])]
        args += ["--training.streaming"] if source == "jsonl-streaming" else []
    seq_len, n = (512, 4) if source == "synthetic" else (64, 1)  # rows: 20 docs (~240 tokens) per rank
    seen = []
    for rank in range(2):
        loader = build_dataloader(config(*args, seq_len=seq_len, batch=2), TOK, rank, 2)
        seen.append(split_docs(stream(batches(loader, n))))
    assert len(seen[0]) > 5 and len(seen[1]) > 5
    assert not set(seen[0]) & set(seen[1])
    if source != "synthetic":  # together the ranks cover rows without overlap (each < one epoch)
        assert len(set(seen[0]) | set(seen[1])) == len(seen[0]) + len(seen[1])


# --------------------------------------------------------------------------- exact resume


def _resume_matches(cfg, k, m):
    full = batches(build_dataloader(cfg, TOK, 0, 1), k + m)
    loader = build_dataloader(cfg, TOK, 0, 1)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = pickle.loads(pickle.dumps(loader.state_dict()))  # as the checkpoint stores it
    resumed = build_dataloader(cfg, TOK, 0, 1)
    resumed.load_state_dict(state)
    rest = batches(resumed, m)
    for (want, want_labels), (got, got_labels) in zip(full[k:], rest):
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key
        assert torch.equal(want_labels, got_labels)
    return len(str(state))


@pytest.mark.parametrize("case", ["synthetic", "synthetic-varlen", "jsonl", "jsonl-streaming", "mixture"])
def test_resume_continues_the_exact_stream(tmp_path, case):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in DOCS])  # ~400 tokens: epochs wrap
    args = {
        "synthetic": [],
        "synthetic-varlen": ["--training.varlen", "--training.context_len", "24"],
        "jsonl": ["--training.dataset", path],
        "jsonl-streaming": ["--training.dataset", path, "--training.streaming"],
        "mixture": ["--training.dataset", f"synthetic,{path}", "--training.data_probs", "1,3"],
    }[case]
    size = _resume_matches(config(*args, seq_len=32, batch=2), k=7, m=6)
    assert size < 20_000  # positions and a document tail, not data


def test_resume_with_dataloader_workers():
    cfg = config("--training.dataloader.num_workers", "2", seq_len=32, batch=2)
    _resume_matches(cfg, k=5, m=4)
    # Two workers still produce distinct batches (each reads its own shard).
    got = batches(build_dataloader(cfg, TOK, 0, 1), 2)
    assert not torch.equal(got[0][0]["input"], got[1][0]["input"])


def test_state_dict_before_iteration_and_after_load():
    cfg = config(seq_len=16, batch=1)
    loader = build_dataloader(cfg, TOK, 0, 1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    # A loader that loaded a state but has not iterated yet checkpoints that same state.
    again = build_dataloader(cfg, TOK, 0, 1)
    again.load_state_dict(state)
    twice = build_dataloader(cfg, TOK, 0, 1)
    twice.load_state_dict(again.state_dict())
    assert torch.equal(next(iter(twice))[0]["input"], next(it)[0]["input"])


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("args, error, key", [
    (["--training.dataset", "synthetic,synthetic", "--training.dataset_name", "a,b,c"], ConfigError,
     "training.dataset_name"),
    (["--training.dataset", "synthetic,synthetic", "--training.data_files", "x.json"], ConfigError,
     "training.data_files"),
    (["--training.dataset", "synthetic,synthetic", "--training.data_probs", "0.5"], ConfigError,
     "training.data_probs"),
    (["--training.dataset", "synthetic,synthetic", "--training.data_probs", "0,0"], ConfigError,
     "training.data_probs"),
    (["--training.dataset", "synthetic,synthetic", "--training.data_probs", "-1,2"], ConfigError,
     "training.data_probs"),
    (["--training.dataset", "synthetic,synthetic", "--training.data_probs", "a,b"], ConfigError,
     "training.data_probs"),
    (["--training.dataset", "synthetic,,synthetic"], ConfigError, "training.dataset"),
    (["--training.dataset", "./missing/data.jsonl"], UserError, "training.dataset"),
    (["--training.dataset", "/no/such/folder"], UserError, "training.dataset"),
])
def test_config_errors_name_the_key(args, error, key):
    with pytest.raises(error, match=key.replace(".", r"\.")) as e:
        build_dataloader(config(*args), TOK, 0, 1)
    assert "\n" not in str(e.value)


def test_bad_split_and_file_type_name_the_key(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match=r"training\.dataset_split"):
        build_dataloader(config("--training.dataset", path, "--training.dataset_split", "validation"), TOK, 0, 1)
    (tmp_path / "d.xyz").write_text("x")
    with pytest.raises(UserError, match=r"training\.dataset"):
        build_dataloader(config("--training.dataset", str(tmp_path / "d.xyz")), TOK, 0, 1)
