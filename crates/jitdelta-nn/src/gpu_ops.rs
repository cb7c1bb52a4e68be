//! The decoder's small ops on CUDA, one launch each of `jitdelta-kernels`' decoder kernels where
//! candle needs several: decode attention (single-token steps and speculative verify blocks,
//! each query row computed on its own so a verify block is bit-identical to single-token steps;
//! the per-position loop of candle ops it replaces cost one attention per row), the residual add
//! fused with the next RMSNorm, SwiGLU's `silu(gate) * up`, and the rotary embedding of queries
//! and keys with the KV-cache write. Every op but the last returns `None` where its kernel does
//! not apply, and the caller runs candle's ops; the decoder asks [`FusedOps::rope_applies`]
//! before a forward pass whether to use the last.

use crate::kv_cache::KvBlock;
use crate::KvCache;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp3, Layout,
    Shape, Storage, Tensor,
};
use half::bf16;
use jitdelta_kernels::attention::AttentionShape;
use jitdelta_kernels::decoder_ops::RopeKvShape;
use jitdelta_kernels::gpu::DecoderKernels;
use std::sync::{Arc, Mutex, OnceLock};

/// The decoder kernels, compiled on first use.
#[derive(Default)]
pub(crate) struct FusedOps {
    kernels: OnceLock<Arc<DecoderKernels>>,
}

impl FusedOps {
    /// The ops for a model on `device`; on CUDA the kernels compile now (NVRTC, some 100 ms),
    /// not inside the first forward pass, where they would count as first-token latency.
    pub(crate) fn new(device: &Device) -> crate::Result<Self> {
        let ops = Self::default();
        if device.is_cuda() {
            ops.kernels(device)?;
        }
        Ok(ops)
    }

    fn kernels(&self, device: &Device) -> candle_core::Result<&Arc<DecoderKernels>> {
        if let Some(k) = self.kernels.get() {
            return Ok(k);
        }
        let stream = device.as_cuda_device()?.cuda_stream();
        let k = Arc::new(DecoderKernels::new(stream).map_err(candle_core::Error::wrap)?);
        Ok(self.kernels.get_or_init(|| k))
    }

    /// Attention of `q` `(1, heads, rows, d)` over `k`, `v` `(1, kv_heads, total, d)` (query row
    /// `i` at position `total - rows + i`) as `(1, rows, heads * d)`; `None` where the kernel
    /// does not apply (not CUDA, not BF16, batch > 1, head size not a multiple of 32 up to 256),
    /// so the caller runs candle's ops. `k` and `v` are read in place when they are views of
    /// KV cache buffers (see [`kv_capacity`]); other layouts are copied contiguous first.
    pub(crate) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, heads, rows, head_dim) = q.dims4()?;
        let (_, kv_heads, total, _) = k.dims4()?;
        let in_place = match (kv_capacity(k.layout()), kv_capacity(v.layout())) {
            (Some(ck), Some(cv)) if ck == cv => Some(ck),
            _ => None,
        };
        let shape = AttentionShape {
            rows,
            heads,
            kv_heads,
            total,
            kv_capacity: in_place.unwrap_or(total),
            head_dim,
        };
        if !q.device().is_cuda() || q.dtype() != DType::BF16 || b != 1 || shape.check().is_err() {
            return Ok(None);
        }
        let (k, v) = match in_place {
            Some(_) => (k.clone(), v.clone()),
            None => (k.contiguous()?, v.contiguous()?),
        };
        let op = DecodeAttention {
            kernels: self.kernels(q.device())?,
            shape,
        };
        let y = q.contiguous()?.apply_op3_no_bwd(&k, &v, &op)?;
        Ok(Some(y.reshape((1, rows, heads * head_dim))?))
    }

    /// `(x + y, rms_norm(x + y) * w)` with `w` of `x`'s last dimension, in one launch; `None`
    /// unless all three are contiguous BF16 on CUDA of matching shapes.
    pub(crate) fn add_rms_norm(
        &self,
        x: &Tensor,
        y: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> candle_core::Result<Option<(Tensor, Tensor)>> {
        let Some(&cols) = x.dims().last() else {
            return Ok(None);
        };
        if cols == 0 || !fusable(&[x, y, w]) || x.dims() != y.dims() || w.dims() != [cols] {
            return Ok(None);
        }
        let op = AddRmsNorm {
            kernels: self.kernels(x.device())?,
            eps,
        };
        // One buffer holds both outputs: (2, ..x's shape).
        let both = x.apply_op3_no_bwd(y, w, &op)?;
        Ok(Some((both.get(0)?, both.get(1)?)))
    }

    /// `silu(gate) * up`, rounded once; `None` unless both are contiguous BF16 on CUDA of one
    /// shape.
    pub(crate) fn silu_mul(
        &self,
        gate: &Tensor,
        up: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if !fusable(&[gate, up]) || gate.dims() != up.dims() {
            return Ok(None);
        }
        let op = SiluMul {
            kernels: self.kernels(gate.device())?,
        };
        Ok(Some(gate.apply_op2_no_bwd(up, &op)?))
    }
}

impl FusedOps {
    /// `[argmax, Z, S, l2, ties]` of a row of f32 logits (any shape holding one row) as an f32
    /// tensor of 5, in one launch ([`jitdelta_kernels::decoder_ops::logit_stats`]); `None`
    /// unless the logits are f32 on CUDA and a row the kernel takes.
    pub(crate) fn logit_stats(&self, logits: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if !logits.device().is_cuda()
            || logits.dtype() != DType::F32
            || jitdelta_kernels::decoder_ops::check_logit_stats(logits.elem_count()).is_err()
        {
            return Ok(None);
        }
        let op = LogitStats {
            kernels: self.kernels(logits.device())?,
        };
        Ok(Some(
            logits.flatten_all()?.contiguous()?.apply_op1_no_bwd(&op)?,
        ))
    }
}

impl FusedOps {
    /// Whether [`FusedOps::rope_kv`] runs the forward passes of a model on `device` in `dtype`
    /// at `batch` with heads of `head_dim`: BF16 on CUDA, batch 1.
    pub(crate) fn rope_applies(
        device: &Device,
        dtype: DType,
        batch: usize,
        head_dim: usize,
    ) -> bool {
        device.is_cuda()
            && dtype == DType::BF16
            && batch == 1
            && head_dim % 2 == 0
            && head_dim <= RopeKvShape::MAX_HEAD_DIM
    }

    /// Rotary embedding of the projections `q` `(1, rows, heads * d)`, `k` and `v`
    /// `(1, rows, kv_heads * d)` with the table `cos_sin` ([`super::models`]' `cos_sin_bf16`),
    /// the keys and values appended to layer `layer` of `cache` in the same launch. Returns the
    /// queries `(1, heads, rows, d)` and the layer's keys and values as
    /// [`KvCache::append`] does. `q`, `k` and `v` are read in place when they lie in one buffer
    /// (a grouped GEMV's output), else packed into one first.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_kv(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos_sin: &Tensor,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        cache: &mut KvCache,
        layer: usize,
    ) -> crate::Result<(Tensor, Tensor, Tensor)> {
        let (_, rows, _) = q.dims3()?;
        let (q_len, kv_len) = (rows * heads * head_dim, rows * kv_heads * head_dim);
        if q.elem_count() != q_len || k.elem_count() != kv_len || v.elem_count() != kv_len {
            return Err(crate::Error::InvalidInput(format!(
                "rope: q {:?}, k {:?}, v {:?} for {heads} and {kv_heads} heads of {head_dim}",
                q.dims(),
                k.dims(),
                v.dims()
            )));
        }
        let (input, offsets) = match one_buffer([q, k, v])? {
            Some(offsets) => (q.clone(), offsets),
            None => (
                Tensor::cat(&[q.flatten_all()?, k.flatten_all()?, v.flatten_all()?], 0)?,
                [0, q_len, q_len + kv_len],
            ),
        };
        let kernels = self.kernels(q.device())?;
        let block = KvBlock {
            dims: [1, kv_heads, rows, head_dim],
            dtype: q.dtype(),
            device: q.device(),
        };
        let q_out = Mutex::new(None);
        let (k, v) = cache.append_with(layer, block, |kv, start| {
            let op = RopeKv {
                kernels,
                shape: RopeKvShape {
                    rows,
                    heads,
                    kv_heads,
                    head_dim,
                    kv_capacity: kv.dim(3)?,
                    start,
                    offsets,
                },
                q_out: &q_out,
            };
            Ok(kv.inplace_op3(&input, cos_sin, &op)?)
        })?;
        let Some(q) = q_out.into_inner().ok().flatten() else {
            return Err(crate::Error::InvalidInput(
                "rope: the kernel left no queries".into(),
            ));
        };
        let dev = input.device().as_cuda_device()?.clone();
        let q = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(q, dev)),
            (1, heads, rows, head_dim),
            BackpropOp::none(),
            false,
        );
        Ok((q, k, v))
    }
}

/// The element offsets of `tensors` in their common buffer, if they are contiguous BF16 CUDA
/// tensors in one buffer.
fn one_buffer<const N: usize>(tensors: [&Tensor; N]) -> candle_core::Result<Option<[usize; N]>> {
    let mut base = None;
    let mut offsets = [0; N];
    for (t, offset) in tensors.iter().zip(&mut offsets) {
        let (storage, layout) = t.storage_and_layout();
        let (Storage::Cuda(s), Some((start, _))) = (&*storage, layout.contiguous_offsets()) else {
            return Ok(None);
        };
        if s.dtype() != DType::BF16 {
            return Ok(None);
        }
        let slice = s.as_cuda_slice::<bf16>()?;
        let (address, _sync) = slice.device_ptr(slice.stream());
        if *base.get_or_insert(address) != address {
            return Ok(None);
        }
        *offset = start;
    }
    Ok(Some(offsets))
}

/// Whether the fused elementwise kernels take these tensors: contiguous BF16 on CUDA.
fn fusable(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cuda() && t.dtype() == DType::BF16 && t.is_contiguous())
}

struct DecodeAttention<'a> {
    kernels: &'a DecoderKernels,
    shape: AttentionShape,
}

type View<'a, T = bf16> = candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>;

/// Positions per head in memory of a `(batch, kv_heads, total, head_dim)` key or value layout
/// the kernel can read in place ([`AttentionShape::kv_capacity`]): elements adjacent, positions
/// `head_dim` apart, heads a whole number `>= total` of positions apart. Views of KV cache
/// buffers qualify, and contiguous tensors (capacity `total`); `None` for other layouts.
fn kv_capacity(l: &Layout) -> Option<usize> {
    let (&[_, heads, total, d], &[_, head_stride, position_stride, 1]) = (l.dims(), l.stride())
    else {
        return None;
    };
    // Strides of dimensions of size 1 are never used (candle leaves them arbitrary).
    if total > 1 && position_stride != d {
        return None;
    }
    if heads == 1 {
        return Some(total);
    }
    let capacity = head_stride.checked_div(d)?;
    (capacity * d == head_stride && capacity >= total).then_some(capacity)
}

/// The elements of a contiguous input (an attention query, a fused op's operand, logits).
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<View<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("the decoder kernels need contiguous inputs, got {l:?}");
    };
    slice(s, start, end)
}

/// The elements of `k` or `v` the kernel reads for `shape` ([`AttentionShape::lens`]).
fn kv_view<'a>(
    s: &'a CudaStorage,
    l: &Layout,
    shape: &AttentionShape,
) -> candle_core::Result<View<'a>> {
    let dims = [1, shape.kv_heads, shape.total, shape.head_dim];
    if l.dims() != dims || kv_capacity(l) != Some(shape.kv_capacity) {
        candle_core::bail!("decode attention: key/value layout {l:?} does not match {shape:?}");
    }
    let start = l.start_offset();
    slice(s, start, start + shape.lens().1)
}

fn slice<T: CudaDType>(
    s: &CudaStorage,
    start: usize,
    end: usize,
) -> candle_core::Result<View<'_, T>> {
    let all = s.as_cuda_slice::<T>()?;
    let len = all.len();
    all.try_slice(start..end).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "decoder kernels: elements {start}..{end} of a buffer of {len}"
        ))
    })
}

impl CustomOp3 for DecodeAttention<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-decode-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the decode attention kernel runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (q, k, v) = (
            view(s1, l1)?,
            kv_view(s2, l2, &self.shape)?,
            kv_view(s3, l3, &self.shape)?,
        );
        let dev = s1.device().clone();
        let s = self.shape;
        // SAFETY: the kernel writes every output element.
        let mut y = unsafe { dev.alloc::<bf16>(s.lens().2) }?;
        self.kernels
            .attention(&s, &q, &k, &v, &mut y.as_view_mut())
            .map_err(candle_core::Error::wrap)?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from((s.rows, s.heads, s.head_dim)),
        ))
    }
}

/// The rope + KV write as an in-place op on the layer's cache buffer, with the projections and
/// the table as inputs; it leaves the rotated queries in `q_out`.
struct RopeKv<'a> {
    kernels: &'a DecoderKernels,
    shape: RopeKvShape,
    q_out: &'a Mutex<Option<CudaSlice<bf16>>>,
}

impl InplaceOp3 for RopeKv<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-rope-kv"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("the fused rope kernel runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        cache: &mut CudaStorage,
        cache_l: &Layout,
        input: &CudaStorage,
        _: &Layout,
        table: &CudaStorage,
        table_l: &Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = cache_l.contiguous_offsets() else {
            candle_core::bail!(
                "the fused rope needs a contiguous KV cache buffer, got {cache_l:?}"
            );
        };
        let dev = input.device().clone();
        // The whole buffer: the shape's offsets are from its start.
        let input = input.as_cuda_slice::<bf16>()?.as_view();
        let table = view(table, table_l)?;
        let n = self.shape.block_lens().0;
        // SAFETY: the kernel writes every query element (checked lengths, else an error).
        let mut q = unsafe { dev.alloc::<bf16>(n) }?;
        let cache = cache.as_cuda_slice_mut::<bf16>()?;
        let Some(mut cache) = cache.try_slice_mut(start..end) else {
            candle_core::bail!("the fused rope: cache elements {start}..{end} out of bounds");
        };
        self.kernels
            .rope_kv(
                &self.shape,
                &input,
                &table,
                &mut q.as_view_mut(),
                &mut cache,
            )
            .map_err(candle_core::Error::wrap)?;
        *self
            .q_out
            .lock()
            .map_err(|_| candle_core::Error::Msg("the fused rope panicked".into()))? = Some(q);
        Ok(())
    }
}

struct AddRmsNorm<'a> {
    kernels: &'a DecoderKernels,
    eps: f32,
}

impl CustomOp3 for AddRmsNorm<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused add + RMSNorm kernel runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (x, y, w) = (view(s1, l1)?, view(s2, l2)?, view(s3, l3)?);
        let n = x.len();
        let dev = s1.device().clone();
        // SAFETY: the kernel writes every output element (checked lengths, else an error).
        let mut both = unsafe { dev.alloc::<bf16>(2 * n) }?;
        let (mut sum, mut norm) = both.split_at_mut(n);
        self.kernels
            .add_rms_norm(&x, &y, &w, self.eps, w.len(), &mut sum, &mut norm)
            .map_err(candle_core::Error::wrap)?;
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((CudaStorage::wrap_cuda_slice(both, dev), Shape::from(dims)))
    }
}

struct SiluMul<'a> {
    kernels: &'a DecoderKernels,
}

impl CustomOp2 for SiluMul<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-silu-mul"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused silu * up kernel runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (gate, up) = (view(s1, l1)?, view(s2, l2)?);
        let dev = s1.device().clone();
        // SAFETY: the kernel writes every output element (checked lengths, else an error).
        let mut out = unsafe { dev.alloc::<bf16>(gate.len()) }?;
        self.kernels
            .silu_mul(&gate, &up, &mut out.as_view_mut())
            .map_err(candle_core::Error::wrap)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
    }
}

struct LogitStats<'a> {
    kernels: &'a DecoderKernels,
}

impl CustomOp1 for LogitStats<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-logit-stats"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused logit stats kernel runs on CUDA devices only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let logits = view::<f32>(s, l)?;
        let dev = s.device().clone();
        // SAFETY: the kernel writes all 5 outputs (lengths checked, else an error).
        let mut out = unsafe { dev.alloc::<f32>(5) }?;
        self.kernels
            .logit_stats(&logits, &mut out.as_view_mut())
            .map_err(candle_core::Error::wrap)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(5)))
    }
}
