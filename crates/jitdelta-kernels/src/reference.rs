//! CPU references of every kernel: what the GPU must reproduce.
//!
//! The decode reference is jitdelta-format's own resident decoder, so a GPU decode that matches
//! it bit for bit restores the original weights. The GEMV reference accumulates in f64 and also
//! returns `sum |w x|` per output, the scale a tolerance should be relative to.

use crate::{Error, Result};
use half::bf16;
use jitdelta_format::{DraftDtype, FloatFormat, ResidentTensor};
use rayon::prelude::*;

/// Which chunks decode exactly (all planes) and which read only the draft planes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkSelection {
    /// Every chunk exact.
    Exact,
    /// Every chunk draft (code and high planes only).
    Draft,
    /// Chunk `c` exact where `flags[c]`, draft elsewhere (the router's choice).
    Routed(Vec<bool>),
}

impl ChunkSelection {
    /// Whether chunk `c` decodes exactly.
    pub fn is_exact(&self, c: usize) -> bool {
        match self {
            Self::Exact => true,
            Self::Draft => false,
            Self::Routed(flags) => flags[c],
        }
    }

    /// Checks a routed selection has one flag per chunk of `t`.
    pub fn check(&self, t: &ResidentTensor) -> Result<()> {
        match self {
            Self::Routed(flags) if flags.len() != t.chunk_count() => Err(Error::Shape(format!(
                "{} routing flags for a tensor of {} chunks",
                flags.len(),
                t.chunk_count()
            ))),
            _ => Ok(()),
        }
    }
}

/// Fails unless `t` has the layout the kernels read: BF16 with three nibble planes (`d = 3`).
pub fn check_supported(t: &ResidentTensor) -> Result<()> {
    if t.format() != FloatFormat::BF16 || t.draft_bits() != 3 {
        return Err(Error::Unsupported(format!(
            "{:?} with {} draft mantissa bits (kernels read BF16 with 3)",
            t.format(),
            t.draft_bits()
        )));
    }
    Ok(())
}

/// Reference of the decode kernel: every chunk to BF16, exact or draft per `sel`.
pub fn decode_bf16(t: &ResidentTensor, sel: &ChunkSelection, out: &mut [bf16]) -> Result<()> {
    check_supported(t)?;
    sel.check(t)?;
    let (rows, cols) = t.dims();
    if out.len() != rows * cols {
        return Err(Error::Shape(format!(
            "output of {} values for a {rows}x{cols} tensor",
            out.len()
        )));
    }
    let per_chunk = (t.chunk_rows() * cols).max(1);
    out.par_chunks_mut(per_chunk)
        .enumerate()
        .try_for_each(|(c, o)| {
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(o);
            if sel.is_exact(c) {
                t.decode_chunk_exact(c, bytes)
            } else {
                t.decode_chunk_draft(c, DraftDtype::BF16, bytes)
            }
        })?;
    Ok(())
}

/// The GEMV reference: `y[b][r] = sum_k W[r][k] x[b][k]` in f64, and `sum_k |W[r][k] x[b][k]|`.
#[derive(Clone, Debug)]
pub struct GemvReference {
    /// Outputs, `batch` rows of `rows` values.
    pub y: Vec<f64>,
    /// Per output, the sum of absolute products (the rounding scale of any f32 accumulation).
    pub magnitude: Vec<f64>,
}

/// Reference of the fused GEMV kernel for `batch` activation rows `x` (`batch x cols`).
pub fn gemv(
    t: &ResidentTensor,
    sel: &ChunkSelection,
    x: &[bf16],
    batch: usize,
) -> Result<GemvReference> {
    let (rows, cols) = t.dims();
    if x.len() != batch * cols {
        return Err(Error::Shape(format!(
            "{} activations for batch {batch} of {cols} columns",
            x.len()
        )));
    }
    let mut w = vec![bf16::ZERO; rows * cols];
    decode_bf16(t, sel, &mut w)?;
    let mut y = vec![0f64; batch * rows];
    let mut magnitude = vec![0f64; batch * rows];
    for b in 0..batch {
        let xb = &x[b * cols..(b + 1) * cols];
        let (yb, mb) = (
            &mut y[b * rows..(b + 1) * rows],
            &mut magnitude[b * rows..(b + 1) * rows],
        );
        yb.par_iter_mut()
            .zip(mb.par_iter_mut())
            .enumerate()
            .for_each(|(r, (y, m))| {
                for (wk, xk) in w[r * cols..(r + 1) * cols].iter().zip(xb) {
                    let p = wk.to_f64() * xk.to_f64();
                    *y += p;
                    *m += p.abs();
                }
            });
    }
    Ok(GemvReference { y, magnitude })
}

/// Worst error of a kernel's BF16 GEMV output against the reference, in units of the allowed
/// error `2^-8 |y| + 2^-14 sum|w x|` (BF16 output rounding plus f32 accumulation): at most 1
/// passes. NaN must meet NaN and an infinity the same infinity; anything else is infinite error.
pub fn gemv_error(got: &[bf16], want: &GemvReference) -> f64 {
    got.iter()
        .zip(want.y.iter().zip(&want.magnitude))
        .map(|(g, (&y, &m))| {
            let g = g.to_f64();
            if y.is_nan() || y.is_infinite() || g.is_nan() || g.is_infinite() {
                let same = (y.is_nan() && g.is_nan()) || y == g;
                return if same { 0.0 } else { f64::INFINITY };
            }
            let allowed = y.abs() / 256.0 + m / 16384.0;
            let d = (g - y).abs();
            if d == 0.0 {
                0.0
            } else {
                d / allowed
            }
        })
        .fold(0.0, f64::max)
}
