"""Run flame's README training command through flare's train.py for several model configs, one
after another in this process (one import of torch/fla for all of them).

    python tests/flame_command_runner.py OUT_DIR CONFIG.json [CONFIG.json ...] -- FLAGS...

For each config: ``train.main(FLAGS + --model.config CONFIG --job.dump_folder OUT_DIR/<name>)``;
prints one JSON line per config: its name, the exit code, and the last line train.py wrote to
stderr (the one-line error of a refused job).
"""

import contextlib
import io
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402  (configures the device first, as train.py does)


def main() -> None:
    split = sys.argv.index("--")
    out_dir, configs, flags = sys.argv[1], sys.argv[2:split], sys.argv[split + 1:]
    for config in configs:
        name = os.path.splitext(os.path.basename(config))[0]
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            rc = train.main([*flags, "--model.config", config, "--job.dump_folder", os.path.join(out_dir, name)])
        lines = stderr.getvalue().strip().splitlines()
        print(json.dumps({"name": name, "rc": rc, "last_stderr": lines[-1] if lines else ""}), flush=True)


if __name__ == "__main__":
    main()
