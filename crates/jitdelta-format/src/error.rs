//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while encoding, reading or decoding a jitdelta file.
///
/// Corrupt or hostile input always surfaces as one of these variants, never as a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error, with the path it happened on where known.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error on a stream without a path.
    #[error(transparent)]
    Stream(#[from] std::io::Error),
    /// The file does not start or end with the jitdelta magic bytes.
    #[error("not a jitdelta file (bad magic bytes)")]
    BadMagic,
    /// The file was written by a format version this reader does not know.
    #[error("unsupported jitdelta format version {0} (this reader knows version {1})")]
    UnsupportedVersion(u32, u32),
    /// The file is shorter than its own header or footer says.
    #[error("file is truncated: {0}")]
    Truncated(String),
    /// A stored checksum does not match the bytes read.
    #[error("checksum mismatch in {what}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Which part of the file failed.
        what: String,
        /// The CRC-32 stored in the file.
        stored: u32,
        /// The CRC-32 of the bytes actually read.
        computed: u32,
    },
    /// The index or a chunk is structurally invalid (bad lengths, offsets, tables).
    #[error("corrupt jitdelta file: {0}")]
    Corrupt(String),
    /// The index JSON could not be parsed.
    #[error("corrupt jitdelta index: {0}")]
    Index(#[from] serde_json::Error),
    /// A tensor name was asked for that the file does not hold.
    #[error("tensor `{0}` not found")]
    TensorNotFound(String),
    /// A chunk index past the tensor's last chunk.
    #[error("tensor `{tensor}` has {count} chunks; chunk {index} does not exist")]
    ChunkOutOfRange {
        /// Tensor name.
        tensor: String,
        /// The chunk asked for.
        index: usize,
        /// How many chunks the tensor has.
        count: usize,
    },
    /// A dtype the operation does not support.
    #[error("unsupported dtype {0}")]
    UnsupportedDtype(String),
    /// The source safetensors file or folder is invalid.
    #[error("invalid safetensors input {path}: {reason}")]
    BadSource {
        /// The offending file or folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An option value is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// A caller-provided buffer has the wrong length.
    #[error("output buffer holds {got} bytes, {expected} needed")]
    BufferSize {
        /// Bytes needed.
        expected: usize,
        /// Bytes provided.
        got: usize,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
