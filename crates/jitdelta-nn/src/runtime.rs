//! State shared by the JIT layers of one source: the reusable scratch buffer that rebuilt
//! weights live in, the optional LRU cache of rebuilt layers, and the fused-matvec switch.

use crate::mode::Mode;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Identifies which weights a cached tensor holds: the layer and what it was rebuilt for.
pub(crate) type CacheKey = (usize, (Mode, u64));

struct CacheEntry {
    key: (Mode, u64),
    weight: Tensor,
    bytes: usize,
    last_used: u64,
}

#[derive(Default)]
struct Lru {
    tick: u64,
    used: usize,
    entries: HashMap<usize, CacheEntry>,
}

pub(crate) struct Runtime {
    device: Device,
    next_layer: AtomicUsize,
    /// Elements of the largest layer registered: the scratch size.
    capacity: AtomicUsize,
    scratch: Mutex<Option<Tensor>>,
    budget: usize,
    cache: Mutex<Lru>,
    fused: AtomicBool,
}

impl Runtime {
    pub(crate) fn new(device: &Device, cache_budget: usize, fused: bool) -> Self {
        Self {
            device: device.clone(),
            next_layer: AtomicUsize::new(0),
            capacity: AtomicUsize::new(0),
            scratch: Mutex::new(None),
            budget: cache_budget,
            cache: Mutex::new(Lru::default()),
            fused: AtomicBool::new(fused),
        }
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Registers a layer of `numel` weights; returns its id (the cache key).
    pub(crate) fn register(&self, numel: usize) -> usize {
        self.capacity.fetch_max(numel, Ordering::Relaxed);
        self.next_layer.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn fused(&self) -> bool {
        self.fused.load(Ordering::Relaxed)
    }

    pub(crate) fn set_fused(&self, on: bool) {
        self.fused.store(on, Ordering::Relaxed)
    }

    /// The scratch buffer (a 1-D f32 tensor sized to the largest layer), locked for the caller
    /// and allocated on first use; `None` while another call holds it (the caller then
    /// rebuilds into a buffer of its own rather than wait: no deadlock when forward calls
    /// nest inside rayon tasks).
    pub(crate) fn scratch(&self) -> candle_core::Result<Option<MutexGuard<'_, Option<Tensor>>>> {
        let mut guard = match self.scratch.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(None),
        };
        let capacity = self.capacity.load(Ordering::Relaxed);
        if guard.as_ref().is_none_or(|t| t.elem_count() < capacity) {
            *guard = None; // free the old buffer before allocating the new one
            *guard = Some(Tensor::zeros(capacity, DType::F32, &self.device)?);
        }
        Ok(Some(guard))
    }

    /// Bytes of the scratch buffer (0 until the first rebuild through it).
    pub(crate) fn scratch_bytes(&self) -> usize {
        lock(&self.scratch)
            .as_ref()
            .map_or(0, |t| t.elem_count() * 4)
    }

    pub(crate) fn cache_budget(&self) -> usize {
        self.budget
    }

    /// Bytes the cache holds now.
    pub(crate) fn cache_bytes(&self) -> usize {
        lock(&self.cache).used
    }

    /// A cached rebuild of layer `key.0` for plan key `key.1`, marking it most recently used.
    pub(crate) fn cached(&self, key: CacheKey) -> Option<Tensor> {
        let mut lru = lock(&self.cache);
        lru.tick += 1;
        let tick = lru.tick;
        let e = lru.entries.get_mut(&key.0)?;
        if e.key != key.1 {
            return None;
        }
        e.last_used = tick;
        Some(e.weight.clone())
    }

    /// Stores a rebuilt layer, evicting the least recently used ones to stay in budget.
    pub(crate) fn insert(&self, key: CacheKey, weight: Tensor, bytes: usize) {
        if bytes > self.budget {
            return;
        }
        let mut lru = lock(&self.cache);
        if let Some(old) = lru.entries.remove(&key.0) {
            lru.used -= old.bytes;
        }
        while lru.used + bytes > self.budget {
            let Some(victim) = lru
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(&id, _)| id)
            else {
                break;
            };
            if let Some(old) = lru.entries.remove(&victim) {
                lru.used -= old.bytes;
            }
        }
        lru.tick += 1;
        let last_used = lru.tick;
        lru.used += bytes;
        lru.entries.insert(
            key.0,
            CacheEntry {
                key: key.1,
                weight,
                bytes,
                last_used,
            },
        );
    }
}
