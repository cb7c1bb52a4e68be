//! The CUDA side: kernels compiled at run time with NVRTC, tensors held on the device.

use crate::attention::{AttentionShape, MAX_HEAD_DIM};
use crate::decoder_ops::{self, RopeKvShape};
use crate::device_layout::DeviceLayout;
use crate::reference::ChunkSelection;
use crate::{Error, Result};
use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use half::bf16;
use jitdelta_format::ResidentTensor;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

const SOURCE: &str = concat!(include_str!("pdl.cuh"), include_str!("kernels.cu"));
const ATTENTION_SOURCE: &str = concat!(include_str!("pdl.cuh"), include_str!("attention.cu"));
/// Set to `0` to launch the kernels without programmatic dependent launch (a diagnostic switch
/// for A/B runs; see [`Kernels::set_dependent_launch`]).
pub const DEPENDENT_LAUNCH_ENV: &str = "JITDELTA_DEPENDENT_LAUNCH";
const ATTENTION_THREADS: u32 = 4 * 32;
/// Positions a block of the decode attention takes (`ATTN_SPLIT` in `attention.cu`).
const ATTENTION_SPLIT: u32 = 64;
/// `NORM_THREADS` in `attention.cu`.
const NORM_THREADS: u32 = 1024;
const ELEMENTWISE_THREADS: u32 = 256;
/// Threads of the one block of `jd_logit_stats_f32` (its `STATS_THREADS`).
const STATS_THREADS: u32 = 1024;
/// Largest activation batch the fused GEMV takes (one mma.m16n8k16 column block).
pub const MAX_GEMV_BATCH: usize = 8;
const GEMV_TILE_ROWS: usize = 16;
const GEMV_WARPS: u32 = 8;
const DECODE_THREADS: u32 = 256;
/// Words of each plane a decode thread takes (`DECODE_WORDS` in `kernels.cu`).
const DECODE_WORDS: u32 = 2;
/// Shared memory per warp and pipeline stage of the cp.async GEMV: 3 planes x 16 rows x 128 bytes.
const GEMV_SLOT_BYTES: u32 = 3 * 16 * 128;

/// The variant of the fused GEMV for tensors of at least this many weights (see
/// [`Kernels::new`]).
pub const LARGE_GEMV_WEIGHTS: usize = 100 << 20;
/// Its tuning defines for exact and routed selections: the cp.async ring, 4 warps, 2 blocks per
/// SM (docs/benchmarks.md: 1.31x and 1.27x cuBLAS at batch 1 on the 70B MLP shapes against
/// 1.23x and 1.22x). The ring's 72 KiB a block leave room for two blocks on an H100 or H200,
/// not three (one on an A100 or a consumer card: [`Kernels::new`] leaves it out there).
const LARGE_GEMV_DEFINES: &[&str] = &["GEMV_STAGES=3", "GEMV_WARPS=4", "GEMV_MIN_BLOCKS=2"];
/// Registers, 4 warps, 4 blocks per SM: the draft of large tensors (3-10% faster than the ring
/// on the 70B shapes), and tall tensors below [`LARGE_GEMV_WEIGHTS`]: their draft, and their
/// exact and routed launches where 3 blocks would fill the waves worse (draft 1.62x -> 1.77x
/// cuBLAS at 14336x4096, exact 1.17x -> 1.21x; docs/benchmarks.md). The same 4
/// warps split the columns the same way in all these kernels, so routed rows equal the exact or
/// draft kernel's bit for bit.
const FOUR_WARP_DEFINES: &[&str] = &["GEMV_WARPS=4", "GEMV_MIN_BLOCKS=4"];
/// Exact and routed launches of the tall class whose waves 3 blocks per SM fill at least as
/// well as 4 ([`Kernels::tall_blocks_per_sm`]): the same 4 warps at 128 registers, where a
/// step's plane loads leave together (at 4 blocks' 96 they go in two runs: two DRAM round trips
/// a step). The draft stays at 4 blocks: its loads leave together there already.
const TALL_THREE_BLOCK_DEFINES: &[&str] = &["GEMV_WARPS=4", "GEMV_MIN_BLOCKS=3"];
/// Blocks per SM of the default variant (its `GEMV_MIN_BLOCKS`): launches of more tiles than
/// this many per SM are tall ([`Kernels::tall_tiles`]).
const DEFAULT_BLOCKS_PER_SM: u32 = 2;

/// The size classes of the fused GEMV ([`Kernels::gemv_class`]); each sums a row in its own
/// order, the same for every batch size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvClass {
    /// 8 warps, 2 blocks per SM: launches that fit in one wave of those.
    Default,
    /// 4 warps, 3 or 4 blocks per SM ([`Kernels::tall_blocks_per_sm`], the same sums):
    /// launches of more tiles than [`Kernels::tall_tiles`].
    Tall,
    /// Tensors of [`LARGE_GEMV_WEIGHTS`] or more: exact and routed through a shared-memory
    /// ring, the draft as the tall class.
    Large,
}

/// One fused-GEMV kernel and its launch shape.
#[derive(Clone, Debug)]
struct GemvLaunch {
    name: &'static str,
    function: CudaFunction,
    threads: u32,
    smem: u32,
    /// Blocks of it that fit on one SM of the device, and how many its size class counts on
    /// (its `GEMV_MIN_BLOCKS`).
    blocks_per_sm: u32,
    wanted_blocks: u32,
}

impl GemvLaunch {
    /// Kernel `name` of `module`, compiled with `defines` (the launch shape must match the
    /// kernel's GEMV_WARPS and GEMV_STAGES).
    fn load(
        module: &Arc<cudarc::driver::CudaModule>,
        defines: &[&str],
        name: &'static str,
    ) -> Result<Self> {
        let warps = launch_define(defines, "GEMV_WARPS", GEMV_WARPS)?;
        let stages = define_value(defines, "GEMV_STAGES")?.unwrap_or(0);
        let wanted_blocks =
            define_value(defines, "GEMV_MIN_BLOCKS")?.unwrap_or(DEFAULT_BLOCKS_PER_SM);
        let smem = stages * warps * GEMV_SLOT_BYTES;
        let function = module.load_function(name)?;
        // Static and dynamic shared memory together past 48 KiB need the opt-in; a ring whose
        // dynamic part alone stays under it (2 stages x 4 warps: 48 KiB + 11.6 KiB static)
        // failed to launch without it. A device refuses sizes past its own limit: then no
        // block fits.
        let opted_in = smem == 0
            || function
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .is_ok();
        // One more warp computes the escape corrections.
        let threads = (warps + 1) * 32;
        let blocks_per_sm = if opted_in {
            function.occupancy_max_active_blocks_per_multiprocessor(threads, smem as usize, None)?
        } else {
            0
        };
        Ok(Self {
            name,
            function,
            threads,
            smem,
            blocks_per_sm,
            wanted_blocks,
        })
    }
}

/// The fused GEMV for one class of tensor sizes: a kernel for routed selections (mode read at
/// run time), one specialised per whole-tensor mode, and the grouped (several tensors of one
/// input) kernels of those modes.
#[derive(Clone, Debug)]
struct GemvKernel {
    routed: GemvLaunch,
    exact: GemvLaunch,
    draft: GemvLaunch,
    group_exact: GemvLaunch,
    group_draft: GemvLaunch,
}

impl GemvKernel {
    /// All kernels from one module compiled with `defines`.
    fn load(module: &Arc<cudarc::driver::CudaModule>, defines: &[&str]) -> Result<Self> {
        let load = |name: &'static str| GemvLaunch::load(module, defines, name);
        Ok(Self {
            routed: load("jd_gemv_bf16")?,
            exact: load("jd_gemv_bf16_exact")?,
            draft: load("jd_gemv_bf16_draft")?,
            group_exact: load("jd_gemv_group_bf16_exact")?,
            group_draft: load("jd_gemv_group_bf16_draft")?,
        })
    }

    /// An [`Error::Occupancy`] unless every kernel fits the blocks per SM its class counts on
    /// (the tall-class rule and the wave arithmetic of [`Kernels::tall_blocks_per_sm`] assume
    /// them; registers are split among an SM's 4 schedulers, so 9 warps x 2 blocks cannot use
    /// more than 96 registers, and a ring's shared memory may leave room for fewer blocks).
    fn check_fits(&self) -> Result<()> {
        let launches = [
            &self.routed,
            &self.exact,
            &self.draft,
            &self.group_exact,
            &self.group_draft,
        ];
        match launches.iter().find(|l| l.blocks_per_sm < l.wanted_blocks) {
            Some(l) => Err(Error::Occupancy {
                kernel: l.name.to_string(),
                blocks: l.blocks_per_sm,
                wanted: l.wanted_blocks,
            }),
            None => Ok(()),
        }
    }

    /// Itself if its kernels fit the device ([`GemvKernel::check_fits`]).
    fn if_it_fits(self) -> Option<Self> {
        self.check_fits().is_ok().then_some(self)
    }

    /// The single-tensor kernel for `sel`.
    fn single(&self, sel: &GpuSelection) -> &GemvLaunch {
        match sel {
            GpuSelection::Exact => &self.exact,
            GpuSelection::Draft => &self.draft,
            GpuSelection::Routed(_) => &self.routed,
        }
    }

    /// The grouped kernel for `sel` (none for routed selections: their flags are per tensor).
    fn group(&self, sel: &GpuSelection) -> Option<&GemvLaunch> {
        match sel {
            GpuSelection::Exact => Some(&self.group_exact),
            GpuSelection::Draft => Some(&self.group_draft),
            GpuSelection::Routed(_) => None,
        }
    }
}

/// Most tensors one grouped GEMV launch takes (`GROUP_MAX` in `kernels.cu`).
pub const MAX_GEMV_GROUP: usize = 3;

/// One tensor of a grouped launch, laid out as `GemvMember` in `kernels.cu`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GroupMember {
    p: u64,
    s: u64,
    l: u64,
    bases: u64,
    esc_row_start: u64,
    esc_pos: u64,
    esc_corr: u64,
    y: u64,
    segment: u64,
    rows: u32,
    tiles_end: u32,
}

/// Kernel parameters for a raw launch (`cuLaunchKernelEx`, which cudarc's builder does not
/// expose with attributes): the values packed in one 8-byte aligned buffer, each parameter at
/// an offset the driver reads its bytes from. One allocation a launch: a decode step makes a
/// few hundred.
#[derive(Default)]
struct RawArgs {
    words: Vec<u64>,
    /// Word offset of each parameter in `words`.
    starts: Vec<usize>,
}

impl RawArgs {
    /// The next parameter, by value (integers, device addresses, `#[repr(C)]` structs).
    fn value<T: Copy>(&mut self, v: T) -> &mut Self {
        let size = std::mem::size_of::<T>();
        let at = self.words.len();
        self.words.resize(at + size.div_ceil(8), 0);
        // SAFETY: the words from `at` hold at least `size` bytes and do not overlap `v`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&v as *const T).cast::<u8>(),
                self.words[at..].as_mut_ptr().cast::<u8>(),
                size,
            )
        };
        self.starts.push(at);
        self
    }

    /// The next parameter, a buffer's device address. The launch runs on `stream`, the
    /// buffers' own: cudarc's cross-stream event bookkeeping has nothing to order.
    fn buffer<T>(&mut self, b: &impl DevicePtr<T>, stream: &CudaStream) -> &mut Self {
        let (ptr, _sync) = b.device_ptr(stream);
        self.value(ptr)
    }

    /// The parameter addresses `cuLaunchKernelEx` takes (valid while `self` is not changed).
    fn pointers(&mut self) -> Vec<*mut std::ffi::c_void> {
        let base = self.words.as_mut_ptr();
        // SAFETY: every start is inside `words`.
        self.starts
            .iter()
            .map(|&at| unsafe { base.add(at) }.cast())
            .collect()
    }
}

/// `GemvGroup` in `kernels.cu`, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GroupArgs {
    members: [GroupMember; MAX_GEMV_GROUP],
    count: u32,
}

/// The compiled kernels, bound to one stream.
#[derive(Debug)]
pub struct Kernels {
    launcher: Launcher,
    decode: CudaFunction,
    patch: CudaFunction,
    gemv: GemvKernel,
    /// The size classes of [`Kernels::new`]: tall, then large tensors.
    gemv_tall: Option<GemvKernel>,
    gemv_large: Option<GemvKernel>,
    /// The tall class's exact and routed kernels at 3 blocks per SM (the draft at 4).
    gemv_tall_three: Option<GemvKernel>,
    /// The device's SMs, which size the tall class's waves.
    sms: u32,
    /// The decode kernel's `DECODE_WORDS`.
    decode_words: u32,
}

impl Kernels {
    /// Compiles the kernels for the stream's device (compute capability 8.0 or newer), with
    /// three size classes of fused-GEMV variants: the default (8 warps, 2 blocks per SM); tall
    /// launches (more tiles than [`Kernels::tall_tiles`]: 4 warps, 4 blocks per SM or 3,
    /// [`Kernels::tall_blocks_per_sm`]); and tensors
    /// of [`LARGE_GEMV_WEIGHTS`] or more, whose exact and routed kernels stream the planes
    /// through shared memory and whose draft is the tall class's. The choice depends on the
    /// tensor (with the group it was declared to launch in, [`GpuResident::launch_together`]),
    /// the device's SM count and the selection, never on the batch, so every batch size sums a
    /// row the same way.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let mut kernels = Self::with_defines(stream, &[])?;
        let stream = &kernels.launcher.stream;
        let variant = |defines| -> Result<Option<GemvKernel>> {
            Ok(GemvKernel::load(&compile(stream, SOURCE, defines)?, defines)?.if_it_fits())
        };
        let (ring, three) = (
            variant(LARGE_GEMV_DEFINES)?,
            variant(TALL_THREE_BLOCK_DEFINES)?,
        );
        // A variant the device cannot hold at its blocks per SM is left out: its tensors take
        // the next class (the ring needs 2 x 85 KiB of shared memory an SM, more than an A100 or
        // a consumer card has).
        if let Some(four) = variant(FOUR_WARP_DEFINES)? {
            let with_draft = |k: GemvKernel| GemvKernel {
                draft: four.draft.clone(),
                group_draft: four.group_draft.clone(),
                ..k
            };
            kernels.gemv_large = ring.map(with_draft);
            kernels.gemv_tall_three = three.map(with_draft);
            kernels.gemv_tall = Some(four);
        }
        Ok(kernels)
    }

    /// The kernels compiled with extra `-D` macro definitions (tuning knobs such as
    /// `GEMV_MIN_BLOCKS=2`; see the top of `kernels.cu`) and one GEMV variant for every shape:
    /// what benchmarks and tests of a variant use.
    pub fn with_defines(stream: Arc<CudaStream>, defines: &[&str]) -> Result<Self> {
        // Knobs the host sizes launches by, checked before NVRTC sees them.
        let decode_words = launch_define(defines, "DECODE_WORDS", DECODE_WORDS)?;
        launch_define(defines, "GEMV_WARPS", GEMV_WARPS)?;
        let module = compile(&stream, SOURCE, defines)?;
        let sms = stream.context().attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?;
        let gemv = GemvKernel::load(&module, defines)?;
        gemv.check_fits()?;
        Ok(Self {
            gemv,
            gemv_tall: None,
            gemv_large: None,
            gemv_tall_three: None,
            sms: sms.max(1) as u32,
            decode: module.load_function("jd_decode_bf16")?,
            decode_words,
            patch: module.load_function("jd_patch_escapes")?,
            launcher: Launcher::new(stream)?,
        })
    }

    /// Whether fused GEMVs are launched with programmatic dependent launch (on by default on
    /// compute capability 9.0+ unless [`DEPENDENT_LAUNCH_ENV`] is `0`). A GEMV so launched may
    /// start while the previous kernel of the stream still runs and load its first planes
    /// before it waits for its input: the launch latency and the first DRAM round trip overlap
    /// the previous kernel. Results are the same bits either way.
    pub fn dependent_launch(&self) -> bool {
        self.launcher.dependent
    }

    /// Turns programmatic dependent launch of the fused GEMVs on or off (it stays off below
    /// compute capability 9.0, where the kernels' controls compile to nothing).
    pub fn set_dependent_launch(&mut self, on: bool) -> Result<()> {
        self.launcher.set_dependent(on)
    }

    /// Launches a fused GEMV of `blocks` tiles (dependently when that is on).
    ///
    /// # Safety
    /// As [`Launcher::launch`].
    unsafe fn launch_gemv(
        &self,
        kernel: &GemvLaunch,
        blocks: u32,
        args: &mut RawArgs,
    ) -> Result<()> {
        let mut config = grid((blocks, 1), kernel.threads);
        config.shared_mem_bytes = kernel.smem;
        // SAFETY: the caller's contract.
        unsafe { self.launcher.launch(&kernel.function, config, args, true) }
    }

    /// The stream every kernel runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.launcher.stream
    }

    /// Re-packs a resident tensor into the device layout and copies it to the device.
    pub fn upload(&self, t: &ResidentTensor) -> Result<GpuResident> {
        self.upload_layout(&DeviceLayout::from_resident(t)?)
    }

    /// Copies a tensor already in the device layout.
    pub fn upload_layout(&self, d: &DeviceLayout) -> Result<GpuResident> {
        let (rows, cols, chunk_rows) = d.dims;
        let s = &self.launcher.stream;
        Ok(GpuResident {
            rows: to_u32(rows, "rows")?,
            cols: to_u32(cols, "cols")?,
            chunk_rows: to_u32(chunk_rows, "chunk rows")?,
            chunks: d.bases.len(),
            segment: d.segment as u64,
            p: to_device(s, &d.p)?,
            s: to_device(s, &d.s)?,
            l: to_device(s, &d.l)?,
            bases: to_device(s, &d.bases)?,
            esc_pos: to_device(s, &d.escape_pos)?,
            esc_exp: to_device(s, &d.escape_exponent)?,
            esc_row_start: to_device(s, &d.escape_row_start)?,
            esc_corr: to_device(
                s,
                bytemuck::cast_slice::<[f32; 2], f32>(&d.escape_correction),
            )?,
            escapes: d.escape_pos.len(),
            group_tiles: AtomicU32::new(0),
        })
    }

    /// Puts a chunk selection on the device (routing flags are copied once per call).
    pub fn selection(&self, t: &GpuResident, sel: &ChunkSelection) -> Result<GpuSelection> {
        Ok(match sel {
            ChunkSelection::Exact => GpuSelection::Exact,
            ChunkSelection::Draft => GpuSelection::Draft,
            ChunkSelection::Routed(flags) => {
                if flags.len() != t.chunks {
                    return Err(Error::Shape(format!(
                        "{} routing flags for a tensor of {} chunks",
                        flags.len(),
                        t.chunks
                    )));
                }
                let bytes: Vec<u8> = flags.iter().map(|&f| f as u8).collect();
                GpuSelection::Routed(self.launcher.stream.clone_htod(&bytes)?)
            }
        })
    }

    /// Decodes the whole tensor to BF16 (`rows * cols` values), bit-exact where exact.
    pub fn decode(
        &self,
        t: &GpuResident,
        sel: &GpuSelection,
        out: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let n = t.rows as usize * t.cols as usize;
        if out.len() != n {
            return Err(Error::Shape(format!(
                "decode output of {} values for {} weights",
                out.len(),
                n
            )));
        }
        let words_per_chunk = (t.chunk_rows as usize * t.cols as usize).div_ceil(8);
        // A warp of the kernel takes 32 x DECODE_WORDS words of one chunk.
        let units = 32 * words_per_chunk.div_ceil(32 * self.decode_words as usize) * t.chunks;
        if units == 0 {
            return Ok(());
        }
        let blocks = units.div_ceil(DECODE_THREADS as usize);
        let (grid_x, grid_y) = (blocks.min(65_535), blocks.div_ceil(65_535));
        let (mode, routed) = sel.mode(t);
        let mut args = t.common_args(mode, routed, &self.launcher.stream);
        args.value(out.device_ptr_mut(&self.launcher.stream).0);
        let config = grid((grid_x as u32, grid_y as u32), DECODE_THREADS);
        // SAFETY: the argument list matches `jd_decode_bf16`; every buffer was sized above
        // or at upload, and the kernel reads only within the chunk segments it is given.
        unsafe { self.launcher.launch(&self.decode, config, &mut args, true) }?;
        if t.escapes == 0 {
            return Ok(());
        }
        let escapes = t.escapes as u32;
        let st = &self.launcher.stream;
        let mut args = RawArgs::default();
        args.buffer(&t.p, st)
            .buffer(&t.s, st)
            .buffer(&t.l, st)
            .buffer(&t.esc_pos, st)
            .buffer(&t.esc_exp, st)
            .value(escapes)
            .buffer(routed, st)
            .value(mode)
            .value(t.cols)
            .value(t.chunk_rows)
            .value(t.segment)
            .value(out.device_ptr_mut(st).0);
        let config = grid((escapes.div_ceil(DECODE_THREADS), 1), DECODE_THREADS);
        // SAFETY: matches `jd_patch_escapes`; escape positions were validated by the format
        // reader and lie inside the `rows * cols` output checked above. Same stream: it waits
        // for the decode before it writes.
        unsafe { self.launcher.launch(&self.patch, config, &mut args, true) }?;
        Ok(())
    }

    /// `y[b][r] = sum_k W[r][k] x[b][k]` for `batch` (1..=8) rows of `x` (`batch x cols`,
    /// row-major), decoding the weights in registers; `y` is `batch x rows`.
    pub fn gemv(
        &self,
        t: &GpuResident,
        sel: &GpuSelection,
        x: &CudaView<'_, bf16>,
        batch: usize,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        check_gemv(t, x.len(), batch, y.len())?;
        if t.rows == 0 {
            return Ok(());
        }
        let (mode, routed) = sel.mode(t);
        let kernel = self.variant(t).single(sel);
        let s = &self.launcher.stream;
        let mut args = t.common_args(mode, routed, s);
        args.buffer(&t.esc_row_start, s)
            .buffer(&t.esc_pos, s)
            .buffer(&t.esc_corr, s)
            .buffer(x, s)
            .value(batch as u32)
            .value(y.device_ptr_mut(s).0);
        // SAFETY: the argument list matches `jd_gemv_bf16`; sizes were checked above, rows are
        // 16-byte aligned because cols % 32 == 0, and the kernel masks rows past the end.
        unsafe { self.launch_gemv(kernel, t.tiles(), &mut args) }
    }

    /// [`Kernels::gemv`] of up to [`MAX_GEMV_GROUP`] tensors of the same input `x` (e.g. a
    /// layer's q, k and v) in one launch. `y` holds the outputs one after the other: tensor
    /// `i`'s `batch x rows_i` at offset `batch * (rows_0 + .. + rows_{i-1})`, each bit for bit
    /// what its own `gemv` gives. The tensors must share columns, chunk rows and size class
    /// (the kernel variant), and the selection must be whole-tensor (`Exact` or `Draft`):
    /// otherwise an error, and the caller runs them one by one.
    pub fn gemv_group(
        &self,
        tensors: &[&GpuResident],
        sel: &GpuSelection,
        x: &CudaView<'_, bf16>,
        batch: usize,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let Some(first) = tensors.first() else {
            return Ok(());
        };
        let kernel = self.group_kernel(tensors, sel)?;
        let total_rows: usize = tensors.iter().map(|t| t.rows as usize).sum();
        for t in tensors {
            check_gemv(t, x.len(), batch, batch * t.rows as usize)?;
        }
        if y.len() != batch * total_rows {
            return Err(Error::Shape(format!(
                "grouped GEMV: y of {} values for batch {batch} of {total_rows} rows",
                y.len()
            )));
        }
        let mut args = GroupArgs {
            count: tensors.len() as u32,
            ..Default::default()
        };
        let (y_base, _y_sync) = y.device_ptr_mut(&self.launcher.stream);
        let (mut tiles, mut offset) = (0u32, 0usize);
        for (t, m) in tensors.iter().zip(&mut args.members) {
            tiles += t.tiles();
            let ptr = |s: &CudaSlice<u8>| s.device_ptr(&self.launcher.stream).0;
            *m = GroupMember {
                p: ptr(&t.p),
                s: ptr(&t.s),
                l: ptr(&t.l),
                bases: ptr(&t.bases),
                esc_row_start: t.esc_row_start.device_ptr(&self.launcher.stream).0,
                esc_pos: t.esc_pos.device_ptr(&self.launcher.stream).0,
                esc_corr: t.esc_corr.device_ptr(&self.launcher.stream).0,
                y: y_base + (offset * std::mem::size_of::<bf16>()) as u64,
                segment: t.segment,
                rows: t.rows,
                tiles_end: tiles,
            };
            offset += batch * t.rows as usize;
        }
        if tiles == 0 {
            return Ok(());
        }
        let mut raw = RawArgs::default();
        raw.value(args)
            .value(first.cols)
            .value(first.chunk_rows)
            .buffer(x, &self.launcher.stream)
            .value(batch as u32);
        // SAFETY: the arguments match `jd_gemv_group_bf16_*`; every member's buffers were
        // checked as for `gemv`, its output lies inside `y` (checked above), and all outlive
        // the launch. The raw addresses skip cudarc's event bookkeeping, which only matters
        // across streams: these buffers are used on this stream alone.
        unsafe { self.launch_gemv(kernel, tiles, &mut raw) }
    }

    /// Whether [`Kernels::gemv_group`] takes these tensors and selection.
    pub fn can_group(&self, tensors: &[&GpuResident], sel: &GpuSelection) -> bool {
        self.group_kernel(tensors, sel).is_ok()
    }

    /// The grouped kernel for `tensors` and `sel`, or why there is none.
    fn group_kernel(&self, tensors: &[&GpuResident], sel: &GpuSelection) -> Result<&GemvLaunch> {
        let unsupported = |why: String| Err(Error::Unsupported(format!("grouped GEMV: {why}")));
        let Some(first) = tensors.first() else {
            return unsupported("no tensors".into());
        };
        if tensors.len() > MAX_GEMV_GROUP {
            return unsupported(format!(
                "{} tensors (at most {MAX_GEMV_GROUP})",
                tensors.len()
            ));
        }
        // One class sums every row the same way (the tall class at 3 or 4 blocks per SM too),
        // so the first member's kernel gives each member its own launch's bits.
        let class = self.gemv_class(first);
        if tensors.iter().any(|t| {
            (t.cols, t.chunk_rows) != (first.cols, first.chunk_rows) || self.gemv_class(t) != class
        }) {
            return unsupported("tensors differ in columns, chunk rows or size class".into());
        }
        match self.variant(first).group(sel) {
            Some(kernel) => Ok(kernel),
            None => unsupported("routed selections have per-tensor flags".into()),
        }
    }

    /// The size class whose fused-GEMV variant runs `t`: by its shape and declared group
    /// ([`GpuResident::launch_together`]) and the device's SM count, never by batch (so a row's
    /// bits may differ between GPU models, never between batch sizes). Kernels built with
    /// tuning defines ([`Kernels::with_defines`]) have one variant, the default.
    pub fn gemv_class(&self, t: &GpuResident) -> GemvClass {
        let large = t.rows as usize * t.cols as usize >= LARGE_GEMV_WEIGHTS;
        match (&self.gemv_large, &self.gemv_tall) {
            (Some(_), _) if large => GemvClass::Large,
            (_, Some(_)) if t.launch_tiles() > self.tall_tiles() => GemvClass::Tall,
            _ => GemvClass::Default,
        }
    }

    /// The GEMV variant of `t`'s class.
    fn variant(&self, t: &GpuResident) -> &GemvKernel {
        let class = match self.gemv_class(t) {
            GemvClass::Large => self.gemv_large.as_ref(),
            GemvClass::Tall if self.tall_blocks_per_sm(t) == 3 => self.gemv_tall_three.as_ref(),
            GemvClass::Tall => self.gemv_tall.as_ref(),
            GemvClass::Default => None,
        };
        class.unwrap_or(&self.gemv)
    }

    /// Launches of more 16-row tiles than this (twice the device's SMs) take the tall variant
    /// (4 warps, 3 or 4 blocks per SM): up to 4 x SMs tiles all their blocks run at once, where the
    /// default's 2 blocks per SM would leave a second, nearly empty wave (4608 rows: 288 tiles
    /// over 264 slots on an H100; 1.05x -> 1.27x cuBLAS at 4608x12288, docs/benchmarks.md).
    pub fn tall_tiles(&self) -> u32 {
        DEFAULT_BLOCKS_PER_SM * self.sms
    }

    /// Blocks per SM of `t`'s exact and routed launches if it is of the tall class: 3 where
    /// those fill the launch's waves at least as well as 4 (fewer slots left empty in the last
    /// wave), else 4 (also where the device cannot hold 3 blocks of those); its draft always
    /// takes 4. Layer chains (H100, Llama-3-8B shape: q/k/v 384
    /// and gate/up 1792 tiles on 132 SMs; the 7B shape's o and down 288, gate/up 1536) take
    /// 4-5% less time at batch 1 and 5-8% at batch 8 than with 4 blocks everywhere; a launch
    /// whose last wave 3 blocks leave emptier (8192 x 8192: 512 tiles, 1.3 waves of 3) lost 10%
    /// at 3 (docs/benchmarks.md, session 10).
    pub fn tall_blocks_per_sm(&self, t: &GpuResident) -> u32 {
        let (tiles, sms) = (t.launch_tiles(), self.sms);
        let slots = |blocks: u32| tiles.div_ceil(blocks * sms) * blocks;
        if self.gemv_tall_three.is_some() && slots(3) <= slots(4) {
            3
        } else {
            4
        }
    }
}

/// The shape checks of a fused GEMV of `t` for `batch` rows, `x` and `y` of those lengths.
fn check_gemv(t: &GpuResident, x_len: usize, batch: usize, y_len: usize) -> Result<()> {
    if t.cols % 32 != 0 {
        return Err(Error::Unsupported(format!(
            "{} columns (the fused GEMV needs a multiple of 32)",
            t.cols
        )));
    }
    if !(1..=MAX_GEMV_BATCH).contains(&batch) {
        return Err(Error::Shape(format!(
            "batch {batch} (the fused GEMV takes 1..={MAX_GEMV_BATCH})"
        )));
    }
    let (rows, cols) = (t.rows as usize, t.cols as usize);
    if x_len != batch * cols || y_len != batch * rows {
        return Err(Error::Shape(format!(
            "x of {x_len} and y of {y_len} values for batch {batch} of a {rows}x{cols} tensor"
        )));
    }
    Ok(())
}

/// Compiles `source` with NVRTC for the stream's device (compute capability 8.0 or newer),
/// with `defines` as `-D` options, and loads it: how this crate builds its kernels, open to
/// benchmarks and tests that bring their own.
pub fn compile(
    stream: &Arc<CudaStream>,
    source: &str,
    defines: &[&str],
) -> Result<Arc<cudarc::driver::CudaModule>> {
    let ctx = stream.context();
    let (major, minor) = ctx.compute_capability()?;
    if major < 8 {
        return Err(Error::Unsupported(format!(
            "compute capability {major}.{minor} (the kernels use bf16 mma.sync, 8.0+)"
        )));
    }
    let mut options = vec![format!("--gpu-architecture=compute_{major}{minor}")];
    options.extend(defines.iter().map(|d| format!("-D{d}")));
    let ptx = compile_ptx_with_opts(
        source,
        CompileOptions {
            options,
            ..Default::default()
        },
    )?;
    Ok(ctx.load_module(ptx)?)
}

/// The decoder's kernels besides the GEMV (`attention.cu`): decode attention
/// ([`crate::attention`]) and the fused add + RMSNorm and silu * up ([`crate::decoder_ops`]),
/// bound to one stream.
#[derive(Debug)]
pub struct DecoderKernels {
    launcher: Launcher,
    /// `jd_attention_bf16_pl{1..8}`: entry `i` for heads of `32 * (i + 1)` elements.
    attention: Vec<CudaFunction>,
    /// The attention's partial records and per-row arrival counts, kept between launches:
    /// allocating them per call put an allocation between the kernels of every layer.
    attention_scratch: Mutex<AttentionScratch>,
    add_rms_norm: CudaFunction,
    silu_mul: CudaFunction,
    rope_kv: CudaFunction,
    logit_stats: CudaFunction,
}

impl DecoderKernels {
    /// Compiles the kernels for the stream's device.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let module = compile(&stream, ATTENTION_SOURCE, &[])?;
        Ok(Self {
            attention: (1..=MAX_HEAD_DIM / 32)
                .map(|pl| module.load_function(&format!("jd_attention_bf16_pl{pl}")))
                .collect::<std::result::Result<_, _>>()?,
            attention_scratch: Mutex::new(AttentionScratch::default()),
            add_rms_norm: module.load_function("jd_add_rms_norm_bf16")?,
            silu_mul: module.load_function("jd_silu_mul_bf16")?,
            rope_kv: module.load_function("jd_rope_kv_bf16")?,
            logit_stats: module.load_function("jd_logit_stats_f32")?,
            launcher: Launcher::new(stream)?,
        })
    }

    /// As [`Kernels::set_dependent_launch`]: these kernels start under a dependent launch and
    /// wait for their inputs first thing, which hides their launch latency behind the previous
    /// kernel, and they let the next (a fused GEMV) launch at once.
    pub fn set_dependent_launch(&mut self, on: bool) -> Result<()> {
        self.launcher.set_dependent(on)
    }

    /// The stream the kernels run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.launcher.stream
    }

    /// Softmax attention of `q` over `k`, `v` into `y` (layouts in [`AttentionShape`]), scale
    /// `1 / sqrt(head_dim)`, f32 inside.
    pub fn attention(
        &self,
        shape: &AttentionShape,
        q: &CudaView<'_, bf16>,
        k: &CudaView<'_, bf16>,
        v: &CudaView<'_, bf16>,
        y: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        shape.check()?;
        let (q_len, kv_len, out_len) = shape.lens();
        if q.len() != q_len || k.len() != kv_len || v.len() != kv_len || y.len() != out_len {
            return Err(Error::Shape(format!(
                "attention {shape:?}: q {}, k {}, v {}, y {} elements",
                q.len(),
                k.len(),
                v.len(),
                y.len()
            )));
        }
        let dim = |v: usize| to_u32(v, "attention dimension");
        let (rows, heads, kv_heads) = (dim(shape.rows)?, dim(shape.heads)?, dim(shape.kv_heads)?);
        let (total, capacity) = (dim(shape.total)?, dim(shape.kv_capacity)?);
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        // One partial record (m, l, acc[d]) per (row, head, split of ATTENTION_SPLIT positions).
        let splits = total.div_ceil(ATTENTION_SPLIT);
        let st = &self.launcher.stream;
        let mut scratch = self
            .attention_scratch
            .lock()
            .map_err(|_| Error::Unsupported("attention scratch lock poisoned".into()))?;
        let records = shape.rows * shape.heads * splits as usize * (shape.head_dim + 2);
        let AttentionScratch { part, arrivals } = &mut *scratch;
        let part = at_least(part, st, records)?;
        let arrivals = at_least(arrivals, st, shape.rows * shape.heads)?;
        let mut args = RawArgs::default();
        args.buffer(q, st)
            .buffer(k, st)
            .buffer(v, st)
            .value(rows)
            .value(heads)
            .value(kv_heads)
            .value(total)
            .value(capacity)
            .value(scale)
            .value(part.device_ptr_mut(st).0)
            .value(arrivals.device_ptr_mut(st).0)
            .value(y.device_ptr_mut(st).0);
        let mut config = grid((rows, heads), ATTENTION_THREADS);
        config.grid_dim.2 = splits;
        // SAFETY: the argument list matches `jd_attention_bf16_pl*` of this head size (checked
        // above: a multiple of 32 up to MAX_HEAD_DIM); every buffer holds the elements its
        // shape needs (checked above), `part` the records of every (row, head, split) and
        // `arrivals` a zeroed count per (row, head), which the merging block zeroes again; the
        // kernel indexes only within them. The scratch is locked until the launch is queued,
        // and a later launch touches them only after its pdl_wait(), by which time this one has
        // ended (each kernel between them waits for its predecessor or starts after it).
        unsafe {
            self.launcher.launch(
                &self.attention[shape.head_dim / 32 - 1],
                config,
                &mut args,
                true,
            )
        }?;
        Ok(())
    }

    /// `sum_out = x + y` and `norm_out = rms_norm(sum_out) * w` over rows of `cols` (`x`, `y`
    /// and the outputs `rows x cols`, `w` of `cols`), one launch for what candle does in two;
    /// each row as it would be alone ([`crate::decoder_ops`] has the semantics).
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        x: &CudaView<'_, bf16>,
        y: &CudaView<'_, bf16>,
        w: &CudaView<'_, bf16>,
        eps: f32,
        cols: usize,
        sum_out: &mut CudaViewMut<'_, bf16>,
        norm_out: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        let rows = decoder_ops::add_rms_norm_rows(x.len(), y.len(), w.len(), cols)?;
        check_out(sum_out.len(), x.len())?;
        check_out(norm_out.len(), x.len())?;
        let (rows, cols) = (to_u32(rows, "rows")?, to_u32(cols, "cols")?);
        if rows == 0 {
            return Ok(());
        }
        let st = &self.launcher.stream;
        let mut args = RawArgs::default();
        args.buffer(x, st)
            .buffer(y, st)
            .buffer(w, st)
            .value(cols)
            .value(eps)
            .value(sum_out.device_ptr_mut(st).0)
            .value(norm_out.device_ptr_mut(st).0);
        // SAFETY: the arguments match `jd_add_rms_norm_bf16`; x, y and both outputs hold
        // `rows * cols` elements and w `cols` (checked above); block `r` touches row `r` only.
        unsafe {
            self.launcher.launch(
                &self.add_rms_norm,
                grid((rows, 1), NORM_THREADS),
                &mut args,
                true,
            )
        }?;
        Ok(())
    }

    /// `out = silu(gate) * up` elementwise, rounded once.
    pub fn silu_mul(
        &self,
        gate: &CudaView<'_, bf16>,
        up: &CudaView<'_, bf16>,
        out: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        decoder_ops::check_silu_mul(gate.len(), up.len())?;
        check_out(out.len(), gate.len())?;
        let n = to_u32(gate.len(), "elements")?;
        if n == 0 {
            return Ok(());
        }
        let st = &self.launcher.stream;
        let mut args = RawArgs::default();
        args.buffer(gate, st)
            .buffer(up, st)
            .value(n)
            .value(out.device_ptr_mut(st).0);
        let config = grid((n.div_ceil(ELEMENTWISE_THREADS), 1), ELEMENTWISE_THREADS);
        // SAFETY: matches `jd_silu_mul_bf16`; all three buffers hold `n` elements (checked
        // above) and threads past `n` return.
        unsafe {
            self.launcher
                .launch(&self.silu_mul, config, &mut args, true)
        }?;
        Ok(())
    }
}

impl DecoderKernels {
    /// `[argmax, Z, S, l2, ties]` of a row of logits into `out` (5 values), one launch
    /// ([`decoder_ops::logit_stats`] defines them).
    pub fn logit_stats(
        &self,
        logits: &CudaView<'_, f32>,
        out: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        decoder_ops::check_logit_stats(logits.len())?;
        check_out(out.len(), 5)?;
        let st = &self.launcher.stream;
        let mut args = RawArgs::default();
        args.buffer(logits, st)
            .value(logits.len() as u32)
            .value(out.device_ptr_mut(st).0);
        // SAFETY: matches `jd_logit_stats_f32`; `logits` holds `n` values (at most 2^24,
        // checked), `out` 5, and only thread 0 writes them.
        unsafe {
            self.launcher.launch(
                &self.logit_stats,
                grid((1, 1), STATS_THREADS),
                &mut args,
                true,
            )
        }?;
        Ok(())
    }

    /// Rotary embedding of one step's queries and keys, its keys and values written into a KV
    /// cache buffer: one launch (layouts and semantics in [`decoder_ops::RopeKvShape`]).
    pub fn rope_kv(
        &self,
        shape: &RopeKvShape,
        input: &CudaView<'_, bf16>,
        cos_sin: &CudaView<'_, bf16>,
        q_out: &mut CudaViewMut<'_, bf16>,
        cache: &mut CudaViewMut<'_, bf16>,
    ) -> Result<()> {
        shape.check(input.len())?;
        let (table_len, cache_len) = shape.table_and_cache_lens();
        check_out(cos_sin.len(), table_len)?;
        check_out(q_out.len(), shape.block_lens().0)?;
        check_out(cache.len(), cache_len)?;
        let dim = |v: usize| to_u32(v, "rope dimension");
        let slots = dim(shape.heads + 2 * shape.kv_heads)?;
        let st = &self.launcher.stream;
        let mut args = RawArgs::default();
        args.buffer(input, st);
        for offset in shape.offsets {
            args.value(offset as u64);
        }
        args.buffer(cos_sin, st)
            .value(dim(shape.rows)?)
            .value(dim(shape.heads)?)
            .value(dim(shape.kv_heads)?)
            .value(dim(shape.head_dim)?)
            .value(dim(shape.kv_capacity)?)
            .value(dim(shape.start)?)
            .value(q_out.device_ptr_mut(st).0)
            .value(cache.device_ptr_mut(st).0);
        let config = grid((dim(shape.rows)?, slots), dim(shape.head_dim / 2)?);
        // SAFETY: matches `jd_rope_kv_bf16`; the check above puts every block the kernel reads
        // inside `input` and every position it writes inside the capacity, and the lengths of
        // the table, the queries and the cache buffer are checked.
        unsafe { self.launcher.launch(&self.rope_kv, config, &mut args, true) }?;
        Ok(())
    }
}

/// Device buffers the attention kernel needs between its blocks, grown to the largest launch.
#[derive(Debug, Default)]
struct AttentionScratch {
    part: Option<CudaSlice<f32>>,
    arrivals: Option<CudaSlice<u32>>,
}

/// The buffer in `slot`, replaced by a zeroed one of `len` elements when missing or shorter.
fn at_least<'a, T: DeviceRepr + ValidAsZeroBits>(
    slot: &'a mut Option<CudaSlice<T>>,
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    let buffer = match slot.take() {
        Some(b) if b.len() >= len => b,
        _ => stream.alloc_zeros::<T>(len)?,
    };
    Ok(slot.insert(buffer))
}

/// A stream and how our kernels are launched on it: through `cuLaunchKernelEx`, with
/// programmatic stream serialization (dependent launch, `pdl.cuh`) for kernels that wait for
/// their inputs, where the device supports it (compute capability 9.0) and it is on.
#[derive(Debug)]
struct Launcher {
    stream: Arc<CudaStream>,
    dependent: bool,
}

impl Launcher {
    /// Dependent launch on where supported, unless [`DEPENDENT_LAUNCH_ENV`] is `0`.
    fn new(stream: Arc<CudaStream>) -> Result<Self> {
        let mut launcher = Self {
            stream,
            dependent: false,
        };
        launcher.set_dependent(std::env::var(DEPENDENT_LAUNCH_ENV).map_or(true, |v| v != "0"))?;
        Ok(launcher)
    }

    /// Turns dependent launch on or off (it stays off below compute capability 9.0, where the
    /// kernels' controls compile to nothing).
    fn set_dependent(&mut self, on: bool) -> Result<()> {
        self.dependent = on && self.stream.context().compute_capability()?.0 >= 9;
        Ok(())
    }

    /// Launches `function` with `args` in its parameter order; dependently if it `waits` (as
    /// `pdl.cuh` says) and dependent launch is on.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters, and every buffer it addresses must hold what
    /// the kernel reads and writes under `config`.
    unsafe fn launch(
        &self,
        function: &CudaFunction,
        config: LaunchConfig,
        args: &mut RawArgs,
        waits: bool,
    ) -> Result<()> {
        use cudarc::driver::sys;
        let mut params = args.pointers();
        // SAFETY: a zeroed attribute is a valid plain-old-data value; id and value set below.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let (grid_dim, block_dim) = (config.grid_dim, config.block_dim);
        let config = sys::CUlaunchConfig {
            gridDimX: grid_dim.0,
            gridDimY: grid_dim.1,
            gridDimZ: grid_dim.2,
            blockDimX: block_dim.0,
            blockDimY: block_dim.1,
            blockDimZ: block_dim.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: (waits && self.dependent) as u32,
        };
        self.stream.context().bind_to_thread()?;
        // SAFETY: the caller's contract; `params` and `attr` outlive the call, which copies them.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()?;
        Ok(())
    }
}

/// Copies `v` to the device as it is (no staging copy on the host); an empty list gets one
/// never-read zero element, since a null device pointer is not a slice.
fn to_device<T: DeviceRepr + Default>(stream: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    Ok(if v.is_empty() {
        stream.clone_htod(&[T::default()])?
    } else {
        stream.clone_htod(v)?
    })
}

/// Checks an output of `len` elements matches inputs of `want`.
fn check_out(len: usize, want: usize) -> Result<()> {
    if len != want {
        return Err(Error::Shape(format!(
            "an output of {len} elements for inputs of {want}"
        )));
    }
    Ok(())
}

fn grid((x, y): (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x, y, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The value of `-DNAME=value` among `defines`, if given. A bare `NAME` is an error: NVRTC
/// would read it as 1 while the host kept its default, and the launch shapes would disagree.
fn define_value(defines: &[&str], name: &str) -> Result<Option<u32>> {
    if defines.contains(&name) {
        return Err(Error::Define(format!("{name} needs a value ({name}=n)")));
    }
    defines
        .iter()
        .find_map(|d| d.strip_prefix(name)?.strip_prefix('='))
        .map(|v| v.parse::<u32>())
        .transpose()
        .map_err(|e| Error::Define(format!("{name}: {e}")))
}

/// [`define_value`] of a knob that sizes launches (warps, words a thread), else `default`;
/// 0 is an error.
fn launch_define(defines: &[&str], name: &str, default: u32) -> Result<u32> {
    match define_value(defines, name)? {
        Some(0) => Err(Error::Define(format!("{name} must be at least 1"))),
        v => Ok(v.unwrap_or(default)),
    }
}

fn to_u32(v: usize, what: &str) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Unsupported(format!("{what} = {v} exceeds u32")))
}

/// A tensor in GPU memory in the device layout ([`DeviceLayout`]): planes, bases, escapes.
#[derive(Debug)]
pub struct GpuResident {
    rows: u32,
    cols: u32,
    chunk_rows: u32,
    chunks: usize,
    segment: u64,
    p: CudaSlice<u8>,
    s: CudaSlice<u8>,
    l: CudaSlice<u8>,
    bases: CudaSlice<u8>,
    esc_pos: CudaSlice<u32>,
    esc_exp: CudaSlice<u8>,
    esc_row_start: CudaSlice<u32>,
    esc_corr: CudaSlice<f32>,
    escapes: usize,
    /// Tiles of the grouped launch this tensor was declared part of (0: none).
    group_tiles: AtomicU32,
}

impl GpuResident {
    /// Declares that `tensors` run as one grouped launch ([`Kernels::gemv_group`], e.g. a
    /// layer's q, k and v): from now on each picks its kernel variant by the group's tiles, in
    /// its single launches too, so both sum a row the same way (the variant fixes the order).
    /// Declare groups before the first launch; a tensor declared in several keeps the largest.
    pub fn launch_together(tensors: &[&GpuResident]) {
        let tiles: u32 = tensors.iter().map(|t| t.tiles()).sum();
        for t in tensors {
            t.group_tiles.fetch_max(tiles, Ordering::Relaxed);
        }
    }

    /// Tiles by which the variant is chosen: the tensor's, or its declared group's.
    fn launch_tiles(&self) -> u32 {
        self.tiles().max(self.group_tiles.load(Ordering::Relaxed))
    }

    /// `(rows, cols)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.rows as usize, self.cols as usize)
    }

    /// 16-row tiles: blocks of a fused GEMV launch.
    fn tiles(&self) -> u32 {
        self.rows.div_ceil(GEMV_TILE_ROWS as u32)
    }

    /// Number of row chunks.
    pub fn chunk_count(&self) -> usize {
        self.chunks
    }

    /// Weights outside their chunk's exponent window.
    pub fn escape_count(&self) -> usize {
        self.escapes
    }

    /// The arguments every kernel over a whole tensor starts with: planes, bases, routing
    /// flags, mode, rows, cols, chunk rows, segment stride.
    fn common_args(&self, mode: i32, routed: &CudaSlice<u8>, stream: &CudaStream) -> RawArgs {
        let mut args = RawArgs::default();
        args.buffer(&self.p, stream)
            .buffer(&self.s, stream)
            .buffer(&self.l, stream)
            .buffer(&self.bases, stream)
            .buffer(routed, stream)
            .value(mode)
            .value(self.rows)
            .value(self.cols)
            .value(self.chunk_rows)
            .value(self.segment);
        args
    }

    /// Device bytes this tensor holds (planes, bases, escape lists and indexes).
    pub fn bytes_held(&self) -> usize {
        self.p.num_bytes()
            + self.s.num_bytes()
            + self.l.num_bytes()
            + self.bases.num_bytes()
            + self.esc_pos.num_bytes()
            + self.esc_exp.num_bytes()
            + self.esc_row_start.num_bytes()
            + self.esc_corr.num_bytes()
    }
}

/// A [`ChunkSelection`] on the device.
#[derive(Debug)]
pub enum GpuSelection {
    /// Every chunk exact.
    Exact,
    /// Every chunk draft.
    Draft,
    /// One byte per chunk, non-zero = exact.
    Routed(CudaSlice<u8>),
}

impl GpuSelection {
    /// The kernels' `mode` argument and the flags buffer (a never-read stand-in unless routed).
    fn mode<'a>(&'a self, t: &'a GpuResident) -> (i32, &'a CudaSlice<u8>) {
        match self {
            Self::Exact => (0, &t.bases),
            Self::Draft => (1, &t.bases),
            Self::Routed(flags) => (2, flags),
        }
    }
}
