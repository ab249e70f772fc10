#!/usr/bin/env python
"""A flare DCP checkpoint (saved in any parallel layout) -> an HF folder for from_pretrained.

    python scripts/tools/convert_dcp_to_hf.py --checkpoint outputs/debug/checkpoint/step-30 \
        --config configs/gla_debug.json --output hf/gla-debug [--tokenizer bytes] [--dtype bfloat16]

Reads only the model weights (optimizer and other states are skipped), checks every key and shape
against the model built from --config, and writes config.json, generation_config.json, safetensors
(+ index when sharded) and the tokenizer. Pass the job's own model.config and model.tokenizer: the
trainer sizes the vocabulary and special token ids from the tokenizer, and so does this script.
Bad input: one line on stderr, exit code 1, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys


from recipe import hf_io  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="DCP folder, e.g. <dump_folder>/checkpoint/step-N")
    p.add_argument("--config", required=True, help="the job's model.config: config JSON or HF folder")
    p.add_argument("--output", required=True, help="HF folder to create")
    p.add_argument("--tokenizer", default="bytes", help="the job's model.tokenizer (bytes | path), or none")
    p.add_argument("--dtype", default="float32", choices=sorted(hf_io.DTYPES), help="dtype of the saved weights")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MiB")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p


def convert(args) -> str:
    # Checks that need no imports come first, so the commonest mistakes fail in a blink.
    if not os.path.isdir(args.checkpoint):
        raise hf_io.ConversionError(f"--checkpoint: no such folder '{args.checkpoint}'")
    if not os.path.exists(args.config):
        raise hf_io.ConversionError(f"--config: no such file or folder '{args.config}'")
    if os.path.isdir(args.config) and not os.path.isfile(os.path.join(args.config, "config.json")):
        raise hf_io.ConversionError(f"--config: folder '{args.config}' has no config.json")
    hf_io.check_output(args.output, args.overwrite, inputs=(args.checkpoint, args.config))
    max_shard_size = hf_io.parse_size(args.max_shard_size)

    from recipe.device import configure_device

    configure_device()  # before fla/triton are imported
    tokenizer = hf_io.load_tokenizer(args.tokenizer)
    spec = hf_io.model_spec(hf_io.load_config(args.config, "--config", tokenizer))
    state = hf_io.read_dcp_model(args.checkpoint, spec)
    with hf_io.atomic_folder(args.output, args.overwrite) as tmp:
        hf_io.write_hf(state, spec, tmp, tokenizer, hf_io.DTYPES[args.dtype], max_shard_size)
    return f"wrote {args.output}: {spec.architecture}, {len(state)} tensors, {args.dtype}, tokenizer {args.tokenizer}"


def main(argv: list[str] | None = None) -> int:
    return hf_io.run_cli("convert_dcp_to_hf", convert, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
