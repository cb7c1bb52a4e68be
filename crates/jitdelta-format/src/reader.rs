//! Reading a jitdelta file: validation on open, checksummed chunk access, exact / draft / resident
//! decoding of whole tensors or chosen chunks.

use crate::affine::{self, AffineDecoder, ChunkShape};
use crate::container::{
    parse_frame, ChunkEntry, Chunking, Encoding, Index, StoredBlob, TensorEntry,
};
use crate::float::{DraftDtype, FloatFormat};
use crate::huffman::HuffmanDecoder;
use crate::rans::DecodeTable;
use crate::resident::{check_len, ResidentTensor};
use crate::{bitplane, Error, Result};
use rayon::prelude::*;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// Releases the pages of a range of a read-only file mapping, so that streaming through a large
/// file keeps RSS bounded by what is being worked on rather than by the file size.
pub(crate) fn drop_pages(map: &memmap2::Mmap, start: usize, len: usize) {
    let page = 4096;
    let aligned = start / page * page;
    let len = (start + len).min(map.len()).saturating_sub(aligned);
    if len == 0 {
        return;
    }
    // SAFETY: a read-only, file-backed mapping: dropped pages are read again from the file if
    // touched later, so no data is lost. An error only means the pages stay resident.
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, aligned, len) };
}

enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// An open jitdelta file. Cloning is cheap (the mapping and index are shared), it can be sent
/// between threads, and tensors decode on demand.
#[derive(Clone)]
pub struct JdFile {
    inner: Arc<FileInner>,
}

struct FileInner {
    bytes: Backing,
    index: Index,
    by_name: HashMap<String, usize>,
}

impl JdFile {
    /// Memory-maps and validates a file (header, footer, index checksum, every range and shape).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us shows up as a checksum error.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_backing(Backing::Mapped(map))
    }

    /// Validates a file image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::from_backing(Backing::Owned(bytes))
    }

    fn from_backing(bytes: Backing) -> Result<Self> {
        let data: &[u8] = match &bytes {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        };
        let footer = parse_frame(data)?;
        let index_bytes =
            &data[footer.index_offset as usize..(footer.index_offset + footer.index_len) as usize];
        let crc = crc32fast::hash(index_bytes);
        if crc != footer.index_crc32 {
            return Err(Error::Checksum {
                what: "index".into(),
                stored: footer.index_crc32,
                computed: crc,
            });
        }
        let index: Index = serde_json::from_slice(index_bytes)?;
        index.validate(footer.index_offset)?;
        let by_name = index
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            inner: Arc::new(FileInner {
                bytes,
                index,
                by_name,
            }),
        })
    }

    fn data(&self) -> &[u8] {
        match &self.inner.bytes {
            Backing::Mapped(m) => m,
            Backing::Owned(v) => v,
        }
    }

    /// The whole index.
    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    /// Total file size in bytes.
    pub fn file_len(&self) -> u64 {
        self.data().len() as u64
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.index().tensors.iter().map(|t| t.name.as_str())
    }

    /// A tensor by name, with its decoding tables built. The view shares the file and lives
    /// as long as the caller keeps it (a layer keeps one per projection).
    pub fn tensor(&self, name: &str) -> Result<TensorView> {
        let i = *self
            .inner
            .by_name
            .get(name)
            .ok_or_else(|| Error::TensorNotFound(name.to_string()))?;
        TensorView::new(self.clone(), i)
    }

    /// The bytes of an auxiliary file (e.g. `config.json`), checksum verified.
    pub fn aux_file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.index().files.iter().find(|f| f.name == name) {
            Some(f) => self.read_blob(&f.blob, name).map(Some),
            None => Ok(None),
        }
    }

    fn checked(&self, offset: u64, len: u64, crc: u32, what: impl Fn() -> String) -> Result<&[u8]> {
        let bytes = &self.data()[offset as usize..(offset + len) as usize];
        let computed = crc32fast::hash(bytes);
        if computed != crc {
            return Err(Error::Checksum {
                what: what(),
                stored: crc,
                computed,
            });
        }
        Ok(bytes)
    }

    pub(crate) fn read_blob(&self, blob: &StoredBlob, what: &str) -> Result<Vec<u8>> {
        let bytes = self.checked(blob.offset, blob.len, blob.crc32, || what.to_string())?;
        if !blob.zstd {
            return Ok(bytes.to_vec());
        }
        // Grow with the data actually decompressed; never trust raw_len for the allocation.
        let mut out =
            Vec::with_capacity((blob.raw_len as usize).min(bytes.len().saturating_mul(8)));
        let decoder = zstd::stream::read::Decoder::new(bytes)?;
        decoder
            .take(blob.raw_len + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::corrupt(format!("{what}: zstd: {e}")))?;
        if out.len() as u64 != blob.raw_len {
            return Err(Error::corrupt(format!(
                "{what}: decompressed to {} bytes, index says {}",
                out.len(),
                blob.raw_len
            )));
        }
        Ok(out)
    }
}

enum Tables {
    None,
    Bitplane(HuffmanDecoder),
    Affine(DecodeTable, Vec<DecodeTable>),
}

/// One tensor of an open file, with its decoding tables.
pub struct TensorView {
    file: JdFile,
    tensor: usize,
    tables: Tables,
    rows: usize,
    cols: usize,
}

impl TensorView {
    fn new(file: JdFile, tensor: usize) -> Result<Self> {
        let entry = &file.index().tensors[tensor];
        let tables = match &entry.encoding {
            Encoding::Stored { .. } => Tables::None,
            Encoding::Bitplane { exponent_code, .. } => Tables::Bitplane(exponent_code.decoder()),
            Encoding::Affine {
                code_table,
                residual_tables,
                ..
            } => Tables::Affine(
                code_table.decoder(),
                residual_tables.iter().map(|t| t.decoder()).collect(),
            ),
        };
        let (rows, cols) = entry.dims()?;
        Ok(Self {
            file,
            tensor,
            tables,
            rows,
            cols,
        })
    }

    /// The index entry.
    pub fn entry(&self) -> &TensorEntry {
        &self.file.index().tensors[self.tensor]
    }

    /// The float format, for split (bit-plane or affine) tensors.
    pub fn format(&self) -> Option<FloatFormat> {
        match self.entry().encoding {
            Encoding::Stored { .. } => None,
            _ => FloatFormat::from_dtype_name(&self.entry().dtype),
        }
    }

    /// `(rows, cols)`, leading dimensions folded into rows.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn chunking(&self) -> Option<&Chunking> {
        match &self.entry().encoding {
            Encoding::Stored { .. } => None,
            Encoding::Bitplane { chunking, .. } | Encoding::Affine { chunking, .. } => {
                Some(chunking)
            }
        }
    }

    /// Number of row chunks (0 for stored tensors).
    pub fn chunk_count(&self) -> usize {
        self.chunking().map_or(0, |c| c.chunks.len())
    }

    /// Rows per chunk (the last may be shorter); `None` for stored tensors.
    /// (Never more than the tensor's rows, so chunk byte sizes cannot overflow.)
    pub fn chunk_rows(&self) -> Option<usize> {
        self.chunking()
            .map(|c| (c.chunk_rows as usize).min(self.rows.max(1)))
    }

    /// Values in chunk `c`.
    pub fn chunk_len(&self, c: usize) -> usize {
        let r = self.chunk_rows().unwrap_or(0);
        r.min(self.rows.saturating_sub(c * r)) * self.cols
    }

    fn chunk(&self, c: usize) -> Result<(&ChunkEntry, &Chunking)> {
        let chunking = self.chunking().ok_or_else(|| {
            Error::InvalidOption(format!(
                "tensor `{}` is stored whole, not chunked",
                self.entry().name
            ))
        })?;
        let entry = chunking
            .chunks
            .get(c)
            .ok_or_else(|| Error::ChunkOutOfRange {
                tensor: self.entry().name.clone(),
                index: c,
                count: chunking.chunks.len(),
            })?;
        Ok((entry, chunking))
    }

    fn base_of(&self, e: &ChunkEntry, c: usize) -> Result<&[u8]> {
        self.file.checked(e.offset, e.base_len, e.base_crc32, || {
            format!("tensor `{}` chunk {c} base", self.entry().name)
        })
    }

    fn residual_of(&self, e: &ChunkEntry, c: usize) -> Result<&[u8]> {
        self.file.checked(
            e.offset + e.base_len,
            e.residual_len,
            e.residual_crc32,
            || format!("tensor `{}` chunk {c} residual", self.entry().name),
        )
    }

    /// Bytes a draft decode reads, and bytes exact decoding adds.
    pub fn stored_bytes(&self) -> (u64, u64) {
        match &self.entry().encoding {
            Encoding::Stored { blob } => (blob.len, 0),
            Encoding::Bitplane { chunking, .. } | Encoding::Affine { chunking, .. } => chunking
                .chunks
                .iter()
                .fold((0, 0), |(b, r), c| (b + c.base_len, r + c.residual_len)),
        }
    }

    /// Decodes chunk `c` to exact source bytes.
    pub fn decode_chunk_exact(&self, c: usize, out: &mut [u8]) -> Result<()> {
        let (e, chunking) = self.chunk(c)?;
        let format = self.format().expect("chunked tensors are float");
        let n = self.chunk_len(c);
        check_len(out, n * format.bytes())?;
        let base = self.base_of(e, c)?;
        let residual = self.residual_of(e, c)?;
        let block = chunking.block_len as usize;
        match (&self.entry().encoding, &self.tables) {
            (
                Encoding::Bitplane {
                    draft_mantissa_bits,
                    ..
                },
                Tables::Bitplane(t),
            ) => bitplane::decode_exact(
                format,
                *draft_mantissa_bits,
                block,
                t,
                base,
                residual,
                n,
                out,
            ),
            (Encoding::Affine { group_size, .. }, Tables::Affine(codes, residuals)) => {
                let tables = AffineDecoder { codes, residuals };
                let shape = ChunkShape {
                    n,
                    cols: self.cols,
                    group: *group_size as usize,
                };
                affine::decode_exact(format, block, &tables, base, residual, shape, out)
            }
            _ => unreachable!("tables follow the encoding"),
        }
    }

    /// Decodes chunk `c`'s draft values (base part only) as `dtype`.
    pub fn decode_chunk_draft(&self, c: usize, dtype: DraftDtype, out: &mut [u8]) -> Result<()> {
        let (e, chunking) = self.chunk(c)?;
        let format = self.format().expect("chunked tensors are float");
        let n = self.chunk_len(c);
        check_len(out, n * dtype.bytes())?;
        let base = self.base_of(e, c)?;
        let block = chunking.block_len as usize;
        match (&self.entry().encoding, &self.tables) {
            (
                Encoding::Bitplane {
                    draft_mantissa_bits,
                    ..
                },
                Tables::Bitplane(t),
            ) => {
                bitplane::decode_draft(format, *draft_mantissa_bits, block, t, base, n, dtype, out)
            }
            (Encoding::Affine { group_size, .. }, Tables::Affine(codes, residuals)) => {
                let tables = AffineDecoder { codes, residuals };
                let shape = ChunkShape {
                    n,
                    cols: self.cols,
                    group: *group_size as usize,
                };
                affine::decode_draft(format, block, &tables, base, shape, dtype, out)
            }
            _ => unreachable!("tables follow the encoding"),
        }
    }

    /// Decodes the whole tensor to its exact source bytes (chunks in parallel).
    pub fn decode_exact(&self) -> Result<Vec<u8>> {
        if let Encoding::Stored { blob } = &self.entry().encoding {
            // Grows with the data actually stored, never with the claimed size alone.
            return self.file.read_blob(blob, &self.entry().name);
        }
        let mut out = vec![0u8; self.entry().byte_len()?];
        self.decode_exact_into(&mut out)?;
        Ok(out)
    }

    /// Like [`TensorView::decode_exact`], into a caller buffer of exactly the tensor's size.
    pub fn decode_exact_into(&self, out: &mut [u8]) -> Result<()> {
        check_len(out, self.entry().byte_len()?)?;
        if let Encoding::Stored { blob } = &self.entry().encoding {
            out.copy_from_slice(&self.file.read_blob(blob, &self.entry().name)?);
            return Ok(());
        }
        let per_chunk =
            self.chunk_rows().unwrap_or(1) * self.cols * self.format().map_or(1, |f| f.bytes());
        out.par_chunks_mut(per_chunk.max(1))
            .enumerate()
            .try_for_each(|(c, o)| self.decode_chunk_exact(c, o))
    }

    /// Decodes the tensor's exact bytes in order, a batch of chunks at a time (chunks of a batch
    /// in parallel), handing each chunk to `sink`: memory stays at one batch, whatever the
    /// tensor's size.
    pub fn decode_exact_streaming(&self, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        if let Encoding::Stored { blob } = &self.entry().encoding {
            return sink(&self.file.read_blob(blob, &self.entry().name)?);
        }
        let batch = rayon::current_num_threads().max(1);
        let count = self.chunk_count();
        let bytes = self.format().map_or(1, |f| f.bytes());
        let mut bufs: Vec<Vec<u8>> = vec![Vec::new(); batch.min(count)];
        for first in (0..count).step_by(batch) {
            let n = batch.min(count - first);
            bufs[..n]
                .par_iter_mut()
                .enumerate()
                .try_for_each(|(k, buf)| {
                    buf.resize(self.chunk_len(first + k) * bytes, 0);
                    self.decode_chunk_exact(first + k, buf)
                })?;
            for buf in &bufs[..n] {
                sink(buf)?;
            }
        }
        Ok(())
    }

    /// Lets the OS drop this tensor's pages of a memory-mapped file (they are read again if
    /// needed); a no-op for files held in memory.
    pub fn release_pages(&self) {
        let Backing::Mapped(map) = &self.file.inner.bytes else {
            return;
        };
        let (start, end) = match &self.entry().encoding {
            Encoding::Stored { blob } => (blob.offset, blob.offset + blob.len),
            Encoding::Bitplane { chunking, .. } | Encoding::Affine { chunking, .. } => {
                chunking.chunks.iter().fold((u64::MAX, 0), |(s, e), c| {
                    (
                        s.min(c.offset),
                        e.max(c.offset + c.base_len + c.residual_len),
                    )
                })
            }
        };
        if start < end {
            drop_pages(map, start as usize, (end - start) as usize);
        }
    }

    /// Decodes the draft (base-only) values of the whole tensor as `dtype`.
    pub fn decode_draft(&self, dtype: DraftDtype) -> Result<Vec<u8>> {
        if self.format().is_none() {
            return Err(Error::UnsupportedDtype(format!(
                "{}: tensor `{}` is stored whole and has no draft",
                self.entry().dtype,
                self.entry().name
            )));
        }
        let mut out = vec![0u8; self.entry().numel()? * dtype.bytes()];
        let per_chunk = self.chunk_rows().unwrap_or(1) * self.cols * dtype.bytes();
        out.par_chunks_mut(per_chunk.max(1))
            .enumerate()
            .try_for_each(|(c, o)| self.decode_chunk_draft(c, dtype, o))?;
        Ok(out)
    }

    /// Transcodes to the fixed-length resident layout, chunk by chunk (same chunking),
    /// with `draft_bits` mantissa bits in the high plane (3 gives BF16 nibble planes).
    ///
    /// A bit-plane tensor stored with the same `draft_bits` already holds the resident high and
    /// low planes: only its exponents are decoded, the planes are copied. Other tensors are
    /// decoded to exact values and split again. Both give the same bytes.
    pub fn to_resident(&self, draft_bits: u32) -> Result<ResidentTensor> {
        let format = self.format().ok_or_else(|| {
            Error::UnsupportedDtype(format!(
                "tensor `{}` is not a split float tensor",
                self.entry().name
            ))
        })?;
        let (rows, cols, chunk_rows) = (self.rows, self.cols, self.chunk_rows().unwrap_or(1));
        match (&self.entry().encoding, &self.tables) {
            (
                Encoding::Bitplane {
                    draft_mantissa_bits,
                    chunking,
                    ..
                },
                Tables::Bitplane(table),
            ) if *draft_mantissa_bits == draft_bits => ResidentTensor::from_fields(
                format,
                rows,
                cols,
                chunk_rows,
                draft_bits,
                |c, _, out| {
                    let (e, _) = self.chunk(c)?;
                    let block = chunking.block_len as usize;
                    let (base, residual) = (self.base_of(e, c)?, self.residual_of(e, c)?);
                    let n = out.exps.len();
                    bitplane::decode_fields(
                        format, draft_bits, block, table, base, residual, n, out,
                    )
                },
            ),
            _ => {
                ResidentTensor::from_chunks(format, rows, cols, chunk_rows, draft_bits, |c, out| {
                    self.decode_chunk_exact(c, out)
                })
            }
        }
    }
}

/// Permissions of files we create: what a plain `File::create` would give (0644 before the
/// umask on Unix), not the 0600 of a temporary file.
pub(crate) fn new_file_permissions() -> std::fs::Permissions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::Permissions::from_mode(0o644)
    }
    #[cfg(not(unix))]
    {
        std::env::temp_dir()
            .metadata()
            .map(|m| m.permissions())
            .expect("temp dir has permissions")
    }
}
