//! The drafting controller: which stopping rule drafts this round (TapOut's idea: a bandit
//! over parameter-free stopping rules), and what a round was worth.
//!
//! # Reward
//!
//! A round that drafts `k` tokens and keeps `j` of them yields `j + 1` tokens (the kept ones
//! plus the target's own) for one target pass and `k` draft passes. With `c` the cost of a
//! draft pass relative to a target (verify) pass ([`ControllerConfig::draft_cost`]), the
//! round's throughput in tokens per target-pass-equivalent is
//!
//! ```text
//! (j + 1) / (1 + c k)  =  (1 + L) / (1 + c L / a),   L = j (accepted length), a = j / k (acceptance rate)
//! ```
//!
//! so it blends the two: at a fixed acceptance rate it grows with the accepted length, at a
//! fixed length it grows with the rate, and `c` sets the exchange rate (a free draft, `c = 0`,
//! leaves only the length; an expensive one weighs the rate). The reward is this throughput
//! divided by its largest possible value, `(M + 1) / (1 + c M)` for `c < 1` (`M` the longest
//! draft), so it lies in [0, 1] as the bandits expect. Maximizing it is maximizing the
//! speed-up the cost model predicts (docs/speculative.md).
//!
//! # Auto-off
//!
//! The same throughput says when drafting loses: plain decoding makes 1 token per target pass,
//! so rounds averaging below 1 are slower than not drafting at all (a draft that rarely agrees,
//! or a draft pass that costs about a verify pass). With [`ControllerConfig::auto_off`], after
//! every [`AUTO_OFF_WINDOW`] rounds whose mean throughput is below 1, drafting stops for a
//! number of plain decoding steps, [`AUTO_OFF_FIRST_PAUSE`] first and twice as many each time
//! the next window loses again (at most [`AUTO_OFF_LONGEST_PAUSE`]), then a new window probes.
//! A winning window resets the pause. The output is the same either way: a plain step is a
//! verify pass with nothing to verify.

use crate::bandit::{ArmStats, Bandit, BanditKind};
use crate::{Error, Signals, StopRule};

/// Which controller decides when drafting stops: one rule, always, or a bandit over
/// [`StopRule::default_arms`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ControllerKind {
    /// One stopping rule for every round.
    Rule(StopRule),
    /// A bandit picking the rule per round.
    Bandit(BanditKind),
}

impl std::str::FromStr for ControllerKind {
    type Err = Error;

    /// `fixed:K` (K in 1..=64), `max-conf`, `entropy`, `margin`, `entropy-bound` (alias
    /// `adaedl`), `ucb1`, `ucb1-tuned`, `ts` (Beta-Bernoulli Thompson sampling), `ts-gauss`
    /// (Gaussian Thompson sampling) or `lin-ucb`.
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |reason: &str| Error::Controller {
            given: s.to_string(),
            reason: reason.to_string(),
        };
        Ok(match s {
            "max-conf" => ControllerKind::Rule(StopRule::MAX_CONFIDENCE),
            "entropy" => ControllerKind::Rule(StopRule::ENTROPY),
            "margin" => ControllerKind::Rule(StopRule::MARGIN),
            "entropy-bound" | "adaedl" => ControllerKind::Rule(StopRule::ENTROPY_BOUND),
            "ucb1" => ControllerKind::Bandit(BanditKind::Ucb1),
            "ucb1-tuned" => ControllerKind::Bandit(BanditKind::Ucb1Tuned),
            "ts" => ControllerKind::Bandit(BanditKind::ThompsonBeta),
            "ts-gauss" => ControllerKind::Bandit(BanditKind::ThompsonGaussian),
            "lin-ucb" => ControllerKind::Bandit(BanditKind::LinUcb),
            _ => match s.strip_prefix("fixed:") {
                Some(k) => match k.parse::<usize>() {
                    Ok(k @ 1..=64) => ControllerKind::Rule(StopRule::Fixed { k }),
                    _ => return Err(bad("K in fixed:K must be an integer in 1..=64")),
                },
                None => {
                    return Err(bad(
                        "expected fixed:K, max-conf, entropy, margin, entropy-bound, ucb1, \
                         ucb1-tuned, ts, ts-gauss or lin-ucb",
                    ))
                }
            },
        })
    }
}

impl ControllerKind {
    /// Whether the controller reads the draft's hidden-state features (the contextual
    /// bandit's context): the others decide without them, so a draft pass can skip computing
    /// them ([`SelfSpec::with_hidden_features`](crate::SelfSpec::with_hidden_features)).
    pub fn uses_hidden_state(&self) -> bool {
        matches!(self, ControllerKind::Bandit(BanditKind::LinUcb))
    }
}

impl std::fmt::Display for ControllerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControllerKind::Rule(rule) => f.write_str(&rule.name()),
            ControllerKind::Bandit(kind) => f.write_str(match kind {
                BanditKind::Ucb1 => "ucb1",
                BanditKind::Ucb1Tuned => "ucb1-tuned",
                BanditKind::ThompsonBeta => "ts",
                BanditKind::ThompsonGaussian => "ts-gauss",
                BanditKind::LinUcb => "lin-ucb",
            }),
        }
    }
}

/// Settings shared by every controller.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ControllerConfig {
    /// Most tokens drafted per round, whatever the rule says (a `fixed:K` rule raises it to K).
    pub max_draft: usize,
    /// Cost of one draft pass relative to one target (verify) pass, for the reward. Default
    /// 0.7: the draft reads 8 of the 12 resident bits a weight; measured 0.70 on the CPU
    /// (docs/benchmarks.md). Set it from measured per-pass times on other hardware.
    pub draft_cost: f64,
    /// Seed of the bandit's random numbers (Thompson sampling).
    pub seed: u64,
    /// Let [`generate`](crate::generate) replace `draft_cost` after every round with the
    /// measured ratio of mean draft to mean verify pass wall time, so the reward follows the
    /// hardware (on a GPU a small model's draft pass costs about a verify pass). Off by default:
    /// decisions then depend on timing, not only on the tokens.
    pub measure_draft_cost: bool,
    /// Stop drafting while it loses to plain decoding (module docs, "Auto-off"). Off by default:
    /// the pass counts of a run then depend on the draft cost's exact value.
    pub auto_off: bool,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            max_draft: 16,
            draft_cost: 0.7,
            seed: 0,
            measure_draft_cost: false,
            auto_off: false,
        }
    }
}

/// Rounds whose mean throughput decides whether drafting pauses (module docs, "Auto-off").
pub const AUTO_OFF_WINDOW: usize = 8;
/// Plain steps of the first pause.
pub const AUTO_OFF_FIRST_PAUSE: usize = 16;
/// Plain steps of the longest pause.
pub const AUTO_OFF_LONGEST_PAUSE: usize = 512;

/// The auto-off state: the current window's rounds and the pause.
#[derive(Clone, Debug)]
struct AutoOff {
    /// Rounds in the current window and the sum of their throughputs.
    window: (usize, f64),
    /// Plain steps left in the current pause.
    paused: usize,
    /// Length of the next pause.
    next_pause: usize,
    pauses: u64,
    plain_steps: u64,
}

impl Default for AutoOff {
    fn default() -> Self {
        Self {
            window: (0, 0.0),
            paused: 0,
            next_pause: AUTO_OFF_FIRST_PAUSE,
            pauses: 0,
            plain_steps: 0,
        }
    }
}

impl AutoOff {
    /// Adds a round's throughput (tokens per target-pass-equivalent); closes the window when
    /// full.
    fn round(&mut self, throughput: f64) {
        let (rounds, sum) = &mut self.window;
        *rounds += 1;
        *sum += throughput;
        if *rounds < AUTO_OFF_WINDOW {
            return;
        }
        let mean = *sum / *rounds as f64;
        self.window = (0, 0.0);
        if mean < 1.0 {
            self.paused = self.next_pause;
            self.next_pause = (2 * self.next_pause).min(AUTO_OFF_LONGEST_PAUSE);
            self.pauses += 1;
        } else {
            self.next_pause = AUTO_OFF_FIRST_PAUSE;
        }
    }
}

/// Number of context values LinUCB sees (see [`Controller::context`]).
pub const CONTEXT_DIM: usize = 6;

/// Running mean and variance of one context signal, to standardize it.
#[derive(Clone, Copy, Debug, Default)]
struct Running {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Running {
    /// Adds `x` and returns it standardized by what was seen so far, clamped to [-1, 1]
    /// (three standard deviations).
    fn standardize(&mut self, x: f64) -> f64 {
        self.n += 1.0;
        let d = x - self.mean;
        self.mean += d / self.n;
        self.m2 += d * (x - self.mean);
        let sd = (self.m2 / self.n).sqrt();
        if sd > 0.0 {
            ((x - self.mean) / (3.0 * sd)).clamp(-1.0, 1.0)
        } else {
            0.0
        }
    }
}

/// One arm as shown to users.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ArmState {
    /// The rule's short name.
    pub rule: String,
    /// Rounds it drafted.
    pub pulls: u64,
    /// Its mean reward.
    pub mean_reward: f64,
}

/// The controller's observable state.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ControllerState {
    /// The controller (`ucb1`, `fixed:4`, ...).
    pub controller: String,
    /// Its settings.
    pub config: ControllerConfig,
    /// Rounds played.
    pub rounds: u64,
    /// Per arm: pulls and mean reward.
    pub arms: Vec<ArmState>,
    /// Times auto-off paused drafting.
    pub auto_off_pauses: u64,
    /// Plain decoding steps taken in those pauses.
    pub plain_steps: u64,
}

/// Picks a stopping rule per drafting round and learns from each round's outcome.
///
/// A round goes: the draft proposes its first token; [`Controller::begin_round`] picks the
/// rule from the context (that token's signals, the position); the loop drafts while
/// [`Controller::should_stop`] says no; the target verifies; [`Controller::end_round`]
/// turns the outcome into a reward.
#[derive(Clone, Debug)]
pub struct Controller {
    kind: ControllerKind,
    config: ControllerConfig,
    arms: Vec<StopRule>,
    bandit: Bandit,
    scale: [Running; 2],
    round: Option<(usize, [f64; CONTEXT_DIM])>,
    auto_off: AutoOff,
}

impl Controller {
    /// A fresh controller.
    pub fn new(kind: ControllerKind, mut config: ControllerConfig) -> Self {
        let (arms, policy) = match kind {
            ControllerKind::Rule(rule) => {
                if let StopRule::Fixed { k } = rule {
                    config.max_draft = config.max_draft.max(k);
                }
                (vec![rule], BanditKind::Ucb1)
            }
            ControllerKind::Bandit(b) => (StopRule::default_arms(), b),
        };
        config.max_draft = config.max_draft.max(1);
        let bandit = Bandit::new(policy, arms.len(), CONTEXT_DIM, config.seed);
        Self {
            kind,
            config,
            arms,
            bandit,
            scale: [Running::default(); 2],
            round: None,
            auto_off: AutoOff::default(),
        }
    }

    /// Which controller this is.
    pub fn kind(&self) -> ControllerKind {
        self.kind
    }

    /// Its settings.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The arms.
    pub fn arms(&self) -> &[StopRule] {
        &self.arms
    }

    /// The context of a round whose first drafted token has `first` signals at sequence
    /// position `position`: `[1, top-1 probability, entropy / (1 + entropy), ln(1 + position)
    /// / ln(1 + 8192), hidden RMS after the middle layer and after the last layer, each
    /// standardized by the running mean and deviation seen so far]`.
    pub fn context(&mut self, first: &Signals, position: usize) -> [f64; CONTEXT_DIM] {
        let h = first.entropy.max(0.0) as f64;
        [
            1.0,
            first.top1 as f64,
            h / (1.0 + h),
            ((1 + position) as f64).ln() / 8193f64.ln(),
            self.scale[0].standardize(first.hidden_rms[0] as f64),
            self.scale[1].standardize(first.hidden_rms[1] as f64),
        ]
    }

    /// Starts a round: picks the arm (returned) for a draft whose first token has `first`
    /// signals, at sequence position `position`.
    pub fn begin_round(&mut self, first: &Signals, position: usize) -> usize {
        let x = self.context(first, position);
        let arm = self.bandit.select(&x);
        self.round = Some((arm, x));
        arm
    }

    /// Whether the round's rule (or the length cap) stops drafting after the tokens drafted so
    /// far, whose signals are `drafted`.
    pub fn should_stop(&self, drafted: &[Signals]) -> bool {
        let arm = self.round.map_or(0, |(a, _)| a);
        drafted.len() >= self.config.max_draft || self.arms[arm].should_stop(drafted)
    }

    /// Ends the round: `drafted` tokens were proposed, `accepted` of them kept. Returns the
    /// reward (0 when no round was open).
    pub fn end_round(&mut self, drafted: usize, accepted: usize) -> f64 {
        let Some((arm, x)) = self.round.take() else {
            return 0.0;
        };
        let r = self.reward(drafted, accepted);
        self.bandit.update(arm, &x, r);
        if self.config.auto_off {
            self.auto_off.round(self.throughput(drafted, accepted));
        }
        r
    }

    /// Whether the next step decodes plainly, without drafting: auto-off has paused drafting
    /// (the step is counted). Always false without [`ControllerConfig::auto_off`].
    pub fn plain_step(&mut self) -> bool {
        let a = &mut self.auto_off;
        if a.paused == 0 {
            return false;
        }
        a.paused -= 1;
        a.plain_steps += 1;
        true
    }

    /// Tokens per target-pass-equivalent of a round that drafted `drafted` tokens and kept
    /// `accepted`: `(accepted + 1) / (1 + c drafted)`.
    fn throughput(&self, drafted: usize, accepted: usize) -> f64 {
        let c = self.config.draft_cost.max(0.0);
        (accepted.min(drafted) as f64 + 1.0) / (1.0 + c * drafted as f64)
    }

    /// Sets the draft cost the reward uses from now on (non-finite or negative values are
    /// ignored).
    pub fn set_draft_cost(&mut self, c: f64) {
        if c.is_finite() && c >= 0.0 {
            self.config.draft_cost = c;
        }
    }

    /// The reward of a round that drafted `drafted` tokens and kept `accepted`: its
    /// throughput `(accepted + 1) / (1 + c drafted)` over the best possible one (see the
    /// module docs).
    pub fn reward(&self, drafted: usize, accepted: usize) -> f64 {
        let c = self.config.draft_cost.max(0.0);
        let m = self.config.max_draft as f64;
        let best = if c < 1.0 {
            (m + 1.0) / (1.0 + c * m)
        } else {
            1.0
        };
        (self.throughput(drafted, accepted) / best).clamp(0.0, 1.0)
    }

    /// Per-arm statistics, in [`Controller::arms`] order.
    pub fn arm_stats(&self) -> &[ArmStats] {
        self.bandit.arms()
    }

    /// The observable state: pulls and mean reward per arm.
    pub fn state(&self) -> ControllerState {
        let arms: Vec<ArmState> = self
            .arms
            .iter()
            .zip(self.bandit.arms())
            .map(|(rule, s)| ArmState {
                rule: rule.name(),
                pulls: s.pulls,
                mean_reward: s.mean_reward,
            })
            .collect();
        ControllerState {
            controller: self.kind.to_string(),
            config: self.config,
            rounds: arms.iter().map(|a| a.pulls).sum(),
            arms,
            auto_off_pauses: self.auto_off.pauses,
            plain_steps: self.auto_off.plain_steps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        let rules = StopRule::default_arms().into_iter().map(|r| r.name());
        let bandits = ["ucb1", "ucb1-tuned", "ts", "ts-gauss", "lin-ucb"].map(String::from);
        for name in rules.chain(bandits).chain(["fixed:64".to_string()]) {
            let kind: ControllerKind = name.parse().unwrap();
            assert_eq!(kind.to_string(), name);
        }
        assert_eq!(
            "adaedl".parse::<ControllerKind>().unwrap().to_string(),
            "entropy-bound"
        );
        for bad in [
            "", "fixed:", "fixed:0", "fixed:65", "fixed:-1", "ucb2", "FIXED:4",
        ] {
            let e = bad.parse::<ControllerKind>().unwrap_err();
            assert!(e.to_string().contains("unknown controller"), "{e}");
        }
    }

    #[test]
    fn reward_blends_length_and_rate() {
        let c = Controller::new(
            ControllerKind::Bandit(BanditKind::Ucb1),
            ControllerConfig::default(),
        );
        // Everything of the longest draft kept: 1.
        assert!((c.reward(16, 16) - 1.0).abs() < 1e-12);
        // Longer accepted length at the same rate is better...
        assert!(c.reward(4, 4) > c.reward(2, 2));
        // ...and a higher rate at the same length too.
        assert!(c.reward(2, 2) > c.reward(8, 2));
        // A wasted long draft is worse than a short one.
        assert!(c.reward(8, 0) < c.reward(1, 0));
        assert!(c.reward(3, 9) <= 1.0 && c.reward(0, 0) > 0.0);
    }

    #[test]
    fn rounds_update_the_chosen_arm() {
        let mut c = Controller::new(
            "fixed:20".parse().unwrap(),
            ControllerConfig {
                max_draft: 4,
                ..Default::default()
            },
        );
        assert_eq!(c.config().max_draft, 20);
        let s = Signals::from_probs(&[0.9, 0.1]);
        assert_eq!(c.begin_round(&s, 10), 0);
        assert!(!c.should_stop(&[s; 19]) && c.should_stop(&[s; 20]));
        let r = c.end_round(20, 5);
        assert!(r > 0.0);
        let state = c.state();
        assert_eq!(state.controller, "fixed:20");
        assert_eq!((state.rounds, state.arms[0].pulls), (1, 1));
        assert!((state.arms[0].mean_reward - r).abs() < 1e-12);
        // No open round: nothing recorded.
        assert_eq!(c.end_round(3, 3), 0.0);
        assert_eq!(c.state().rounds, 1);
    }

    #[test]
    fn context_is_bounded() {
        let mut c = Controller::new(
            ControllerKind::Bandit(BanditKind::LinUcb),
            ControllerConfig::default(),
        );
        for (i, rms) in [1.0f32, 5.0, 3.0, 1000.0].into_iter().enumerate() {
            let mut s = Signals::from_probs(&[0.6, 0.3, 0.1]);
            s.hidden_rms = [rms, 2.0 * rms];
            let x = c.context(&s, i * 1000);
            assert_eq!(x[0], 1.0);
            assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)), "{x:?}");
        }
    }
}
