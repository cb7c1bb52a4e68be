//! Hot loops over value fields, monomorphised per float layout so that every shift and mask is
//! a constant: `BYTES` per value, `M` mantissa bits, `E` exponent bits.

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
/// into nibble planes (appended to `high` and `low`): the hot path of encoding.
pub(crate) fn split_bf16_nibbles(
    bytes: &[u8],
    exps: &mut [u8],
    high: &mut Vec<u8>,
    low: &mut Vec<u8>,
) {
    let n = bytes.len() / 2;
    let (h_at, l_at) = (high.len(), low.len());
    high.resize(h_at + n.div_ceil(2), 0);
    low.resize(l_at + n.div_ceil(2), 0);
    let (high, low) = (&mut high[h_at..], &mut low[l_at..]);
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

/// [`join`] for the default BF16 layout (`d = 3`), reading the high and low fields straight from
/// their nibble planes: the hot path of exact decoding, with no intermediate field buffers.
/// `high` and `low` start at the nibble of value 0 (an even field index).
pub(crate) fn join_bf16_nibbles(exps: &[u8], high: &[u8], low: &[u8], out: &mut [u8]) {
    let n = out.len() / 2;
    let pairs = n / 2;
    // Two values per byte of each plane: one u32 of output per pair.
    let (e, h, l) = (&exps[..2 * pairs], &high[..pairs], &low[..pairs]);
    let pair = |j: usize| {
        let (hb, lb) = (h[j] as u32, l[j] as u32);
        let (e0, e1) = (e[2 * j] as u32, e[2 * j + 1] as u32);
        let v0 = ((hb & 8) << 12) | (e0 << 7) | ((hb & 7) << 4) | (lb & 15);
        let v1 = ((hb & 0x80) << 8) | (e1 << 7) | (hb & 0x70) | (lb >> 4);
        v0 | v1 << 16
    };
    fill(&mut out[..4 * pairs], pair);
    if n % 2 == 1 {
        let (hb, lb, e0) = (high[pairs] as u32, low[pairs] as u32, exps[n - 1] as u32);
        let v = ((hb & 8) << 12) | (e0 << 7) | ((hb & 7) << 4) | (lb & 15);
        out[2 * n - 2..].copy_from_slice(&(v as u16).to_le_bytes());
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
