//! The resident layout: fixed-length bit planes that JIT layers and GPU kernels read directly.
//!
//! Per weight: a 4-bit exponent code (exponent = the chunk's base exponent + code), a high field
//! (sign and the top `d` mantissa bits) and a low field (the other mantissa bits). For BF16 with
//! `d = 3` the three planes are nibbles: 12 bits a weight, the draft reads 8 of them. Exponents
//! outside a chunk's 16-wide window are escapes: their code is 0 and the true exponent sits in a
//! per-chunk escape list. Every plane segment of a chunk starts 16-byte aligned.

use crate::bitpack::{packed_len, unpack};
use crate::float::{DraftDtype, FloatFormat};
use crate::lanes::{draft, draft_bf16_nibbles, join, join_bf16_nibbles, with_layout, FieldBuffers};
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

/// Where a chunk's fields go while the resident layout is built: its exponent per value
/// (`exps`), and its segments of the high and low planes, exactly `packed_len` bytes each
/// (zeroed; the bits after the last field must stay zero).
pub(crate) struct ChunkFields<'a> {
    pub(crate) exps: &'a mut [u8],
    pub(crate) high: &'a mut [u8],
    pub(crate) low: &'a mut [u8],
}

/// Per-thread buffers of the chunk encoder, reused across the chunks a thread transcodes.
#[derive(Default)]
pub(crate) struct EncodeScratch {
    /// A chunk's exact values, for sources that produce values.
    exact: Vec<u8>,
    /// Field buffers for layouts that are not nibble planes.
    fields: FieldBuffers,
}

impl ChunkFields<'_> {
    /// Fills the fields from the chunk's exact little-endian `values`.
    fn split(self, fields: &mut FieldBuffers, format: FloatFormat, d: u32, values: &[u8]) {
        fields.split(format, d, values, self.exps, self.high, self.low)
    }
}

/// The base of the 16-wide exponent window holding the most values of a histogram of
/// exponents, ties to the lowest base.
fn best_base(format: FloatFormat, hist: &[u64]) -> u8 {
    let top = format.max_exponent() as usize + 1 - WINDOW;
    (0..=top)
        .max_by_key(|&b| {
            (
                hist[b..b + WINDOW].iter().sum::<u64>(),
                std::cmp::Reverse(b),
            )
        })
        .unwrap_or(0) as u8
}

/// Chooses a chunk's base exponent from its exponents and writes its code plane (`codes`, the
/// whole zeroed segment): the 16-wide window holding the most values, ties to the lowest base;
/// exponents outside it get code 0 and are returned as (position in the chunk, exponent).
fn encode_codes(format: FloatFormat, exps: &[u8], codes: &mut [u8]) -> (u8, Vec<(u32, u8)>) {
    let hist = byte_histogram(exps);
    let base = best_base(format, &hist);
    let code = |e: u8| {
        let c = e.wrapping_sub(base);
        if c < WINDOW as u8 {
            c
        } else {
            0
        }
    };
    let mut pairs = exps.chunks_exact(2);
    for (o, p) in codes.iter_mut().zip(&mut pairs) {
        *o = code(p[0]) | code(p[1]) << 4;
    }
    if let [e] = pairs.remainder() {
        codes[exps.len() / 2] = code(*e);
    }
    let inside: u64 = hist[base as usize..base as usize + WINDOW].iter().sum();
    let mut escapes = Vec::new();
    if inside < exps.len() as u64 {
        escapes.reserve_exact(exps.len() - inside as usize);
        // Blocks with no escape (nearly all) are skipped after a check that vectorises.
        const BLOCK: usize = 64;
        for (b, block) in exps.chunks(BLOCK).enumerate() {
            let outside = |e: u8| e.wrapping_sub(base) >= WINDOW as u8;
            if block.iter().fold(false, |any, &e| any | outside(e)) {
                let first = b * BLOCK;
                escapes.extend(
                    (first..)
                        .zip(block)
                        .filter(|&(_, &e)| outside(e))
                        .map(|(i, &e)| (i as u32, e)),
                );
            }
        }
    }
    (base, escapes)
}

/// Histogram of a byte slice (four sub-histograms hide store-to-load stalls).
fn byte_histogram(bytes: &[u8]) -> [u64; 256] {
    let mut h = [[0u32; 256]; 4];
    let mut total = [0u64; 256];
    // Flush the u32 counters before they can overflow.
    for block in bytes.chunks(1 << 30) {
        let mut quads = block.chunks_exact(4);
        for q in &mut quads {
            for (sub, &b) in h.iter_mut().zip(q) {
                sub[b as usize] += 1;
            }
        }
        for &b in quads.remainder() {
            h[0][b as usize] += 1;
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
        Self::from_fields(
            format,
            rows,
            cols,
            chunk_rows,
            draft_bits,
            |c, scratch, out| {
                let start = c * chunk_bytes;
                let values = &bytes[start..start + out.exps.len() * format.bytes()];
                out.split(&mut scratch.fields, format, draft_bits, values);
                Ok(())
            },
        )
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
        Self::from_fields(
            format,
            rows,
            cols,
            chunk_rows,
            draft_bits,
            |c, scratch, out| {
                let EncodeScratch {
                    exact: values,
                    fields,
                } = scratch;
                values.resize(out.exps.len() * format.bytes(), 0);
                exact(c, values)?;
                out.split(fields, format, draft_bits, values);
                Ok(())
            },
        )
    }

    /// Builds the resident layout chunk by chunk from fields: `fill(c, scratch, out)` writes
    /// chunk `c`'s exponents and packed high and low planes into `out` (sized for the chunk).
    /// Chunks are transcoded in parallel, each thread reusing one [`EncodeScratch`], straight
    /// into the tensor's planes.
    pub(crate) fn from_fields(
        format: FloatFormat,
        rows: usize,
        cols: usize,
        chunk_rows: usize,
        draft_bits: u32,
        fill: impl Fn(usize, &mut EncodeScratch, ChunkFields<'_>) -> Result<()> + Sync,
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
        let (full, d) = (chunk_rows * cols, draft_bits);
        let widths = [CODE_BITS, 1 + d, format.mantissa_bits() - d];
        // Every chunk's segment is full-sized but the last one's.
        let [mut codes, mut high, mut low] = widths.map(|w| match count {
            0 => Vec::new(),
            _ => {
                let last = rows - (count - 1) * chunk_rows;
                vec![0u8; (count - 1) * segment_len(full, w) + segment_len(last * cols, w)]
            }
        });
        let stride = widths.map(|w| segment_len(full, w).max(1));
        let chunks: Vec<(u8, Vec<(u32, u8)>)> = codes
            .par_chunks_mut(stride[0])
            .zip(high.par_chunks_mut(stride[1]))
            .zip(low.par_chunks_mut(stride[2]))
            .enumerate()
            .map_init(
                || (Vec::new(), EncodeScratch::default()),
                |(exps, scratch), (c, ((cs, hs), ls))| {
                    let n = chunk_rows.min(rows - c * chunk_rows) * cols;
                    exps.resize(n, 0);
                    let out = ChunkFields {
                        exps,
                        high: &mut hs[..packed_len(n, widths[1])],
                        low: &mut ls[..packed_len(n, widths[2])],
                    };
                    fill(c, scratch, out)?;
                    Ok(encode_codes(format, exps, cs))
                },
            )
            .collect::<Result<_>>()?;
        let mut t = Self {
            format,
            rows,
            cols,
            chunk_rows,
            draft_bits,
            codes,
            high,
            low,
            exponent_base: Vec::with_capacity(count),
            escape_start: Vec::with_capacity(count + 1),
            escape_pos: Vec::new(),
            escape_exponent: Vec::new(),
        };
        t.escape_start.push(0);
        let escapes = chunks.iter().map(|(_, e)| e.len()).sum();
        t.escape_pos.reserve_exact(escapes);
        t.escape_exponent.reserve_exact(escapes);
        for (c, (base, escapes)) in chunks.into_iter().enumerate() {
            t.exponent_base.push(base);
            let offset = (c * full) as u32;
            for (pos, e) in escapes {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitpack::pack;
    use crate::bitplane;
    use crate::huffman::CodeLengths;
    use crate::lanes::{histogram, split};

    /// The resident encoder as it was before chunks were built in place: one chunk at a time,
    /// from exact values through unpacked fields, concatenated. The reference the optimised
    /// builders must match byte for byte.
    fn reference(
        format: FloatFormat,
        rows: usize,
        cols: usize,
        chunk_rows: usize,
        d: u32,
        bytes: &[u8],
    ) -> ResidentTensor {
        let chunk_rows = chunk_rows.min(rows.max(1));
        let count = if cols == 0 {
            0
        } else {
            rows.div_ceil(chunk_rows)
        };
        let mut t = ResidentTensor {
            format,
            rows,
            cols,
            chunk_rows,
            draft_bits: d,
            codes: Vec::new(),
            high: Vec::new(),
            low: Vec::new(),
            exponent_base: Vec::new(),
            escape_start: vec![0],
            escape_pos: Vec::new(),
            escape_exponent: Vec::new(),
        };
        let m = format.mantissa_bits();
        for c in 0..count {
            let n = chunk_rows.min(rows - c * chunk_rows) * cols;
            let start = c * chunk_rows * cols * format.bytes();
            let chunk = &bytes[start..start + n * format.bytes()];
            let hist = with_layout!(format, histogram(chunk));
            let base = best_base(format, &hist);
            let (mut exps, mut high, mut low) = (vec![0u8; n], vec![0u32; n], vec![0u32; n]);
            with_layout!(format, split(chunk, d, &mut exps, &mut high, &mut low));
            let mut codes = Vec::new();
            for (i, &e) in exps.iter().enumerate() {
                let code = e.wrapping_sub(base) as u32;
                if code < WINDOW as u32 {
                    codes.push(code);
                } else {
                    codes.push(0);
                    t.escape_pos.push((c * chunk_rows * cols + i) as u32);
                    t.escape_exponent.push(e);
                }
            }
            for (plane, values, width) in [
                (&mut t.codes, &codes, CODE_BITS),
                (&mut t.high, &high, 1 + d),
                (&mut t.low, &low, m - d),
            ] {
                let at = plane.len();
                pack(values, width, plane);
                plane.resize(at + segment_len(n, width), 0);
            }
            t.exponent_base.push(base);
            t.escape_start.push(t.escape_pos.len() as u32);
        }
        t
    }

    fn assert_same(got: &ResidentTensor, want: &ResidentTensor, what: &str) {
        assert_eq!(got.dims(), want.dims(), "{what}");
        assert_eq!(got.chunk_rows(), want.chunk_rows(), "{what}");
        assert_eq!(got.draft_bits(), want.draft_bits(), "{what}");
        assert_eq!(got.planes(), want.planes(), "{what}: planes");
        assert_eq!(got.exponent_bases(), want.exponent_bases(), "{what}: bases");
        assert_eq!(got.escapes(), want.escapes(), "{what}: escapes");
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
    }

    /// Adversarial values: each row block picks a regime (trained-like exponents, all tiny with
    /// zeros and subnormals, all huge with infinities and NaN payloads, the whole range), and a
    /// fraction of values are specials anyway.
    fn adversarial(format: FloatFormat, n: usize, block: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let (m, max_e) = (format.mantissa_bits(), format.max_exponent());
        let mut regime = 0;
        let mut bits = Vec::with_capacity(n);
        for i in 0..n {
            if i % block.max(1) == 0 {
                regime = rng.next() % 4;
            }
            let r = rng.next();
            let sign = r >> 31;
            let mantissa = rng.next() & ((1 << m) - 1);
            let e = match (regime, r % 16) {
                (_, 0) => 0,                     // ±0 and subnormals
                (_, 1) => max_e,                 // ±inf and NaN payloads
                (0, _) => max_e / 2 - 8 + r % 9, // trained-like
                (1, _) => r % 6,                 // tiny: window at 0
                (2, _) => max_e - r % 6,         // huge: window at the top
                _ => r % (max_e + 1),            // everything
            };
            let mantissa = match r % 64 {
                2 => 0, // exact zeros / infinities
                _ => mantissa,
            };
            bits.push((sign << (m + format.exponent_bits())) | (e << m) | mantissa);
        }
        bits.iter()
            .flat_map(|&v| v.to_le_bytes()[..format.bytes()].to_vec())
            .collect()
    }

    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 1, 1),
        (3, 7, 2),
        (5, 33, 4),
        (16, 32, 16),
        (9, 17, 64),
        (64, 100, 8),
        (130, 64, 64),
        (4, 0, 2),
    ];

    #[test]
    fn builders_match_the_reference_on_adversarial_values() {
        for format in [FloatFormat::BF16, FloatFormat::F16, FloatFormat::F32] {
            for d in 0..format.mantissa_bits() {
                for (seed, &(rows, cols, chunk_rows)) in SHAPES.iter().enumerate() {
                    let block = [1, 7, cols, 64][seed % 4];
                    let bytes = adversarial(format, rows * cols, block, seed as u64);
                    let want = reference(format, rows, cols, chunk_rows, d, &bytes);
                    let what = format!("{format:?} d={d} {rows}x{cols}/{chunk_rows}");
                    let got = ResidentTensor::from_exact(format, rows, cols, chunk_rows, d, &bytes)
                        .unwrap();
                    assert_same(&got, &want, &what);
                    let chunk_bytes = chunk_rows.min(rows) * cols * format.bytes();
                    let got =
                        ResidentTensor::from_chunks(format, rows, cols, chunk_rows, d, |c, out| {
                            let start = c * chunk_bytes;
                            out.copy_from_slice(&bytes[start..start + out.len()]);
                            Ok(())
                        })
                        .unwrap();
                    assert_same(&got, &want, &what);
                }
            }
        }
    }

    /// The at-rest path copies the stored planes: bits after the last field (never written by
    /// the encoder, but a file may hold anything there) must not leak into the layout.
    #[test]
    fn stored_planes_with_dirty_padding_give_the_reference_layout() {
        for format in [FloatFormat::BF16, FloatFormat::F16, FloatFormat::F32] {
            for d in 0..format.mantissa_bits() {
                for (rows, cols) in [(3, 5), (1, 1), (2, 9), (4, 16)] {
                    let n = rows * cols;
                    let bytes = adversarial(format, n, 3, (n as u64) << 8 | d as u64);
                    let hist = with_layout!(format, histogram(&bytes));
                    let lens = CodeLengths::from_counts(&hist);
                    let block_len = 4;
                    let mut chunk =
                        bitplane::encode_chunk(format, d, block_len, &lens.encoder(), &bytes)
                            .unwrap();
                    // The base ends with the high plane; the residual is the low plane.
                    for (plane, width) in [
                        (&mut chunk.base, 1 + d),
                        (&mut chunk.residual, format.mantissa_bits() - d),
                    ] {
                        if n * width as usize % 8 != 0 {
                            *plane.last_mut().unwrap() |= 0xFFu8 << (n * width as usize % 8);
                        }
                    }
                    let decoder = lens.decoder();
                    let got =
                        ResidentTensor::from_fields(format, rows, cols, rows, d, |_, _, out| {
                            bitplane::decode_fields(
                                format,
                                d,
                                block_len,
                                &decoder,
                                &chunk.base,
                                &chunk.residual,
                                n,
                                out,
                            )
                        })
                        .unwrap();
                    let want = reference(format, rows, cols, rows, d, &bytes);
                    assert_same(&got, &want, &format!("{format:?} d={d} {rows}x{cols}"));
                }
            }
        }
    }
}
