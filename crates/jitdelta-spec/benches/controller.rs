//! What the drafting controller adds to a decoding step, measured alone:
//!
//! - `round/<controller>`: one drafting round's decisions, i.e. picking the arm
//!   ([`Controller::begin_round`], with LinUCB's context), four stop checks and the update
//!   ([`Controller::end_round`]); a round spans several decoding steps, so this over-counts;
//! - `signals/*/49152`: turning one draft logits row of SmolLM2's vocabulary (49,152) into the
//!   signals the rules read (softmax, entropy, top-2, argmax), once per drafted token:
//!   `host` on a host vector (f64, [`DraftRow::from_logits`]); `copy+host` the same after
//!   reading the row and two hidden-state RMS values back from a tensor (what a draft pass
//!   did before the reductions moved to the device); `device-cpu` the greedy path of
//!   [`DraftRow::from_device`] (f32 tensor ops, one copy of seven values) on the CPU device,
//!   where the tensor ops are host work too (on a GPU they run on the device).
//!
//! Compare with a SmolLM2 step from `cargo bench -p jitdelta-nn --bench forward`
//! (docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p jitdelta-spec --bench controller
//! ```

use candle_core::{Device, Tensor};
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
    let dev = Device::Cpu;
    let row = Tensor::from_slice(&logits, (1, vocab), &dev).unwrap();
    let rms = [
        Tensor::new(3.0f32, &dev).unwrap(),
        Tensor::new(9.0f32, &dev).unwrap(),
    ];
    let mut group = c.benchmark_group("signals");
    group.bench_function("host/49152", |b| {
        b.iter(|| {
            black_box(DraftRow::from_logits(
                black_box(&logits),
                &Sampling::Greedy,
                [1.0; 2],
            ))
        })
    });
    // What `SelfSpec::draft` did per drafted token before the reductions moved to the device:
    // copy the row and the two RMS values back, then the host path.
    group.bench_function("copy+host/49152", |b| {
        b.iter(|| {
            let l: Vec<f32> = black_box(&row).squeeze(0).unwrap().to_vec1().unwrap();
            let h = rms.clone().map(|t| t.to_scalar::<f32>().unwrap());
            black_box(DraftRow::from_logits(&l, &Sampling::Greedy, h))
        })
    });
    // What it does now (greedy): reductions as tensor ops, one copy of 7 values.
    group.bench_function("device-cpu/49152", |b| {
        b.iter(|| {
            black_box(
                DraftRow::from_device(black_box(&row), &Sampling::Greedy, Some(rms.clone()))
                    .unwrap(),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, round, signals);
criterion_main!(benches);
