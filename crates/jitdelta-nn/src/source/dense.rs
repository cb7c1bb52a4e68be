//! `DenseSource`: plain candle tensors from memory-mapped safetensors.

use super::{check_shape, tensor_bytes, LayerSource};
use crate::{DenseLinear, Error, LinearLayer, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use jitdelta_format::convert::ModelSource;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Weights from a safetensors model (one file, or a folder of shards with its `config.json`),
/// memory-mapped. Projections become [`DenseLinear`] layers holding f32 weights.
pub struct DenseSource {
    root: PathBuf,
    origin: String,
    tensors: MmapedSafetensors,
    device: Device,
    bytes: AtomicUsize,
}

impl DenseSource {
    /// Maps the safetensors file or model folder at `path` (shards ordered by
    /// `model.safetensors.index.json` when present).
    pub fn open(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let model = ModelSource::discover(path)?;
        let shards: Vec<PathBuf> = model.shards.iter().map(|s| model.root.join(s)).collect();
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
        // nobody truncating them while the model runs.
        let tensors = unsafe { MmapedSafetensors::multi(&shards)? };
        Ok(Self {
            root: model.root,
            origin: path.display().to_string(),
            tensors,
            device: device.clone(),
            bytes: AtomicUsize::new(0),
        })
    }

    fn load(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let view = self.tensors.get(name).map_err(|_| Error::MissingTensor {
            name: name.to_string(),
            origin: self.origin.clone(),
        })?;
        check_shape(name, shape, view.shape())?;
        Ok(self.tensors.load(name, &self.device)?)
    }

    fn count(&self, t: &Tensor) {
        self.bytes.fetch_add(tensor_bytes(t), Ordering::Relaxed);
    }
}

impl LayerSource for DenseSource {
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
        self.tensors.get(name).is_ok()
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load(name, shape)?;
        self.count(&t);
        Ok(t)
    }

    fn linear(
        &self,
        name: &str,
        (out, inp): (usize, usize),
        bias: bool,
    ) -> Result<Arc<dyn LinearLayer>> {
        let w = self.load(&format!("{name}.weight"), &[out, inp])?;
        let stored = w.dtype();
        let w = w.to_dtype(self.dtype())?;
        let b = if bias {
            Some(
                self.load(&format!("{name}.bias"), &[out])?
                    .to_dtype(self.dtype())?,
            )
        } else {
            None
        };
        let layer = DenseLinear::new(name, w, b, stored);
        self.bytes.fetch_add(layer.bytes_held(), Ordering::Relaxed);
        Ok(Arc::new(layer))
    }

    fn file(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.root.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(Error::Io { path, error }),
        }
    }

    fn weight_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}
