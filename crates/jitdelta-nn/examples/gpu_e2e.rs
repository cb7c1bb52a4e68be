//! End to end on a CUDA GPU: tokens/s at batch 1 for dense BF16 (candle + cuBLAS), Exact and
//! Draft (JIT layers on the fused GPU kernels), and the GPU memory each holds for its weights.
//!
//! ```text
//! cargo run --release -p jitdelta-nn --features cuda --example gpu_e2e -- MODEL_DIR [MODEL.jd] \
//!     [--tokens 64] [--prompt 32] [--modes dense,exact,draft] [--block 4] [--json OUT]
//! ```
//!
//! MODEL_DIR is a safetensors Llama folder (e.g. a Llama-3-8B-shaped synthetic one from
//! `jitdelta-format`'s `synth_model` example); MODEL.jd (default MODEL_DIR.jd) is compressed
//! from it when missing. Prompt and tokens are fixed ids, decoding is greedy, every step ends
//! with a device synchronisation. After the decode loop two more timings: a pass over `--block`
//! tokens at the end of the sequence (what a speculative verify pass of `block - 1` drafts costs;
//! the cache is rolled back after each), and steps queued back to back with one synchronisation
//! at the end (the GPU's own time per step, without the host's turn between steps).
//! `scripts/gpu-e2e.sh` runs it on the device machine.

use candle_core::Device;
use jitdelta_format::{compress_model, EncodeOptions};
use jitdelta_nn::models::load_causal_lm;
use jitdelta_nn::{DenseSource, JitOptions, JitSource, LayerSource, Logits, Mode};
use std::path::PathBuf;
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    dir: PathBuf,
    jd: PathBuf,
    tokens: usize,
    prompt: usize,
    modes: Vec<String>,
    block: usize,
    json: Option<PathBuf>,
}

fn parse() -> Res<Args> {
    let mut it = std::env::args().skip(1);
    let dir = PathBuf::from(
        it.next()
            .ok_or("usage: gpu_e2e MODEL_DIR [MODEL.jd] [options]")?,
    );
    let mut a = Args {
        jd: dir.with_extension("jd"),
        dir,
        tokens: 64,
        prompt: 32,
        modes: vec!["dense".into(), "exact".into(), "draft".into()],
        block: 4,
        json: None,
    };
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--tokens" => a.tokens = value()?.parse()?,
            "--prompt" => a.prompt = value()?.parse()?,
            "--modes" => a.modes = value()?.split(',').map(str::to_owned).collect(),
            "--block" => a.block = value()?.parse()?,
            "--json" => a.json = Some(value()?.into()),
            s if !s.starts_with("--") => a.jd = s.into(),
            s => return Err(format!("unknown argument {s}").into()),
        }
    }
    Ok(a)
}

fn gpu_used(device: &Device) -> Res<usize> {
    let (free, total) = device
        .as_cuda_device()?
        .cuda_stream()
        .context()
        .mem_get_info()?;
    Ok(total - free)
}

struct RunResult {
    tokens: Vec<u32>,
    json: serde_json::Value,
}

fn run(mode: &str, args: &Args) -> Res<RunResult> {
    let device = jitdelta_nn::cuda_device(0)?;
    let before = gpu_used(&device)?;
    let load = Instant::now();
    let source: Box<dyn LayerSource> = match mode {
        "dense" => Box::new(DenseSource::open(&args.dir, &device)?),
        "exact" | "draft" => {
            let s = JitSource::open(&args.jd, &device, JitOptions::default())?;
            s.set_mode(if mode == "draft" {
                Mode::Draft
            } else {
                Mode::Exact
            });
            Box::new(s)
        }
        m => return Err(format!("unknown mode {m}").into()),
    };
    let model = load_causal_lm(source.as_ref())?;
    device.synchronize()?;
    let load_s = load.elapsed().as_secs_f64();
    let held = gpu_used(&device)? - before;
    let vocab = model.info().vocab_size as u32;
    let prompt: Vec<u32> = (0..args.prompt as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut cache = model.new_cache();
    let start = Instant::now();
    let mut logits = model.forward_ids(&prompt, 0, &mut cache, Logits::Last)?;
    device.synchronize()?;
    let prefill_s = start.elapsed().as_secs_f64();
    let mut tokens = Vec::with_capacity(args.tokens);
    let (mut step_ms, mut issue_ms) = (Vec::new(), Vec::new());
    for _ in 0..args.tokens {
        let next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        tokens.push(next);
        let t = Instant::now();
        logits = model.forward_ids(&[next], cache.len(), &mut cache, Logits::Last)?;
        // Host time to queue the step's work: close to the step time means host-bound.
        issue_ms.push(t.elapsed().as_secs_f64() * 1e3);
        device.synchronize()?;
        step_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let middle = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mean = step_ms.iter().sum::<f64>() / step_ms.len() as f64;
    let (median, issue) = (middle(&mut step_ms), middle(&mut issue_ms));
    // Verify-shaped passes: `block` tokens at the end of the sequence, rolled back each time.
    let block: Vec<u32> = (0..args.block as u32)
        .map(|i| (i * 104_729 + 7) % vocab)
        .collect();
    let mut block_ms = Vec::new();
    for _ in 0..if block.is_empty() { 0 } else { 9 } {
        let at = cache.len();
        let t = Instant::now();
        model.forward_ids(&block, at, &mut cache, Logits::All)?;
        device.synchronize()?;
        block_ms.push(t.elapsed().as_secs_f64() * 1e3);
        cache.truncate(at)?;
    }
    let block_median = middle(&mut block_ms);
    // The same steps with nothing read back in between: the host runs ahead of the GPU.
    let queued = args.tokens.min(32);
    let t = Instant::now();
    for &id in tokens.iter().take(queued) {
        model.forward_ids(&[id], cache.len(), &mut cache, Logits::Last)?;
    }
    device.synchronize()?;
    let queued_ms = t.elapsed().as_secs_f64() * 1e3 / queued.max(1) as f64;
    println!(
        "{mode:>5}: {:.1} tokens/s (median step {median:.2} ms, of which {issue:.2} ms to queue it on the host; \
         mean {mean:.2} ms; queued back to back {queued_ms:.2} ms; a {}-token pass {block_median:.2} ms = \
         {:.2} steps), prefill {} tokens {:.1} ms, \
         weights {:.2} GB (source count), GPU memory used by the load {:.2} GB, load {load_s:.1} s",
        1e3 / median,
        block.len(),
        block_median / median,
        args.prompt,
        prefill_s * 1e3,
        source.weight_bytes() as f64 / 1e9,
        held as f64 / 1e9
    );
    Ok(RunResult {
        json: serde_json::json!({
            "mode": mode, "tokens_per_s": 1e3 / median, "median_step_ms": median, "mean_step_ms": mean,
            "median_host_issue_ms": issue, "queued_step_ms": queued_ms,
            "block_tokens": block.len(), "median_block_ms": block_median,
            "prefill_ms": prefill_s * 1e3, "prompt_tokens": args.prompt, "weight_bytes": source.weight_bytes(),
            "gpu_bytes_used_by_load": held, "load_s": load_s,
        }),
        tokens,
    })
}

fn main() -> Res<()> {
    let args = parse()?;
    if !args.jd.exists() && args.modes.iter().any(|m| m != "dense") {
        let t = Instant::now();
        let report = compress_model(&args.dir, &args.jd, &EncodeOptions::default(), false)?;
        println!(
            "compressed {} -> {} in {:.1} s ({:.2}% of the input)",
            args.dir.display(),
            args.jd.display(),
            t.elapsed().as_secs_f64(),
            100.0 * report.output_bytes as f64 / report.input_bytes as f64
        );
    }
    let mut results = Vec::new();
    let mut dense_tokens: Option<Vec<u32>> = None;
    for mode in &args.modes {
        let r = run(mode, &args)?;
        let mut json = r.json;
        if mode == "dense" {
            dense_tokens = Some(r.tokens.clone());
        } else if let Some(d) = &dense_tokens {
            let same = d.iter().zip(&r.tokens).take_while(|(a, b)| a == b).count();
            println!(
                "{mode:>5}: first {same} of {} greedy tokens equal dense BF16's",
                d.len()
            );
            json["tokens_equal_to_dense"] = same.into();
        }
        results.push(json);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}
