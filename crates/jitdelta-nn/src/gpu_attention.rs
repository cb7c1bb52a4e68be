//! Decode attention on CUDA: single-token steps and speculative verify blocks in one launch of
//! `jitdelta-kernels`' attention kernel, each query row computed on its own so a verify block is
//! bit-identical to single-token steps (the per-position loop of candle ops it replaces cost one
//! attention per row).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use half::bf16;
use jitdelta_kernels::attention::AttentionShape;
use jitdelta_kernels::gpu::Attention;
use std::sync::{Arc, OnceLock};

/// The attention kernel of a decoder, compiled on first use.
#[derive(Default)]
pub(crate) struct FusedAttention {
    kernel: OnceLock<Arc<Attention>>,
}

impl FusedAttention {
    fn kernel(&self, device: &Device) -> candle_core::Result<&Arc<Attention>> {
        if let Some(k) = self.kernel.get() {
            return Ok(k);
        }
        let stream = device.as_cuda_device()?.cuda_stream();
        let k = Arc::new(Attention::new(stream).map_err(candle_core::Error::wrap)?);
        Ok(self.kernel.get_or_init(|| k))
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
            kernel: self.kernel(q.device())?,
            shape,
        };
        let y = q.contiguous()?.apply_op3_no_bwd(&k, &v, &op)?;
        Ok(Some(y.reshape((1, rows, heads * head_dim))?))
    }
}

struct DecodeAttention<'a> {
    kernel: &'a Attention,
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

/// The elements of contiguous `q`.
fn view<'a>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<View<'a>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("decode attention needs a contiguous query");
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
            "decode attention: elements {start}..{end} of a buffer of {len}"
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
        self.kernel
            .run(&s, &q, &k, &v, &mut y.as_view_mut())
            .map_err(candle_core::Error::wrap)?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from((s.rows, s.heads, s.head_dim)),
        ))
    }
}
