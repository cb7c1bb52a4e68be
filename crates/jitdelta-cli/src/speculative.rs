//! `jitdelta generate --speculative`: the file's base drafts, the exact model verifies, a
//! controller decides how far to draft; per-request acceptance figures are reported.

use crate::generate::{GenerateArgs, Sampling};
use jitdelta_nn::{CausalLm, ModeHandle};
use jitdelta_spec::{
    generate, Controller, ControllerConfig, ControllerKind, GenerateOptions, SelfSpec,
};

/// Parses `--controller` (clap value parser).
pub fn parse_controller(s: &str) -> Result<ControllerKind, String> {
    s.parse().map_err(|e: jitdelta_spec::Error| e.to_string())
}

/// What a draft pass costs, in verify passes, for the controller's reward.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DraftCost {
    /// This ratio.
    Fixed(f64),
    /// Measured from the passes' wall times as the request runs.
    Measured,
}

/// Parses `--draft-cost` (clap value parser): `auto` or a non-negative number.
pub fn parse_draft_cost(s: &str) -> Result<DraftCost, String> {
    if s == "auto" {
        return Ok(DraftCost::Measured);
    }
    match s.parse::<f64>() {
        Ok(c) if c.is_finite() && c >= 0.0 => Ok(DraftCost::Fixed(c)),
        _ => Err(format!("{s}: expected auto or a non-negative number")),
    }
}

/// Generates with `kind` deciding the draft lengths; returns the new ids and the report (the
/// acceptance figures and the controller's state) for `--json` and stderr.
pub fn run(
    model: &dyn CausalLm,
    mode: ModeHandle,
    kind: ControllerKind,
    prompt: &[u32],
    args: &GenerateArgs,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(Vec<u32>, serde_json::Value), Box<dyn std::error::Error>> {
    let (sampling, seed) = match args.sampling {
        Sampling::Greedy => (jitdelta_spec::Sampling::Greedy, 0),
        Sampling::TopP {
            temperature,
            top_p,
            seed,
        } => (jitdelta_spec::Sampling::top_p(temperature, top_p)?, seed),
    };
    let config = match args.draft_cost {
        DraftCost::Fixed(draft_cost) => ControllerConfig {
            draft_cost,
            ..ControllerConfig::default()
        },
        DraftCost::Measured => ControllerConfig {
            measure_draft_cost: true,
            ..ControllerConfig::default()
        },
    };
    let config = ControllerConfig {
        auto_off: args.auto_off,
        max_draft: max_draft(model, config.max_draft),
        ..config
    };
    let mut pair = SelfSpec::new(model, mode).with_hidden_features(kind.uses_hidden_state());
    let mut controller = Controller::new(kind, config);
    let opts = GenerateOptions {
        max_new: args.max_tokens,
        sampling,
        stop: stop.to_vec(),
        seed,
    };
    // The callback's errors (a closed stdout) are not the loop's: keep the first one aside.
    let mut failed = None;
    let out = generate(&mut pair, &mut controller, prompt, &opts, |t| {
        if failed.is_none() {
            failed = on_token(t).err();
        }
        Ok(())
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    // The cost the reward ended with (measured, when asked).
    let summary = out.stats.summary(controller.config().draft_cost);
    let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let report = serde_json::json!({
        "stats": summary,
        "mean_draft_pass_ms": ms(out.pass_times.mean_draft()),
        "mean_verify_pass_ms": ms(out.pass_times.mean_verify()),
        "controller": controller.state(),
    });
    Ok((out.tokens, report))
}

/// The longest round the controller may draft on `model`'s device: on CUDA, one that its
/// verify pass (the drafts and one more position) multiplies in one fused launch per layer. A
/// ninth row doubles the launches: measured on an H100, `ucb1`'s verify passes (its `fixed:8`
/// arm, confidence rules up to 16) cost 6.9 ms against 5.5 ms for a one-token step. An explicit
/// `fixed:K` still drafts K.
fn max_draft(model: &dyn CausalLm, configured: usize) -> usize {
    if model.device().is_cuda() {
        configured.min(jitdelta_nn::GPU_FUSED_ROWS - 1)
    } else {
        configured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_cost_is_auto_or_a_non_negative_number() {
        assert_eq!(parse_draft_cost("auto"), Ok(DraftCost::Measured));
        assert_eq!(parse_draft_cost("0.45"), Ok(DraftCost::Fixed(0.45)));
        assert_eq!(parse_draft_cost("0"), Ok(DraftCost::Fixed(0.0)));
        for bad in ["-1", "NaN", "inf", "", "fast"] {
            assert!(parse_draft_cost(bad).is_err(), "{bad}");
        }
    }
}
