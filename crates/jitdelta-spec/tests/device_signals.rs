//! The greedy draft's signals computed with tensor ops on the device
//! ([`DraftRow::from_device`], here on the CPU device) agree with the host path
//! ([`DraftRow::from_logits`], i.e. [`Signals::from_probs`] of the f64 softmax) on real SmolLM2
//! logits and on adversarial rows (ties, `-inf` entries, one-hot, all equal, extreme
//! magnitudes), and the argmax is identical.
//!
//! Tolerances (f32 reductions over up to 49,152 entries against the host's f64 softmax): top-1
//! and top-2 probabilities within 2e-6 + 2e-5 relative, entropy within 2e-5 + 1e-5 relative
//! (nats), margin within 1e-4 nats.

#[path = "../../jitdelta-nn/tests/common/mod.rs"]
mod common;

use candle_core::{Device, Tensor};
use common::*;
use jitdelta_nn::models::{greedy_generate, load_causal_lm};
use jitdelta_nn::{DenseSource, Logits};
use jitdelta_spec::{DraftRow, Sampling, Signals};

const PROB_ABS: f32 = 2e-6;
const PROB_REL: f32 = 2e-5;
const ENTROPY_ABS: f32 = 2e-5;
const ENTROPY_REL: f32 = 1e-5;
const MARGIN_ABS: f32 = 1e-4;

/// Checks one row; returns the absolute deviations (top-1/top-2 probability, entropy, margin).
fn check(logits: &[f32], what: &str) -> [f32; 3] {
    let host = DraftRow::from_logits(logits, &Sampling::Greedy, [0.0; 2]);
    let t = Tensor::from_slice(logits, logits.len(), &Device::Cpu).unwrap();
    let dev = DraftRow::from_device(&t, &Sampling::Greedy, None).unwrap();
    assert_eq!(dev.argmax, host.argmax, "{what}: argmax");
    assert!(
        dev.probs.is_none(),
        "{what}: greedy rows carry no distribution"
    );
    let (h, d) = (host.signals, dev.signals);
    let prob_ok = |a: f32, b: f32| (a - b).abs() <= PROB_ABS + PROB_REL * a;
    let ok = prob_ok(h.top1, d.top1)
        && prob_ok(h.top2, d.top2)
        && (h.entropy - d.entropy).abs() <= ENTROPY_ABS + ENTROPY_REL * h.entropy
        && (h.margin - d.margin).abs() <= MARGIN_ABS;
    assert!(ok, "{what}: host {h:?} device {d:?}");
    [
        (h.top1 - d.top1).abs().max((h.top2 - d.top2).abs()),
        (h.entropy - d.entropy).abs(),
        (h.margin - d.margin).abs(),
    ]
}

/// Element-wise maximum of the deviations of `rows`, printed under `what`.
fn report(what: &str, deviations: impl Iterator<Item = [f32; 3]>) {
    let (mut worst, mut rows) = ([0f32; 3], 0);
    for d in deviations {
        worst.iter_mut().zip(d).for_each(|(w, x)| *w = w.max(x));
        rows += 1;
    }
    eprintln!(
        "{what}: {rows} rows; largest deviation: top-1/top-2 {:.2e}, entropy {:.2e}, margin {:.2e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn adversarial_rows_agree() {
    let inf = f32::INFINITY;
    let spread: Vec<f32> = (0..49_152)
        .map(|i| ((i as u64 * 2_654_435_761) % 4001) as f32 / 100.0 - 20.0)
        .collect();
    let mut one_big = vec![-5.0f32; 49_152];
    one_big[31_337] = 25.0;
    let mut late_tie = vec![-1.0f32; 49_152];
    late_tie[40_000] = 3.0;
    late_tie[7] = 3.0;
    let cases: Vec<(&str, Vec<f32>)> = vec![
        ("tie", vec![1.0, 3.0, 3.0, 0.0]),
        ("tie of three", vec![2.0, 2.0, -1.0, 2.0]),
        ("late tie", late_tie),
        ("-inf entries", vec![-inf, 2.0, -inf, 1.0, -inf]),
        ("all -inf but one", vec![-inf, -inf, 5.0, -inf]),
        ("one-hot by magnitude", vec![0.0, 0.0, 200.0, 0.0]),
        ("one-hot but barely", vec![0.0, 0.0, 29.5, 0.0]),
        ("all equal", vec![0.5; 1000]),
        ("all equal, full vocabulary", vec![-7.25; 49_152]),
        ("single entry", vec![7.0]),
        ("two entries", vec![1.0, 1.0 + 1e-6]),
        ("large negative", vec![-1000.0, -1001.0, -1002.5]),
        ("extreme magnitudes", vec![-3e38, 3e38, 0.0]),
        ("second is -inf", vec![4.0, -inf]),
        ("spread over the vocabulary", spread),
        ("one large logit in a flat row", one_big),
    ];
    report("adversarial", cases.iter().map(|(what, l)| check(l, what)));
    // The documented values, not just agreement.
    let t = |v: &[f32]| {
        let t = Tensor::from_slice(v, v.len(), &Device::Cpu).unwrap();
        DraftRow::from_device(&t, &Sampling::Greedy, None).unwrap()
    };
    let tie = t(&[1.0, 3.0, 3.0, 0.0]);
    assert_eq!((tie.argmax, tie.signals.margin), (1, 0.0));
    assert_eq!(tie.signals.top1, tie.signals.top2);
    let hot = t(&[-inf, -inf, 5.0, -inf]);
    assert_eq!(hot.argmax, 2);
    assert_eq!(
        (hot.signals.top1, hot.signals.top2, hot.signals.entropy),
        (1.0, 0.0, 0.0)
    );
    assert_eq!(hot.signals.margin, 30.0);
    let flat = t(&[0.5; 1000]);
    assert_eq!(flat.argmax, 0);
    assert!((flat.signals.entropy - 1000f32.ln()).abs() < 1e-4);
    // An empty row is an error, not a panic.
    let empty = Tensor::from_slice(&[0f32; 0], 0, &Device::Cpu).unwrap();
    assert!(DraftRow::from_device(&empty, &Sampling::Greedy, None).is_err());
}

#[test]
fn hidden_rms_and_sampling_come_back_in_the_same_copy() {
    let logits = [0.3f32, -1.0, 2.0, 2.5, -0.5];
    let t = Tensor::from_slice(&logits, (1, 5), &Device::Cpu).unwrap();
    let rms = || {
        Some([
            Tensor::new(3.5f32, &Device::Cpu).unwrap(),
            Tensor::new(9.25f32, &Device::Cpu).unwrap(),
        ])
    };
    let greedy = DraftRow::from_device(&t, &Sampling::Greedy, rms()).unwrap();
    assert_eq!(greedy.signals.hidden_rms, [3.5, 9.25]);
    assert_eq!(greedy.argmax, 3);
    // Sampling: the host path on the copied row, bit for bit.
    let s = Sampling::top_p(0.8, 0.9).unwrap();
    let dev = DraftRow::from_device(&t, &s, rms()).unwrap();
    let host = DraftRow::from_logits(&logits, &s, [3.5, 9.25]);
    assert_eq!(dev.probs, host.probs);
    assert!(dev.probs.is_some());
    assert_eq!(dev.signals, host.signals);
    assert_eq!(dev.argmax, host.argmax);
    let q = dev.probs.unwrap();
    assert_eq!(dev.signals, {
        let mut s = Signals::from_probs(&q);
        s.hidden_rms = [3.5, 9.25];
        s
    });
    // A hidden RMS that is not one value is refused.
    let bad = Some([
        Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    ]);
    assert!(DraftRow::from_device(&t, &Sampling::Greedy, bad).is_err());
}

#[test]
fn smollm2_rows_agree() {
    let tok = tokenizer();
    let source = DenseSource::open(smollm2_dir(), &Device::Cpu).unwrap();
    let model = load_causal_lm(&source).unwrap();
    let stop = model.info().eos_token_ids.clone();
    let mut rows = Vec::new();
    for prompt in [
        "What is 17 times 3?",
        "Write a short story about a robot who learns to paint.",
        "List the days of the week.",
    ] {
        let mut ids = chat_ids(&tok, prompt);
        ids.extend(greedy_generate(model.as_ref(), &ids, 32, &stop).unwrap());
        let mut cache = model.new_cache();
        let all = model
            .forward_ids(&ids, 0, &mut cache, Logits::All)
            .unwrap()
            .squeeze(0)
            .unwrap();
        rows.extend(
            all.to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|l| (prompt, l)),
        );
    }
    report(
        "SmolLM2",
        rows.iter()
            .enumerate()
            .map(|(i, (prompt, l))| check(l, &format!("{prompt}, row {i}"))),
    );
    assert!(rows.len() > 100);
}
