//! Greedy speculative decoding on SmolLM2-135M-Instruct (JIT Draft proposes, JIT Exact
//! verifies) is token for token plain greedy decoding, for every kind of controller (one
//! prompt each).

#[path = "../../jitdelta-nn/tests/common/mod.rs"]
mod common;

use candle_core::Device;
use common::*;
use jitdelta_nn::models::{greedy_generate, load_causal_lm};
use jitdelta_nn::{DenseSource, JitOptions, JitSource};
use jitdelta_spec::{
    generate, Controller, ControllerConfig, GenerateOptions, Sampling, SelfSpec, SpecStats,
};

const PROMPTS: [&str; 12] = [
    "What is the capital of France?",
    "Write a Python function that returns the sum of a list.",
    "What is 17 times 3?",
    "Repeat the word 'hello' ten times.",
    "Give me three tips for sleeping better.",
    "List the days of the week.",
    "Write a short story about a robot who learns to paint.",
    "Explain what a hash map is in one paragraph.",
    "Count from 1 to 20.",
    "If a train travels 60 km per hour for 3 hours, how far does it go?",
    "Translate 'good morning' into Spanish.",
    "Write a JavaScript function that reverses a string.",
];

const CONTROLLERS: [&str; 12] = [
    "fixed:1",
    "fixed:4",
    "fixed:9",
    "max-conf",
    "entropy",
    "margin",
    "entropy-bound",
    "ucb1",
    "ucb1-tuned",
    "ts",
    "ts-gauss",
    "lin-ucb",
];

const TOKENS: usize = 14;

#[test]
fn greedy_speculation_is_plain_greedy_decoding() {
    let tok = tokenizer();
    // The reference: greedy decoding of the dense model (bit-identical to JIT Exact, tested in
    // jitdelta-nn, and faster on the CPU).
    let dense_source = DenseSource::open(smollm2_dir(), &Device::Cpu).unwrap();
    let dense = load_causal_lm(&dense_source).unwrap();
    let source = JitSource::open(smollm2_jd(), &Device::Cpu, JitOptions::default()).unwrap();
    let model = load_causal_lm(&source).unwrap();
    let mut pair = SelfSpec::new(model.as_ref(), source.mode().clone());
    let stop = model.info().eos_token_ids.clone();
    let mut total = SpecStats::default();
    for (prompt, name) in PROMPTS.iter().zip(CONTROLLERS) {
        let ids = chat_ids(&tok, prompt);
        let expected = greedy_generate(dense.as_ref(), &ids, TOKENS, &stop).unwrap();
        let opts = GenerateOptions {
            max_new: TOKENS,
            sampling: Sampling::Greedy,
            stop: stop.clone(),
            seed: 0,
        };
        let mut controller = Controller::new(name.parse().unwrap(), ControllerConfig::default());
        let mut streamed = Vec::new();
        let out = generate(&mut pair, &mut controller, &ids, &opts, |t| {
            streamed.push(t);
            Ok(())
        })
        .unwrap();
        assert_eq!(out.tokens, expected, "{prompt} ({name})");
        assert_eq!(streamed, expected);
        assert_eq!(out.stats.tokens, expected.len());
        let state = controller.state();
        assert_eq!(state.controller, name);
        assert_eq!(state.rounds as usize, out.stats.rounds, "{name}");
        total.add(&out.stats);
    }
    let s = total.summary(0.7);
    // The k = 12 draft agrees with Exact on ~93% of tokens: speculation must pay off.
    assert!(s.acceptance_rate > 0.6, "{s:?}");
    assert!(s.target_passes_per_token < 0.75, "{s:?}");
}

/// Without hidden-state features a draft pass returns the same proposal and signals but zero
/// RMS values, and a controller that never reads them decides the same: the same tokens and
/// the same rounds.
#[test]
fn hidden_features_off_changes_nothing_for_controllers_that_ignore_them() {
    use jitdelta_spec::SpecModel;
    let tok = tokenizer();
    let source = JitSource::open(smollm2_jd(), &Device::Cpu, JitOptions::default()).unwrap();
    let model = load_causal_lm(&source).unwrap();
    let ids = chat_ids(&tok, PROMPTS[6]);
    let greedy = Sampling::Greedy;
    let mut with = SelfSpec::new(model.as_ref(), source.mode().clone());
    let mut without =
        SelfSpec::new(model.as_ref(), source.mode().clone()).with_hidden_features(false);
    let (a, b) = (
        with.draft(&ids, &greedy).unwrap(),
        without.draft(&ids, &greedy).unwrap(),
    );
    assert_eq!(a.argmax, b.argmax);
    assert_eq!(a.signals.top1, b.signals.top1);
    assert!(a.signals.hidden_rms.iter().all(|&r| r > 0.0), "{a:?}");
    assert_eq!(b.signals.hidden_rms, [0.0; 2]);

    let run = |hidden: bool| {
        let mut pair =
            SelfSpec::new(model.as_ref(), source.mode().clone()).with_hidden_features(hidden);
        let kind = "ucb1".parse().unwrap();
        assert!(!jitdelta_spec::ControllerKind::uses_hidden_state(&kind));
        let mut controller = Controller::new(kind, ControllerConfig::default());
        let opts = GenerateOptions {
            max_new: TOKENS,
            sampling: Sampling::Greedy,
            stop: vec![],
            seed: 0,
        };
        let out = generate(&mut pair, &mut controller, &ids, &opts, |_| Ok(())).unwrap();
        (out.tokens, out.stats.rounds, out.stats.draft_passes)
    };
    assert_eq!(run(true), run(false));
    assert!("lin-ucb"
        .parse::<jitdelta_spec::ControllerKind>()
        .unwrap()
        .uses_hidden_state());
}
