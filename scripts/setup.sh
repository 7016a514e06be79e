#!/usr/bin/env bash
# Create .venv with the locked environment: every package at its version in requirements-lock.txt
# (torch as the CPU build of constraints.txt), installed by uv, and fishertune itself editable.
# `bash scripts/lock.sh` refreshes the lock; pyproject.toml keeps the ranges users get.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements-lock.txt
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# uv at the lock's version, by the one installer a new venv has
.venv/bin/python -m pip install --quiet --quiet --disable-pip-version-check "$(grep -E '^uv==' "$LOCK" | cut -d' ' -f1)"
source scripts/torch_source.sh
UV=(.venv/bin/uv pip install --quiet --python .venv/bin/python)
"${UV[@]}" "${TORCH_SOURCE[@]}" -r "$LOCK"
"${UV[@]}" --no-deps -e .
# a dependency that pyproject.toml names but the lock lacks (a lock not refreshed) fails here
.venv/bin/uv pip check --quiet --python .venv/bin/python || {
    echo "setup: $LOCK does not satisfy pyproject.toml: run 'bash scripts/lock.sh'" >&2
    exit 1
}
.venv/bin/python -c "import torch, fishertune; print('fishertune ready, torch', torch.__version__)"
