//! `jitdelta generate`: text generation from a model folder holding a `.jd` file or the original
//! safetensors, streaming tokens to stdout.

use candle_core::{Device, Tensor};
use jitdelta_nn::chat::{eos_token_ids, ChatTemplate, Message, ModelFiles, Tokenizer};
use jitdelta_nn::models::load_causal_lm;
use jitdelta_nn::CausalLm;
use jitdelta_nn::{DenseSource, JitOptions, JitSource, LayerSource, Logits, Mode};
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How the next token is picked.
pub enum Sampling {
    /// Argmax.
    Greedy,
    /// Softmax at `temperature`, restricted to the smallest set of tokens whose probability
    /// reaches `top_p`.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Nucleus mass in (0, 1].
        top_p: f64,
        /// RNG seed.
        seed: u64,
    },
}

/// What the user asked for.
pub struct GenerateArgs {
    /// A model folder (with a `.jd` file or the original safetensors) or a `.jd` file.
    pub model: PathBuf,
    /// The user message (rendered with the model's chat template when it has one).
    pub prompt: String,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Run the draft (base only) instead of the exact model.
    pub draft: bool,
    /// How tokens are picked.
    pub sampling: Sampling,
    /// Print one JSON object at the end instead of streaming text.
    pub json: bool,
    /// Self-speculative decoding with this drafting controller.
    pub speculative: Option<jitdelta_spec::ControllerKind>,
    /// The draft cost the controller's reward uses.
    pub draft_cost: crate::speculative::DraftCost,
    /// Let the controller stop drafting while it loses (`ControllerConfig::auto_off`).
    pub auto_off: bool,
    /// The device the model runs on.
    pub device: Device,
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn open_device(name: &str) -> Result<Device, Box<dyn std::error::Error>> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match name.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(format!("--device {name}: expected cpu, cuda or cuda:N").into()),
        },
    };
    jitdelta_nn::cuda_device(ordinal).map_err(|e| format!("--device {name}: {e}").into())
}

/// The `.jd` file a model argument names: the path itself, or the single `.jd` in a folder.
fn find_jd(model: &Path) -> Result<Option<PathBuf>, String> {
    if model.is_file() {
        return Ok((model.extension().is_some_and(|e| e == "jd")).then(|| model.to_path_buf()));
    }
    let entries = std::fs::read_dir(model).map_err(|e| format!("{}: {e}", model.display()))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jd"))
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(format!(
            "{} holds several .jd files; name one of them",
            model.display()
        )),
    }
}

/// Loads the model and generates.
pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let device = args.device.clone();
    let jd_path = find_jd(&args.model)?;
    let folder = if args.model.is_file() {
        args.model.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        args.model.clone()
    };
    if args.speculative.is_some() && args.draft {
        return Err(
            "--speculative drafts with the base and verifies exactly: drop --mode draft".into(),
        );
    }
    let mut mode = None; // the JIT layers' mode handle, for --speculative
    let (source, jit): (Box<dyn LayerSource>, bool) = match &jd_path {
        Some(path) => {
            let source = JitSource::open(path, &device, JitOptions::default())?;
            mode = Some(source.mode().clone());
            if args.draft {
                source.set_mode(Mode::Draft);
            }
            (Box::new(source), true)
        }
        None if args.draft || args.speculative.is_some() => {
            return Err(
                "--mode draft and --speculative need a .jd file (the draft is its base)".into(),
            );
        }
        None => (Box::new(DenseSource::open(&folder, &device)?), false),
    };
    // Tokenizer files: beside the weights when present, else inside the .jd file.
    let files = match &jd_path {
        Some(path) if !folder.join("tokenizer.json").is_file() => {
            ModelFiles::Jd(jitdelta_format::JdFile::open(path)?)
        }
        _ => ModelFiles::Dir(folder.clone()),
    };
    let tokenizer = Tokenizer::load(&files)?;
    let template = ChatTemplate::load(&files)?;
    let prompt = if template.is_plain() {
        args.prompt.clone()
    } else {
        template.apply(&[Message::user(args.prompt.as_str())], true)?
    };
    let mut stop = eos_token_ids(&files, &tokenizer)?;
    let model = load_causal_lm(source.as_ref())?;
    stop.extend(model.info().eos_token_ids.iter().copied());
    let prompt_ids = tokenizer.encode(&prompt, template.is_plain())?;
    if prompt_ids.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }

    let mut stream = tokenizer.stream(true);
    let mut stdout = std::io::stdout().lock();
    let start = std::time::Instant::now();
    // When the first and the latest token came: the decode rate leaves out the prefill and
    // first-use costs (kernel compilation), which `tokens_per_second` includes.
    let mut token_times: Option<(std::time::Instant, std::time::Instant)> = None;
    let on_token = |id| -> Result<(), Box<dyn std::error::Error>> {
        let now = std::time::Instant::now();
        token_times = Some(token_times.map_or((now, now), |(first, _)| (first, now)));
        if !args.json {
            if let Some(text) = stream.next_token(id)? {
                stdout.write_all(text.as_bytes())?;
                stdout.flush()?;
            }
        }
        Ok(())
    };
    let (ids, speculative) = match (args.speculative, mode) {
        (Some(kind), Some(mode)) => {
            let (ids, report) = crate::speculative::run(
                model.as_ref(),
                mode,
                kind,
                &prompt_ids,
                &args,
                &stop,
                on_token,
            )?;
            (ids, Some(report))
        }
        _ => (
            decode_loop(model.as_ref(), &prompt_ids, &args, &stop, on_token)?,
            None,
        ),
    };
    let secs = start.elapsed().as_secs_f64();
    let (first_token_ms, decode_rate) = match token_times {
        Some((first, last)) if ids.len() > 1 => (
            (first - start).as_secs_f64() * 1e3,
            Some((ids.len() - 1) as f64 / (last - first).as_secs_f64()),
        ),
        Some((first, _)) => ((first - start).as_secs_f64() * 1e3, None),
        None => (0.0, None),
    };
    if args.json {
        let text = tokenizer.decode(&ids, true)?;
        let report = serde_json::json!({
            "text": text,
            "token_ids": ids,
            "prompt_tokens": prompt_ids.len(),
            "tokens_per_second": ids.len() as f64 / secs,
            "first_token_ms": first_token_ms,
            "decode_tokens_per_second": decode_rate,
            "mode": if args.draft { "draft" } else { "exact" },
            "source": if jit { "jitdelta" } else { "dense" },
            "resident_weight_bytes": source.weight_bytes(),
            "speculative": speculative,
        });
        println!("{report}");
    } else {
        if let Some(rest) = stream.finish()? {
            stdout.write_all(rest.as_bytes())?;
        }
        writeln!(stdout)?;
        let decode = decode_rate.map_or(String::new(), |r| {
            format!("; first token at {first_token_ms:.0} ms, then {r:.2} tokens/s")
        });
        eprintln!(
            "{} tokens in {secs:.2} s ({:.2} tokens/s{decode}), {} weight bytes resident",
            ids.len(),
            ids.len() as f64 / secs,
            source.weight_bytes()
        );
        if let Some(r) = speculative {
            let s = &r["stats"];
            eprintln!(
                "speculative ({}): acceptance rate {:.3}, mean accepted length {:.2}, \
                 {:.3} target passes per token",
                r["controller"]["controller"].as_str().unwrap_or(""),
                s["acceptance_rate"].as_f64().unwrap_or(0.0),
                s["mean_accepted_length"].as_f64().unwrap_or(0.0),
                s["target_passes_per_token"].as_f64().unwrap_or(0.0),
            );
            let c = &r["controller"];
            if c["config"]["auto_off"].as_bool() == Some(true) {
                eprintln!(
                    "auto-off: drafting paused {} times, {} plain steps",
                    c["auto_off_pauses"].as_u64().unwrap_or(0),
                    c["plain_steps"].as_u64().unwrap_or(0),
                );
            }
        }
    }
    Ok(())
}

/// Prefill, then one token at a time until `max_tokens` or a stop token; returns the new ids.
fn decode_loop(
    model: &dyn CausalLm,
    prompt: &[u32],
    args: &GenerateArgs,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<(), Box<dyn std::error::Error>>,
) -> Result<Vec<u32>, Box<dyn std::error::Error>> {
    let mut rng = match args.sampling {
        Sampling::TopP { seed, .. } => rand::rngs::StdRng::seed_from_u64(seed),
        Sampling::Greedy => rand::rngs::StdRng::seed_from_u64(0),
    };
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < args.max_tokens {
        let logits = model.forward_ids(&input, cache.len(), &mut cache, Logits::Last)?;
        let next = pick(&logits.squeeze(0)?, &args.sampling, &mut rng)?;
        out.push(next);
        on_token(next)?;
        if stop.contains(&next) {
            break;
        }
        input = vec![next];
    }
    Ok(out)
}

/// Picks the next token from one row of logits: argmax, or a draw from the same top-p
/// distribution speculative decoding verifies against (`jitdelta_spec::Sampling::probs`).
fn pick(
    logits: &Tensor,
    sampling: &Sampling,
    rng: &mut impl Rng,
) -> Result<u32, Box<dyn std::error::Error>> {
    let Sampling::TopP {
        temperature, top_p, ..
    } = *sampling
    else {
        return Ok(logits.argmax(0)?.to_scalar::<u32>()?);
    };
    let rule = jitdelta_spec::Sampling::top_p(temperature, top_p)?;
    Ok(jitdelta_spec::sample(&rule.probs(&logits.to_vec1()?), rng))
}
