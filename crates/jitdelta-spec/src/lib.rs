//! # jitdelta-spec
//!
//! Self-speculative decoding for jitdelta models. The file's base (the JIT layers in
//! [`Mode::Draft`](jitdelta_nn::Mode)) drafts tokens one at a time; the exact model
//! ([`Mode::Exact`](jitdelta_nn::Mode)) scores them all in one forward pass; the longest
//! valid prefix plus one target token is kept and both KV caches roll back. Greedy output is
//! token for token the exact model's greedy output; sampled output has its distribution
//! (the accept-with-`min(1, p/q)`, resample-from-`max(0, p - q)` rule). No second model and no
//! training.
//!
//! How many tokens to draft is decided per round by a [`Controller`]: one [`StopRule`] (fixed
//! K, max-confidence, entropy, logit margin, an entropy bound on acceptance), or a bandit
//! over all of them (UCB1, UCB1-Tuned, Thompson sampling, LinUCB on the draft's signals),
//! rewarded by the round's throughput (see [`controller`]).
//!
//! On a real model:
//!
//! ```no_run
//! use candle_core::Device;
//! use jitdelta_nn::{models::load_causal_lm, JitOptions, JitSource};
//! use jitdelta_spec::{generate, Controller, ControllerConfig, GenerateOptions, Sampling, SelfSpec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let source = JitSource::open("smollm2.jd", &Device::Cpu, JitOptions::default())?;
//! let model = load_causal_lm(&source)?;
//! let mut pair = SelfSpec::new(model.as_ref(), source.mode().clone());
//! let mut controller = Controller::new("ucb1".parse()?, ControllerConfig::default());
//! let opts = GenerateOptions { max_new: 64, sampling: Sampling::Greedy, stop: vec![2], seed: 0 };
//! let out = generate(&mut pair, &mut controller, &[1, 504, 3458], &opts, |_| Ok(()))?;
//! println!("{:?} {:?}", out.stats.summary(0.7), controller.state());
//! # Ok(()) }
//! ```
//!
//! The loop runs against the [`SpecModel`] trait, so a toy pair shows it end to end. Here the
//! target counts up and the draft agrees except at multiples of 5:
//!
//! ```
//! use jitdelta_spec::*;
//!
//! struct Toy { seq_draft: Vec<u32>, seq_target: Vec<u32> }
//! fn row(argmax: u32) -> DraftRow {
//!     DraftRow { argmax, signals: Signals::from_probs(&[0.9, 0.1]), probs: None }
//! }
//! impl SpecModel for Toy {
//!     fn draft(&mut self, tokens: &[u32], _: &Sampling) -> Result<DraftRow> {
//!         self.seq_draft.extend_from_slice(tokens);
//!         let next = tokens[tokens.len() - 1] + 1;
//!         Ok(row(if next % 5 == 0 { 0 } else { next }))
//!     }
//!     fn verify(&mut self, tokens: &[u32], rows: usize, _: &Sampling) -> Result<Vec<TargetRow>> {
//!         self.seq_target.extend_from_slice(tokens);
//!         Ok(tokens[tokens.len() - rows..].iter()
//!             .map(|&t| TargetRow { argmax: t + 1, probs: None }).collect())
//!     }
//!     fn draft_len(&self) -> usize { self.seq_draft.len() }
//!     fn target_len(&self) -> usize { self.seq_target.len() }
//!     fn rollback(&mut self, d: usize, t: usize) -> Result<()> {
//!         self.seq_draft.truncate(d);
//!         self.seq_target.truncate(t);
//!         Ok(())
//!     }
//! }
//!
//! let mut toy = Toy { seq_draft: vec![], seq_target: vec![] };
//! let mut controller = Controller::new("fixed:3".parse()?, ControllerConfig::default());
//! let opts = GenerateOptions { max_new: 12, sampling: Sampling::Greedy, stop: vec![], seed: 0 };
//! let out = generate(&mut toy, &mut controller, &[1], &opts, |_| Ok(()))?;
//! assert_eq!(out.tokens, (2..14).collect::<Vec<u32>>()); // exactly the target's output
//! assert!(out.stats.target_passes < 12);                  // in fewer target passes
//! assert_eq!(controller.state().arms[0].rule, "fixed:3");
//! # Ok::<(), jitdelta_spec::Error>(())
//! ```
#![deny(missing_docs)]

pub mod bandit;
pub mod controller;
mod decode;
mod error;
mod model;
mod rules;
mod sampling;

pub use bandit::{ArmStats, Bandit, BanditKind};
pub use controller::{ArmState, Controller, ControllerConfig, ControllerKind, ControllerState};
pub use decode::{
    acceptance_probability, generate, residual, verify_drafts, DraftRow, GenerateOptions,
    Generation, PassTimer, SpecModel, SpecStats, SpecSummary, TargetRow,
};
pub use error::{Error, Result};
pub use model::SelfSpec;
pub use rules::StopRule;
pub use sampling::{argmax, sample, Sampling, Signals};
