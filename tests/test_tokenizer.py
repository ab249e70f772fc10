"""The built-in byte tokenizer and loading local HF tokenizers."""

import os

import pytest
from transformers import AutoTokenizer

from conftest import ROOT
from recipe.config import parse_job_config
from recipe.errors import UserError
from recipe.tokenizer import build_tokenizer, byte_tokenizer

TEXT = "Héllo, wörld!\n\t12 + 7 = 19 <|eos|> 😀"


def test_byte_tokenizer_ids_are_utf8_bytes():
    tok = byte_tokenizer()
    assert len(tok) == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    ids = tok(TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode([tok.bos_token_id, 104, 105, tok.eos_token_id], skip_special_tokens=True) == "hi"


def test_save_pretrained_roundtrip_and_local_loading(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        cfg = parse_job_config(["--model.config", os.path.join(ROOT, "configs/gla_debug.json"),
                                "--model.tokenizer", str(path)])
        loaded = build_tokenizer(cfg)
        assert len(loaded) == 259
        assert loaded.encode("abc", add_special_tokens=False) == [97, 98, 99]
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").eos_token_id == 257


def test_unloadable_tokenizer_names_the_key(tmp_path):
    bad = tmp_path / "tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    cfg = parse_job_config(["--model.config", os.path.join(ROOT, "configs/gla_debug.json"),
                            "--model.tokenizer", str(bad)])
    with pytest.raises(UserError, match="model.tokenizer"):
        build_tokenizer(cfg)
