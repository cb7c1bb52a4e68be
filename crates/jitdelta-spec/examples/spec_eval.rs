//! Drafting controllers on SmolLM2-135M-Instruct: acceptance rate, mean accepted length and
//! target / draft passes per token of every fixed stopping rule and every bandit, per prompt
//! set (chat, code, arithmetic, repetitive text, long generations, and all of them mixed).
//!
//! ```text
//! cargo run --release -p jitdelta-spec --example spec_eval -- [MODEL_DIR] [MODEL.jd]
//!     [--tokens 96] [--long-tokens 256] [--prompts 6] [--draft-cost 0.7] [--seeds 5]
//!     [--validate 2] [--prompt-set main|held-out] [--auto-off]
//! ```
//!
//! Greedy decoding makes every configuration's run a deterministic function of the exact
//! model's greedy output and of the draft's outputs along it, so each prompt is run once
//! for real and then replayed: the exact model generates greedily (the output every
//! configuration must reproduce), the draft scores that sequence teacher-forced in one pass,
//! and drafts that leave the sequence (after a token the target rejects) are computed on
//! demand and remembered. The replay runs the crate's own loop and controllers through
//! [`SpecModel`]; only the forward passes are looked up. `--validate N` runs the first N
//! prompts of each set through the real loop ([`SelfSpec`], Draft and Exact JIT passes) with
//! three controllers and checks that the counters match the replay exactly.
//!
//! Bandits learn online over the prompts of a set in order, starting cold for each set; the
//! randomized ones are averaged over `--seeds` seeds. Costs are in target passes, a draft pass
//! counting `--draft-cost` of one (the cost model of docs/speculative.md).

use candle_core::{Device, Tensor};
use jitdelta_format::{compress_model, EncodeOptions};
use jitdelta_nn::chat::{eos_token_ids, ChatTemplate, Message, ModelFiles, Tokenizer};
use jitdelta_nn::models::{greedy_generate, load_causal_lm};
use jitdelta_nn::{CausalLm, JitOptions, JitSource, KvCache, Logits, Mode};
use jitdelta_spec::{
    generate, Controller, ControllerConfig, DraftRow, GenerateOptions, Sampling, SelfSpec,
    SpecModel, SpecStats, StopRule, TargetRow,
};
use std::collections::HashMap;
use std::path::PathBuf;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const SETS: &[(&str, &[&str])] = &[
    (
        "chat",
        &[
            "Hi! How are you today?",
            "What is the capital of Japan, and what is it famous for?",
            "Give me three tips for sleeping better.",
            "What should I cook for dinner tonight?",
            "Tell me a fun fact about octopuses.",
            "How do I make friends in a new city?",
        ],
    ),
    (
        "code",
        &[
            "Write a Python function that checks whether a number is prime.",
            "Write a JavaScript function that reverses a string.",
            "Write a SQL query that counts the users per country.",
            "Write a Rust function that returns the largest element of a slice.",
            "Write a bash script that prints the numbers from 1 to 10.",
            "Write a Python class for a stack with push and pop methods.",
        ],
    ),
    (
        "arithmetic",
        &[
            "What is 23 + 58?",
            "What is 12 times 11? Show your steps.",
            "If a train travels 60 km per hour for 3 hours, how far does it go?",
            "What is 144 divided by 12?",
            "Compute 15% of 80.",
            "What is 7 squared minus 9?",
        ],
    ),
    (
        "repetitive",
        &[
            "Repeat the word 'hello' ten times.",
            "Count from 1 to 30.",
            "List the days of the week, then list them again.",
            "Write the alphabet in capital letters, separated by commas.",
            "Say 'I love coding' five times.",
            "List the months of the year.",
        ],
    ),
    (
        "long",
        &[
            "Write a detailed essay about the history of the internet.",
            "Write a long story about a dragon who learns to read.",
            "Explain in detail how a car engine works.",
            "Describe a week-long trip to Italy, day by day.",
        ],
    ),
];

/// A second collection of the same five kinds, written after the first and used for no
/// choice: a design picked by looking at [`SETS`] is checked here (`--prompt-set held-out`).
const HELD_OUT_SETS: &[(&str, &[&str])] = &[
    (
        "chat",
        &[
            "Good morning! Any plans for the weekend?",
            "What is the tallest mountain in Africa?",
            "How can I stay focused while working from home?",
            "Recommend a board game for four friends.",
            "Why do cats purr?",
            "What is a good way to start learning the guitar?",
        ],
    ),
    (
        "code",
        &[
            "Write a Python function that counts the vowels in a string.",
            "Write a C function that swaps two integers through pointers.",
            "Write a SQL query that finds the five most recent orders.",
            "Write a Go function that sums a slice of integers.",
            "Write a JavaScript function that removes duplicates from an array.",
            "Write a Python function that reads a file and returns its line count.",
        ],
    ),
    (
        "arithmetic",
        &[
            "What is 45 + 37?",
            "What is 9 times 14? Show your steps.",
            "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
            "What is 250 divided by 5?",
            "What is 20% of 150?",
            "What is 6 cubed?",
        ],
    ),
    (
        "repetitive",
        &[
            "Write the word 'yes' eight times.",
            "Count down from 20 to 1.",
            "List the planets of the solar system, then list them again.",
            "Write the even numbers from 2 to 40.",
            "Say 'good night' six times.",
            "List the colors of the rainbow twice.",
        ],
    ),
    (
        "long",
        &[
            "Write a detailed essay about the history of aviation.",
            "Write a long story about a lighthouse keeper and a storm.",
            "Explain in detail how the human heart works.",
            "Describe a week-long trip to Japan, day by day.",
        ],
    ),
];

/// The controllers measured: fixed rules first (the bandits' arms and a few more K), then the
/// bandits.
const FIXED: &[&str] = &[
    "fixed:1",
    "fixed:2",
    "fixed:3",
    "fixed:4",
    "fixed:6",
    "fixed:8",
    "max-conf",
    "entropy",
    "margin",
    "entropy-bound",
];
const BANDITS: &[&str] = &["ucb1", "ucb1-tuned", "ts", "ts-gauss", "lin-ucb"];

struct Args {
    model_dir: PathBuf,
    jd: Option<PathBuf>,
    tokens: usize,
    long_tokens: usize,
    prompts: usize,
    draft_cost: f64,
    seeds: u64,
    validate: usize,
    sets: &'static [(&'static str, &'static [&'static str])],
    /// Every controller with `ControllerConfig::auto_off`.
    auto_off: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        model_dir: PathBuf::from("testdata-cache/smollm2-bf16"),
        jd: None,
        tokens: 96,
        long_tokens: 256,
        prompts: 6,
        draft_cost: 0.7,
        seeds: 5,
        validate: 0,
        sets: SETS,
        auto_off: false,
    };
    let mut positional = 0;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--tokens" => a.tokens = value()?.parse()?,
            "--long-tokens" => a.long_tokens = value()?.parse()?,
            "--prompts" => a.prompts = value()?.parse()?,
            "--draft-cost" => a.draft_cost = value()?.parse()?,
            "--seeds" => a.seeds = value()?.parse::<u64>()?.max(1),
            "--validate" => a.validate = value()?.parse()?,
            "--auto-off" => a.auto_off = true,
            "--prompt-set" => {
                a.sets = match value()?.as_str() {
                    "main" => SETS,
                    "held-out" => HELD_OUT_SETS,
                    other => return Err(format!("--prompt-set main|held-out, not {other}").into()),
                }
            }
            _ if positional == 0 => {
                a.model_dir = arg.into();
                positional += 1;
            }
            _ if positional == 1 => {
                a.jd = Some(arg.into());
                positional += 1;
            }
            _ => return Err(format!("unexpected argument {arg}").into()),
        }
    }
    Ok(a)
}

/// One prompt run for real once: the exact greedy output and the draft along it.
struct Trace {
    prompt_len: usize,
    /// Prompt and exact greedy output.
    full: Vec<u32>,
    /// The draft's row after each prefix of `full` of length `prompt_len..=full.len()`.
    teacher: Vec<DraftRow>,
    /// The draft's KV cache over `full`.
    cache: KvCache,
    /// Draft rows after prefixes that leave `full`, keyed by the prefix.
    off: HashMap<Vec<u32>, DraftRow>,
}

/// Per-position hidden RMS after the middle and the last layer, `(seq,)` each.
fn hidden_rms(hidden: &[Tensor]) -> candle_core::Result<[Tensor; 2]> {
    let n = hidden.len();
    let rows = |h: &Tensor| h.sqr()?.mean_keepdim(2)?.sqrt()?.flatten_all();
    Ok([rows(&hidden[(n - 1) / 2])?, rows(&hidden[n - 1])?])
}

/// The draft row for logits `row` at position `p` of a pass whose hidden RMS values are
/// `rms`, computed as `SelfSpec` computes it (on the device, greedy).
fn draft_row(row: &Tensor, rms: &[Tensor; 2], p: usize) -> jitdelta_spec::Result<DraftRow> {
    let rms = [rms[0].get(p)?, rms[1].get(p)?];
    DraftRow::from_device(row, &Sampling::Greedy, Some(rms))
}

impl Trace {
    fn record(
        model: &dyn CausalLm,
        source: &JitSource,
        prompt: &[u32],
        max_new: usize,
        stop: &[u32],
    ) -> Result<Self> {
        source.set_mode(Mode::Exact);
        let mut full = prompt.to_vec();
        full.extend(greedy_generate(model, prompt, max_new, stop)?);
        source.set_mode(Mode::Draft);
        let mut cache = model.new_cache();
        let ids = Tensor::from_slice(&full, (1, full.len()), model.device())?;
        let out = model.forward_with_hidden(&ids, 0, &mut cache, Logits::All)?;
        source.set_mode(Mode::Exact);
        let (logits, rms) = (out.logits.squeeze(0)?, hidden_rms(&out.hidden)?);
        let teacher = (prompt.len() - 1..full.len())
            .map(|p| draft_row(&logits.get(p)?, &rms, p))
            .collect::<jitdelta_spec::Result<_>>()?;
        Ok(Self {
            prompt_len: prompt.len(),
            full,
            teacher,
            cache,
            off: HashMap::new(),
        })
    }

    /// Length of the common prefix of `ctx` and the traced sequence.
    fn on_track(&self, ctx: &[u32]) -> usize {
        ctx.iter()
            .zip(&self.full)
            .take_while(|(a, b)| a == b)
            .count()
    }
}

/// A [`SpecModel`] that looks the passes up in a [`Trace`] (greedy only).
struct Replay<'a> {
    trace: &'a mut Trace,
    model: &'a dyn CausalLm,
    source: &'a JitSource,
    draft: Vec<u32>,
    target: Vec<u32>,
}

impl SpecModel for Replay<'_> {
    fn draft(&mut self, tokens: &[u32], _: &Sampling) -> jitdelta_spec::Result<DraftRow> {
        self.draft.extend_from_slice(tokens);
        let (m, t) = (self.draft.len(), &mut *self.trace);
        let i = t.on_track(&self.draft);
        if i == m {
            return t.teacher.get(m - t.prompt_len).cloned().ok_or_else(|| {
                jitdelta_spec::Error::InvalidInput(format!("draft at {m}: past the trace"))
            });
        }
        if let Some(row) = t.off.get(&self.draft) {
            return Ok(row.clone());
        }
        // A draft that left the traced sequence at `i`: run the draft from there.
        let mut cache = t.cache.try_clone()?;
        cache.truncate(i)?;
        let ids = Tensor::from_slice(&self.draft[i..], (1, m - i), self.model.device())?;
        self.source.set_mode(Mode::Draft);
        let out = self
            .model
            .forward_with_hidden(&ids, i, &mut cache, Logits::Last);
        self.source.set_mode(Mode::Exact);
        let out = out?;
        let row = draft_row(&out.logits, &hidden_rms(&out.hidden)?, m - i - 1)?;
        t.off.insert(self.draft.clone(), row.clone());
        Ok(row)
    }

    fn verify(
        &mut self,
        tokens: &[u32],
        rows: usize,
        _: &Sampling,
    ) -> jitdelta_spec::Result<Vec<TargetRow>> {
        self.target.extend_from_slice(tokens);
        let on = self.trace.on_track(&self.target);
        let n = self.target.len();
        (n - rows + 1..=n)
            .map(|m| {
                // The row after the first m tokens. Greedy verification reads it only when
                // those tokens are on the traced sequence and it does not end in a stop token,
                // so others are left unknown (an unknown token in the output would fail the
                // check in `run_set`).
                let argmax = match self.trace.full.get(m) {
                    Some(&t) if m <= on => t,
                    _ => u32::MAX,
                };
                Ok(TargetRow {
                    argmax,
                    probs: None,
                })
            })
            .collect()
    }

    fn draft_len(&self) -> usize {
        self.draft.len()
    }

    fn target_len(&self) -> usize {
        self.target.len()
    }

    fn rollback(&mut self, draft_len: usize, target_len: usize) -> jitdelta_spec::Result<()> {
        self.draft.truncate(draft_len);
        self.target.truncate(target_len);
        Ok(())
    }
}

struct Prompt {
    ids: Vec<u32>,
    max_new: usize,
}

fn options(p: &Prompt, stop: &[u32]) -> GenerateOptions {
    GenerateOptions {
        max_new: p.max_new,
        sampling: Sampling::Greedy,
        stop: stop.to_vec(),
        seed: 0,
    }
}

/// Runs `controller` over the prompts of a set in order (it learns across them).
fn run_set(
    traces: &mut [&mut Trace],
    prompts: &[&Prompt],
    controller: &mut Controller,
    model: &dyn CausalLm,
    source: &JitSource,
    stop: &[u32],
) -> Result<SpecStats> {
    let mut total = SpecStats::default();
    for (trace, p) in traces.iter_mut().zip(prompts) {
        let mut replay = Replay {
            trace,
            model,
            source,
            draft: Vec::new(),
            target: Vec::new(),
        };
        let out = generate(&mut replay, controller, &p.ids, &options(p, stop), |_| {
            Ok(())
        })?;
        if out.tokens[..] != replay.trace.full[p.ids.len()..] {
            return Err("replayed output differs from the exact greedy output".into());
        }
        total.add(&out.stats);
    }
    Ok(total)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let device = Device::Cpu;
    let _tmp;
    let jd = match &args.jd {
        Some(p) => p.clone(),
        None => {
            let dir = tempfile::tempdir()?;
            let p = dir.path().join("model.jd");
            eprintln!("compressing {} ...", args.model_dir.display());
            compress_model(&args.model_dir, &p, &EncodeOptions::default(), false)?;
            _tmp = dir;
            p
        }
    };
    // Cache every rebuilt layer: recording a trace runs long stretches in one mode, so the
    // passes run at dense speed with the very same rebuilt weights.
    let options = JitOptions {
        cache_budget: 4 << 30,
        ..JitOptions::default()
    };
    let source = JitSource::open(&jd, &device, options)?;
    let model = load_causal_lm(&source)?;
    let files = ModelFiles::Dir(args.model_dir.clone());
    let tokenizer = Tokenizer::load(&files)?;
    let template = ChatTemplate::load(&files)?;
    let mut stop = eos_token_ids(&files, &tokenizer)?;
    stop.extend(model.info().eos_token_ids.iter().copied());

    let mut prompts: Vec<(usize, Prompt)> = Vec::new(); // (set, prompt)
    for (s, (name, texts)) in args.sets.iter().enumerate() {
        let max_new = if *name == "long" {
            args.long_tokens
        } else {
            args.tokens
        };
        for text in texts.iter().take(args.prompts) {
            let chat = template.apply(&[Message::user(*text)], true)?;
            let ids = tokenizer.encode(&chat, false)?;
            prompts.push((s, Prompt { ids, max_new }));
        }
    }
    let start = std::time::Instant::now();
    let mut traces = Vec::new();
    for (i, (_, p)) in prompts.iter().enumerate() {
        traces.push(Trace::record(
            model.as_ref(),
            &source,
            &p.ids,
            p.max_new,
            &stop,
        )?);
        eprintln!(
            "traced {}/{} ({} tokens), {:.0} s",
            i + 1,
            prompts.len(),
            traces[i].full.len() - p.ids.len(),
            start.elapsed().as_secs_f64()
        );
    }

    if args.validate > 0 {
        validate(
            &args,
            &jd,
            &prompts,
            &mut traces,
            model.as_ref(),
            &source,
            &stop,
        )?;
    }

    // The sets: each kind alone, then all prompts interleaved round-robin.
    let mut sets: Vec<(String, Vec<usize>)> = args
        .sets
        .iter()
        .enumerate()
        .map(|(s, (name, _))| {
            let idx = (0..prompts.len()).filter(|&i| prompts[i].0 == s).collect();
            (name.to_string(), idx)
        })
        .collect();
    let longest = sets.iter().map(|s| s.1.len()).max().unwrap_or(0);
    let mixed: Vec<usize> = (0..longest)
        .flat_map(|r| sets.iter().filter_map(move |s| s.1.get(r).copied()))
        .collect();
    sets.push(("mixed".into(), mixed));

    let arm_names: Vec<String> = StopRule::default_arms().iter().map(|r| r.name()).collect();
    let c = args.draft_cost;
    println!(
        "Greedy, draft cost c = {c} target passes; cost = (target passes + c * draft passes) / \
         token, speed-up = 1 / cost (plain decoding: 1)."
    );
    for (name, idx) in &sets {
        let tokens: usize = idx
            .iter()
            .map(|&i| traces[i].full.len() - prompts[i].1.ids.len())
            .sum();
        println!("\n### {name}: {} prompts, {tokens} tokens\n", idx.len());
        println!(
            "| controller | acceptance | accepted / round | target passes / token | draft passes / token | cost / token | speed-up | vs best arm |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
        let mut rows: Vec<(String, jitdelta_spec::SpecSummary, String)> = Vec::new();
        let mut arm_costs = Vec::new();
        for &ctl in FIXED.iter().chain(BANDITS) {
            let seeds = if BANDITS.contains(&ctl) {
                args.seeds
            } else {
                1
            };
            let (mut total, mut worst) = (SpecStats::default(), 0f64);
            for seed in 0..seeds {
                let mut controller = Controller::new(
                    ctl.parse()?,
                    ControllerConfig {
                        draft_cost: c,
                        seed,
                        auto_off: args.auto_off,
                        ..ControllerConfig::default()
                    },
                );
                let mut set_traces: Vec<&mut Trace> = Vec::new();
                let mut set_prompts = Vec::new();
                // Borrow the set's traces mutably, in the set's order.
                let mut slots: Vec<Option<&mut Trace>> = traces.iter_mut().map(Some).collect();
                for &i in idx {
                    set_traces.push(slots[i].take().ok_or("a prompt twice in a set")?);
                    set_prompts.push(&prompts[i].1);
                }
                let s = run_set(
                    &mut set_traces,
                    &set_prompts,
                    &mut controller,
                    model.as_ref(),
                    &source,
                    &stop,
                )?;
                worst = worst.max(s.summary(c).cost_per_token);
                total.add(&s);
            }
            let summary = total.summary(c);
            if arm_names.iter().any(|a| a == ctl) {
                arm_costs.push(summary.cost_per_token);
            }
            let note = if seeds > 1 {
                format!("worst seed {:.3}", 1.0 / worst)
            } else {
                String::new()
            };
            rows.push((ctl.to_string(), summary, note));
        }
        let best_arm = arm_costs.iter().copied().fold(f64::INFINITY, f64::min);
        for (ctl, s, note) in rows {
            let vs = if BANDITS.contains(&ctl.as_str()) {
                format!("{:.1}% {note}", 100.0 * best_arm / s.cost_per_token)
            } else {
                String::new()
            };
            println!(
                "| {ctl} | {:.3} | {:.2} | {:.3} | {:.3} | {:.3} | {:.3} | {vs} |",
                s.acceptance_rate,
                s.mean_accepted_length,
                s.target_passes_per_token,
                s.draft_passes_per_token,
                s.cost_per_token,
                1.0 / s.cost_per_token
            );
        }
        // Every arm's run yields the same tokens, so one arm picked at random for the whole set
        // costs the mean of the arms' costs per token: the reference a bandit has to beat.
        let mean_arm = arm_costs.iter().sum::<f64>() / arm_costs.len().max(1) as f64;
        println!(
            "\nThe bandit's {} arms: best cost {best_arm:.3}, mean {mean_arm:.3} (one arm picked \
             at random for the whole set: {:.1}% of the best arm).",
            arm_costs.len(),
            100.0 * best_arm / mean_arm
        );
    }
    eprintln!("done in {:.0} s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Runs the first `args.validate` prompts of each set through the real loop and checks the
/// counters against the replay.
fn validate(
    args: &Args,
    jd: &PathBuf,
    prompts: &[(usize, Prompt)],
    traces: &mut [Trace],
    model: &dyn CausalLm,
    source: &JitSource,
    stop: &[u32],
) -> Result<()> {
    // A fresh source without the layer cache: the way `jitdelta generate` runs.
    let real_source = JitSource::open(jd, &Device::Cpu, JitOptions::default())?;
    let real_model = load_causal_lm(&real_source)?;
    let mut pair = SelfSpec::new(real_model.as_ref(), real_source.mode().clone());
    let mut per_set = vec![0; args.sets.len()];
    for (i, (s, p)) in prompts.iter().enumerate() {
        if per_set[*s] >= args.validate {
            continue;
        }
        per_set[*s] += 1;
        for ctl in ["fixed:4", "max-conf", "ucb1"] {
            let config = ControllerConfig {
                draft_cost: args.draft_cost,
                auto_off: args.auto_off,
                ..ControllerConfig::default()
            };
            let mut a = Controller::new(ctl.parse()?, config);
            let real = generate(&mut pair, &mut a, &p.ids, &options(p, stop), |_| Ok(()))?;
            let mut b = Controller::new(ctl.parse()?, config);
            let replayed = run_set(&mut [&mut traces[i]], &[p], &mut b, model, source, stop)?;
            let same = real.stats == replayed && real.tokens[..] == traces[i].full[p.ids.len()..];
            eprintln!(
                "validate {} #{i} {ctl}: real {:?} replay {:?} -> {}",
                args.sets[*s].0,
                real.stats,
                replayed,
                if same { "identical" } else { "DIFFERENT" }
            );
            if !same {
                return Err("the replay does not match the real loop".into());
            }
        }
    }
    Ok(())
}
