//! The `jitdelta` command line.

mod generate;
mod speculative;

use clap::{Parser, Subcommand, ValueEnum};
use jitdelta_format::{
    compress_model, decompress_model, file_stats, verify_model, BaseKind, EncodeOptions, JdFile,
};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "jitdelta",
    version,
    about = "LLM weights as a 4-bit-class draft base plus an exact residual"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Base {
    /// Pick per tensor by estimated size.
    Auto,
    /// Nested bit planes.
    Bitplane,
    /// Affine int4 base with per-code residual.
    Affine,
}

#[derive(Clone, Copy, ValueEnum)]
enum GenerateMode {
    /// Bit-identical weights.
    Exact,
    /// Base (draft) weights only.
    Draft,
}

#[derive(Subcommand)]
enum Command {
    /// Compress a .safetensors file or a model folder into one .jd file.
    Compress {
        /// Input: model.safetensors or a folder (sharded models, config and tokenizer files).
        input: PathBuf,
        /// Output .jd file (written atomically).
        output: PathBuf,
        /// Base kind per tensor.
        #[arg(long, value_enum, default_value = "auto")]
        base: Base,
        /// Draft precision k in bits (sign + exponent + mantissa bits kept in the base);
        /// for BF16, 10..=15; default 12.
        #[arg(long, default_value_t = 12)]
        draft_bits: u32,
        /// Rows per chunk.
        #[arg(long, default_value_t = 64)]
        chunk_rows: usize,
        /// Affine group size.
        #[arg(long, default_value_t = 32)]
        group_size: usize,
    },
    /// Restore the original safetensors file (path ending .safetensors) or folder.
    Decompress {
        /// Input .jd file.
        input: PathBuf,
        /// Output .safetensors file or folder.
        output: PathBuf,
    },
    /// Exit 0 only if every tensor of the original is bit-identical in the .jd file.
    Verify {
        /// The .jd file.
        input: PathBuf,
        /// The original .safetensors file or folder.
        original: PathBuf,
    },
    /// Generate text from a model folder holding a .jd file (or the original safetensors),
    /// config.json and tokenizer.json; tokens stream to stdout.
    Generate {
        /// Model folder, or a .jd file.
        #[arg(long)]
        model: PathBuf,
        /// The prompt (a user message when the model has a chat template).
        #[arg(long)]
        prompt: String,
        /// Most new tokens.
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        /// exact: bit-identical weights; draft: the base alone.
        #[arg(long, value_enum, default_value = "exact")]
        mode: GenerateMode,
        /// Pick the most likely token (the default unless --temperature is given).
        #[arg(long, conflicts_with_all = ["temperature", "top_p", "seed"])]
        greedy: bool,
        /// Sample at this temperature.
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling mass.
        #[arg(long, default_value_t = 1.0, requires = "temperature")]
        top_p: f64,
        /// Sampling seed.
        #[arg(long, default_value_t = 0, requires = "temperature")]
        seed: u64,
        /// Print the text, token ids, tokens/s and resident weight bytes as JSON.
        #[arg(long)]
        json: bool,
        /// Self-speculative decoding (needs a .jd file): the base drafts, the exact model
        /// verifies; output as plain exact decoding. Reports acceptance rate, mean accepted
        /// length and target passes per token.
        #[arg(long)]
        speculative: bool,
        /// Where to run: cpu, or cuda / cuda:N (needs a build with the `cuda` feature).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// How far to draft each round: fixed:K, max-conf, entropy, margin, entropy-bound, or a
        /// bandit over these: ucb1, ucb1-tuned, ts (Beta-Bernoulli Thompson sampling), ts-gauss
        /// (Gaussian Thompson sampling), lin-ucb.
        #[arg(long, default_value = "ucb1", requires = "speculative",
              value_parser = speculative::parse_controller)]
        controller: jitdelta_spec::ControllerKind,
        /// Cost of a draft pass in verify passes, for the controller's reward: a number, or
        /// `auto` to measure it from the passes' wall times as the request runs (decisions then
        /// depend on timing; the output does not).
        #[arg(long, default_value = "0.7", requires = "speculative",
              value_parser = speculative::parse_draft_cost)]
        draft_cost: speculative::DraftCost,
        /// Stop drafting while it loses to plain decoding (rounds keeping too few drafted
        /// tokens for their cost), probing again after 16, 32, ... plain steps. The output is
        /// the same.
        #[arg(long, requires = "speculative")]
        auto_off: bool,
    },
    /// Print per-tensor sizes and bits per weight.
    Inspect {
        /// The .jd file.
        input: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also transcode every split tensor to the in-memory resident layout (12-bit planes
        /// for BF16) and report its size, the draft's share and the exponent escapes.
        #[arg(long)]
        resident: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, like every other error of this tool; `--help` shows the usage.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!(
                "jitdelta: error: {}",
                message.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    let progress = !cli.quiet && std::io::stderr().is_terminal();
    match run(cli.command, progress) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jitdelta: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command, progress: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match command {
        Command::Compress {
            input,
            output,
            base,
            draft_bits,
            chunk_rows,
            group_size,
        } => {
            // k counts sign and the 8 exponent bits of BF16/F32; F16 sources keep the same
            // number of mantissa bits.
            let draft_mantissa_bits = draft_bits.checked_sub(9).ok_or_else(|| {
                format!("--draft-bits {draft_bits} is below 9 (sign + 8 exponent bits)")
            })?;
            let opts = EncodeOptions {
                base: match base {
                    Base::Auto => BaseKind::Auto,
                    Base::Bitplane => BaseKind::Bitplane,
                    Base::Affine => BaseKind::Affine,
                },
                draft_mantissa_bits,
                chunk_rows,
                group_size,
                ..EncodeOptions::default()
            };
            let start = std::time::Instant::now();
            let r = compress_model(&input, &output, &opts, progress)?;
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "compressed {} tensors: {} -> {} bytes ({:.2}% of the input) in {secs:.1} s ({:.0} MB/s)",
                r.tensors,
                r.input_bytes,
                r.output_bytes,
                100.0 * r.output_bytes as f64 / r.input_bytes.max(1) as f64,
                r.input_bytes as f64 / secs / 1e6
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Decompress { input, output } => {
            decompress_model(&input, &output, progress)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { input, original } => {
            let r = verify_model(&input, &original, progress)?;
            if r.mismatches.is_empty() {
                println!(
                    "ok: {} tensors, {} bytes, bit-identical",
                    r.tensors, r.bytes
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for m in &r.mismatches {
                    eprintln!("mismatch: {m}");
                }
                eprintln!("jitdelta: error: {} mismatches", r.mismatches.len());
                Ok(ExitCode::from(1))
            }
        }
        Command::Generate {
            model,
            prompt,
            max_tokens,
            mode,
            greedy: _,
            temperature,
            top_p,
            seed,
            json,
            speculative,
            controller,
            draft_cost,
            auto_off,
            device,
        } => {
            let sampling = match temperature {
                None => generate::Sampling::Greedy,
                Some(t) if t > 0.0 && top_p > 0.0 && top_p <= 1.0 => generate::Sampling::TopP {
                    temperature: t,
                    top_p,
                    seed,
                },
                Some(_) => return Err("--temperature must be > 0 and --top-p in (0, 1]".into()),
            };
            generate::run(generate::GenerateArgs {
                model,
                prompt,
                max_tokens,
                draft: matches!(mode, GenerateMode::Draft),
                sampling,
                json,
                speculative: speculative.then_some(controller),
                draft_cost,
                auto_off,
                device: generate::open_device(&device)?,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect {
            input,
            json,
            resident,
        } => {
            let jd = JdFile::open(&input)?;
            let stats = file_stats(&jd)?;
            let resident = resident.then(|| resident_stats(&jd)).transpose()?;
            if json {
                let mut value = serde_json::to_value(&stats)?;
                value["resident"] = serde_json::to_value(&resident)?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_table(&stats);
                if let Some(r) = resident {
                    println!(
                        "resident layout: {} bytes for {} weights ({:.2}% of BF16-size {} bytes; \
                         {:.3} bits/weight, draft reads {:.3}); {} exponent escapes ({:.4}%)",
                        r.bytes,
                        r.weights,
                        100.0 * r.bytes as f64 / r.source_bytes.max(1) as f64,
                        r.source_bytes,
                        bits(r.bytes, r.weights),
                        bits(r.draft_bytes, r.weights),
                        r.escapes,
                        100.0 * r.escapes as f64 / r.weights.max(1) as f64
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Totals of the resident layout over every split tensor of a file.
#[derive(serde::Serialize)]
struct ResidentStats {
    weights: u64,
    source_bytes: u64,
    bytes: u64,
    draft_bytes: u64,
    escapes: u64,
}

fn resident_stats(jd: &JdFile) -> Result<ResidentStats, jitdelta_format::Error> {
    let mut r = ResidentStats {
        weights: 0,
        source_bytes: 0,
        bytes: 0,
        draft_bytes: 0,
        escapes: 0,
    };
    for name in jd.tensor_names() {
        let view = jd.tensor(name)?;
        let Some(format) = view.format() else {
            continue;
        };
        let t = view.to_resident(3)?;
        let (rows, cols) = t.dims();
        r.weights += (rows * cols) as u64;
        r.source_bytes += (rows * cols * format.bytes()) as u64;
        r.bytes += t.bytes_held() as u64;
        r.draft_bytes += t.draft_bytes() as u64;
        r.escapes += t.escape_count() as u64;
    }
    Ok(r)
}

fn bits(bytes: u64, numel: u64) -> f64 {
    8.0 * bytes as f64 / numel.max(1) as f64
}

fn print_table(s: &jitdelta_format::FileStats) {
    println!(
        "{:<56} {:>5} {:>16} {:>8} {:>12} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "tensor", "dtype", "shape", "kind", "bytes", "base", "resid", "scale", "table", "total"
    );
    for t in &s.tensors {
        let shape = format!("{:?}", t.shape);
        println!(
            "{:<56} {:>5} {:>16} {:>8} {:>12} {:>6.2} {:>6.2} {:>6.2} {:>6.3} {:>6.2}",
            t.name,
            t.dtype,
            shape,
            t.kind,
            t.total_bytes(),
            bits(t.base_bytes, t.numel),
            bits(t.residual_bytes, t.numel),
            bits(t.scale_bytes, t.numel),
            bits(t.table_bytes, t.numel),
            bits(t.total_bytes(), t.numel)
        );
    }
    let sum = |f: fn(&jitdelta_format::TensorStats) -> u64| s.tensors.iter().map(f).sum::<u64>();
    let numel = sum(|t| t.numel);
    let raw = sum(|t| t.raw_bytes);
    println!(
        "total: {} tensors, {} weights, {} raw bytes -> {} file bytes ({:.2}% of raw; \
         {:.2}% without the {} bytes of auxiliary files)",
        s.tensors.len(),
        numel,
        raw,
        s.file_bytes,
        100.0 * s.file_bytes as f64 / raw.max(1) as f64,
        100.0 * (s.file_bytes - s.aux_bytes) as f64 / raw.max(1) as f64,
        s.aux_bytes
    );
    println!(
        "bits/weight: base {:.3}, residual {:.3}, scales {:.3}, tables {:.4}, container {:.4}, aux files {:.4}, file {:.3}",
        bits(sum(|t| t.base_bytes), numel),
        bits(sum(|t| t.residual_bytes), numel),
        bits(sum(|t| t.scale_bytes), numel),
        bits(sum(|t| t.table_bytes), numel),
        bits(s.container_bytes, numel),
        bits(s.aux_bytes, numel),
        bits(s.file_bytes, numel)
    );
}
