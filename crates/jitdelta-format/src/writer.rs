//! Writing a jitdelta file: blobs appended as they are encoded, index and footer last, the whole
//! file built under a temporary name and renamed into place only when complete.

use crate::affine::{self, AffineEncoder};
use crate::bitplane::{self, ChunkBytes};
use crate::container::{
    footer_bytes, header_bytes, AuxFile, ChunkEntry, Chunking, Encoding, Index, Shard, StoredBlob,
    TensorEntry,
};
use crate::float::FloatFormat;
use crate::huffman::CodeLengths;
use crate::rans::FrequencyTable;
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Which base a split tensor gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BaseKind {
    /// Estimate both on a sample of chunks and keep the smaller (affine must win by 3%).
    #[default]
    Auto,
    /// Nested bit planes (the default for trained weights).
    Bitplane,
    /// Affine int4 base + per-code residual (wins on already-quantized weights).
    Affine,
}

/// Encoding options.
#[derive(Clone, Debug)]
pub struct EncodeOptions {
    /// Base kind per tensor.
    pub base: BaseKind,
    /// Mantissa bits kept in the bit-plane draft (k = 1 + exponent bits + this; 3 gives k = 12).
    pub draft_mantissa_bits: u32,
    /// Rows per chunk.
    pub chunk_rows: usize,
    /// Affine group length along a row.
    pub group_size: usize,
    /// Symbols per entropy-coded block (the unit of parallel decoding inside a chunk).
    pub block_len: usize,
    /// zstd level for stored tensors and auxiliary files.
    pub zstd_level: i32,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            base: BaseKind::Auto,
            draft_mantissa_bits: 3,
            chunk_rows: 64,
            group_size: 32,
            block_len: 16384,
            zstd_level: 3,
        }
    }
}

impl EncodeOptions {
    fn check(&self) -> Result<()> {
        if self.chunk_rows == 0 || self.group_size == 0 || self.block_len == 0 {
            return Err(Error::InvalidOption(
                "chunk rows, group size and block length must be at least 1".into(),
            ));
        }
        use crate::container::{MAX_BLOCK_LEN, MAX_CHUNK_ROWS, MAX_GROUP_SIZE};
        if self.chunk_rows as u64 > MAX_CHUNK_ROWS
            || self.block_len > MAX_BLOCK_LEN as usize
            || self.group_size > MAX_GROUP_SIZE as usize
        {
            return Err(Error::InvalidOption(format!(
                "chunk rows, block length and group size may be at most {MAX_CHUNK_ROWS}, \
                 {MAX_BLOCK_LEN} and {MAX_GROUP_SIZE}"
            )));
        }
        Ok(())
    }
}

/// Streams a jitdelta file to disk.
pub struct JdWriter {
    dest: PathBuf,
    out: BufWriter<tempfile::NamedTempFile>,
    pos: u64,
    index: Index,
}

impl JdWriter {
    /// Starts a file that will appear at `dest` when [`JdWriter::finish`] succeeds.
    pub fn create(dest: impl AsRef<Path>) -> Result<Self> {
        let dest = dest.as_ref().to_path_buf();
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".jitdelta-")
            .suffix(".tmp")
            .permissions(crate::reader::new_file_permissions())
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, tmp);
        out.write_all(&header_bytes())?;
        Ok(Self {
            dest,
            out,
            pos: crate::container::HEADER_LEN,
            index: Index {
                shards: Vec::new(),
                tensors: Vec::new(),
                files: Vec::new(),
            },
        })
    }

    fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.pos;
        self.out.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(at)
    }

    fn store(&mut self, bytes: &[u8], zstd_level: i32) -> Result<StoredBlob> {
        let packed = zstd::bulk::compress(bytes, zstd_level)?;
        let (stored, zstd) = if packed.len() * 10 < bytes.len() * 9 {
            (&packed[..], true)
        } else {
            (bytes, false)
        };
        Ok(StoredBlob {
            offset: self.append(stored)?,
            len: stored.len() as u64,
            raw_len: bytes.len() as u64,
            crc32: crc32fast::hash(stored),
            zstd,
        })
    }

    /// Declares a source shard; returns its number for [`JdWriter::add_tensor`].
    pub fn add_shard(&mut self, name: &str, metadata: Option<BTreeMap<String, String>>) -> u32 {
        self.index.shards.push(Shard {
            name: name.to_string(),
            metadata,
            header: None,
        });
        (self.index.shards.len() - 1) as u32
    }

    /// Keeps a shard's original safetensors JSON header (the bytes after the 8-byte length), so
    /// that decompression reproduces the file byte for byte.
    pub fn set_shard_header(&mut self, shard: u32, header_json: &[u8]) -> Result<()> {
        if shard as usize >= self.index.shards.len() {
            return Err(Error::InvalidOption(format!(
                "shard {shard} was not declared"
            )));
        }
        let blob = self.store(header_json, 3)?;
        self.index.shards[shard as usize].header = Some(blob);
        Ok(())
    }

    /// Stores an auxiliary file (config, tokenizer, ...) under a relative name.
    pub fn add_file(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let blob = self.store(bytes, 3)?;
        self.index.files.push(AuxFile {
            name: name.to_string(),
            blob,
        });
        Ok(())
    }

    /// Encodes one tensor (`data`: its little-endian bytes, as in safetensors).
    ///
    /// Float tensors of rank >= 2 are split into base and residual, chunk by chunk in parallel;
    /// everything else is stored losslessly (zstd where it pays).
    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: &str,
        shape: &[u64],
        shard: u32,
        data: &[u8],
        opts: &EncodeOptions,
    ) -> Result<()> {
        opts.check()?;
        if self.index.tensors.iter().any(|t| t.name == name) {
            return Err(Error::InvalidOption(format!("tensor `{name}` added twice")));
        }
        if shard as usize >= self.index.shards.len() {
            return Err(Error::InvalidOption(format!(
                "shard {shard} was not declared"
            )));
        }
        let mut entry = TensorEntry {
            name: name.to_string(),
            dtype: dtype.to_string(),
            shape: shape.to_vec(),
            shard,
            encoding: Encoding::Stored {
                blob: StoredBlob {
                    offset: 0,
                    len: 0,
                    raw_len: 0,
                    crc32: 0,
                    zstd: false,
                },
            },
        };
        let expected = entry.byte_len()?;
        if data.len() != expected {
            return Err(Error::BufferSize {
                expected,
                got: data.len(),
            });
        }
        entry.encoding = match FloatFormat::from_dtype_name(dtype) {
            Some(format) if shape.len() >= 2 => {
                let (_, cols) = entry.dims()?;
                self.encode_split(format, cols, data, opts)?
            }
            _ => Encoding::Stored {
                blob: self.store(data, opts.zstd_level)?,
            },
        };
        self.index.tensors.push(entry);
        Ok(())
    }

    fn encode_split(
        &mut self,
        format: FloatFormat,
        cols: usize,
        data: &[u8],
        opts: &EncodeOptions,
    ) -> Result<Encoding> {
        format.check_draft_bits(opts.draft_mantissa_bits)?;
        let rows = data.len() / (cols * format.bytes()).max(1);
        let chunk_bytes = (opts.chunk_rows.min(rows.max(1)) * cols * format.bytes()).max(1);
        let chunks: Vec<&[u8]> = if cols == 0 {
            Vec::new()
        } else {
            data.chunks(chunk_bytes).collect()
        };
        let kind = match opts.base {
            BaseKind::Auto => pick_kind(format, cols, &chunks, opts),
            k => k,
        };
        let d = opts.draft_mantissa_bits;
        let block = opts.block_len;
        if kind == BaseKind::Affine {
            let g = opts.group_size;
            let (code_counts, resid_counts) = chunks
                .par_iter()
                .map(|c| affine::histograms(&affine::quantize(format, g, cols, c)))
                .reduce(
                    || ([0u64; affine::CODES], vec![[0u64; 256]; affine::CODES]),
                    |(mut a, mut b), (c, d)| {
                        a.iter_mut().zip(c).for_each(|(x, y)| *x += y);
                        for (bx, dy) in b.iter_mut().zip(d) {
                            bx.iter_mut().zip(dy).for_each(|(x, y)| *x += y);
                        }
                        (a, b)
                    },
                );
            let code_table = FrequencyTable::from_counts(&code_counts);
            let residual_tables: Vec<FrequencyTable> = resid_counts
                .iter()
                .map(|c| FrequencyTable::from_counts(c))
                .collect();
            let code_enc = code_table.encoder();
            let resid_enc: Vec<_> = residual_tables.iter().map(|t| t.encoder()).collect();
            let tables = AffineEncoder {
                codes: &code_enc,
                residuals: &resid_enc,
            };
            let entries = self.write_chunks(&chunks, |c| {
                affine::encode_chunk(
                    format,
                    block,
                    &tables,
                    &affine::quantize(format, g, cols, c),
                )
            })?;
            return Ok(Encoding::Affine {
                chunking: Chunking {
                    chunk_rows: opts.chunk_rows as u64,
                    block_len: block as u32,
                    chunks: entries,
                },
                group_size: g as u32,
                code_table,
                residual_tables,
            });
        }
        let counts = data
            .par_chunks(1 << 20)
            .map(|c| bitplane::exponent_histogram(format, c))
            .reduce(
                || [0u64; 256],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let exponent_code = CodeLengths::from_counts(&counts);
        let enc = exponent_code.encoder();
        let entries = self.write_chunks(&chunks, |c| {
            bitplane::encode_chunk(format, d, block, &enc, c)
        })?;
        Ok(Encoding::Bitplane {
            chunking: Chunking {
                chunk_rows: opts.chunk_rows as u64,
                block_len: block as u32,
                chunks: entries,
            },
            draft_mantissa_bits: d,
            exponent_code,
        })
    }

    /// Encodes chunks in parallel, a bounded batch at a time, and appends them in order.
    fn write_chunks(
        &mut self,
        chunks: &[&[u8]],
        encode: impl Fn(&[u8]) -> Result<ChunkBytes> + Sync,
    ) -> Result<Vec<ChunkEntry>> {
        let batch = rayon::current_num_threads() * 2;
        let mut entries = Vec::with_capacity(chunks.len());
        for group in chunks.chunks(batch) {
            let encoded: Vec<ChunkBytes> =
                group.par_iter().map(|c| encode(c)).collect::<Result<_>>()?;
            for c in encoded {
                let offset = self.append(&c.base)?;
                self.append(&c.residual)?;
                entries.push(ChunkEntry {
                    offset,
                    base_len: c.base.len() as u64,
                    residual_len: c.residual.len() as u64,
                    base_crc32: crc32fast::hash(&c.base),
                    residual_crc32: crc32fast::hash(&c.residual),
                });
            }
        }
        Ok(entries)
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Writes index and footer, syncs, and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        let index = serde_json::to_vec(&self.index)?;
        let index_offset = self.append(&index)?;
        let footer = footer_bytes(index_offset, index.len() as u64, crc32fast::hash(&index));
        self.append(&footer)?;
        let tmp = self.out.into_inner().map_err(|e| e.into_error())?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| Error::io(tmp.path(), e))?;
        tmp.persist(&self.dest)
            .map_err(|e| Error::io(&self.dest, e.error))?;
        Ok(())
    }
}

/// Whether most 32-value runs of the sample hold at most 16 distinct values, as weights on a
/// 4-bit grid do; trained weights hold ~32. Rules the affine estimate out cheaply.
fn looks_quantized(format: FloatFormat, cols: usize, sample: &[&[u8]]) -> bool {
    let run = 32.min(cols.max(1));
    let (mut runs, mut gridded) = (0usize, 0usize);
    for c in sample {
        for values in c.chunks_exact(run * format.bytes()).step_by(7).take(64) {
            let mut v: Vec<&[u8]> = values.chunks_exact(format.bytes()).collect();
            v.sort_unstable();
            v.dedup();
            runs += 1;
            gridded += usize::from(v.len() <= 16);
        }
    }
    2 * gridded > runs
}

/// Estimates both kinds on up to four chunks spread over the tensor and keeps the smaller.
fn pick_kind(format: FloatFormat, cols: usize, chunks: &[&[u8]], opts: &EncodeOptions) -> BaseKind {
    if chunks.is_empty() {
        return BaseKind::Bitplane;
    }
    // Up to 16 rows from each of four chunks spread over the tensor: enough to see whether the
    // values sit on a 4-bit grid, and a small fraction of the encode time.
    let step = chunks.len().div_ceil(4);
    let row_bytes = cols * format.bytes();
    let sample: Vec<&[u8]> = chunks
        .iter()
        .step_by(step)
        .map(|c| &c[..c.len().min(16 * row_bytes)])
        .collect();
    if !looks_quantized(format, cols, &sample) {
        return BaseKind::Bitplane;
    }
    let n: usize = sample.iter().map(|c| c.len() / format.bytes()).sum();
    let mut exps = [0u64; 256];
    for c in &sample {
        let h = bitplane::exponent_histogram(format, c);
        exps.iter_mut().zip(h).for_each(|(x, y)| *x += y);
    }
    let bitplane_bits = CodeLengths::from_counts(&exps).cost_bits(&exps) as f64
        + n as f64 * (1 + format.mantissa_bits()) as f64;
    let mut codes = [0u64; affine::CODES];
    let mut resid = vec![[0u64; 256]; affine::CODES];
    let mut fixed_bits = 0f64;
    for c in &sample {
        let q = affine::quantize(format, opts.group_size, cols, c);
        fixed_bits += (q.params.len() * 2 + q.escapes.len()) as f64 * 8.0 * format.bytes() as f64;
        let (cc, rc) = affine::histograms(&q);
        codes.iter_mut().zip(cc).for_each(|(x, y)| *x += y);
        for (a, b) in resid.iter_mut().zip(rc) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }
    let affine_bits = FrequencyTable::from_counts(&codes).cost_bits(&codes)
        + resid
            .iter()
            .map(|r| FrequencyTable::from_counts(r).cost_bits(r))
            .sum::<f64>()
        + fixed_bits;
    if affine_bits < 0.97 * bitplane_bits {
        BaseKind::Affine
    } else {
        BaseKind::Bitplane
    }
}
