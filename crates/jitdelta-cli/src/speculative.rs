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
    let config = ControllerConfig::default();
    let mut controller = Controller::new(kind, config);
    let mut pair = SelfSpec::new(model, mode);
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
    let summary = out.stats.summary(config.draft_cost);
    let report = serde_json::json!({
        "stats": summary,
        "controller": controller.state(),
    });
    Ok((out.tokens, report))
}
