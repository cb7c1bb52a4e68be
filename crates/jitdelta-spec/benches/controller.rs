//! What the drafting controller adds to a decoding step, measured alone:
//!
//! - `round/<controller>`: one drafting round's decisions, i.e. picking the arm
//!   ([`Controller::begin_round`], with LinUCB's context), four stop checks and the update
//!   ([`Controller::end_round`]); a round spans several decoding steps, so this over-counts;
//! - `signals/49152`: turning one draft logits row of SmolLM2's vocabulary (49,152) into the
//!   signals the rules read (softmax, entropy, top-2, argmax), once per drafted token.
//!
//! Compare with a SmolLM2 step from `cargo bench -p jitdelta-nn --bench forward`
//! (docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p jitdelta-spec --bench controller
//! ```

use criterion::{criterion_group, criterion_main, Criterion};
use jitdelta_spec::{Controller, ControllerConfig, DraftRow, Sampling, Signals};
use std::hint::black_box;

fn round(c: &mut Criterion) {
    let mut signals = Vec::new();
    for i in 0..4 {
        let mut s = Signals::from_probs(&[0.9 - 0.1 * i as f32, 0.05, 0.05]);
        s.hidden_rms = [3.0 + i as f32, 9.0 - i as f32];
        signals.push(s);
    }
    let mut group = c.benchmark_group("round");
    for name in [
        "fixed:4",
        "max-conf",
        "ucb1",
        "ucb1-tuned",
        "ts",
        "ts-gauss",
        "lin-ucb",
    ] {
        let mut controller = Controller::new(name.parse().unwrap(), ControllerConfig::default());
        let mut pos = 100;
        group.bench_function(name, |b| {
            b.iter(|| {
                pos += 3;
                controller.begin_round(&signals[0], pos);
                let mut n = 1;
                while n < signals.len() && !controller.should_stop(&signals[..n]) {
                    n += 1;
                }
                black_box(controller.end_round(n, n - 1))
            })
        });
    }
    group.finish();
}

fn signals(c: &mut Criterion) {
    let vocab = 49_152;
    let logits: Vec<f32> = (0..vocab)
        .map(|i| ((i as u64 * 2_654_435_761) % 1000) as f32 / 100.0)
        .collect();
    c.bench_function("signals/49152", |b| {
        b.iter(|| {
            black_box(DraftRow::from_logits(
                black_box(&logits),
                &Sampling::Greedy,
                [1.0; 2],
            ))
        })
    });
}

criterion_group!(benches, round, signals);
criterion_main!(benches);
