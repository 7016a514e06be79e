#!/usr/bin/env bash
# The newest versions pyproject.toml allows, against a quick part of the test suite: a fresh venv
# (torch stays the CPU build of constraints.txt), every other package at its newest allowed
# version, then the tests below on this checkout's src/. It reports which versions differ from
# requirements-lock.txt and whether the tests pass; CI runs it without failing on it (a release
# outside this project's control must not block a change here, but should be seen before the lock
# moves to it: `bash scripts/lock.sh --upgrade`).
#
#   bash scripts/check_latest.sh                       # exit status 1 if the tests fail
#   CHECK_LATEST_TIMEOUT=300 bash scripts/check_latest.sh
#
# Bounded in time: the install and the tests together stop after CHECK_LATEST_TIMEOUT seconds
# (default 600), which counts as a failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
LIMIT=${CHECK_LATEST_TIMEOUT:-600}
UV=${UV:-$ROOT/.venv/bin/uv}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
TESTS=(tests/test_trainer.py tests/test_penalties.py tests/test_data.py tests/test_evaluation.py)

"$PY" -m venv --without-pip "$WORK/venv"
echo "$(grep -E '^torch==' constraints.txt)+cpu" >"$WORK/torch.txt"
source scripts/torch_source.sh
# requirements from pyproject.toml only: nothing is built or written in the checkout
start=$SECONDS
timeout "$LIMIT" "$UV" pip install --quiet --python "$WORK/venv/bin/python" --upgrade \
    "${TORCH_SOURCE[@]}" -c "$WORK/torch.txt" -r pyproject.toml --extra all
"$UV" pip freeze --quiet --python "$WORK/venv/bin/python" >"$WORK/freeze.txt"
newer=$(awk -F'==' 'NR == FNR { split($2, v, " "); lock[tolower($1)] = v[1]; next }
    /==/ { name = tolower($1); if (name in lock && lock[name] != $2) print "  " $1 " " lock[name] " -> " $2 }' \
    <(grep -E '^[A-Za-z0-9_.-]+==' requirements-lock.txt) "$WORK/freeze.txt")
echo "check_latest: versions that differ from requirements-lock.txt (lock -> newest resolution):"
echo "${newer:-  none}"
left=$((LIMIT - (SECONDS - start)))
[ "$left" -gt 30 ] || { echo "check_latest: no time left for the tests" >&2; exit 1; }
PYTHONPATH="$ROOT/src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    timeout "$left" "$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
