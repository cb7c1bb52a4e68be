//! The device layout: the resident nibble planes re-packed at upload so a GPU builds BF16
//! weights with a handful of byte-wide integer ops.
//!
//! Same size as the resident layout (three 4-bit planes, same 16-byte aligned chunk segments),
//! different bit placement. Per group of 8 consecutive values (one 32-bit word of each plane),
//! value `v` sits at nibble `2v` for `v < 4` and `2(v - 4) + 1` for `v >= 4`, so the low nibbles
//! of a word are values 0–3 and the high nibbles 4–7. With `code` the 4-bit exponent code:
//!
//! - plane **P** nibble: `(code & 1) << 3 | top 3 mantissa bits`,
//! - plane **L** nibble: the low 4 mantissa bits,
//! - plane **S** byte `k` of a word (values `k` and `k + 4`): bit 7 = sign of `k`, bits 2..0 =
//!   `code >> 1` of `k`; bit 6 = sign of `k + 4`, bits 5..3 = `code >> 1` of `k + 4`.
//!
//! A kernel then reads every weight *scaled*: exponent [`SCALED_EXPONENT`]` + code` instead of
//! `base + code`, so byte 1 of the BF16 is `S & 0x87 | 0x38` (or a shifted S) and byte 0 is
//! `P << 4 | L`: no carry, no per-chunk add. A GEMV multiplies each row's sum by
//! `2^(base - SCALED_EXPONENT)` once; a decode adds `(base - SCALED_EXPONENT) << 7` back.
//! The draft reads P and S only. Exponents 0 and 255 (zero, subnormal, inf, NaN) inside a
//! chunk's window become escapes too (code 0 here), because the scaled reading would treat
//! them as normal numbers.

use crate::reference::check_supported;
use crate::Result;
use jitdelta_format::resident::CODE_BITS;
use jitdelta_format::ResidentTensor;
use rayon::prelude::*;

/// The exponent every weight is read with before its row is rescaled (even, so the code's
/// low bit is the exponent's low bit).
pub const SCALED_EXPONENT: u32 = 112;

/// Nibble position of value `v` (0..8) inside its 32-bit group.
pub fn nibble_position(v: usize) -> usize {
    if v < 4 {
        2 * v
    } else {
        2 * (v - 4) + 1
    }
}

/// A tensor in the device layout, still on the host.
#[derive(Clone, Debug)]
pub struct DeviceLayout {
    /// Rows, columns, rows per chunk.
    pub dims: (usize, usize, usize),
    /// Bytes between consecutive chunks' segments (all three planes).
    pub segment: usize,
    /// Plane P (code low bit + 3 mantissa bits).
    pub p: Vec<u8>,
    /// Plane S (sign + code >> 1, two values a byte as documented above).
    pub s: Vec<u8>,
    /// Plane L (low 4 mantissa bits).
    pub l: Vec<u8>,
    /// Base exponent per chunk.
    pub bases: Vec<u8>,
    /// Escapes per chunk, CSR start offsets (`chunks + 1`).
    pub escape_start: Vec<u32>,
    /// Flat value index of each escape.
    pub escape_pos: Vec<u32>,
    /// True exponent of each escape.
    pub escape_exponent: Vec<u8>,
    /// Index of each row's first escape (`rows + 1` entries), so a GEMV finds a row's
    /// escapes with one load instead of a search.
    pub escape_row_start: Vec<u32>,
    /// Per escape, what a GEMV adds per unit of activation to correct the scaled placeholder
    /// it multiplied: `true − placeholder · 2^(base − SCALED_EXPONENT)` for an exact chunk,
    /// then for a draft chunk (f32, rounded once from f64).
    pub escape_correction: Vec<[f32; 2]>,
}

/// A value's fields as the device layout stores them.
#[derive(Clone, Copy, Debug)]
struct Fields {
    sign: u32,
    code: u32,
    m3: u32,
    l4: u32,
}

impl Fields {
    /// BF16 bits with exponent `e`; a draft gets the bucket midpoint in the low bits except
    /// for exponents 0 and 255 (the CPU decoder's rule).
    fn bf16_bits(self, e: u32, exact: bool) -> u16 {
        let lo = match (exact, e) {
            (true, _) => self.l4,
            (false, 0 | 255) => 0,
            (false, _) => 8,
        };
        (self.sign << 15 | e << 7 | self.m3 << 4 | lo) as u16
    }
}

fn bf16_value(bits: u16) -> f64 {
    f32::from_bits((bits as u32) << 16) as f64
}

fn nib(plane: &[u8], i: usize) -> u8 {
    (plane[i / 2] >> ((i & 1) * 4)) & 15
}

/// The little-endian 64-bit words of a plane segment (a multiple of 8 bytes).
fn words(plane: &[u8]) -> impl Iterator<Item = u64> + '_ {
    plane
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// Moves the nibbles of each 32-bit half of `x` to the device order: the nibble of value `v`
/// (bits `4v`) goes to [`nibble_position`]`(v)`, so values 0–3 take the low nibbles of the
/// half's bytes and values 4–7 the high ones.
#[inline(always)]
fn interleave(x: u64) -> u64 {
    const HALVES: u64 = 0x0000_FFFF_0000_FFFF;
    // Nibble k of a 16-bit field to bits 8k..8k+4, inside its 32-bit half.
    let spread = |x: u64| {
        let x = (x | x << 8) & 0x00FF_00FF_00FF_00FF;
        (x | x << 4) & 0x0F0F_0F0F_0F0F_0F0F
    };
    spread(x & HALVES) | spread((x >> 16) & HALVES) << 4
}

/// Re-packs 16 consecutive values (a 64-bit word of each resident plane: code, high = sign +
/// 3 mantissa bits, low = 4 mantissa bits; value `i` at bits `4i`) into the words of the device
/// planes `(P, S, L)`, two groups of 8 as documented at the top of this module.
#[inline(always)]
fn repack(code: u64, high: u64, low: u64) -> (u64, u64, u64) {
    const NIBBLE_BIT0: u64 = 0x1111_1111_1111_1111;
    const NIBBLE_LOW3: u64 = 0x7777_7777_7777_7777;
    let p = interleave((code & NIBBLE_BIT0) << 3 | (high & NIBBLE_LOW3));
    // Per byte k of a group: `code >> 1` of value k in bits 0..3 and of value k + 4 in bits
    // 4..7; the sign of value k in bit 0 and of value k + 4 in bit 4.
    let c3 = interleave((code >> 1) & NIBBLE_LOW3);
    let sign = interleave((high >> 3) & NIBBLE_BIT0);
    let s = (c3 & 0x0707_0707_0707_0707)
        | (c3 >> 1) & 0x3838_3838_3838_3838
        | (sign & 0x0101_0101_0101_0101) << 7
        | (sign & 0x1010_1010_1010_1010) << 2;
    (p, s, interleave(low))
}

/// In a chunk whose exponent window touches 0 or 255 (base 0, or 240 and up), the values of a
/// word of codes (its first `len` values, flat indices from `first`) whose exponent is 0 or
/// 255 become escapes: pushed to `escapes` with their true exponent, their code cleared to 0.
/// (Code 0 with exponent 0 is the placeholder already; it is listed so the true bits are
/// restored.) Returns the word of codes.
fn edge_escapes(
    code: u64,
    base: u32,
    first: usize,
    len: usize,
    escapes: &mut Vec<(u32, u8)>,
) -> u64 {
    let mut cleared = code;
    for v in 0..len {
        let e = base + ((code >> (4 * v)) as u32 & 15);
        if e == 0 || e == 255 {
            escapes.push(((first + v) as u32, e as u8));
            cleared &= !(15 << (4 * v));
        }
    }
    cleared
}

impl DeviceLayout {
    /// Re-packs a resident tensor (BF16, three nibble planes): chunks in parallel, 16 values a
    /// step, straight into the output planes.
    pub fn from_resident(t: &ResidentTensor) -> Result<Self> {
        check_supported(t)?;
        let (rows, cols) = t.dims();
        let chunk_rows = t.chunk_rows();
        let segment = t.segment_stride(CODE_BITS);
        let (codes, high, low) = t.planes();
        let (esc_start, esc_pos, esc_exp) = t.escapes();
        let [mut p, mut s, mut l] = [(); 3].map(|()| vec![0u8; codes.len()]);
        let stride = segment.max(1);
        // Per chunk, the escapes its window adds (only windows touching 0 or 255 add any).
        let added: Vec<Vec<(u32, u8)>> = p
            .par_chunks_mut(stride)
            .zip(s.par_chunks_mut(stride))
            .zip(l.par_chunks_mut(stride))
            .enumerate()
            .map(|(c, ((p, s), l))| {
                let n = t.chunk_len(c);
                let base = t.exponent_bases()[c] as u32;
                let edge_window = base == 0 || base + 15 >= 255;
                let first = c * chunk_rows * cols;
                let at = c * segment;
                let span = at..at + 8 * n.div_ceil(16);
                let mut added = Vec::new();
                let outputs = p
                    .chunks_exact_mut(8)
                    .zip(s.chunks_exact_mut(8))
                    .zip(l.chunks_exact_mut(8));
                for (w, (((code, h), lo), ((po, so), lout))) in words(&codes[span.clone()])
                    .zip(words(&high[span.clone()]))
                    .zip(words(&low[span]))
                    .zip(outputs)
                    .enumerate()
                {
                    // Only the last word has nibbles past the chunk's end; they are not values.
                    let len = (n - 16 * w).min(16);
                    let valid = u64::MAX >> (64 - 4 * len);
                    let mut code = code & valid;
                    if edge_window {
                        code = edge_escapes(code, base, first + 16 * w, len, &mut added);
                    }
                    let (pw, sw, lw) = repack(code, h & valid, lo & valid);
                    po.copy_from_slice(&pw.to_le_bytes());
                    so.copy_from_slice(&sw.to_le_bytes());
                    lout.copy_from_slice(&lw.to_le_bytes());
                }
                added
            })
            .collect();
        let mut out = Self {
            dims: (rows, cols, chunk_rows),
            segment,
            p,
            s,
            l,
            bases: t.exponent_bases().to_vec(),
            escape_start: Vec::with_capacity(esc_start.len()),
            escape_pos: Vec::with_capacity(esc_pos.len()),
            escape_exponent: Vec::with_capacity(esc_pos.len()),
            escape_row_start: Vec::new(),
            escape_correction: Vec::new(),
        };
        out.escape_start.push(0);
        for (c, added) in added.into_iter().enumerate() {
            let listed = esc_start[c] as usize..esc_start[c + 1] as usize;
            let (pos, exp) = (&esc_pos[listed.clone()], &esc_exp[listed]);
            if added.is_empty() {
                out.escape_pos.extend_from_slice(pos);
                out.escape_exponent.extend_from_slice(exp);
            } else {
                let mut escapes: Vec<(u32, u8)> = pos
                    .iter()
                    .copied()
                    .zip(exp.iter().copied())
                    .chain(added)
                    .collect();
                // Stable: a listed escape (first) wins over an added entry at the same place.
                escapes.sort_by_key(|e| e.0);
                escapes.dedup_by_key(|e| e.0);
                out.escape_pos.extend(escapes.iter().map(|e| e.0));
                out.escape_exponent.extend(escapes.iter().map(|e| e.1));
            }
            out.escape_start.push(out.escape_pos.len() as u32);
        }
        out.index_escapes();
        Ok(out)
    }

    /// The fields of flat value `index` as stored (code 0 for an escape).
    fn fields(&self, index: usize) -> Fields {
        let (_, cols, chunk_rows) = self.dims;
        let c = index / (chunk_rows * cols);
        let i = index - c * chunk_rows * cols;
        let (group, v) = (i / 8, i % 8);
        let q = group * 8 + nibble_position(v);
        let at = c * self.segment;
        let p = nib(&self.p[at..], q) as u32;
        let sbyte = self.s[at + group * 4 + v % 4] as u32;
        let (sign, c3) = if v < 4 {
            (sbyte >> 7, sbyte & 7)
        } else {
            ((sbyte >> 6) & 1, (sbyte >> 3) & 7)
        };
        Fields {
            sign,
            code: c3 << 1 | p >> 3,
            m3: p & 7,
            l4: nib(&self.l[at..], q) as u32,
        }
    }

    /// Fills the per-row escape index and the corrections from the escape list.
    fn index_escapes(&mut self) {
        let (rows, cols, _) = self.dims;
        self.escape_row_start = (0..=rows)
            .map(|r| {
                self.escape_pos
                    .partition_point(|&p| (p as usize) < r * cols) as u32
            })
            .collect();
        self.escape_correction = (0..self.escape_pos.len())
            .map(|k| self.correction(k))
            .collect();
    }

    /// [`DeviceLayout::escape_correction`] of escape `k`.
    fn correction(&self, k: usize) -> [f32; 2] {
        let (_, cols, chunk_rows) = self.dims;
        let index = self.escape_pos[k] as usize;
        let f = self.fields(index);
        let base = self.bases[index / (chunk_rows * cols)] as i32;
        let scale = 2f64.powi(base - SCALED_EXPONENT as i32);
        let e = self.escape_exponent[k] as u32;
        [true, false].map(|exact| {
            let truth = bf16_value(f.bf16_bits(e, exact));
            let placeholder = bf16_value(f.bf16_bits(SCALED_EXPONENT, exact)) * scale;
            (truth - placeholder) as f32
        })
    }

    /// Bytes held: planes, bases and escape lists.
    pub fn bytes_held(&self) -> usize {
        self.p.len()
            + self.s.len()
            + self.l.len()
            + self.bases.len()
            + 4 * self.escape_start.len()
            + 4 * self.escape_row_start.len()
            + 13 * self.escape_pos.len()
    }

    /// Exact BF16 bits of flat value `index`, read back from the device layout the way the
    /// kernels do (scaled exponent, then rebased; escapes patched). The CPU check of the layout.
    pub fn exact_bits(&self, index: usize) -> u16 {
        let (_, cols, chunk_rows) = self.dims;
        let c = index / (chunk_rows * cols);
        let f = self.fields(index);
        let range = self.escape_start[c] as usize..self.escape_start[c + 1] as usize;
        let e = match self.escape_pos[range.clone()].binary_search(&(index as u32)) {
            Ok(k) => self.escape_exponent[range.start + k] as u32,
            Err(_) => self.bases[c] as u32 + f.code,
        };
        f.bf16_bits(e, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jitdelta_format::FloatFormat;
    use proptest::prelude::*;

    /// [`DeviceLayout::from_resident`] as first written: one value at a time, nibble by nibble.
    /// The reference the word-wise re-pack must match byte for byte.
    fn reference(t: &ResidentTensor) -> DeviceLayout {
        let (rows, cols) = t.dims();
        let chunk_rows = t.chunk_rows();
        let segment = t.segment_stride(CODE_BITS);
        let (codes, high, low) = t.planes();
        let (esc_start, esc_pos, esc_exp) = t.escapes();
        let mut out = DeviceLayout {
            dims: (rows, cols, chunk_rows),
            segment,
            p: Vec::new(),
            s: Vec::new(),
            l: Vec::new(),
            bases: t.exponent_bases().to_vec(),
            escape_start: vec![0],
            escape_pos: Vec::new(),
            escape_exponent: Vec::new(),
            escape_row_start: Vec::new(),
            escape_correction: Vec::new(),
        };
        for c in 0..t.chunk_count() {
            let n = t.chunk_len(c);
            let at = c * segment;
            let len = segment.min(codes.len() - at);
            let (cs, hs, ls) = (
                &codes[at..at + len],
                &high[at..at + len],
                &low[at..at + len],
            );
            let base = t.exponent_bases()[c] as u32;
            let offset = c * chunk_rows * cols;
            let listed = esc_start[c] as usize..esc_start[c + 1] as usize;
            let mut escapes: Vec<(u32, u8)> = esc_pos[listed.clone()]
                .iter()
                .zip(&esc_exp[listed])
                .map(|(&p, &e)| (p, e))
                .collect();
            let (mut p, mut s, mut l) = (vec![0u8; len], vec![0u8; len], vec![0u8; len]);
            let edge_window = base == 0 || base + 15 >= 255;
            for i in 0..n {
                let mut code = nib(cs, i) as u32;
                let e = base + code;
                if edge_window && code != 0 && (e == 0 || e == 255) {
                    escapes.push(((offset + i) as u32, e as u8));
                    code = 0;
                } else if edge_window && code == 0 && e == 0 {
                    escapes.push(((offset + i) as u32, 0));
                }
                let (h, lo) = (nib(hs, i) as u32, nib(ls, i) as u32);
                let (group, v) = (i / 8, i % 8);
                let q = group * 8 + nibble_position(v);
                p[q / 2] |= ((((code & 1) << 3) | (h & 7)) << ((q & 1) * 4)) as u8;
                l[q / 2] |= (lo << ((q & 1) * 4)) as u8;
                let (sign, c3) = (h >> 3, code >> 1);
                let byte = group * 4 + v % 4;
                s[byte] |= if v < 4 {
                    (sign << 7 | c3) as u8
                } else {
                    (sign << 6 | c3 << 3) as u8
                };
            }
            escapes.sort_by_key(|e| e.0);
            escapes.dedup_by_key(|e| e.0);
            out.p.extend_from_slice(&p);
            out.s.extend_from_slice(&s);
            out.l.extend_from_slice(&l);
            for (pos, e) in escapes {
                out.escape_pos.push(pos);
                out.escape_exponent.push(e);
            }
            out.escape_start.push(out.escape_pos.len() as u32);
        }
        out.index_escapes();
        out
    }

    /// Every field equal, the f32 corrections bit for bit (NaN included).
    fn assert_same(got: &DeviceLayout, want: &DeviceLayout) {
        fn same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
            assert_eq!(got.len(), want.len(), "{what}: length");
            if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                panic!("{what}[{i}]: {:?}, reference {:?}", got[i], want[i]);
            }
        }
        assert_eq!(got.dims, want.dims);
        assert_eq!(got.segment, want.segment);
        same(&got.p, &want.p, "plane P");
        same(&got.s, &want.s, "plane S");
        same(&got.l, &want.l, "plane L");
        same(&got.bases, &want.bases, "bases");
        same(&got.escape_start, &want.escape_start, "escape_start");
        same(&got.escape_pos, &want.escape_pos, "escape_pos");
        same(
            &got.escape_exponent,
            &want.escape_exponent,
            "escape_exponent",
        );
        same(
            &got.escape_row_start,
            &want.escape_row_start,
            "escape_row_start",
        );
        let bits =
            |c: &[[f32; 2]]| -> Vec<u32> { c.iter().flatten().map(|x| x.to_bits()).collect() };
        same(
            &bits(&got.escape_correction),
            &bits(&want.escape_correction),
            "escape_correction",
        );
    }

    fn check(bits: &[u16], rows: usize, cols: usize, chunk_rows: usize) {
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let t = ResidentTensor::from_exact(FloatFormat::BF16, rows, cols, chunk_rows, 3, &bytes)
            .unwrap();
        assert_same(&DeviceLayout::from_resident(&t).unwrap(), &reference(&t));
    }

    /// BF16 bit patterns that stress the layout: ±0, subnormals, ±inf, NaN payloads, the
    /// exponents next to 0 and 255, trained-like weights, anything.
    fn value() -> impl Strategy<Value = u16> {
        let sign = any::<bool>().prop_map(|s| (s as u16) << 15);
        let mantissa = 0u16..0x80;
        let special = prop_oneof![
            Just(0u16),
            Just(0x7F80),
            Just(0x7FC0),
            1u16..0x80,
            0x7F81u16..0x8000,
            (1u16..16).prop_map(|e| e << 7),
            (240u16..255).prop_map(|e| e << 7),
        ];
        let trained = (118u16..126, mantissa).prop_map(|(e, m)| e << 7 | m);
        (sign, prop_oneof![special, trained, any::<u16>()]).prop_map(|(s, v)| s | (v & 0x7FFF))
    }

    proptest! {
        #[test]
        fn repack_matches_the_scalar_reference(
            bits in prop::collection::vec(value(), 1..700),
            cols in 1usize..70,
            chunk_rows in 1usize..9,
        ) {
            let rows = bits.len() / cols;
            prop_assume!(rows > 0);
            check(&bits[..rows * cols], rows, cols, chunk_rows);
        }

        #[test]
        fn edge_windows_match_the_scalar_reference(
            low in prop::collection::vec(0u16..0x0780, 40..300),
            high in prop::collection::vec(0x7800u16..0x8000, 40..300),
            sign in any::<u16>(),
            cols in 1usize..40,
        ) {
            // Chunks of only tiny values (base 0) or only huge, inf and NaN values (base 240).
            for v in [low, high] {
                let v: Vec<u16> = v.iter().enumerate().map(|(i, b)| b | (sign << (i % 16)) & 0x8000).collect();
                let rows = v.len() / cols;
                if rows > 0 {
                    check(&v[..rows * cols], rows, cols, 3);
                }
            }
        }
    }

    #[test]
    fn every_bf16_pattern_matches_the_scalar_reference() {
        // All 65,536 patterns, in orders that give mixed, tiny-only and huge-only chunks.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let by_exponent: Vec<u16> = {
            let mut v = all.clone();
            v.sort_by_key(|b| (b >> 7) & 0xFF);
            v
        };
        for bits in [&all, &by_exponent] {
            for (cols, chunk_rows) in [(256, 4), (100, 7), (13, 64)] {
                let rows = bits.len() / cols;
                check(&bits[..rows * cols], rows, cols, chunk_rows);
            }
        }
    }
}
