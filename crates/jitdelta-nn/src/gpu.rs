//! The CUDA path of [`JitLinear`](crate::JitLinear): weights held on the GPU in the device
//! layout of `jitdelta-kernels`, multiplied by the fused decode-GEMV (8 rows a launch) for up
//! to [`FUSED_MAX_ROWS`] rows, decoded to a transient BF16 matrix for a cuBLAS matmul beyond.

use crate::mode::Plan;
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor};
use half::bf16;
use jitdelta_kernels::gpu::{GpuResident, GpuSelection, Kernels, MAX_GEMV_BATCH, MAX_GEMV_GROUP};
use jitdelta_kernels::reference::ChunkSelection;
use std::sync::{Arc, Mutex};

const _: () = assert!(crate::GPU_FUSED_ROWS == MAX_GEMV_BATCH);

/// A layer's weights in GPU memory and the kernels bound to its device's stream.
pub(crate) struct GpuStore {
    pub(crate) tensor: GpuResident,
    pub(crate) kernels: Arc<Kernels>,
    pub(crate) chunk_rows: usize,
    /// Bytes of the low-mantissa plane (what a draft does not read).
    pub(crate) low_plane_bytes: usize,
    /// The routing flags last put on the device, by route stamp: they are copied once per
    /// `set_route`, not once per call (a host-to-device copy from pageable memory holds the
    /// host until it is done).
    pub(crate) routed: Mutex<Option<(u64, Arc<GpuSelection>)>>,
}

fn wrap(e: jitdelta_kernels::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

impl GpuStore {
    /// The kernels' selection for `plan`. A routed plan without a route is the draft (the
    /// routed kernel's draft rows equal the draft kernel's bit for bit).
    fn selection(&self, plan: &Plan) -> candle_core::Result<Arc<GpuSelection>> {
        let stamp = match plan {
            Plan::Exact => return Ok(Arc::new(GpuSelection::Exact)),
            Plan::Draft | Plan::Routed(None, _) => return Ok(Arc::new(GpuSelection::Draft)),
            Plan::Routed(Some(_), stamp) => *stamp,
        };
        let mut cached = self
            .routed
            .lock()
            .map_err(|_| candle_core::Error::Msg("a routed GEMV panicked".into()))?;
        if let Some((at, sel)) = cached.as_ref() {
            if *at == stamp {
                return Ok(sel.clone());
            }
        }
        let flags = (0..self.tensor.chunk_count())
            .map(|c| plan.exact(c))
            .collect();
        let sel = Arc::new(
            self.kernels
                .selection(&self.tensor, &ChunkSelection::Routed(flags))
                .map_err(wrap)?,
        );
        *cached = Some((stamp, sel.clone()));
        Ok(sel)
    }

    /// The layer's weights for `plan` as a new `(rows, cols)` BF16 tensor on the GPU.
    pub(crate) fn decode(
        &self,
        plan: &Plan,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let dev = device.as_cuda_device()?.clone();
        let (rows, cols) = self.tensor.dims();
        let sel = self.selection(plan)?;
        // SAFETY: the decode kernel writes every element before anything reads it.
        let mut w = unsafe { dev.alloc::<bf16>(rows * cols) }?;
        self.kernels
            .decode(&self.tensor, &sel, &mut w.as_view_mut())
            .map_err(wrap)?;
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(w, dev));
        Ok(Tensor::from_storage(
            storage,
            (rows, cols),
            BackpropOp::none(),
            false,
        ))
    }

    /// `x @ W^T` for BF16 `x` of shape `(.., cols)`: the fused kernel, 8 rows a launch, for up
    /// to [`FUSED_MAX_ROWS`] rows (each output column is computed the same way whatever the
    /// batch, so a speculative verify pass matches single-token steps bit for bit); beyond
    /// that a decode to BF16 and a cuBLAS matmul.
    pub(crate) fn matmul(&self, x: &Tensor, plan: &Plan) -> candle_core::Result<Tensor> {
        let (rows, cols) = self.tensor.dims();
        let batch = x.elem_count() / cols.max(1);
        if batch == 0 || batch > FUSED_MAX_ROWS || cols % 32 != 0 {
            let w = self.decode(plan, x.device())?;
            return crate::linear::linear_forward(x, &w, None);
        }
        let sel = self.selection(plan)?;
        let flat = x.reshape((batch, cols))?;
        let parts = (0..batch)
            .step_by(MAX_GEMV_BATCH)
            .map(|start| {
                let n = MAX_GEMV_BATCH.min(batch - start);
                kernel_input(flat.narrow(0, start, n)?)?.apply_op1_no_bwd(&FusedGemv {
                    store: self,
                    sel: &sel,
                    rows,
                    cols,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.reshape(out_dims(x.dims(), rows))
    }

    /// `x @ W_i^T` for layers reading the same `x` (a block's q, k and v; gate and up) in one
    /// launch ([`Kernels::gemv_group`]), each output bit for bit the layer's own
    /// [`GpuStore::matmul`]; `None` where the grouped kernel does not apply (a routed plan,
    /// more than 8 rows, tensors it cannot group), so the caller runs the layers one by one.
    pub(crate) fn matmul_group(
        stores: &[&GpuStore],
        x: &Tensor,
        plan: &Plan,
    ) -> candle_core::Result<Option<Vec<Tensor>>> {
        let Some(first) = stores.first() else {
            return Ok(None);
        };
        let cols = first.tensor.dims().1;
        let batch = x.elem_count() / cols.max(1);
        let sel = match plan {
            Plan::Exact => GpuSelection::Exact,
            Plan::Draft => GpuSelection::Draft,
            Plan::Routed(..) => return Ok(None),
        };
        let tensors: Vec<&GpuResident> = stores.iter().map(|s| &s.tensor).collect();
        if stores.len() > MAX_GEMV_GROUP
            || !(1..=MAX_GEMV_BATCH).contains(&batch)
            || x.dims().last() != Some(&cols)
            || stores
                .iter()
                .any(|s| !Arc::ptr_eq(&s.kernels, &first.kernels))
            || !first.kernels.can_group(&tensors, &sel)
        {
            return Ok(None);
        }
        let flat = kernel_input(x.reshape((batch, cols))?)?;
        let rows: Vec<usize> = tensors.iter().map(|t| t.dims().0).collect();
        let all = flat.apply_op1_no_bwd(&GroupedGemv {
            kernels: &first.kernels,
            tensors: &tensors,
            sel: &sel,
            total_rows: rows.iter().sum(),
        })?;
        let mut at = 0;
        rows.iter()
            .map(|&r| {
                at += batch * r;
                all.narrow(0, at - batch * r, batch * r)?
                    .reshape(out_dims(x.dims(), r))
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map(Some)
    }
}

/// Activation rows as the GEMV kernels read them: contiguous, starting 16-byte aligned (they
/// load 16-byte vectors).
fn kernel_input(x: Tensor) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    if x.layout().start_offset() % 8 != 0 {
        return x.copy();
    }
    Ok(x)
}

/// An input shape with its last dimension (the input features) replaced by `rows` outputs.
fn out_dims(input: &[usize], rows: usize) -> Vec<usize> {
    let mut dims = input.to_vec();
    if let Some(last) = dims.last_mut() {
        *last = rows;
    }
    dims
}

/// The grouped GEMV as a candle op: `(batch, cols)` in, every tensor's `(batch, rows_i)` out,
/// one after the other in one flat buffer.
struct GroupedGemv<'a> {
    kernels: &'a Kernels,
    tensors: &'a [&'a GpuResident],
    sel: &'a GpuSelection,
    total_rows: usize,
}

impl CustomOp1 for GroupedGemv<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-grouped-gemv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the grouped GEMV runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (x, batch) = gemv_input(storage, layout, self.tensors[0].dims().1)?;
        let dev = storage.device().clone();
        let n = batch * self.total_rows;
        // SAFETY: the kernel writes all `batch * total_rows` outputs.
        let mut y = unsafe { dev.alloc::<bf16>(n) }?;
        self.kernels
            .gemv_group(self.tensors, self.sel, &x, batch, &mut y.as_view_mut())
            .map_err(wrap)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from(n)))
    }
}

/// The contiguous BF16 activations of a GEMV op and their row count.
fn gemv_input<'a>(
    storage: &'a CudaStorage,
    layout: &Layout,
    cols: usize,
) -> candle_core::Result<(
    candle_core::cuda_backend::cudarc::driver::CudaView<'a, bf16>,
    usize,
)> {
    if storage.dtype() != DType::BF16 {
        candle_core::bail!(
            "the fused GEMV takes BF16 inputs, got {:?}",
            storage.dtype()
        );
    }
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("the fused GEMV needs a contiguous input");
    };
    let x = storage.as_cuda_slice::<bf16>()?.slice(start..end);
    Ok((x, (end - start) / cols))
}

/// Most activation rows the fused kernel takes (in launches of 8) before a layer is decoded for
/// cuBLAS instead: enough for any speculative verify pass, less than a typical prompt.
pub(crate) const FUSED_MAX_ROWS: usize = 64;

struct FusedGemv<'a> {
    store: &'a GpuStore,
    sel: &'a GpuSelection,
    rows: usize,
    cols: usize,
}

impl CustomOp1 for FusedGemv<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-fused-gemv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the fused GEMV runs on CUDA devices only")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (x, batch) = gemv_input(storage, layout, self.cols)?;
        let dev = storage.device().clone();
        // SAFETY: the kernel writes all `batch * rows` outputs.
        let mut y = unsafe { dev.alloc::<bf16>(batch * self.rows) }?;
        self.store
            .kernels
            .gemv(
                &self.store.tensor,
                self.sel,
                &x,
                batch,
                &mut y.as_view_mut(),
            )
            .map_err(wrap)?;
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from(out_dims(layout.dims(), self.rows)),
        ))
    }
}
