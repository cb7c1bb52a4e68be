//! How JIT layers rebuild their weights: exact, draft, or routed per row chunk.
//!
//! A [`ModeHandle`] is shared by every [`JitLinear`](crate::JitLinear) of a source, so one call
//! switches a whole model between modes, with no reload. Routed mode reads, per layer name, the
//! set of row chunks whose exact residual is decoded; the hook a chunk router drives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

/// Which weights a JIT layer rebuilds for its matmul.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Every weight bit-identical to the source checkpoint.
    #[default]
    Exact,
    /// The base (draft) value of every weight: no residual is read.
    Draft,
    /// The draft everywhere, plus the exact residual of the row chunks routed to each layer
    /// ([`ModeHandle::set_route`]); a layer with no route is all draft.
    Routed,
}

impl Mode {
    fn to_u8(self) -> u8 {
        match self {
            Mode::Exact => 0,
            Mode::Draft => 1,
            Mode::Routed => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Mode::Exact,
            1 => Mode::Draft,
            _ => Mode::Routed,
        }
    }
}

/// A set of row-chunk indices of one layer (a bit set).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkSet {
    words: Vec<u64>,
}

impl ChunkSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds chunk `c`.
    pub fn insert(&mut self, c: usize) {
        let w = c / 64;
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << (c % 64);
    }

    /// Whether chunk `c` is in the set.
    pub fn contains(&self, c: usize) -> bool {
        self.words
            .get(c / 64)
            .is_some_and(|w| w & (1 << (c % 64)) != 0)
    }

    /// Number of chunks in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The chunks in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            (0..64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i * 64 + b)
        })
    }
}

impl FromIterator<usize> for ChunkSet {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut s = Self::new();
        for c in iter {
            s.insert(c);
        }
        s
    }
}

/// What one layer rebuilds for one call: a snapshot of the mode and of its route.
#[derive(Clone, Debug)]
pub(crate) enum Plan {
    Exact,
    Draft,
    /// The routed chunks, and a stamp that changes whenever this layer's route is replaced
    /// (0 for "no route": all draft).
    Routed(Option<Arc<ChunkSet>>, u64),
}

impl Plan {
    /// Whether chunk `c` is rebuilt exactly.
    pub(crate) fn exact(&self, c: usize) -> bool {
        match self {
            Plan::Exact => true,
            Plan::Draft => false,
            Plan::Routed(set, _) => set.as_ref().is_some_and(|s| s.contains(c)),
        }
    }

    /// A key that differs between plans that rebuild different weights.
    pub(crate) fn key(&self) -> (Mode, u64) {
        match self {
            Plan::Exact => (Mode::Exact, 0),
            Plan::Draft => (Mode::Draft, 0),
            Plan::Routed(_, stamp) => (Mode::Routed, *stamp),
        }
    }
}

#[derive(Debug, Default)]
struct Routes {
    next_stamp: u64,
    by_layer: HashMap<String, (Arc<ChunkSet>, u64)>,
}

#[derive(Debug)]
struct ModeState {
    mode: AtomicU8,
    routes: RwLock<Routes>,
}

/// A shared, cheap handle on the mode of a set of JIT layers (clone it freely: clones share
/// state). Reading the mode is one atomic load.
#[derive(Clone, Debug)]
pub struct ModeHandle {
    inner: Arc<ModeState>,
}

impl Default for ModeHandle {
    fn default() -> Self {
        Self::new(Mode::Exact)
    }
}

impl ModeHandle {
    /// A new handle starting in `mode`, with no routes.
    pub fn new(mode: Mode) -> Self {
        Self {
            inner: Arc::new(ModeState {
                mode: AtomicU8::new(mode.to_u8()),
                routes: RwLock::new(Routes::default()),
            }),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        Mode::from_u8(self.inner.mode.load(Ordering::Acquire))
    }

    /// Switches every layer sharing this handle to `mode` (takes effect at their next call).
    pub fn set_mode(&self, mode: Mode) {
        self.inner.mode.store(mode.to_u8(), Ordering::Release);
    }

    fn routes(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        self.inner.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn routes_mut(&self) -> std::sync::RwLockWriteGuard<'_, Routes> {
        self.inner.routes.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the row chunks of layer `layer` (a projection name such as
    /// `model.layers.3.mlp.up_proj`) that Routed mode decodes exactly.
    pub fn set_route(&self, layer: &str, chunks: ChunkSet) {
        let mut r = self.routes_mut();
        r.next_stamp += 1;
        let stamp = r.next_stamp;
        r.by_layer
            .insert(layer.to_string(), (Arc::new(chunks), stamp));
    }

    /// Removes every route: Routed mode then equals Draft mode until routes are set again.
    pub fn clear_routes(&self) {
        self.routes_mut().by_layer.clear();
    }

    /// The route of `layer`, if one is set.
    pub fn route(&self, layer: &str) -> Option<Arc<ChunkSet>> {
        self.routes().by_layer.get(layer).map(|(s, _)| s.clone())
    }

    /// What `layer` rebuilds now.
    pub(crate) fn plan(&self, layer: &str) -> Plan {
        match self.mode() {
            Mode::Exact => Plan::Exact,
            Mode::Draft => Plan::Draft,
            Mode::Routed => match self.routes().by_layer.get(layer) {
                Some((set, stamp)) => Plan::Routed(Some(set.clone()), *stamp),
                None => Plan::Routed(None, 0),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_set_basics() {
        let s: ChunkSet = [3, 70, 3, 0].into_iter().collect();
        assert_eq!(s.len(), 3);
        assert!(s.contains(0) && s.contains(3) && s.contains(70));
        assert!(!s.contains(1) && !s.contains(1000));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0, 3, 70]);
        assert!(ChunkSet::new().is_empty());
    }

    #[test]
    fn handle_is_shared_and_routes_restamp() {
        let a = ModeHandle::default();
        let b = a.clone();
        b.set_mode(Mode::Routed);
        assert_eq!(a.mode(), Mode::Routed);
        assert_eq!(a.plan("x").key(), (Mode::Routed, 0));
        a.set_route("x", [1].into_iter().collect());
        let k1 = a.plan("x").key();
        a.set_route("x", [2].into_iter().collect());
        let k2 = a.plan("x").key();
        assert_ne!(k1, k2);
        assert!(a.plan("x").exact(2) && !a.plan("x").exact(1));
        a.clear_routes();
        assert!(!a.plan("x").exact(2));
        a.set_mode(Mode::Exact);
        assert!(a.plan("x").exact(12345));
    }
}
