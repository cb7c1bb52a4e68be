#!/usr/bin/env bash
# Speculative vs plain Exact greedy on the GPU (issue 5): a Llama-3-8B-shaped synthetic model
# (vocab 49152, SmolLM2 tokenizer in gpu-bin/tok), 128 tokens each; prints tokens/s and an md5
# of the token ids (all must match). Carry gpu-bin/{jitdelta-cuda,synth_model,tok}; run there.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH
J=./gpu-bin/jitdelta-cuda
M=/tmp/spec8b
./gpu-bin/synth_model $M --layers 32 --hidden 4096 --intermediate 14336 --vocab 49152 --kv-heads 8 2>&1 | tail -1
cp gpu-bin/tok/* $M/
$J compress $M /tmp/spec8b.jd 2>&1 | tail -1
P="Write a short story about a robot learning to paint."
for args in "--model /tmp/spec8b.jd --mode exact" "--model /tmp/spec8b.jd --speculative --controller fixed:2" "--model /tmp/spec8b.jd --speculative --controller fixed:4" "--model /tmp/spec8b.jd --speculative --controller ucb1" "--model /tmp/spec8b.jd --mode exact"; do
  echo "== $args"
  $J generate $args --device cuda --prompt "$P" --max-tokens 128 --json 2>&1 | python3 -c '
import json,sys,hashlib
for l in sys.stdin:
    l=l.strip()
    if l.startswith("{"):
        d=json.loads(l); s=d.get("speculative") or {}; st=s.get("stats",{})
        ids=d["token_ids"]
        print("tok/s %.2f n=%d ids-md5 %s first %s acc=%s mal=%s target_passes/tok=%s" % (d["tokens_per_second"], len(ids), hashlib.md5(str(ids).encode()).hexdigest()[:10], ids[:5], st.get("acceptance_rate"), st.get("mean_accepted_length"), st.get("target_passes_per_token")))
    else: print(l[:300])
'
done
