#!/usr/bin/env bash
# The installed-package path, as a new user takes it: build the wheel, install it with its `train`
# extra into a fresh virtual environment with pip, then from an empty temporary folder run
#   fishertune demo --max_steps 5
#   fishertune train --config tiny --max_steps 2 --output_dir OUT
# Versions: those of requirements-lock.txt (as CI's other steps), given to pip as constraints;
# CHECK_WHEEL_CONSTRAINTS=constraints.txt takes a user's path (torch pinned, the rest newest).
# Both must succeed, the demo must print its table and keep library noise off the terminal, and
# the training run must record itself as completed.
#
#   bash scripts/check_wheel.sh
#   CHECK_WHEEL_VENV=/tmp/ft-venv bash scripts/check_wheel.sh   # keep (and reuse) the venv
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
VENV=${CHECK_WHEEL_VENV:-$WORK/venv}
CONSTRAINTS=${CHECK_WHEEL_CONSTRAINTS:-$ROOT/requirements-lock.txt}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "torch==2.13.0"
# The wheel is built from a copy of the committed and untracked-but-not-ignored files, so that no
# build/ or egg-info left in the checkout leaks into it, and the checkout is left untouched.
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -co --exclude-standard -z | (cd "$ROOT" && xargs -0 tar -cf -) \
        | tar -xf - -C "$WORK/src"
else  # an unpacked source tree
    tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
        -cf - . | tar -xf - -C "$WORK/src"
fi
"$VENV/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/dist" "$WORK/src"
WHEEL=$(ls "$WORK"/dist/fishertune-*.whl)
"$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$VENV/bin/python" -m pip install --quiet -c "$CONSTRAINTS" "${WHEEL}[train]"
echo "installed $(basename "$WHEEL") into $VENV"

RUN=$WORK/empty
mkdir -p "$RUN"
cd "$RUN"
# Nothing from the checkout: the wheel's own package, no network, caches in the temp folder.
export PYTHONPATH="" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 XDG_CACHE_HOME="$WORK/cache"
export HF_HOME="$WORK/cache/huggingface" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FT="$VENV/bin/fishertune"

"$VENV/bin/python" - <<'EOF'
import fishertune
assert "site-packages" in fishertune.__file__, fishertune.__file__
EOF
"$VENV/bin/python" -m fishertune --version
"$FT" presets --path accelerate/fsdp | grep -q "site-packages/fishertune/configs/accelerate/fsdp.yaml"
# the shipped grids name their presets by name: they expand from a wheel too
"$FT" experiment --config tiny --seeds 0 --dry_run >"$WORK/dry.out" 2>&1 || {
    cat "$WORK/dry.out"
    exit 1
}
grep -q "site-packages/fishertune/configs/tiny.yaml" "$WORK/dry.out"

"$FT" demo --max_steps 5 >"$WORK/demo.out" 2>"$WORK/demo.err" || {
    cat "$WORK/demo.out" "$WORK/demo.err"
    echo "check_wheel: fishertune demo failed" >&2
    exit 1
}
cat "$WORK/demo.out"
for method in baseline neftune token-f logit-f; do
    grep -q "^| $method | " "$WORK/demo.out" || { echo "check_wheel: no $method row" >&2; exit 1; }
    [ -s "$WORK/cache/fishertune/demo/$method/train.log" ] || {
        echo "check_wheel: no log file for $method" >&2
        exit 1
    }
done
# stderr holds the progress bars only: no library warnings, no stray messages.
if tr '\r' '\n' <"$WORK/demo.err" | grep -v -E '^(baseline|neftune |token-f |logit-f ):|^$' \
    | grep -q .; then
    echo "check_wheel: the demo printed more than its progress bars:" >&2
    cat "$WORK/demo.err" >&2
    exit 1
fi

"$FT" train --config tiny --max_steps 2 --output_dir OUT >"$WORK/train.log" 2>&1 || {
    cat "$WORK/train.log"
    echo "check_wheel: fishertune train --config tiny failed" >&2
    exit 1
}
"$VENV/bin/python" - <<'EOF'
import json

record = json.load(open("OUT/fishertune_run.json"))
assert record["status"] == "completed" and record["global_step"] == 2, record
EOF
echo "check_wheel: demo and preset training from an installed wheel: ok"
