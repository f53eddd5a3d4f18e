#!/usr/bin/env bash
# Set up rmt-fast in a virtual environment (.venv by default) on a fresh machine.
#   bash scripts/setup.sh            # CPU machine: torch 2.13.0 (CPU build where one is at hand)
#   TORCH_SPEC="torch>=2.11" bash scripts/setup.sh
#   VENV=/path/to/venv bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC"
python -m pip install -q -e ".[dev,bench,train]"
python -c "import torch, transformers, rmt_fast; print('rmt-fast ready: torch', torch.__version__, '| transformers', transformers.__version__)"
