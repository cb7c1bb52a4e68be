//! The CUDA path of the JIT layers (feature `cuda`; run on a GPU machine, see docs/gpu.md).
#![cfg(feature = "cuda")]

mod common;

use common::*;
use jitdelta_nn::models::{Llama, LlamaConfig};
use jitdelta_nn::{CausalLm, ChunkSet, JitOptions, JitSource, LinearLayer, Logits, Mode};

/// Routed mode on the GPU follows each layer's current route: every chunk routed gives the
/// Exact model's logits bit for bit, no chunk the Draft model's, and replacing the routes in
/// between takes effect at once (the routing flags the GPU holds are cached per route, and a
/// stale cache would show here as the previous route's logits).
#[test]
fn routed_layers_follow_their_routes_on_the_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let tiny = Tiny::LLAMA;
    tiny.write(&dir, &tiny.tensors(11), &tiny.config());
    let jd = compress(&dir);
    let device = jitdelta_nn::cuda_device(0).unwrap();
    let source = JitSource::open(&jd, &device, JitOptions::default()).unwrap();
    let model = Llama::load(&source, &LlamaConfig::from_source(&source).unwrap()).unwrap();
    let ids = [1u32, 5, 9, 3, 7, 2];
    let logits = || -> Vec<f32> {
        let mut cache = model.new_cache();
        model
            .forward_ids(&ids, 0, &mut cache, Logits::All)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    source.set_mode(Mode::Exact);
    let exact = logits();
    source.set_mode(Mode::Draft);
    let draft = logits();
    assert!(!bit_identical(&exact, &draft), "the draft should differ");

    let route = |all: bool| {
        for layer in source.layers() {
            let mut chunks = ChunkSet::new();
            if all {
                (0..layer.chunk_count()).for_each(|c| chunks.insert(c));
            }
            source.mode().set_route(layer.name(), chunks);
        }
    };
    source.set_mode(Mode::Routed);
    for (all, want, what) in [
        (true, &exact, "every chunk routed"),
        (false, &draft, "no chunk routed"),
        (true, &exact, "every chunk routed again"),
    ] {
        route(all);
        assert!(
            bit_identical(&logits(), want),
            "{what}: logits differ from the plain mode's"
        );
    }
}

/// Logits of `ids` run as a prompt of `prompt` tokens followed by single-token steps, one
/// row per position past the prompt; and the same positions run as one block after the
/// prompt (a speculative verify pass).
fn steps_and_block(model: &dyn CausalLm, ids: &[u32], prompt: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = |t: candle_core::Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let mut cache = model.new_cache();
    model
        .forward_ids(&ids[..prompt], 0, &mut cache, Logits::Last)
        .unwrap();
    let mut steps = Vec::new();
    for i in prompt..ids.len() {
        let out = model
            .forward_ids(&ids[i..=i], i, &mut cache, Logits::Last)
            .unwrap();
        steps.extend(rows(out));
    }
    let mut cache = model.new_cache();
    model
        .forward_ids(&ids[..prompt], 0, &mut cache, Logits::Last)
        .unwrap();
    let block = model
        .forward_ids(&ids[prompt..], prompt, &mut cache, Logits::All)
        .unwrap();
    (steps, rows(block))
}

/// The CUDA decoder's fused rope + KV write (the q/k/v projections in one buffer for the
/// grouped GEMV, packed from three tensors for Qwen2's biased projections): single-token steps
/// match the CPU model's logits (a misplaced position or head would not), and a block of
/// positions gives the steps' logits bit for bit, as greedy speculative decoding needs.
#[test]
fn fused_rope_steps_match_the_cpu_and_blocks_match_steps() {
    let ids = [1u32, 5, 9, 3, 7, 2, 11, 4, 8, 6];
    for tiny in [Tiny::LLAMA, Tiny::QWEN2] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        tiny.write(&dir, &tiny.tensors(5), &tiny.config());
        let jd = compress(&dir);
        let run = |device: &candle_core::Device| {
            let source = JitSource::open(&jd, device, JitOptions::default()).unwrap();
            let model = jitdelta_nn::models::load_causal_lm(&source).unwrap();
            steps_and_block(model.as_ref(), &ids, 4)
        };
        let (cpu, _) = run(&candle_core::Device::Cpu);
        let (steps, block) = run(&jitdelta_nn::cuda_device(0).unwrap());
        let scale = cpu.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&steps, &cpu);
        eprintln!(
            "qkv bias {}: steps vs CPU max diff {diff} (max |logit| {scale})",
            tiny.qkv_bias
        );
        assert!(
            diff <= 0.05 * scale,
            "steps differ from the CPU: {diff} of {scale}"
        );
        for (g, c) in steps.chunks(tiny.vocab).zip(cpu.chunks(tiny.vocab)) {
            assert_eq!(argmax(g), argmax(c), "greedy token differs from the CPU's");
        }
        assert!(
            bit_identical(&steps, &block),
            "a block's logits differ from single steps'"
        );
    }
}
