//! The affine int4 kind: per group of `G` weights along a row, `lo` and `scale` (stored in the
//! source dtype) and a 4-bit code `q` per weight; the base value is `lo + q * scale` computed in
//! f32 and rounded to the source dtype. The residual is the integer difference between the
//! original bit pattern and the base's, rANS coded with one table per code; differences outside
//! ±127 (sign flips near zero, non-finite values, huge ranges) escape to the raw bits.
//!
//! It wins on weights that already sit on a 4-bit grid (a dequantized GGUF): most residuals are 0.

use crate::float::{store_bits, DraftDtype, FloatFormat};
use crate::rans::{self, DecodeTable, EncodeTable};
use crate::{section, Error, Result};

/// Number of distinct codes.
pub const CODES: usize = 16;
const ESCAPE: u8 = 255;
const MAX_DELTA: i64 = 127;

/// A chunk quantized against its groups.
pub struct Quantized {
    /// `(lo, scale)` raw bits per group.
    pub params: Vec<(u32, u32)>,
    /// Code per weight.
    pub codes: Vec<u8>,
    /// Residual symbol per weight (`delta + 127`, or 255 for an escape).
    pub residuals: Vec<u8>,
    /// Raw bits of the escaped weights, in order.
    pub escapes: Vec<u32>,
}

#[inline]
fn base_bits(format: FloatFormat, lo: f32, scale: f32, q: u8) -> u32 {
    format.from_f32(lo + q as f32 * scale)
}

fn group_params(format: FloatFormat, bytes: &[u8], first: usize, len: usize) -> (u32, u32) {
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for i in first..first + len {
        let v = format.to_f32(format.load(bytes, i));
        if v.is_finite() {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if lo > hi {
        return (0, 0);
    }
    let lo_bits = format.from_f32(lo);
    let scale_bits = format.from_f32((hi - format.to_f32(lo_bits)) / 15.0);
    (lo_bits, scale_bits)
}

/// Quantizes a chunk of `rows x cols` values with groups of `group` along each row.
pub fn quantize(format: FloatFormat, group: usize, cols: usize, bytes: &[u8]) -> Quantized {
    let n = bytes.len() / format.bytes();
    let width_mask: u64 = if format.bytes() == 2 {
        0xFFFF
    } else {
        0xFFFF_FFFF
    };
    let sign_bit = (width_mask + 1) >> 1;
    let mut out = Quantized {
        params: Vec::new(),
        codes: Vec::with_capacity(n),
        residuals: Vec::with_capacity(n),
        escapes: Vec::new(),
    };
    let rows = n.checked_div(cols).unwrap_or(0);
    for r in 0..rows {
        let mut c0 = 0;
        while c0 < cols {
            let len = group.min(cols - c0);
            let first = r * cols + c0;
            let (lo_bits, scale_bits) = group_params(format, bytes, first, len);
            out.params.push((lo_bits, scale_bits));
            let lo = format.to_f32(lo_bits);
            let scale = format.to_f32(scale_bits);
            let inv_scale = 1.0 / scale;
            let table: [u32; CODES] =
                std::array::from_fn(|q| base_bits(format, lo, scale, q as u8));
            for i in first..first + len {
                let bits = format.load(bytes, i);
                let v = format.to_f32(bits);
                // Rounds half up; `as` saturates, so NaN and negatives give 0.
                let q = if v.is_finite() && scale > 0.0 && scale.is_finite() {
                    (((v - lo) * inv_scale + 0.5) as u32).min(15) as u8
                } else {
                    0
                };
                let diff = (bits as u64).wrapping_sub(table[q as usize] as u64) & width_mask;
                let delta = if diff & sign_bit != 0 {
                    diff as i64 - (width_mask as i64 + 1)
                } else {
                    diff as i64
                };
                out.codes.push(q);
                if delta.abs() <= MAX_DELTA {
                    out.residuals.push((delta + MAX_DELTA) as u8);
                } else {
                    out.residuals.push(ESCAPE);
                    out.escapes.push(bits);
                }
            }
            c0 += len;
        }
    }
    out
}

/// Histograms of codes and of residual symbols per code.
pub fn histograms(q: &Quantized) -> ([u64; CODES], Vec<[u64; 256]>) {
    let mut codes = [0u64; CODES];
    let mut residuals = vec![[0u64; 256]; CODES];
    for (&c, &r) in q.codes.iter().zip(&q.residuals) {
        codes[c as usize] += 1;
        residuals[c as usize][r as usize] += 1;
    }
    (codes, residuals)
}

/// Encoder tables of one tensor.
pub struct AffineEncoder<'a> {
    /// Table for codes.
    pub codes: &'a EncodeTable,
    /// One residual table per code.
    pub residuals: &'a [EncodeTable],
}

/// Encodes a quantized chunk.
pub fn encode_chunk(
    format: FloatFormat,
    block_len: usize,
    tables: &AffineEncoder<'_>,
    q: &Quantized,
) -> Result<crate::bitplane::ChunkBytes> {
    let bytes = format.bytes();
    let mut base = Vec::with_capacity(q.params.len() * 2 * bytes + q.codes.len() / 2);
    for &(lo, scale) in &q.params {
        base.extend_from_slice(&lo.to_le_bytes()[..bytes]);
        base.extend_from_slice(&scale.to_le_bytes()[..bytes]);
    }
    let mut stream = Vec::new();
    rans::encode(
        &q.codes,
        None,
        std::slice::from_ref(tables.codes),
        block_len,
        &mut stream,
    )?;
    section::write(&mut base, &stream);
    stream.clear();
    rans::encode(
        &q.residuals,
        Some(&q.codes),
        tables.residuals,
        block_len,
        &mut stream,
    )?;
    let mut residual = Vec::with_capacity(4 + stream.len() + q.escapes.len() * bytes);
    section::write(&mut residual, &stream);
    for &e in &q.escapes {
        residual.extend_from_slice(&e.to_le_bytes()[..bytes]);
    }
    Ok(crate::bitplane::ChunkBytes { base, residual })
}

/// Decoder tables of one tensor.
pub struct AffineDecoder<'a> {
    /// Table for codes.
    pub codes: &'a DecodeTable,
    /// One residual table per code.
    pub residuals: &'a [DecodeTable],
}

/// Geometry of a chunk.
#[derive(Clone, Copy)]
pub struct ChunkShape {
    /// Values in the chunk.
    pub n: usize,
    /// Values per row.
    pub cols: usize,
    /// Group length along a row.
    pub group: usize,
}

impl ChunkShape {
    fn groups(&self) -> usize {
        self.n.checked_div(self.cols).unwrap_or(0) * self.cols.div_ceil(self.group)
    }

    /// Group index of value `i`.
    #[inline]
    fn group_of(&self, i: usize) -> usize {
        let per_row = self.cols.div_ceil(self.group);
        (i / self.cols) * per_row + (i % self.cols) / self.group
    }
}

struct Base {
    params: Vec<(f32, f32)>,
    codes: Vec<u8>,
}

fn decode_base(
    format: FloatFormat,
    block_len: usize,
    tables: &AffineDecoder<'_>,
    mut base: &[u8],
    shape: ChunkShape,
) -> Result<Base> {
    let bytes = format.bytes();
    let raw = section::take(&mut base, shape.groups() * 2 * bytes, "group parameters")?;
    let params = raw
        .chunks_exact(2 * bytes)
        .map(|p| {
            (
                format.to_f32(format.load(p, 0)),
                format.to_f32(format.load(p, 1)),
            )
        })
        .collect();
    let stream = section::read(&mut base, "code stream")?;
    section::finish(base, "affine base")?;
    let mut codes = vec![0u8; shape.n];
    rans::decode(
        stream,
        None,
        std::slice::from_ref(tables.codes),
        block_len,
        &mut codes,
    )?;
    if codes.iter().any(|&c| c as usize >= CODES) {
        return Err(Error::corrupt("affine code out of range"));
    }
    Ok(Base { params, codes })
}

/// Decodes a chunk to exact source bits.
pub fn decode_exact(
    format: FloatFormat,
    block_len: usize,
    tables: &AffineDecoder<'_>,
    base: &[u8],
    residual: &[u8],
    shape: ChunkShape,
    out: &mut [u8],
) -> Result<()> {
    let b = decode_base(format, block_len, tables, base, shape)?;
    let mut rest = residual;
    let stream = section::read(&mut rest, "residual stream")?;
    let mut symbols = vec![0u8; shape.n];
    rans::decode(
        stream,
        Some(&b.codes),
        tables.residuals,
        block_len,
        &mut symbols,
    )?;
    let bytes = format.bytes();
    let escapes = symbols.iter().filter(|&&s| s == ESCAPE).count();
    let raw = section::take(&mut rest, escapes * bytes, "escaped values")?;
    section::finish(rest, "affine residual")?;
    let mut next_escape = 0;
    for (i, &symbol) in symbols.iter().enumerate() {
        let bits = if symbol == ESCAPE {
            next_escape += 1;
            format.load(raw, next_escape - 1)
        } else {
            let (lo, scale) = b.params[shape.group_of(i)];
            let base = base_bits(format, lo, scale, b.codes[i]) as i64;
            (base + symbol as i64 - MAX_DELTA) as u32 & (u32::MAX >> (32 - 8 * bytes))
        };
        store_bits(format, bits, out, i);
    }
    Ok(())
}

/// Decodes a chunk's draft values (`lo + q * scale`).
pub fn decode_draft(
    format: FloatFormat,
    block_len: usize,
    tables: &AffineDecoder<'_>,
    base: &[u8],
    shape: ChunkShape,
    dtype: DraftDtype,
    out: &mut [u8],
) -> Result<()> {
    let b = decode_base(format, block_len, tables, base, shape)?;
    for i in 0..shape.n {
        let (lo, scale) = b.params[shape.group_of(i)];
        dtype.store(format, base_bits(format, lo, scale, b.codes[i]), out, i);
    }
    Ok(())
}
