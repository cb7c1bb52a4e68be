#!/usr/bin/env bash
# Speculative decoding on the Llama-3-8B shape with synthetic weights, with and without auto-off
# (issue 5; docs/speculative.md "Auto-off"). On the GPU machine, carrying gpu-bin/jitdelta-cuda
# (the CLI built with --features cuda), gpu-bin/synth_model and gpu-bin/tok (SmolLM2's
# tokenizer.json and tokenizer_config.json from testdata-cache/smollm2-bf16, so the CLI can run
# a synthetic model of vocabulary 49152):
#   scripts/gpu-auto-off.sh [TOKENS]
# Prints per run: tokens/s, an md5 of the ids (equal ids = equal output), acceptance, passes per
# token, auto-off pauses and plain steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
M=/tmp/spec8b; J=./gpu-bin/jitdelta-cuda
[ -f $M/config.json ] || ./gpu-bin/synth_model $M --layers 32 --hidden 4096 --intermediate 14336 --vocab 49152 --kv-heads 8 2>&1 | tail -1
cp gpu-bin/tok/* $M/
[ -f /tmp/s.jd ] || $J compress $M /tmp/s.jd 2>&1 | tail -1
P="Write a short story about a robot learning to paint."
$J generate --model /tmp/s.jd --device cuda --prompt warm-up --max-tokens 4 --quiet >/dev/null
for a in "--model $M" "--model /tmp/s.jd --mode exact" "--model /tmp/s.jd --speculative --controller fixed:2" "--model /tmp/s.jd --speculative --controller fixed:2 --auto-off" "--model /tmp/s.jd --speculative --controller ucb1 --auto-off"; do
  echo "== $a"
  $J generate $a --device cuda --prompt "$P" --max-tokens "${1:-128}" --json --quiet | python3 -c '
import json,sys,hashlib
d=json.loads(sys.stdin.read().strip().splitlines()[-1]); s=d.get("speculative") or {}; st=s.get("stats",{}); c=s.get("controller",{})
ids=d["token_ids"]
print("tok/s %.2f n=%d ids-md5 %s acc=%s target/tok=%s draft/tok=%s pauses=%s plain=%s" % (d["tokens_per_second"], len(ids), hashlib.md5(str(ids).encode()).hexdigest()[:10], st.get("acceptance_rate"), st.get("target_passes_per_token"), st.get("draft_passes_per_token"), c.get("auto_off_pauses"), c.get("plain_steps")))'
done
