#!/usr/bin/env bash
# GPU kernel tests and benchmark (issue 4). Two halves:
#   scripts/gpu-kernels.sh build   # here (no GPU): build the CUDA test binary + kernel_bench into
#                                  # gpu-bin/ and compress MiniLM BF16 (real weights) to gpu-bin/
#   scripts/gpu-kernels.sh run     # on the GPU machine (device tool, carry gpu-bin): tests, then
#                                  # the benchmark; logs and JSON go to $OUT (or gpu-out/)
#   scripts/gpu-kernels.sh variants "GEMV_STAGES=4 GEMV_WARPS=4" "DECODE_WORDS=4" ...
#                                  # on the GPU machine: tests and benchmark per set of kernel
#                                  # defines (kernels.cu tuning knobs), one JSON each
#   scripts/gpu-kernels.sh anatomy [layer_anatomy args]
#                                  # on the GPU machine: a decoder layer's kernels chained, with
#                                  # ops left out (where a step's time goes; default: the 7B
#                                  # shape of scripts/gpu-real-7b.sh, then Llama-3-8B's)
# The build half needs the CUDA toolkit recipe in ../shared/gpu/cuda-build-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
build)
    # shellcheck disable=SC1091
    source ../shared/gpu/cuda-build-env.sh >/dev/null
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
    mkdir -p gpu-bin
    # NVRTC compiles the kernels at run time: catch its errors here, not on the GPU machine.
    python3 scripts/nvrtc_check.py crates/jitdelta-kernels/src/*.cu
    test_bin=$(cargo build --release --features cuda -p jitdelta-kernels --tests --example kernel_bench \
        --example layer_anatomy \
        --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="gpu" and m.get("executable"): print(m["executable"])')
    cp "$test_bin" gpu-bin/kernels-gpu-tests
    cp "$CARGO_TARGET_DIR/release/examples/kernel_bench" "$CARGO_TARGET_DIR/release/examples/layer_anatomy" gpu-bin/
    strip gpu-bin/kernels-gpu-tests gpu-bin/kernel_bench gpu-bin/layer_anatomy
    [ -f testdata-cache/minilm-bf16/model.safetensors ] || scripts/fetch-test-data.sh
    # The CPU build of the CLI, in the CPU target dir (no CUDA flags, no clobbering a CUDA build).
    env -u RUSTFLAGS CARGO_TARGET_DIR="$PWD/target" cargo run --release -q -p jitdelta-cli -- \
        compress testdata-cache/minilm-bf16/model.safetensors gpu-bin/minilm-bf16.jd
    ls -l gpu-bin
    ;;
run)
    out="${OUT:-gpu-out}"
    mkdir -p "$out"
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    JITDELTA_KERNEL_JD=gpu-bin/minilm-bf16.jd ./gpu-bin/kernels-gpu-tests --test-threads 1 2>&1 | tee "$out/tests.log"
    ./gpu-bin/kernel_bench --jd gpu-bin/minilm-bf16.jd --json "$out/kernel-bench.json" "${@:2}" 2>&1 | tee "$out/kernel-bench.log"
    ;;
variants)
    out="${OUT:-gpu-out}"
    mkdir -p "$out"
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    i=0
    for defines in "${@:2}"; do
        i=$((i + 1))
        echo "== variant $i: ${defines:-defaults}" | tee -a "$out/variants.log"
        JITDELTA_KERNEL_DEFINES="$defines" JITDELTA_KERNEL_JD=gpu-bin/minilm-bf16.jd \
            ./gpu-bin/kernels-gpu-tests --test-threads 1 >"$out/tests-$i.log" 2>&1 &&
            echo "tests passed" | tee -a "$out/variants.log" ||
            { echo "TESTS FAILED" | tee -a "$out/variants.log"; tail -30 "$out/tests-$i.log"; continue; }
        flags=()
        for d in $defines; do flags+=(--define "$d"); done
        ./gpu-bin/kernel_bench --jd gpu-bin/minilm-bf16.jd --json "$out/bench-$i.json" "${flags[@]}" \
            >"$out/bench-$i.log" 2>&1 || echo "BENCH FAILED" | tee -a "$out/variants.log"
        tail -12 "$out/bench-$i.log" | tee -a "$out/variants.log"
    done
    ;;
anatomy)
    out="${OUT:-gpu-out}"
    mkdir -p "$out"
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    if [ $# -gt 1 ]; then
        ./gpu-bin/layer_anatomy --json "$out/anatomy.json" "${@:2}" 2>&1 | tee "$out/anatomy.log"
    else
        for rows in 1 4; do
            ./gpu-bin/layer_anatomy --rows "$rows" --json "$out/anatomy-7b-r$rows.json" 2>&1 |
                tee "$out/anatomy-7b-r$rows.log"
        done
        ./gpu-bin/layer_anatomy --hidden 4096 --heads 32 --kv-heads 8 --head-dim 128 --mlp 14336 \
            --json "$out/anatomy-8b.json" 2>&1 | tee "$out/anatomy-8b.log"
    fi
    ;;
*)
    echo "usage: $0 build|run [kernel_bench args]|variants [DEFINES]...|anatomy [args]" >&2
    exit 2
    ;;
esac
