//! The three-line swap: the same Llama code runs on dense safetensors or on a jitdelta file.
//!
//! ```text
//! cargo run --release -p jitdelta-nn --example swap -- [MODEL_DIR] [MODEL.jd] [PROMPT]
//! ```
//!
//! MODEL_DIR defaults to `testdata-cache/smollm2-bf16` (scripts/fetch-test-data.sh); MODEL.jd
//! is created from it when missing (`jitdelta compress` does the same).

use candle_core::Device;
use jitdelta_format::{compress_model, EncodeOptions};
use jitdelta_nn::models::{greedy_generate, Llama, LlamaConfig};
use jitdelta_nn::{CausalLm, DenseSource, JitOptions, JitSource, LayerSource};
use std::path::PathBuf;
use std::time::Instant;
use tokenizers::Tokenizer;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Library code that only knows about `LayerSource`: load a Llama, chat, decode.
fn chat(source: &dyn LayerSource, prompt: &str) -> Result<String> {
    let model = Llama::load(source, &LlamaConfig::from_source(source)?)?;
    let tokenizer =
        Tokenizer::from_bytes(source.file("tokenizer.json")?.ok_or("no tokenizer.json")?)?;
    let text = format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n");
    let ids = tokenizer.encode(text, false)?.get_ids().to_vec();
    let start = Instant::now();
    let new = greedy_generate(&model, &ids, 24, &model.info().eos_token_ids)?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "  {} tokens in {secs:.2} s ({:.1} tokens/s); weights held: {:.1} MB",
        new.len(),
        new.len() as f64 / secs,
        source.weight_bytes() as f64 / 1e6
    );
    tokenizer.decode(&new, true)
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
    let prompt = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".into());
    if !jd.exists() {
        println!("compressing {} -> {}", dir.display(), jd.display());
        compress_model(&dir, &jd, &EncodeOptions::default(), false)?;
    }
    let device = Device::Cpu;

    // Dense weights:
    let source = DenseSource::open(&dir, &device)?;
    println!("dense ({}):", dir.display());
    println!("  {:?}", chat(&source, &prompt)?);

    // The swap: a JIT source instead; the model code above is untouched.
    let source = JitSource::open(&jd, &device, JitOptions::default())?;
    println!("jit, exact ({}):", jd.display());
    println!("  {:?}", chat(&source, &prompt)?);
    Ok(())
}
