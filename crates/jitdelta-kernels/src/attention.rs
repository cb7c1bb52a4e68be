//! Decode attention for short query blocks that continue a sequence: single-token decode steps
//! and speculative verify passes. The CUDA kernel (`gpu::Attention`, feature `cuda`) computes
//! each (query row, head) on its own, so a verify pass over `k` rows is bit-identical to `k`
//! single-token steps, in one launch instead of one attention per row. This module holds the
//! shape checks and the CPU reference the kernel is tested against.

use crate::{Error, Result};
use half::bf16;

/// Largest head dimension the kernel takes (a multiple of 32).
pub const MAX_HEAD_DIM: usize = 256;

/// Shapes of one attention call. `q` is `(heads, rows, head_dim)`, `k` and `v` are
/// `(kv_heads, total, head_dim)`, all row-major; the output is `(rows, heads, head_dim)`.
/// Query row `i` sits at position `total - rows + i` and attends to positions `0..=` that.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query rows (new positions).
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention: `heads` is a multiple).
    pub kv_heads: usize,
    /// Positions held in `k` and `v`, the new ones included.
    pub total: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Checks the shape is one the kernel takes.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Shape(format!("attention {self:?}: {why}")));
        if self.rows == 0 || self.rows > self.total {
            return bad("needs 1 <= rows <= total".into());
        }
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return bad("heads must be a positive multiple of kv_heads".into());
        }
        if self.head_dim == 0 || self.head_dim % 32 != 0 || self.head_dim > MAX_HEAD_DIM {
            return bad(format!(
                "head_dim must be a multiple of 32 up to {MAX_HEAD_DIM}"
            ));
        }
        Ok(())
    }

    /// Elements of `q`, of `k` (= of `v`) and of the output.
    pub fn lens(&self) -> (usize, usize, usize) {
        let d = self.head_dim;
        (
            self.heads * self.rows * d,
            self.kv_heads * self.total * d,
            self.rows * self.heads * d,
        )
    }
}

/// Softmax attention in f64 with scale `1 / sqrt(head_dim)`: the CPU reference.
pub fn reference(s: &AttentionShape, q: &[bf16], k: &[bf16], v: &[bf16]) -> Result<Vec<f64>> {
    s.check()?;
    let (q_len, kv_len, out_len) = s.lens();
    if q.len() != q_len || k.len() != kv_len || v.len() != kv_len {
        return Err(Error::Shape(format!(
            "attention {s:?}: q {}, k {}, v {} elements",
            q.len(),
            k.len(),
            v.len()
        )));
    }
    let d = s.head_dim;
    let scale = 1.0 / (d as f64).sqrt();
    let f = |x: bf16| x.to_f64();
    let mut out = vec![0.0; out_len];
    for row in 0..s.rows {
        let n = s.total - s.rows + row + 1;
        for h in 0..s.heads {
            let g = h / (s.heads / s.kv_heads);
            let qh = &q[(h * s.rows + row) * d..][..d];
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    let kj = &k[(g * s.total + j) * d..][..d];
                    qh.iter().zip(kj).map(|(&a, &b)| f(a) * f(b)).sum::<f64>() * scale
                })
                .collect();
            let big = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - big).exp()).collect();
            let sum: f64 = weights.iter().sum();
            let o = &mut out[(row * s.heads + h) * d..][..d];
            for (j, w) in weights.iter().enumerate() {
                let vj = &v[(g * s.total + j) * d..][..d];
                for (oe, &ve) in o.iter_mut().zip(vj) {
                    *oe += w / sum * f(ve);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_shapes_the_kernel_cannot_take() {
        let ok = AttentionShape {
            rows: 2,
            heads: 8,
            kv_heads: 2,
            total: 5,
            head_dim: 64,
        };
        assert!(ok.check().is_ok());
        for bad in [
            AttentionShape { rows: 0, ..ok },
            AttentionShape { rows: 6, ..ok },
            AttentionShape { kv_heads: 3, ..ok },
            AttentionShape { kv_heads: 0, ..ok },
            AttentionShape { head_dim: 48, ..ok },
            AttentionShape {
                head_dim: 288,
                ..ok
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_position_returns_its_value_and_equal_scores_average() {
        let s = AttentionShape {
            rows: 1,
            heads: 1,
            kv_heads: 1,
            total: 1,
            head_dim: 32,
        };
        let q = vec![bf16::from_f32(0.5); 32];
        let k = vec![bf16::from_f32(-1.0); 32];
        let v: Vec<bf16> = (0..32).map(|i| bf16::from_f32(i as f32)).collect();
        let y = reference(&s, &q, &k, &v).unwrap();
        assert_eq!(y, (0..32).map(|i| i as f64).collect::<Vec<_>>());
        // Two positions with equal keys: the mean of their values.
        let s2 = AttentionShape { total: 2, ..s };
        let k2 = vec![bf16::from_f32(1.0); 64];
        let v2: Vec<bf16> = (0..64)
            .map(|i| bf16::from_f32((i % 32) as f32 + if i < 32 { 0.0 } else { 2.0 }))
            .collect();
        let y2 = reference(&s2, &q, &k2, &v2).unwrap();
        assert!(y2
            .iter()
            .enumerate()
            .all(|(i, &y)| (y - (i as f64 + 1.0)).abs() < 1e-12));
    }
}
