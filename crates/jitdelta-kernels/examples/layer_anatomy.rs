//! Where a decoder layer's time goes on the GPU at batch 1: the kernels of one Llama layer as
//! the decoder launches them (grouped q/k/v GEMV, rope + KV write, attention, o GEMV, add +
//! RMSNorm, grouped gate/up GEMV, silu * up, down GEMV, add + RMSNorm), back to back over
//! `--layers` layers (cycling through `--copies` copies of the weights, so none comes from L2),
//! then the same chain with ops left out. Full chain minus the chain without an op is what that
//! op costs where it sits, the most that fusing it into a neighbour could save. Chains with ops
//! left out compute wrong values: they are timings only.
//!
//! ```text
//! layer_anatomy [--hidden 4608] [--heads 72] [--kv-heads 24] [--head-dim 64] [--mlp 12288]
//!     [--context 128] [--rows 1] [--layers 30] [--copies 3] [--iters 20] [--json FILE]
//!     [--define GEMV_WARPS=4]... [--undeclared qkv,gate_up]
//! ```
//!
//! Each chain starts on an idle GPU; a chain of one small op alone may be bound by how fast the
//! host launches (a few microseconds a launch), so "alone" figures are upper bounds.
//!
//! `--define` compiles the GEMV with tuning knobs (one variant for every tensor, as
//! `kernel_bench --define`) instead of the product's size classes. `--undeclared` leaves those
//! groups undeclared (`GpuResident::launch_together`), so each member picks its size class by
//! its own tiles (the grouped launch then needs them to agree).
//!
//! The defaults are the shape of SmolLM2 widened 8x (the real 7B-shaped model of
//! `scripts/gpu-real-7b.sh`); `--hidden 4096 --heads 32 --kv-heads 8 --head-dim 128 --mlp 14336`
//! is Llama-3-8B. Weights are synthetic (`kernel_bench`'s), in the device layout.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use half::bf16;
use jitdelta_format::{FloatFormat, ResidentTensor};
use jitdelta_kernels::attention::AttentionShape;
use jitdelta_kernels::decoder_ops::RopeKvShape;
use jitdelta_kernels::gpu::{DecoderKernels, GpuResident, GpuSelection, Kernels};
use std::sync::Arc;

mod common;
use common::{activations, synthetic};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const CHUNK_ROWS: usize = 64;

struct Args {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    mlp: usize,
    context: usize,
    rows: usize,
    layers: usize,
    copies: usize,
    iters: usize,
    json: Option<String>,
    defines: Vec<String>,
    undeclared: Vec<String>,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        hidden: 4608,
        heads: 72,
        kv_heads: 24,
        head_dim: 64,
        mlp: 12288,
        context: 128,
        rows: 1,
        layers: 30,
        copies: 3,
        iters: 20,
        json: None,
        defines: Vec::new(),
        undeclared: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let target = match flag.as_str() {
            "--json" => {
                a.json = Some(value()?);
                continue;
            }
            "--define" => {
                a.defines.push(value()?);
                continue;
            }
            "--undeclared" => {
                a.undeclared = value()?.split(',').map(str::to_owned).collect();
                continue;
            }
            "--hidden" => &mut a.hidden,
            "--heads" => &mut a.heads,
            "--kv-heads" => &mut a.kv_heads,
            "--head-dim" => &mut a.head_dim,
            "--mlp" => &mut a.mlp,
            "--context" => &mut a.context,
            "--rows" => &mut a.rows,
            "--layers" => &mut a.layers,
            "--copies" => &mut a.copies,
            "--iters" => &mut a.iters,
            _ => return Err(format!("unknown argument {flag}").into()),
        };
        *target = value()?.parse()?;
    }
    if a.rows == 0 || a.rows > a.context || a.copies == 0 || a.layers == 0 || a.iters == 0 {
        return Err("need 1 <= rows <= context and copies, layers, iters >= 1".into());
    }
    Ok(a)
}

/// The launches of a layer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Qkv,
    RopeKv,
    Attention,
    O,
    AttnNorm,
    GateUp,
    SiluMul,
    Down,
    MlpNorm,
}

const LAYER: [Op; 9] = [
    Op::Qkv,
    Op::RopeKv,
    Op::Attention,
    Op::O,
    Op::AttnNorm,
    Op::GateUp,
    Op::SiluMul,
    Op::Down,
    Op::MlpNorm,
];
const GEMVS: [Op; 4] = [Op::Qkv, Op::O, Op::GateUp, Op::Down];

/// One layer's weights, q/k/v and gate/up declared as the decoder declares them.
struct LayerWeights {
    qkv: [GpuResident; 3],
    o: GpuResident,
    gate_up: [GpuResident; 2],
    down: GpuResident,
}

/// The activations a layer reads and writes, reused by every layer of the chain.
struct Buffers {
    x: CudaSlice<bf16>,
    h: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    cache: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    o_out: CudaSlice<bf16>,
    x_attn: CudaSlice<bf16>,
    h_attn: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    mlp_out: CudaSlice<bf16>,
    norm_w: CudaSlice<bf16>,
    cos_sin: CudaSlice<bf16>,
}

struct Chain<'a> {
    a: &'a Args,
    kernels: &'a Kernels,
    decoder: &'a DecoderKernels,
    layers: &'a [LayerWeights],
    b: Buffers,
    rope: RopeKvShape,
    attention: AttentionShape,
}

impl Chain<'_> {
    fn run(&mut self, layer: &LayerWeights, op: Op, sel: &GpuSelection) -> Res<()> {
        let (r, a) = (self.a.rows, self.a);
        let (k, d, b) = (self.kernels, self.decoder, &mut self.b);
        let eps = 1e-5;
        match op {
            Op::Qkv => project_all(k, &layer.qkv, sel, &b.h, r, &mut b.qkv)?,
            Op::RopeKv => d.rope_kv(
                &self.rope,
                &b.qkv.as_view(),
                &b.cos_sin.as_view(),
                &mut b.q.as_view_mut(),
                &mut b.cache.as_view_mut(),
            )?,
            Op::Attention => {
                let (_, kv_len, _) = self.attention.lens();
                let v_at = a.kv_heads * self.attention.kv_capacity * a.head_dim;
                d.attention(
                    &self.attention,
                    &b.q.as_view(),
                    &b.cache.slice(..kv_len),
                    &b.cache.slice(v_at..v_at + kv_len),
                    &mut b.attn.as_view_mut(),
                )?
            }
            Op::O => k.gemv(
                &layer.o,
                sel,
                &b.attn.as_view(),
                r,
                &mut b.o_out.as_view_mut(),
            )?,
            Op::AttnNorm => d.add_rms_norm(
                &b.x.as_view(),
                &b.o_out.as_view(),
                &b.norm_w.as_view(),
                eps,
                a.hidden,
                &mut b.x_attn.as_view_mut(),
                &mut b.h_attn.as_view_mut(),
            )?,
            Op::GateUp => project_all(k, &layer.gate_up, sel, &b.h_attn, r, &mut b.gate_up)?,
            Op::SiluMul => {
                let n = r * a.mlp;
                d.silu_mul(
                    &b.gate_up.slice(..n),
                    &b.gate_up.slice(n..),
                    &mut b.act.as_view_mut(),
                )?
            }
            Op::Down => k.gemv(
                &layer.down,
                sel,
                &b.act.as_view(),
                r,
                &mut b.mlp_out.as_view_mut(),
            )?,
            Op::MlpNorm => d.add_rms_norm(
                &b.x_attn.as_view(),
                &b.mlp_out.as_view(),
                &b.norm_w.as_view(),
                eps,
                a.hidden,
                &mut b.x.as_view_mut(),
                &mut b.h.as_view_mut(),
            )?,
        }
        Ok(())
    }

    /// Median microseconds per layer of `ops` over the chain's layers.
    fn time(&mut self, stream: &Arc<CudaStream>, ops: &[Op], sel: &GpuSelection) -> Res<f64> {
        let ctx = stream.context().clone();
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let mut t = Vec::with_capacity(self.a.iters);
        for i in 0..self.a.iters + 2 {
            start.record(stream)?;
            for l in 0..self.a.layers {
                let layer = &self.layers[l % self.layers.len()];
                for &op in ops {
                    self.run(layer, op, sel)?;
                }
            }
            end.record(stream)?;
            end.synchronize()?;
            // The first two warm up (NVRTC'd modules, the allocator's pool).
            if i >= 2 {
                t.push(start.elapsed_ms(&end)? as f64 * 1000.0 / self.a.layers as f64);
            }
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }
}

/// The tensors' outputs for `x` one after the other in `y`: one grouped launch where the
/// kernel takes them, else one launch each (members of undeclared groups may differ in size
/// class), as the decoder runs them.
fn project_all(
    k: &Kernels,
    tensors: &[GpuResident],
    sel: &GpuSelection,
    x: &CudaSlice<bf16>,
    rows: usize,
    y: &mut CudaSlice<bf16>,
) -> Res<()> {
    let t: Vec<&GpuResident> = tensors.iter().collect();
    if k.can_group(&t, sel) {
        return Ok(k.gemv_group(&t, sel, &x.as_view(), rows, &mut y.as_view_mut())?);
    }
    let mut at = 0;
    for g in t {
        let n = rows * g.dims().0;
        k.gemv(g, sel, &x.as_view(), rows, &mut y.slice_mut(at..at + n))?;
        at += n;
    }
    Ok(())
}

fn upload(kernels: &Kernels, t: &ResidentTensor, copies: usize) -> Res<Vec<GpuResident>> {
    Ok((0..copies)
        .map(|_| kernels.upload(t))
        .collect::<Result<_, _>>()?)
}

fn resident(rows: usize, cols: usize, seed: u64) -> Res<ResidentTensor> {
    let w = synthetic(rows, cols, seed, 0.0);
    Ok(ResidentTensor::from_exact(
        FloatFormat::BF16,
        rows,
        cols,
        CHUNK_ROWS,
        3,
        bytemuck::cast_slice(&w),
    )?)
}

fn load_layers(kernels: &Kernels, a: &Args) -> Res<Vec<LayerWeights>> {
    let (h, q, kv) = (a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let each = |rows: usize, cols: usize, seed: u64| -> Res<Vec<GpuResident>> {
        upload(kernels, &resident(rows, cols, seed)?, a.copies)
    };
    let (mut qs, mut ks, mut vs) = (each(q, h, 1)?, each(kv, h, 2)?, each(kv, h, 3)?);
    let (mut os, mut gates, mut ups) = (each(h, q, 4)?, each(a.mlp, h, 5)?, each(a.mlp, h, 6)?);
    let mut downs = each(h, a.mlp, 7)?;
    let mut layers = Vec::new();
    while let (Some(q), Some(k), Some(v), Some(o), Some(g), Some(u), Some(d)) = (
        qs.pop(),
        ks.pop(),
        vs.pop(),
        os.pop(),
        gates.pop(),
        ups.pop(),
        downs.pop(),
    ) {
        if !a.undeclared.iter().any(|g| g == "qkv") {
            GpuResident::launch_together(&[&q, &k, &v]);
        }
        if !a.undeclared.iter().any(|g| g == "gate_up") {
            GpuResident::launch_together(&[&g, &u]);
        }
        layers.push(LayerWeights {
            qkv: [q, k, v],
            o,
            gate_up: [g, u],
            down: d,
        });
    }
    Ok(layers)
}

fn buffers(stream: &Arc<CudaStream>, a: &Args, capacity: usize) -> Res<Buffers> {
    let r = a.rows;
    let (h, q, kv) = (a.hidden, a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let filled = |n: usize, seed: u64| -> Res<CudaSlice<bf16>> {
        Ok(stream.clone_htod(&activations(n, seed))?)
    };
    let near_one: Vec<bf16> = activations(h, 9)
        .iter()
        .map(|v| bf16::from_f32(1.0 + 0.1 * v.to_f32()))
        .collect();
    let zeros = |n: usize| stream.alloc_zeros::<bf16>(n);
    Ok(Buffers {
        x: filled(r * h, 1)?,
        h: filled(r * h, 2)?,
        qkv: zeros(r * (q + 2 * kv))?,
        q: zeros(r * q)?,
        cache: filled(2 * kv * capacity, 3)?,
        attn: zeros(r * q)?,
        o_out: zeros(r * h)?,
        x_attn: zeros(r * h)?,
        h_attn: zeros(r * h)?,
        gate_up: zeros(2 * r * a.mlp)?,
        act: zeros(r * a.mlp)?,
        mlp_out: zeros(r * h)?,
        norm_w: stream.clone_htod(&near_one)?,
        cos_sin: filled(r * a.head_dim, 4)?,
    })
}

fn main() -> Res<()> {
    let a = parse_args()?;
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    let device = ctx.name()?;
    let mut kernels = common::kernels(&stream, &a.defines)?;
    let mut decoder = DecoderKernels::new(stream.clone())?;
    let layers = load_layers(&kernels, &a)?;
    let capacity = a.context.next_multiple_of(64);
    let (q, kv) = (a.heads * a.head_dim, a.kv_heads * a.head_dim);
    let rope = RopeKvShape {
        rows: a.rows,
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
        kv_capacity: capacity,
        start: a.context - a.rows,
        offsets: [0, a.rows * q, a.rows * (q + kv)],
    };
    let attention = AttentionShape {
        rows: a.rows,
        heads: a.heads,
        kv_heads: a.kv_heads,
        total: a.context,
        kv_capacity: capacity,
        head_dim: a.head_dim,
    };
    println!(
        "device: {device}; layer: hidden {}, heads {} / {} of {}, mlp {}; context {}, rows {}; \
         {} layers a chain over {} weight copies; median of {}; us per layer; GEMV defines {:?}",
        a.hidden,
        a.heads,
        a.kv_heads,
        a.head_dim,
        a.mlp,
        a.context,
        a.rows,
        a.layers,
        a.copies,
        a.iters,
        a.defines
    );
    let small: Vec<Op> = LAYER
        .iter()
        .copied()
        .filter(|op| !GEMVS.contains(op))
        .collect();
    let without = |left_out: &[Op]| -> Vec<Op> {
        LAYER
            .iter()
            .copied()
            .filter(|op| !left_out.contains(op))
            .collect()
    };
    let plans: Vec<(String, Vec<Op>)> = [
        ("full layer".to_string(), LAYER.to_vec()),
        ("GEMVs only".into(), GEMVS.to_vec()),
        ("small ops only".into(), small.clone()),
        ("without rope + KV write".into(), without(&[Op::RopeKv])),
        ("without attention".into(), without(&[Op::Attention])),
        (
            "without both add + norms".into(),
            without(&[Op::AttnNorm, Op::MlpNorm]),
        ),
        ("without silu * up".into(), without(&[Op::SiluMul])),
    ]
    .into_iter()
    .chain(small.iter().map(|op| (format!("{op:?} alone"), vec![*op])))
    .collect();
    let mut report = serde_json::json!({
        "device": device, "rows": a.rows, "context": a.context, "defines": a.defines,
    });
    let mut results = Vec::new();
    for dependent in [true, false] {
        kernels.set_dependent_launch(dependent)?;
        decoder.set_dependent_launch(dependent)?;
        let dependent = kernels.dependent_launch();
        let mut chain = Chain {
            a: &a,
            kernels: &kernels,
            decoder: &decoder,
            layers: &layers,
            b: buffers(&stream, &a, capacity)?,
            rope,
            attention,
        };
        println!("dependent launch {}", if dependent { "on" } else { "off" });
        for (name, ops) in &plans {
            let exact = chain.time(&stream, ops, &GpuSelection::Exact)?;
            let draft = chain.time(&stream, ops, &GpuSelection::Draft)?;
            println!("  {name:<28} exact {exact:7.1}  draft {draft:7.1}");
            results.push(serde_json::json!({
                "dependent_launch": dependent, "plan": name,
                "ops": ops.iter().map(|op| format!("{op:?}")).collect::<Vec<_>>(),
                "exact_us": exact, "draft_us": draft,
            }));
        }
    }
    report["plans"] = results.into();
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
