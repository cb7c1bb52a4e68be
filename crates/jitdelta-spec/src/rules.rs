//! Stopping rules: when to stop drafting, as pure functions of the round's draft state.
//!
//! After the draft proposes a token, a rule sees the [`Signals`] of every token drafted so far
//! this round (the last one is the newest) and says whether to stop (verify now) or run one
//! more draft pass. The newest token is always kept: its draft pass is already paid for, and
//! verifying one more position costs the target next to nothing. So the question a rule
//! answers is "is the newest token likely enough to be accepted that drafting past it pays?".

use crate::Signals;

/// A stopping rule (one arm of the controller). Each has fixed, documented constants: the
/// controller's job is to pick between rules online, not to tune them.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum StopRule {
    /// Draft exactly `k` tokens.
    Fixed {
        /// Tokens per round (>= 1).
        k: usize,
    },
    /// Max-confidence: stop when the draft's top-1 probability falls below `threshold`.
    MaxConfidence {
        /// Smallest top-1 probability to keep drafting after.
        threshold: f32,
    },
    /// SVIP-style entropy rule: stop when the draft's entropy exceeds `threshold` nats (a
    /// flat draft distribution predicts a rejection).
    Entropy {
        /// Largest entropy (nats) to keep drafting after.
        threshold: f32,
    },
    /// Logit margin: stop when `ln(top1 / top2)` (the gap between the two best logits at the
    /// sampling temperature) falls below `threshold`.
    Margin {
        /// Smallest margin (nats) to keep drafting after.
        threshold: f32,
    },
    /// AdaEDL-style: `1 - sqrt(gamma * H)` lower-bounds the chance that a token with draft
    /// entropy `H` is accepted; stop when the product of these bounds over the round (a bound
    /// on the whole draft surviving) falls below `lambda`.
    EntropyBound {
        /// Scale of the entropy in the bound.
        gamma: f32,
        /// Smallest bound on the round's survival to keep drafting after.
        lambda: f32,
    },
}

impl StopRule {
    /// The default max-confidence rule (top-1 below 0.8 stops).
    pub const MAX_CONFIDENCE: StopRule = StopRule::MaxConfidence { threshold: 0.8 };
    /// The default entropy rule (more than 0.6 nats stops).
    pub const ENTROPY: StopRule = StopRule::Entropy { threshold: 0.6 };
    /// The default margin rule (top-1 less than e^2 ~ 7.4 times top-2 stops).
    pub const MARGIN: StopRule = StopRule::Margin { threshold: 2.0 };
    /// The default entropy-bound rule (gamma 0.25, lambda 0.5).
    pub const ENTROPY_BOUND: StopRule = StopRule::EntropyBound {
        gamma: 0.25,
        lambda: 0.5,
    };

    /// Whether to stop drafting, given the signals of the tokens drafted this round (oldest
    /// first; never empty when the loop asks).
    pub fn should_stop(&self, drafted: &[Signals]) -> bool {
        let Some(last) = drafted.last() else {
            return false;
        };
        match *self {
            StopRule::Fixed { k } => drafted.len() >= k,
            StopRule::MaxConfidence { threshold } => last.top1 < threshold,
            StopRule::Entropy { threshold } => last.entropy > threshold,
            StopRule::Margin { threshold } => last.margin < threshold,
            StopRule::EntropyBound { gamma, lambda } => {
                let survive: f32 = drafted
                    .iter()
                    .map(|s| (1.0 - (gamma * s.entropy.max(0.0)).sqrt()).max(0.0))
                    .product();
                survive < lambda
            }
        }
    }

    /// A short name (`fixed:4`, `max-conf`, `entropy`, `margin`, `entropy-bound`).
    pub fn name(&self) -> String {
        match self {
            StopRule::Fixed { k } => format!("fixed:{k}"),
            StopRule::MaxConfidence { .. } => "max-conf".into(),
            StopRule::Entropy { .. } => "entropy".into(),
            StopRule::Margin { .. } => "margin".into(),
            StopRule::EntropyBound { .. } => "entropy-bound".into(),
        }
    }

    /// The arms the bandits choose between: fixed 1, 2, 4 and 8, and the four signal rules
    /// with their default constants.
    pub fn default_arms() -> Vec<StopRule> {
        vec![
            StopRule::Fixed { k: 1 },
            StopRule::Fixed { k: 2 },
            StopRule::Fixed { k: 4 },
            StopRule::Fixed { k: 8 },
            StopRule::MAX_CONFIDENCE,
            StopRule::ENTROPY,
            StopRule::MARGIN,
            StopRule::ENTROPY_BOUND,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(top1: f32, top2: f32) -> Signals {
        let rest = (1.0 - top1 - top2).max(0.0);
        Signals::from_probs(&[top1, top2, rest / 2.0, rest / 2.0])
    }

    #[test]
    fn fixed_counts_tokens() {
        let r = StopRule::Fixed { k: 3 };
        let s = sig(0.99, 0.01);
        assert!(!r.should_stop(&[s]));
        assert!(!r.should_stop(&[s, s]));
        assert!(r.should_stop(&[s, s, s]));
        assert!(!r.should_stop(&[]));
    }

    #[test]
    fn confidence_rules_stop_on_doubt_only() {
        let sure = sig(0.97, 0.02);
        let unsure = sig(0.45, 0.40);
        for rule in [
            StopRule::MAX_CONFIDENCE,
            StopRule::ENTROPY,
            StopRule::MARGIN,
            StopRule::ENTROPY_BOUND,
        ] {
            assert!(!rule.should_stop(&[sure]), "{}", rule.name());
            assert!(rule.should_stop(&[sure, unsure]), "{}", rule.name());
            // Pure: the same state gives the same answer.
            assert_eq!(rule.should_stop(&[unsure]), rule.should_stop(&[unsure]));
        }
        // Thresholds sit where documented.
        assert!(StopRule::MAX_CONFIDENCE.should_stop(&[sig(0.79, 0.2)]));
        assert!(!StopRule::MAX_CONFIDENCE.should_stop(&[sig(0.81, 0.18)]));
        assert!(StopRule::MARGIN.should_stop(&[sig(0.7, 0.1)])); // ln 7 < 2
        assert!(!StopRule::MARGIN.should_stop(&[sig(0.8, 0.1)])); // ln 8 > 2
    }

    #[test]
    fn entropy_bound_accumulates_over_the_round() {
        // Each token alone passes the bound, a run of them does not.
        let s = sig(0.95, 0.03);
        let bound = 1.0 - (0.25 * s.entropy).sqrt();
        assert!(bound > 0.5 && bound.powi(8) < 0.5, "{bound}");
        let rule = StopRule::ENTROPY_BOUND;
        let n = (1..=8).find(|&n| rule.should_stop(&vec![s; n])).unwrap();
        assert_eq!(n as i32, (0.5f32.ln() / bound.ln()).ceil() as i32);
        // The per-token entropy rule does not accumulate.
        assert!(!StopRule::ENTROPY.should_stop(&[s; 8]));
    }
}
