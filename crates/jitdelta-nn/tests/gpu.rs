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
