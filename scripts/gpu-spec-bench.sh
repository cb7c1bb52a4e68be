#!/usr/bin/env bash
# Speculative decoding wall clock on the GPU (issue 5): dense BF16, plain Exact, Draft and
# speculative Exact with several controllers, batch 1, greedy, same card, same run.
#
#   scripts/gpu-spec-bench.sh MODEL_DIR [TOKENS] [CONTROLLER[@COST]...]   # on the GPU machine
#
# CONTROLLER@COST runs the controller with --draft-cost COST (e.g. ucb1@auto).
# MODEL_DIR: a safetensors folder with config.json and tokenizer.json (dense BF16 reads it;
# it is compressed to $WORK/model.jd for the JIT runs). Needs gpu-bin/jitdelta-cuda (the CLI
# built with --features cuda; docs/gpu.md). One process per run; a short warm-up run first
# (the driver caches candle's kernels). Writes $OUT/spec-bench.jsonl (one JSON line per run)
# and prints per mode: decode tokens/s (first token to last: no prefill, no first-use kernel
# compilation), speed-up over dense BF16, acceptance, passes per token, the
# cost model's prediction (docs/speculative.md) and whether the ids equal plain Exact's.
# PROMPTS=n uses the first n of the 3 built-in prompts (default 3). BASELINES="dense exact"
# skips the plain Draft runs (default "dense exact draft"; the cost model needs draft).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:?usage: $0 MODEL_DIR [TOKENS] [CONTROLLER...]}"
tokens="${2:-128}"
shift $(($# < 2 ? $# : 2))
controllers=("$@")
[ ${#controllers[@]} -gt 0 ] || controllers=(fixed:1 fixed:2 fixed:4 max-conf margin ucb1 lin-ucb)
out="${OUT:-gpu-out}"
work="${WORK:-/tmp/jitdelta-spec-bench}"
mkdir -p "$out" "$work"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
J=./gpu-bin/jitdelta-cuda
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
[ -f "$work/model.jd" ] || $J compress "$model" "$work/model.jd" 2>&1 | tail -1

prompts=(
    "Write a short story about a robot learning to paint."
    "Write a Python function that returns the n-th Fibonacci number, with a docstring."
    "What is 37 times 43? Work it out step by step."
)
prompts=("${prompts[@]:0:${PROMPTS:-3}}")
jsonl="$out/spec-bench.jsonl"
: >"$jsonl"
# run NAME PROMPT_INDEX ARGS...: one generate, its JSON line tagged with the run's name.
run() {
    local name=$1 p=$2
    shift 2
    $J generate "$@" --device cuda --prompt "${prompts[$p]}" --max-tokens "$tokens" --json --quiet |
        python3 -c 'import json,sys
d=json.loads(sys.stdin.read().strip().splitlines()[-1])
d["run"]=sys.argv[1]; d["prompt_index"]=int(sys.argv[2]); d.pop("text",None)
print(json.dumps(d))' "$name" "$p" >>"$jsonl"
}
$J generate --model "$work/model.jd" --device cuda --prompt warm-up --max-tokens 8 --quiet >/dev/null
for p in "${!prompts[@]}"; do
    for b in ${BASELINES:-dense exact draft}; do
        case $b in
        dense) run dense "$p" --model "$model" ;;
        exact) run exact "$p" --model "$work/model.jd" ;;
        draft) run draft "$p" --model "$work/model.jd" --mode draft ;;
        esac
    done
    for c in "${controllers[@]}"; do
        # CONTROLLER@COST passes --draft-cost COST (a number, or auto to measure it).
        cost=()
        [[ $c == *@* ]] && cost=(--draft-cost "${c#*@}")
        run "spec $c" "$p" --model "$work/model.jd" --speculative --controller "${c%@*}" "${cost[@]}"
    done
done

python3 - "$jsonl" <<'EOF'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
names = list(dict.fromkeys(r["run"] for r in runs))
def totals(name):
    # Decode rates: from the first token to the last, without the prefill and first-use costs.
    rs = [r for r in runs if r["run"] == name]
    n = sum(len(r["token_ids"]) - 1 for r in rs)
    t = sum((len(r["token_ids"]) - 1) / r["decode_tokens_per_second"] for r in rs)
    return rs, n, t
_, n_dense, t_dense = totals("dense")
_, n_exact, t_exact = totals("exact")
_, n_draft, t_draft = totals("draft")
plain = n_draft > 0  # the plain Draft runs, which the cost model needs
exact_ids = {r["prompt_index"]: r["token_ids"] for r in runs if r["run"] == "exact"}
print("| run | tokens/s | vs dense BF16 | acceptance | accepted / round | target passes / token "
      "| draft passes / token | cost model tokens/s | draft / verify pass ms (plain steps "
      + (f"{1e3 * t_draft / n_draft:.2f}" if plain else "-")
      + f" / {1e3 * t_exact / n_exact:.2f}) | ids == plain Exact |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in names:
    rs, n, t = totals(name)
    row = [name, f"{n / t:.1f}", f"{t_dense / n_dense / (t / n):.2f}x"]
    if rs[0].get("speculative"):
        st = [r["speculative"]["stats"] for r in rs]
        tp = sum(s["target_passes"] for s in st)
        dp = sum(s["draft_passes"] for s in st)
        drafted = sum(s["drafted"] for s in st)
        acc = sum(s["accepted"] for s in st)
        rounds = sum(s["rounds"] for s in st)
        # Cost model: every target pass costs a plain Exact step, every draft pass a Draft step.
        predicted = n / (tp * t_exact / n_exact + dp * t_draft / n_draft) if plain else float("nan")
        # Mean pass times over the prompts, weighted by their pass counts.
        def mean_ms(key, count):
            w = [(r["speculative"][key], s[count]) for r, s in zip(rs, st) if r["speculative"].get(key)]
            return sum(m * c for m, c in w) / max(sum(c for _, c in w), 1)
        row += [f"{acc / max(drafted, 1):.3f}", f"{acc / max(rounds, 1):.2f}", f"{tp / n:.3f}",
                f"{dp / n:.3f}", f"{predicted:.1f}",
                f"{mean_ms('mean_draft_pass_ms', 'draft_passes'):.2f} / {mean_ms('mean_verify_pass_ms', 'target_passes'):.2f}"]
    else:
        row += ["", "", "", "", "", ""]
    same = all(r["token_ids"] == exact_ids[r["prompt_index"]] for r in rs)
    row.append("yes" if same else "NO")
    print("| " + " | ".join(row) + " |")
print(f"\n{len(exact_ids)} prompts; tokens per run: "
      + ", ".join(f"{r['run']}#{r['prompt_index']}={len(r['token_ids'])}" for r in runs if r["run"] in ("dense", "exact")))
EOF
