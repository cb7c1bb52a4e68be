//! The resident layout: fixed-length bit planes that JIT layers and GPU kernels read directly.
//!
//! Per weight: a 4-bit exponent code (exponent = the chunk's base exponent + code), a high field
//! (sign and the top `d` mantissa bits) and a low field (the other mantissa bits). For BF16 with
//! `d = 3` the three planes are nibbles: 12 bits a weight, the draft reads 8 of them. Exponents
//! outside a chunk's 16-wide window are escapes: their code is 0 and the true exponent sits in a
//! per-chunk escape list. Every plane segment of a chunk starts 16-byte aligned.

use crate::bitpack::{pack, packed_len, unpack};
use crate::float::{DraftDtype, FloatFormat};
use crate::lanes::{
    draft, draft_bf16_nibbles, histogram, join, join_bf16_nibbles, split, with_layout,
};
use crate::{Error, Result};
use rayon::prelude::*;

/// Width of the exponent code plane.
pub const CODE_BITS: u32 = 4;
const WINDOW: usize = 1 << CODE_BITS;
const ALIGN: usize = 16;

fn segment_len(n: usize, width: u32) -> usize {
    packed_len(n, width).next_multiple_of(ALIGN)
}

/// A tensor held in the resident layout.
#[derive(Clone, Debug)]
pub struct ResidentTensor {
    format: FloatFormat,
    rows: usize,
    cols: usize,
    chunk_rows: usize,
    draft_bits: u32,
    codes: Vec<u8>,
    high: Vec<u8>,
    low: Vec<u8>,
    exponent_base: Vec<u8>,
    escape_start: Vec<u32>,
    escape_pos: Vec<u32>,
    escape_exponent: Vec<u8>,
}

struct ResidentChunk {
    codes: Vec<u8>,
    high: Vec<u8>,
    low: Vec<u8>,
    base: u8,
    escapes: Vec<(u32, u8)>,
}

fn encode_chunk(format: FloatFormat, d: u32, bytes: &[u8]) -> ResidentChunk {
    let n = bytes.len() / format.bytes();
    let m = format.mantissa_bits();
    let hist = with_layout!(format, histogram(bytes));
    let top = format.max_exponent() as usize + 1 - WINDOW;
    let base = (0..=top)
        .max_by_key(|&b| {
            (
                hist[b..b + WINDOW].iter().sum::<u64>(),
                std::cmp::Reverse(b),
            )
        })
        .unwrap_or(0) as u8;
    let (mut exps, mut high, mut low) = (vec![0u8; n], vec![0u32; n], vec![0u32; n]);
    with_layout!(format, split(bytes, d, &mut exps, &mut high, &mut low));
    let mut escapes = Vec::new();
    let codes: Vec<u32> = exps
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let code = e.wrapping_sub(base) as u32;
            if code < WINDOW as u32 {
                code
            } else {
                escapes.push((i as u32, e));
                0
            }
        })
        .collect();
    let mut planes = [Vec::new(), Vec::new(), Vec::new()];
    for (plane, (values, width)) in
        planes
            .iter_mut()
            .zip([(&codes, CODE_BITS), (&high, 1 + d), (&low, m - d)])
    {
        pack(values, width, plane);
        plane.resize(segment_len(n, width), 0);
    }
    let [codes, high, low] = planes;
    ResidentChunk {
        codes,
        high,
        low,
        base,
        escapes,
    }
}

impl ResidentTensor {
    /// Builds the resident layout from exact little-endian values of a `rows x cols` tensor.
    pub fn from_exact(
        format: FloatFormat,
        rows: usize,
        cols: usize,
        chunk_rows: usize,
        draft_bits: u32,
        bytes: &[u8],
    ) -> Result<Self> {
        let expected = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(format.bytes()))
            .ok_or_else(|| Error::InvalidOption("tensor too large".into()))?;
        check_len(bytes, expected)?;
        let chunk_bytes = chunk_rows.saturating_mul(cols * format.bytes());
        Self::from_chunks(format, rows, cols, chunk_rows, draft_bits, |c, out| {
            out.copy_from_slice(&bytes[c * chunk_bytes..c * chunk_bytes + out.len()]);
            Ok(())
        })
    }

    /// Builds the resident layout chunk by chunk: `exact(c, out)` fills chunk `c`'s exact
    /// little-endian values. Chunks are transcoded in parallel; only one chunk per thread is
    /// ever decoded at a time.
    pub fn from_chunks(
        format: FloatFormat,
        rows: usize,
        cols: usize,
        chunk_rows: usize,
        draft_bits: u32,
        exact: impl Fn(usize, &mut [u8]) -> Result<()> + Sync,
    ) -> Result<Self> {
        format.check_draft_bits(draft_bits)?;
        if chunk_rows == 0 {
            return Err(Error::InvalidOption("chunk_rows must be at least 1".into()));
        }
        let chunk_rows = chunk_rows.min(rows.max(1));
        let count = if cols == 0 {
            0
        } else {
            rows.div_ceil(chunk_rows)
        };
        let chunks: Vec<ResidentChunk> = (0..count)
            .into_par_iter()
            .map(|c| {
                let n = chunk_rows.min(rows - c * chunk_rows) * cols;
                let mut buf = vec![0u8; n * format.bytes()];
                exact(c, &mut buf)?;
                Ok(encode_chunk(format, draft_bits, &buf))
            })
            .collect::<Result<_>>()?;
        let mut t = Self {
            format,
            rows,
            cols,
            chunk_rows,
            draft_bits,
            codes: Vec::new(),
            high: Vec::new(),
            low: Vec::new(),
            exponent_base: Vec::new(),
            escape_start: vec![0],
            escape_pos: Vec::new(),
            escape_exponent: Vec::new(),
        };
        for (c, chunk) in chunks.into_iter().enumerate() {
            t.codes.extend_from_slice(&chunk.codes);
            t.high.extend_from_slice(&chunk.high);
            t.low.extend_from_slice(&chunk.low);
            t.exponent_base.push(chunk.base);
            let offset = (c * chunk_rows * cols) as u32;
            for (pos, e) in chunk.escapes {
                t.escape_pos.push(offset + pos);
                t.escape_exponent.push(e);
            }
            t.escape_start.push(t.escape_pos.len() as u32);
        }
        Ok(t)
    }

    /// Source float format.
    pub fn format(&self) -> FloatFormat {
        self.format
    }

    /// `(rows, cols)`: all leading dimensions flattened into rows.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Rows per chunk (the last chunk may be shorter).
    pub fn chunk_rows(&self) -> usize {
        self.chunk_rows
    }

    /// Mantissa bits in the high (draft) plane.
    pub fn draft_bits(&self) -> u32 {
        self.draft_bits
    }

    /// Number of row chunks.
    pub fn chunk_count(&self) -> usize {
        self.exponent_base.len()
    }

    /// Number of weights whose exponent is outside their chunk's window.
    pub fn escape_count(&self) -> usize {
        self.escape_pos.len()
    }

    /// Bytes an exact decode reads: all planes, bases and escapes.
    pub fn bytes_held(&self) -> usize {
        self.codes.len()
            + self.high.len()
            + self.low.len()
            + self.exponent_base.len()
            + self.escape_start.len() * 4
            + self.escape_pos.len() * 5
    }

    /// Bytes a draft decode reads (no low plane).
    pub fn draft_bytes(&self) -> usize {
        self.bytes_held() - self.low.len()
    }

    /// The exponent-code, high and low planes of the whole tensor (chunk segments in order).
    pub fn planes(&self) -> (&[u8], &[u8], &[u8]) {
        (&self.codes, &self.high, &self.low)
    }

    /// Base exponent of each chunk.
    pub fn exponent_bases(&self) -> &[u8] {
        &self.exponent_base
    }

    /// Escapes as (CSR start per chunk, flat position in the tensor, true exponent).
    pub fn escapes(&self) -> (&[u32], &[u32], &[u8]) {
        (&self.escape_start, &self.escape_pos, &self.escape_exponent)
    }

    /// Bytes from one chunk's segment of a `width`-bit plane to the next chunk's (16-byte
    /// aligned; the last chunk's segment may be shorter).
    pub fn segment_stride(&self, width: u32) -> usize {
        segment_len(self.chunk_rows * self.cols, width)
    }

    /// Values in chunk `c`.
    pub fn chunk_len(&self, c: usize) -> usize {
        let first = c * self.chunk_rows;
        self.chunk_rows.min(self.rows.saturating_sub(first)) * self.cols
    }

    /// Chunk `c`'s segments of the code, high and low planes, and its value count.
    fn segments(&self, c: usize) -> Result<ChunkSegments<'_>> {
        if c >= self.chunk_count() {
            return Err(Error::ChunkOutOfRange {
                tensor: "resident".into(),
                index: c,
                count: self.chunk_count(),
            });
        }
        let full = self.chunk_rows * self.cols;
        let n = self.chunk_len(c);
        let m = self.format.mantissa_bits();
        let d = self.draft_bits;
        fn seg(plane: &[u8], c: usize, full: usize, n: usize, width: u32) -> &[u8] {
            let start = c * segment_len(full, width);
            &plane[start..start + segment_len(n, width)]
        }
        Ok((
            seg(&self.codes, c, full, n, CODE_BITS),
            seg(&self.high, c, full, n, 1 + d),
            seg(&self.low, c, full, n, m - d),
            n,
        ))
    }

    fn chunk_escapes(&self, c: usize) -> impl Iterator<Item = (usize, u32)> + '_ {
        let range = self.escape_start[c] as usize..self.escape_start[c + 1] as usize;
        let offset = c * self.chunk_rows * self.cols;
        self.escape_pos[range.clone()]
            .iter()
            .zip(&self.escape_exponent[range])
            .map(move |(&p, &e)| (p as usize - offset, e as u32))
    }

    /// Decodes chunk `c` to exact source bits (little-endian) in `out`.
    pub fn decode_chunk_exact(&self, c: usize, out: &mut [u8]) -> Result<()> {
        let (codes, high, low, n) = self.segments(c)?;
        let f = self.format;
        check_len(out, n * f.bytes())?;
        let d = self.draft_bits;
        let e = self.chunk_exponents(c, codes, n);
        if f == FloatFormat::BF16 && d == 3 {
            join_bf16_nibbles(&e, high, low, out);
            return Ok(());
        }
        let (mut h, mut l) = (vec![0u32; n], vec![0u32; n]);
        unpack(high, 1 + d, 0, &mut h);
        unpack(low, f.mantissa_bits() - d, 0, &mut l);
        with_layout!(f, join(&e, &h, &l, d, out));
        Ok(())
    }

    /// Decodes chunk `c`'s draft values (exponent and high plane only) into `out` as `dtype`.
    pub fn decode_chunk_draft(&self, c: usize, dtype: DraftDtype, out: &mut [u8]) -> Result<()> {
        let (codes, high, _, n) = self.segments(c)?;
        let f = self.format;
        check_len(out, n * dtype.bytes())?;
        let d = self.draft_bits;
        let e = self.chunk_exponents(c, codes, n);
        if f == FloatFormat::BF16 && d == 3 {
            draft_bf16_nibbles(&e, high, dtype, out);
            return Ok(());
        }
        let mut h = vec![0u32; n];
        unpack(high, 1 + d, 0, &mut h);
        with_layout!(f, draft(&e, &h, d, dtype, out));
        Ok(())
    }

    /// True exponents of chunk `c`: base + code, escapes patched in.
    fn chunk_exponents(&self, c: usize, codes: &[u8], n: usize) -> Vec<u8> {
        let base = self.exponent_base[c];
        let mut e = vec![0u8; n];
        let mut pairs = e.chunks_exact_mut(2);
        for (p, &b) in (&mut pairs).zip(codes) {
            p[0] = base.wrapping_add(b & 15);
            p[1] = base.wrapping_add(b >> 4);
        }
        if let [last] = pairs.into_remainder() {
            *last = base.wrapping_add(codes[n / 2] & 15);
        }
        for (p, exponent) in self.chunk_escapes(c) {
            e[p] = exponent as u8;
        }
        e
    }

    /// Decodes the whole tensor, exact, in parallel over chunks.
    pub fn decode_exact(&self, out: &mut [u8]) -> Result<()> {
        let per_chunk = self.chunk_rows * self.cols * self.format.bytes();
        check_len(out, self.rows * self.cols * self.format.bytes())?;
        out.par_chunks_mut(per_chunk.max(1))
            .enumerate()
            .try_for_each(|(c, o)| self.decode_chunk_exact(c, o))
    }

    /// Decodes the whole tensor's draft values, in parallel over chunks.
    pub fn decode_draft(&self, dtype: DraftDtype, out: &mut [u8]) -> Result<()> {
        let per_chunk = self.chunk_rows * self.cols * dtype.bytes();
        check_len(out, self.rows * self.cols * dtype.bytes())?;
        out.par_chunks_mut(per_chunk.max(1))
            .enumerate()
            .try_for_each(|(c, o)| self.decode_chunk_draft(c, dtype, o))
    }
}

/// (code plane, high plane, low plane, values) of one chunk.
type ChunkSegments<'a> = (&'a [u8], &'a [u8], &'a [u8], usize);

pub(crate) fn check_len(out: &[u8], expected: usize) -> Result<()> {
    if out.len() == expected {
        Ok(())
    } else {
        Err(Error::BufferSize {
            expected,
            got: out.len(),
        })
    }
}
