#!/usr/bin/env bash
# Create ./.venv with flare and its pinned dependencies (idempotent; offline-capable after the first run).
# torch: an installed torch >= 2.11 is kept (e.g. your CUDA build). Otherwise TORCH_SPEC is installed;
# its default, torch==2.13.0, is the CPU build on this project's CPU machines and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
if ! python -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q -e ".[test]"
python -c 'import torch, torchtitan, fla; print(f"flare env ready: torch {torch.__version__}, fla {fla.__version__}, cuda={torch.cuda.is_available()}")'
