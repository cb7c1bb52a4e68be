//! Codec throughput per thread and with all threads, in bytes of BF16 output per second.
//!
//! Data: the MiniLM BF16 test weights when `scripts/fetch-test-data.sh` has run (real trained
//! weights), otherwise a synthetic 2048x4096 BF16 tensor drawn from N(0, 0.02).
//!   cargo bench -p jitdelta-format --bench codec

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use jitdelta_format::{DraftDtype, EncodeOptions, JdFile, JdWriter};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

/// A weight matrix: name, shape, little-endian BF16 bytes.
type Weight = (String, Vec<u64>, Vec<u8>);

/// The data set's label and its weight matrices.
fn weights() -> (String, Vec<Weight>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = std::env::var_os("JITDELTA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("testdata-cache"));
    let path = cache.join("minilm-bf16/model.safetensors");
    if let Ok(bytes) = std::fs::read(&path) {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let ts = st
            .tensors()
            .into_iter()
            .filter(|(_, v)| v.shape().len() == 2 && v.dtype() == safetensors::Dtype::BF16)
            .map(|(n, v)| {
                (
                    n,
                    v.shape().iter().map(|&d| d as u64).collect(),
                    v.data().to_vec(),
                )
            })
            .collect();
        return ("minilm-bf16".into(), ts);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (rows, cols) = (2048u64, 4096u64);
    let mut data = Vec::with_capacity((rows * cols * 2) as usize);
    for _ in 0..rows * cols {
        // Box-Muller normal, sigma 0.02, rounded to BF16.
        let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
        let x = 0.02 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
        data.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
    }
    (
        "synthetic-bf16".into(),
        vec![("w".into(), vec![rows, cols], data)],
    )
}

fn encode_tensors(ts: &[Weight], path: &std::path::Path) -> JdWriter {
    let mut w = JdWriter::create(path).unwrap();
    let shard = w.add_shard("model.safetensors", None);
    for (name, shape, data) in ts {
        w.add_tensor(name, "BF16", shape, shard, data, &EncodeOptions::default())
            .unwrap();
    }
    w
}

fn bench(c: &mut Criterion) {
    let (label, ts) = weights();
    let bytes: u64 = ts.iter().map(|t| t.2.len() as u64).sum();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.jd");
    encode_tensors(&ts, &path).finish().unwrap();
    let jd = JdFile::open(&path).unwrap();
    // Views (with their decoding tables) are built once, as a layer holding a tensor would.
    let views: Vec<_> = ts.iter().map(|t| jd.tensor(&t.0).unwrap()).collect();
    let residents: Vec<_> = views.iter().map(|v| v.to_resident(3).unwrap()).collect();
    let max_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group(format!("codec/{label}"));
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    for threads in [1, max_threads] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // Encoding into the page cache; the final fsync of `finish` is not the codec's cost.
        g.bench_function(BenchmarkId::new("encode", threads), |b| {
            b.iter(|| pool.install(|| encode_tensors(&ts, &dir.path().join("b.jd"))))
        });
        g.bench_function(BenchmarkId::new("decode_exact", threads), |b| {
            let mut out: Vec<Vec<u8>> = ts.iter().map(|t| vec![0u8; t.2.len()]).collect();
            b.iter(|| {
                pool.install(|| {
                    for (v, o) in views.iter().zip(&mut out) {
                        v.decode_exact_into(o).unwrap();
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("decode_draft_bf16", threads), |b| {
            b.iter(|| {
                pool.install(|| {
                    for t in &ts {
                        jd.tensor(&t.0)
                            .unwrap()
                            .decode_draft(DraftDtype::BF16)
                            .unwrap();
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("resident_decode_exact", threads), |b| {
            let mut out: Vec<Vec<u8>> = ts.iter().map(|t| vec![0u8; t.2.len()]).collect();
            b.iter(|| {
                pool.install(|| {
                    for (r, o) in residents.iter().zip(&mut out) {
                        r.decode_exact(o).unwrap();
                    }
                })
            })
        });
        g.bench_function(
            BenchmarkId::new("resident_decode_draft_bf16", threads),
            |b| {
                let mut out: Vec<Vec<u8>> = ts.iter().map(|t| vec![0u8; t.2.len()]).collect();
                b.iter(|| {
                    pool.install(|| {
                        for (r, o) in residents.iter().zip(&mut out) {
                            r.decode_draft(DraftDtype::BF16, o).unwrap();
                        }
                    })
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
