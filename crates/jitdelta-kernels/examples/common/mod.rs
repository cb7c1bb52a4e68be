//! What the GPU examples share: the kernels they time, synthetic weights and activations.

use cudarc::driver::CudaStream;
use half::bf16;
use jitdelta_kernels::gpu::Kernels;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::sync::Arc;

/// The product's kernels (every size class) without `defines`, else one GEMV variant compiled
/// with those tuning knobs for every tensor.
pub fn kernels(
    stream: &Arc<CudaStream>,
    defines: &[String],
) -> Result<Kernels, jitdelta_kernels::Error> {
    let defines: Vec<&str> = defines.iter().map(String::as_str).collect();
    if defines.is_empty() {
        Kernels::new(stream.clone())
    } else {
        Kernels::with_defines(stream.clone(), &defines)
    }
}

/// Synthetic weights with real-weight statistics, deterministic per seed; a `zeros` fraction
/// of them exact zeros.
pub fn synthetic(rows: usize, cols: usize, seed: u64, zeros: f32) -> Vec<bf16> {
    let mut w = vec![bf16::ZERO; rows * cols];
    w.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let scale = 0.02 * (0.5 + rng.random::<f32>());
        for v in row.iter_mut() {
            let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            let tail = if rng.random::<f32>() < 0.001 {
                8.0
            } else {
                1.0
            };
            // No extra draw without zeros: the same weights as before the option.
            *v = if zeros > 0.0 && rng.random::<f32>() < zeros {
                bf16::ZERO
            } else {
                bf16::from_f32(z * scale * tail)
            };
        }
    });
    w
}

/// `n` activations uniform in [-1, 1), deterministic per seed.
pub fn activations(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| bf16::from_f32(rng.random::<f32>() * 2.0 - 1.0))
        .collect()
}
