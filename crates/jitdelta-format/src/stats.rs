//! Size accounting per tensor and per file: what `jitdelta inspect` prints.

use crate::container::Encoding;
use crate::reader::JdFile;
use crate::Result;
use serde::Serialize;

/// Sizes of one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorStats {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// `stored`, `bitplane` or `affine`.
    pub kind: &'static str,
    /// Number of chunks (0 when stored whole).
    pub chunks: usize,
    /// Elements.
    pub numel: u64,
    /// Decoded size.
    pub raw_bytes: u64,
    /// Base part bytes (what a draft decode reads), affine scales excluded.
    pub base_bytes: u64,
    /// Residual part bytes.
    pub residual_bytes: u64,
    /// Affine group parameters (lo, scale).
    pub scale_bytes: u64,
    /// Frequency tables in the index, counted at 4 bytes an entry.
    pub table_bytes: u64,
}

impl TensorStats {
    /// Total stored bytes of this tensor.
    pub fn total_bytes(&self) -> u64 {
        self.base_bytes + self.residual_bytes + self.scale_bytes + self.table_bytes
    }
}

/// Sizes of a whole file.
#[derive(Debug, Clone, Serialize)]
pub struct FileStats {
    /// File size.
    pub file_bytes: u64,
    /// Every tensor.
    pub tensors: Vec<TensorStats>,
    /// Auxiliary files as stored.
    pub aux_bytes: u64,
    /// Header, footer and index, minus the tables counted per tensor.
    pub container_bytes: u64,
}

fn table_entries(t: &crate::rans::FrequencyTable) -> u64 {
    Vec::<(u16, u16)>::from(t.clone()).len() as u64
}

/// Computes the size accounting of an open file.
pub fn file_stats(jd: &JdFile) -> Result<FileStats> {
    let mut tensors = Vec::new();
    for entry in &jd.index().tensors {
        let view = jd.tensor(&entry.name)?;
        let (base, residual) = view.stored_bytes();
        let numel = entry.numel()? as u64;
        let (kind, scale_bytes, table_bytes) = match &entry.encoding {
            Encoding::Stored { .. } => ("stored", 0, 0),
            Encoding::Bitplane { exponent_code, .. } => (
                "bitplane",
                0,
                4 * Vec::<(u16, u8)>::from(exponent_code.clone()).len() as u64,
            ),
            Encoding::Affine {
                group_size,
                code_table,
                residual_tables,
                ..
            } => {
                let (rows, cols) = entry.dims()?;
                let groups = (rows * cols.div_ceil(*group_size as usize)) as u64;
                let bytes = crate::container::dtype_size(&entry.dtype).unwrap_or(2) as u64;
                let tables: u64 = table_entries(code_table)
                    + residual_tables.iter().map(table_entries).sum::<u64>();
                ("affine", groups * 2 * bytes, 4 * tables)
            }
        };
        tensors.push(TensorStats {
            name: entry.name.clone(),
            dtype: entry.dtype.clone(),
            shape: entry.shape.clone(),
            kind,
            chunks: view.chunk_count(),
            numel,
            raw_bytes: entry.byte_len()? as u64,
            base_bytes: base.saturating_sub(scale_bytes),
            residual_bytes: residual,
            scale_bytes,
            table_bytes,
        });
    }
    let aux_bytes: u64 = jd.index().files.iter().map(|f| f.blob.len).sum();
    let counted: u64 = tensors.iter().map(|t| t.total_bytes()).sum::<u64>() + aux_bytes;
    Ok(FileStats {
        file_bytes: jd.file_len(),
        container_bytes: jd.file_len().saturating_sub(counted),
        tensors,
        aux_bytes,
    })
}
