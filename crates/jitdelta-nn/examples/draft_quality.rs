//! How good is the draft? Teacher-forced comparison of Draft with Exact on SmolLM2.
//!
//! For each prompt (chat, code, arithmetic, ...), formatted as a ChatML user turn, the exact
//! model greedily generates a continuation; then Exact and each draft score the same tokens in
//! one pass, and at every continuation position we compare: top-1 agreement with Exact and
//! KL(exact || draft) of the next-token distributions.
//!
//! ```text
//! cargo run --release -p jitdelta-nn --example draft_quality -- [MODEL_DIR] [MODEL.jd] [TOKENS]
//! ```
//!
//! Drafts: the resident layout with d = 3 (k = 12 bits of each BF16 weight, the default) and
//! d = 2 (k = 11), both chosen at load time, and the compact at-rest base of the file.

use candle_core::{Device, Tensor};
use jitdelta_format::{compress_model, EncodeOptions};
use jitdelta_nn::models::{greedy_generate, Llama, LlamaConfig};
use jitdelta_nn::{CausalLm, JitOptions, JitSource, LinearLayer, Logits, Mode, WeightLayout};
use std::path::PathBuf;
use tokenizers::Tokenizer;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const PROMPTS: &[(&str, &str)] = &[
    ("chat", "Hi! How are you today?"),
    (
        "chat",
        "What is the capital of Japan, and what is it famous for?",
    ),
    ("chat", "Give me three tips for sleeping better."),
    (
        "story",
        "Write a short story about a robot who learns to paint.",
    ),
    (
        "story",
        "Describe a sunrise over the ocean in a few sentences.",
    ),
    (
        "code",
        "Write a Python function that checks whether a number is prime.",
    ),
    (
        "code",
        "Write a JavaScript function that reverses a string.",
    ),
    ("code", "Explain what a hash map is in one paragraph."),
    ("math", "What is 23 + 58?"),
    ("math", "What is 12 times 11? Show your steps."),
    (
        "math",
        "If a train travels 60 km per hour for 3 hours, how far does it go?",
    ),
    ("list", "List the days of the week."),
    ("list", "Name five fruits."),
];

/// Log-softmax of each row, in f64.
fn log_softmax(rows: Vec<Vec<f32>>) -> Vec<Vec<f64>> {
    rows.into_iter()
        .map(|r| {
            let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = r.iter().map(|&v| (v as f64 - max).exp()).sum();
            let log_z = max + sum.ln();
            r.iter().map(|&v| v as f64 - log_z).collect()
        })
        .collect()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, i| if v[i] > v[b] { i } else { b })
}

/// Next-token log-probabilities at every position of `ids`, in one pass.
fn score(model: &dyn CausalLm, ids: &[u32]) -> Result<Vec<Vec<f64>>> {
    let mut cache = model.new_cache();
    let logits: Tensor = model
        .forward_ids(ids, 0, &mut cache, Logits::All)?
        .squeeze(0)?;
    Ok(log_softmax(logits.to_vec2()?))
}

#[derive(Default, Clone, Copy)]
struct Tally {
    positions: usize,
    agree: usize,
    kl: f64,
}

impl Tally {
    fn add(&mut self, exact: &[f64], draft: &[f64]) {
        self.positions += 1;
        self.agree += (argmax(exact) == argmax(draft)) as usize;
        self.kl += exact
            .iter()
            .zip(draft)
            .map(|(&e, &d)| e.exp() * (e - d))
            .sum::<f64>();
    }

    fn show(&self) -> String {
        format!(
            "top-1 {:.3} ({}/{}), mean KL {:.4} nats",
            self.agree as f64 / self.positions as f64,
            self.agree,
            self.positions,
            self.kl / self.positions as f64
        )
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testdata-cache/smollm2-bf16"
        )
        .into()
    }));
    let jd = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.with_extension("jd"));
    let max_new: usize = args.next().map_or(Ok(40), |s| s.parse())?;
    if !jd.exists() {
        println!("compressing {} -> {}", dir.display(), jd.display());
        compress_model(&dir, &jd, &EncodeOptions::default(), false)?;
    }
    let device = Device::Cpu;
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;

    let open = |layout| -> Result<(JitSource, Llama)> {
        // A cache as large as the model: exact generation runs at dense speed.
        let options = JitOptions {
            layout,
            cache_budget: 1 << 30,
            ..JitOptions::default()
        };
        let source = JitSource::open(&jd, &device, options)?;
        let model = Llama::load(&source, &LlamaConfig::from_source(&source)?)?;
        Ok((source, model))
    };
    let drafts = [
        (
            "resident d=3 (k=12)",
            open(WeightLayout::Resident { draft_bits: 3 })?,
        ),
        (
            "resident d=2 (k=11)",
            open(WeightLayout::Resident { draft_bits: 2 })?,
        ),
        ("compact at-rest base", open(WeightLayout::Compact)?),
    ];
    let (exact_source, exact_model) = &drafts[0].1;
    let eos = exact_model.info().eos_token_ids.clone();

    let mut totals = vec![Tally::default(); drafts.len()];
    let mut by_kind: Vec<(&str, Vec<Tally>)> = Vec::new();
    let mut generated = 0;
    for &(kind, prompt) in PROMPTS {
        let text = format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n");
        let mut ids = tokenizer.encode(text, false)?.get_ids().to_vec();
        let prompt_len = ids.len();
        exact_source.set_mode(Mode::Exact);
        let new = greedy_generate(exact_model, &ids, max_new, &eos)?;
        generated += new.len();
        ids.extend(&new);
        let exact = score(exact_model, &ids)?;
        if by_kind.last().is_none_or(|(k, _)| *k != kind) {
            by_kind.push((kind, vec![Tally::default(); drafts.len()]));
        }
        let kind_tally = &mut by_kind.last_mut().expect("pushed above").1;
        for (i, (_, (source, model))) in drafts.iter().enumerate() {
            source.set_mode(Mode::Draft);
            let draft = score(model, &ids)?;
            // Position p predicts token p + 1: score the predictions of the continuation.
            for p in prompt_len - 1..ids.len() - 1 {
                totals[i].add(&exact[p], &draft[p]);
                kind_tally[i].add(&exact[p], &draft[p]);
            }
        }
        println!("[{kind}] {prompt:?} -> {:?}", tokenizer.decode(&new, true)?);
    }
    println!(
        "\n{} prompts, {generated} generated tokens, {} teacher-forced positions",
        PROMPTS.len(),
        totals[0].positions
    );
    for (i, (name, (source, _))) in drafts.iter().enumerate() {
        let layers = source.layers();
        let exact: usize = layers.iter().map(|l| l.bytes_held()).sum();
        let draft: usize = layers.iter().map(|l| l.draft_bytes()).sum();
        println!(
            "{name:22} {} | projection bytes: exact {:.1} MB, draft reads {:.1} MB",
            totals[i].show(),
            exact as f64 / 1e6,
            draft as f64 / 1e6
        );
        for (kind, tallies) in &by_kind {
            println!("    {kind:6} {}", tallies[i].show());
        }
    }
    Ok(())
}
