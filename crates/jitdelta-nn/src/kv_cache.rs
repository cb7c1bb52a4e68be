//! A per-layer key/value cache that can be truncated (speculative decoding rolls back the
//! tokens the verifier rejects).

use crate::{Error, Result};
use candle_core::Tensor;

/// Keys and values of every attention layer for the positions seen so far, each of shape
/// `(batch, kv_heads, positions, head_dim)`.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` attention layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Number of positions held (the position offset of the next forward call).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Keeps the first `len` positions and drops the rest (`len >= self.len()` keeps all).
    /// Also repairs layers left longer than the others by a failed forward call.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let len = len.min(self.len);
        for kv in &mut self.layers {
            *kv = match kv.take() {
                Some(_) if len == 0 => None,
                Some((k, v)) if k.dim(2)? > len => {
                    Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))
                }
                other => other,
            };
        }
        self.len = len;
        Ok(())
    }

    /// Drops every position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|kv| *kv = None);
        self.len = 0;
    }

    /// Appends `k`, `v` (`(batch, kv_heads, new, head_dim)`) to layer `layer` and returns the
    /// layer's full keys and values.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::InvalidInput(format!("KV cache has no layer {layer}")))?;
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k.contiguous()?, v.contiguous()?),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Records that a forward pass added `n` positions to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
