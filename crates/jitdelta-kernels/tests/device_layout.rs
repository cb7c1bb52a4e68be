//! The device layout restores every bit the resident layout holds (CPU, runs in CI).

use half::bf16;
use jitdelta_format::{FloatFormat, ResidentTensor};
use jitdelta_kernels::device_layout::DeviceLayout;
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
    assert_eq!(
        d.bytes_held(),
        t.bytes_held() + 5 * (d.escape_pos.len() - t.escape_count())
    );
    let mut want = vec![bf16::ZERO; rows * cols];
    decode_bf16(&t, &ChunkSelection::Exact, &mut want).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(d.exact_bits(i), w.to_bits(), "value {i}");
        assert_eq!(w.to_bits(), bits[i], "value {i}");
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
