//! Decode attention for short query blocks that continue a sequence: single-token decode steps
//! and speculative verify passes. The CUDA kernel (`gpu::DecoderKernels`, feature `cuda`) computes
//! each (query row, head) on its own, so a verify pass over `k` rows is bit-identical to `k`
//! single-token steps, in one launch instead of one attention per row: partial softmaxes over
//! splits of 64 positions (many blocks even for one query row), merged in split order by the
//! row's last block to finish.
//! This module holds the shape checks and the CPU reference the kernels are tested against.

use crate::{Error, Result};
use half::bf16;

/// Largest head dimension the kernel takes (a multiple of 32).
pub const MAX_HEAD_DIM: usize = 256;

/// Shapes of one attention call. `q` is `(heads, rows, head_dim)` and the output
/// `(rows, heads, head_dim)`, row-major; `k` and `v` hold `total` positions of each head in
/// `(kv_heads, kv_capacity, head_dim)` row-major buffers (a KV cache with room to spare is read
/// in place; positions `total..kv_capacity` are never read). Query row `i` sits at position
/// `total - rows + i` and attends to positions `0..=` that.
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
    /// Positions per head in the memory of `k` and `v` (`>= total`; `total` for packed heads):
    /// head `h` starts at element `h * kv_capacity * head_dim`.
    pub kv_capacity: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl AttentionShape {
    /// Checks the shape is one the kernel takes.
    pub fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::Shape(format!("attention {self:?}: {why}")));
        if self.rows == 0 || self.rows > self.total || self.total > self.kv_capacity {
            return bad("needs 1 <= rows <= total <= kv_capacity".into());
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

    /// Elements of `q`, of `k` (= of `v`) and of the output. `k` runs from the first head's
    /// first position to the last head's position `total - 1`: a buffer's unused positions
    /// past that may be left out (a view of a cache's filled positions ends there).
    pub fn lens(&self) -> (usize, usize, usize) {
        let d = self.head_dim;
        (
            self.heads * self.rows * d,
            (self.kv_heads.saturating_sub(1) * self.kv_capacity + self.total) * d,
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
                    let kj = &k[(g * s.kv_capacity + j) * d..][..d];
                    qh.iter().zip(kj).map(|(&a, &b)| f(a) * f(b)).sum::<f64>() * scale
                })
                .collect();
            let big = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - big).exp()).collect();
            let sum: f64 = weights.iter().sum();
            let o = &mut out[(row * s.heads + h) * d..][..d];
            for (j, w) in weights.iter().enumerate() {
                let vj = &v[(g * s.kv_capacity + j) * d..][..d];
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
            kv_capacity: 5,
            head_dim: 64,
        };
        assert!(ok.check().is_ok());
        assert!(AttentionShape {
            kv_capacity: 9,
            ..ok
        }
        .check()
        .is_ok());
        for bad in [
            AttentionShape { rows: 0, ..ok },
            AttentionShape { rows: 6, ..ok },
            AttentionShape { kv_heads: 3, ..ok },
            AttentionShape { kv_heads: 0, ..ok },
            AttentionShape {
                kv_capacity: 4,
                ..ok
            },
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
            kv_capacity: 1,
            head_dim: 32,
        };
        let q = vec![bf16::from_f32(0.5); 32];
        let k = vec![bf16::from_f32(-1.0); 32];
        let v: Vec<bf16> = (0..32).map(|i| bf16::from_f32(i as f32)).collect();
        let y = reference(&s, &q, &k, &v).unwrap();
        assert_eq!(y, (0..32).map(|i| i as f64).collect::<Vec<_>>());
        // Two positions with equal keys: the mean of their values.
        let s2 = AttentionShape {
            total: 2,
            kv_capacity: 2,
            ..s
        };
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

    #[test]
    fn a_capacity_past_total_reads_the_same_positions() {
        let packed = AttentionShape {
            rows: 3,
            heads: 6,
            kv_heads: 3,
            total: 7,
            kv_capacity: 7,
            head_dim: 32,
        };
        let wide = AttentionShape {
            kv_capacity: 11,
            ..packed
        };
        let d = packed.head_dim;
        let value = |i: usize| bf16::from_f32(((i * 37) % 101) as f32 / 50.0 - 1.0);
        let q: Vec<bf16> = (0..packed.lens().0).map(value).collect();
        let k: Vec<bf16> = (0..packed.lens().1).map(|i| value(i + 7)).collect();
        let v: Vec<bf16> = (0..packed.lens().1).map(|i| value(i + 13)).collect();
        // The same heads 11 positions apart, NaN in the unused positions between them.
        let spread = |t: &[bf16]| -> Vec<bf16> {
            t.chunks(packed.total * d)
                .flat_map(|head| {
                    let pad = (wide.kv_capacity - wide.total) * d;
                    head.iter()
                        .copied()
                        .chain(std::iter::repeat_n(bf16::NAN, pad))
                })
                .take(wide.lens().1)
                .collect()
        };
        let (wk, wv) = (spread(&k), spread(&v));
        assert_eq!(wk.len(), (2 * 11 + 7) * d);
        let want = reference(&packed, &q, &k, &v).unwrap();
        assert!(want.iter().all(|y| y.is_finite()));
        assert_eq!(reference(&wide, &q, &wk, &wv).unwrap(), want);
        // The last head's unused tail is past what the kernel reads: a buffer with it is refused.
        let mut long = wk.clone();
        long.extend(std::iter::repeat_n(bf16::NAN, 4 * d));
        assert!(reference(&wide, &q, &long, &wv).is_err());
    }
}
