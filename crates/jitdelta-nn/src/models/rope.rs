//! Rotary position embeddings (the "rotate half" form of Hugging Face's Llama), with the
//! linear and Llama 3 frequency scalings.

use crate::Result;
use candle_core::{Device, Tensor};
use std::f32::consts::PI;

/// How the rotary frequencies are rescaled for longer contexts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Scaling {
    None,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The inverse frequencies of one head dimension; angles are computed per call (a few
/// thousand `sin`/`cos` per token, shared by all layers).
#[derive(Clone, Debug)]
pub(crate) struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub(crate) fn new(head_dim: usize, theta: f64, scaling: Scaling) -> Self {
        let theta = theta as f32;
        let base = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32));
        let inv_freq = match scaling {
            Scaling::None => base.collect(),
            Scaling::Linear { factor } => base.map(|f| f / factor as f32).collect(),
            Scaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, original) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                base.map(|f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
            }
        };
        Self { inv_freq }
    }

    /// `(cos, sin)`, each `(len, head_dim / 2)`, for positions `offset..offset + len`.
    pub(crate) fn cos_sin(
        &self,
        offset: usize,
        len: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = self.angles(offset, len);
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// `cos` and `sin` as one BF16 tensor `(2, len, head_dim / 2)`, rounded on the host as
    /// `cos_sin` followed by a cast to BF16 rounds them: the fused rope kernel's table, one
    /// upload a forward pass.
    #[cfg(feature = "cuda")]
    pub(crate) fn cos_sin_bf16(
        &self,
        offset: usize,
        len: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let (cos, sin) = self.angles(offset, len);
        let packed: Vec<half::bf16> = cos
            .into_iter()
            .chain(sin)
            .map(half::bf16::from_f32)
            .collect();
        Ok(Tensor::from_vec(
            packed,
            (2, len, self.inv_freq.len()),
            device,
        )?)
    }

    /// The cosines and sines of positions `offset..offset + len`, `(len, head_dim / 2)` each.
    fn angles(&self, offset: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let angles: Vec<f32> = (offset..offset + len)
            .flat_map(|p| self.inv_freq.iter().map(move |&f| p as f32 * f))
            .collect();
        (
            angles.iter().map(|a| a.cos()).collect(),
            angles.iter().map(|a| a.sin()).collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_scales_low_frequencies() {
        let plain = Rope::new(128, 500_000.0, Scaling::None);
        let scaled = Rope::new(
            128,
            500_000.0,
            Scaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        );
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert_eq!(plain.inv_freq[last] / 8.0, scaled.inv_freq[last]);
    }
}
