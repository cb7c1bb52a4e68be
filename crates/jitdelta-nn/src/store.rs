//! The compressed weights of one JIT layer and the chunk-parallel decoders that rebuild them:
//! into an f32 matrix (for the shared matmul), or fused with a matrix-vector product.

use crate::mode::Plan;
use jitdelta_format::{DraftDtype, FloatFormat, ResidentTensor, TensorView};
use rayon::prelude::*;

// Decoders write little-endian values straight into f32 and u16 buffers.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "jitdelta-nn needs a little-endian target"
);

/// Where a JIT layer keeps its weights.
pub(crate) enum WeightStore {
    /// The fixed-length resident layout (~75% of BF16; fast decode).
    Resident(ResidentTensor),
    /// The entropy-coded at-rest form, read from the mapped file (~66% of BF16; slower).
    Compact(TensorView),
    /// On a CUDA device, in the kernels' device layout (BF16 with a k = 12 draft).
    #[cfg(feature = "cuda")]
    Gpu(Box<crate::gpu::GpuStore>),
}

#[cfg(feature = "cuda")]
fn on_gpu<T>() -> jitdelta_format::Result<T> {
    Err(jitdelta_format::Error::InvalidOption(
        "the weights are held on the GPU: rebuild them there".into(),
    ))
}

impl WeightStore {
    pub(crate) fn format(&self) -> FloatFormat {
        match self {
            WeightStore::Resident(r) => r.format(),
            WeightStore::Compact(v) => v.format().expect("compact stores hold split tensors"),
            #[cfg(feature = "cuda")]
            WeightStore::Gpu(_) => FloatFormat::BF16,
        }
    }

    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            WeightStore::Resident(r) => r.dims(),
            WeightStore::Compact(v) => v.dims(),
            #[cfg(feature = "cuda")]
            WeightStore::Gpu(g) => g.tensor.dims(),
        }
    }

    pub(crate) fn chunk_rows(&self) -> usize {
        match self {
            WeightStore::Resident(r) => r.chunk_rows(),
            WeightStore::Compact(v) => v.chunk_rows().unwrap_or(1),
            #[cfg(feature = "cuda")]
            WeightStore::Gpu(g) => g.chunk_rows,
        }
    }

    pub(crate) fn chunk_count(&self) -> usize {
        match self {
            WeightStore::Resident(r) => r.chunk_count(),
            WeightStore::Compact(v) => v.chunk_count(),
            #[cfg(feature = "cuda")]
            WeightStore::Gpu(g) => g.tensor.chunk_count(),
        }
    }

    /// Bytes an exact rebuild reads, and the part of them a draft rebuild reads.
    pub(crate) fn bytes(&self) -> (usize, usize) {
        match self {
            WeightStore::Resident(r) => (r.bytes_held(), r.draft_bytes()),
            WeightStore::Compact(v) => {
                let (base, residual) = v.stored_bytes();
                ((base + residual) as usize, base as usize)
            }
            #[cfg(feature = "cuda")]
            WeightStore::Gpu(g) => {
                let held = g.tensor.bytes_held();
                (held, held - g.low_plane_bytes)
            }
        }
    }

    fn decode_exact(&self, c: usize, out: &mut [u8]) -> jitdelta_format::Result<()> {
        match self {
            WeightStore::Resident(r) => r.decode_chunk_exact(c, out),
            WeightStore::Compact(v) => v.decode_chunk_exact(c, out),
            #[cfg(feature = "cuda")]
            WeightStore::Gpu(_) => on_gpu(),
        }
    }

    fn decode_draft(
        &self,
        c: usize,
        dtype: DraftDtype,
        out: &mut [u8],
    ) -> jitdelta_format::Result<()> {
        match self {
            WeightStore::Resident(r) => r.decode_chunk_draft(c, dtype, out),
            WeightStore::Compact(v) => v.decode_chunk_draft(c, dtype, out),
            #[cfg(feature = "cuda")]
            WeightStore::Gpu(_) => on_gpu(),
        }
    }

    /// Decodes chunk `c` as f32 (exact or draft), using `tmp` for the source bytes.
    fn decode_chunk_f32(
        &self,
        c: usize,
        exact: bool,
        out: &mut [f32],
        tmp: &mut Vec<u8>,
    ) -> jitdelta_format::Result<()> {
        if !exact {
            return self.decode_draft(c, DraftDtype::F32, bytemuck::cast_slice_mut(out));
        }
        let format = self.format();
        tmp.resize(out.len() * format.bytes(), 0);
        self.decode_exact(c, tmp)?;
        if format == FloatFormat::BF16 {
            for (o, b) in out.iter_mut().zip(tmp.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        } else {
            for (i, o) in out.iter_mut().enumerate() {
                *o = format.to_f32(format.load(tmp, i));
            }
        }
        Ok(())
    }

    /// Rebuilds the whole `rows x cols` matrix as f32 into `out`, chunks in parallel.
    pub(crate) fn rebuild_f32(&self, plan: &Plan, out: &mut [f32]) -> jitdelta_format::Result<()> {
        let (rows, cols) = self.dims();
        debug_assert_eq!(out.len(), rows * cols);
        let per_chunk = (self.chunk_rows() * cols).max(1);
        out.par_chunks_mut(per_chunk)
            .enumerate()
            .try_for_each_init(Vec::new, |tmp, (c, o)| {
                self.decode_chunk_f32(c, plan.exact(c), o, tmp)
            })
    }

    /// `out = W x` for one input vector, decoding each row chunk into a small buffer that
    /// stays in cache, multiplying it, and moving on (chunks in parallel).
    pub(crate) fn fused_matvec(
        &self,
        plan: &Plan,
        x: &[f32],
        out: &mut [f32],
    ) -> jitdelta_format::Result<()> {
        let (rows, cols) = self.dims();
        debug_assert_eq!((x.len(), out.len()), (cols, rows));
        let bf16 = self.format() == FloatFormat::BF16;
        out.par_chunks_mut(self.chunk_rows().max(1))
            .enumerate()
            .try_for_each_init(ChunkBuffers::default, |buf, (c, o)| {
                let n = o.len() * cols;
                if bf16 {
                    // BF16 sources: exact and draft values are both BF16; keep them 2 bytes wide.
                    buf.bf16.resize(n, 0);
                    let bytes = bytemuck::cast_slice_mut(&mut buf.bf16);
                    if plan.exact(c) {
                        self.decode_exact(c, bytes)?;
                    } else {
                        self.decode_draft(c, DraftDtype::BF16, bytes)?;
                    }
                    for (y, row) in o.iter_mut().zip(buf.bf16.chunks_exact(cols)) {
                        *y = dot_bf16(row, x);
                    }
                } else {
                    buf.f32.resize(n, 0.0);
                    self.decode_chunk_f32(c, plan.exact(c), &mut buf.f32, &mut buf.tmp)?;
                    for (y, row) in o.iter_mut().zip(buf.f32.chunks_exact(cols)) {
                        *y = dot_f32(row, x);
                    }
                }
                Ok(())
            })
    }
}

#[derive(Default)]
struct ChunkBuffers {
    bf16: Vec<u16>,
    f32: Vec<f32>,
    tmp: Vec<u8>,
}

const LANES: usize = 16;

#[inline(always)]
fn dot_with(w: &[u16], x: &[f32], widen: impl Fn(u16) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, xc) = (w.chunks_exact(LANES), x.chunks_exact(LANES));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for i in 0..LANES {
            acc[i] += widen(a[i]) * b[i];
        }
    }
    let tail: f32 = wr.iter().zip(xr).map(|(&a, &b)| widen(a) * b).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn bf16_to_f32(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

#[inline(always)]
fn dot_f32_generic(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (wc, xc) = (w.chunks_exact(LANES), x.chunks_exact(LANES));
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (a, b) in wc.zip(xc) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    let tail: f32 = wr.iter().zip(xr).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_bf16_avx2(w: &[u16], x: &[f32]) -> f32 {
    dot_with(w, x, bf16_to_f32)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_f32_avx2(w: &[f32], x: &[f32]) -> f32 {
    dot_f32_generic(w, x)
}

/// Dot product of a BF16 row (raw bits) with an f32 vector.
fn dot_bf16(w: &[u16], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_bf16_avx2(w, x) };
    }
    dot_with(w, x, bf16_to_f32)
}

/// Dot product of two f32 vectors.
fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { dot_f32_avx2(w, x) };
    }
    dot_f32_generic(w, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_match_naive() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f32 = w.iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((dot_f32(&w, &x) - naive).abs() < 1e-5);
        let wb: Vec<u16> = w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let naive_b: f32 = wb.iter().zip(&x).map(|(&a, b)| bf16_to_f32(a) * b).sum();
        assert!((dot_bf16(&wb, &x) - naive_b).abs() < 1e-5);
    }
}
