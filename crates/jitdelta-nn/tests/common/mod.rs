//! Helpers shared by the integration tests: the real-weights test data and tiny synthetic
//! models written on the fly.
#![allow(dead_code)] // each test binary uses a different subset

use candle_core::{DType, Device, Tensor};
use jitdelta_format::{compress_model, EncodeOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The test-data cache: `$JITDELTA_CACHE` or `<repo>/testdata-cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("JITDELTA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata-cache"))
}

/// SmolLM2-135M-Instruct as BF16 safetensors; fails (never skips) when missing.
pub fn smollm2_dir() -> PathBuf {
    let dir = cache_dir().join("smollm2-bf16");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("config.json").is_file(),
        "test data missing: {} (run scripts/fetch-test-data.sh)",
        dir.display()
    );
    dir
}

/// SmolLM2 compressed to a jitdelta file, once per test binary (in a temporary folder).
pub fn smollm2_jd() -> PathBuf {
    static JD: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    JD.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("smollm2.jd");
        compress_model(&smollm2_dir(), &out, &EncodeOptions::default(), false).unwrap();
        (dir, out)
    })
    .1
    .clone()
}

/// SmolLM2's tokenizer.
pub fn tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(smollm2_dir().join("tokenizer.json")).unwrap()
}

/// A user turn in ChatML, ready for the assistant's answer, as token ids.
pub fn chat_ids(tok: &tokenizers::Tokenizer, user: &str) -> Vec<u32> {
    let text = format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n");
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Whether two slices hold the same bit patterns.
pub fn bit_identical(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Shape of a tiny synthetic decoder.
#[derive(Clone, Copy)]
pub struct Tiny {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub layers: usize,
    pub vocab: usize,
    pub qkv_bias: bool,
    pub tied: bool,
}

impl Tiny {
    pub const LLAMA: Tiny = Tiny {
        hidden: 64,
        intermediate: 160,
        heads: 4,
        kv_heads: 2,
        layers: 2,
        vocab: 96,
        qkv_bias: false,
        tied: false,
    };
    pub const QWEN2: Tiny = Tiny {
        qkv_bias: true,
        tied: true,
        ..Tiny::LLAMA
    };

    /// Random BF16 weights with Hugging Face names.
    pub fn tensors(&self, seed: u64) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut rand = |shape: &[usize], scale: f32, offset: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let u = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                    offset + scale * (2.0 * u - 1.0)
                })
                .collect();
            Tensor::from_vec(v, shape, &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let (h, i) = (self.hidden, self.intermediate);
        let d = h / self.heads;
        let (q, kv) = (self.heads * d, self.kv_heads * d);
        let mut t = HashMap::new();
        t.insert(
            "model.embed_tokens.weight".into(),
            rand(&[self.vocab, h], 1.0, 0.0),
        );
        t.insert("model.norm.weight".into(), rand(&[h], 0.2, 1.0));
        if !self.tied {
            t.insert("lm_head.weight".into(), rand(&[self.vocab, h], 0.2, 0.0));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            let mut add = |name: &str, shape: &[usize], scale: f32, offset: f32| {
                t.insert(format!("{p}.{name}"), rand(shape, scale, offset));
            };
            add("input_layernorm.weight", &[h], 0.2, 1.0);
            add("post_attention_layernorm.weight", &[h], 0.2, 1.0);
            add("self_attn.q_proj.weight", &[q, h], 0.2, 0.0);
            add("self_attn.k_proj.weight", &[kv, h], 0.2, 0.0);
            add("self_attn.v_proj.weight", &[kv, h], 0.2, 0.0);
            add("self_attn.o_proj.weight", &[h, q], 0.2, 0.0);
            add("mlp.gate_proj.weight", &[i, h], 0.2, 0.0);
            add("mlp.up_proj.weight", &[i, h], 0.2, 0.0);
            add("mlp.down_proj.weight", &[h, i], 0.2, 0.0);
            if self.qkv_bias {
                add("self_attn.q_proj.bias", &[q], 0.1, 0.0);
                add("self_attn.k_proj.bias", &[kv], 0.1, 0.0);
                add("self_attn.v_proj.bias", &[kv], 0.1, 0.0);
            }
        }
        t
    }

    /// A Hugging Face `config.json` for this shape.
    pub fn config(&self) -> serde_json::Value {
        let model_type = if self.qkv_bias { "qwen2" } else { "llama" };
        serde_json::json!({
            "model_type": model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 256,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "sliding_window": 256,
            "max_window_layers": self.layers,
            "use_sliding_window": false,
            "bos_token_id": 1,
            "eos_token_id": 2
        })
    }

    /// Writes `model.safetensors` and `config.json` into `dir`.
    pub fn write(&self, dir: &Path, tensors: &HashMap<String, Tensor>, config: &serde_json::Value) {
        std::fs::create_dir_all(dir).unwrap();
        candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec_pretty(config).unwrap(),
        )
        .unwrap();
    }
}

/// Compresses a model folder into `<dir>.jd` with 16-row chunks (several chunks per layer).
pub fn compress(dir: &Path) -> PathBuf {
    let out = dir.with_extension("jd");
    let opts = EncodeOptions {
        chunk_rows: 16,
        ..EncodeOptions::default()
    };
    compress_model(dir, &out, &opts, false).unwrap();
    out
}
