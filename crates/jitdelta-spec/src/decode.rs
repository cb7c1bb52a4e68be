//! The speculative decoding loop, written against [`SpecModel`] so that it does not care
//! where the draft and the target run (one JIT model in two modes, on any device, or a
//! recorded trace).

use crate::sampling::{argmax, greedy_reductions, sample, Sampling, Signals, F32_EXACT_INDEX};
use crate::{Controller, Error, Result};
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// The draft's output for the next position.
#[derive(Clone, Debug)]
pub struct DraftRow {
    /// The most likely token.
    pub argmax: u32,
    /// What the distribution says about the draft's confidence.
    pub signals: Signals,
    /// The sampling distribution `q` ([`Sampling::probs`]); `Some` exactly when sampling.
    pub probs: Option<Vec<f32>>,
}

impl DraftRow {
    /// The row for one position's `logits`, with the draft's hidden-state RMS after the middle
    /// and the last layer.
    pub fn from_logits(logits: &[f32], sampling: &Sampling, hidden_rms: [f32; 2]) -> Self {
        let probs = sampling.probs(logits);
        let mut signals = Signals::from_probs(&probs);
        signals.hidden_rms = hidden_rms;
        DraftRow {
            argmax: argmax(logits),
            signals,
            probs: (!sampling.is_greedy()).then_some(probs),
        }
    }

    /// The row for one position's `logits` (one row of the vocabulary, on any device), with the
    /// draft's hidden-state RMS after the middle and the last layer as rank-0 tensors on the
    /// same device (`None`: zeros). Whatever the sampling, one device-to-host copy.
    ///
    /// Greedy: the argmax and the signals' reductions over the vocabulary are computed with
    /// tensor ops on the logits' device in f32, and only those five scalars and the two RMS
    /// values come back (the host finishes them into the signals in O(1)); they
    /// agree with [`DraftRow::from_logits`] to f32 rounding (tested). On the CPU the argmax
    /// is the first on ties, as on the host; other devices may pick another tied index, which
    /// changes only the proposal, never what verification keeps. Sampling: the draw needs `q`
    /// on the host, so the row comes back (with the RMS values, in the same copy) and
    /// [`DraftRow::from_logits`] computes `q` and its signals. A vocabulary over 2^24 (past
    /// where an f32 holds every index) takes the sampling path's copy too.
    pub fn from_device(
        logits: &Tensor,
        sampling: &Sampling,
        hidden_rms: Option<[Tensor; 2]>,
    ) -> Result<Self> {
        Self::from_device_stats(logits, None, sampling, hidden_rms)
    }

    /// [`DraftRow::from_device`] given, when greedy, the reductions already computed on the
    /// device by a fused kernel (`stats`: argmax, Z, S, l2 and ties as five f32 values, as
    /// [`CausalLm::logit_stats`](jitdelta_nn::CausalLm::logit_stats) returns them): one launch
    /// in place of some sixteen tensor ops, whose host time showed in every draft pass on the
    /// GPU. `None`, or sampling, computes as `from_device` does.
    pub fn from_device_stats(
        logits: &Tensor,
        stats: Option<Tensor>,
        sampling: &Sampling,
        hidden_rms: Option<[Tensor; 2]>,
    ) -> Result<Self> {
        let rms = hidden_rms.map_or(Ok(Vec::new()), |h| {
            h.iter()
                .map(|t| match t.elem_count() {
                    1 => Ok(t.flatten_all()?.to_dtype(DType::F32)?),
                    n => Err(Error::InvalidInput(format!(
                        "a hidden-state RMS of {n} values, expected one"
                    ))),
                })
                .collect::<Result<Vec<_>>>()
        })?;
        // `head` values, then the RMS values if any: one copy.
        let fetch = |head: Tensor| -> Result<(Vec<f32>, [f32; 2])> {
            let n = head.elem_count();
            let mut v: Vec<f32> = Tensor::cat(&[&[head][..], &rms].concat(), 0)?.to_vec1()?;
            let hidden = match v[n..] {
                [mid, last] => [mid, last],
                _ => [0.0; 2],
            };
            v.truncate(n);
            Ok((v, hidden))
        };
        if sampling.is_greedy() && logits.elem_count() <= F32_EXACT_INDEX {
            let stats = match stats {
                Some(s) if s.elem_count() == 5 => s.flatten_all()?.to_dtype(DType::F32)?,
                Some(s) => {
                    return Err(Error::InvalidInput(format!(
                        "{} logit stats, expected 5",
                        s.elem_count()
                    )))
                }
                None => Tensor::stack(&greedy_reductions(logits)?, 0)?,
            };
            let (v, hidden) = fetch(stats)?;
            let mut signals = Signals::from_reductions(v[1], v[2], v[3], v[4]);
            signals.hidden_rms = hidden;
            return Ok(DraftRow {
                argmax: v[0] as u32,
                signals,
                probs: None,
            });
        }
        let (v, hidden) = fetch(logits.flatten_all()?.to_dtype(DType::F32)?)?;
        Ok(DraftRow::from_logits(&v, sampling, hidden))
    }
}

/// The target's output for one position.
#[derive(Clone, Debug)]
pub struct TargetRow {
    /// The most likely token.
    pub argmax: u32,
    /// The sampling distribution `p` ([`Sampling::probs`]); `Some` exactly when sampling.
    pub probs: Option<Vec<f32>>,
}

/// A draft and a target sharing a tokenizer, each with its own KV cache.
///
/// [`SelfSpec`](crate::SelfSpec) implements it for one JIT model in Draft and Exact modes.
pub trait SpecModel {
    /// Appends `tokens` (never empty) to the draft's cache and returns its output for the
    /// position after them.
    fn draft(&mut self, tokens: &[u32], sampling: &Sampling) -> Result<DraftRow>;

    /// Appends `tokens` (never empty) to the target's cache in one forward pass and returns
    /// its outputs for the last `rows` positions (`1 <= rows <= tokens.len()`).
    fn verify(
        &mut self,
        tokens: &[u32],
        rows: usize,
        sampling: &Sampling,
    ) -> Result<Vec<TargetRow>>;

    /// Positions in the draft's cache.
    fn draft_len(&self) -> usize;

    /// Positions in the target's cache.
    fn target_len(&self) -> usize;

    /// Keeps the first `draft_len` and `target_len` positions of the two caches.
    fn rollback(&mut self, draft_len: usize, target_len: usize) -> Result<()>;
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Most new tokens.
    pub max_new: usize,
    /// How tokens are picked (verification follows it).
    pub sampling: Sampling,
    /// Tokens that end the generation (kept in the output).
    pub stop: Vec<u32>,
    /// Seed of the sampling random numbers.
    pub seed: u64,
}

/// Counters of one or more generations.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct SpecStats {
    /// Tokens generated.
    pub tokens: usize,
    /// Target forward passes (one per round, the prompt's included).
    pub target_passes: usize,
    /// Draft forward passes (one per drafted token).
    pub draft_passes: usize,
    /// Rounds that drafted at least one token.
    pub rounds: usize,
    /// Tokens drafted.
    pub drafted: usize,
    /// Drafted tokens the target accepted.
    pub accepted: usize,
}

/// [`SpecStats`] with its ratios, as reported.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct SpecSummary {
    /// The counters.
    #[serde(flatten)]
    pub stats: SpecStats,
    /// Accepted / drafted tokens.
    pub acceptance_rate: f64,
    /// Accepted drafted tokens per drafting round (the target's own token not counted).
    pub mean_accepted_length: f64,
    /// Target passes per generated token (plain decoding: 1).
    pub target_passes_per_token: f64,
    /// Draft passes per generated token.
    pub draft_passes_per_token: f64,
    /// `(target passes + c * draft passes) / tokens`, `c` the draft cost given: the cost per
    /// token in target passes (plain decoding: 1; its inverse is the predicted speed-up).
    pub cost_per_token: f64,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl SpecStats {
    /// Adds another generation's counters.
    pub fn add(&mut self, o: &SpecStats) {
        self.tokens += o.tokens;
        self.target_passes += o.target_passes;
        self.draft_passes += o.draft_passes;
        self.rounds += o.rounds;
        self.drafted += o.drafted;
        self.accepted += o.accepted;
    }

    /// The ratios, with a draft pass costing `draft_cost` target passes.
    pub fn summary(&self, draft_cost: f64) -> SpecSummary {
        SpecSummary {
            stats: *self,
            acceptance_rate: ratio(self.accepted, self.drafted),
            mean_accepted_length: ratio(self.accepted, self.rounds),
            target_passes_per_token: ratio(self.target_passes, self.tokens),
            draft_passes_per_token: ratio(self.draft_passes, self.tokens),
            cost_per_token: (self.target_passes as f64 + draft_cost * self.draft_passes as f64)
                / self.tokens.max(1) as f64,
        }
    }
}

/// The output of [`generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The new tokens (a stop token included).
    pub tokens: Vec<u32>,
    /// The counters.
    pub stats: SpecStats,
    /// Wall time of its draft and verify passes (the prompt's pass not included).
    pub pass_times: PassTimer,
}

/// Wall time of draft and verify passes: what
/// [`ControllerConfig::measure_draft_cost`](crate::ControllerConfig::measure_draft_cost) feeds
/// the controller, and what shows where a generation's time went against the cost model
/// (docs/speculative.md). The passes read their results back to the host, so their wall time is
/// their cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PassTimer {
    draft: (Duration, u32),
    verify: (Duration, u32),
}

impl PassTimer {
    /// Records one draft pass of `d`.
    pub fn record_draft(&mut self, d: Duration) {
        self.draft = (self.draft.0 + d, self.draft.1 + 1);
    }

    /// Records one verify pass of `d`.
    pub fn record_verify(&mut self, d: Duration) {
        self.verify = (self.verify.0 + d, self.verify.1 + 1);
    }

    /// Mean draft pass time over mean verify pass time, once both were seen.
    pub fn draft_cost(&self) -> Option<f64> {
        let (d, v) = (self.mean_draft()?, self.mean_verify()?);
        (v > Duration::ZERO).then(|| d.as_secs_f64() / v.as_secs_f64())
    }

    /// Mean wall time of a draft pass, once one was seen.
    pub fn mean_draft(&self) -> Option<Duration> {
        mean(self.draft)
    }

    /// Mean wall time of a verify pass, once one was seen.
    pub fn mean_verify(&self) -> Option<Duration> {
        mean(self.verify)
    }

    fn time<T>(&mut self, verify: bool, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let d = start.elapsed();
        if verify {
            self.record_verify(d);
        } else {
            self.record_draft(d);
        }
        out
    }

    fn draft<T>(&mut self, f: impl FnOnce() -> T) -> T {
        self.time(false, f)
    }

    fn verify<T>(&mut self, f: impl FnOnce() -> T) -> T {
        self.time(true, f)
    }
}

fn mean((total, n): (Duration, u32)) -> Option<Duration> {
    (n > 0).then(|| total / n)
}

/// Probability of keeping a drafted `token`: `min(1, p(token) / q(token))`.
pub fn acceptance_probability(p: &[f32], q: &[f32], token: u32) -> f64 {
    let (pt, qt) = (p[token as usize] as f64, q[token as usize] as f64);
    if qt <= 0.0 {
        1.0 // never drafted by a sampler; keep the rule total
    } else {
        (pt / qt).min(1.0)
    }
}

/// The distribution to resample from after a rejection: `max(0, p - q)`, unnormalized
/// ([`sample`] normalizes). All zero only when `p <= q` everywhere, i.e. `p == q`, where no
/// rejection can happen.
pub fn residual(p: &[f32], q: &[f32]) -> Vec<f32> {
    p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect()
}

fn probs(row: Option<&Vec<f32>>) -> Result<&Vec<f32>> {
    row.ok_or_else(|| Error::InvalidInput("a model returned no distribution while sampling".into()))
}

/// Verifies `drafts` against the target's `rows` (`drafts.len() + 1` of them): returns how
/// many drafted tokens are kept and the token the target adds after them.
///
/// Greedy: drafts are kept while they equal the target's argmax; the added token is the
/// target's argmax after them. Sampling: each draft is kept with probability
/// [`acceptance_probability`]; at the first rejection the added token is drawn from
/// [`residual`], and when all are kept it is drawn from the target's last row. Either way the
/// output has exactly the target's distribution.
pub fn verify_drafts(
    drafts: &[u32],
    draft_probs: &[Option<Vec<f32>>],
    rows: &[TargetRow],
    sampling: &Sampling,
    rng: &mut impl Rng,
) -> Result<(usize, u32)> {
    if rows.len() != drafts.len() + 1 {
        return Err(Error::InvalidInput(format!(
            "{} target rows for {} drafted tokens",
            rows.len(),
            drafts.len()
        )));
    }
    for (i, &d) in drafts.iter().enumerate() {
        if sampling.is_greedy() {
            if d != rows[i].argmax {
                return Ok((i, rows[i].argmax));
            }
            continue;
        }
        let (p, q) = (
            probs(rows[i].probs.as_ref())?,
            probs(draft_probs[i].as_ref())?,
        );
        if rng.random::<f64>() >= acceptance_probability(p, q, d) {
            let r = residual(p, q);
            let t = if r.iter().any(|&x| x > 0.0) {
                sample(&r, rng)
            } else {
                sample(p, rng)
            };
            return Ok((i, t));
        }
    }
    let last = &rows[drafts.len()];
    let next = if sampling.is_greedy() {
        last.argmax
    } else {
        sample(probs(last.probs.as_ref())?, rng)
    };
    Ok((drafts.len(), next))
}

/// Generates up to `opts.max_new` tokens after `prompt` by speculative decoding: each round
/// the draft proposes tokens until `controller` stops it, the target scores them all in one
/// pass, the longest valid prefix and one target token are kept, and both caches roll back.
///
/// Greedy output is token for token the target's greedy output; sampled output has the
/// target's distribution. `on_token` sees each new token as it is kept.
pub fn generate(
    model: &mut dyn SpecModel,
    controller: &mut Controller,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::InvalidInput("the prompt has no tokens".into()));
    }
    let sampling = &opts.sampling;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    model.rollback(0, 0)?;
    let mut seq = prompt.to_vec();
    let mut stats = SpecStats::default();
    let mut timer = PassTimer::default();
    let mut done = opts.max_new == 0;
    // The draft's pass over the prompt, run in the prompt's round (see below).
    let mut prompt_row = None;
    while !done {
        let n = seq.len();
        // The first round drafts nothing: the target reads the prompt alone, as plain decoding
        // does, so its first token comes from the very same pass (a pass of a different length
        // may round differently and flip a near-tie). Nor do rounds that auto-off pauses; the
        // draft catches up on the tokens it missed in its next pass.
        let cap = if model.target_len() == 0 || controller.plain_step() {
            0
        } else {
            controller
                .config()
                .max_draft
                .min(opts.max_new - stats.tokens - 1)
        };
        let (mut drafts, mut draft_probs, mut signals) = (Vec::new(), Vec::new(), Vec::new());
        // A round that does not draft (auto-off carried over in a reused controller) drops it:
        // the draft's cache keeps what it read, the next drafting round feeds only the rest.
        let pending = prompt_row.take();
        if cap > 0 {
            let mut row = match pending {
                Some(row) => row,
                None => timer.draft(|| model.draft(&seq[model.draft_len()..], sampling))?,
            };
            controller.begin_round(&row.signals, n);
            loop {
                stats.draft_passes += 1;
                let token = match &row.probs {
                    Some(q) if !sampling.is_greedy() => sample(q, &mut rng),
                    _ => row.argmax,
                };
                drafts.push(token);
                draft_probs.push(row.probs);
                signals.push(row.signals);
                if drafts.len() >= cap
                    || opts.stop.contains(&token)
                    || controller.should_stop(&signals)
                {
                    break;
                }
                row = timer.draft(|| model.draft(&[token], sampling))?;
            }
        }
        let mut feed = seq[model.target_len()..].to_vec();
        feed.extend_from_slice(&drafts);
        // The prompt's pass is not a verify pass: not timed.
        let rows = if model.target_len() == 0 {
            model.verify(&feed, drafts.len() + 1, sampling)?
        } else {
            timer.verify(|| model.verify(&feed, drafts.len() + 1, sampling))?
        };
        stats.target_passes += 1;
        if let Some(c) = timer
            .draft_cost()
            .filter(|_| controller.config().measure_draft_cost)
        {
            controller.set_draft_cost(c);
        }
        let (accepted, next) = verify_drafts(&drafts, &draft_probs, &rows, sampling, &mut rng)?;
        if !drafts.is_empty() {
            controller.end_round(drafts.len(), accepted);
            stats.rounds += 1;
            stats.drafted += drafts.len();
            stats.accepted += accepted;
        }
        for &t in drafts[..accepted].iter().chain([&next]) {
            seq.push(t);
            stats.tokens += 1;
            if opts.stop.contains(&t) || stats.tokens >= opts.max_new {
                done = true;
                break;
            }
        }
        let keep = n + accepted;
        model.rollback(model.draft_len().min(keep), keep)?;
        // The next round's first draft pass reads the whole prompt (and the first token): run
        // it now, before the first token goes out, so both models read the prompt before it,
        // as plain decoding does, and the decode time after it holds no prompt pass (on a GPU
        // a 32-token prompt pass takes ~50 ms at 7B, some 13 draft steps).
        // The same pass with the same tokens as in the next round, so the same output and
        // counts. Not timed, as the target's prompt pass is not (a measured draft cost then no
        // longer includes it, so under `measure_draft_cost` the bandit sees a lower cost).
        if !done && model.draft_len() == 0 && stats.tokens + 1 < opts.max_new {
            prompt_row = Some(model.draft(&seq, sampling)?);
        }
        for &t in &seq[n..] {
            on_token(t)?;
        }
    }
    Ok(Generation {
        tokens: seq[prompt.len()..].to_vec(),
        stats,
        pass_times: timer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::AUTO_OFF_WINDOW;
    use crate::{Controller, ControllerConfig, Signals};

    #[test]
    fn precomputed_stats_give_the_same_row_and_bad_ones_an_error() {
        let logits = Tensor::new(&[0.5f32, 3.0, -1.0, 3.0, 2.5], &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5))
            .unwrap();
        let greedy = Sampling::Greedy;
        let plain = DraftRow::from_device(&logits, &greedy, None).unwrap();
        let stats =
            Tensor::stack(&crate::sampling::greedy_reductions(&logits).unwrap(), 0).unwrap();
        let fused = DraftRow::from_device_stats(&logits, Some(stats), &greedy, None).unwrap();
        assert_eq!((fused.argmax, fused.signals), (plain.argmax, plain.signals));
        assert_eq!(fused.argmax, 1, "the first of the tied maxima");
        let four = Tensor::zeros(4, DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(DraftRow::from_device_stats(&logits, Some(four), &greedy, None).is_err());
    }

    #[test]
    fn pass_timer_reports_the_ratio_of_mean_times() {
        let mut t = PassTimer::default();
        assert_eq!(t.draft_cost(), None);
        assert_eq!(t.mean_verify(), None);
        t.record_draft(Duration::from_millis(2));
        assert_eq!(t.draft_cost(), None, "no verify pass yet");
        t.record_draft(Duration::from_millis(4));
        t.record_verify(Duration::from_millis(6));
        assert!((t.draft_cost().unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(t.mean_draft(), Some(Duration::from_millis(3)));
        t.record_verify(Duration::ZERO);
        assert!((t.draft_cost().unwrap() - 1.0).abs() < 1e-12);
        let zero = PassTimer {
            verify: (Duration::ZERO, 1),
            ..t
        };
        assert_eq!(zero.draft_cost(), None, "a zero verify time gives no ratio");
    }

    /// Counts up; the draft agrees except at multiples of `wrong_every`. Its draft pass sleeps
    /// `draft_ms`, its verify pass `verify_ms`.
    struct Sleepy {
        draft: Vec<u32>,
        target: Vec<u32>,
        draft_ms: u64,
        verify_ms: u64,
        wrong_every: u32,
    }

    impl SpecModel for Sleepy {
        fn draft(&mut self, tokens: &[u32], _: &Sampling) -> Result<DraftRow> {
            std::thread::sleep(Duration::from_millis(self.draft_ms));
            self.draft.extend_from_slice(tokens);
            let next = tokens[tokens.len() - 1] + 1;
            Ok(DraftRow {
                argmax: if next % self.wrong_every == 0 {
                    0
                } else {
                    next
                },
                signals: Signals::from_probs(&[0.9, 0.1]),
                probs: None,
            })
        }
        fn verify(&mut self, tokens: &[u32], rows: usize, _: &Sampling) -> Result<Vec<TargetRow>> {
            std::thread::sleep(Duration::from_millis(self.verify_ms));
            self.target.extend_from_slice(tokens);
            Ok(tokens[tokens.len() - rows..]
                .iter()
                .map(|&t| TargetRow {
                    argmax: t + 1,
                    probs: None,
                })
                .collect())
        }
        fn draft_len(&self) -> usize {
            self.draft.len()
        }
        fn target_len(&self) -> usize {
            self.target.len()
        }
        fn rollback(&mut self, d: usize, t: usize) -> Result<()> {
            self.draft.truncate(d);
            self.target.truncate(t);
            Ok(())
        }
    }

    /// A model that logs its passes (and how many tokens each read) into a shared log.
    struct Logged<'a> {
        inner: Sleepy,
        log: &'a std::cell::RefCell<Vec<String>>,
    }

    impl SpecModel for Logged<'_> {
        fn draft(&mut self, tokens: &[u32], s: &Sampling) -> Result<DraftRow> {
            self.log
                .borrow_mut()
                .push(format!("draft {}", tokens.len()));
            self.inner.draft(tokens, s)
        }
        fn verify(&mut self, tokens: &[u32], rows: usize, s: &Sampling) -> Result<Vec<TargetRow>> {
            self.log
                .borrow_mut()
                .push(format!("verify {}", tokens.len()));
            self.inner.verify(tokens, rows, s)
        }
        fn draft_len(&self) -> usize {
            self.inner.draft_len()
        }
        fn target_len(&self) -> usize {
            self.inner.target_len()
        }
        fn rollback(&mut self, d: usize, t: usize) -> Result<()> {
            self.inner.rollback(d, t)
        }
    }

    #[test]
    fn the_draft_reads_the_prompt_before_the_first_token_goes_out() {
        let log = std::cell::RefCell::new(Vec::new());
        let mut model = Logged {
            inner: Sleepy {
                draft: vec![],
                target: vec![],
                draft_ms: 0,
                verify_ms: 0,
                wrong_every: 5,
            },
            log: &log,
        };
        let opts = GenerateOptions {
            max_new: 12,
            sampling: Sampling::Greedy,
            stop: vec![],
            seed: 0,
        };
        let mut controller =
            Controller::new("fixed:3".parse().unwrap(), ControllerConfig::default());
        let out = generate(&mut model, &mut controller, &[10, 11, 12], &opts, |t| {
            log.borrow_mut().push(format!("token {t}"));
            Ok(())
        })
        .unwrap();
        // Counting up from the prompt's last token: what the target itself says.
        assert_eq!(out.tokens, (13..25).collect::<Vec<u32>>());
        // The target reads the prompt, the draft the prompt and the first token, and only then
        // does the first token go out; the next round drafts on from there.
        assert_eq!(
            log.borrow()[..5],
            ["verify 3", "draft 4", "token 13", "draft 1", "draft 1"]
        );
        // That pass counts as a draft pass: its row drafts the next round's first token.
        assert_eq!(out.stats.draft_passes, out.stats.drafted);
        // Too short a generation for a second round: the draft never reads the prompt.
        log.borrow_mut().clear();
        model.inner.draft.clear();
        let two = GenerateOptions { max_new: 2, ..opts };
        generate(&mut model, &mut controller, &[10, 11, 12], &two, |_| Ok(())).unwrap();
        assert!(
            log.borrow().iter().all(|e| e.starts_with("verify")),
            "{log:?}"
        );
    }

    #[test]
    fn measured_draft_cost_follows_the_pass_times_and_keeps_the_output() {
        let opts = GenerateOptions {
            max_new: 16,
            sampling: Sampling::Greedy,
            stop: vec![],
            seed: 0,
        };
        for measure in [false, true] {
            let mut model = Sleepy {
                draft: vec![],
                target: vec![],
                draft_ms: 1,
                verify_ms: 20,
                wrong_every: 4,
            };
            let config = ControllerConfig {
                measure_draft_cost: measure,
                ..ControllerConfig::default()
            };
            let mut controller = Controller::new("ucb1".parse().unwrap(), config);
            let out = generate(&mut model, &mut controller, &[1], &opts, |_| Ok(())).unwrap();
            assert_eq!(out.tokens, (2..18).collect::<Vec<u32>>());
            let c = controller.config().draft_cost;
            if measure {
                // Sleeps are lower bounds: a 1 ms draft against a 20 ms verify stays far below
                // the default 0.7 however the scheduler delays the draft.
                assert!(c < 0.5, "measured draft cost {c}");
            } else {
                assert_eq!(c, 0.7);
            }
        }
    }

    #[test]
    fn a_pause_carried_into_the_next_request_drops_the_prompt_row() {
        let config = ControllerConfig {
            auto_off: true,
            ..ControllerConfig::default()
        };
        let mut controller = Controller::new("fixed:4".parse().unwrap(), config);
        let mut model = Sleepy {
            draft: vec![],
            target: vec![],
            draft_ms: 0,
            verify_ms: 0,
            wrong_every: 1,
        };
        let opts = |max_new| GenerateOptions {
            max_new,
            sampling: Sampling::Greedy,
            stop: vec![],
            seed: 0,
        };
        // A losing draft: after the prompt's token, a window of one-token rounds, then a pause
        // of 16 plain steps that this request ends 5 steps into.
        let first = 1 + AUTO_OFF_WINDOW + 5;
        generate(&mut model, &mut controller, &[1], &opts(first), |_| Ok(())).unwrap();
        let paused_steps = controller.state().plain_steps;
        assert_eq!(paused_steps, 5);
        // The next request, with a draft that is always right, starts inside that pause: its
        // prompt round still has the draft read the prompt, but the row it returns is stale by
        // the time drafting resumes and must not be drafted from.
        model.wrong_every = 10_000;
        let out = generate(&mut model, &mut controller, &[50], &opts(40), |_| Ok(())).unwrap();
        assert_eq!(out.tokens, (51..91).collect::<Vec<u32>>());
        assert!(controller.state().plain_steps > paused_steps);
        assert!(out.stats.drafted > 0);
        assert_eq!(out.stats.accepted, out.stats.drafted, "{:?}", out.stats);
    }

    /// A draft that never agrees loses to plain decoding (each round: 1 token for 1 + 4c
    /// passes), so auto-off pauses it, for longer each time its probe loses again; a draft
    /// that always agrees is left alone. The tokens are plain decoding's either way.
    #[test]
    fn auto_off_pauses_a_losing_draft_and_keeps_the_output() {
        let opts = GenerateOptions {
            max_new: 400,
            sampling: Sampling::Greedy,
            stop: vec![],
            seed: 0,
        };
        let run = |wrong_every: u32, auto_off: bool| {
            let mut model = Sleepy {
                draft: vec![],
                target: vec![],
                draft_ms: 0,
                verify_ms: 0,
                wrong_every,
            };
            let config = ControllerConfig {
                auto_off,
                ..ControllerConfig::default()
            };
            let mut controller = Controller::new("fixed:4".parse().unwrap(), config);
            let out = generate(&mut model, &mut controller, &[1], &opts, |_| Ok(())).unwrap();
            assert_eq!(out.tokens, (2..402).collect::<Vec<u32>>());
            (out.stats, controller.state())
        };
        let (off, state) = run(1, false);
        assert_eq!((state.auto_off_pauses, state.plain_steps), (0, 0));
        let (on, state) = run(1, true);
        // After the prompt's pass: windows of 8 one-token rounds, then pauses of 16, 32, 64,
        // 128 and 256 plain steps (the last cut short by the 400-token limit).
        assert_eq!(state.auto_off_pauses, 5, "{state:?}");
        assert_eq!(state.plain_steps as usize, 400 - 1 - 5 * AUTO_OFF_WINDOW);
        assert_eq!(on.draft_passes, 5 * AUTO_OFF_WINDOW * 4);
        assert!(off.draft_passes > 1500, "{off:?}");
        // One target pass a token either way: every round keeps only the target's token.
        assert_eq!((on.target_passes, off.target_passes), (400, 400));

        let (off, _) = run(10_000, false);
        let (on, state) = run(10_000, true);
        assert_eq!((state.auto_off_pauses, state.plain_steps), (0, 0));
        assert_eq!(
            (on.draft_passes, on.target_passes),
            (off.draft_passes, off.target_passes)
        );
    }

    #[test]
    fn acceptance_rule_reproduces_the_target_exactly() {
        // Output distribution of one verify step, summed over what the draft proposes:
        // P(x) = q(x) a(x) + sum_y q(y) (1 - a(y)) r(x) / |r|. It must be p, for every pair.
        let cases: [(&[f32], &[f32]); 4] = [
            (&[0.5, 0.3, 0.2, 0.0], &[0.25, 0.25, 0.25, 0.25]),
            (&[0.1, 0.0, 0.9, 0.0], &[0.7, 0.2, 0.1, 0.0]),
            (&[0.0, 0.0, 1.0, 0.0], &[0.0, 1.0, 0.0, 0.0]), // disjoint supports
            (&[0.4, 0.6, 0.0, 0.0], &[0.4, 0.6, 0.0, 0.0]), // equal: always accepted
        ];
        for (p, q) in cases {
            let r = residual(p, q);
            let mass: f64 = r.iter().map(|&x| x as f64).sum();
            let mut out = [0f64; 4];
            for y in 0..4 {
                let a = acceptance_probability(p, q, y as u32);
                out[y] += q[y] as f64 * a;
                for x in 0..4 {
                    if mass > 0.0 {
                        out[x] += q[y] as f64 * (1.0 - a) * r[x] as f64 / mass;
                    }
                }
            }
            for x in 0..4 {
                assert!((out[x] - p[x] as f64).abs() < 1e-7, "{p:?} {q:?}: {out:?}");
            }
        }
    }

    #[test]
    fn verify_drafts_samples_the_target() {
        // Monte Carlo through `verify_drafts` itself: one drafted token drawn from q.
        let p = vec![0.1f32, 0.6, 0.3];
        let q = vec![0.5f32, 0.2, 0.3];
        let sampling = Sampling::top_p(1.0, 1.0).unwrap();
        let rows = [
            TargetRow {
                argmax: 1,
                probs: Some(p.clone()),
            },
            TargetRow {
                argmax: 0,
                probs: Some(vec![1.0, 0.0, 0.0]),
            },
        ];
        let mut rng = StdRng::seed_from_u64(5);
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            let d = sample(&q, &mut rng);
            let (kept, next) =
                verify_drafts(&[d], &[Some(q.clone())], &rows, &sampling, &mut rng).unwrap();
            let first = if kept == 1 { d } else { next };
            counts[first as usize] += 1;
        }
        for x in 0..3 {
            let f = counts[x] as f64 / n as f64;
            assert!((f - p[x] as f64).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn greedy_verification_keeps_the_matching_prefix() {
        let row = |t| TargetRow {
            argmax: t,
            probs: None,
        };
        let mut rng = StdRng::seed_from_u64(0);
        let g = Sampling::Greedy;
        let rows = [row(5), row(6), row(9), row(3)];
        assert_eq!(
            verify_drafts(&[5, 6, 7], &[None, None, None], &rows, &g, &mut rng).unwrap(),
            (2, 9)
        );
        assert_eq!(
            verify_drafts(&[5, 6, 9], &[None, None, None], &rows, &g, &mut rng).unwrap(),
            (3, 3)
        );
        assert_eq!(
            verify_drafts(&[], &[], &rows[..1], &g, &mut rng).unwrap(),
            (0, 5)
        );
        assert!(verify_drafts(&[1], &[None], &rows[..1], &g, &mut rng).is_err());
        // Sampling without distributions is an error, not a panic.
        let s = Sampling::top_p(1.0, 1.0).unwrap();
        assert!(verify_drafts(&[5], &[None], &rows[..2], &s, &mut rng).is_err());
    }

    #[test]
    fn summary_ratios() {
        let s = SpecStats {
            tokens: 10,
            target_passes: 4,
            draft_passes: 8,
            rounds: 3,
            drafted: 8,
            accepted: 6,
        };
        let m = s.summary(0.5);
        assert_eq!(m.acceptance_rate, 0.75);
        assert_eq!(m.mean_accepted_length, 2.0);
        assert_eq!(m.target_passes_per_token, 0.4);
        assert!((m.cost_per_token - 0.8).abs() < 1e-12);
        assert_eq!(SpecStats::default().summary(0.7).acceptance_rate, 0.0);
    }
}
