//! Host cost of loading JIT layers onto a GPU, per stage, over every BF16 matrix of a .jd file:
//! the CPU part of what `JitSource::linear` + `place` do for each projection on CUDA (the upload
//! itself is not timed). Builds and runs without the `cuda` feature.
//!
//! ```text
//! cargo run --release -p jitdelta-kernels --example load_cost -- FILE.jd \
//!     [--threads 1,16] [--filter SUBSTRING] [--no-split]
//! ```
//!
//! Stages, each timed on its own over all tensors, once per thread count (a rayon pool of that
//! size; the default is 1 and all cores):
//!
//! - `decode`: at rest -> exact BF16 bytes (`TensorView::decode_exact_into`),
//! - `encode`: exact BF16 bytes -> resident (`ResidentTensor::from_exact`),
//! - `to_resident`: at rest -> resident in one pass (`TensorView::to_resident`, what the layer
//!   source calls; about `decode` + `encode` without the whole-tensor buffer),
//! - `device`: resident -> device layout (`DeviceLayout::from_resident`, done before upload).
//!
//! `--no-split` skips `decode` and `encode`. Throughput is in BF16 bytes (2 bytes a weight) per
//! second, total and per thread. The last lines are CRC-32s of every resident and device-layout
//! tensor built (all fields), so that two builds can be checked to produce the same bytes.

use jitdelta_format::{FloatFormat, JdFile, ResidentTensor};
use jitdelta_kernels::device_layout::DeviceLayout;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Args {
    path: String,
    threads: Vec<usize>,
    filter: Option<String>,
    split: bool,
}

fn usage() -> ! {
    eprintln!("usage: load_cost FILE.jd [--threads 1,16] [--filter SUBSTRING] [--no-split]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut a = Args {
        path: String::new(),
        threads: if all > 1 { vec![1, all] } else { vec![1] },
        filter: None,
        split: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--threads" => {
                let list = it.next().unwrap_or_else(|| usage());
                a.threads = list
                    .split(',')
                    .map(|t| t.parse().unwrap_or_else(|_| usage()))
                    .collect();
            }
            "--filter" => a.filter = Some(it.next().unwrap_or_else(|| usage())),
            "--no-split" => a.split = false,
            _ if arg.starts_with("--") || !a.path.is_empty() => usage(),
            _ => a.path = arg,
        }
    }
    if a.path.is_empty() || a.threads.contains(&0) {
        usage()
    }
    a
}

/// CRC-32 of every field of a resident tensor.
fn resident_crc(t: &ResidentTensor) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let (codes, high, low) = t.planes();
    let (start, pos, exp) = t.escapes();
    for part in [codes, high, low, t.exponent_bases(), exp] {
        h.update(part);
    }
    for part in [start, pos] {
        h.update(bytemuck::cast_slice(part));
    }
    h.finalize()
}

/// CRC-32 of every field of a device layout.
fn device_crc(d: &DeviceLayout) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for part in [&d.p, &d.s, &d.l, &d.bases, &d.escape_exponent] {
        h.update(part);
    }
    for part in [&d.escape_start, &d.escape_pos, &d.escape_row_start] {
        h.update(bytemuck::cast_slice(part));
    }
    h.update(bytemuck::cast_slice(&d.escape_correction));
    h.finalize()
}

#[derive(Default)]
struct Totals {
    decode: Duration,
    encode: Duration,
    to_resident: Duration,
    device: Duration,
}

fn timed<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *total += t.elapsed();
    out
}

fn main() -> Res<()> {
    let args = parse_args();
    let file = JdFile::open(&args.path)?;
    let names: Vec<String> = file
        .tensor_names()
        .filter(|n| args.filter.as_ref().is_none_or(|f| n.contains(f.as_str())))
        .map(str::to_owned)
        .collect();
    let mut views = Vec::new();
    for name in &names {
        let view = file.tensor(name)?;
        if view.format() == Some(FloatFormat::BF16) {
            views.push((name, view));
        }
    }
    let weights: usize = views.iter().map(|(_, v)| v.dims().0 * v.dims().1).sum();
    let bf16_bytes = 2.0 * weights as f64;
    println!(
        "{}: {} BF16 tensors, {:.3} G weights ({:.2} GB as BF16)",
        args.path,
        views.len(),
        weights as f64 / 1e9,
        bf16_bytes / 1e9
    );
    // Touch every page of the mapping once (an untimed exact decode), so the first timed stage
    // does not pay for page faults the others do not see.
    for (_, view) in &views {
        view.decode_exact()?;
    }
    let mut crcs: Vec<(u32, u32)> = Vec::new();
    for &threads in &args.threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let mut t = Totals::default();
        let mut run_crcs = Vec::new();
        pool.install(|| -> Res<()> {
            for (_, view) in &views {
                if args.split {
                    let mut exact = vec![0u8; view.entry().byte_len()?];
                    timed(&mut t.decode, || view.decode_exact_into(&mut exact))?;
                    let (rows, cols) = view.dims();
                    let chunk_rows = view.chunk_rows().unwrap_or(1);
                    timed(&mut t.encode, || {
                        ResidentTensor::from_exact(
                            FloatFormat::BF16,
                            rows,
                            cols,
                            chunk_rows,
                            3,
                            &exact,
                        )
                    })?;
                }
                let r = timed(&mut t.to_resident, || view.to_resident(3))?;
                let d = timed(&mut t.device, || DeviceLayout::from_resident(&r))?;
                run_crcs.push((resident_crc(&r), device_crc(&d)));
            }
            Ok(())
        })?;
        println!("threads {threads}:");
        let stages = [
            ("decode", t.decode, args.split),
            ("encode", t.encode, args.split),
            ("to_resident", t.to_resident, true),
            ("device", t.device, true),
            ("to_resident+device", t.to_resident + t.device, true),
        ];
        for (name, d, shown) in stages {
            if shown {
                let gbs = bf16_bytes / d.as_secs_f64() / 1e9;
                println!(
                    "  {name:<20} {:8.3} s  {gbs:7.3} GB/s  {:7.3} GB/s/thread",
                    d.as_secs_f64(),
                    gbs / threads as f64
                );
            }
        }
        if !crcs.is_empty() && crcs != run_crcs {
            return Err("outputs differ between thread counts".into());
        }
        crcs = run_crcs;
    }
    let all = crcs.iter().fold(crc32fast::Hasher::new(), |mut h, (r, d)| {
        h.update(&r.to_le_bytes());
        h.update(&d.to_le_bytes());
        h
    });
    for ((name, _), (r, d)) in views.iter().zip(&crcs) {
        println!("crc {name}: resident {r:08x} device {d:08x}");
    }
    println!("crc all: {:08x}", all.finalize());
    Ok(())
}
