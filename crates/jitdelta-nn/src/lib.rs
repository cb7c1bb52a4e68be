//! # jitdelta-nn
//!
//! Just-in-time linear layers for candle. A model's weights stay compressed in memory (the
//! jitdelta resident layout, ~75% of BF16, or the compact at-rest form, ~66%) and each
//! [`JitLinear`] rebuilds its weights for its matmul, as a shared [`ModeHandle`] says:
//!
//! - [`Mode::Exact`]: bit-identical weights; the model's logits are bit-identical to the
//!   dense model run by the same code,
//! - [`Mode::Draft`]: the base (draft) value of every weight, reading ~2/3 of the resident bytes,
//! - [`Mode::Routed`]: the draft everywhere plus the exact residual of chosen row chunks per
//!   layer (what a chunk router drives).
//!
//! Models are written against a [`LayerSource`], which hands out each projection as an
//! `Arc<dyn LinearLayer>` and embeddings and norms as plain tensors. Swapping the source from
//! dense safetensors to a jitdelta file is the only change:
//!
//! ```no_run
//! use candle_core::Device;
//! use jitdelta_nn::models::{greedy_generate, Llama, LlamaConfig};
//! use jitdelta_nn::{DenseSource, JitOptions, JitSource, LayerSource};
//!
//! # fn main() -> jitdelta_nn::Result<()> {
//! // Dense: let source = DenseSource::open("SmolLM2-135M-Instruct/", &Device::Cpu)?;
//! let source = JitSource::open("smollm2.jd", &Device::Cpu, JitOptions::default())?;
//! let model = Llama::load(&source, &LlamaConfig::from_source(&source)?)?;
//! let tokens = greedy_generate(&model, &[1, 504, 3458], 8, &[2])?;
//! # let _ = (tokens, DenseSource::open("m", &Device::Cpu)); Ok(()) }
//! ```
//!
//! Switching the whole model to the draft, or routing exact chunks, needs no reload:
//!
//! ```no_run
//! # use jitdelta_nn::{ChunkSet, JitSource, Mode};
//! # fn f(source: &JitSource) {
//! source.set_mode(Mode::Draft);
//! source.mode().set_route("model.layers.0.mlp.up_proj", ChunkSet::from_iter([0, 3]));
//! source.set_mode(Mode::Routed);
//! # }
//! ```
//!
//! On CUDA (feature `cuda`), [`JitSource`] keeps BF16 weights in GPU memory in the device layout
//! of `jitdelta-kernels` and multiplies with its fused decode-GEMV kernels; open the device with
//! [`cuda_device`]. Other devices rebuild the weights on the host and upload them.
#![deny(missing_docs)]

pub mod chat;
mod device;
mod error;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod gpu_ops;
mod jit_linear;
mod kv_cache;
mod linear;
mod mode;
pub mod models;
mod runtime;
mod source;
mod store;
pub mod varbuilder;

pub use device::cuda_device;
pub use error::{Error, Result};
pub use jit_linear::JitLinear;
pub use kv_cache::KvCache;
pub use linear::{DenseLinear, LinearLayer};
pub use mode::{ChunkSet, Mode, ModeHandle};
pub use models::{CausalLm, ForwardOutput, Logits, ModelInfo};
pub use source::{compute_dtype, DenseSource, JitOptions, JitSource, LayerSource, WeightLayout};

/// Rows a JIT layer on CUDA multiplies in one fused decode-GEMV launch: a forward pass over
/// more positions (a long speculative verify block) runs its layers in several launches, and
/// from a prefill's size on decodes the weights for cuBLAS instead.
pub const GPU_FUSED_ROWS: usize = 8;
