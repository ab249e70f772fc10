#!/usr/bin/env python
"""An HF folder (config.json + safetensors) -> a model-only DCP checkpoint for the trainer.

    python scripts/tools/convert_hf_to_dcp.py --hf path/to/hf_model --output outputs/ft/init/step-0
    python train.py ... --model.config path/to/hf_model --model.tokenizer path/to/hf_model \
        --checkpoint.initial_load_path outputs/ft/init/step-0

The checkpoint holds the model's flat state_dict keys, exactly what the trainer's checkpoints
hold, so it loads as ``checkpoint.initial_load_path`` (or as ``<dump_folder>/checkpoint/step-0``)
in any parallel layout: DCP reshards on load. Bad input: one line on stderr, exit code 1,
nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys


from recipe import hf_io  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="HF model folder (config.json + safetensors)")
    p.add_argument("--output", required=True, help="DCP folder to create, e.g. <dir>/step-0")
    p.add_argument("--dtype", default="float32", choices=sorted(hf_io.DTYPES),
                   help="dtype of the saved weights (the trainer keeps fp32 parameters)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    return p


def convert(args) -> str:
    if not os.path.isdir(args.hf):
        raise hf_io.ConversionError(f"--hf: no such folder '{args.hf}'")
    if not os.path.isfile(os.path.join(args.hf, "config.json")):
        raise hf_io.ConversionError(f"--hf: folder '{args.hf}' has no config.json")
    hf_io.check_output(args.output, args.overwrite, inputs=(args.hf,))

    from recipe.device import configure_device

    configure_device()  # before fla/triton are imported
    spec = hf_io.model_spec(hf_io.load_config(args.hf, "--hf"))
    state = hf_io.read_hf_weights(args.hf, spec)
    dtype = hf_io.DTYPES[args.dtype]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with hf_io.atomic_folder(args.output, args.overwrite) as tmp:
        hf_io.write_dcp(state, tmp)
    return f"wrote {args.output}: {spec.architecture}, {len(state)} tensors, {args.dtype}"


def main(argv: list[str] | None = None) -> int:
    return hf_io.run_cli("convert_hf_to_dcp", convert, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
