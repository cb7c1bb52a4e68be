//! The linear-layer trait model code is written against, and the plain dense layer.

use crate::JitLinear;
use candle_core::{DType, Module, Tensor};
use std::sync::Arc;

/// A linear projection `y = x W^T + b` as model code sees it: whatever holds the weights (a
/// dense tensor, a [`JitLinear`]), models call [`Module::forward`] on an
/// `Arc<dyn LinearLayer>` handed out by a [`LayerSource`](crate::LayerSource).
pub trait LinearLayer: Module + Send + Sync + std::fmt::Debug {
    /// The projection's name in the checkpoint, without `.weight` (e.g.
    /// `model.layers.0.self_attn.q_proj`).
    fn name(&self) -> &str;

    /// `(out_features, in_features)`: the weight's shape.
    fn shape(&self) -> (usize, usize);

    /// The dtype the weights were stored in (e.g. BF16), not the compute dtype.
    fn stored_dtype(&self) -> DType;

    /// Bytes of weights (and bias) this layer keeps in memory.
    fn bytes_held(&self) -> usize;

    /// The JIT layer behind this projection, if it is one.
    fn as_jit(&self) -> Option<&JitLinear> {
        None
    }
}

/// The layers' outputs for one input `x` (a block's q, k and v; gate and up): in one grouped
/// launch where the layers are JIT layers in GPU memory and the kernel takes them, else one by
/// one. Either way each output is bit for bit the layer's own `forward`.
pub(crate) fn forward_all<const N: usize>(
    layers: [&Arc<dyn LinearLayer>; N],
    x: &Tensor,
) -> crate::Result<[Tensor; N]> {
    let ys = match grouped(&layers, x)? {
        Some(ys) => ys,
        None => layers
            .iter()
            .map(|l| l.forward(x))
            .collect::<candle_core::Result<Vec<_>>>()?,
    };
    ys.try_into().map_err(|ys: Vec<Tensor>| {
        crate::Error::InvalidInput(format!("{} outputs for {N} layers", ys.len()))
    })
}

/// Declares that `layers` run together ([`forward_all`]) for the life of the model: JIT layers
/// in GPU memory then pick their kernel by the group's size in every launch, grouped or not,
/// so a layer's output does not depend on whether it ran in the group (routed mode runs them
/// one by one). Call it once at load, before any forward pass.
pub(crate) fn declare_group(layers: &[&Arc<dyn LinearLayer>]) {
    #[cfg(feature = "cuda")]
    if let Some(jits) = layers
        .iter()
        .map(|l| l.as_jit())
        .collect::<Option<Vec<_>>>()
    {
        JitLinear::launch_together(&jits);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = layers;
}

#[cfg(feature = "cuda")]
fn grouped(
    layers: &[&Arc<dyn LinearLayer>],
    x: &Tensor,
) -> candle_core::Result<Option<Vec<Tensor>>> {
    match layers
        .iter()
        .map(|l| l.as_jit())
        .collect::<Option<Vec<_>>>()
    {
        Some(jits) => JitLinear::forward_group(&jits, x),
        None => Ok(None),
    }
}

#[cfg(not(feature = "cuda"))]
fn grouped(_: &[&Arc<dyn LinearLayer>], _: &Tensor) -> candle_core::Result<Option<Vec<Tensor>>> {
    Ok(None)
}

/// The matmul every linear layer of this crate ends in: `x` of shape `(.., in)` times the
/// transpose of `w` (`(out, in)`), plus the bias. Dense and JIT layers share it, so a JIT
/// layer in exact mode gives bit-identical outputs to the dense layer.
pub(crate) fn linear_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (&k, lead) = dims
        .split_last()
        .ok_or_else(|| candle_core::Error::Msg("linear layer input is a scalar".into()))?;
    let m: usize = lead.iter().product();
    let y = x.reshape((m, k))?.matmul(&w.t()?)?;
    let mut out_dims = lead.to_vec();
    out_dims.push(w.dim(0)?);
    let y = y.reshape(out_dims)?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// A linear layer holding its weights as a plain tensor in the compute dtype.
#[derive(Clone, Debug)]
pub struct DenseLinear {
    name: String,
    weight: Tensor,
    bias: Option<Tensor>,
    stored_dtype: DType,
}

impl DenseLinear {
    /// A dense layer from `weight` (`(out, in)`, already in the compute dtype) and an optional
    /// bias (`(out,)`); `stored_dtype` is the dtype the checkpoint held.
    pub fn new(name: &str, weight: Tensor, bias: Option<Tensor>, stored_dtype: DType) -> Self {
        Self {
            name: name.to_string(),
            weight,
            bias,
            stored_dtype,
        }
    }

    /// The weight tensor.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for DenseLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        linear_forward(x, &self.weight, self.bias.as_ref())
    }
}

impl LinearLayer for DenseLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    fn stored_dtype(&self) -> DType {
        self.stored_dtype
    }

    fn bytes_held(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(&self.weight) + self.bias.as_ref().map_or(0, bytes)
    }
}
