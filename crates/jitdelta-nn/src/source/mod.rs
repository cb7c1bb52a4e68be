//! Layer sources: where model code gets its projections and plain tensors.
//!
//! Models ask a [`LayerSource`] for each projection by name and get an
//! `Arc<dyn LinearLayer>`; for embeddings and norms they get plain tensors. Swapping
//! [`DenseSource`] for [`JitSource`] changes where the weights live and how they are rebuilt,
//! never the model code (the idea of mistral.rs' `QuantMethod`).

mod dense;
mod jit;

pub use dense::DenseSource;
pub use jit::{JitOptions, JitSource, WeightLayout};

use crate::{Error, LinearLayer, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Where a model's weights come from.
pub trait LayerSource: Send + Sync {
    /// Where the weights are read from (a folder or file path), for messages.
    fn origin(&self) -> &str;

    /// The device the model runs on.
    fn device(&self) -> &Device;

    /// The dtype activations and rebuilt weights are computed in ([`compute_dtype`]).
    fn dtype(&self) -> DType;

    /// Whether the weights hold a tensor of that name.
    fn contains(&self, name: &str) -> bool;

    /// A plain tensor (embedding table, norm weight, ...) in its stored dtype, checked against
    /// `shape`. Errors name the tensor when it is missing or shaped differently.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The projection `name` (its weight is `{name}.weight`, shape `(out, in)`; with `bias`,
    /// `{name}.bias`, shape `(out,)`). Errors name the tensor when it is missing or shaped
    /// differently.
    fn linear(&self, name: &str, shape: (usize, usize), bias: bool)
        -> Result<Arc<dyn LinearLayer>>;

    /// An auxiliary file of the model (`config.json`, `tokenizer.json`, ...), if present.
    fn file(&self, name: &str) -> Result<Option<Vec<u8>>>;

    /// Bytes of weights handed out so far (layers and plain tensors), as held in memory.
    fn weight_bytes(&self) -> usize;
}

pub(crate) fn check_shape(name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}

pub(crate) fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// The compute dtype both sources use: F32 on the CPU (exact sums of BF16 products), BF16 on
/// CUDA (what the GPU kernels and cuBLAS multiply; accumulation stays f32 inside them).
pub fn compute_dtype(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}
