//! `JitLinear`: a linear layer whose weights stay compressed and are rebuilt for each call.

use crate::linear::{linear_forward, LinearLayer};
use crate::mode::{Mode, ModeHandle, Plan};
use crate::runtime::Runtime;
use crate::store::WeightStore;
use crate::{Error, Result};
use candle_core::{CpuStorage, DType, Layout, Module, Tensor};
use jitdelta_format::FloatFormat;
use std::sync::Arc;

/// A linear layer that keeps its weights compressed (the resident layout by default, or the
/// compact at-rest form) and rebuilds them just in time for each matmul, as the shared
/// [`ModeHandle`] says: exact, draft, or routed per row chunk.
///
/// Rebuilt weights go into one scratch buffer shared by all layers of the source (sized to the
/// largest layer), or into the source's LRU cache when it has a budget. (A call that finds the
/// scratch buffer busy, from another thread, rebuilds into a buffer of its own.) On the CPU, a
/// single-row input can instead take the fused decode + matrix-vector path
/// ([`JitSource::set_fused_matvec`](crate::JitSource::set_fused_matvec)): each row chunk is
/// decoded into a cache-sized buffer and multiplied at once. That path sums in a different
/// order, so it matches the dense layer within float tolerance, not bit for bit.
pub struct JitLinear {
    name: String,
    store: WeightStore,
    bias: Option<Tensor>,
    mode: ModeHandle,
    runtime: Arc<Runtime>,
    id: usize,
}

impl std::fmt::Debug for JitLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JitLinear")
            .field("name", &self.name)
            .field("shape", &self.shape())
            .field("resident", &self.is_resident())
            .field("mode", &self.mode())
            .finish()
    }
}

/// The in-place op that rebuilds a layer's weights into the front of the scratch buffer.
struct Rebuild<'a> {
    store: &'a WeightStore,
    plan: &'a Plan,
}

impl candle_core::InplaceOp1 for Rebuild<'_> {
    fn name(&self) -> &'static str {
        "jitdelta-rebuild"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (rows, cols) = self.store.dims();
        let start = layout.start_offset();
        match storage {
            CpuStorage::F32(v) => self
                .store
                .rebuild_f32(self.plan, &mut v[start..start + rows * cols])
                .map_err(candle_core::Error::wrap),
            _ => candle_core::bail!("the JIT scratch buffer must be f32"),
        }
    }
}

impl JitLinear {
    pub(crate) fn new(
        name: &str,
        store: WeightStore,
        bias: Option<Tensor>,
        mode: ModeHandle,
        runtime: Arc<Runtime>,
    ) -> Self {
        let (rows, cols) = store.dims();
        let id = runtime.register(rows * cols);
        Self {
            name: name.to_string(),
            store,
            bias,
            mode,
            runtime,
            id,
        }
    }

    /// The mode this layer runs in now (the shared handle's).
    pub fn mode(&self) -> Mode {
        self.mode.mode()
    }

    /// The shared mode handle (switching it switches every layer of the source).
    pub fn mode_handle(&self) -> &ModeHandle {
        &self.mode
    }

    /// The stored float format (BF16 for the usual checkpoints).
    pub fn format(&self) -> FloatFormat {
        self.store.format()
    }

    /// Number of row chunks (the unit of Routed mode).
    pub fn chunk_count(&self) -> usize {
        self.store.chunk_count()
    }

    /// Rows per chunk (the last chunk may be shorter).
    pub fn chunk_rows(&self) -> usize {
        self.store.chunk_rows()
    }

    /// Whether the weights are held in the resident layout (else the compact at-rest form).
    pub fn is_resident(&self) -> bool {
        matches!(self.store, WeightStore::Resident(_))
    }

    /// Bytes a draft rebuild reads (the draft planes, or the at-rest base parts).
    pub fn draft_bytes(&self) -> usize {
        self.store.bytes().1
    }

    /// Rebuilds the weights for the current mode into a new f32 `(out, in)` tensor (for
    /// inspection; `forward` reuses the scratch buffer instead).
    pub fn rebuild(&self) -> Result<Tensor> {
        Ok(self.rebuild_owned(&self.mode.plan(&self.name))?)
    }

    fn rebuild_owned(&self, plan: &Plan) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let WeightStore::Gpu(g) = &self.store {
            return g.decode(plan, self.runtime.device())?.to_dtype(DType::F32);
        }
        let (rows, cols) = self.store.dims();
        let mut w = vec![0f32; rows * cols];
        self.store
            .rebuild_f32(plan, &mut w)
            .map_err(candle_core::Error::wrap)?;
        Tensor::from_vec(w, (rows, cols), self.runtime.device())
    }

    fn bad_input(&self, x: &Tensor, dtype: &str) -> candle_core::Error {
        let (_, cols) = self.store.dims();
        candle_core::Error::wrap(Error::InvalidInput(format!(
            "layer `{}` takes {dtype} inputs of shape (.., {cols}), got {:?} {:?}",
            self.name,
            x.dtype(),
            x.dims()
        )))
    }

    fn fused_forward(&self, x: &Tensor, plan: &Plan) -> candle_core::Result<Tensor> {
        let (rows, _) = self.store.dims();
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; rows];
        self.store
            .fused_matvec(plan, &xs, &mut y)
            .map_err(candle_core::Error::wrap)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = rows;
        }
        let y = Tensor::from_vec(y, dims, x.device())?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

#[cfg(feature = "cuda")]
impl JitLinear {
    /// Bias and output dtype after a GPU matmul (which computes in BF16).
    fn gpu_epilogue(&self, y: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::BF16)?)?,
            None => y,
        };
        y.to_dtype(dtype)
    }

    /// Declares `layers` one grouped launch for kernel choice
    /// ([`GpuResident::launch_together`](jitdelta_kernels::gpu::GpuResident::launch_together));
    /// layers not in GPU memory are left out.
    pub(crate) fn launch_together(layers: &[&JitLinear]) {
        let tensors: Vec<_> = layers
            .iter()
            .filter_map(|l| match &l.store {
                WeightStore::Gpu(g) => Some(&g.tensor),
                _ => None,
            })
            .collect();
        jitdelta_kernels::gpu::GpuResident::launch_together(&tensors);
    }

    /// `layers` (all reading `x`) in one launch of the grouped GPU kernel, each output as its
    /// own `forward` gives it bit for bit; `None` where that does not apply (a layer not in GPU
    /// memory, a routed plan, more than 8 rows, tensors the kernel cannot group).
    pub(crate) fn forward_group(
        layers: &[&JitLinear],
        x: &Tensor,
    ) -> candle_core::Result<Option<Vec<Tensor>>> {
        let Some(stores) = layers
            .iter()
            .map(|l| match &l.store {
                WeightStore::Gpu(g) => Some(g.as_ref()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
        else {
            return Ok(None);
        };
        let Some(first) = layers.first() else {
            return Ok(None);
        };
        let plan = first.mode.plan(&first.name);
        // Routed layers run one by one (their flags are per tensor).
        if matches!(plan, crate::mode::Plan::Routed(..))
            || !x.dtype().is_float()
            || layers
                .iter()
                .any(|l| l.mode.plan(&l.name).key() != plan.key())
        {
            return Ok(None);
        }
        let Some(ys) =
            crate::gpu::GpuStore::matmul_group(&stores, &x.to_dtype(DType::BF16)?, &plan)?
        else {
            return Ok(None);
        };
        layers
            .iter()
            .zip(ys)
            .map(|(l, y)| l.gpu_epilogue(y, x.dtype()))
            .collect::<candle_core::Result<Vec<_>>>()
            .map(Some)
    }
}

impl Module for JitLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (rows, cols) = self.store.dims();
        #[cfg(feature = "cuda")]
        if let WeightStore::Gpu(g) = &self.store {
            if x.dims().last() != Some(&cols) || !x.dtype().is_float() {
                return Err(self.bad_input(x, "float"));
            }
            let plan = self.mode.plan(&self.name);
            let y = g.matmul(&x.to_dtype(DType::BF16)?, &plan)?;
            return self.gpu_epilogue(y, x.dtype());
        }
        if x.dims().last() != Some(&cols) || x.dtype() != DType::F32 {
            return Err(self.bad_input(x, "f32"));
        }
        let plan = self.mode.plan(&self.name);
        let device = self.runtime.device();
        if self.runtime.fused() && device.is_cpu() && x.elem_count() == cols {
            return self.fused_forward(x, &plan);
        }
        let bytes = rows * cols * 4;
        if bytes <= self.runtime.cache_budget() {
            let key = (self.id, plan.key());
            let w = match self.runtime.cached(key) {
                Some(w) => w,
                None => {
                    let w = self.rebuild_owned(&plan)?;
                    self.runtime.insert(key, w.clone(), bytes);
                    w
                }
            };
            return linear_forward(x, &w, self.bias.as_ref());
        }
        // No device-side decoder yet: on other devices, rebuild on the host and upload.
        let guard = if device.is_cpu() {
            self.runtime.scratch()?
        } else {
            None
        };
        let Some(scratch) = guard.as_ref().and_then(|g| g.as_ref()) else {
            return linear_forward(x, &self.rebuild_owned(&plan)?, self.bias.as_ref());
        };
        scratch.inplace_op1(&Rebuild {
            store: &self.store,
            plan: &plan,
        })?;
        let w = scratch.narrow(0, 0, rows * cols)?.reshape((rows, cols))?;
        linear_forward(x, &w, self.bias.as_ref())
    }
}

impl LinearLayer for JitLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn shape(&self) -> (usize, usize) {
        self.store.dims()
    }

    fn stored_dtype(&self) -> DType {
        match self.store.format() {
            FloatFormat::BF16 => DType::BF16,
            FloatFormat::F16 => DType::F16,
            FloatFormat::F32 => DType::F32,
        }
    }

    fn bytes_held(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, |b| b.elem_count() * 4);
        self.store.bytes().0 + bias
    }

    fn as_jit(&self) -> Option<&JitLinear> {
        Some(self)
    }
}
