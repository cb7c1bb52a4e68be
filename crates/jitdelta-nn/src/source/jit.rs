//! `JitSource`: projections as JIT layers over a jitdelta file.

use super::{check_shape, tensor_bytes, LayerSource};
use crate::mode::{Mode, ModeHandle};
use crate::runtime::Runtime;
use crate::store::WeightStore;
use crate::{DenseLinear, Error, JitLinear, LinearLayer, Result};
use candle_core::{DType, Device, Tensor};
use jitdelta_format::{JdFile, ResidentTensor, TensorView};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How JIT layers hold their weights in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// The fixed-length resident layout (12 bits a BF16 weight with `draft_bits = 3`, ~75% of
    /// BF16), transcoded at load; `draft_bits` mantissa bits go to the draft (3 gives the
    /// k = 12 draft, 2 the k = 11 draft).
    Resident {
        /// Mantissa bits kept in the draft planes.
        draft_bits: u32,
    },
    /// The compact at-rest form read from the mapped file (~66% of BF16), slower to decode;
    /// the draft is the file's base.
    Compact,
}

/// Load-time options of a [`JitSource`].
#[derive(Clone, Debug)]
pub struct JitOptions {
    /// How the weights are held (default: resident with a k = 12 draft).
    pub layout: WeightLayout,
    /// Bytes of rebuilt f32 layers to keep (LRU); 0 (the default) rebuilds every call.
    pub cache_budget: usize,
    /// Use the fused decode + matvec for single-row inputs on the CPU (default off; it can be
    /// switched later with [`JitSource::set_fused_matvec`]).
    pub fused_matvec: bool,
    /// The initial mode.
    pub mode: Mode,
}

impl Default for JitOptions {
    fn default() -> Self {
        Self {
            layout: WeightLayout::Resident { draft_bits: 3 },
            cache_budget: 0,
            fused_matvec: false,
            mode: Mode::Exact,
        }
    }
}

/// Weights from a jitdelta file: projections become [`JitLinear`] layers that keep their
/// weights compressed; embeddings, norms and biases are decoded exactly at load. All layers
/// share one [`ModeHandle`], one scratch buffer and one cache.
pub struct JitSource {
    file: JdFile,
    origin: String,
    device: Device,
    layout: WeightLayout,
    mode: ModeHandle,
    runtime: Arc<Runtime>,
    layers: Mutex<Vec<Arc<JitLinear>>>,
    plain_bytes: AtomicUsize,
    /// The GPU kernels, compiled for the device on the first layer placed there.
    #[cfg(feature = "cuda")]
    kernels: std::sync::OnceLock<Arc<jitdelta_kernels::gpu::Kernels>>,
}

fn safetensors_dtype(name: &str, dtype: &str) -> Result<DType> {
    Ok(match dtype {
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F32" => DType::F32,
        "F64" => DType::F64,
        "U8" => DType::U8,
        "U32" => DType::U32,
        "I16" => DType::I16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        _ => {
            return Err(Error::UnsupportedDtype {
                name: name.to_string(),
                dtype: dtype.to_string(),
            })
        }
    })
}

impl JitSource {
    /// Opens (memory-maps and validates) a jitdelta file.
    pub fn open(path: impl AsRef<Path>, device: &Device, options: JitOptions) -> Result<Self> {
        let path = path.as_ref();
        let mut source = Self::from_file(JdFile::open(path)?, device, options);
        source.origin = path.display().to_string();
        Ok(source)
    }

    /// Wraps an already open jitdelta file. (An invalid `draft_bits` shows up as an error when
    /// the first layer is built.)
    pub fn from_file(file: JdFile, device: &Device, options: JitOptions) -> Self {
        Self {
            file,
            origin: "a jitdelta file".to_string(),
            device: device.clone(),
            layout: options.layout,
            mode: ModeHandle::new(options.mode),
            runtime: Arc::new(Runtime::new(
                device,
                options.cache_budget,
                options.fused_matvec,
            )),
            layers: Mutex::new(Vec::new()),
            plain_bytes: AtomicUsize::new(0),
            #[cfg(feature = "cuda")]
            kernels: std::sync::OnceLock::new(),
        }
    }

    /// The open file.
    pub fn file(&self) -> &JdFile {
        &self.file
    }

    /// The mode handle every layer of this source shares.
    pub fn mode(&self) -> &ModeHandle {
        &self.mode
    }

    /// Switches every layer of this source to `mode`.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.set_mode(mode)
    }

    /// Turns the fused decode + matvec path for single-row inputs on or off.
    pub fn set_fused_matvec(&self, on: bool) {
        self.runtime.set_fused(on)
    }

    /// The JIT layers handed out so far, in creation order.
    pub fn layers(&self) -> Vec<Arc<JitLinear>> {
        self.layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bytes of the shared scratch buffer (0 until the first rebuild through it).
    pub fn scratch_bytes(&self) -> usize {
        self.runtime.scratch_bytes()
    }

    /// Bytes the LRU cache of rebuilt layers holds now.
    pub fn cache_bytes(&self) -> usize {
        self.runtime.cache_bytes()
    }

    fn view(&self, name: &str) -> Result<TensorView> {
        self.file.tensor(name).map_err(|e| match e {
            jitdelta_format::Error::TensorNotFound(_) => Error::MissingTensor {
                name: name.to_string(),
                origin: self.origin.clone(),
            },
            e => e.into(),
        })
    }

    fn view_checked(&self, name: &str, shape: &[usize]) -> Result<TensorView> {
        let view = self.view(name)?;
        let found: Vec<usize> = view.entry().shape.iter().map(|&d| d as usize).collect();
        check_shape(name, shape, &found)?;
        Ok(view)
    }

    /// Where a resident tensor lives: on a CUDA device, in GPU memory when the kernels can
    /// read it (BF16 with a k = 12 draft); otherwise on the host.
    fn place(&self, r: ResidentTensor) -> Result<WeightStore> {
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() && jitdelta_kernels::reference::check_supported(&r).is_ok() {
            let kernels = match self.kernels.get() {
                Some(k) => k.clone(),
                None => {
                    let stream = self.device.as_cuda_device()?.cuda_stream();
                    let k = Arc::new(jitdelta_kernels::gpu::Kernels::new(stream)?);
                    self.kernels.get_or_init(|| k).clone()
                }
            };
            let layout = jitdelta_kernels::device_layout::DeviceLayout::from_resident(&r)?;
            return Ok(WeightStore::Gpu(Box::new(crate::gpu::GpuStore {
                tensor: kernels.upload_layout(&layout)?,
                low_plane_bytes: layout.l.len(),
                chunk_rows: r.chunk_rows(),
                kernels,
                routed: Default::default(),
            })));
        }
        Ok(WeightStore::Resident(r))
    }

    fn decode_plain(&self, name: &str, view: &TensorView, shape: &[usize]) -> Result<Tensor> {
        let dtype = safetensors_dtype(name, &view.entry().dtype)?;
        let bytes = view.decode_exact()?;
        Ok(Tensor::from_raw_buffer(&bytes, dtype, shape, &self.device)?)
    }
}

impl LayerSource for JitSource {
    fn origin(&self) -> &str {
        &self.origin
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        super::compute_dtype(&self.device)
    }

    fn contains(&self, name: &str) -> bool {
        self.file.tensor_names().any(|n| n == name)
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let view = self.view_checked(name, shape)?;
        let t = self.decode_plain(name, &view, shape)?;
        self.plain_bytes
            .fetch_add(tensor_bytes(&t), Ordering::Relaxed);
        Ok(t)
    }

    fn linear(
        &self,
        name: &str,
        (out, inp): (usize, usize),
        bias: bool,
    ) -> Result<Arc<dyn LinearLayer>> {
        let weight_name = format!("{name}.weight");
        let view = self.view_checked(&weight_name, &[out, inp])?;
        let bias = if bias {
            let bias_name = format!("{name}.bias");
            let b = self.view_checked(&bias_name, &[out])?;
            Some(
                self.decode_plain(&bias_name, &b, &[out])?
                    .to_dtype(self.dtype())?,
            )
        } else {
            None
        };
        if view.format().is_none() {
            // Stored whole (not a split float tensor): a plain dense layer.
            let w = self.decode_plain(&weight_name, &view, &[out, inp])?;
            let layer = DenseLinear::new(name, w.to_dtype(self.dtype())?, bias, w.dtype());
            self.plain_bytes
                .fetch_add(layer.bytes_held(), Ordering::Relaxed);
            return Ok(Arc::new(layer));
        }
        let store = match self.layout {
            WeightLayout::Resident { draft_bits } => self.place(view.to_resident(draft_bits)?)?,
            WeightLayout::Compact => WeightStore::Compact(view),
        };
        let layer = Arc::new(JitLinear::new(
            name,
            store,
            bias,
            self.mode.clone(),
            self.runtime.clone(),
        ));
        self.layers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(layer.clone());
        Ok(layer)
    }

    fn file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.file.aux_file(name)?)
    }

    fn weight_bytes(&self) -> usize {
        let layers: usize = self.layers().iter().map(|l| l.bytes_held()).sum();
        layers + self.plain_bytes.load(Ordering::Relaxed)
    }
}
