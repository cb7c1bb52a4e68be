//! The container: header, index and footer, and the validation every reader applies.
//!
//! ```text
//! offset 0      "JITDELTA" (8 bytes), version u32 LE, reserved u32 (0)
//! offset 16     blobs: chunk parts, stored tensors, auxiliary files, in any order
//! index_offset  index: UTF-8 JSON (`Index`)
//! len - 32      footer: index_offset u64, index_len u64, index_crc32 u32, version u32, "JDFOOTER"
//! ```

use crate::huffman::CodeLengths;
use crate::rans::FrequencyTable;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Magic bytes at the start of every file.
pub const MAGIC: &[u8; 8] = b"JITDELTA";
/// Magic bytes at the end of every file.
pub const FOOTER_MAGIC: &[u8; 8] = b"JDFOOTER";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;
/// Header length.
pub const HEADER_LEN: u64 = 16;
/// Footer length.
pub const FOOTER_LEN: u64 = 32;
/// Largest `chunk_rows` a file may declare.
pub const MAX_CHUNK_ROWS: u64 = 1 << 32;
/// Largest entropy-coded block a file may declare, in symbols.
pub const MAX_BLOCK_LEN: u32 = 1 << 24;
/// Largest affine group: with at least two stored values per group, an affine chunk holds at
/// most 512 values per byte, which bounds what a decoder allocates by the file's size.
pub const MAX_GROUP_SIZE: u32 = 1024;
/// zstd cannot expand a frame by more than this (a 128 KiB RLE block costs 4 bytes).
const ZSTD_MAX_RATIO: u64 = 1 << 15;

/// The index: everything needed to find and decode every tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Index {
    /// Source shards, in order (one entry for a single-file model).
    pub shards: Vec<Shard>,
    /// Tensors, in the order they were written.
    pub tensors: Vec<TensorEntry>,
    /// Files kept alongside the weights (config.json, tokenizer.json, ...).
    pub files: Vec<AuxFile>,
}

/// One source safetensors file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Shard {
    /// File name, relative to the model folder.
    pub name: String,
    /// The safetensors `__metadata__` map, if the file had one.
    pub metadata: Option<BTreeMap<String, String>>,
    /// The original safetensors JSON header, byte for byte, so that decompression gives back
    /// an identical file (absent: a canonical header is written instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<StoredBlob>,
}

/// An auxiliary file stored verbatim (zstd-compressed where that pays).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AuxFile {
    /// Relative path inside the model folder (forward slashes, no `..`).
    pub name: String,
    /// Where its bytes live.
    pub blob: StoredBlob,
}

/// Bytes stored whole, optionally zstd-compressed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredBlob {
    /// Absolute file offset.
    pub offset: u64,
    /// Stored length.
    pub len: u64,
    /// Length after decompression.
    pub raw_len: u64,
    /// CRC-32 (IEEE) of the stored bytes.
    pub crc32: u32,
    /// Whether the stored bytes are a zstd frame.
    pub zstd: bool,
}

/// One tensor.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype name (`BF16`, `F16`, `F32`, `I64`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// Index of the shard it came from.
    pub shard: u32,
    /// How its bytes are encoded.
    pub encoding: Encoding,
}

/// How a tensor is encoded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Encoding {
    /// Stored whole (non-float tensors, rank 0/1, anything not split).
    Stored {
        /// The bytes.
        blob: StoredBlob,
    },
    /// Nested bit planes.
    Bitplane {
        /// Split geometry.
        chunking: Chunking,
        /// Mantissa bits kept in the draft plane.
        draft_mantissa_bits: u32,
        /// Exponent code lengths, shared by every chunk.
        exponent_code: CodeLengths,
    },
    /// Affine int4 base plus per-code residual.
    Affine {
        /// Split geometry.
        chunking: Chunking,
        /// Group length along a row.
        group_size: u32,
        /// Code frequency table.
        code_table: FrequencyTable,
        /// Residual frequency table per code (16 tables).
        residual_tables: Vec<FrequencyTable>,
    },
}

/// Geometry shared by the chunked kinds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Chunking {
    /// Rows per chunk (rows = product of all dimensions but the last).
    pub chunk_rows: u64,
    /// Symbols per entropy-coded block.
    pub block_len: u32,
    /// Chunk locations: `[offset, base_len, residual_len, base_crc32, residual_crc32]`.
    pub chunks: Vec<ChunkEntry>,
}

/// Where a chunk's two parts live; the residual follows the base directly.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(from = "[u64; 5]", into = "[u64; 5]")]
pub struct ChunkEntry {
    /// Absolute offset of the base part.
    pub offset: u64,
    /// Base part length.
    pub base_len: u64,
    /// Residual part length.
    pub residual_len: u64,
    /// CRC-32 of the base part.
    pub base_crc32: u32,
    /// CRC-32 of the residual part.
    pub residual_crc32: u32,
}

impl From<[u64; 5]> for ChunkEntry {
    fn from(a: [u64; 5]) -> Self {
        Self {
            offset: a[0],
            base_len: a[1],
            residual_len: a[2],
            base_crc32: a[3] as u32,
            residual_crc32: a[4] as u32,
        }
    }
}

impl From<ChunkEntry> for [u64; 5] {
    fn from(c: ChunkEntry) -> Self {
        [
            c.offset,
            c.base_len,
            c.residual_len,
            c.base_crc32 as u64,
            c.residual_crc32 as u64,
        ]
    }
}

/// Bytes per element of a safetensors dtype name.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

impl TensorEntry {
    /// Number of elements, checked for overflow.
    pub fn numel(&self) -> Result<usize> {
        self.shape.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d)
                .ok()
                .and_then(|d| acc.checked_mul(d))
                .ok_or_else(|| Error::corrupt(format!("tensor `{}` shape overflows", self.name)))
        })
    }

    /// Decoded size in bytes, checked for overflow.
    pub fn byte_len(&self) -> Result<usize> {
        let size = dtype_size(&self.dtype).ok_or_else(|| {
            Error::UnsupportedDtype(format!("{} (tensor `{}`)", self.dtype, self.name))
        })?;
        self.numel()?
            .checked_mul(size)
            .ok_or_else(|| Error::corrupt(format!("tensor `{}` size overflows", self.name)))
    }

    /// `(rows, cols)` with all leading dimensions folded into rows.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let n = self.numel()?;
        let cols = self.shape.last().copied().unwrap_or(1) as usize;
        Ok(n.checked_div(cols).map_or((0, 0), |rows| (rows, cols)))
    }
}

/// The parsed footer.
pub struct Footer {
    /// Where the index starts.
    pub index_offset: u64,
    /// Index length.
    pub index_len: u64,
    /// CRC-32 of the index.
    pub index_crc32: u32,
}

/// Builds the footer bytes.
pub fn footer_bytes(index_offset: u64, index_len: u64, index_crc32: u32) -> [u8; 32] {
    let mut f = [0u8; 32];
    f[0..8].copy_from_slice(&index_offset.to_le_bytes());
    f[8..16].copy_from_slice(&index_len.to_le_bytes());
    f[16..20].copy_from_slice(&index_crc32.to_le_bytes());
    f[20..24].copy_from_slice(&VERSION.to_le_bytes());
    f[24..32].copy_from_slice(FOOTER_MAGIC);
    f
}

/// Builds the header bytes.
pub fn header_bytes() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h
}

/// Checks header and footer of a whole file image and returns the footer.
pub fn parse_frame(file: &[u8]) -> Result<Footer> {
    let len = file.len() as u64;
    if len < HEADER_LEN + FOOTER_LEN {
        if len >= 8 && &file[..8] != MAGIC {
            return Err(Error::BadMagic);
        }
        return Err(Error::Truncated(format!(
            "{len} bytes is shorter than header + footer"
        )));
    }
    if &file[..8] != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = u32::from_le_bytes(file[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version, VERSION));
    }
    let f = &file[file.len() - FOOTER_LEN as usize..];
    if &f[24..32] != FOOTER_MAGIC {
        return Err(Error::Truncated(
            "footer missing (interrupted write or cut file)".into(),
        ));
    }
    let footer = Footer {
        index_offset: u64::from_le_bytes(f[0..8].try_into().unwrap()),
        index_len: u64::from_le_bytes(f[8..16].try_into().unwrap()),
        index_crc32: u32::from_le_bytes(f[16..20].try_into().unwrap()),
    };
    let footer_version = u32::from_le_bytes(f[20..24].try_into().unwrap());
    if footer_version != version {
        return Err(Error::corrupt("header and footer versions differ"));
    }
    if footer.index_offset < HEADER_LEN
        || footer.index_offset.checked_add(footer.index_len) != Some(len - FOOTER_LEN)
    {
        return Err(Error::corrupt(format!(
            "index at {}+{} does not end at the footer ({})",
            footer.index_offset,
            footer.index_len,
            len - FOOTER_LEN
        )));
    }
    Ok(footer)
}

/// A byte range claimed by some part of the file, for the overlap check.
struct Claim {
    start: u64,
    end: u64,
    what: String,
}

impl Index {
    /// Checks every offset, length, shape and table against a data area of `data_end` bytes:
    /// ranges inside `[HEADER_LEN, data_end)` and pairwise disjoint, chunk counts matching shapes,
    /// decoded sizes that the stored bytes can justify.
    pub fn validate(&self, data_end: u64) -> Result<()> {
        let mut claims = Vec::new();
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(Error::corrupt(format!("tensor `{}` appears twice", t.name)));
            }
            if t.shard as usize >= self.shards.len() {
                return Err(Error::corrupt(format!(
                    "tensor `{}` names a missing shard",
                    t.name
                )));
            }
            let bytes = t.byte_len()?;
            match &t.encoding {
                Encoding::Stored { blob } => {
                    if blob.raw_len != bytes as u64 {
                        return Err(Error::corrupt(format!(
                            "tensor `{}`: stored {} bytes, shape needs {bytes}",
                            t.name, blob.raw_len
                        )));
                    }
                    claims.push(blob_claim(blob, &t.name)?);
                }
                Encoding::Bitplane {
                    chunking,
                    draft_mantissa_bits,
                    ..
                } => {
                    let format =
                        crate::FloatFormat::from_dtype_name(&t.dtype).ok_or_else(|| {
                            Error::corrupt(format!("bit-plane tensor `{}` is {}", t.name, t.dtype))
                        })?;
                    format
                        .check_draft_bits(*draft_mantissa_bits)
                        .map_err(|e| Error::corrupt(format!("tensor `{}`: {e}", t.name)))?;
                    // The exponent section length, the high plane in the base; exactly the low
                    // plane in the residual.
                    let (rows, cols) = t.dims()?;
                    let d = *draft_mantissa_bits as u128;
                    let m = format.mantissa_bits() as u128;
                    self.check_chunks(t, chunking, rows, cols, &mut claims, |rows, n| {
                        let _ = rows;
                        (
                            4 + (n * (1 + d)).div_ceil(8),
                            Some((n * (m - d)).div_ceil(8)),
                        )
                    })?;
                }
                Encoding::Affine {
                    chunking,
                    group_size,
                    residual_tables,
                    ..
                } => {
                    let format =
                        crate::FloatFormat::from_dtype_name(&t.dtype).ok_or_else(|| {
                            Error::corrupt(format!("affine tensor `{}` is {}", t.name, t.dtype))
                        })?;
                    if *group_size == 0
                        || *group_size > MAX_GROUP_SIZE
                        || residual_tables.len() != crate::affine::CODES
                    {
                        return Err(Error::corrupt(format!(
                            "affine tensor `{}` has bad parameters",
                            t.name
                        )));
                    }
                    let (rows, cols) = t.dims()?;
                    // Two source values per group, then the code stream's length prefix.
                    let per_row = (cols as u128).div_ceil(*group_size as u128);
                    let pair = 2 * format.bytes() as u128;
                    self.check_chunks(t, chunking, rows, cols, &mut claims, |rows, _| {
                        (rows * per_row * pair + 4, None)
                    })?;
                }
            }
        }
        let mut outputs = std::collections::HashSet::new();
        for name in self
            .shards
            .iter()
            .map(|s| &s.name)
            .chain(self.files.iter().map(|f| &f.name))
        {
            check_relative_name(name)?;
            if !outputs.insert(name.as_str()) {
                return Err(Error::corrupt(format!("file name `{name}` appears twice")));
            }
        }
        for (i, shard) in self.shards.iter().enumerate() {
            if let Some(h) = &shard.header {
                claims.push(blob_claim(h, &format!("shard {i} header"))?);
            }
        }
        for f in &self.files {
            claims.push(blob_claim(&f.blob, &f.name)?);
        }
        claims.sort_by_key(|c| c.start);
        for c in &claims {
            if c.start < HEADER_LEN || c.end > data_end {
                return Err(Error::corrupt(format!(
                    "{} at {}..{} lies outside the data area",
                    c.what, c.start, c.end
                )));
            }
        }
        for w in claims.windows(2) {
            if w[1].start < w[0].end {
                return Err(Error::corrupt(format!(
                    "{} overlaps {}",
                    w[1].what, w[0].what
                )));
            }
        }
        Ok(())
    }

    /// Checks chunk count and ranges; `min_len(rows, values)` gives the least base length a chunk
    /// of that size needs and, where it is fixed, the exact residual length.
    fn check_chunks(
        &self,
        t: &TensorEntry,
        chunking: &Chunking,
        rows: usize,
        cols: usize,
        claims: &mut Vec<Claim>,
        min_len: impl Fn(u128, u128) -> (u128, Option<u128>),
    ) -> Result<()> {
        if chunking.chunk_rows == 0
            || chunking.chunk_rows > MAX_CHUNK_ROWS
            || chunking.block_len == 0
            || chunking.block_len > MAX_BLOCK_LEN
        {
            return Err(Error::corrupt(format!(
                "tensor `{}` has a chunk or block size out of range",
                t.name
            )));
        }
        let expected = (rows as u64).div_ceil(chunking.chunk_rows);
        if chunking.chunks.len() as u64 != expected {
            return Err(Error::corrupt(format!(
                "tensor `{}` has {} chunks, its shape needs {expected}",
                t.name,
                chunking.chunks.len()
            )));
        }
        for (i, c) in chunking.chunks.iter().enumerate() {
            let first = i as u128 * chunking.chunk_rows as u128;
            let chunk_rows = (chunking.chunk_rows as u128).min(rows as u128 - first);
            let n = chunk_rows * cols as u128;
            let len = c.base_len.checked_add(c.residual_len);
            let end = len.and_then(|l| c.offset.checked_add(l));
            let end = end.ok_or_else(|| {
                Error::corrupt(format!("tensor `{}` chunk {i} overflows", t.name))
            })?;
            let (min_base, residual) = min_len(chunk_rows, n);
            if (c.base_len as u128) < min_base
                || residual.is_some_and(|r| r != c.residual_len as u128)
            {
                return Err(Error::corrupt(format!(
                    "tensor `{}` chunk {i}: {} + {} bytes cannot hold {n} values",
                    t.name, c.base_len, c.residual_len
                )));
            }
            claims.push(Claim {
                start: c.offset,
                end,
                what: format!("tensor `{}` chunk {i}", t.name),
            });
        }
        Ok(())
    }
}

/// A relative path with `/` separators that cannot leave the folder it is joined to.
fn check_relative_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains(':')
        || name
            .split('/')
            .any(|p| p == ".." || p == "." || p.is_empty())
    {
        return Err(Error::corrupt(format!("unsafe file name `{name}`")));
    }
    Ok(())
}

fn blob_claim(b: &StoredBlob, what: &str) -> Result<Claim> {
    let end = b
        .offset
        .checked_add(b.len)
        .ok_or_else(|| Error::corrupt(format!("{what}: blob range overflows")))?;
    if (!b.zstd && b.len != b.raw_len) || b.raw_len > b.len.saturating_mul(ZSTD_MAX_RATIO) {
        return Err(Error::corrupt(format!(
            "{what}: stored length {} cannot give {} bytes",
            b.len, b.raw_len
        )));
    }
    Ok(Claim {
        start: b.offset,
        end,
        what: what.to_string(),
    })
}
