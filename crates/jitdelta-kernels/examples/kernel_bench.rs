//! GPU kernel benchmark: bit-exactness against the CPU reference, decode throughput against the
//! device's copy bandwidth, and fused GEMV (exact, draft) against cuBLAS BF16 at batch 1, 4, 8,
//! all in one run on one card. Weights are synthetic with real-weight statistics (a Gaussian
//! core with 0.1% of 8x-wider outliers, per-row scales), built on the host, uploaded once.
//!
//! `kernel_bench [--iters N] [--json FILE] [--define GEMV_MIN_BLOCKS=2]... [--jd FILE]...
//! [--shapes RxC,...] [--zeros FRACTION]`
//! `--zeros` sets that fraction of the weights to exact zeros, which the resident layout stores
//! as escapes (a dequantized GGUF has ~0.24% escapes, mostly zeros; a BF16 checkpoint ~0.01%).
//! Each `--jd` file's BF16 matrices are checked bit-exact (decode) and against the GEMV
//! reference. `scripts/gpu-kernels.sh` builds this, carries it to the GPU machine and runs it.

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, PushKernelArg};
use half::bf16;
use jitdelta_format::{FloatFormat, JdFile, ResidentTensor};
use jitdelta_kernels::gpu::{GemvClass, GpuResident, GpuSelection, Kernels};
use jitdelta_kernels::reference::{decode_bf16, gemv, gemv_error, ChunkSelection};
use std::sync::Arc;

mod common;
use common::{activations, synthetic};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const SHAPES: [(usize, usize); 6] = [
    (4096, 4096),
    (14336, 4096),
    (4096, 14336),
    (8192, 8192),
    (28672, 8192),
    (8192, 28672),
];
const BATCHES: [usize; 3] = [1, 4, 8];
const CHUNK_ROWS: usize = 64;
/// The back-to-back timing runs over copies of a tensor totalling at least this many BF16
/// bytes, so no launch finds its weights in L2 (50 MB on an H100).
const SEQUENCE_BYTES: usize = 256 << 20;

struct Args {
    iters: usize,
    json: Option<String>,
    defines: Vec<String>,
    jd: Vec<String>,
    shapes: Vec<(usize, usize)>,
    zeros: f32,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        iters: 50,
        json: None,
        defines: Vec::new(),
        jd: Vec::new(),
        shapes: SHAPES.to_vec(),
        zeros: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--iters" => a.iters = value()?.parse()?,
            "--json" => a.json = Some(value()?),
            "--define" => a.defines.push(value()?),
            "--jd" => a.jd.push(value()?),
            "--zeros" => a.zeros = value()?.parse()?,
            "--shapes" => {
                a.shapes = value()?
                    .split(',')
                    .map(|s| {
                        let (r, c) = s.split_once('x').ok_or("shape is RxC")?;
                        Ok((r.parse()?, c.parse()?))
                    })
                    .collect::<Res<_>>()?
            }
            _ => return Err(format!("unknown argument {flag}").into()),
        }
    }
    Ok(a)
}

/// How the L2 cache is emptied before each timed run.
#[derive(Clone, Copy, Debug)]
enum Flush {
    /// Read 256 MB (a cuBLAS f32 GEMV over it): L2 ends up holding clean lines, as after the
    /// previous layer's weight reads in a real decode step.
    Read,
    /// memset 256 MB: L2 ends up full of dirty lines, whose write-back the timed kernel then
    /// pays for (the usual `cache.zero_()` method; charges ~L2-size of extra DRAM writes).
    Write,
}

struct Timer {
    stream: Arc<CudaStream>,
    blas: Arc<CudaBlas>,
    /// 8192 x 8192 f32 (256 MB), with the GEMV's x and y.
    flush: (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>),
    iters: usize,
}

const FLUSH_SIDE: usize = 8192;

impl Timer {
    fn new(stream: &Arc<CudaStream>, blas: Arc<CudaBlas>, iters: usize) -> Res<Self> {
        Ok(Self {
            flush: (
                stream.alloc_zeros::<f32>(FLUSH_SIDE * FLUSH_SIDE)?,
                stream.alloc_zeros::<f32>(FLUSH_SIDE)?,
                stream.alloc_zeros::<f32>(FLUSH_SIDE)?,
            ),
            stream: stream.clone(),
            blas,
            iters,
        })
    }

    fn flush(&mut self, how: Flush) -> Res<()> {
        let (a, x, y) = &mut self.flush;
        match how {
            Flush::Write => self.stream.memset_zeros(a)?,
            Flush::Read => {
                let n = FLUSH_SIDE as i32;
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: n,
                    n: 1,
                    k: n,
                    alpha: 1.0f32,
                    lda: n,
                    ldb: n,
                    beta: 0.0,
                    ldc: n,
                };
                // SAFETY: a is n x n, x and y hold n values.
                unsafe { self.blas.gemm(cfg, &*a, &*x, y) }?;
            }
        }
        Ok(())
    }

    /// Median microseconds of `f`, with L2 flushed (`how`) before every run.
    fn time(&mut self, how: Flush, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
        let ctx = self.stream.context().clone();
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f()?;
        let mut t = Vec::with_capacity(self.iters);
        for _ in 0..self.iters {
            self.flush(how)?;
            start.record(&self.stream)?;
            f()?;
            end.record(&self.stream)?;
            end.synchronize()?;
            t.push(start.elapsed_ms(&end)? as f64 * 1000.0);
        }
        t.sort_by(f64::total_cmp);
        Ok(t[t.len() / 2])
    }

    /// Median microseconds per call of `f(0), f(1), .., f(n - 1)` launched back to back (after
    /// a read flush): like consecutive layers of a forward pass, each launch's fixed cost
    /// overlaps the previous one's work. Each `f(i)` must read its own weights.
    fn time_sequence(&mut self, n: usize, mut f: impl FnMut(usize) -> Res<()>) -> Res<f64> {
        let total = self.time(Flush::Read, || (0..n).try_for_each(&mut f))?;
        Ok(total / n as f64)
    }

    /// Median microseconds of `f` after a read flush and after a write flush.
    fn time_both(&mut self, mut f: impl FnMut() -> Res<()>) -> Res<(f64, f64)> {
        Ok((
            self.time(Flush::Read, &mut f)?,
            self.time(Flush::Write, &mut f)?,
        ))
    }
}

/// The plainest possible reads of a buffer: what any kernel that must read `bytes` bytes in
/// one launch cannot beat on this card (best of several launch shapes, so no single shape's
/// tuning sets the bound).
const READ_FLOOR_SOURCE: &str = r#"
typedef unsigned long long u64;
template <int U>
__device__ __forceinline__ void read_all(const uint4* __restrict__ p, u64 n, unsigned* out) {
    unsigned acc = 0;
    const u64 stride = (u64)gridDim.x * blockDim.x * U;
    for (u64 i = (u64)blockIdx.x * blockDim.x * U + threadIdx.x; i < n; i += stride) {
        uint4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const u64 j = i + (u64)u * blockDim.x;
            v[u] = j < n ? __ldg(p + j) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    // Rarely true, but the loads cannot be dropped.
    if (acc == 0x9E3779B9u) out[0] = acc;
}
extern "C" __global__ void read_x4(const uint4* p, u64 n, unsigned* out) { read_all<4>(p, n, out); }
extern "C" __global__ void read_x8(const uint4* p, u64 n, unsigned* out) { read_all<8>(p, n, out); }

// The fused GEMV's loads and nothing else: planes P, S (and L when `exact`) of `plane` bytes
// each, rows of cols / 2 bytes one after another; a block per 16-row tile, WARPS warps taking
// 256-column steps in turn, lane (g, t) loading two 16-byte vectors of rows g and g + 8 from
// column 64 t of a step, all of a step's loads issued before any is used. No escape warp, and
// fewer registers than the GEMV (more blocks may share an SM when a launch has more than one
// wave of the GEMV's): what the access pattern costs without the decode and the products.
template <int WARPS>
__device__ __forceinline__ void gemv_loads(const unsigned char* __restrict__ buf, u64 plane, unsigned rows,
                                           unsigned cols, int exact, unsigned* out) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3u;
    const unsigned ra = blockIdx.x * 16 + g, rb = ra + 8;
    const u64 row_a = (u64)ra * (cols / 2), row_b = (u64)rb * (cols / 2);
    const uint4 z = make_uint4(0, 0, 0, 0);
    unsigned acc = 0;
    for (unsigned s = warp; s * 256 < cols; s += WARPS) {
        uint4 v[12];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const unsigned c = s * 256 + t * 64 + 32 * j;
            const bool a = c < cols && ra < rows, b = c < cols && rb < rows;
#pragma unroll
            for (int q = 0; q < 3; ++q) {
                const bool used = q < 2 || exact;
                const unsigned char* base = buf + q * plane;
                v[6 * j + 2 * q] = a && used ? __ldg(reinterpret_cast<const uint4*>(base + row_a + c / 2)) : z;
                v[6 * j + 2 * q + 1] = b && used ? __ldg(reinterpret_cast<const uint4*>(base + row_b + c / 2)) : z;
            }
        }
#pragma unroll
        for (int k = 0; k < 12; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    if (acc == 0x9E3779B9u) out[0] = acc;
}
extern "C" __global__ void __launch_bounds__(256, 2)
loads_w8(const unsigned char* buf, u64 plane, unsigned rows, unsigned cols, int exact, unsigned* out) {
    gemv_loads<8>(buf, plane, rows, cols, exact, out);
}
extern "C" __global__ void __launch_bounds__(128, 4)
loads_w4(const unsigned char* buf, u64 plane, unsigned rows, unsigned cols, int exact, unsigned* out) {
    gemv_loads<4>(buf, plane, rows, cols, exact, out);
}
"#;

struct ReadFloor {
    kernels: Vec<(cudarc::driver::CudaFunction, u32)>,
    /// The GEMV's load pattern alone, with 8 and with 4 warps a block.
    loads: [(cudarc::driver::CudaFunction, u32); 2],
    sms: u32,
    buf: CudaSlice<u8>,
    out: CudaSlice<u32>,
}

impl ReadFloor {
    fn new(stream: &Arc<CudaStream>, max_bytes: usize) -> Res<Self> {
        let module = jitdelta_kernels::gpu::compile(stream, READ_FLOOR_SOURCE, &[])?;
        let sms = stream.context().attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as u32;
        Ok(Self {
            kernels: vec![
                (module.load_function("read_x4")?, 4),
                (module.load_function("read_x8")?, 8),
            ],
            loads: [
                (module.load_function("loads_w8")?, 8),
                (module.load_function("loads_w4")?, 4),
            ],
            sms,
            // Not zeros: nothing on the way may get to skip them.
            buf: stream.clone_htod(
                &(0..max_bytes.next_multiple_of(16) as u64)
                    .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                    .collect::<Vec<u8>>(),
            )?,
            out: stream.alloc_zeros::<u32>(1)?,
        })
    }

    /// Median microseconds of the fastest launch shape reading the first `bytes` bytes.
    fn time(&mut self, timer: &mut Timer, bytes: usize) -> Res<f64> {
        let n = bytes.div_ceil(16) as u64;
        let stream = timer.stream.clone();
        let mut best = f64::INFINITY;
        for (f, unroll) in &self.kernels {
            for threads in [256u32, 512] {
                let one_pass = n.div_ceil((threads * unroll) as u64) as u32;
                for blocks in [one_pass, 2 * self.sms, 4 * self.sms, 8 * self.sms] {
                    let cfg = cudarc::driver::LaunchConfig {
                        grid_dim: (blocks.max(1), 1, 1),
                        block_dim: (threads, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    let (buf, out) = (&self.buf, &mut self.out);
                    let us = timer.time(Flush::Read, || {
                        let mut b = stream.launch_builder(f);
                        b.arg(buf).arg(&n).arg(&mut *out);
                        // SAFETY: the kernel reads n <= buf.len() / 16 vectors and writes out[0].
                        unsafe { b.launch(cfg) }?;
                        Ok(())
                    })?;
                    best = best.min(us);
                }
            }
        }
        Ok(best)
    }

    /// Median microseconds of the GEMV's loads alone (no decode, no product) over the planes of
    /// a `rows x cols` tensor, exact (3 planes) or draft (2), with 8 and with 4 warps a block.
    /// The buffer must hold 3 planes of `rows * cols / 2` bytes, and `cols % 32 == 0`.
    fn gemv_loads(
        &mut self,
        timer: &mut Timer,
        rows: usize,
        cols: usize,
        exact: bool,
    ) -> Res<[f64; 2]> {
        let plane = (rows * cols / 2) as u64;
        if cols % 32 != 0 || 3 * plane > self.buf.len() as u64 {
            return Err(format!("no load-pattern probe for {rows}x{cols}").into());
        }
        let stream = timer.stream.clone();
        let (rows, cols, exact) = (rows as u32, cols as u32, exact as i32);
        let mut times = [0.0; 2];
        for ((f, warps), time) in self.loads.iter().zip(&mut times) {
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (rows.div_ceil(16), 1, 1),
                block_dim: (32 * warps, 1, 1),
                shared_mem_bytes: 0,
            };
            let (buf, out) = (&self.buf, &mut self.out);
            *time = timer.time(Flush::Read, || {
                let mut b = stream.launch_builder(f);
                b.arg(buf)
                    .arg(&plane)
                    .arg(&rows)
                    .arg(&cols)
                    .arg(&exact)
                    .arg(&mut *out);
                // SAFETY: checked above: every load lies inside the three planes.
                unsafe { b.launch(cfg) }?;
                Ok(())
            })?;
        }
        Ok(times)
    }
}

fn poison(stream: &Arc<CudaStream>, buf: &mut CudaSlice<bf16>) -> Res<()> {
    let nan = vec![bf16::from_bits(0xFFFF); buf.len()];
    stream.memcpy_htod(&nan, buf)?;
    Ok(())
}

/// Decodes on the GPU into a poisoned buffer and compares every bit with the CPU reference.
fn check_decode(
    k: &Kernels,
    t: &ResidentTensor,
    g: &GpuResident,
    sel: &ChunkSelection,
    out: &mut CudaSlice<bf16>,
) -> Res<bool> {
    let (rows, cols) = t.dims();
    let mut want = vec![bf16::ZERO; rows * cols];
    decode_bf16(t, sel, &mut want)?;
    poison(k.stream(), out)?;
    let gs = k.selection(g, sel)?;
    k.decode(g, &gs, &mut out.slice_mut(..rows * cols))?;
    let got = k.stream().clone_dtoh(&out.slice(..rows * cols))?;
    Ok(got
        .iter()
        .zip(&want)
        .all(|(a, b)| a.to_bits() == b.to_bits()))
}

/// Worst normalised GEMV error (<= 1 passes) for one selection and batch.
fn check_gemv(
    k: &Kernels,
    t: &ResidentTensor,
    g: &GpuResident,
    sel: &ChunkSelection,
    batch: usize,
) -> Res<f64> {
    let (rows, cols) = t.dims();
    let x = activations(batch * cols, 7 + batch as u64);
    let want = gemv(t, sel, &x, batch)?;
    let xd = k.stream().clone_htod(&x)?;
    let mut yd = k
        .stream()
        .clone_htod(&vec![bf16::from_bits(0xFFFF); batch * rows])?;
    let gs = k.selection(g, sel)?;
    k.gemv(g, &gs, &xd.as_view(), batch, &mut yd.as_view_mut())?;
    Ok(gemv_error(&k.stream().clone_dtoh(&yd)?, &want))
}

fn routed_flags(chunks: usize) -> ChunkSelection {
    ChunkSelection::Routed((0..chunks).map(|c| c % 3 == 0).collect())
}

fn main() -> Res<()> {
    let args = parse_args()?;
    let ctx = CudaContext::new(0)?;
    let stream = ctx.default_stream();
    let device = ctx.name()?;
    let defines = &args.defines;
    let kernels = common::kernels(&stream, defines)?;
    // The same kernels launched plainly: what programmatic dependent launch changes.
    let mut serial = common::kernels(&stream, defines)?;
    serial.set_dependent_launch(false)?;
    let blas = Arc::new(CudaBlas::new(stream.clone())?);
    let mut timer = Timer::new(&stream, blas.clone(), args.iters)?;
    println!(
        "device: {device}; kernel defines: {defines:?}; median of {} runs, L2 flushed by a 256 MB read \
         (in brackets: by a 256 MB memset, which leaves L2 dirty; in braces: launches back to back \
         over copies of the weights, per launch, then without programmatic dependent launch; \
         dependent launch {})",
        args.iters,
        if kernels.dependent_launch() { "on" } else { "off" }
    );
    let mut report =
        serde_json::json!({ "device": device, "defines": defines, "iters": args.iters });

    // Copy bandwidth: device-to-device copy of the largest BF16 matrix (read + write).
    let biggest = args
        .shapes
        .iter()
        .map(|(r, c)| r * c)
        .max()
        .unwrap_or(1 << 20);
    let src = stream.alloc_zeros::<bf16>(biggest)?;
    let mut dst = stream.alloc_zeros::<bf16>(biggest)?;
    let copy_us = timer.time(Flush::Read, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let copy_gbs = (biggest * 4) as f64 / copy_us / 1e3;
    println!(
        "copy {} MB bf16: {copy_us:.1} us = {copy_gbs:.0} GB/s (read + write)",
        (biggest * 2) >> 20
    );
    report["copy_gbs"] = copy_gbs.into();
    drop(src);

    let mut floor = ReadFloor::new(&stream, biggest * 2)?;
    let mut shapes = Vec::new();
    let mut all_ok = true;
    for &(rows, cols) in &args.shapes {
        let w = synthetic(rows, cols, (rows * 31 + cols) as u64, args.zeros);
        let bytes: &[u8] = bytemuck::cast_slice(&w);
        let t = ResidentTensor::from_exact(FloatFormat::BF16, rows, cols, CHUNK_ROWS, 3, bytes)?;
        let g = kernels.upload(&t)?;
        let dense = stream.clone_htod(&w)?;
        // More copies for the back-to-back timing (the same number for cuBLAS and ours).
        let copies = SEQUENCE_BYTES.div_ceil(rows * cols * 2).max(2);
        let gs = (1..copies)
            .map(|_| kernels.upload(&t))
            .collect::<Result<Vec<_>, _>>()?;
        let denses = (1..copies)
            .map(|_| stream.clone_htod(&w))
            .collect::<Result<Vec<_>, _>>()?;
        let g_copy = |i: usize| if i == 0 { &g } else { &gs[i - 1] };
        let dense_copy = |i: usize| if i == 0 { &dense } else { &denses[i - 1] };
        let held = g.bytes_held() as f64 / (rows * cols * 2) as f64;

        // Bit-exactness and GEMV correctness.
        let sels = [
            ChunkSelection::Exact,
            ChunkSelection::Draft,
            routed_flags(t.chunk_count()),
        ];
        let mut exact_ok = true;
        for sel in &sels {
            exact_ok &= check_decode(&kernels, &t, &g, sel, &mut dst)?;
        }
        let mut gemv_err = 0f64;
        for sel in &sels {
            for batch in BATCHES {
                gemv_err = gemv_err.max(check_gemv(&kernels, &t, &g, sel, batch)?);
            }
        }
        all_ok &= exact_ok && gemv_err <= 1.0;

        // Timings.
        let (exact, draft) = (GpuSelection::Exact, GpuSelection::Draft);
        let mut out = dst.slice_mut(..rows * cols);
        let (decode_us, decode_dirty_us) =
            timer.time_both(|| Ok(kernels.decode(&g, &exact, &mut out)?))?;
        let decode_gbs = (rows * cols * 2) as f64 / decode_us / 1e3;
        let decode_dirty_gbs = (rows * cols * 2) as f64 / decode_dirty_us / 1e3;
        // What a single launch must spend reading each layout's bytes.
        let bf16_floor_us = floor.time(&mut timer, rows * cols * 2)?;
        let exact_floor_us = floor.time(&mut timer, rows * cols * 3 / 2)?;
        let draft_floor_us = floor.time(&mut timer, rows * cols)?;
        let exact_loads_us = floor.gemv_loads(&mut timer, rows, cols, true)?;
        let draft_loads_us = floor.gemv_loads(&mut timer, rows, cols, false)?;
        let mut cublas_b1_us = f64::NAN;
        let mut per_batch = Vec::new();
        for batch in BATCHES {
            let x = stream.clone_htod(&activations(batch * cols, batch as u64))?;
            let mut y = stream.alloc_zeros::<bf16>(batch * rows)?;
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: rows as i32,
                n: batch as i32,
                k: cols as i32,
                alpha: bf16::ONE,
                lda: cols as i32,
                ldb: cols as i32,
                beta: bf16::ZERO,
                ldc: rows as i32,
            };
            // SAFETY: W is rows x cols row-major (= cols x rows column-major), x is batch x cols,
            // y is batch x rows; all buffers are that size.
            let (cublas_us, cublas_dirty_us) =
                timer.time_both(|| Ok(unsafe { blas.gemm(cfg, &dense, &x, &mut y) }?))?;
            if batch == 1 {
                cublas_b1_us = cublas_us;
            }
            let (exact_us, exact_dirty_us) = timer.time_both(|| {
                Ok(kernels.gemv(&g, &exact, &x.as_view(), batch, &mut y.as_view_mut())?)
            })?;
            let (draft_us, draft_dirty_us) = timer.time_both(|| {
                Ok(kernels.gemv(&g, &draft, &x.as_view(), batch, &mut y.as_view_mut())?)
            })?;
            // SAFETY: as above, for each copy.
            let cublas_seq_us = timer.time_sequence(copies, |i| {
                Ok(unsafe { blas.gemm(cfg, dense_copy(i), &x, &mut y) }?)
            })?;
            let exact_seq_us = timer.time_sequence(copies, |i| {
                Ok(kernels.gemv(g_copy(i), &exact, &x.as_view(), batch, &mut y.as_view_mut())?)
            })?;
            let draft_seq_us = timer.time_sequence(copies, |i| {
                Ok(kernels.gemv(g_copy(i), &draft, &x.as_view(), batch, &mut y.as_view_mut())?)
            })?;
            let exact_serial_us = timer.time_sequence(copies, |i| {
                Ok(serial.gemv(g_copy(i), &exact, &x.as_view(), batch, &mut y.as_view_mut())?)
            })?;
            let draft_serial_us = timer.time_sequence(copies, |i| {
                Ok(serial.gemv(g_copy(i), &draft, &x.as_view(), batch, &mut y.as_view_mut())?)
            })?;
            println!(
                "{rows:>5}x{cols:<5} b{batch}: cuBLAS {cublas_us:6.1} us [{cublas_dirty_us:6.1}] {{{cublas_seq_us:6.1}}} | exact {exact_us:6.1} us ({:.2}x) [{:.2}x] {{{:.2}x / {:.2}x}} | draft {draft_us:6.1} us ({:.2}x) [{:.2}x] {{{:.2}x / {:.2}x}}",
                cublas_us / exact_us,
                cublas_dirty_us / exact_dirty_us,
                cublas_seq_us / exact_seq_us,
                cublas_seq_us / exact_serial_us,
                cublas_us / draft_us,
                cublas_dirty_us / draft_dirty_us,
                cublas_seq_us / draft_seq_us,
                cublas_seq_us / draft_serial_us,
            );
            per_batch.push(serde_json::json!({
                "batch": batch, "cublas_us": cublas_us, "exact_us": exact_us, "draft_us": draft_us,
                "exact_speedup": cublas_us / exact_us, "draft_speedup": cublas_us / draft_us,
                "back_to_back": {
                    "copies": copies, "cublas_us": cublas_seq_us, "exact_us": exact_seq_us,
                    "draft_us": draft_seq_us, "exact_speedup": cublas_seq_us / exact_seq_us,
                    "draft_speedup": cublas_seq_us / draft_seq_us,
                    "exact_serial_us": exact_serial_us, "draft_serial_us": draft_serial_us,
                },
                "dirty_flush": {
                    "cublas_us": cublas_dirty_us, "exact_us": exact_dirty_us, "draft_us": draft_dirty_us,
                    "exact_speedup": cublas_dirty_us / exact_dirty_us,
                    "draft_speedup": cublas_dirty_us / draft_dirty_us,
                },
            }));
        }
        let class = kernels.gemv_class(&g);
        println!(
            "{rows:>5}x{cols:<5}: {:?} class{}, bit-exact decode {exact_ok}, gemv error {gemv_err:.3} (<= 1 passes), escapes {:.4}%, held {:.2}% of BF16, decode {decode_us:.1} us = {decode_gbs:.0} GB/s ({:.0}% of copy) [{decode_dirty_gbs:.0} GB/s, {:.0}%]",
            class,
            match class {
                GemvClass::Tall => format!(" (exact at {} blocks per SM)", kernels.tall_blocks_per_sm(&g)),
                _ => String::new(),
            },
            100.0 * t.escape_count() as f64 / (rows * cols) as f64,
            100.0 * held,
            100.0 * decode_gbs / copy_gbs,
            100.0 * decode_dirty_gbs / copy_gbs
        );
        println!(
            "{rows:>5}x{cols:<5}: read floor (one launch, best of 16 shapes) bf16 {bf16_floor_us:.1} us (cuBLAS b1 {:.0}% slower), exact planes {exact_floor_us:.1} us, draft planes {draft_floor_us:.1} us: at most {:.2}x exact, {:.2}x draft against cuBLAS b1",
            100.0 * (cublas_b1_us / bf16_floor_us - 1.0),
            cublas_b1_us / exact_floor_us,
            cublas_b1_us / draft_floor_us,
        );
        println!(
            "{rows:>5}x{cols:<5}: the GEMV's loads alone (8 / 4 warps a block): exact {:.1} / {:.1} us, draft {:.1} / {:.1} us",
            exact_loads_us[0], exact_loads_us[1], draft_loads_us[0], draft_loads_us[1],
        );
        shapes.push(serde_json::json!({
            "read_floor_us": { "bf16": bf16_floor_us, "exact_planes": exact_floor_us, "draft_planes": draft_floor_us },
            "gemv_loads_us": { "exact_w8_w4": exact_loads_us, "draft_w8_w4": draft_loads_us },
            "rows": rows, "cols": cols, "class": format!("{class:?}"),
            "bit_exact": exact_ok, "gemv_error": gemv_err,
            "escapes": t.escape_count(), "held_fraction_of_bf16": held,
            "decode_us": decode_us, "decode_gbs": decode_gbs,
            "decode_dirty_flush_us": decode_dirty_us, "decode_dirty_flush_gbs": decode_dirty_gbs,
            "batches": per_batch,
        }));
    }
    report["shapes"] = shapes.into();

    // Real weights: every BF16 matrix of each file, bit-exact decode and GEMV.
    let mut real = Vec::new();
    for path in &args.jd {
        let jd = JdFile::open(path)?;
        let (mut tensors, mut exact_ok, mut worst) = (0usize, true, 0f64);
        let names: Vec<String> = jd.tensor_names().map(str::to_owned).collect();
        for name in names {
            let view = jd.tensor(&name)?;
            if view.format() != Some(FloatFormat::BF16) {
                continue;
            }
            let t = view.to_resident(3)?;
            let g = kernels.upload(&t)?;
            let (rows, cols) = t.dims();
            let original = view.decode_exact()?;
            let mut out = stream.alloc_zeros::<bf16>(rows * cols)?;
            poison(&stream, &mut out)?;
            kernels.decode(&g, &GpuSelection::Exact, &mut out.as_view_mut())?;
            let got: Vec<bf16> = stream.clone_dtoh(&out)?;
            exact_ok &= bytemuck::cast_slice::<bf16, u8>(&got) == original.as_slice();
            if cols % 32 == 0 {
                for sel in [ChunkSelection::Exact, ChunkSelection::Draft] {
                    worst = worst.max(check_gemv(&kernels, &t, &g, &sel, 3)?);
                }
            }
            tensors += 1;
        }
        println!("{path}: {tensors} BF16 matrices, decode bit-exact {exact_ok}, worst gemv error {worst:.3}");
        all_ok &= exact_ok && worst <= 1.0;
        real.push(serde_json::json!({ "file": path, "tensors": tensors, "bit_exact": exact_ok, "gemv_error": worst }));
    }
    report["real"] = real.into();
    report["all_ok"] = all_ok.into();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    println!("all checks passed: {all_ok}");
    if !all_ok {
        std::process::exit(1);
    }
    Ok(())
}
