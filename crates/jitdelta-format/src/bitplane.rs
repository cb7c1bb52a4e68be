//! The nested bit-plane kind: base = sign, exponent and the top `d` mantissa bits; residual = the
//! remaining mantissa bits. The exponent is Huffman coded (all the redundancy of trained weights is
//! there), the sign/mantissa fields are stored raw (they are incompressible).

use crate::bitpack::{clear_padding, packed_len, unpack};
use crate::float::{DraftDtype, FloatFormat};
use crate::huffman::{self, HuffmanDecoder, HuffmanEncoder};
use crate::lanes::{
    draft, draft_bf16_nibbles, histogram, join, join_bf16_nibbles, with_layout, FieldBuffers,
};
use crate::resident::ChunkFields;
use crate::section;
use crate::Result;

/// Histogram of exponent fields of a slice of little-endian values.
pub fn exponent_histogram(format: FloatFormat, bytes: &[u8]) -> [u64; 256] {
    with_layout!(format, histogram(bytes))
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
    table: &HuffmanEncoder,
    bytes: &[u8],
) -> Result<ChunkBytes> {
    let n = bytes.len() / format.bytes();
    let mut exps = vec![0u8; n];
    let mut high_plane = vec![0u8; packed_len(n, 1 + d)];
    let mut residual = vec![0u8; packed_len(n, format.mantissa_bits() - d)];
    let mut fields = FieldBuffers::default();
    fields.split(format, d, bytes, &mut exps, &mut high_plane, &mut residual);
    let mut stream = Vec::new();
    huffman::encode(&exps, table, block_len, &mut stream)?;
    let mut base = Vec::with_capacity(4 + stream.len() + high_plane.len());
    section::write(&mut base, &stream);
    base.extend_from_slice(&high_plane);
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
        blocks: huffman::blocks(stream, n, block_len)?,
        high,
    })
}

/// A whole chunk's sections: the base's parts, the residual's low plane and its bit width.
fn parse_chunk<'a>(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    base: &'a [u8],
    residual: &'a [u8],
    n: usize,
) -> Result<(BaseParts<'a>, &'a [u8], u32)> {
    let parts = parse_base(format, d, block_len, base, n)?;
    let low_width = format.mantissa_bits() - d;
    let mut rest = residual;
    let low = section::take(&mut rest, packed_len(n, low_width), "residual plane")?;
    section::finish(rest, "bit-plane residual")?;
    Ok((parts, low, low_width))
}

/// Decodes a chunk of `n` values to exact source bits, written little-endian into `out`.
#[allow(clippy::too_many_arguments)]
pub fn decode_exact(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    table: &HuffmanDecoder,
    base: &[u8],
    residual: &[u8],
    n: usize,
    out: &mut [u8],
) -> Result<()> {
    let (parts, low, low_width) = parse_chunk(format, d, block_len, base, residual, n)?;
    let mut scratch = Scratch::new(block_len.min(n));
    for (b, block) in parts.blocks.iter().enumerate() {
        let first = b * block_len;
        let len = block_len.min(n - first);
        huffman::decode_block(block, table, scratch.exps(len))?;
        let dst = &mut out[first * format.bytes()..(first + len) * format.bytes()];
        if format == FloatFormat::BF16 && d == 3 && block_len % 2 == 0 {
            let exps = scratch.exps(len);
            join_bf16_nibbles(exps, &parts.high[first / 2..], &low[first / 2..], dst);
            continue;
        }
        let (exps, high, lows) = scratch.get(len);
        unpack(parts.high, 1 + d, first, high);
        unpack(low, low_width, first, lows);
        with_layout!(format, join(exps, high, lows, d, dst));
    }
    Ok(())
}

/// Decodes a chunk of `n` values into its fields without assembling values: the exponents
/// (Huffman decoded), and the high and low planes copied as stored, which is how the resident
/// layout with the same `d` packs them too. Checks the chunk like [`decode_exact`]; the bits
/// after the last field of each plane are cleared, as packing leaves them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_fields(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    table: &HuffmanDecoder,
    base: &[u8],
    residual: &[u8],
    n: usize,
    out: ChunkFields<'_>,
) -> Result<()> {
    let (parts, low, low_width) = parse_chunk(format, d, block_len, base, residual, n)?;
    for (b, block) in parts.blocks.iter().enumerate() {
        let first = b * block_len;
        let len = block_len.min(n - first);
        huffman::decode_block(block, table, &mut out.exps[first..first + len])?;
    }
    for (dst, src, width) in [(out.high, parts.high, 1 + d), (out.low, low, low_width)] {
        dst.copy_from_slice(src);
        clear_padding(dst, n, width);
    }
    Ok(())
}

/// Decodes a chunk's draft values (base only) into `out` as `dtype`.
#[allow(clippy::too_many_arguments)]
pub fn decode_draft(
    format: FloatFormat,
    d: u32,
    block_len: usize,
    table: &HuffmanDecoder,
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
        huffman::decode_block(block, table, scratch.exps(len))?;
        let dst = &mut out[first * dtype.bytes()..(first + len) * dtype.bytes()];
        if format == FloatFormat::BF16 && d == 3 && block_len % 2 == 0 {
            draft_bf16_nibbles(scratch.exps(len), &parts.high[first / 2..], dtype, dst);
            continue;
        }
        let (exps, high, _) = scratch.get(len);
        unpack(parts.high, 1 + d, first, high);
        with_layout!(format, draft(exps, high, d, dtype, dst));
    }
    Ok(())
}

/// Per-block buffers, reused across the blocks of a chunk; field buffers are only allocated
/// by the paths that unpack fields.
pub(crate) struct Scratch {
    exps: Vec<u8>,
    high: Vec<u32>,
    low: Vec<u32>,
}

impl Scratch {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            exps: vec![0; len],
            high: Vec::new(),
            low: Vec::new(),
        }
    }

    pub(crate) fn get(&mut self, len: usize) -> (&mut [u8], &mut [u32], &mut [u32]) {
        if self.high.len() < len {
            self.high.resize(len, 0);
            self.low.resize(len, 0);
        }
        (
            &mut self.exps[..len],
            &mut self.high[..len],
            &mut self.low[..len],
        )
    }

    pub(crate) fn exps(&mut self, len: usize) -> &mut [u8] {
        &mut self.exps[..len]
    }
}
