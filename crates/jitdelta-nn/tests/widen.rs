//! `scripts/widen_model.py`, the tool behind the GPU benchmarks' "real LM at 7B shape": SmolLM2
//! widened 2x must compute SmolLM2's logits (up to f32 summation order) and its greedy tokens.

mod common;

use common::*;
use jitdelta_nn::models::load_causal_lm;
use jitdelta_nn::{CausalLm, DenseSource, Logits};
use std::path::Path;
use std::process::Command;

/// Greedy ids and the logits of each step, `steps` tokens after `prompt`.
fn greedy(model: &dyn CausalLm, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = model.new_cache();
    let (mut ids, mut all) = (Vec::new(), Vec::new());
    let mut input = prompt.to_vec();
    for _ in 0..steps {
        let logits: Vec<f32> = model
            .forward_ids(&input, cache.len(), &mut cache, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let next = argmax(&logits);
        ids.push(next);
        all.push(logits);
        input = vec![next];
    }
    (ids, all)
}

#[test]
fn a_widened_model_computes_the_original_function() {
    let src = smollm2_dir();
    // The cache's venv (scripts/fetch-test-data.sh) has numpy.
    let python = cache_dir().join("venv/bin/python");
    assert!(python.is_file(), "test data missing: {}", python.display());
    let tmp = tempfile::tempdir().unwrap();
    let wide = tmp.path().join("wide");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/widen_model.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&src)
        .arg(&wide)
        .args(["--factor", "2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(wide.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (
            cfg["hidden_size"].as_u64(),
            cfg["num_attention_heads"].as_u64()
        ),
        (Some(1152), Some(18))
    );
    assert_eq!(cfg["tie_word_embeddings"], false);

    let cpu = candle_core::Device::Cpu;
    let original = load_causal_lm(&DenseSource::open(&src, &cpu).unwrap()).unwrap();
    let widened = load_causal_lm(&DenseSource::open(&wide, &cpu).unwrap()).unwrap();
    let prompt = chat_ids(&tokenizer(), "What is the capital of France?");
    let (ids, logits) = greedy(original.as_ref(), &prompt, 6);
    let (wide_ids, wide_logits) = greedy(widened.as_ref(), &prompt, 6);
    assert_eq!(ids, wide_ids, "greedy tokens");
    for (a, b) in logits.iter().zip(&wide_logits) {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(a, b);
        assert!(
            diff <= 1e-3 * scale,
            "logits differ by {diff} (max |logit| {scale})"
        );
    }
}
