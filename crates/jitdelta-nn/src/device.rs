//! Opening a CUDA device for decoding.

use crate::Result;
use candle_core::Device;

/// CUDA device `ordinal` as candle opens it, with cudarc's per-allocation event tracking
/// switched off when built with the `cuda` feature.
///
/// cudarc creates two CUDA events for every buffer it allocates and destroys them with it. It
/// only records or waits on them when a context runs several streams, and candle queues all work
/// on one. A decode step allocates a few hundred small tensors and is bound by host time (about
/// 5 us an op on an H100 host, docs/benchmarks.md), so the unused events are pure overhead.
/// Use [`Device::new_cuda`] instead if the same context also runs work on streams of your own.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    // SAFETY: candle's device queues every op on its single stream, where cudarc never uses
    // the events; no other stream of this context is created by this crate.
    unsafe {
        device.as_cuda_device()?.disable_event_tracking()
    };
    Ok(device)
}
