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

struct ChunkPlanes {
    p: Vec<u8>,
    s: Vec<u8>,
    l: Vec<u8>,
    escapes: Vec<(u32, u8)>,
}

fn nib(plane: &[u8], i: usize) -> u8 {
    (plane[i / 2] >> ((i & 1) * 4)) & 15
}

impl DeviceLayout {
    /// Re-packs a resident tensor (BF16, three nibble planes).
    pub fn from_resident(t: &ResidentTensor) -> Result<Self> {
        check_supported(t)?;
        let (rows, cols) = t.dims();
        let chunk_rows = t.chunk_rows();
        let segment = t.segment_stride(CODE_BITS);
        let (codes, high, low) = t.planes();
        let (esc_start, esc_pos, esc_exp) = t.escapes();
        let chunks: Vec<ChunkPlanes> = (0..t.chunk_count())
            .into_par_iter()
            .map(|c| {
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
                        // Already the placeholder code; list it so the true bits are restored.
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
                // Stable: a listed escape (pushed first) wins over the placeholder-code entry.
                escapes.sort_by_key(|e| e.0);
                escapes.dedup_by_key(|e| e.0);
                ChunkPlanes { p, s, l, escapes }
            })
            .collect();
        let mut out = Self {
            dims: (rows, cols, chunk_rows),
            segment,
            p: Vec::with_capacity(codes.len()),
            s: Vec::with_capacity(codes.len()),
            l: Vec::with_capacity(codes.len()),
            bases: t.exponent_bases().to_vec(),
            escape_start: vec![0],
            escape_pos: Vec::new(),
            escape_exponent: Vec::new(),
            escape_row_start: Vec::new(),
            escape_correction: Vec::new(),
        };
        for ch in chunks {
            out.p.extend_from_slice(&ch.p);
            out.s.extend_from_slice(&ch.s);
            out.l.extend_from_slice(&ch.l);
            for (pos, e) in ch.escapes {
                out.escape_pos.push(pos);
                out.escape_exponent.push(e);
            }
            out.escape_start.push(out.escape_pos.len() as u32);
        }
        out.escape_row_start = (0..=rows)
            .map(|r| out.escape_pos.partition_point(|&p| (p as usize) < r * cols) as u32)
            .collect();
        out.escape_correction = (0..out.escape_pos.len())
            .map(|k| out.correction(k))
            .collect();
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
