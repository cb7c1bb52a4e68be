//! Fused elementwise ops of a decoder block, one launch each where candle needs several: the
//! residual add followed by the next RMSNorm, SwiGLU's `silu(gate) * up`, and the rotary
//! embedding of queries and keys together with the KV-cache write ([`RopeKvShape`]). The CUDA
//! kernels (`gpu::DecoderKernels`, feature `cuda`) compute in f32 with BF16 in and out; this
//! module holds their shape checks and the CPU references they are tested against.
//!
//! Semantics, per row of `cols` elements:
//! - add + RMSNorm: `s = bf16(x + y)` (the sum rounded to nearest even, as candle's BF16 add),
//!   `h = s / sqrt(mean(s^2) + eps) * w`. The kernel sums the squares in f32: rows whose mean
//!   square overflows f32 (an RMS past ~1.8e19) come out as zeros. An infinite `s` makes its
//!   row's `h` NaN where `s` is infinite and 0 elsewhere, a NaN makes the row NaN: as in f64.
//! - silu * up: `silu(g) * u` with `silu(g) = g / (1 + exp(-g))`, rounded once. In f32,
//!   `exp(-g)` overflows for `g < -88.7`, where the kernel returns `-0 * u` for values the f64
//!   reference keeps (below 1e-36 in magnitude); `silu(-inf)` is NaN in both.
//! - rope + KV write: rotate-half rotary embedding, `y1 = x1 c - x2 s`, `y2 = x1 s + x2 c` over
//!   the two halves of each head, the products exact in f32, each sum rounded to f32 and then
//!   to BF16 (nearest even; NaN stays NaN). The reference computes the same bits.
//! - logit stats: the reductions a greedy speculative draft reads from a row of f32 logits
//!   ([`logit_stats`]), one launch where candle takes some sixteen.

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

/// Shapes of a rope + KV write ([`rope_kv`]): one step's `rows` new positions, stored at
/// positions `start..start + rows` of a KV cache buffer with room for `kv_capacity`.
///
/// Layouts, all row-major BF16:
/// - the input buffer holds the q, k and v projections as blocks `(rows, heads, head_dim)`,
///   `(rows, kv_heads, head_dim)` twice, starting at [`RopeKvShape::offsets`]'s elements (a
///   grouped GEMV's output, or three tensors packed one after the other);
/// - `cos_sin` is `(2, rows, head_dim / 2)`: cos, then sin, of each row's position;
/// - the rotated queries come out as `(heads, rows, head_dim)` (the attention kernel's `q`);
/// - the cache buffer is `(2, kv_heads, kv_capacity, head_dim)`: keys (rotated), then values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeKvShape {
    /// New positions.
    pub rows: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Elements per head (even; at most 2048, one thread per pair).
    pub head_dim: usize,
    /// Positions per head in the cache buffer.
    pub kv_capacity: usize,
    /// The position of the first new row.
    pub start: usize,
    /// Element offsets of the q, k and v blocks in the input buffer.
    pub offsets: [usize; 3],
}

impl RopeKvShape {
    /// Largest head dimension: its pairs are one block of at most 1024 threads.
    pub const MAX_HEAD_DIM: usize = 2048;

    /// Checks the shape and that an input buffer of `input_len` elements holds the three
    /// blocks.
    pub fn check(&self, input_len: usize) -> Result<()> {
        let bad = |why: &str| Err(Error::Shape(format!("rope + KV write {self:?}: {why}")));
        if self.rows == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad("rows, heads and kv_heads must be > 0");
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 || self.head_dim > Self::MAX_HEAD_DIM {
            return bad("head_dim must be even, from 2 to 2048");
        }
        if self
            .start
            .checked_add(self.rows)
            .is_none_or(|end| end > self.kv_capacity)
        {
            return bad("positions start..start + rows must fit the capacity");
        }
        let (q, kv) = self.block_lens();
        let fits = |at: usize, len: usize| at.checked_add(len).is_some_and(|e| e <= input_len);
        let [qo, ko, vo] = self.offsets;
        if !(fits(qo, q) && fits(ko, kv) && fits(vo, kv)) {
            return bad(&format!("blocks past the input's {input_len} elements"));
        }
        Ok(())
    }

    /// Elements of the q block (= of the rotated queries) and of the k (= v) block.
    pub fn block_lens(&self) -> (usize, usize) {
        (
            self.rows * self.heads * self.head_dim,
            self.rows * self.kv_heads * self.head_dim,
        )
    }

    /// Elements of `cos_sin` and of the cache buffer.
    pub fn table_and_cache_lens(&self) -> (usize, usize) {
        (
            self.rows * self.head_dim,
            2 * self.kv_heads * self.kv_capacity * self.head_dim,
        )
    }
}

/// The CPU reference of the rope + KV write: returns the rotated queries and writes the new
/// keys and values into `cache` (other positions untouched), bit for bit as the kernel.
pub fn rope_kv(
    s: &RopeKvShape,
    input: &[bf16],
    cos_sin: &[bf16],
    cache: &mut [bf16],
) -> Result<Vec<bf16>> {
    s.check(input.len())?;
    let (table_len, cache_len) = s.table_and_cache_lens();
    if cos_sin.len() != table_len || cache.len() != cache_len {
        return Err(Error::Shape(format!(
            "rope + KV write {s:?}: cos_sin of {}, cache of {} elements",
            cos_sin.len(),
            cache.len()
        )));
    }
    let (d, half, rows) = (s.head_dim, s.head_dim / 2, s.rows);
    let rotate = |x: &[bf16], row: usize, out: &mut [bf16]| {
        for i in 0..half {
            let (x1, x2) = (x[i].to_f32(), x[i + half].to_f32());
            let c = cos_sin[row * half + i].to_f32();
            let sn = cos_sin[(rows + row) * half + i].to_f32();
            out[i] = bf16::from_f32(x1 * c - x2 * sn);
            out[i + half] = bf16::from_f32(x1 * sn + x2 * c);
        }
    };
    let [qo, ko, vo] = s.offsets;
    let mut q_out = vec![bf16::ZERO; s.block_lens().0];
    let values_at = s.kv_heads * s.kv_capacity * d;
    for row in 0..rows {
        for h in 0..s.heads {
            let x = &input[qo + (row * s.heads + h) * d..][..d];
            rotate(x, row, &mut q_out[(h * rows + row) * d..][..d]);
        }
        for h in 0..s.kv_heads {
            let at = (h * s.kv_capacity + s.start + row) * d;
            let k = &input[ko + (row * s.kv_heads + h) * d..][..d];
            rotate(k, row, &mut cache[at..at + d]);
            let v = &input[vo + (row * s.kv_heads + h) * d..][..d];
            cache[values_at + at..values_at + at + d].copy_from_slice(v);
        }
    }
    Ok(q_out)
}

/// Floor of a logit relative to the row's largest in [`logit_stats`]: `exp` of it is 0 in f32,
/// and a finite floor keeps `0 * -inf` (NaN) out of the sums.
pub const LOGIT_FLOOR: f32 = -1e30;

/// Largest row [`logit_stats`] takes: every index is exact in the f32 it is returned in.
pub const MAX_LOGIT_STATS_LEN: usize = 1 << 24;

/// Checks a row of `len` logits is one the logit-stats kernel takes.
pub fn check_logit_stats(len: usize) -> Result<()> {
    if len == 0 || len > MAX_LOGIT_STATS_LEN {
        return Err(Error::Shape(format!(
            "logit stats: a row of {len} logits (1 to {MAX_LOGIT_STATS_LEN})"
        )));
    }
    Ok(())
}

/// `[argmax, Z, S, l2, ties]` of a row of logits, as the CUDA kernel computes them. With `m`
/// the largest logit (NaN never counts) and `d_i = max(l_i - m, LOGIT_FLOOR)` in f32 (NaN
/// gives the floor):
/// - `argmax`: the first index holding `m` (0 when every logit is NaN);
/// - `Z = sum exp(d_i)` and `S = sum exp(d_i) d_i`: the softmax's normalizer relative to the top
///   logit, and what its entropy needs;
/// - `l2`: the largest `d_i` below 0, the runner-up's distance (`2 * LOGIT_FLOOR` if none);
/// - `ties`: how many `d_i` are 0 (logits equal to `m`).
///
/// The kernel sums `Z` and `S` in f32 in its own fixed order; this reference sums in f64, so the
/// two agree to f32 rounding of the sums and exactly elsewhere.
pub fn logit_stats(logits: &[f32]) -> Result<[f64; 5]> {
    check_logit_stats(logits.len())?;
    let (mut m, mut at) = (f32::NEG_INFINITY, None);
    for (i, &l) in logits.iter().enumerate() {
        if l > m || (at.is_none() && l == m) {
            (m, at) = (l, Some(i));
        }
    }
    let (mut z, mut s, mut l2, mut ties) = (0f64, 0f64, 2.0 * LOGIT_FLOOR, 0u32);
    for &l in logits {
        let d = (l - m).max(LOGIT_FLOOR);
        let e = (d as f64).exp();
        z += e;
        s += e * d as f64;
        if d >= 0.0 {
            ties += 1;
        } else {
            l2 = l2.max(d);
        }
    }
    Ok([at.unwrap_or(0) as f64, z, s, l2 as f64, ties as f64])
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

    #[test]
    fn rope_kv_rotates_pairs_and_writes_the_cache() {
        // One row, one query head, one kv head, d = 4, written at position 1 of 3.
        let s = RopeKvShape {
            rows: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 4,
            kv_capacity: 3,
            start: 1,
            offsets: [0, 4, 8],
        };
        let input = bf(&[1.0, 2.0, 3.0, 4.0, 0.5, 0.0, -1.0, 8.0, 7.0, 6.0, 5.0, 4.0]);
        // cos (0, 1), sin (1, 0): the first pair rotates by 90 degrees, the second not at all.
        let cos_sin = bf(&[0.0, 1.0, 1.0, 0.0]);
        let mut cache = vec![bf16::from_f32(9.0); 24];
        let q = rope_kv(&s, &input, &cos_sin, &mut cache).unwrap();
        assert_eq!(q, bf(&[-3.0, 2.0, 1.0, 4.0]));
        assert_eq!(&cache[4..8], &bf(&[1.0, 0.0, 0.5, 8.0])[..]);
        assert_eq!(&cache[16..20], &bf(&[7.0, 6.0, 5.0, 4.0])[..]);
        // Other positions untouched.
        assert!(cache[..4]
            .iter()
            .chain(&cache[8..16])
            .all(|v| v.to_f32() == 9.0));
    }

    #[test]
    fn rope_kv_rounds_the_f32_sum_once_to_bf16() {
        let s = RopeKvShape {
            rows: 1,
            heads: 1,
            kv_heads: 1,
            head_dim: 2,
            kv_capacity: 1,
            start: 0,
            offsets: [0, 0, 0],
        };
        // x1 = c = 1 + 2^-7, x2 = -2^-8, s = 1: x1 c - x2 s = 1 + 2^-6 + 2^-8 + 2^-14, 2.51
        // BF16 ulps above 1, so 1 + 3 * 2^-7. Rounding the product to BF16 first (1 + 2^-6)
        // would leave a tie at 2.5 ulps and give 1 + 2^-6.
        let x1 = 1.0 + 2f32.powi(-7);
        let input = bf(&[x1, -(2f32.powi(-8))]);
        let cos_sin = bf(&[x1, 1.0]);
        let mut cache = vec![bf16::ZERO; 4];
        let q = rope_kv(&s, &input, &cos_sin, &mut cache).unwrap();
        assert_eq!(q[0].to_f32(), 1.0 + 3.0 * 2f32.powi(-7));
        // x1 s + x2 c = 1 + 2^-8 - 2^-15: under half an ulp above 1.
        assert_eq!(q[1].to_f32(), 1.0);
        // Infinities and NaN propagate: inf * 0 is NaN.
        let input = bf(&[f32::INFINITY, 1.0]);
        let q = rope_kv(&s, &input, &bf(&[0.0, 1.0]), &mut cache).unwrap();
        assert!(q[0].is_nan() && q[1].is_infinite());
    }

    #[test]
    fn rope_kv_rejects_bad_shapes() {
        let ok = RopeKvShape {
            rows: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            kv_capacity: 4,
            start: 2,
            offsets: [0, 64, 96],
        };
        assert!(ok.check(128).is_ok());
        let bad = [
            RopeKvShape { start: 3, ..ok },
            RopeKvShape { head_dim: 7, ..ok },
            RopeKvShape { kv_heads: 0, ..ok },
            RopeKvShape {
                offsets: [0, 64, 97],
                ..ok
            },
            RopeKvShape {
                offsets: [usize::MAX, 64, 96],
                ..ok
            },
        ];
        for s in bad {
            assert!(matches!(s.check(128), Err(Error::Shape(_))), "{s:?}");
        }
        let mut cache = vec![bf16::ZERO; 2 * 2 * 4 * 8];
        let table = vec![bf16::ONE; 16];
        let input = vec![bf16::ONE; 128];
        assert!(rope_kv(&ok, &input, &table, &mut cache).is_ok());
        assert!(rope_kv(&ok, &input, &table[..15], &mut cache).is_err());
        assert!(rope_kv(&ok, &input, &table, &mut cache[..127]).is_err());
    }

    #[test]
    fn logit_stats_follow_their_definition() {
        let [argmax, z, s, l2, ties] = logit_stats(&[1.0, 3.0, f32::NAN, 3.0, 2.0]).unwrap();
        assert_eq!((argmax, ties), (1.0, 2.0), "first of the tied maxima");
        assert_eq!(l2, -1.0, "the runner-up, 1 below");
        let e = |d: f64| d.exp();
        // The NaN sits at the floor: exp of it is 0.
        assert!((z - (e(-2.0) + 2.0 + e(-1.0))).abs() < 1e-12);
        assert!((s - (-2.0 * e(-2.0) - e(-1.0))).abs() < 1e-12);
        let [argmax, z, _, l2, ties] = logit_stats(&[f32::NEG_INFINITY; 3]).unwrap();
        assert_eq!((argmax, z, l2, ties), (0.0, 0.0, LOGIT_FLOOR as f64, 0.0));
        assert_eq!(
            logit_stats(&[7.0]).unwrap()[3],
            2.0 * LOGIT_FLOOR as f64,
            "no runner-up"
        );
        // -inf is a maximum like any other value; NaN never is.
        assert_eq!(logit_stats(&[f32::NAN, f32::NEG_INFINITY]).unwrap()[0], 1.0);
        assert_eq!(logit_stats(&[f32::NAN; 2]).unwrap()[0], 0.0);
        assert!(logit_stats(&[]).is_err());
        assert!(check_logit_stats(MAX_LOGIT_STATS_LEN + 1).is_err());
    }
}
