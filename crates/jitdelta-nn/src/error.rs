//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model from a layer source.
///
/// Bad inputs (a missing or inconsistent `config.json`, a missing tensor, a tensor whose shape
/// does not match the config) surface as one of these variants, naming the file or tensor,
/// never as a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Reading or decoding the jitdelta file failed.
    #[error(transparent)]
    Format(#[from] jitdelta_format::Error),
    /// A GPU kernel failed (compiling, uploading or launching).
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    Kernels(#[from] jitdelta_kernels::Error),
    /// An I/O error on a model file.
    #[error("{path}: {error}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        error: std::io::Error,
    },
    /// A model configuration file is missing, unparsable or inconsistent.
    #[error("{file}: {message}")]
    Config {
        /// The configuration file (e.g. `config.json`).
        file: String,
        /// What is wrong with it.
        message: String,
    },
    /// The model asked for a tensor its weights do not hold.
    #[error("tensor `{name}` not found in {origin}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// Where it was looked up (a model folder or a jitdelta file).
        origin: String,
    },
    /// A tensor's stored shape does not match the shape the model config implies.
    #[error("tensor `{name}`: the config implies shape {expected:?}, the weights hold {found:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape stored in the weights.
        found: Vec<usize>,
    },
    /// A tensor's stored dtype cannot be used where the model needs it.
    #[error("tensor `{name}`: unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The stored dtype name.
        dtype: String,
    },
    /// A feature of the model or of the request that this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A call with arguments that do not fit the model's state (e.g. a position offset that
    /// differs from the KV cache length).
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl Error {
    pub(crate) fn config(file: &str, message: impl Into<String>) -> Self {
        Error::Config {
            file: file.to_string(),
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
