//! Per-token forward time of SmolLM2-135M (batch 1, one new token after a 16-token prompt in
//! the KV cache) for each way of holding the weights, side by side in one run:
//!
//! - `dense_f32`: DenseSource (f32 weights, candle matmul), the baseline;
//! - `exact_resident`, `draft_resident`: JitSource, resident layout (d = 3), rebuild into the
//!   scratch buffer then the same matmul;
//! - `exact_compact`: JitSource, compact at-rest form of the default file (SmolLM2's weights are
//!   dequantized Q4_1, so most tensors take the affine base there);
//! - `exact_compact_bitplane`: the compact form of a file forced to the bit-plane base (the
//!   kind real BF16 checkpoints get);
//! - `exact_fused`, `draft_fused`: resident layout, fused decode + matvec.
//!
//! ```text
//! cargo bench -p jitdelta-nn --bench forward
//! ```
//!
//! Needs `testdata-cache/smollm2-bf16` (scripts/fetch-test-data.sh; `JITDELTA_CACHE` overrides
//! the cache folder). The jitdelta files are written to a temporary folder.

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion};
use jitdelta_format::{compress_model, BaseKind, EncodeOptions};
use jitdelta_nn::models::{Llama, LlamaConfig};
use jitdelta_nn::{
    CausalLm, DenseSource, JitOptions, JitSource, LayerSource, LinearLayer, Logits, Mode,
    WeightLayout,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn model_dir() -> PathBuf {
    let cache = std::env::var_os("JITDELTA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata-cache"));
    let dir = cache.join("smollm2-bf16");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} missing: run scripts/fetch-test-data.sh",
        dir.display()
    );
    dir
}

fn load(source: &dyn LayerSource) -> Llama {
    Llama::load(source, &LlamaConfig::from_source(source).unwrap()).unwrap()
}

fn mb(bytes: usize) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Weight bytes of a JIT source: projections (exact / draft), plain tensors, scratch.
fn report_jit(name: &str, source: &JitSource, bf16: usize) {
    let layers = source.layers();
    let exact: usize = layers.iter().map(|l| l.bytes_held()).sum();
    let draft: usize = layers.iter().map(|l| l.draft_bytes()).sum();
    let plain = source.weight_bytes() - exact;
    eprintln!(
        "{name:16} projections {} ({:.1}% of their BF16 size; a draft pass reads {}), \
         embeddings+norms {}, scratch {}, total held {}",
        mb(exact),
        100.0 * exact as f64 / bf16 as f64,
        mb(draft),
        mb(plain),
        mb(source.scratch_bytes()),
        mb(source.weight_bytes() + source.scratch_bytes())
    );
}

fn forward_token(c: &mut Criterion) {
    let dir = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let compress = |name: &str, base| {
        let out = tmp.path().join(name);
        let options = EncodeOptions {
            base,
            ..EncodeOptions::default()
        };
        compress_model(&dir, &out, &options, false).unwrap();
        out
    };
    let jd = compress("auto.jd", BaseKind::Auto);
    let jd_bitplane = compress("bitplane.jd", BaseKind::Bitplane);
    let device = Device::Cpu;
    let dense_src = DenseSource::open(&dir, &device).unwrap();
    let dense = load(&dense_src);
    let resident = JitSource::open(&jd, &device, JitOptions::default()).unwrap();
    let resident_model = load(&resident);
    let compact_options = JitOptions {
        layout: WeightLayout::Compact,
        ..JitOptions::default()
    };
    let compact = JitSource::open(&jd, &device, compact_options.clone()).unwrap();
    let compact_model = load(&compact);
    let compact_bp = JitSource::open(&jd_bitplane, &device, compact_options).unwrap();
    let compact_bp_model = load(&compact_bp);

    // A 16-token prompt in the cache; each iteration runs one token and rolls it back.
    let prompt: Vec<u32> = (0..16).map(|i| 1000 + 37 * i).collect();
    let mut group = c.benchmark_group("forward_token");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
    let mut bench = |name: &str, model: &dyn CausalLm| {
        let mut cache = model.new_cache();
        model
            .forward_ids(&prompt, 0, &mut cache, Logits::Last)
            .unwrap();
        group.bench_function(name, |b| {
            b.iter(|| {
                let logits = model
                    .forward_ids(&[42], prompt.len(), &mut cache, Logits::Last)
                    .unwrap();
                cache.truncate(prompt.len()).unwrap();
                logits
            })
        });
    };
    bench("dense_f32", &dense);
    resident.set_mode(Mode::Exact);
    bench("exact_resident", &resident_model);
    resident.set_mode(Mode::Draft);
    bench("draft_resident", &resident_model);
    bench("exact_compact", &compact_model);
    bench("exact_compact_bitplane", &compact_bp_model);
    resident.set_fused_matvec(true);
    resident.set_mode(Mode::Exact);
    bench("exact_fused", &resident_model);
    resident.set_mode(Mode::Draft);
    bench("draft_fused", &resident_model);
    group.finish();

    // Memory held for the weights by each source.
    let bf16: usize = resident
        .layers()
        .iter()
        .map(|l| {
            let (o, i) = l.shape();
            o * i * 2
        })
        .sum();
    eprintln!(
        "\nweights held (BF16 size of the projections: {})",
        mb(bf16)
    );
    eprintln!(
        "{:16} {} (f32 projections + BF16 embeddings, as loaded)",
        "dense_f32",
        mb(dense_src.weight_bytes())
    );
    report_jit("resident (d=3)", &resident, bf16);
    report_jit("compact", &compact, bf16);
    report_jit("compact bitplane", &compact_bp, bf16);
}

criterion_group!(benches, forward_token);
criterion_main!(benches);
