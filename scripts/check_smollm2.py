#!/usr/bin/env python3
"""Sanity check of the prepared smollm2-bf16 folder (reference, not run by default).

Usage: check_smollm2.py [MODEL_DIR] [--prompt TEXT] [--tokens N]
  MODEL_DIR defaults to ${JITDELTA_CACHE:-<repo>/testdata-cache}/smollm2-bf16.
  Run it with the cache venv: $CACHE/venv/bin/python scripts/check_smollm2.py

1. tokenizer.json (via the `tokenizers` package): chat prompt encode/decode
   round-trips and <|im_start|> / <|im_end|> are single tokens.
2. A plain numpy forward pass of the Llama model (RMSNorm, rotate-half RoPE,
   GQA causal attention with a KV cache, SiLU MLP, tied or separate lm_head)
   greedy-decodes a ChatML prompt. With correct weights the answer to the
   default question mentions Paris; garbage means a layout bug (e.g. q/k rows).
"""

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np


def load_safetensors(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        raw = np.frombuffer(data, dtype=np.uint8, count=e - s, offset=8 + n + s)
        if info["dtype"] == "BF16":
            a = (raw.view("<u2").astype(np.uint32) << np.uint32(16)).view(np.float32)
        elif info["dtype"] == "F16":
            a = raw.view("<f2").astype(np.float32)
        elif info["dtype"] == "F32":
            a = raw.view("<f4").astype(np.float32)
        else:
            raise ValueError(f"{name}: unsupported dtype {info['dtype']}")
        out[name] = a.reshape(info["shape"])
    return meta, out


class Llama:
    def __init__(self, model_dir):
        self.cfg = cfg = json.loads((model_dir / "config.json").read_text())
        _, self.w = load_safetensors(model_dir / "model.safetensors")
        self.n_layer = cfg["num_hidden_layers"]
        self.n_head = cfg["num_attention_heads"]
        self.n_kv = cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or cfg["hidden_size"] // self.n_head
        self.eps = cfg["rms_norm_eps"]
        self.theta = cfg["rope_theta"]
        self.lm_head = self.w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else self.w["lm_head.weight"]
        self.cache = [([], []) for _ in range(self.n_layer)]
        self.pos = 0

    def rms(self, x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * g

    def rope(self, x, pos):  # x: [T, H, hd], rotate-half (HF) convention
        half = self.hd // 2
        inv = 1.0 / (self.theta ** (np.arange(0, half, dtype=np.float64) * 2 / self.hd))
        ang = np.outer(pos, inv)  # [T, half]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def forward(self, ids):
        """Feeds ids (appending to the KV cache); returns logits of the last position."""
        w = self.w
        T = len(ids)
        pos = np.arange(self.pos, self.pos + T)
        x = w["model.embed_tokens.weight"][ids]
        rep = self.n_head // self.n_kv
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            h = self.rms(x, w[p + "input_layernorm.weight"])
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, self.n_head, self.hd)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, self.n_kv, self.hd)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, self.n_kv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            ks, vs = self.cache[i]
            ks.append(k)
            vs.append(v)
            K = np.repeat(np.concatenate(ks), rep, axis=1)  # [S, H, hd]
            V = np.repeat(np.concatenate(vs), rep, axis=1)
            S = K.shape[0]
            att = np.einsum("thd,shd->hts", q, K) / np.sqrt(self.hd)
            mask = np.arange(S)[None, :] > (pos[:, None])  # causal
            att = np.where(mask[None], -np.inf, att)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hts,shd->thd", att, V).reshape(T, self.n_head * self.hd)
            x = x + o @ w[p + "self_attn.o_proj.weight"].T
            h = self.rms(x, w[p + "post_attention_layernorm.weight"])
            g = h @ w[p + "mlp.gate_proj.weight"].T
            u = h @ w[p + "mlp.up_proj.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * u) @ w[p + "mlp.down_proj.weight"].T
        self.pos += T
        x = self.rms(x[-1], w["model.norm.weight"])
        return x @ self.lm_head.T


def main():
    ap = argparse.ArgumentParser()
    root = Path(__file__).resolve().parent.parent
    cache = Path(os.environ.get("JITDELTA_CACHE", root / "testdata-cache"))
    ap.add_argument("model_dir", nargs="?", default=str(cache / "smollm2-bf16"))
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--system", action="store_true", help="prepend the chat template's default system message")
    ap.add_argument("--expect", default="Paris", help="fail unless the output contains this ('' to skip)")
    args = ap.parse_args()
    model_dir = Path(args.model_dir)

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompt = ""
    if args.system:
        prompt += "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    prompt += f"<|im_start|>user\n{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.encode(prompt, add_special_tokens=False)
    ids = enc.ids
    dec = tok.decode(ids, skip_special_tokens=False)
    assert dec == prompt, f"round trip failed: {dec!r} != {prompt!r}"
    for special in ("<|im_start|>", "<|im_end|>"):
        e = tok.encode(special, add_special_tokens=False).ids
        assert len(e) == 1, f"{special} encodes to {e}"
    assert tok.encode("x 12345", add_special_tokens=False).tokens == ["x", "Ġ", "1", "2", "3", "4", "5"], "digit split"
    text = "Hello, world! Ünïcödé ✓ 3.14 — tabs\tand\n  spaces"
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
    print(f"tokenizer ok: {len(ids)} prompt tokens, <|im_start|> = {tok.token_to_id('<|im_start|>')}")

    t0 = time.time()
    m = Llama(model_dir)
    eos = m.cfg["eos_token_id"]
    logits = m.forward(np.array(ids))
    out = []
    for _ in range(args.tokens):
        nxt = int(np.argmax(logits))
        if nxt == eos:
            break
        out.append(nxt)
        logits = m.forward(np.array([nxt]))
    text = tok.decode(out, skip_special_tokens=False)
    print(f"greedy ({len(out)} tokens, {time.time() - t0:.1f}s): {text!r}")
    if args.expect and args.expect not in text:
        print(f"FAIL: output does not contain {args.expect!r}", file=sys.stderr)
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
