"""Tokenizers: the built-in byte-level one (offline, no files) or a local HF tokenizer."""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from recipe.errors import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def _byte_symbols() -> list[str]:
    """The printable character that HF's ByteLevel pre-tokenizer uses for each byte 0..255.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, ...) are shifted to
    code points 256+ in byte order. Indexing by byte value makes token id == byte value.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (id == byte value) + <|bos|>=256, <|eos|>=257, <|pad|>=258."""
    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    # BPE without merges = one token per byte-level symbol; ByteLevel maps UTF-8 bytes to symbols.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=1 << 30
    )


def build_tokenizer(job_config) -> PreTrainedTokenizerFast:
    """`model.tokenizer`: "bytes" (built-in) or a local HF tokenizer folder / tokenizer.json file."""
    spec = job_config.model.tokenizer
    if spec == "bytes":
        return byte_tokenizer()
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise UserError(f"model.tokenizer: no such file or folder '{spec}'; pass \"bytes\" or a local tokenizer path")
    try:
        if os.path.isfile(path):
            tok = PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is the user's file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model.tokenizer: cannot load a tokenizer from '{spec}' ({msg})") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise UserError(f"model.tokenizer: '{spec}' is not a fast (tokenizer.json) tokenizer; convert it first")
    return tok
