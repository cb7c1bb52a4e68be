//! Hot loops over value fields, monomorphised per float layout so that every shift and mask is
//! a constant: `BYTES` per value, `M` mantissa bits, `E` exponent bits.

use crate::bitpack::pack_into;
use crate::float::{DraftDtype, FloatFormat};

/// Calls `$func::<BYTES, M, E>(args)` for a runtime [`FloatFormat`].
macro_rules! with_layout {
    ($format:expr, $func:ident($($arg:expr),* $(,)?)) => {
        match $format {
            $crate::float::FloatFormat::BF16 => $func::<2, 7, 8>($($arg),*),
            $crate::float::FloatFormat::F16 => $func::<2, 10, 5>($($arg),*),
            $crate::float::FloatFormat::F32 => $func::<4, 23, 8>($($arg),*),
        }
    };
}
pub(crate) use with_layout;

#[inline(always)]
fn load<const BYTES: usize>(c: &[u8]) -> u32 {
    if BYTES == 2 {
        u16::from_le_bytes([c[0], c[1]]) as u32
    } else {
        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
    }
}

/// Exponent histogram of little-endian values (four sub-histograms hide store-to-load stalls).
pub(crate) fn histogram<const BYTES: usize, const M: u32, const E: u32>(
    bytes: &[u8],
) -> [u64; 256] {
    let mut h = [[0u32; 256]; 4];
    let mut total = [0u64; 256];
    // Flush the u32 counters before they can overflow.
    for block in bytes.chunks(BYTES << 30) {
        let mut quads = block.chunks_exact(4 * BYTES);
        for q in &mut quads {
            for (k, sub) in h.iter_mut().enumerate() {
                sub[((load::<BYTES>(&q[k * BYTES..]) >> M) & ((1 << E) - 1)) as usize] += 1;
            }
        }
        for c in quads.remainder().chunks_exact(BYTES) {
            h[0][((load::<BYTES>(c) >> M) & ((1 << E) - 1)) as usize] += 1;
        }
        for sub in &mut h {
            for (t, s) in total.iter_mut().zip(sub.iter_mut()) {
                *t += *s as u64;
                *s = 0;
            }
        }
    }
    total
}

/// Splits values into exponent, high (sign + top `d` mantissa bits) and low fields.
pub(crate) fn split<const BYTES: usize, const M: u32, const E: u32>(
    bytes: &[u8],
    d: u32,
    exps: &mut [u8],
    high: &mut [u32],
    low: &mut [u32],
) {
    let low_bits = M - d;
    for (((c, e), h), l) in bytes.chunks_exact(BYTES).zip(exps).zip(high).zip(low) {
        let v = load::<BYTES>(c);
        let mantissa = v & ((1 << M) - 1);
        *e = ((v >> M) & ((1 << E) - 1)) as u8;
        *h = ((v >> (E + M)) << d) | (mantissa >> low_bits);
        *l = mantissa & ((1 << low_bits) - 1);
    }
}

/// Values per stack batch when assembling output words.
const BATCH: usize = 1024;

/// Computes `value(i)` for every output word, in stack batches of native words that are then
/// copied out as little-endian bytes (a shape the compiler vectorises).
#[inline(always)]
fn assemble<const BYTES: usize>(out: &mut [u8], value: impl Fn(usize) -> u32) {
    let n = out.len() / BYTES;
    let mut first = 0;
    while first < n {
        let len = BATCH.min(n - first);
        let dst = &mut out[first * BYTES..(first + len) * BYTES];
        if BYTES == 2 {
            let mut words = [0u16; BATCH];
            for (i, w) in words[..len].iter_mut().enumerate() {
                *w = (value(first + i) as u16).to_le();
            }
            dst.copy_from_slice(bytemuck::cast_slice(&words[..len]));
        } else {
            let mut words = [0u32; BATCH];
            for (i, w) in words[..len].iter_mut().enumerate() {
                *w = value(first + i).to_le();
            }
            dst.copy_from_slice(bytemuck::cast_slice(&words[..len]));
        }
        first += len;
    }
}

/// [`split`] for the default BF16 layout (`d = 3`), writing the high and low fields straight
/// into nibble planes (`high` and `low`, `n.div_ceil(2)` bytes each): the hot path of encoding.
pub(crate) fn split_bf16_nibbles(bytes: &[u8], exps: &mut [u8], high: &mut [u8], low: &mut [u8]) {
    let n = bytes.len() / 2;
    let pairs = n / 2;
    let (e_pairs, h, l) = (
        &mut exps[..2 * pairs],
        &mut high[..pairs],
        &mut low[..pairs],
    );
    let words = &bytes[..4 * pairs];
    for j in 0..pairs {
        let w = u32::from_le_bytes([
            words[4 * j],
            words[4 * j + 1],
            words[4 * j + 2],
            words[4 * j + 3],
        ]);
        e_pairs[2 * j] = (w >> 7) as u8;
        e_pairs[2 * j + 1] = (w >> 23) as u8;
        h[j] = (((w >> 12) & 8) | ((w >> 4) & 7) | ((w >> 24) & 0x80) | ((w >> 16) & 0x70)) as u8;
        l[j] = ((w & 15) | ((w >> 12) & 0xF0)) as u8;
    }
    if n % 2 == 1 {
        let v = u16::from_le_bytes([bytes[2 * n - 2], bytes[2 * n - 1]]) as u32;
        exps[n - 1] = (v >> 7) as u8;
        high[pairs] = (((v >> 12) & 8) | ((v >> 4) & 7)) as u8;
        low[pairs] = (v & 15) as u8;
    }
}

/// Reusable field buffers for splitting exact values straight into packed planes.
#[derive(Default)]
pub(crate) struct FieldBuffers {
    high: Vec<u32>,
    low: Vec<u32>,
}

impl FieldBuffers {
    /// Splits the little-endian values in `bytes` into their exponents and the packed high
    /// (sign + top `d` mantissa bits) and low planes (`packed_len` bytes each), the way
    /// [`split`] and [`pack`](crate::bitpack::pack) lay them out. BF16 with `d = 3` writes the
    /// nibble planes directly; other layouts go through the field buffers.
    pub(crate) fn split(
        &mut self,
        format: FloatFormat,
        d: u32,
        bytes: &[u8],
        exps: &mut [u8],
        high: &mut [u8],
        low: &mut [u8],
    ) {
        if format == FloatFormat::BF16 && d == 3 {
            split_bf16_nibbles(bytes, exps, high, low);
            return;
        }
        let n = bytes.len() / format.bytes();
        self.high.resize(n, 0);
        self.low.resize(n, 0);
        let (h, l) = (&mut self.high[..n], &mut self.low[..n]);
        with_layout!(format, split(bytes, d, exps, h, l));
        pack_into(h, 1 + d, high);
        pack_into(l, format.mantissa_bits() - d, low);
    }
}

/// Inverse of [`split`]: writes exact values.
pub(crate) fn join<const BYTES: usize, const M: u32, const E: u32>(
    exps: &[u8],
    high: &[u32],
    low: &[u32],
    d: u32,
    out: &mut [u8],
) {
    let n = out.len() / BYTES;
    let (exps, high, low) = (&exps[..n], &high[..n], &low[..n]);
    let low_bits = M - d;
    let top_mask = (1 << d) - 1;
    assemble::<BYTES>(out, |i| {
        let h = high[i];
        ((h >> d) << (E + M)) | ((exps[i] as u32) << M) | ((h & top_mask) << low_bits) | low[i]
    });
}

/// Values per group of [`join_bf16_nibbles`]: 16 bytes of each nibble plane, 64 output bytes.
const JOIN_GROUP: usize = 32;

/// [`join`] for the default BF16 layout (`d = 3`), reading the high and low fields straight from
/// their nibble planes: the hot path of exact decoding, with no intermediate field buffers.
/// `high` and `low` start at the nibble of value 0 (an even field index).
pub(crate) fn join_bf16_nibbles(exps: &[u8], high: &[u8], low: &[u8], out: &mut [u8]) {
    let n = out.len() / 2;
    let groups = n / JOIN_GROUP;
    let (e_body, h_body, l_body) = (
        &exps[..JOIN_GROUP * groups],
        &high[..JOIN_GROUP / 2 * groups],
        &low[..JOIN_GROUP / 2 * groups],
    );
    // Whole groups as loops over fixed-size arrays, a shape the compiler turns into SIMD (about
    // 4x faster than one value at a time; small changes to these loops can lose it, so measure).
    // Value `i`'s output bytes are: exponent bit 0 | top mantissa bits | low nibble, then
    // sign | exponent >> 1. Byte-wise shifts are done on 16-bit lanes and masked: SIMD has no
    // 8-bit shift.
    for (((o, e), h), l) in out[..2 * JOIN_GROUP * groups]
        .chunks_exact_mut(2 * JOIN_GROUP)
        .zip(e_body.chunks_exact(JOIN_GROUP))
        .zip(h_body.chunks_exact(JOIN_GROUP / 2))
        .zip(l_body.chunks_exact(JOIN_GROUP / 2))
    {
        let (mut h16, mut l16, mut e16) = ([0u16; 8], [0u16; 8], [0u16; 16]);
        for m in 0..8 {
            h16[m] = u16::from_le_bytes([h[2 * m], h[2 * m + 1]]);
            l16[m] = u16::from_le_bytes([l[2 * m], l[2 * m + 1]]);
        }
        for m in 0..16 {
            e16[m] = u16::from_le_bytes([e[2 * m], e[2 * m + 1]]);
        }
        // Even values' high nibbles shifted up, odd values' low nibbles shifted down.
        let (mut h_even, mut l_odd) = ([0u8; 16], [0u8; 16]);
        for m in 0..8 {
            [h_even[2 * m], h_even[2 * m + 1]] = ((h16[m] << 4) & 0xF0F0).to_le_bytes();
            [l_odd[2 * m], l_odd[2 * m + 1]] = ((l16[m] >> 4) & 0x0F0F).to_le_bytes();
        }
        // Exponent bit 0 at bit 7 (for the low output byte), the rest shifted down (high byte).
        let (mut e_low, mut e_high) = ([0u8; 32], [0u8; 32]);
        for m in 0..16 {
            [e_low[2 * m], e_low[2 * m + 1]] = ((e16[m] << 7) & 0x8080).to_le_bytes();
            [e_high[2 * m], e_high[2 * m + 1]] = ((e16[m] >> 1) & 0x7F7F).to_le_bytes();
        }
        // Per value: its high nibble at bits 4..7, its low nibble at bits 0..3.
        let (mut top, mut bottom) = ([0u8; 32], [0u8; 32]);
        for j in 0..16 {
            top[2 * j] = h_even[j];
            top[2 * j + 1] = h[j] & 0xF0;
            bottom[2 * j] = l[j] & 15;
            bottom[2 * j + 1] = l_odd[j];
        }
        let (mut lo, mut hi) = ([0u8; 32], [0u8; 32]);
        for i in 0..32 {
            lo[i] = e_low[i] | (top[i] & 0x70) | bottom[i];
            hi[i] = (top[i] & 0x80) | e_high[i];
        }
        for i in 0..32 {
            o[2 * i] = lo[i];
            o[2 * i + 1] = hi[i];
        }
    }
    for i in JOIN_GROUP * groups..n {
        let shift = 4 * (i % 2);
        let (hn, ln) = ((high[i / 2] >> shift) & 15, (low[i / 2] >> shift) & 15);
        let v =
            ((hn as u16 & 8) << 12) | ((exps[i] as u16) << 7) | ((hn as u16 & 7) << 4) | ln as u16;
        out[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
}

/// [`draft`] for the default BF16 layout (`d = 3`) from the high nibble plane (starting at an
/// even field index): the hot path of draft decoding, two values per plane byte.
pub(crate) fn draft_bf16_nibbles(exps: &[u8], high: &[u8], dtype: DraftDtype, out: &mut [u8]) {
    let value = |e: u32, h: u32| {
        let mid = if e != 0 && e != 0xFF { 8 } else { 0 };
        ((h >> 3) << 15) | (e << 7) | ((h & 7) << 4) | mid
    };
    let n = out.len() / dtype.bytes();
    let pairs = n / 2;
    let (e, h) = (&exps[..2 * pairs], &high[..pairs]);
    let pair = |j: usize| {
        let hb = h[j] as u32;
        (
            value(e[2 * j] as u32, hb & 15),
            value(e[2 * j + 1] as u32, hb >> 4),
        )
    };
    let body = &mut out[..2 * pairs * dtype.bytes()];
    match dtype {
        DraftDtype::BF16 => fill(body, |j| {
            let (v0, v1) = pair(j);
            v0 | v1 << 16
        }),
        DraftDtype::F32 => fill(body, |j| {
            let (v0, v1) = pair(j);
            (v0 as u64) << 16 | (v1 as u64) << 48
        }),
    }
    if n % 2 == 1 {
        let v = value(exps[n - 1] as u32, high[pairs] as u32 & 15);
        let tail = &mut out[(n - 1) * dtype.bytes()..];
        match dtype {
            DraftDtype::BF16 => tail.copy_from_slice(&(v as u16).to_le_bytes()),
            DraftDtype::F32 => tail.copy_from_slice(&(v << 16).to_le_bytes()),
        }
    }
}

/// Writes word `j = f(j)` over `out` (native order: the crate only builds little-endian): in place when `out` is aligned for `W`
/// (buffers from the allocator and chunk-sized slices of them), word by word otherwise.
fn fill<W: bytemuck::Pod>(out: &mut [u8], f: impl Fn(usize) -> W) {
    match bytemuck::try_cast_slice_mut::<u8, W>(out) {
        Ok(words) => words.iter_mut().enumerate().for_each(|(j, w)| *w = f(j)),
        Err(_) => out
            .chunks_exact_mut(std::mem::size_of::<W>())
            .enumerate()
            .for_each(|(j, c)| c.copy_from_slice(bytemuck::bytes_of(&f(j)))),
    }
}

/// Draft values from exponent and high fields (bucket midpoint for normal numbers).
pub(crate) fn draft<const BYTES: usize, const M: u32, const E: u32>(
    exps: &[u8],
    high: &[u32],
    d: u32,
    dtype: DraftDtype,
    out: &mut [u8],
) {
    let format = match (BYTES, M) {
        (2, 7) => FloatFormat::BF16,
        (2, _) => FloatFormat::F16,
        _ => FloatFormat::F32,
    };
    let low_bits = M - d;
    let top_mask = (1 << d) - 1;
    let max_e = (1u32 << E) - 1;
    let bits = |e: u8, h: u32| {
        let e = e as u32;
        let mid = if e != 0 && e != max_e {
            1 << (low_bits - 1)
        } else {
            0
        };
        ((h >> d) << (E + M)) | (e << M) | ((h & top_mask) << low_bits) | mid
    };
    let n = exps.len();
    let high = &high[..n];
    match dtype {
        DraftDtype::BF16 if format == FloatFormat::BF16 => {
            assemble::<2>(out, |i| bits(exps[i], high[i]))
        }
        DraftDtype::BF16 => assemble::<2>(out, |i| {
            half::bf16::from_f32(format.to_f32(bits(exps[i], high[i]))).to_bits() as u32
        }),
        DraftDtype::F32 => assemble::<4>(out, |i| format.to_f32(bits(exps[i], high[i])).to_bits()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibble_join_matches_the_generic_join() {
        // Lengths around the 32-value groups, from arbitrary bytes (every exponent, sign and
        // mantissa pattern), into an unaligned output.
        let mut x = 0x9E37_79B9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        };
        for n in (0..100usize).chain([127, 128, 129, 1000, 1025]) {
            let exps: Vec<u8> = (0..n).map(|_| next()).collect();
            let high: Vec<u8> = (0..n.div_ceil(2)).map(|_| next()).collect();
            let low: Vec<u8> = (0..n.div_ceil(2)).map(|_| next()).collect();
            let nibble = |plane: &[u8], i: usize| (plane[i / 2] >> (4 * (i % 2)) & 15) as u32;
            let h: Vec<u32> = (0..n).map(|i| nibble(&high, i)).collect();
            let l: Vec<u32> = (0..n).map(|i| nibble(&low, i)).collect();
            let mut expected = vec![0u8; 2 * n];
            join::<2, 7, 8>(&exps, &h, &l, 3, &mut expected);
            let mut got = vec![0u8; 2 * n + 1];
            join_bf16_nibbles(&exps, &high, &low, &mut got[1..]);
            assert_eq!(got[1..], expected[..], "n = {n}");
        }
    }
}
