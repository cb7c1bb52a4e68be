//! Tiny synthetic models written on the fly: bad inputs, Qwen2, rope scaling, the KV cache,
//! batching and hidden activations.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use jitdelta_nn::models::{load_causal_lm, Llama, LlamaConfig, Qwen2, Qwen2Config};
use jitdelta_nn::{CausalLm, DenseSource, Error, JitOptions, JitSource, LayerSource, Logits};
use std::path::Path;

fn write_model(dir: &Path, tiny: Tiny) {
    tiny.write(dir, &tiny.tensors(7), &tiny.config());
}

fn logits_vec(t: Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn err_text<T>(r: jitdelta_nn::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Loads with both sources (the JIT one from a fresh compression) and returns both errors.
fn both_errors(dir: &Path) -> [String; 2] {
    let dense = DenseSource::open(dir, &Device::Cpu).unwrap();
    let jd = compress(dir);
    let jit = JitSource::open(&jd, &Device::Cpu, JitOptions::default()).unwrap();
    let errors = [
        err_text(load_causal_lm(&dense)),
        err_text(load_causal_lm(&jit)),
    ];
    eprintln!("dense: {}\njit:   {}", errors[0], errors[1]);
    errors
}

#[test]
fn config_errors_name_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tiny = Tiny::LLAMA;
    write_model(&dir, tiny);

    std::fs::remove_file(dir.join("config.json")).unwrap();
    let source = DenseSource::open(&dir, &Device::Cpu).unwrap();
    let e = err_text(LlamaConfig::from_source(&source));
    assert!(e.contains("config.json") && e.contains("not found"), "{e}");

    let mut cfg = tiny.config();
    cfg.as_object_mut().unwrap().remove("num_attention_heads");
    let e = err_text(LlamaConfig::from_json(&serde_json::to_vec(&cfg).unwrap()));
    assert!(
        e.contains("config.json") && e.contains("num_attention_heads"),
        "{e}"
    );

    let e = err_text(LlamaConfig::from_json(b"{not json"));
    assert!(e.contains("config.json"), "{e}");

    let e = err_text(LlamaConfig::from_json(
        &serde_json::to_vec(&Tiny::QWEN2.config()).unwrap(),
    ));
    assert!(e.contains("model_type") && e.contains("qwen2"), "{e}");

    let mut cfg = tiny.config();
    cfg["num_key_value_heads"] = 3.into();
    tiny.write(&dir, &tiny.tensors(7), &cfg);
    let e = err_text(load_causal_lm(
        &DenseSource::open(&dir, &Device::Cpu).unwrap(),
    ));
    assert!(e.contains("num_key_value_heads"), "{e}");

    let mut cfg = tiny.config();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    tiny.write(&dir, &tiny.tensors(7), &cfg);
    let e = err_text(load_causal_lm(
        &DenseSource::open(&dir, &Device::Cpu).unwrap(),
    ));
    assert!(e.contains("yarn"), "{e}");
}

#[test]
fn config_that_mismatches_the_weights_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tiny = Tiny::LLAMA;
    let mut cfg = tiny.config();
    cfg["intermediate_size"] = 128.into(); // the weights have 160
    tiny.write(&dir, &tiny.tensors(7), &cfg);
    for e in both_errors(&dir) {
        assert!(
            e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("[128, 64]"),
            "{e}"
        );
    }
}

#[test]
fn missing_tensor_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tiny = Tiny::LLAMA;
    let mut tensors = tiny.tensors(7);
    tensors.remove("model.layers.1.mlp.down_proj.weight");
    tiny.write(&dir, &tensors, &tiny.config());
    for e in both_errors(&dir) {
        assert!(
            e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("not found"),
            "{e}"
        );
    }

    // A Qwen2 bias, too.
    let dir = tmp.path().join("q");
    let tiny = Tiny::QWEN2;
    let mut tensors = tiny.tensors(7);
    tensors.remove("model.layers.0.self_attn.k_proj.bias");
    tiny.write(&dir, &tensors, &tiny.config());
    for e in both_errors(&dir) {
        assert!(e.contains("model.layers.0.self_attn.k_proj.bias"), "{e}");
    }
}

#[test]
fn wrong_shape_is_an_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tiny = Tiny::LLAMA;
    let mut tensors = tiny.tensors(7);
    let name = "model.layers.1.self_attn.k_proj.weight";
    tensors.insert(
        name.into(),
        Tensor::zeros((64, 64), DType::BF16, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::ones(64, DType::BF16, &Device::Cpu).unwrap(),
    );
    tiny.write(&dir, &tensors, &tiny.config());
    for e in both_errors(&dir) {
        assert!(
            e.contains(name) && e.contains("[32, 64]") && e.contains("[64, 64]"),
            "{e}"
        );
    }
    let source = DenseSource::open(&dir, &Device::Cpu).unwrap();
    match source.tensor("model.norm.weight", &[63]) {
        Err(Error::ShapeMismatch { name, .. }) => assert_eq!(name, "model.norm.weight"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn qwen2_matches_candle_transformers_and_jit_exact_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("q");
    let tiny = Tiny::QWEN2;
    write_model(&dir, tiny);
    let dev = Device::Cpu;

    let cfg: candle_transformers::models::qwen2::Config =
        serde_json::from_value(tiny.config()).unwrap();
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
    }
    .unwrap();
    let mut theirs = candle_transformers::models::qwen2::ModelForCausalLM::new(&cfg, vb).unwrap();

    let dense_src = DenseSource::open(&dir, &dev).unwrap();
    let ours = Qwen2::load(&dense_src, &Qwen2Config::from_source(&dense_src).unwrap()).unwrap();
    let jit_src = JitSource::open(compress(&dir), &dev, JitOptions::default()).unwrap();
    let jit = load_causal_lm(&jit_src).unwrap();
    assert_eq!(jit.info().architecture, "qwen2");

    let (mut oc, mut jc) = (ours.new_cache(), jit.new_cache());
    let mut input: Vec<u32> = vec![1, 17, 42, 5, 77, 3];
    let mut pos = 0;
    let mut worst = 0f32;
    for _ in 0..4 {
        let x = Tensor::new(input.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let a = logits_vec(theirs.forward(&x, pos).unwrap());
        let b = logits_vec(ours.forward(&x, pos, &mut oc, Logits::Last).unwrap());
        let c = logits_vec(jit.forward(&x, pos, &mut jc, Logits::Last).unwrap());
        worst = worst.max(max_abs_diff(&a, &b));
        assert!(bit_identical(&b, &c));
        assert_eq!(argmax(&a), argmax(&b));
        pos += input.len();
        input = vec![argmax(&a)];
    }
    eprintln!("qwen2 vs candle-transformers: max abs logit diff {worst:e}");
    assert!(worst < 1e-4, "{worst}");
}

#[test]
fn llama3_rope_scaling_and_gqa_match_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tiny = Tiny::LLAMA;
    let mut cfg = tiny.config();
    cfg["rope_scaling"] = serde_json::json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16
    });
    cfg["rope_theta"] = 500000.0.into();
    tiny.write(&dir, &tiny.tensors(3), &cfg);
    let dev = Device::Cpu;

    let ref_cfg: candle_transformers::models::llama::LlamaConfig =
        serde_json::from_value(cfg.clone()).unwrap();
    let ref_cfg = ref_cfg.into_config(false);
    // SAFETY: the file is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &dev)
    }
    .unwrap();
    let theirs = candle_transformers::models::llama::Llama::load(vb, &ref_cfg).unwrap();
    let mut their_cache =
        candle_transformers::models::llama::Cache::new(true, DType::F32, &ref_cfg, &dev).unwrap();

    let source = DenseSource::open(&dir, &dev).unwrap();
    let ours = Llama::load(&source, &LlamaConfig::from_source(&source).unwrap()).unwrap();
    let mut cache = ours.new_cache();
    // A prompt long enough that low-frequency (scaled) dimensions matter.
    let prompt: Vec<u32> = (0..60).map(|i| (i * 7 + 3) % 96).collect();
    let x = Tensor::new(prompt.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = logits_vec(theirs.forward(&x, 0, &mut their_cache).unwrap());
    let b = logits_vec(ours.forward(&x, 0, &mut cache, Logits::Last).unwrap());
    let diff = max_abs_diff(&a, &b);
    eprintln!("llama3 rope vs candle-transformers: max abs logit diff {diff:e}");
    assert!(diff < 1e-4, "{diff}");
    assert_eq!(argmax(&a), argmax(&b));

    // The scaling matters at these positions: without it the logits differ.
    cfg.as_object_mut().unwrap().remove("rope_scaling");
    let plain = Llama::load(&source, &serde_json::from_value(cfg).unwrap()).unwrap();
    let mut cache = plain.new_cache();
    let c = logits_vec(plain.forward(&x, 0, &mut cache, Logits::Last).unwrap());
    assert!(max_abs_diff(&b, &c) > 1e-3);
}

#[test]
fn kv_cache_truncation_batching_and_hidden_activations() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tiny = Tiny::LLAMA;
    write_model(&dir, tiny);
    let source = JitSource::open(compress(&dir), &Device::Cpu, JitOptions::default()).unwrap();
    let model = load_causal_lm(&source).unwrap();

    // Roll back two positions and replay them: identical logits.
    let mut cache = model.new_cache();
    model
        .forward_ids(&[1, 5], 0, &mut cache, Logits::Last)
        .unwrap();
    let first = logits_vec(
        model
            .forward_ids(&[9, 4], 2, &mut cache, Logits::All)
            .unwrap(),
    );
    assert_eq!(cache.len(), 4);
    cache.truncate(2).unwrap();
    assert_eq!(cache.len(), 2);
    let again = logits_vec(
        model
            .forward_ids(&[9, 4], 2, &mut cache, Logits::All)
            .unwrap(),
    );
    assert!(bit_identical(&first, &again));

    // A wrong offset is an error that leaves the cache as it was.
    let e = err_text(model.forward_ids(&[3], 7, &mut cache, Logits::Last));
    assert!(e.contains("offset 7"), "{e}");
    let e = err_text(model.forward_ids(&[500], 4, &mut cache, Logits::Last));
    assert!(e.contains("500"), "{e}");
    assert_eq!(cache.len(), 4);

    // Step-by-step decoding agrees with one pass over all positions.
    let ids = [1u32, 8, 30, 2, 61, 17];
    let mut whole = model.new_cache();
    let all = model.forward_ids(&ids, 0, &mut whole, Logits::All).unwrap();
    assert_eq!(all.dims(), &[1, ids.len(), tiny.vocab]);
    let mut steps = model.new_cache();
    for (p, &id) in ids.iter().enumerate() {
        let one = logits_vec(
            model
                .forward_ids(&[id], p, &mut steps, Logits::Last)
                .unwrap(),
        );
        let row = logits_vec(all.narrow(1, p, 1).unwrap());
        assert!(max_abs_diff(&one, &row) < 1e-4);
    }

    // Batch of two sequences == each alone.
    let batch = Tensor::new(&[[1u32, 8, 30], [4, 4, 90]], &Device::Cpu).unwrap();
    let mut bc = model.new_cache();
    let both = model.forward(&batch, 0, &mut bc, Logits::Last).unwrap();
    assert_eq!(both.dims(), &[2, tiny.vocab]);
    for (row, seq) in [[1u32, 8, 30], [4, 4, 90]].iter().enumerate() {
        let mut c = model.new_cache();
        let alone = logits_vec(model.forward_ids(seq, 0, &mut c, Logits::Last).unwrap());
        assert!(max_abs_diff(&alone, &logits_vec(both.get(row).unwrap())) < 1e-4);
    }

    // Hidden activations: one per layer, same logits as a plain forward.
    let mut hc = model.new_cache();
    let out = model
        .forward_with_hidden(&all_ids(&ids), 0, &mut hc, Logits::All)
        .unwrap();
    assert_eq!(out.hidden.len(), tiny.layers);
    for h in &out.hidden {
        assert_eq!(h.dims(), &[1, ids.len(), tiny.hidden]);
    }
    assert!(bit_identical(&logits_vec(out.logits), &logits_vec(all)));
}

fn all_ids(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn concurrent_forward_calls_share_the_source_safely() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_model(&dir, Tiny::LLAMA);
    let source = JitSource::open(compress(&dir), &Device::Cpu, JitOptions::default()).unwrap();
    let model = load_causal_lm(&source).unwrap();
    let ids: Vec<u32> = (0..12).map(|i| (i * 5 + 1) % 96).collect();
    let run = || {
        let mut cache = model.new_cache();
        logits_vec(model.forward_ids(&ids, 0, &mut cache, Logits::All).unwrap())
    };
    let alone = run();
    // Threads that find the scratch buffer busy rebuild into their own: same results.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| (0..5).map(|_| run()).collect::<Vec<_>>()))
            .collect();
        for h in handles {
            for out in h.join().unwrap() {
                assert!(bit_identical(&alone, &out));
            }
        }
    });
}
