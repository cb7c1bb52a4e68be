//! Fused elementwise ops of a decoder block, one launch each where candle needs two: the
//! residual add followed by the next RMSNorm, and SwiGLU's `silu(gate) * up`. The CUDA kernels
//! (`gpu::DecoderKernels`, feature `cuda`) compute in f32 with BF16 in and out; this module holds
//! their shape checks and the f64 CPU references they are tested against.
//!
//! Semantics, per row of `cols` elements:
//! - add + RMSNorm: `s = bf16(x + y)` (the sum rounded to nearest even, as candle's BF16 add),
//!   `h = s / sqrt(mean(s^2) + eps) * w`. The kernel sums the squares in f32: rows whose mean
//!   square overflows f32 (an RMS past ~1.8e19) come out as zeros. An infinite `s` makes its
//!   row's `h` NaN where `s` is infinite and 0 elsewhere, a NaN makes the row NaN: as in f64.
//! - silu * up: `silu(g) * u` with `silu(g) = g / (1 + exp(-g))`, rounded once. In f32,
//!   `exp(-g)` overflows for `g < -88.7`, where the kernel returns `-0 * u` for values the f64
//!   reference keeps (below 1e-36 in magnitude); `silu(-inf)` is NaN in both.

use crate::{Error, Result};
use half::bf16;

/// Rows of an add + RMSNorm over `x` and `y` of `len` elements each and a weight of `w_len`:
/// `len / cols`, or an error unless `cols > 0` divides `len` and equals `w_len`.
pub fn add_rms_norm_rows(x_len: usize, y_len: usize, w_len: usize, cols: usize) -> Result<usize> {
    if cols == 0 || x_len % cols != 0 || y_len != x_len || w_len != cols {
        return Err(Error::Shape(format!(
            "add + RMSNorm: x of {x_len}, y of {y_len} and w of {w_len} elements for rows of \
             {cols}"
        )));
    }
    Ok(x_len / cols)
}

/// Checks the inputs of silu * up are the same length.
pub fn check_silu_mul(gate_len: usize, up_len: usize) -> Result<()> {
    if gate_len != up_len {
        return Err(Error::Shape(format!(
            "silu * up: gate of {gate_len} and up of {up_len} elements"
        )));
    }
    Ok(())
}

/// The CPU reference of add + RMSNorm over rows of `cols`: the rounded sums `s` (what the
/// kernel must return bit for bit) and the normalised rows in f64.
pub fn add_rms_norm(
    x: &[bf16],
    y: &[bf16],
    w: &[bf16],
    eps: f32,
    cols: usize,
) -> Result<(Vec<bf16>, Vec<f64>)> {
    add_rms_norm_rows(x.len(), y.len(), w.len(), cols)?;
    // The f32 sum of two BF16 values rounds to the same BF16 as their exact sum: f32 holds it
    // exactly unless the smaller term is under 2^-15 of the larger, far below a rounding point.
    let s: Vec<bf16> = x
        .iter()
        .zip(y)
        .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
        .collect();
    let h = s
        .chunks(cols)
        .flat_map(|row| {
            let mean_sq = row.iter().map(|v| v.to_f64().powi(2)).sum::<f64>() / cols as f64;
            let scale = 1.0 / (mean_sq + f64::from(eps)).sqrt();
            row.iter()
                .zip(w)
                .map(move |(v, w)| v.to_f64() * scale * w.to_f64())
        })
        .collect();
    Ok((s, h))
}

/// The CPU reference of silu * up in f64.
pub fn silu_mul(gate: &[bf16], up: &[bf16]) -> Result<Vec<f64>> {
    check_silu_mul(gate.len(), up.len())?;
    Ok(gate
        .iter()
        .zip(up)
        .map(|(g, u)| {
            let g = g.to_f64();
            g / (1.0 + (-g).exp()) * u.to_f64()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf(v: &[f32]) -> Vec<bf16> {
        v.iter().map(|&v| bf16::from_f32(v)).collect()
    }

    #[test]
    fn add_rms_norm_rounds_the_sum_and_normalises_each_row() {
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even, 1.
        let x = bf(&[1.0, 3.0, 0.0, 0.0, 2.0, -2.0]);
        let y = bf(&[2f32.powi(-8), 1.0, 0.0, 0.0, 2.0, 2.0]);
        let w = bf(&[1.0, 2.0]);
        let (s, h) = add_rms_norm(&x, &y, &w, 0.0, 2).unwrap();
        assert_eq!(s, bf(&[1.0, 4.0, 0.0, 0.0, 4.0, 0.0]));
        // Row 0: rms = sqrt((1 + 16) / 2).
        let r = (17.0f64 / 2.0).sqrt();
        assert_eq!(h[0], 1.0 / r);
        assert_eq!(h[1], 4.0 / r * 2.0);
        // A zero row without eps divides 0 by 0; row 2: rms sqrt(8), so 4 / sqrt(8) and 0.
        assert!(h[2].is_nan() && h[3].is_nan());
        assert!((h[4] - 2f64.sqrt()).abs() < 1e-15 && h[5] == 0.0);
        // With eps a zero row stays zero.
        let (_, h) = add_rms_norm(&x, &y, &w, 1e-6, 2).unwrap();
        assert_eq!(&h[2..4], &[0.0, 0.0]);
    }

    #[test]
    fn add_rms_norm_propagates_inf_and_nan() {
        let x = bf(&[f32::INFINITY, 1.0, f32::NAN, 1.0]);
        let y = bf(&[0.0; 4]);
        let (s, h) = add_rms_norm(&x, &y, &bf(&[1.0, 1.0]), 1e-5, 2).unwrap();
        assert!(s[0].is_infinite() && s[2].is_nan());
        assert!(h[0].is_nan() && h[1] == 0.0);
        assert!(h[2].is_nan() && h[3].is_nan());
    }

    #[test]
    fn silu_mul_matches_its_definition() {
        let g = bf(&[
            0.0,
            1.0,
            -1.0,
            20.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ]);
        let y = silu_mul(&g, &bf(&[3.0; 7])).unwrap();
        let silu = |g: f64| g / (1.0 + (-g).exp());
        assert_eq!(y[0], 0.0);
        assert_eq!(y[1], silu(1.0) * 3.0);
        assert_eq!(y[2], silu(-1.0) * 3.0);
        assert!((y[3] - 60.0).abs() < 1e-6);
        assert_eq!(y[4], f64::INFINITY);
        assert!(y[5].is_nan() && y[6].is_nan());
    }

    #[test]
    fn bad_lengths_are_shape_errors() {
        let v = bf(&[1.0; 6]);
        assert_eq!(add_rms_norm_rows(6, 6, 3, 3).unwrap(), 2);
        for (x, y, w, cols) in [(6, 6, 3, 0), (6, 6, 4, 4), (6, 5, 3, 3), (6, 6, 2, 3)] {
            assert!(matches!(
                add_rms_norm_rows(x, y, w, cols),
                Err(Error::Shape(_))
            ));
        }
        assert!(matches!(
            add_rms_norm(&v, &v[..5], &v[..3], 1e-5, 3),
            Err(Error::Shape(_))
        ));
        assert!(matches!(silu_mul(&v, &v[..5]), Err(Error::Shape(_))));
    }
}
