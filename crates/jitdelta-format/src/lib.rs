//! # jitdelta-format
//!
//! The jitdelta container: every float weight matrix stored as a **base** (a usable draft of the
//! tensor on its own) plus an **exact residual** that restores every original bit, split into
//! row chunks that decode independently.
//!
//! - At rest the default base is the *nested bit plane*: sign, exponent and the top `d` mantissa
//!   bits, with the exponent Huffman coded. The file sits at the entropy floor of real BF16 weights
//!   (~66% of BF16); the draft precision `d` does not change the size.
//! - A second base kind, *affine int4* with a per-code residual, is chosen per tensor where it
//!   is smaller (weights that were already quantized).
//! - In memory, [`ResidentTensor`] holds fixed-length bit planes (12 bits a BF16 weight) that
//!   decode several times faster and that GPU kernels read directly.
//!
//! ```no_run
//! use jitdelta_format::{compress_model, DraftDtype, EncodeOptions, JdFile};
//! # fn main() -> jitdelta_format::Result<()> {
//! compress_model("model.safetensors".as_ref(), "model.jd".as_ref(), &EncodeOptions::default(), false)?;
//! let jd = JdFile::open("model.jd")?;
//! let w = jd.tensor("model.layers.0.mlp.up_proj.weight")?;
//! let exact: Vec<u8> = w.decode_exact()?;              // original BF16 bytes, bit for bit
//! let draft: Vec<u8> = w.decode_draft(DraftDtype::F32)?; // base only, as f32
//! let resident = w.to_resident(3)?;                      // 12-bit fixed-length planes
//! let mut again = vec![0u8; exact.len()];
//! resident.decode_exact(&mut again)?;
//! assert_eq!(exact, again);
//! # let _ = draft; Ok(()) }
//! ```
//!
//! The byte layout is specified in `docs/format.md` of the repository.
#![deny(missing_docs)]

// The hot loops store words in native byte order, which is the format's order only here.
#[cfg(not(target_endian = "little"))]
compile_error!("jitdelta-format supports little-endian targets only");

pub mod affine;
pub mod bitpack;
pub mod bitplane;
pub mod container;
pub mod convert;
mod error;
pub mod float;
pub mod huffman;
mod lanes;
pub mod rans;
pub mod reader;
pub mod resident;
mod section;
pub mod stats;
pub mod writer;

pub use container::{Encoding, Index, TensorEntry};
pub use convert::{compress_model, decompress_model, verify_model, CompressReport, VerifyReport};
pub use error::{Error, Result};
pub use float::{DraftDtype, FloatFormat};
pub use reader::{JdFile, TensorView};
pub use resident::ResidentTensor;
pub use stats::{file_stats, FileStats, TensorStats};
pub use writer::{BaseKind, EncodeOptions, JdWriter};
