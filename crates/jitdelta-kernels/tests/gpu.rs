//! GPU kernels against the CPU reference (feature `cuda`, run on a GPU machine:
//! `scripts/gpu-kernels.sh`). Outputs are poisoned before every run. Tuning defines to test
//! other kernel variants: `JITDELTA_KERNEL_DEFINES="GEMV_STAGES=4 GEMV_WARPS=4"`.
#![cfg(feature = "cuda")]

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use jitdelta_format::{FloatFormat, JdFile, ResidentTensor};
use jitdelta_kernels::attention::{reference, AttentionShape};
use jitdelta_kernels::decoder_ops;
use jitdelta_kernels::gpu::{DecoderKernels, GemvClass, GpuResident, GpuSelection, Kernels};
use jitdelta_kernels::reference::{decode_bf16, gemv, gemv_error, ChunkSelection};
use jitdelta_kernels::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

fn kernels() -> Kernels {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    let defines = std::env::var("JITDELTA_KERNEL_DEFINES").unwrap_or_default();
    let defines: Vec<&str> = defines.split_whitespace().collect();
    if defines.is_empty() {
        Kernels::new(ctx.default_stream()).expect("kernels compile")
    } else {
        Kernels::with_defines(ctx.default_stream(), &defines).expect("kernels compile")
    }
}

fn decoder_kernels() -> DecoderKernels {
    let ctx = CudaContext::new(0).expect("a CUDA device");
    DecoderKernels::new(ctx.default_stream()).expect("decoder kernels compile")
}

fn poisoned(st: &Arc<CudaStream>, n: usize) -> CudaSlice<bf16> {
    st.clone_htod(&vec![bf16::from_bits(0xFFFF); n.max(1)])
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

/// `n` activations uniform in [-2, 2).
fn activations(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.random::<f32>() * 4.0 - 2.0))
        .collect()
}

fn assert_decode_matches(k: &Kernels, t: &ResidentTensor, what: &str) {
    let (rows, cols) = t.dims();
    for sel in selections(t.chunk_count(), rows as u64) {
        let mut want = vec![bf16::ZERO; rows * cols];
        decode_bf16(t, &sel, &mut want).unwrap();
        let g = k.upload(t).unwrap();
        let gs = k.selection(&g, &sel).unwrap();
        let mut out = poisoned(k.stream(), rows * cols);
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
            let x = activations(&mut rng, batch * cols);
            let want = gemv(t, &sel, &x, batch).unwrap();
            let xd = k.stream().clone_htod(&x).unwrap();
            let mut y = poisoned(k.stream(), batch * rows);
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

/// Launch-sizing knobs the host could not follow are errors before anything compiles.
#[test]
fn knobs_without_a_usable_value_are_errors() {
    let stream = CudaContext::new(0).unwrap().default_stream();
    for defines in [
        &["DECODE_WORDS"][..],
        &["DECODE_WORDS=0"],
        &["GEMV_WARPS=0"],
        &["GEMV_WARPS=x"],
    ] {
        assert!(
            matches!(
                Kernels::with_defines(stream.clone(), defines),
                Err(Error::Define(_))
            ),
            "{defines:?}"
        );
    }
}

#[test]
fn a_class_that_does_not_fit_its_blocks_per_sm_is_an_error() {
    let stream = CudaContext::new(0).unwrap().default_stream();
    // A ring of 3 stages for 8 warps takes 144 KiB of shared memory a block: one fits an
    // H100's SM (none a card with less shared memory).
    match Kernels::with_defines(stream.clone(), &["GEMV_STAGES=3", "GEMV_WARPS=8"]) {
        Err(Error::Occupancy { blocks, wanted, .. }) => assert!(blocks < 2 && wanted == 2),
        other => panic!("expected an occupancy error, got {other:?}"),
    }
    // The product classes fit.
    Kernels::new(stream.clone()).unwrap();
    // A ring at the 48 KiB edge (dynamic 48 KiB, plus the static arrays) loads and runs.
    let k = Kernels::with_defines(
        stream,
        &["GEMV_STAGES=2", "GEMV_WARPS=4", "GEMV_MIN_BLOCKS=1"],
    )
    .unwrap();
    let (rows, cols) = (48, 4096);
    let t = resident(&weight_like(rows, cols, 5), rows, cols, 16);
    assert_gemv_matches(&k, &t, "2-stage ring");
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
        // One chunk longer than the tensor.
        (5, 40, 64),
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
    let mut y = poisoned(k.stream(), 8);
    let sel = k.selection(&g, &ChunkSelection::Exact).unwrap();
    let r = k.gemv(&g, &sel, &x.as_view(), 1, &mut y.slice_mut(..8));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let w = weight_like(8, 64, 1);
    let g = k.upload(&resident(&w, 8, 64, 4)).unwrap();
    let x = k.stream().clone_htod(&vec![bf16::ONE; 9 * 64]).unwrap();
    let mut y = poisoned(k.stream(), 9 * 8);
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
        let mut out = poisoned(k.stream(), rows * cols);
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

fn scaled_bf16(n: usize, seed: u64, scale: f32) -> Vec<bf16> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| bf16::from_f32((rng.random::<f32>() * 2.0 - 1.0) * scale))
        .collect()
}

/// Runs the attention kernel into a poisoned output and returns it. `k` and `v` may run past
/// the elements the kernel reads (a whole last head's buffer): they go up whole and the kernel
/// gets views of the elements it may read, the rest lying just past them in device memory.
fn attention_on_gpu(
    a: &DecoderKernels,
    s: &AttentionShape,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
) -> Vec<bf16> {
    let st = a.stream();
    let (dq, dk, dv) = (
        st.clone_htod(q).unwrap(),
        st.clone_htod(k).unwrap(),
        st.clone_htod(v).unwrap(),
    );
    let mut y = poisoned(st, s.lens().2);
    let kv = s.lens().1;
    a.attention(
        s,
        &dq.as_view(),
        &dk.slice(..kv),
        &dv.slice(..kv),
        &mut y.as_view_mut(),
    )
    .unwrap();
    st.clone_dtoh(&y).unwrap()
}

/// Packed `(kv_heads, total, d)` keys or values of `s` in `(kv_heads, capacity, d)` buffers,
/// NaN in the positions past `total` (a KV cache with room to spare, stale positions poisoned).
fn with_capacity(t: &[bf16], s: &AttentionShape, capacity: usize) -> Vec<bf16> {
    let pad = (capacity - s.total) * s.head_dim;
    t.chunks(s.total * s.head_dim)
        .flat_map(|head| {
            head.iter()
                .copied()
                .chain(std::iter::repeat_n(bf16::NAN, pad))
        })
        .collect()
}

#[test]
fn attention_matches_reference_and_a_block_equals_single_steps() {
    let a = decoder_kernels();
    let mut checked = 0;
    for (heads, kv_heads, d) in [
        (4, 4, 32),
        (8, 2, 64),
        (32, 8, 128),
        (9, 3, 96),
        (2, 1, 256),
        // Seven query heads a key/value head (Qwen2-0.5B's grouping).
        (14, 2, 64),
    ] {
        for total in [1, 2, 5, 37, 64, 65, 300, 1100] {
            for rows in [1, 2, 5, 8].into_iter().filter(|&r| r <= total) {
                let s = AttentionShape {
                    rows,
                    heads,
                    kv_heads,
                    total,
                    kv_capacity: total,
                    head_dim: d,
                };
                let seed = (heads * 1000 + total * 10 + rows) as u64;
                let (ql, kl, _) = s.lens();
                // Large queries make peaked softmaxes, small ones flat ones.
                let q = scaled_bf16(ql, seed, if total % 2 == 0 { 4.0 } else { 0.3 });
                let (k, v) = (
                    scaled_bf16(kl, seed + 1, 1.0),
                    scaled_bf16(kl, seed + 2, 2.0),
                );
                let y = attention_on_gpu(&a, &s, &q, &k, &v);
                let want = reference(&s, &q, &k, &v).unwrap();
                for (i, (got, want)) in y.iter().zip(&want).enumerate() {
                    let tol = want.abs() * 2f64.powi(-8) + 2.0 * 2f64.powi(-10);
                    assert!(
                        (got.to_f64() - want).abs() <= tol,
                        "{s:?} element {i}: {got} vs {want}"
                    );
                }
                // Heads further apart in memory, NaN between them: bit for bit the same.
                let wide = AttentionShape {
                    kv_capacity: 2 * total + 3,
                    ..s
                };
                let (wk, wv) = (
                    with_capacity(&k, &s, wide.kv_capacity),
                    with_capacity(&v, &s, wide.kv_capacity),
                );
                let kv = wide.lens().1;
                assert_eq!(reference(&wide, &q, &wk[..kv], &wv[..kv]).unwrap(), want);
                let yw = attention_on_gpu(&a, &wide, &q, &wk, &wv);
                assert!(
                    yw.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{wide:?} differs from packed heads"
                );
                // Each row of a block, bit for bit, as a single-token step at its position.
                for row in 0..rows {
                    let n = total - rows + row + 1;
                    let one = AttentionShape {
                        rows: 1,
                        total: n,
                        kv_capacity: n,
                        ..s
                    };
                    let q1: Vec<bf16> = (0..heads)
                        .flat_map(|h| q[(h * rows + row) * d..][..d].to_vec())
                        .collect();
                    let prefix = |t: &[bf16]| -> Vec<bf16> {
                        (0..kv_heads)
                            .flat_map(|g| t[g * total * d..][..n * d].to_vec())
                            .collect()
                    };
                    let y1 = attention_on_gpu(&a, &one, &q1, &prefix(&k), &prefix(&v));
                    let block_row = &y[row * heads * d..][..heads * d];
                    assert!(
                        y1.iter()
                            .zip(block_row)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{s:?}: row {row} differs from a single-token step"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 60, "{checked} shapes");
}

/// An infinite value at position 0 stays infinite in every output that attends to it: no
/// padded position (a warp's share running past a row's end) may multiply it by a zero weight.
#[test]
fn attention_keeps_an_infinite_value_at_position_zero() {
    let a = decoder_kernels();
    // Heads of 192 and 256 take a warp's share of a split in two rounds (10 and 8 positions),
    // so padding also falls in a second round.
    for d in [64, 128, 192, 256] {
        for total in [1, 3, 37, 65, 130] {
            for rows in [1, 3].into_iter().filter(|&r| r <= total) {
                let s = AttentionShape {
                    rows,
                    heads: 4,
                    kv_heads: 2,
                    total,
                    kv_capacity: total,
                    head_dim: d,
                };
                let (ql, kl, _) = s.lens();
                let q = scaled_bf16(ql, total as u64, 0.3);
                let k = scaled_bf16(kl, total as u64 + 1, 1.0);
                let mut v = scaled_bf16(kl, total as u64 + 2, 1.0);
                // Element 5 of position 0, kv head 0: query heads 0 and 1 of every row see it.
                v[5] = bf16::INFINITY;
                let y = attention_on_gpu(&a, &s, &q, &k, &v);
                for row in 0..rows {
                    for h in 0..4 {
                        for (e, x) in y[(row * 4 + h) * d..][..d].iter().enumerate() {
                            let sees_inf = h < 2 && e == 5;
                            let ok = if sees_inf {
                                *x == bf16::INFINITY
                            } else {
                                x.is_finite()
                            };
                            assert!(ok, "{s:?} row {row} head {h} element {e}: {x}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn attention_propagates_nan_and_rejects_bad_shapes() {
    let a = decoder_kernels();
    let s = AttentionShape {
        rows: 3,
        heads: 4,
        kv_heads: 2,
        total: 10,
        kv_capacity: 10,
        head_dim: 64,
    };
    let (ql, kl, _) = s.lens();
    let q = scaled_bf16(ql, 7, 1.0);
    let (mut k, v) = (scaled_bf16(kl, 8, 1.0), scaled_bf16(kl, 9, 1.0));
    // A NaN key at position 8 of kv head 1: rows 1 and 2 (positions 8, 9) of heads 2 and 3 see it.
    k[(10 + 8) * 64 + 5] = bf16::NAN;
    let y = attention_on_gpu(&a, &s, &q, &k, &v);
    for row in 0..3 {
        for h in 0..4 {
            let out = &y[(row * 4 + h) * 64..][..64];
            let poisoned = h >= 2 && row >= 1;
            assert_eq!(
                out.iter().all(|x| x.is_nan()),
                poisoned,
                "row {row} head {h}"
            );
            assert!(poisoned || out.iter().all(|x| x.is_finite()));
        }
    }
    let st = a.stream();
    let buf = st.clone_htod(&vec![bf16::ZERO; 64]).unwrap();
    let mut out = st.clone_htod(&vec![bf16::ZERO; 64]).unwrap();
    let bad = AttentionShape {
        rows: 1,
        heads: 1,
        kv_heads: 1,
        total: 1,
        kv_capacity: 1,
        head_dim: 48,
    };
    assert!(matches!(
        a.attention(
            &bad,
            &buf.as_view(),
            &buf.as_view(),
            &buf.as_view(),
            &mut out.as_view_mut()
        ),
        Err(Error::Shape(_))
    ));
    let short = AttentionShape {
        head_dim: 64,
        total: 2,
        kv_capacity: 2,
        ..bad
    };
    let unpacked = AttentionShape {
        kv_capacity: 1,
        ..short
    };
    assert!(matches!(
        a.attention(
            &unpacked,
            &buf.as_view(),
            &buf.as_view(),
            &buf.as_view(),
            &mut out.as_view_mut()
        ),
        Err(Error::Shape(_))
    ));
    assert!(a
        .attention(
            &short,
            &buf.as_view(),
            &buf.as_view(),
            &buf.as_view(),
            &mut out.as_view_mut()
        )
        .is_err());
}

/// Runs the fused GEMV for `x` (`batch` rows) into a poisoned output and returns it.
fn gemv_on_gpu(
    k: &Kernels,
    g: &GpuResident,
    sel: &GpuSelection,
    x: &[bf16],
    batch: usize,
) -> Vec<bf16> {
    let rows = g.dims().0;
    let xd = k.stream().clone_htod(x).unwrap();
    let mut y = poisoned(k.stream(), batch * rows);
    k.gemv(g, sel, &xd.as_view(), batch, &mut y.as_view_mut())
        .unwrap();
    k.stream().clone_dtoh(&y).unwrap()
}

/// Speculative verify passes rely on it: a row of a batch comes out bit for bit as when it is
/// multiplied alone, for the default GEMV and the variants of tall and of large tensors. Routing relies
/// on the second half: the routed kernel gives an exact chunk's rows bit for bit as the
/// exact-only kernel, and a draft chunk's as the draft-only kernel.
#[test]
fn gemv_rows_are_batch_and_mode_invariant() {
    let k = kernels();
    for &(rows, cols) in &[(200, 576), (8_192, 576), (12_800, 8_192)] {
        let w = weight_like(rows, cols, rows as u64);
        let t = resident(&w, rows, cols, 64);
        let g = k.upload(&t).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let x = activations(&mut rng, 8 * cols);
        for sel in [GpuSelection::Exact, GpuSelection::Draft] {
            let all = gemv_on_gpu(&k, &g, &sel, &x, 8);
            for b in 0..8 {
                let one = gemv_on_gpu(&k, &g, &sel, &x[b * cols..][..cols], 1);
                assert!(
                    one.iter()
                        .zip(&all[b * rows..][..rows])
                        .all(|(a, c)| a.to_bits() == c.to_bits()),
                    "{rows}x{cols} {sel:?}: batch row {b} differs from the row alone"
                );
            }
        }
        let chunks = t.chunk_count();
        let exact = gemv_on_gpu(&k, &g, &GpuSelection::Exact, &x, 8);
        let draft = gemv_on_gpu(&k, &g, &GpuSelection::Draft, &x, 8);
        let flags: Vec<bool> = (0..chunks).map(|_| rng.random()).collect();
        let routed = k
            .selection(&g, &ChunkSelection::Routed(flags.clone()))
            .unwrap();
        let mixed = gemv_on_gpu(&k, &g, &routed, &x, 8);
        for b in 0..8 {
            for r in 0..rows {
                let want = if flags[r / 64] { &exact } else { &draft };
                assert_eq!(
                    mixed[b * rows + r].to_bits(),
                    want[b * rows + r].to_bits(),
                    "{rows}x{cols}: routed row {r} (batch {b}) differs from its mode's kernel"
                );
            }
        }
    }
}

/// Runs one grouped launch over `gs` and returns each tensor's output.
fn group_on_gpu(
    k: &Kernels,
    gs: &[&GpuResident],
    sel: &GpuSelection,
    x: &[bf16],
    batch: usize,
) -> Vec<Vec<bf16>> {
    let xd = k.stream().clone_htod(x).unwrap();
    let rows: Vec<usize> = gs.iter().map(|g| g.dims().0).collect();
    let mut y = poisoned(k.stream(), batch * rows.iter().sum::<usize>());
    k.gemv_group(gs, sel, &xd.as_view(), batch, &mut y.as_view_mut())
        .unwrap();
    let all = k.stream().clone_dtoh(&y).unwrap();
    let mut at = 0;
    rows.iter()
        .map(|r| {
            at += batch * r;
            all[at - batch * r..at].to_vec()
        })
        .collect()
}

/// A layer's q, k and v (or gate and up) in one launch: each output bit for bit what the
/// tensor's own launch gives, for both size classes; routed selections and tensors that differ
/// in columns or size class are refused (the caller then runs them one by one).
#[test]
fn grouped_gemv_equals_single_launches() {
    let k = kernels();
    let mut rng = StdRng::seed_from_u64(9);
    for (shapes, cols, batches) in [
        (&[200usize, 64, 130][..], 576usize, &[1usize, 3, 8][..]),
        (&[8_192, 8_192][..], 576, &[1, 8][..]),
        (&[12_800, 12_800][..], 8_192, &[1][..]),
    ] {
        let gs: Vec<GpuResident> = shapes
            .iter()
            .map(|&rows| {
                let w = weight_like(rows, cols, rows as u64 + cols as u64);
                k.upload(&resident(&w, rows, cols, 64)).unwrap()
            })
            .collect();
        let refs: Vec<&GpuResident> = gs.iter().collect();
        for &batch in batches {
            let x = activations(&mut rng, batch * cols);
            for sel in [GpuSelection::Exact, GpuSelection::Draft] {
                let grouped = group_on_gpu(&k, &refs, &sel, &x, batch);
                for (g, got) in gs.iter().zip(&grouped) {
                    let alone = gemv_on_gpu(&k, g, &sel, &x, batch);
                    assert!(
                        got.iter()
                            .zip(&alone)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{:?} of {cols} columns, batch {batch}, {sel:?}: grouped output differs",
                        g.dims()
                    );
                }
            }
        }
    }
    let upload = |rows: usize, cols: usize| {
        let w = weight_like(rows, cols, 1);
        k.upload(&resident(&w, rows, cols, 64)).unwrap()
    };
    let (a, b) = (upload(64, 576), upload(64, 608));
    // The same columns in three size classes (8192 x 8192 takes the tall-tensor variant,
    // 12800 x 8192 the large-tensor one).
    let (small, tall, big) = (
        upload(64, 8_192),
        upload(8_192, 8_192),
        upload(12_800, 8_192),
    );
    let refused = |gs: &[&GpuResident], sel: &GpuSelection, y_len: usize| {
        let cols = gs[0].dims().1;
        let x = k.stream().clone_htod(&vec![bf16::ONE; cols]).unwrap();
        let mut y = poisoned(k.stream(), y_len);
        k.gemv_group(gs, sel, &x.as_view(), 1, &mut y.as_view_mut())
            .is_err()
    };
    let routed = k
        .selection(&a, &ChunkSelection::Routed(vec![true]))
        .unwrap();
    assert!(refused(&[&a], &routed, 64));
    assert!(refused(&[&a, &b], &GpuSelection::Exact, 128));
    assert!(refused(&[&a], &GpuSelection::Exact, 65));
    assert!(refused(&[&a, &a, &a, &a], &GpuSelection::Exact, 256));
    // Kernels built with tuning defines have one variant for every size.
    let size_classes =
        std::env::var("JITDELTA_KERNEL_DEFINES").map_or(true, |d| d.trim().is_empty());
    assert_eq!(
        refused(&[&small, &big], &GpuSelection::Draft, 12_864),
        size_classes
    );
    assert_eq!(
        refused(&[&small, &tall], &GpuSelection::Exact, 8_256),
        size_classes
    );
    assert!(!refused(&[&small, &small], &GpuSelection::Draft, 128));
}

#[test]
fn declared_groups_launch_alone_as_in_the_group() {
    let k = kernels();
    let size_classes =
        std::env::var("JITDELTA_KERNEL_DEFINES").map_or(true, |d| d.trim().is_empty());
    // Each alone at most `tall_tiles` tiles (the default variant), together more (the tall
    // one): a layer's q, k and v on a model of hidden size ~4K.
    let cols = 4096;
    let rows = [k.tall_tiles() as usize * 16 - 512, 512, 512];
    let residents: Vec<_> = rows
        .iter()
        .map(|&r| resident(&weight_like(r, cols, r as u64 + 5), r, cols, 64))
        .collect();
    let gs: Vec<GpuResident> = residents.iter().map(|t| k.upload(t).unwrap()).collect();
    let refs: Vec<&GpuResident> = gs.iter().collect();
    let mut rng = StdRng::seed_from_u64(21);
    let xs: Vec<(usize, Vec<bf16>)> = [1usize, 4]
        .iter()
        .map(|&b| (b, activations(&mut rng, b * cols)))
        .collect();
    let singles = |sel: &GpuSelection| -> Vec<Vec<bf16>> {
        xs.iter()
            .flat_map(|(b, x)| gs.iter().map(|g| gemv_on_gpu(&k, g, sel, x, *b)))
            .collect()
    };
    let class = |want: GemvClass| {
        let want = if size_classes {
            want
        } else {
            GemvClass::Default
        };
        for g in &gs {
            assert_eq!(k.gemv_class(g), want, "{:?}", g.dims());
        }
    };
    class(GemvClass::Default);
    GpuResident::launch_together(&refs);
    class(GemvClass::Tall);
    for sel in [GpuSelection::Exact, GpuSelection::Draft] {
        let after = singles(&sel);
        let grouped: Vec<Vec<bf16>> = xs
            .iter()
            .flat_map(|(b, x)| group_on_gpu(&k, &refs, &sel, x, *b))
            .collect();
        let bits =
            |v: &Vec<Vec<bf16>>| -> Vec<u16> { v.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(
            bits(&grouped),
            bits(&after),
            "{sel:?}: grouped differs from single launches"
        );
        // And the tall variant's sums are right.
        let chunks = match sel {
            GpuSelection::Exact => ChunkSelection::Exact,
            _ => ChunkSelection::Draft,
        };
        for ((b, x), outs) in xs.iter().zip(after.chunks(gs.len())) {
            for ((t, &r), got) in residents.iter().zip(&rows).zip(outs) {
                let err = gemv_error(got, &gemv(t, &chunks, x, *b).unwrap());
                assert!(err <= 1.0, "{r} rows, batch {b}, {sel:?}: error {err}");
            }
        }
    }
}

/// The tall class runs exact and routed launches at 3 or 4 blocks per SM by how the launch's
/// tiles fill the waves; the same warps split the columns the same way, so a tensor whose
/// launch moves from one to the other (here by declaring a group) gives the same bits.
#[test]
fn tall_launches_at_three_and_four_blocks_sum_the_same() {
    let k = kernels();
    let size_classes =
        std::env::var("JITDELTA_KERNEL_DEFINES").map_or(true, |d| d.trim().is_empty());
    let sms = k.tall_tiles() as usize / 2;
    if sms < 8 {
        // 2 x SMs + 8 tiles would not be one wave at 3 blocks: no such small device here.
        eprintln!("skipped: {sms} SMs");
        return;
    }
    let cols = 1024;
    // 2 x SMs + 8 tiles: one wave at 3 blocks; with the partner 3 x SMs + 8: two waves at 3,
    // one at 4.
    let rows = (2 * sms + 8) * 16;
    let t = resident(&weight_like(rows, cols, 77), rows, cols, 64);
    let g = k.upload(&t).unwrap();
    let partner_rows = sms * 16;
    let partner = k
        .upload(&resident(
            &weight_like(partner_rows, cols, 78),
            partner_rows,
            cols,
            64,
        ))
        .unwrap();
    let mut rng = StdRng::seed_from_u64(23);
    let inputs: Vec<(usize, Vec<bf16>)> = [1, 3, 8]
        .iter()
        .map(|&b| (b, activations(&mut rng, b * cols)))
        .collect();
    let sels = selections(t.chunk_count(), 24);
    let outputs = || -> Vec<Vec<bf16>> {
        let mut out = Vec::new();
        for sel in &sels {
            let gs = k.selection(&g, sel).unwrap();
            for (b, x) in &inputs {
                out.push(gemv_on_gpu(&k, &g, &gs, x, *b));
            }
        }
        out
    };
    let three = outputs();
    let before = k.tall_blocks_per_sm(&g);
    GpuResident::launch_together(&[&g, &partner]);
    if size_classes {
        assert_eq!(k.gemv_class(&g), GemvClass::Tall);
        assert_eq!((before, k.tall_blocks_per_sm(&g)), (3, 4));
    }
    let four = outputs();
    let runs = sels
        .iter()
        .flat_map(|sel| inputs.iter().map(move |(b, x)| (sel, *b, x)));
    for ((sel, b, x), (a, d)) in runs.zip(three.iter().zip(&four)) {
        let what = format!("{sel:?} batch {b}, 4 blocks per SM against 3");
        assert_same_bits(d, a, &what);
        let err = gemv_error(d, &gemv(&t, sel, x, b).unwrap());
        assert!(err <= 1.0, "{sel:?} batch {b}: error {err}");
    }
}

/// The smallest magnitude that BF16 rounds to infinity: the largest finite value plus half a
/// step.
const BF16_OVERFLOW: f64 = (2.0 - 1.0 / 256.0) * 1.7014118346046923e38;

/// Whether `got` is within one BF16 step (at `want`'s magnitude) of `want`. NaN must give NaN;
/// values past [`BF16_OVERFLOW`] (infinite ones included) must give the infinity of their sign.
fn within_one_ulp(got: bf16, want: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    if want.abs() >= BF16_OVERFLOW {
        return got.to_f64() == want.signum() * f64::INFINITY;
    }
    let exponent = ((want.abs().to_bits() >> 52) as i32 - 1023).max(-126);
    (got.to_f64() - want).abs() <= 2f64.powi(exponent - 7)
}

/// Checks every output against the f64 reference within one BF16 step and returns how many
/// are its nearest BF16 exactly.
fn assert_within_one_ulp(got: &[bf16], want: &[f64], what: &str) -> usize {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(within_one_ulp(g, w), "{what} element {i}: {g} vs {w}");
    }
    got.iter()
        .zip(want)
        .filter(|(g, w)| same_bits(**g, bf16::from_f32(**w as f32)))
        .count()
}

/// Equal bits, any NaN equal to any NaN.
fn same_bits(a: bf16, b: bf16) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn assert_same_bits(got: &[bf16], want: &[bf16], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    if let Some(i) = (0..got.len()).find(|&i| !same_bits(got[i], want[i])) {
        panic!("{what} element {i}: {} vs {}", got[i], want[i]);
    }
}

/// Runs add + RMSNorm into poisoned outputs and returns the sums and the normalised rows.
fn add_rms_norm_on_gpu(
    a: &DecoderKernels,
    x: &[bf16],
    y: &[bf16],
    w: &[bf16],
    eps: f32,
    cols: usize,
) -> (Vec<bf16>, Vec<bf16>) {
    let st = a.stream();
    let (dx, dy, dw) = (
        st.clone_htod(x).unwrap(),
        st.clone_htod(y).unwrap(),
        st.clone_htod(w).unwrap(),
    );
    let (mut sum, mut norm) = (poisoned(st, x.len()), poisoned(st, x.len()));
    a.add_rms_norm(
        &dx.as_view(),
        &dy.as_view(),
        &dw.as_view(),
        eps,
        cols,
        &mut sum.slice_mut(..x.len()),
        &mut norm.slice_mut(..x.len()),
    )
    .unwrap();
    (
        st.clone_dtoh(&sum.slice(..x.len())).unwrap(),
        st.clone_dtoh(&norm.slice(..x.len())).unwrap(),
    )
}

/// Eight rows of `cols` for add + RMSNorm: random rows of several scales, then adversarial
/// ones: `x = -y` (a zero sum, normalised with eps alone), magnitudes near 2^50, and tiny
/// values whose squares underflow f32.
fn norm_rows(cols: usize, seed: u64) -> (Vec<bf16>, Vec<bf16>) {
    let scales = [1.0, 4.0, 0.05, 30.0, 1.0, 1.0, 1e15, 1e-30];
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for (r, scale) in scales.into_iter().enumerate() {
        let seed = seed + 2 * r as u64;
        x.extend(scaled_bf16(cols, seed, scale));
        y.extend(scaled_bf16(cols, seed + 1, scale));
    }
    let zero_row = 5 * cols..6 * cols;
    let negated: Vec<bf16> = x[zero_row.clone()].iter().map(|v| -*v).collect();
    y[zero_row].copy_from_slice(&negated);
    (x, y)
}

#[test]
fn add_rms_norm_matches_reference_and_rows_are_independent() {
    let a = decoder_kernels();
    let (eps, mut exact, mut total) = (1e-6f32, 0, 0);
    for cols in [1, 31, 576, 4096, 4097, 9001] {
        let (x, y) = norm_rows(cols, cols as u64);
        let w = scaled_bf16(cols, 99, 2.0);
        let singles: Vec<(Vec<bf16>, Vec<bf16>)> = (0..8)
            .map(|r| {
                let row = r * cols..(r + 1) * cols;
                add_rms_norm_on_gpu(&a, &x[row.clone()], &y[row], &w, eps, cols)
            })
            .collect();
        let (want_sum, want_norm) = decoder_ops::add_rms_norm(&x, &y, &w, eps, cols).unwrap();
        for (r, (sum, norm)) in singles.iter().enumerate() {
            let what = format!("cols {cols} row {r}");
            assert_same_bits(sum, &want_sum[r * cols..][..cols], &what);
            exact += assert_within_one_ulp(norm, &want_norm[r * cols..][..cols], &what);
            total += cols;
        }
        for rows in 1..=8 {
            let n = rows * cols;
            let (sum, norm) = add_rms_norm_on_gpu(&a, &x[..n], &y[..n], &w, eps, cols);
            for (r, (one_sum, one_norm)) in singles.iter().take(rows).enumerate() {
                let what = format!("cols {cols}: row {r} of {rows} against the row alone");
                assert_same_bits(&sum[r * cols..][..cols], one_sum, &what);
                assert_same_bits(&norm[r * cols..][..cols], one_norm, &what);
            }
        }
    }
    eprintln!("add + RMSNorm: {exact} of {total} nearest to the f64 reference");
    assert!(exact * 10 >= total * 9, "{exact} of {total} exact");
}

#[test]
fn add_rms_norm_propagates_inf_and_nan() {
    let a = decoder_kernels();
    let cols = 64;
    let mut x = scaled_bf16(4 * cols, 5, 1.0);
    let mut y = scaled_bf16(4 * cols, 6, 1.0);
    // Row 0: a sum that overflows to inf; row 1: a NaN; row 2: inf - inf; row 3: plain.
    (x[3], y[3]) = (bf16::MAX, bf16::MAX);
    y[cols + 7] = bf16::NAN;
    (x[2 * cols + 9], y[2 * cols + 9]) = (bf16::NEG_INFINITY, bf16::INFINITY);
    let (sum, norm) = add_rms_norm_on_gpu(&a, &x, &y, &bf16s(cols, 1.5), 1e-5, cols);
    let (want_sum, want_norm) =
        decoder_ops::add_rms_norm(&x, &y, &bf16s(cols, 1.5), 1e-5, cols).unwrap();
    assert_same_bits(&sum, &want_sum, "sums");
    assert_within_one_ulp(&norm, &want_norm, "normalised rows");
    assert!(sum[3].is_infinite() && norm[3].is_nan());
    assert!(norm[..cols]
        .iter()
        .enumerate()
        .all(|(i, v)| i == 3 || v.to_f32() == 0.0));
    assert!(norm[cols..3 * cols].iter().all(|v| v.is_nan()));
    assert!(norm[3 * cols..].iter().all(|v| v.is_finite()));
}

fn bf16s(n: usize, v: f32) -> Vec<bf16> {
    vec![bf16::from_f32(v); n]
}

fn silu_mul_on_gpu(a: &DecoderKernels, gate: &[bf16], up: &[bf16]) -> Vec<bf16> {
    let st = a.stream();
    let (dg, du) = (st.clone_htod(gate).unwrap(), st.clone_htod(up).unwrap());
    let mut out = poisoned(st, gate.len());
    a.silu_mul(
        &dg.as_view(),
        &du.as_view(),
        &mut out.slice_mut(..gate.len()),
    )
    .unwrap();
    st.clone_dtoh(&out.slice(..gate.len())).unwrap()
}

#[test]
fn silu_mul_matches_reference() {
    let a = decoder_kernels();
    let (mut exact, mut total) = (0, 0);
    for n in [1, 255, 256, 257, 8 * 4096 + 3] {
        let mut gate = scaled_bf16(n, n as u64, 12.0);
        let mut up = scaled_bf16(n, n as u64 + 1, 3.0);
        // Zeros, large magnitudes (silu(-1e4) underflows to -0 in f64 too), an overflowing
        // product, infinities and NaN (silu(-inf) is NaN).
        let special = [
            (0.0, 1.0),
            (1.0, 0.0),
            (1e4, 2.0),
            (-1e4, 2.0),
            (80.0, -1e30),
            (10.0, bf16::MAX.to_f32()),
            (f32::INFINITY, 1.0),
            (f32::NEG_INFINITY, 1.0),
            (f32::NAN, 1.0),
            (1.0, f32::NAN),
            (2.0, f32::NEG_INFINITY),
        ];
        for (i, (g, u)) in special.into_iter().enumerate().take(n) {
            let at = i * n / special.len();
            (gate[at], up[at]) = (bf16::from_f32(g), bf16::from_f32(u));
        }
        let got = silu_mul_on_gpu(&a, &gate, &up);
        let want = decoder_ops::silu_mul(&gate, &up).unwrap();
        exact += assert_within_one_ulp(&got, &want, &format!("{n} elements"));
        total += n;
    }
    eprintln!("silu * up: {exact} of {total} nearest to the f64 reference");
    assert!(exact * 10 >= total * 9, "{exact} of {total} exact");
}

#[test]
fn fused_ops_reject_bad_lengths() {
    let a = decoder_kernels();
    let st = a.stream();
    let buf = st.clone_htod(&bf16s(64, 1.0)).unwrap();
    let mut out = poisoned(st, 64);
    let mut out2 = poisoned(st, 64);
    let v = |n: usize| buf.slice(..n);
    // Lengths of x, y, w, the row size, lengths of the sum and the norm outputs.
    for (x, y, w, cols, s, h) in [
        (64, 64, 32, 0, 64, 64),
        (64, 64, 24, 24, 64, 64),
        (64, 32, 32, 32, 64, 64),
        (64, 64, 32, 32, 63, 64),
        (64, 64, 32, 32, 64, 32),
    ] {
        let r = a.add_rms_norm(
            &v(x),
            &v(y),
            &v(w),
            1e-5,
            cols,
            &mut out.slice_mut(..s),
            &mut out2.slice_mut(..h),
        );
        assert!(
            matches!(r, Err(Error::Shape(_))),
            "{x} {y} {w} {cols} {s} {h}"
        );
    }
    assert!(matches!(
        a.silu_mul(&v(64), &v(63), &mut out.slice_mut(..64)),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        a.silu_mul(&v(64), &v(64), &mut out.slice_mut(..32)),
        Err(Error::Shape(_))
    ));
}

/// Runs the rope + KV write on `cache` (uploaded as given) into poisoned queries; returns the
/// queries and the cache after the write.
fn rope_kv_on_gpu(
    a: &DecoderKernels,
    shape: &decoder_ops::RopeKvShape,
    input: &[bf16],
    cos_sin: &[bf16],
    cache: &[bf16],
) -> (Vec<bf16>, Vec<bf16>) {
    let st = a.stream();
    let (din, dtab) = (
        st.clone_htod(input).unwrap(),
        st.clone_htod(cos_sin).unwrap(),
    );
    let mut dcache = st.clone_htod(cache).unwrap();
    let n = shape.block_lens().0;
    let mut q = poisoned(st, n);
    a.rope_kv(
        shape,
        &din.as_view(),
        &dtab.as_view(),
        &mut q.slice_mut(..n),
        &mut dcache.as_view_mut(),
    )
    .unwrap();
    (
        st.clone_dtoh(&q.slice(..n)).unwrap(),
        st.clone_dtoh(&dcache).unwrap(),
    )
}

/// Bit-exact against the reference over head sizes, GQA ratios, offsets inside a larger input
/// (a grouped GEMV's output) and every bit-pattern class in queries, keys, values and the
/// tables; the cache's other positions must keep their bits.
#[test]
fn rope_kv_matches_reference_bit_for_bit() {
    let a = decoder_kernels();
    for (rows, heads, kv_heads, d, capacity, start) in [
        (1, 32, 8, 128, 256, 17),
        (5, 9, 3, 64, 40, 35),
        (3, 4, 4, 256, 3, 0),
        (8, 2, 1, 2048, 9, 1),
        (2, 6, 2, 6, 4, 2),
    ] {
        let (qn, kvn) = (rows * heads * d, rows * kv_heads * d);
        // The blocks out of order and apart, inside a larger buffer.
        let offsets = [kvn + 7, 3, 2 * kvn + qn + 11];
        let shape = decoder_ops::RopeKvShape {
            rows,
            heads,
            kv_heads,
            head_dim: d,
            kv_capacity: capacity,
            start,
            offsets,
        };
        let seed = (rows * 1000 + d) as u64;
        let mut input = scaled_bf16(offsets[2] + kvn + 5, seed, 4.0);
        let specials = random_bits(input.len() / 7, seed + 1);
        for (i, v) in specials.into_iter().enumerate() {
            input[i * 7 + 3] = v;
        }
        let mut cos_sin = scaled_bf16(rows * d, seed + 2, 1.0);
        cos_sin[0] = bf16::NAN;
        cos_sin[rows * d - 1] = bf16::INFINITY;
        // A value no write produces here, so an untouched position shows as itself.
        let cache = vec![bf16::from_bits(0x1234); 2 * kv_heads * capacity * d];
        let mut want_cache = cache.clone();
        let want_q = decoder_ops::rope_kv(&shape, &input, &cos_sin, &mut want_cache).unwrap();
        let (q, got_cache) = rope_kv_on_gpu(&a, &shape, &input, &cos_sin, &cache);
        assert_same_bits(&q, &want_q, &format!("queries of {shape:?}"));
        assert_same_bits(&got_cache, &want_cache, &format!("cache of {shape:?}"));
    }
}

#[test]
fn rope_kv_rejects_bad_shapes() {
    let a = decoder_kernels();
    let st = a.stream();
    let ok = decoder_ops::RopeKvShape {
        rows: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        kv_capacity: 4,
        start: 2,
        offsets: [0, 64, 96],
    };
    let input = st.clone_htod(&bf16s(128, 1.0)).unwrap();
    let table = st.clone_htod(&bf16s(16, 1.0)).unwrap();
    let mut q = poisoned(st, 64);
    let mut cache = poisoned(st, 128);
    let mut run =
        |s: &decoder_ops::RopeKvShape, input_len: usize, q_len: usize, cache_len: usize| {
            a.rope_kv(
                s,
                &input.slice(..input_len),
                &table.as_view(),
                &mut q.slice_mut(..q_len),
                &mut cache.slice_mut(..cache_len),
            )
        };
    assert!(run(&ok, 128, 64, 128).is_ok());
    for (s, input_len, q_len, cache_len) in [
        (ok, 127, 64, 128),
        (ok, 128, 63, 128),
        (ok, 128, 64, 127),
        (decoder_ops::RopeKvShape { start: 3, ..ok }, 128, 64, 128),
        (decoder_ops::RopeKvShape { head_dim: 7, ..ok }, 128, 64, 128),
    ] {
        assert!(
            matches!(run(&s, input_len, q_len, cache_len), Err(Error::Shape(_))),
            "{s:?} {input_len} {q_len} {cache_len}"
        );
    }
}

/// A decode step's chain on one stream: add + RMSNorm, then a GEMV of its output, whose output
/// the next norm adds, and so on, with grouped and single launches and both size classes. With
/// programmatic dependent launch each kernel starts before the one that feeds it has finished,
/// so a kernel reading its input (or writing its output) before waiting would show here as bits
/// that differ from the same chain launched plainly. Every intermediate buffer starts poisoned.
#[test]
fn dependent_launch_chains_equal_plain_launches() {
    let st = CudaContext::new(0).expect("a CUDA device").default_stream();
    let mut norms = DecoderKernels::new(st.clone()).unwrap();
    let mut k = Kernels::new(st.clone()).unwrap();
    // The default variant, the tall one (896 tiles), then the large one (25_600 x 4096 is 105M
    // weights).
    for (rows, seed) in [(4096usize, 1u64), (14_336, 3), (25_600, 2)] {
        let cols = 4096;
        let tensors: Vec<GpuResident> = (0..2)
            .map(|i| {
                let w = weight_like(rows, cols, seed * 10 + i);
                k.upload(&resident(&w, rows, cols, 64)).unwrap()
            })
            .collect();
        let x0 = scaled_bf16(cols, seed, 1.0);
        let gain = bf16s(cols, 1.0);
        let mut outputs = Vec::new();
        for on in [true, false] {
            k.set_dependent_launch(on).unwrap();
            norms.set_dependent_launch(on).unwrap();
            for sel in [GpuSelection::Exact, GpuSelection::Draft] {
                let dw = st.clone_htod(&gain).unwrap();
                let mut x = st.clone_htod(&x0).unwrap();
                let mut h = poisoned(&st, cols);
                let mut y = st.clone_htod(&vec![bf16::ZERO; rows]).unwrap();
                let mut both = poisoned(&st, 2 * rows);
                for step in 0..6 {
                    let mut sum = poisoned(&st, cols);
                    // The residual stream takes the first `cols` outputs of the last GEMV.
                    let add = y.slice(..cols);
                    norms
                        .add_rms_norm(
                            &x.as_view(),
                            &add,
                            &dw.as_view(),
                            1e-6,
                            cols,
                            &mut sum.as_view_mut(),
                            &mut h.as_view_mut(),
                        )
                        .unwrap();
                    x = sum;
                    if step % 2 == 0 {
                        k.gemv(
                            &tensors[step % 4 / 2],
                            &sel,
                            &h.as_view(),
                            1,
                            &mut y.as_view_mut(),
                        )
                        .unwrap();
                    } else {
                        let pair = [&tensors[0], &tensors[1]];
                        k.gemv_group(&pair, &sel, &h.as_view(), 1, &mut both.as_view_mut())
                            .unwrap();
                        st.memcpy_dtod(&both.slice(rows..), &mut y).unwrap();
                    }
                }
                outputs.push((on, format!("{sel:?}"), st.clone_dtoh(&y).unwrap()));
            }
        }
        let (with, without) = outputs.split_at(2);
        for ((_, sel, a), (_, _, b)) in with.iter().zip(without) {
            assert!(
                a.iter().all(|v| v.to_bits() != 0xFFFF),
                "{rows}x{cols} {sel}: poison left in the output"
            );
            assert_same_bits(a, b, &format!("{rows}x{cols} {sel} with dependent launch"));
        }
    }
}

#[test]
fn logit_stats_match_the_reference() {
    let d = decoder_kernels();
    let st = d.stream().clone();
    let mut rng = StdRng::seed_from_u64(31);
    let mut rows: Vec<Vec<f32>> = [1usize, 7, 1024, 49_152, 128_256]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random::<f32>() * 30.0 - 20.0).collect())
        .collect();
    // Ties at the top (the first index must win), a NaN, -inf, a lone +inf, all -inf.
    let mut tied = rows[3].clone();
    tied[100] = 50.0;
    tied[40_000] = 50.0;
    tied[7] = f32::NAN;
    tied[8] = f32::NEG_INFINITY;
    rows.push(tied);
    let mut inf = rows[2].clone();
    inf[500] = f32::INFINITY;
    rows.push(inf);
    rows.push(vec![f32::NEG_INFINITY; 300]);
    for row in &rows {
        let want = decoder_ops::logit_stats(row).unwrap();
        let x = st.clone_htod(row).unwrap();
        let mut out = st.clone_htod(&[f32::NAN; 5]).unwrap();
        d.logit_stats(&x.as_view(), &mut out.as_view_mut()).unwrap();
        let got = st.clone_dtoh(&out).unwrap();
        let n = row.len();
        assert_eq!(got[0] as f64, want[0], "argmax, {n} logits");
        assert_eq!(got[3] as f64, want[3], "l2, {n} logits");
        assert_eq!(got[4] as f64, want[4], "ties, {n} logits");
        let tol = 1e-5 * (want[1] + want[2].abs()) + 1e-30;
        assert!(
            (got[1] as f64 - want[1]).abs() <= tol,
            "Z {} vs {}",
            got[1],
            want[1]
        );
        assert!(
            (got[2] as f64 - want[2]).abs() <= tol,
            "S {} vs {}",
            got[2],
            want[2]
        );
    }
    let x = st.clone_htod(&[0f32; 4]).unwrap();
    let mut short = st.alloc_zeros::<f32>(4).unwrap();
    assert!(d
        .logit_stats(&x.as_view(), &mut short.as_view_mut())
        .is_err());
    let empty = st.alloc_zeros::<f32>(1).unwrap();
    let mut out = st.alloc_zeros::<f32>(5).unwrap();
    assert!(d
        .logit_stats(&empty.slice(0..0), &mut out.as_view_mut())
        .is_err());
}
