"""Write the list of flame's job-config keys, with their defaults, that tests/test_flame_keys.py
checks recipe/flame_keys.py against.

    python scripts/dev/flame_key_list.py /path/to/flame [-o tests/data/flame_keys.json]

Reads a checkout of fla-org/flame: every argument its ``flame/config_manager.py`` parser defines
(loaded from the file; it needs torch and torchtitan, as flare does), plus the keys flame's own job
files (``flame/models/*.toml``) set that the parser does not define (flame merges them into the
config unchecked, and its trainer reads some of them). Those have ``"default": null`` and
``"source": "toml"``.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib


def parser_keys(flame_root: str) -> dict[str, dict]:
    path = os.path.join(flame_root, "flame", "config_manager.py")
    spec = importlib.util.spec_from_file_location("flame_config_manager", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.JobConfig().parser
    keys: dict[str, dict] = {}
    for action in parser._actions:
        if "." not in action.dest or action.dest in keys:
            continue  # --help; a negating flag sharing its key's dest (--checkpoint.no_...)
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        keys[action.dest] = {"default": action.default, "flag": flag, "source": "parser"}
    return keys


def toml_only_keys(flame_root: str, known: set[str]) -> dict[str, dict]:
    keys: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(flame_root, "flame", "**", "*.toml"), recursive=True)):
        with open(path, "rb") as f:
            for section, body in tomllib.load(f).items():
                for name in body:
                    key = f"{section}.{name}"
                    if key not in known and key not in keys:
                        keys[key] = {"default": None, "flag": False, "source": "toml"}
    return keys


def flame_commit(flame_root: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", flame_root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("flame_root", help="a checkout of fla-org/flame")
    ap.add_argument("-o", "--output", default="tests/data/flame_keys.json")
    ap.add_argument("--commit", default=None, help="flame commit to record (default: git rev-parse of the checkout)")
    args = ap.parse_args(argv)

    keys = parser_keys(args.flame_root)
    keys.update(toml_only_keys(args.flame_root, set(keys)))
    doc = {"flame_commit": args.commit or flame_commit(args.flame_root), "keys": dict(sorted(keys.items()))}
    with open(args.output, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    print(f"{len(keys)} keys -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
