//! Our Llama against candle-transformers' Llama on the same SmolLM2 weights.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama as reference;
use common::*;
use jitdelta_nn::models::{Llama, LlamaConfig};
use jitdelta_nn::{CausalLm, DenseSource, Logits};

#[test]
fn llama_matches_candle_transformers_on_smollm2() {
    let dir = smollm2_dir();
    let dev = Device::Cpu;
    let config_bytes = std::fs::read(dir.join("config.json")).unwrap();
    let ref_cfg: reference::LlamaConfig = serde_json::from_slice(&config_bytes).unwrap();
    let ref_cfg = ref_cfg.into_config(false);
    // SAFETY: the test data is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
    }
    .unwrap();
    let theirs = reference::Llama::load(vb, &ref_cfg).unwrap();

    let source = DenseSource::open(&dir, &dev).unwrap();
    let ours = Llama::load(&source, &LlamaConfig::from_json(&config_bytes).unwrap()).unwrap();

    let tok = tokenizer();
    let mut worst = 0f32;
    for prompt in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
    ] {
        let ids = chat_ids(&tok, prompt);
        let mut their_cache = reference::Cache::new(true, DType::F32, &ref_cfg, &dev).unwrap();
        let mut our_cache = ours.new_cache();
        let (mut input, mut pos) = (ids.clone(), 0);
        let (mut our_tokens, mut their_tokens) = (Vec::new(), Vec::new());
        for _ in 0..8 {
            let x = Tensor::new(input.as_slice(), &dev)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let a: Vec<f32> = theirs
                .forward(&x, pos, &mut their_cache)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = ours
                .forward(&x, pos, &mut our_cache, Logits::Last)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            worst = worst.max(max_abs_diff(&a, &b));
            their_tokens.push(argmax(&a));
            our_tokens.push(argmax(&b));
            pos += input.len();
            // Both continue from the reference's choice so one early split cannot cascade.
            input = vec![argmax(&a)];
        }
        assert_eq!(our_tokens, their_tokens, "{prompt:?}");
    }
    eprintln!("max abs logit difference vs candle-transformers: {worst:e}");
    assert!(worst < 1e-3, "max abs logit difference {worst}");
}
