#!/usr/bin/env python3
"""Widens a small Llama checkpoint (BF16 safetensors) into a large one that computes the same
function: a real language model at the shape (and memory traffic) of a 7B model, for measuring
speculative decoding on the GPU where no real large checkpoint can be carried (issue 5).

    scripts/widen_model.py SRC_DIR DST_DIR [--factor 8]

Every hidden unit, attention head and MLP unit is repeated FACTOR times (FACTOR a power of two):
- the residual stream becomes FACTOR copies of the original one, side by side; RMSNorm sees the
  same mean square, so its weight is tiled;
- a projection W (out, in) becomes the (FACTOR out, FACTOR in) block matrix of copies of
  W / FACTOR: each output sums FACTOR identical halves of the original sum, so it equals the
  original output (up to the summation order's rounding). Dividing by a power of two is exact
  in BF16 for the weights of real models (no result is subnormal: checked);
- query heads and key/value heads repeat in blocks, so query head a * heads + h still reads key
  head a * kv_heads + h // groups, the copy of its original;
- the embedding is tiled unscaled; the LM head is the tiled embedding (or lm_head) divided by
  FACTOR, so logits equal the original ones. The output is untied.

The result's logits match the source's up to rounding, so its greedy output and its draft's
acceptance are the source model's, while each token streams FACTOR^2 times the weight bytes.
Writes shards of at most ~2 GB with model.safetensors.index.json, config.json, and copies the
tokenizer files. numpy only (reads BF16 as raw 16-bit words).
"""
import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_testdata import bf16_bits_to_f32, f32_to_bf16_bits, write_safetensors  # noqa: E402

SHARD_BYTES = 2 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def read_bf16_tensors(folder):
    """{name: uint16 array} from the folder's safetensors files (memory-mapped)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        for name, info in header.items():
            if info["dtype"] != "BF16":
                sys.exit(f"widen_model: {name} is {info['dtype']}, expected BF16")
            s, e = info["data_offsets"]
            out[name] = data[s:e].view("<u2").reshape(info["shape"])
    if not out:
        sys.exit(f"widen_model: no .safetensors files in {folder}")
    return out


def scaled(bits, factor):
    """BF16 bits divided by `factor` (a power of two), exactly or not at all."""
    x = bf16_bits_to_f32(bits) / np.float32(factor)
    out = f32_to_bf16_bits(x)
    back = bf16_bits_to_f32(out) * np.float32(factor)
    orig = bf16_bits_to_f32(bits)
    lossy = ~((back == orig) | np.isnan(orig))
    if lossy.any():
        sys.exit(f"widen_model: {int(lossy.sum())} weights lose bits when divided by {factor}")
    return out


def widen(name, w, factor):
    """The widened tensor for `name` (Hugging Face Llama/Qwen2 names)."""
    if name.endswith("norm.weight") or name.endswith("_proj.bias"):
        return np.tile(w, factor)
    if name == "model.embed_tokens.weight":
        return np.tile(w, (1, factor))
    if name == "lm_head.weight":
        return np.tile(scaled(w, factor), (1, factor))
    if name.endswith("_proj.weight"):
        return np.tile(scaled(w, factor), (factor, factor))
    sys.exit(f"widen_model: don't know how to widen {name} {w.shape}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--factor", type=int, default=8)
    a = ap.parse_args()
    r = a.factor
    if r < 1 or r & (r - 1):
        sys.exit("widen_model: --factor must be a power of two")
    cfg = json.loads((a.src / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    tensors = read_bf16_tensors(a.src)
    if "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    a.dst.mkdir(parents=True, exist_ok=True)
    shards, current, size, params = [], [], 0, 0
    for name in sorted(tensors):
        w = np.ascontiguousarray(widen(name, tensors[name], r))
        params += w.size
        raw = w.astype("<u2").tobytes()
        if current and size + len(raw) > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, "BF16", w.shape, raw))
        size += len(raw)
        if size > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(a.dst / file, shard, {"format": "pt", "widened_by": str(r)})
        weight_map.update({name: file for name, *_ in shard})
        print(f"{file}: {len(shard)} tensors", flush=True)
    (a.dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    cfg.update(
        hidden_size=cfg["hidden_size"] * r,
        intermediate_size=cfg["intermediate_size"] * r,
        num_attention_heads=heads * r,
        num_key_value_heads=cfg["num_key_value_heads"] * r,
        head_dim=head_dim,
        tie_word_embeddings=False,
    )
    (a.dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (a.src / f).is_file():
            shutil.copy(a.src / f, a.dst / f)
    print(f"widened {a.src} by {r}: {params / 1e9:.2f}B weights in {len(shards)} shards")


if __name__ == "__main__":
    main()
