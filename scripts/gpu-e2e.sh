#!/usr/bin/env bash
# End-to-end GPU benchmark (issue 4): a Llama-3-8B-shaped model with synthetic weights of real
# weight statistics, generated on the device machine, run at batch 1 as dense BF16, Exact and
# Draft. Two halves:
#   scripts/gpu-e2e.sh build   # here (no GPU): gpu_e2e (candle + CUDA) and synth_model into gpu-bin/
#   scripts/gpu-e2e.sh run [LAYERS]   # on the GPU machine (device tool, carry gpu-bin); default 32
#   scripts/gpu-e2e.sh test    # on the GPU machine: jitdelta-nn's CUDA tests (carry
#                              # gpu-bin/nn-gpu-tests alone: ~48 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
    # shellcheck disable=SC1091
    source ../shared/gpu/cuda-build-env.sh >/dev/null
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
    mkdir -p gpu-bin
    cargo build --release -p jitdelta-nn --features cuda --example gpu_e2e
    cargo build --release -p jitdelta-format --example synth_model
    cp "$CARGO_TARGET_DIR/release/examples/gpu_e2e" "$CARGO_TARGET_DIR/release/examples/synth_model" gpu-bin/
    test_bin=$(cargo build --release -p jitdelta-nn --features cuda --test gpu --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="gpu" and m.get("executable"): print(m["executable"])')
    cp "$test_bin" gpu-bin/nn-gpu-tests
    strip gpu-bin/gpu_e2e gpu-bin/synth_model gpu-bin/nn-gpu-tests
    ls -l gpu-bin
    ;;
run)
    out="${OUT:-gpu-out}"
    layers="${2:-32}"
    work="${WORK:-/tmp/jitdelta-e2e}"
    mkdir -p "$out" "$work"
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    model="$work/llama3-8b-shape-$layers"
    [ -f "$model/config.json" ] || ./gpu-bin/synth_model "$model" --layers "$layers" --hidden 4096 \
        --intermediate 14336 --vocab 128256 --kv-heads 8 2>&1 | tail -2
    ./gpu-bin/gpu_e2e "$model" --json "$out/e2e.json" "${@:3}" 2>&1 | tee "$out/e2e.log"
    ;;
test)
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    ./gpu-bin/nn-gpu-tests --test-threads 1
    ;;
*)
    echo "usage: $0 build | run [LAYERS] [gpu_e2e args] | test" >&2
    exit 2
    ;;
esac
