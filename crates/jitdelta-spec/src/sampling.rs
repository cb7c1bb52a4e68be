//! How tokens are picked, and the draft signals the stopping rules read.
//!
//! The same [`Sampling`] turns the draft's logits into `q` and the target's into `p`, so
//! temperature and top-p act identically on both, as the acceptance rule requires.

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand::Rng;

/// How the next token is picked.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Sampling {
    /// The most likely token; verification keeps a draft token iff the target's argmax is it.
    Greedy,
    /// Softmax at `temperature`, restricted to the smallest set of most likely tokens whose
    /// mass reaches `top_p`, renormalized.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
    },
}

impl Sampling {
    /// Top-p sampling, checked: `temperature > 0`, `top_p` in (0, 1].
    pub fn top_p(temperature: f64, top_p: f64) -> Result<Self> {
        let ok = temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0;
        if !ok {
            return Err(Error::InvalidInput(format!(
                "temperature must be > 0 and top-p in (0, 1] (got {temperature}, {top_p})"
            )));
        }
        Ok(Sampling::TopP { temperature, top_p })
    }

    /// Whether tokens are picked by argmax.
    pub fn is_greedy(&self) -> bool {
        matches!(self, Sampling::Greedy)
    }

    /// The distribution a token is drawn from, over the whole vocabulary (zeros outside the
    /// nucleus). Greedy uses the plain softmax (temperature 1), which only the stopping rules
    /// read.
    pub fn probs(&self, logits: &[f32]) -> Vec<f32> {
        let (temperature, top_p) = match *self {
            Sampling::Greedy => (1.0, 1.0),
            Sampling::TopP { temperature, top_p } => (temperature, top_p),
        };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temperature).exp())
            .collect();
        let total: f64 = w.iter().sum();
        if top_p < 1.0 {
            let mut order: Vec<usize> = (0..w.len()).collect();
            order.sort_unstable_by(|&a, &b| w[b].total_cmp(&w[a]).then(a.cmp(&b)));
            let mut kept = 0.0;
            let mut cut = order.len();
            for (i, &t) in order.iter().enumerate() {
                kept += w[t] / total;
                if kept >= top_p {
                    cut = i + 1;
                    break;
                }
            }
            for &t in &order[cut..] {
                w[t] = 0.0;
            }
        }
        let mass: f64 = w.iter().sum();
        w.iter().map(|&x| (x / mass) as f32).collect()
    }
}

/// Index of the largest value (the first on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let first = (0, v.first().copied().unwrap_or(0.0));
    let best = v.iter().enumerate().fold(
        first,
        |(bi, bx), (i, &x)| {
            if x > bx {
                (i, x)
            } else {
                (bi, bx)
            }
        },
    );
    best.0 as u32
}

/// Draws an index from a distribution given by non-negative weights (normalized or not).
pub fn sample(weights: &[f32], rng: &mut impl Rng) -> u32 {
    let mass: f64 = weights.iter().map(|&w| w as f64).sum();
    let mut u = rng.random::<f64>() * mass;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            if u < w as f64 {
                return i as u32;
            }
            u -= w as f64;
            last = i;
        }
    }
    last as u32 // rounding left a sliver of mass: the last token with weight
}

/// What the draft's distribution for one position says about how sure it is: the inputs of
/// the stopping rules and of the contextual bandit.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Signals {
    /// Probability of the most likely token.
    pub top1: f32,
    /// Probability of the second most likely token.
    pub top2: f32,
    /// Entropy in nats.
    pub entropy: f32,
    /// `ln(top1 / top2)`: the logit margin at the sampling temperature (capped at 30 nats).
    pub margin: f32,
    /// Root mean square of the draft's hidden state at this position, after the middle and
    /// the last decoder layer (0 where the model did not report them).
    pub hidden_rms: [f32; 2],
}

impl Signals {
    /// Signals of a distribution (as [`Sampling::probs`] returns it).
    pub fn from_probs(probs: &[f32]) -> Self {
        let (mut top1, mut top2, mut entropy) = (0f32, 0f32, 0f64);
        for &p in probs {
            if p > top1 {
                top2 = top1;
                top1 = p;
            } else if p > top2 {
                top2 = p;
            }
            if p > 0.0 {
                entropy -= p as f64 * (p as f64).ln();
            }
        }
        let margin = if top2 > 0.0 {
            (top1 / top2).ln().min(30.0)
        } else {
            30.0
        };
        Signals {
            top1,
            top2,
            entropy: entropy as f32,
            margin,
            hidden_rms: [0.0; 2],
        }
    }

    /// Signals of the plain softmax (temperature 1) of a logits row from its reductions as
    /// [`greedy_reductions`] computes them on the device: `top1 = 1 / Z`, `top2 = exp(l2) / Z`
    /// (`top1` on ties), entropy `ln Z - S / Z`, margin `min(-l2, 30)` (0 on ties). The same
    /// quantities [`Signals::from_probs`] computes from the whole distribution, up to f32
    /// rounding.
    pub(crate) fn from_reductions(z: f32, s: f32, l2: f32, ties: f32) -> Self {
        let (z, s) = (z as f64, s as f64);
        let l2 = if ties >= 2.0 { 0.0 } else { l2 as f64 };
        Signals {
            top1: (1.0 / z) as f32,
            top2: (l2.exp() / z) as f32,
            entropy: (z.ln() - s / z).max(0.0) as f32,
            margin: (-l2).min(30.0) as f32,
            hidden_rms: [0.0; 2],
        }
    }
}

/// Logits this far (in nats) below the row's maximum count as `-inf`: their probability is 0
/// in f32 long before (`exp(-104)` underflows), and a finite floor keeps `0 * -inf` (NaN) out
/// of the entropy sum.
const LOGIT_FLOOR: f64 = -1e30;

/// Vocabulary sizes up to this keep their argmax exact through an f32 (2^24).
pub(crate) const F32_EXACT_INDEX: usize = 1 << 24;

/// The vocabulary-wide reductions behind a greedy draft row, computed with tensor ops on the
/// device of `logits` (one row, any float dtype, reduced in f32), each a rank-0 f32 tensor:
/// `[argmax, Z, S, l2, ties]`. With `l' = max(l - max(l), LOGIT_FLOOR)`:
///
/// - `argmax`: index of the largest logit (the first on ties on the CPU);
/// - `Z = sum exp(l')`, the softmax's normalizer relative to the top logit;
/// - `S = sum exp(l') l'`;
/// - `l2`: the largest `l'` outside the top logit's value (`2 LOGIT_FLOOR` if none);
/// - `ties`: how many logits equal the maximum.
///
/// [`Signals::from_reductions`] turns them into the signals; only these five scalars need
/// to leave the device.
pub(crate) fn greedy_reductions(logits: &Tensor) -> Result<[Tensor; 5]> {
    let l = logits.flatten_all()?.to_dtype(DType::F32)?;
    let argmax = l.argmax(0)?.to_dtype(DType::F32)?;
    let shifted = l.broadcast_sub(&l.max_keepdim(0)?)?.maximum(LOGIT_FLOOR)?;
    let e = shifted.exp()?;
    let z = e.sum_all()?;
    let s = (&e * &shifted)?.sum_all()?;
    // `l - max` is exactly 0 at the maximum and only there (IEEE subtraction is exact in
    // sign), so `shifted >= 0` marks the top logit(s).
    let top = shifted.ge(0.0)?.to_dtype(DType::F32)?;
    let ties = top.sum_all()?;
    let l2 = (shifted + top.affine(2.0 * LOGIT_FLOOR, 0.0)?)?.max(0)?;
    Ok([argmax, z, s, l2, ties])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 2.0, 1.0, -1.0];
        let full = Sampling::top_p(1.0, 1.0).unwrap().probs(&logits);
        assert!((full.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // Sorted: 2.0 (0.64), 1.0 (0.24), 0.0 (0.09), -1.0 (0.03); 0.8 needs the top two.
        let nucleus = Sampling::top_p(1.0, 0.8).unwrap().probs(&logits);
        assert_eq!(nucleus[0], 0.0);
        assert_eq!(nucleus[3], 0.0);
        assert!((nucleus[1] / nucleus[2] - full[1] / full[2]).abs() < 1e-5);
        assert!((nucleus[1] + nucleus[2] - 1.0).abs() < 1e-6);
        // Lower temperature sharpens.
        let cold = Sampling::top_p(0.5, 1.0).unwrap().probs(&logits);
        assert!(cold[1] > full[1]);
        assert!(Sampling::top_p(0.0, 1.0).is_err());
        assert!(Sampling::top_p(1.0, 0.0).is_err());
        assert!(Sampling::top_p(1.0, 1.5).is_err());
        assert!(Sampling::top_p(f64::NAN, 1.0).is_err());
    }

    #[test]
    fn signals_of_a_distribution() {
        let s = Signals::from_probs(&[0.5, 0.25, 0.25, 0.0]);
        assert_eq!((s.top1, s.top2), (0.5, 0.25));
        assert!((s.margin - 2f32.ln()).abs() < 1e-6);
        assert!((s.entropy - 1.5 * 2f32.ln()).abs() < 1e-6);
        let one_hot = Signals::from_probs(&[0.0, 1.0]);
        assert_eq!((one_hot.entropy, one_hot.margin), (0.0, 30.0));
    }

    #[test]
    fn sampling_follows_the_weights() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let w = [0.0f32, 3.0, 1.0, 0.0];
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[sample(&w, &mut rng) as usize] += 1;
        }
        assert_eq!(counts[0] + counts[3], 0);
        assert!(
            (counts[1] as f64 / 4000.0 - 0.75).abs() < 0.03,
            "{counts:?}"
        );
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
