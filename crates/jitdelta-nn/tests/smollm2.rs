//! JIT layers on a real model (SmolLM2-135M-Instruct): exactness against the dense model,
//! Routed and Draft modes, the fused matvec, the layer cache and the compact layout.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use jitdelta_nn::models::{Llama, LlamaConfig};
use jitdelta_nn::{
    CausalLm, ChunkSet, DenseSource, JitOptions, JitSource, LayerSource, LinearLayer, Logits, Mode,
    WeightLayout,
};

const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a Python function that returns the sum of a list.",
    "What is 17 times 3?",
];

fn load(source: &dyn LayerSource) -> Llama {
    Llama::load(source, &LlamaConfig::from_source(source).unwrap()).unwrap()
}

fn dense() -> (DenseSource, Llama) {
    let source = DenseSource::open(smollm2_dir(), &Device::Cpu).unwrap();
    let model = load(&source);
    (source, model)
}

fn jit(options: JitOptions) -> (JitSource, Llama) {
    let source = JitSource::open(smollm2_jd(), &Device::Cpu, options).unwrap();
    let model = load(&source);
    (source, model)
}

fn step(model: &dyn CausalLm, ids: &[u32], cache: &mut jitdelta_nn::KvCache) -> Vec<f32> {
    model
        .forward_ids(ids, cache.len(), cache, Logits::Last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Greedy decoding with `reference` choosing the tokens; `check` sees both logits per step.
fn lockstep(
    reference: &dyn CausalLm,
    other: &dyn CausalLm,
    prompt: &[u32],
    steps: usize,
    mut check: impl FnMut(usize, &[f32], &[f32]),
) {
    let (mut rc, mut oc) = (reference.new_cache(), other.new_cache());
    let mut input = prompt.to_vec();
    for s in 0..steps {
        let a = step(reference, &input, &mut rc);
        let b = step(other, &input, &mut oc);
        check(s, &a, &b);
        input = vec![argmax(&a)];
    }
}

/// Logits for every position of `ids` (one pass from an empty cache).
fn all_logits(model: &dyn CausalLm, ids: &[u32]) -> Tensor {
    let mut cache = model.new_cache();
    model
        .forward_ids(ids, 0, &mut cache, Logits::All)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

#[test]
fn exact_mode_generation_is_bit_identical_to_dense() {
    let tok = tokenizer();
    let (dense_src, dense) = dense();
    let (jit_src, jit) = jit(JitOptions::default());
    for prompt in PROMPTS {
        let ids = chat_ids(&tok, prompt);
        let mut tokens = Vec::new();
        lockstep(&dense, &jit, &ids, 8, |s, a, b| {
            assert!(
                bit_identical(a, b),
                "{prompt:?} step {s}: logits differ (max abs diff {})",
                max_abs_diff(a, b)
            );
            tokens.push(argmax(b));
        });
        eprintln!("{prompt:?} -> {:?}", tok.decode(&tokens, false).unwrap());
    }
    let (d, j) = (dense_src.weight_bytes(), jit_src.weight_bytes());
    eprintln!("weights held: dense {d} bytes, jit {j} bytes");
    assert!(j < d / 2);
    // One scratch buffer for all layers: the size of the largest (the tied LM head, f32).
    assert_eq!(jit_src.scratch_bytes(), 49152 * 576 * 4);
}

#[test]
fn compact_layout_is_exact_too() {
    let tok = tokenizer();
    let (_, dense) = dense();
    let options = JitOptions {
        layout: WeightLayout::Compact,
        ..JitOptions::default()
    };
    let (src, compact) = jit(options);
    assert!(src.layers().iter().all(|l| !l.is_resident()));
    lockstep(
        &dense,
        &compact,
        &chat_ids(&tok, PROMPTS[2]),
        2,
        |s, a, b| {
            assert!(
                bit_identical(a, b),
                "step {s}: max abs diff {}",
                max_abs_diff(a, b)
            );
        },
    );
}

#[test]
fn routed_chunks_decode_exactly_and_the_others_equal_the_draft() {
    let (src, model) = jit(JitOptions::default());
    let layers = src.layers();
    let up = layers
        .iter()
        .find(|l| l.name() == "model.layers.3.mlp.up_proj")
        .unwrap();
    let down = layers
        .iter()
        .find(|l| l.name() == "model.layers.3.mlp.down_proj")
        .unwrap();
    let (rows, cols) = up.shape();
    let chunk_rows = up.chunk_rows();
    assert_eq!(up.chunk_count(), rows.div_ceil(chunk_rows));

    let rebuild_rows =
        |l: &jitdelta_nn::JitLinear| -> Vec<Vec<f32>> { l.rebuild().unwrap().to_vec2().unwrap() };
    src.set_mode(Mode::Exact);
    let (up_exact, down_exact) = (rebuild_rows(up), rebuild_rows(down));
    src.set_mode(Mode::Draft);
    let (up_draft, down_draft) = (rebuild_rows(up), rebuild_rows(down));
    assert_ne!(up_exact, up_draft);

    let picked: ChunkSet = [0, 5, up.chunk_count() - 1].into_iter().collect();
    src.mode().set_route(up.name(), picked.clone());
    src.set_mode(Mode::Routed);
    assert_eq!(up.mode(), Mode::Routed);
    let up_routed = rebuild_rows(up);
    for r in 0..rows {
        let want = if picked.contains(r / chunk_rows) {
            &up_exact[r]
        } else {
            &up_draft[r]
        };
        assert_eq!(&up_routed[r], want, "row {r} of {rows} ({cols} cols)");
    }
    // A layer without a route is all draft.
    assert_eq!(rebuild_rows(down), down_draft);
    assert_ne!(down_draft, down_exact);

    // Whole model: every chunk routed == Exact; no routes == Draft (bit for bit).
    let ids = chat_ids(&tokenizer(), PROMPTS[0]);
    src.set_mode(Mode::Exact);
    let exact = all_logits(&model, &ids).to_vec2::<f32>().unwrap();
    src.set_mode(Mode::Draft);
    let draft = all_logits(&model, &ids).to_vec2::<f32>().unwrap();
    for l in &layers {
        src.mode()
            .set_route(l.name(), (0..l.chunk_count()).collect());
    }
    src.set_mode(Mode::Routed);
    assert_eq!(all_logits(&model, &ids).to_vec2::<f32>().unwrap(), exact);
    src.mode().clear_routes();
    assert_eq!(all_logits(&model, &ids).to_vec2::<f32>().unwrap(), draft);
}

#[test]
fn draft_differs_from_exact_but_agrees_on_most_top1() {
    let tok = tokenizer();
    let (src, model) = jit(JitOptions::default());
    let (mut agree, mut total) = (0, 0);
    for prompt in PROMPTS {
        let mut ids = chat_ids(&tok, prompt);
        let prompt_len = ids.len();
        src.set_mode(Mode::Exact);
        ids.extend(jitdelta_nn::models::greedy_generate(&model, &ids, 12, &[2]).unwrap());
        let exact = all_logits(&model, &ids);
        src.set_mode(Mode::Draft);
        let draft = all_logits(&model, &ids);
        assert_ne!(
            exact.to_vec2::<f32>().unwrap(),
            draft.to_vec2::<f32>().unwrap()
        );
        let e = exact.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let d = draft.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        for p in prompt_len - 1..ids.len() - 1 {
            agree += (e[p] == d[p]) as usize;
            total += 1;
        }
    }
    let rate = agree as f64 / total as f64;
    eprintln!("draft top-1 agreement {agree}/{total} = {rate:.3}");
    assert!(rate > 0.7, "draft agrees on only {rate:.3} of positions");
}

#[test]
fn fused_matvec_matches_dense_within_tolerance() {
    let tok = tokenizer();
    let (_, dense) = dense();
    let options = JitOptions {
        fused_matvec: true,
        ..JitOptions::default()
    };
    let (src, fused) = jit(options);
    let mut worst = 0f32;
    for prompt in &PROMPTS[..2] {
        let ids = chat_ids(&tok, prompt);
        lockstep(&dense, &fused, &ids, 6, |s, a, b| {
            let diff = max_abs_diff(a, b);
            worst = worst.max(diff);
            assert!(diff < 2e-3, "{prompt:?} step {s}: max abs diff {diff}");
            assert_eq!(argmax(a), argmax(b), "{prompt:?} step {s}");
        });
    }
    eprintln!("fused exact vs dense: max abs logit diff {worst}");

    // The fused path honours Draft mode too.
    let ids = chat_ids(&tok, PROMPTS[2]);
    src.set_mode(Mode::Draft);
    src.set_fused_matvec(false);
    let mut cache = fused.new_cache();
    let plain = step(&fused, &ids[..ids.len() - 1], &mut cache);
    let plain_next = step(&fused, &ids[ids.len() - 1..], &mut cache);
    src.set_fused_matvec(true);
    cache.truncate(ids.len() - 1).unwrap();
    let fused_next = step(&fused, &ids[ids.len() - 1..], &mut cache);
    assert!(max_abs_diff(&plain_next, &fused_next) < 2e-3);
    assert_eq!(plain.len(), plain_next.len());
}

#[test]
fn layer_cache_keeps_logits_identical_across_mode_switches() {
    let tok = tokenizer();
    let ids = chat_ids(&tok, PROMPTS[1]);
    let (plain_src, plain) = jit(JitOptions::default());
    let budget = 8 << 20;
    let (cached_src, cached) = jit(JitOptions {
        cache_budget: budget,
        ..JitOptions::default()
    });
    for mode in [Mode::Exact, Mode::Draft, Mode::Exact] {
        plain_src.set_mode(mode);
        cached_src.set_mode(mode);
        let a = all_logits(&plain, &ids).to_vec2::<f32>().unwrap();
        for _ in 0..2 {
            // The second pass reads rebuilt layers from the cache.
            let b = all_logits(&cached, &ids).to_vec2::<f32>().unwrap();
            assert_eq!(a, b, "{mode:?}");
        }
        let held = cached_src.cache_bytes();
        assert!(held > 0 && held <= budget, "cache holds {held} bytes");
    }
}
