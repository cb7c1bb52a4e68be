//! Sampling verification keeps the exact model's distribution: chi-square tests of the first
//! two generated tokens over many seeds, on a tiny synthetic Llama whose draft (no mantissa
//! bits at all) is far from exact, so that a wrong rule shows up. The same test applied to
//! samples drawn from the draft alone must fail: the test has the power to catch a bad rule.

#[path = "../../jitdelta-nn/tests/common/mod.rs"]
mod common;

use candle_core::Device;
use common::Tiny;
use jitdelta_nn::models::load_causal_lm;
use jitdelta_nn::{CausalLm, JitOptions, JitSource, Logits, Mode, WeightLayout};
use jitdelta_spec::{
    generate, sample, Controller, ControllerConfig, GenerateOptions, Sampling, SelfSpec,
};
use rand::SeedableRng;

const CONTEXT: [u32; 4] = [1, 17, 40, 9];
const SAMPLES: usize = 1500;

/// The chi-square statistic of `counts` against `probs` (cells expected below 5 pooled) and
/// its critical value at significance 0.001 (Wilson-Hilferty).
fn chi_square(counts: &[usize], probs: &[f64]) -> (f64, f64) {
    let n: usize = counts.iter().sum();
    let (mut stat, mut cells) = (0.0, 0);
    let (mut pool_obs, mut pool_exp) = (0.0, 0.0);
    for (&c, &p) in counts.iter().zip(probs) {
        let e = p * n as f64;
        if e >= 5.0 {
            stat += (c as f64 - e).powi(2) / e;
            cells += 1;
        } else {
            pool_obs += c as f64;
            pool_exp += e;
        }
    }
    if pool_exp > 0.0 {
        stat += (pool_obs - pool_exp).powi(2) / pool_exp.max(1e-9);
        cells += 1;
    }
    let df = (cells - 1) as f64;
    let z = 3.09; // upper 0.001 quantile of the standard normal
    let crit = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (stat, crit)
}

fn dist(model: &dyn CausalLm, ids: &[u32], sampling: &Sampling) -> Vec<f32> {
    let mut cache = model.new_cache();
    let logits = model
        .forward_ids(ids, 0, &mut cache, Logits::Last)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    sampling.probs(&logits)
}

#[test]
fn speculative_sampling_matches_exact_sampling() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny");
    let t = Tiny::LLAMA;
    t.write(&folder, &t.tensors(11), &t.config());
    let jd = common::compress(&folder);
    let options = JitOptions {
        layout: WeightLayout::Resident { draft_bits: 0 },
        ..JitOptions::default()
    };
    let source = JitSource::open(&jd, &Device::Cpu, options).unwrap();
    let model = load_causal_lm(&source).unwrap();
    let sampling = Sampling::top_p(0.9, 0.95).unwrap();

    // The exact distributions: of the first token, and of the second (summed over the first).
    let p1 = dist(model.as_ref(), &CONTEXT, &sampling);
    let mut p2 = vec![0f64; p1.len()];
    for (t1, &w) in p1.iter().enumerate() {
        if w > 0.0 {
            let mut ids = CONTEXT.to_vec();
            ids.push(t1 as u32);
            for (x, &p) in p2.iter_mut().zip(&dist(model.as_ref(), &ids, &sampling)) {
                *x += w as f64 * p as f64;
            }
        }
    }
    let p1: Vec<f64> = p1.iter().map(|&x| x as f64).collect();

    // Speculative samples: fixed:2 drafts two tokens in the first round, so the first token
    // goes through the first acceptance test and the second through the second (or through
    // a resample and the next round).
    let mut pair = SelfSpec::new(model.as_ref(), source.mode().clone());
    let mut controller = Controller::new("fixed:2".parse().unwrap(), ControllerConfig::default());
    let (mut c1, mut c2) = (vec![0usize; p1.len()], vec![0usize; p1.len()]);
    let mut accepted = 0;
    for seed in 0..SAMPLES as u64 {
        let opts = GenerateOptions {
            max_new: 3,
            sampling,
            stop: vec![],
            seed,
        };
        let out = generate(&mut pair, &mut controller, &CONTEXT, &opts, |_| Ok(())).unwrap();
        c1[out.tokens[0] as usize] += 1;
        c2[out.tokens[1] as usize] += 1;
        accepted += out.stats.accepted;
    }
    let (s1, k1) = chi_square(&c1, &p1);
    let (s2, k2) = chi_square(&c2, &p2);
    eprintln!(
        "chi2 {s1:.1} (critical {k1:.1}), {s2:.1} (critical {k2:.1}); {accepted} drafts kept"
    );
    assert!(s1 < k1, "first token: chi2 {s1:.1} >= {k1:.1}");
    assert!(s2 < k2, "second token: chi2 {s2:.1} >= {k2:.1}");
    // Both branches of the rule ran: some drafts kept, some rejected.
    assert!(accepted > 0 && accepted < 2 * SAMPLES, "{accepted}");

    // Power: the draft's own samples fail the same test.
    source.set_mode(Mode::Draft);
    let q1 = dist(model.as_ref(), &CONTEXT, &sampling);
    source.set_mode(Mode::Exact);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut cq = vec![0usize; q1.len()];
    for _ in 0..SAMPLES {
        cq[sample(&q1, &mut rng) as usize] += 1;
    }
    let (sq, kq) = chi_square(&cq, &p1);
    eprintln!("draft: chi2 {sq:.1} (critical {kq:.1})");
    assert!(
        sq > kq,
        "draft samples pass as exact (chi2 {sq:.1} < {kq:.1}): no power"
    );
}
