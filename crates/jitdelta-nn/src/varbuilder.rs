//! A candle-nn [`VarBuilder`] backend that serves exact tensors from a jitdelta file.
//!
//! Any unmodified candle model (candle-transformers' BERT, T5, Whisper, ...) loads from a `.jd`
//! file through it: each tensor is decoded bit-exactly when the model asks for it (load-time
//! decode), then converted to the dtype the model requests, exactly as candle's own safetensors
//! backend does (`to_dtype` on the original values). Models written in this crate use JIT layers
//! instead and keep their weights compressed; this backend is for everything else.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use jitdelta_format::JdFile;
//! use candle_transformers::models::bert::{BertModel, Config};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let jd = JdFile::open("minilm.jd")?;
//! let config: Config = serde_json::from_slice(&jd.aux_file("config.json")?.unwrap())?;
//! let vb = jitdelta_nn::varbuilder::var_builder(&jd, DType::F32, &Device::Cpu);
//! let model = BertModel::load(vb, &config)?;
//! # let _ = model;
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::{SimpleBackend, VarBuilder};
use jitdelta_format::JdFile;

/// Why a tensor could not be served from a jitdelta file.
#[derive(Debug, thiserror::Error)]
pub enum VarBuilderError {
    /// The model asked for a tensor the file does not hold.
    #[error("cannot find tensor `{0}` in the jitdelta file")]
    MissingTensor(String),
    /// The tensor's stored shape differs from the one the model asked for.
    #[error(
        "tensor `{name}`: the model expects shape {expected:?}, the jitdelta file holds {found:?}"
    )]
    ShapeMismatch {
        /// Tensor name.
        name: String,
        /// Shape the model asked for.
        expected: Vec<usize>,
        /// Shape stored in the file.
        found: Vec<usize>,
    },
    /// The tensor's safetensors dtype has no candle equivalent.
    #[error("tensor `{name}`: dtype {dtype} is not supported by candle")]
    UnsupportedDtype {
        /// Tensor name.
        name: String,
        /// The safetensors dtype name.
        dtype: String,
    },
    /// Reading or decoding the tensor failed (corrupt chunk, checksum, ...).
    #[error("tensor `{name}`: {source}")]
    Format {
        /// Tensor name.
        name: String,
        /// The underlying format error.
        #[source]
        source: jitdelta_format::Error,
    },
    /// Building the candle tensor failed (device allocation, dtype conversion).
    #[error("tensor `{name}`: {source}")]
    Candle {
        /// Tensor name.
        name: String,
        /// The underlying candle error.
        #[source]
        source: candle_core::Error,
    },
}

/// How a stored dtype is loaded into candle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadDtype {
    /// The candle dtype of the loaded tensor (before conversion to the requested dtype).
    pub dtype: DType,
    /// `true` when the stored values are widened on load (`U16` to `U32`, as candle's own
    /// safetensors loader does).
    pub widened: bool,
}

/// Maps a safetensors dtype name (`BF16`, `F16`, `F32`, `F64`, `U8`, `U16`, `U32`, `I16`, `I32`,
/// `I64`, `F8_E4M3`) to the candle dtype it loads as. `U16` loads as `U32` (candle has no `U16`,
/// and its safetensors loader widens the same way). Other names (`BOOL`, `I8`, `U64`, `F8_E5M2`,
/// the packed MX formats) give `None`.
pub fn candle_dtype(safetensors_dtype: &str) -> Option<LoadDtype> {
    let plain = |dtype| {
        Some(LoadDtype {
            dtype,
            widened: false,
        })
    };
    match safetensors_dtype {
        "BF16" => plain(DType::BF16),
        "F16" => plain(DType::F16),
        "F32" => plain(DType::F32),
        "F64" => plain(DType::F64),
        "U8" => plain(DType::U8),
        "U32" => plain(DType::U32),
        "I16" => plain(DType::I16),
        "I32" => plain(DType::I32),
        "I64" => plain(DType::I64),
        "F8_E4M3" => plain(DType::F8E4M3),
        "U16" => Some(LoadDtype {
            dtype: DType::U32,
            widened: true,
        }),
        _ => None,
    }
}

/// A [`SimpleBackend`] serving the exact tensors of a jitdelta file.
///
/// Every request decodes the tensor from the file (nothing is cached: candle models ask for each
/// weight once, and the decoded copy belongs to the model), checks its shape, and converts it to
/// the requested dtype and device.
#[derive(Clone)]
pub struct JdBackend {
    jd: JdFile,
}

impl JdBackend {
    /// A backend over an open file (cheap: the file's mapping and index are shared).
    pub fn new(jd: JdFile) -> Self {
        Self { jd }
    }

    /// The file this backend reads.
    pub fn file(&self) -> &JdFile {
        &self.jd
    }

    /// Decodes tensor `name` exactly, in its stored dtype (`U16` widened to `U32`), on `device`.
    /// With `expected`, the stored shape must equal it.
    pub fn load(
        &self,
        name: &str,
        expected: Option<&Shape>,
        device: &Device,
    ) -> Result<Tensor, VarBuilderError> {
        let view = self.jd.tensor(name).map_err(|e| match e {
            jitdelta_format::Error::TensorNotFound(_) => {
                VarBuilderError::MissingTensor(name.to_string())
            }
            source => VarBuilderError::Format {
                name: name.to_string(),
                source,
            },
        })?;
        let entry = view.entry();
        let shape: Vec<usize> = entry.shape.iter().map(|&d| d as usize).collect();
        if let Some(expected) = expected {
            if expected.dims() != shape.as_slice() {
                return Err(VarBuilderError::ShapeMismatch {
                    name: name.to_string(),
                    expected: expected.dims().to_vec(),
                    found: shape,
                });
            }
        }
        let load = candle_dtype(&entry.dtype).ok_or_else(|| VarBuilderError::UnsupportedDtype {
            name: name.to_string(),
            dtype: entry.dtype.clone(),
        })?;
        let bytes = view
            .decode_exact()
            .map_err(|source| VarBuilderError::Format {
                name: name.to_string(),
                source,
            })?;
        let candle = |source| VarBuilderError::Candle {
            name: name.to_string(),
            source,
        };
        if load.widened {
            let values: Vec<u32> = bytes
                .chunks_exact(2)
                .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            Tensor::from_vec(values, shape, device).map_err(candle)
        } else {
            Tensor::from_raw_buffer(&bytes, load.dtype, &shape, device).map_err(candle)
        }
    }

    fn load_as(
        &self,
        name: &str,
        expected: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, expected, device)
            .and_then(|t| {
                t.to_dtype(dtype).map_err(|source| VarBuilderError::Candle {
                    name: name.to_string(),
                    source,
                })
            })
            .map_err(candle_core::Error::wrap)
    }
}

impl SimpleBackend for JdBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load_as(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load_as(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.jd.index().tensors.iter().any(|t| t.name == name)
    }
}

/// A [`VarBuilder`] that loads any candle model from a jitdelta file, bit-exactly (see the
/// [module docs](self)). `dtype` is the dtype the model's weights are converted to, as with
/// `VarBuilder::from_mmaped_safetensors`.
pub fn var_builder(jd: &JdFile, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(JdBackend::new(jd.clone())), dtype, device.clone())
}
