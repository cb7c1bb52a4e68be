#!/usr/bin/env bash
# Peak memory of streaming conversion on synthetic multi-GB models.
#
# For each layer count given, generates a synthetic Llama-shaped BF16 model (sharded safetensors,
# Llama-3-8B layer shapes by default) with the `synth_model` example, then runs
#   jitdelta compress, jitdelta verify, jitdelta decompress (+ cmp against the input)
# under /usr/bin/time -v, and prints peak RSS, wall time and throughput for each. While each
# command runs, /proc/PID/status is sampled every 50 ms to split the peak into anonymous memory
# (heap) and file-backed pages (mmap'd input/output counted in RSS).
#
# Usage:   scripts/streaming-rss.sh [LAYERS ...]          (default: 8 16)
# Env:     WORKDIR=/work/synth-rss   where models and outputs go (removed at the end unless KEEP=1)
#          HIDDEN=4096 INTERMEDIATE=14336 VOCAB=32000 KV_HEADS=8 SEED=0
#          SHARD_BYTES=2000000000    shard size limit of the generated model
#          CMP=1                     byte-compare the decompressed shards with the input
#          DROP_CACHES=0             1: drop the page cache before each timed command (needs root)
#          RESULTS=/tmp/streaming-rss-<date>.tsv   where the table is also saved
#          CARGO_TARGET_DIR          honoured (default: cargo's)
set -euo pipefail

cd "$(dirname "$0")/.."
LAYERS=("$@")
[ ${#LAYERS[@]} -eq 0 ] && LAYERS=(8 16)
WORKDIR=${WORKDIR:-/work/synth-rss}
HIDDEN=${HIDDEN:-4096}
INTERMEDIATE=${INTERMEDIATE:-14336}
VOCAB=${VOCAB:-32000}
KV_HEADS=${KV_HEADS:-8}
SEED=${SEED:-0}
SHARD_BYTES=${SHARD_BYTES:-2000000000}
CMP=${CMP:-1}
DROP_CACHES=${DROP_CACHES:-0}
KEEP=${KEEP:-0}
RESULTS=${RESULTS:-/tmp/streaming-rss-$(date +%Y%m%d-%H%M%S).tsv}
TARGET=${CARGO_TARGET_DIR:-target}
JD="$TARGET/release/jitdelta"

[ -x /usr/bin/time ] || { echo "GNU time missing: apt-get install -y time" >&2; exit 1; }

echo "== machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM"
echo "== commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)'), $(date -u +%Y-%m-%dT%H:%MZ)"
echo "== building release CLI"
cargo build --release -q -p jitdelta-cli
cargo build --release -q -p jitdelta-format --example synth_model

case "$WORKDIR" in /|"") echo "refusing WORKDIR=$WORKDIR" >&2; exit 1;; esac
mkdir -p "$WORKDIR"
cleanup() { [ "$KEEP" = 1 ] || rm -rf "$WORKDIR"; }
trap cleanup EXIT

kb_of() { awk -F': ' -v k="$2" '$1 ~ k {print $2}' "$1"; }

# measure NAME CMD... : runs CMD under time -v, samples RssAnon/RssFile; sets M_* variables.
measure() {
    local name=$1; shift
    local log="$WORKDIR/$name"
    [ "$DROP_CACHES" = 1 ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
    /usr/bin/time -v -o "$log.time" "$@" >"$log.out" 2>"$log.err" &
    local tpid=$! cpid="" anon=0 file=0 a f
    while kill -0 "$tpid" 2>/dev/null; do
        [ -n "$cpid" ] || cpid=$(pgrep -P "$tpid" | head -1 || true)
        if [ -n "$cpid" ]; then
            read -r a f < <(awk '/^RssAnon/{a=$2} /^RssFile/{f=$2} END{print a+0, f+0}' \
                "/proc/$cpid/status" 2>/dev/null || echo "0 0")
            [ "${a:-0}" -gt "$anon" ] && anon=$a
            [ "${f:-0}" -gt "$file" ] && file=$f
        fi
        sleep 0.05
    done
    local rc=0
    wait "$tpid" || rc=$?
    if [ "$rc" != 0 ]; then
        echo "!! $name failed (rc $rc):" >&2; cat "$log.err" "$log.out" >&2; exit 1
    fi
    M_RSS_KB=$(kb_of "$log.time" "Maximum resident set size")
    local el; el=$(kb_of "$log.time" "Elapsed \\(wall clock\\)")
    M_WALL=$(echo "$el" | awk -F: '{s=0; for(i=1;i<=NF;i++) s=s*60+$i; print s}')
    M_ANON_KB=$anon
    M_FILE_KB=$file
}

mib() { awk -v k="$1" 'BEGIN{printf "%.0f", k/1024}'; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN{printf "%.0f", (s>0 ? b/s/1e6 : 0)}'; }

printf "layers\tmodel_bytes\tlargest_tensor_bytes\tjd_bytes\tratio_pct\tstep\tpeak_rss_MiB\tsampled_anon_MiB\tsampled_file_MiB\twall_s\tMB_per_s\n" >"$RESULTS"

for L in "${LAYERS[@]}"; do
    M="$WORKDIR/model-$L"; OUTJD="$WORKDIR/model-$L.jd"; DEC="$WORKDIR/model-$L.out"
    rm -rf "$M" "$OUTJD" "$DEC"
    echo "== $L layers: generating $M"
    cargo run --release -q -p jitdelta-format --example synth_model -- "$M" \
        --hidden "$HIDDEN" --intermediate "$INTERMEDIATE" --layers "$L" --vocab "$VOCAB" \
        --kv-heads "$KV_HEADS" --shard-bytes "$SHARD_BYTES" --seed "$SEED" 2>"$WORKDIR/gen.err"
    cat "$WORKDIR/gen.err"
    LARGEST=$(sed -n 's/.*largest tensor .* (\([0-9]*\) bytes).*/\1/p' "$WORKDIR/gen.err")
    MODEL_BYTES=$(cat "$M"/*.safetensors | wc -c)
    SHARD_MAX=$(stat -c %s "$M"/*.safetensors | sort -n | tail -1)
    df -h "$WORKDIR" | tail -1

    measure "compress-$L" "$JD" --quiet compress "$M" "$OUTJD"
    cat "$WORKDIR/compress-$L.err"
    C=("$M_RSS_KB" "$M_ANON_KB" "$M_FILE_KB" "$M_WALL")
    JD_BYTES=$(stat -c %s "$OUTJD")
    RATIO=$(awk -v a="$JD_BYTES" -v b="$MODEL_BYTES" 'BEGIN{printf "%.2f", 100*a/b}')

    measure "verify-$L" "$JD" --quiet verify "$OUTJD" "$M"
    cat "$WORKDIR/verify-$L.out"
    V=("$M_RSS_KB" "$M_ANON_KB" "$M_FILE_KB" "$M_WALL")

    measure "decompress-$L" "$JD" --quiet decompress "$OUTJD" "$DEC"
    D=("$M_RSS_KB" "$M_ANON_KB" "$M_FILE_KB" "$M_WALL")
    if [ "$CMP" = 1 ]; then
        for f in "$M"/*; do cmp "$f" "$DEC/$(basename "$f")"; done
        echo "decompressed output is byte-identical to the input"
    fi

    for row in "compress ${C[*]}" "verify ${V[*]}" "decompress ${D[*]}"; do
        read -r step rss anon file wall <<<"$row"
        printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n" "$L" "$MODEL_BYTES" "$LARGEST" \
            "$JD_BYTES" "$RATIO" "$step" "$(mib "$rss")" "$(mib "$anon")" "$(mib "$file")" \
            "$wall" "$(mbps "$MODEL_BYTES" "$wall")" >>"$RESULTS"
    done
    echo "   largest shard $SHARD_MAX bytes"
    rm -rf "$M" "$OUTJD" "$DEC"
done

echo
echo "== results (peak_rss = ru_maxrss from time -v; anon/file = max sampled RssAnon/RssFile; MB/s = model bytes / wall)"
column -t -s $'\t' "$RESULTS"
echo "(saved to $RESULTS)"
