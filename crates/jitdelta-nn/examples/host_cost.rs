//! Host time to queue the ops of a decode step on CUDA, per op: at batch 1 a step of ~20 small
//! candle ops a layer is bound by this, not by the GPU (docs/benchmarks.md).
//!
//! ```text
//! cargo run --release -p jitdelta-nn --features cuda --example host_cost [-- --events]
//! ```
//!
//! Each op runs 2,000 times without synchronising; "host" is the time until the last one is
//! queued, "host+gpu" until it has run (equal: the host is the bottleneck). The device comes
//! from [`jitdelta_nn::cuda_device`]; `--events` opens it with candle's default instead (cudarc
//! creates two CUDA events per allocation).

use candle_core::{DType, Device, Tensor, D};
use std::time::Instant;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn time(name: &str, dev: &Device, n: usize, mut f: impl FnMut() -> Res<()>) -> Res<()> {
    for _ in 0..20 {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..n {
        f()?;
    }
    let host = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    dev.synchronize()?;
    let all = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    println!("{name:<32} host {host:7.2} us/op   host+gpu {all:7.2} us/op");
    Ok(())
}

/// Runs an op for its cost only.
fn op<T>(r: candle_core::Result<T>) -> Res<()> {
    r?;
    Ok(())
}

fn bf16(shape: &[usize], dev: &Device) -> Res<Tensor> {
    Ok(Tensor::randn(0f32, 1., shape, dev)?.to_dtype(DType::BF16)?)
}

fn main() -> Res<()> {
    let dev = if std::env::args().any(|a| a == "--events") {
        Device::new_cuda(0)?
    } else {
        jitdelta_nn::cuda_device(0)?
    };
    let n = 2000;
    let x = bf16(&[1, 1, 4096], &dev)?;
    let norm = bf16(&[4096], &dev)?;
    let w = (bf16(&[4096, 4096], &dev)? * 0.02)?;
    let q = bf16(&[1, 32, 1, 128], &dev)?;
    let cos = bf16(&[1, 64], &dev)?;
    let cached = bf16(&[1, 8, 96, 128], &dev)?;
    let new = bf16(&[1, 8, 1, 128], &dev)?;
    let buffer = Tensor::zeros((1, 8, 256, 128), DType::BF16, &dev)?;
    time("add", &dev, n, || op(&x + &x))?;
    time("silu", &dev, n, || op(candle_nn::ops::silu(&x)))?;
    time("rms_norm", &dev, n, || {
        op(candle_nn::ops::rms_norm(&x, &norm, 1e-5))
    })?;
    time("rope", &dev, n, || {
        op(candle_nn::rotary_emb::rope(&q, &cos, &cos))
    })?;
    time("KV append by cat (96 + 1)", &dev, n, || {
        op(Tensor::cat(&[&cached, &new], 2))
    })?;
    time("KV append by slice_set", &dev, n, || {
        op(buffer.slice_set(&new, 2, 100))
    })?;
    time("dense matmul 1x4096 @ 4096^2", &dev, n / 4, || {
        op(x.broadcast_matmul(&w.t()?))
    })?;
    time("zeros, 8 KB", &dev, n, || {
        op(Tensor::zeros(4096, DType::BF16, &dev))
    })?;
    time("argmax + read back (syncs)", &dev, 200, || {
        op(x.flatten_all()?.argmax(D::Minus1)?.to_scalar::<u32>())
    })?;
    Ok(())
}
