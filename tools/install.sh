#!/usr/bin/env bash
# Set up scope_ds from scratch in ./.venv: torch first (a CPU build where one is on disk), then the
# package with its test extra. Safe to rerun; prints where everything went.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# Torch before anything else: a requirement that admits a newer release would otherwise pull a
# multi-GB CUDA build. TORCH_SPEC overrides it (e.g. on a GPU cluster).
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
echo "installed into $(pwd)/.venv: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"
