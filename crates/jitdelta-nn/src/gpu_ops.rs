//! The decoder's small ops on CUDA, one launch each of `jitdelta-kernels`' decoder kernels where
//! candle needs several: decode attention (single-token steps and speculative verify blocks,
//! each query row computed on its own so a verify block is bit-identical to single-token steps;
//! the per-position loop of candle ops it replaces cost one attention per row), the residual add
//! fused with the next RMSNorm, and SwiGLU's `silu(gate) * up`. Every op returns `None` where its
//! kernel does not apply, and the caller runs candle's ops.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor,
};
use half::bf16;
use jitdelta_kernels::attention::AttentionShape;
use jitdelta_kernels::gpu::DecoderKernels;
use std::sync::{Arc, OnceLock};

/// The decoder kernels, compiled on first use.
#[derive(Default)]
pub(crate) struct FusedOps {
    kernels: OnceLock<Arc<DecoderKernels>>,
}

impl FusedOps {
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

type View<'a> = candle_core::cuda_backend::cudarc::driver::CudaView<'a, bf16>;

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

/// The elements of a contiguous input (an attention query, a fused op's operand).
fn view<'a>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<View<'a>> {
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

fn slice(s: &CudaStorage, start: usize, end: usize) -> candle_core::Result<View<'_>> {
    let all = s.as_cuda_slice::<bf16>()?;
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
