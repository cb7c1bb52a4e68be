//! The device layout restores every bit the resident layout holds (CPU, runs in CI).

use half::bf16;
use jitdelta_format::{FloatFormat, ResidentTensor};
use jitdelta_kernels::device_layout::{DeviceLayout, SCALED_EXPONENT};
use jitdelta_kernels::reference::{decode_bf16, ChunkSelection};
use proptest::prelude::*;

fn check(bits: &[u16], rows: usize, cols: usize, chunk_rows: usize) {
    let t = ResidentTensor::from_exact(
        FloatFormat::BF16,
        rows,
        cols,
        chunk_rows,
        3,
        bytemuck::cast_slice(bits),
    )
    .unwrap();
    let d = DeviceLayout::from_resident(&t).unwrap();
    let added = d.escape_pos.len() - t.escape_count();
    assert_eq!(
        d.bytes_held(),
        t.bytes_held() + 5 * added + 8 * d.escape_pos.len() + 4 * (rows + 1)
    );
    check_escape_index(&d, bits, rows, cols, chunk_rows);
    let mut want = vec![bf16::ZERO; rows * cols];
    decode_bf16(&t, &ChunkSelection::Exact, &mut want).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(d.exact_bits(i), w.to_bits(), "value {i}");
        assert_eq!(w.to_bits(), bits[i], "value {i}");
    }
}

/// The per-row escape index and the GEMV corrections: a placeholder read at the scaled
/// exponent, rescaled, plus its correction gives the true (exact) weight.
fn check_escape_index(d: &DeviceLayout, bits: &[u16], rows: usize, cols: usize, chunk_rows: usize) {
    assert_eq!(d.escape_row_start.len(), rows + 1);
    assert_eq!(d.escape_correction.len(), d.escape_pos.len());
    for r in 0..rows {
        let listed = d.escape_row_start[r] as usize..d.escape_row_start[r + 1] as usize;
        let in_row = d
            .escape_pos
            .iter()
            .filter(|&&p| (p as usize) / cols == r)
            .count();
        assert_eq!(listed.len(), in_row, "row {r}");
        assert!(d.escape_pos[listed].iter().all(|&p| p as usize / cols == r));
    }
    for (k, &pos) in d.escape_pos.iter().enumerate() {
        let (pos, corr) = (pos as usize, d.escape_correction[k][0] as f64);
        let truth = f32::from_bits((bits[pos] as u32) << 16) as f64;
        // The stored placeholder: this value's fields with the scaled exponent (code 0).
        let scaled = (bits[pos] & 0x807F) | ((SCALED_EXPONENT as u16) << 7);
        let base = d.bases[pos / (chunk_rows * cols)] as i32;
        let placeholder =
            f32::from_bits((scaled as u32) << 16) as f64 * 2f64.powi(base - SCALED_EXPONENT as i32);
        let restored = placeholder + corr;
        if truth.is_nan() {
            assert!(corr.is_nan(), "escape {k}");
        } else if truth.is_infinite() {
            assert_eq!(corr, truth, "escape {k}");
        } else {
            let tol = truth.abs() * 2f64.powi(-24) + placeholder.abs() * 2f64.powi(-24);
            assert!(
                (restored - truth).abs() <= tol,
                "escape {k}: {restored} vs {truth}"
            );
        }
    }
}

proptest! {
    #[test]
    fn every_bit_pattern_round_trips(
        bits in prop::collection::vec(any::<u16>(), 1..600),
        cols in 1usize..40,
        chunk_rows in 1usize..9,
    ) {
        let rows = bits.len() / cols;
        prop_assume!(rows > 0);
        check(&bits[..rows * cols], rows, cols, chunk_rows);
    }

    #[test]
    fn windows_touching_exponent_0_and_255_round_trip(
        low in prop::collection::vec(0u16..0x0700, 64..256),
        high in prop::collection::vec(0x7800u16..0x7FFF, 64..256),
        sign in any::<bool>(),
    ) {
        // Chunks of only tiny values (base 0) or only huge/inf/NaN values (base 240).
        let s = if sign { 0x8000 } else { 0 };
        let n = low.len() / 32 * 32;
        let lows: Vec<u16> = low[..n].iter().map(|b| b | s).collect();
        check(&lows, n / 32, 32, 2);
        let n = high.len() / 32 * 32;
        let highs: Vec<u16> = high[..n].iter().map(|b| b | s).collect();
        check(&highs, n / 32, 32, 2);
    }
}
