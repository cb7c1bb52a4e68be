//! GPU kernels against the CPU reference (feature `cuda`, run on a GPU machine:
//! `scripts/gpu-kernels.sh`). Outputs are poisoned before every run. Tuning defines to test
//! other kernel variants: `JITDELTA_KERNEL_DEFINES="LANE_VECS=1 GEMV_STAGES=4"`.
#![cfg(feature = "cuda")]

use cudarc::driver::{CudaContext, CudaSlice};
use half::bf16;
use jitdelta_format::{FloatFormat, JdFile, ResidentTensor};
use jitdelta_kernels::gpu::Kernels;
use jitdelta_kernels::reference::{decode_bf16, gemv, gemv_error, ChunkSelection};
use jitdelta_kernels::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn kernels() -> Kernels {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let defines = std::env::var("JITDELTA_KERNEL_DEFINES").unwrap_or_default();
    let defines: Vec<&str> = defines.split_whitespace().collect();
    Kernels::with_defines(ctx.default_stream(), &defines).expect("kernels compile")
}

fn poisoned(k: &Kernels, n: usize) -> CudaSlice<bf16> {
    k.stream()
        .clone_htod(&vec![bf16::from_bits(0xFFFF); n.max(1)])
        .unwrap()
}

fn resident(w: &[bf16], rows: usize, cols: usize, chunk_rows: usize) -> ResidentTensor {
    ResidentTensor::from_exact(
        FloatFormat::BF16,
        rows,
        cols,
        chunk_rows,
        3,
        bytemuck::cast_slice(w),
    )
    .unwrap()
}

fn selections(chunks: usize, seed: u64) -> Vec<ChunkSelection> {
    let mut rng = StdRng::seed_from_u64(seed);
    vec![
        ChunkSelection::Exact,
        ChunkSelection::Draft,
        ChunkSelection::Routed((0..chunks).map(|_| rng.random()).collect()),
    ]
}

fn assert_decode_matches(k: &Kernels, t: &ResidentTensor, what: &str) {
    let (rows, cols) = t.dims();
    for sel in selections(t.chunk_count(), rows as u64) {
        let mut want = vec![bf16::ZERO; rows * cols];
        decode_bf16(t, &sel, &mut want).unwrap();
        let g = k.upload(t).unwrap();
        let gs = k.selection(&g, &sel).unwrap();
        let mut out = poisoned(k, rows * cols);
        k.decode(&g, &gs, &mut out.slice_mut(..rows * cols))
            .unwrap();
        let got = k.stream().clone_dtoh(&out.slice(..rows * cols)).unwrap();
        let bad = got
            .iter()
            .zip(&want)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(
            bad.is_none(),
            "{what} {sel:?}: value {:?} got {:#06x} want {:#06x}",
            bad,
            got[bad.unwrap()].to_bits(),
            want[bad.unwrap()].to_bits()
        );
    }
}

fn assert_gemv_matches(k: &Kernels, t: &ResidentTensor, what: &str) {
    let (rows, cols) = t.dims();
    let g = k.upload(t).unwrap();
    let mut rng = StdRng::seed_from_u64(cols as u64);
    for sel in selections(t.chunk_count(), 99) {
        let gs = k.selection(&g, &sel).unwrap();
        for batch in 1..=8 {
            let x: Vec<bf16> = (0..batch * cols)
                .map(|_| bf16::from_f32(rng.random::<f32>() * 4.0 - 2.0))
                .collect();
            let want = gemv(t, &sel, &x, batch).unwrap();
            let xd = k.stream().clone_htod(&x).unwrap();
            let mut y = poisoned(k, batch * rows);
            k.gemv(
                &g,
                &gs,
                &xd.as_view(),
                batch,
                &mut y.slice_mut(..batch * rows),
            )
            .unwrap();
            let got = k.stream().clone_dtoh(&y.slice(..batch * rows)).unwrap();
            let err = gemv_error(&got, &want);
            assert!(err <= 1.0, "{what} {sel:?} batch {batch}: error {err}");
        }
    }
}

/// Every bit pattern class: NaN payloads, infinities, signed zeros, subnormals, normals.
fn random_bits(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = StdRng::seed_from_u64(seed);
    let specials = [
        0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0xFF81, 0x0001, 0x807F, 0x7F7F,
    ];
    (0..n)
        .map(|i| match i % 5 {
            0 => bf16::from_bits(specials[rng.random_range(0..specials.len())]),
            _ => bf16::from_bits(rng.random()),
        })
        .collect()
}

/// Weight-like values with escapes: zeros, subnormals, outliers, and a few NaN/inf rows.
fn weight_like(rows: usize, cols: usize, seed: u64) -> Vec<bf16> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w: Vec<bf16> = (0..rows * cols)
        .map(|_| {
            let z: f32 = rng.random::<f32>() * 2.0 - 1.0;
            match rng.random_range(0..1000) {
                0 => bf16::ZERO,
                1 => bf16::NEG_ZERO,
                2 => bf16::from_bits(0x0003),
                3 => bf16::from_f32(z * 3.0e4),
                4 => bf16::from_f32(z * 1.0e-12),
                _ => bf16::from_f32(z * 0.02),
            }
        })
        .collect();
    if rows > 3 {
        w[cols + 5 % cols] = bf16::NAN;
        w[3 * cols] = bf16::INFINITY;
    }
    w
}

#[test]
fn decode_is_bit_exact_for_every_bit_pattern_and_shape() {
    let k = kernels();
    for &(rows, cols, chunk_rows) in &[
        (1, 1, 1),
        (7, 33, 3),
        (65, 96, 64),
        (130, 64, 7),
        (33, 4096, 16),
        (256, 200, 64),
    ] {
        let w = random_bits(rows * cols, (rows * cols) as u64);
        let t = resident(&w, rows, cols, chunk_rows);
        assert_decode_matches(&k, &t, &format!("random bits {rows}x{cols}/{chunk_rows}"));
        let w = weight_like(rows, cols, 5);
        let t = resident(&w, rows, cols, chunk_rows);
        assert_decode_matches(&k, &t, &format!("weight-like {rows}x{cols}/{chunk_rows}"));
    }
}

#[test]
fn gemv_matches_reference_for_batches_1_to_8() {
    let k = kernels();
    for &(rows, cols, chunk_rows) in &[(16, 32, 16), (70, 96, 64), (200, 576, 7), (64, 1536, 64)] {
        let w = weight_like(rows, cols, (rows + cols) as u64);
        let t = resident(&w, rows, cols, chunk_rows);
        assert!(t.escape_count() > 0, "the test must exercise escapes");
        assert_gemv_matches(&k, &t, &format!("{rows}x{cols}/{chunk_rows}"));
    }
}

#[test]
fn gemv_rejects_what_it_cannot_run() {
    let k = kernels();
    let w = weight_like(8, 40, 1);
    let g = k.upload(&resident(&w, 8, 40, 4)).unwrap();
    let x = k.stream().clone_htod(&vec![bf16::ONE; 40]).unwrap();
    let mut y = poisoned(&k, 8);
    let sel = k.selection(&g, &ChunkSelection::Exact).unwrap();
    let r = k.gemv(&g, &sel, &x.as_view(), 1, &mut y.slice_mut(..8));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let w = weight_like(8, 64, 1);
    let g = k.upload(&resident(&w, 8, 64, 4)).unwrap();
    let x = k.stream().clone_htod(&vec![bf16::ONE; 9 * 64]).unwrap();
    let mut y = poisoned(&k, 9 * 8);
    let r = k.gemv(&g, &sel, &x.as_view(), 9, &mut y.slice_mut(..72));
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let r = k.selection(&g, &ChunkSelection::Routed(vec![true]));
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
    let f16 = ResidentTensor::from_exact(FloatFormat::F16, 2, 32, 2, 3, &[0u8; 128]).unwrap();
    assert!(matches!(k.upload(&f16), Err(Error::Unsupported(_))));
}

/// Real trained weights: every BF16 matrix of the file named by `JITDELTA_KERNEL_JD`.
#[test]
fn real_weights_decode_bit_exact_and_gemv() {
    let path = std::env::var("JITDELTA_KERNEL_JD")
        .expect("set JITDELTA_KERNEL_JD to a .jd of BF16 weights (scripts/gpu-kernels.sh does)");
    let k = kernels();
    let jd = JdFile::open(&path).unwrap();
    let names: Vec<String> = jd.tensor_names().map(str::to_owned).collect();
    let mut checked = 0;
    for name in names {
        let view = jd.tensor(&name).unwrap();
        if view.format() != Some(FloatFormat::BF16) {
            continue;
        }
        let t = view.to_resident(3).unwrap();
        let (rows, cols) = t.dims();
        let g = k.upload(&t).unwrap();
        let gs = k.selection(&g, &ChunkSelection::Exact).unwrap();
        let mut out = poisoned(&k, rows * cols);
        k.decode(&g, &gs, &mut out.slice_mut(..rows * cols))
            .unwrap();
        let got = k.stream().clone_dtoh(&out.slice(..rows * cols)).unwrap();
        assert_eq!(
            bytemuck::cast_slice::<bf16, u8>(&got),
            view.decode_exact().unwrap().as_slice(),
            "{name}"
        );
        if cols % 32 == 0 && checked % 4 == 0 {
            assert_gemv_matches(&k, &t, &name);
        }
        checked += 1;
    }
    assert!(checked > 0, "{path} has no BF16 matrices");
}
