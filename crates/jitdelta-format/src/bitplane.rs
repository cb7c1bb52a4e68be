//! The nested bit-plane kind: base = sign, exponent and the top `d` mantissa bits; residual = the
//! remaining mantissa bits. The exponent is rANS coded (all the redundancy of trained weights is
//! there), the sign/mantissa fields are stored raw (they are incompressible).

use crate::bitpack::{pack, packed_len, unpack};
use crate::float::{store_bits, DraftDtype, FloatFormat};
use crate::rans::{self, DecodeTable, EncodeTable};
use crate::section;
use crate::Result;

/// Histogram of exponent fields of a slice of little-endian values.
pub fn exponent_histogram(format: FloatFormat, bytes: &[u8]) -> [u64; 256] {
    let mut counts = [0u64; 256];
    let m = format.mantissa_bits();
    let mask = format.max_exponent();
    for i in 0..bytes.len() / format.bytes() {
        counts[((format.load(bytes, i) >> m) & mask) as usize] += 1;
    }
    counts
}

/// One encoded chunk: what the draft reads, and what exact decoding adds.
pub struct ChunkBytes {
    /// Base part (read by draft and exact decoding).
    pub base: Vec<u8>,
    /// Residual part (read only by exact decoding).
    pub residual: Vec<u8>,
}

/// Encodes the values of one chunk (`bytes`, little-endian) with `d` draft mantissa bits.
pub fn encode_chunk(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    table: &EncodeTable,
    bytes: &[u8],
) -> Result<ChunkBytes> {
    let n = bytes.len() / format.bytes();
    let mut exps = Vec::with_capacity(n);
    let mut high = Vec::with_capacity(n);
    let mut low = Vec::with_capacity(n);
    for i in 0..n {
        let (e, h, l) = format.split(format.load(bytes, i), d);
        exps.push(e as u8);
        high.push(h);
        low.push(l);
    }
    let mut stream = Vec::new();
    rans::encode(
        &exps,
        None,
        std::slice::from_ref(table),
        block_len,
        &mut stream,
    )?;
    let mut base = Vec::with_capacity(4 + stream.len() + packed_len(n, 1 + d));
    section::write(&mut base, &stream);
    pack(&high, 1 + d, &mut base);
    let mut residual = Vec::with_capacity(packed_len(n, format.mantissa_bits() - d));
    pack(&low, format.mantissa_bits() - d, &mut residual);
    Ok(ChunkBytes { base, residual })
}

/// The parsed base part of a chunk.
struct BaseParts<'a> {
    blocks: Vec<&'a [u8]>,
    high: &'a [u8],
}

fn parse_base<'a>(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    mut base: &'a [u8],
    n: usize,
) -> Result<BaseParts<'a>> {
    let stream = section::read(&mut base, "exponent stream")?;
    let high = section::take(&mut base, packed_len(n, 1 + d), "draft plane")?;
    section::finish(base, "bit-plane base")?;
    let _ = format;
    Ok(BaseParts {
        blocks: rans::blocks(stream, n, block_len)?,
        high,
    })
}

/// Decodes a chunk of `n` values to exact source bits, written little-endian into `out`.
#[allow(clippy::too_many_arguments)]
pub fn decode_exact(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    table: &DecodeTable,
    base: &[u8],
    residual: &[u8],
    n: usize,
    out: &mut [u8],
) -> Result<()> {
    let parts = parse_base(format, d, block_len, base, n)?;
    let low_width = format.mantissa_bits() - d;
    let mut rest = residual;
    let low = section::take(&mut rest, packed_len(n, low_width), "residual plane")?;
    section::finish(rest, "bit-plane residual")?;
    let mut scratch = Scratch::new(block_len.min(n));
    for (b, block) in parts.blocks.iter().enumerate() {
        let first = b * block_len;
        let len = block_len.min(n - first);
        let (exps, high, lows) = scratch.get(len);
        rans::decode_block(block, None, std::slice::from_ref(table), exps)?;
        unpack(parts.high, 1 + d, first, high);
        unpack(low, low_width, first, lows);
        let dst = &mut out[first * format.bytes()..(first + len) * format.bytes()];
        for i in 0..len {
            store_bits(
                format,
                format.join(exps[i] as u32, high[i], lows[i], d),
                dst,
                i,
            );
        }
    }
    Ok(())
}

/// Decodes a chunk's draft values (base only) into `out` as `dtype`.
#[allow(clippy::too_many_arguments)]
pub fn decode_draft(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    table: &DecodeTable,
    base: &[u8],
    n: usize,
    dtype: DraftDtype,
    out: &mut [u8],
) -> Result<()> {
    let parts = parse_base(format, d, block_len, base, n)?;
    let mut scratch = Scratch::new(block_len.min(n));
    for (b, block) in parts.blocks.iter().enumerate() {
        let first = b * block_len;
        let len = block_len.min(n - first);
        let (exps, high, _) = scratch.get(len);
        rans::decode_block(block, None, std::slice::from_ref(table), exps)?;
        unpack(parts.high, 1 + d, first, high);
        let dst = &mut out[first * dtype.bytes()..(first + len) * dtype.bytes()];
        for i in 0..len {
            dtype.store(format, format.draft(exps[i] as u32, high[i], d), dst, i);
        }
    }
    Ok(())
}

/// Per-block buffers, reused across the blocks of a chunk.
pub(crate) struct Scratch {
    exps: Vec<u8>,
    high: Vec<u32>,
    low: Vec<u32>,
}

impl Scratch {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            exps: vec![0; len],
            high: vec![0; len],
            low: vec![0; len],
        }
    }

    pub(crate) fn get(&mut self, len: usize) -> (&mut [u8], &mut [u32], &mut [u32]) {
        (
            &mut self.exps[..len],
            &mut self.high[..len],
            &mut self.low[..len],
        )
    }
}
