#!/usr/bin/env bash
# Create .venv and install fishertune with every extra, torch pinned to the CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[all]"
.venv/bin/python -c "import torch, fishertune; print('fishertune ready, torch', torch.__version__)"
