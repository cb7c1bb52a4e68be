//! A per-layer key/value cache that can be truncated (speculative decoding rolls back the
//! tokens the verifier rejects).
//!
//! Each layer keeps its keys and values in one buffer with room for more positions than it holds
//! and writes new positions in place, so a decoding step copies only its own positions instead
//! of the whole cache (what appending with `Tensor::cat` did, every layer, every step).

use crate::{Error, Result};
use candle_core::Tensor;

/// Fewest positions a layer's buffers hold once allocated: short generations never grow.
const MIN_CAPACITY: usize = 256;

/// Keys and values of every attention layer for the positions seen so far, each of shape
/// `(batch, kv_heads, positions, head_dim)`.
///
/// Not `Clone`: the buffers are written in place, so a shallow clone would share them and a
/// forward pass on one copy would overwrite the other's positions; [`KvCache::try_clone`]
/// copies them (which can fail, out of memory).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<Layer>>,
    len: usize,
}

/// One layer's keys and values in one buffer of shape `(2, batch, kv_heads, capacity,
/// head_dim)` (keys, then values: one buffer, so one in-place kernel can write both) whose first
/// `filled` positions hold data (past them: stale or zero positions, never returned).
#[derive(Debug)]
struct Layer {
    kv: Tensor,
    filled: usize,
}

/// The shape, dtype and device of the keys (= of the values) a forward pass appends to a layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KvBlock<'a> {
    /// `(batch, kv_heads, new positions, head_dim)`.
    pub dims: [usize; 4],
    pub dtype: candle_core::DType,
    pub device: &'a candle_core::Device,
}

impl KvCache {
    /// An empty cache for a model with `num_layers` attention layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: std::iter::repeat_with(|| None).take(num_layers).collect(),
            len: 0,
        }
    }

    /// Number of positions held (the position offset of the next forward call).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Keeps the first `len` positions and drops the rest (`len >= self.len()` keeps all).
    /// Also repairs layers left longer than the others by a failed forward call. The buffers
    /// stay allocated: the next positions overwrite the dropped ones.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let len = len.min(self.len);
        for layer in self.layers.iter_mut().flatten() {
            layer.filled = layer.filled.min(len);
        }
        self.len = len;
        Ok(())
    }

    /// Drops every position and frees the buffers.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.len = 0;
    }

    /// A copy with buffers of its own: forward passes on either leave the other as it was.
    pub fn try_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|layer| layer.as_ref().map(Layer::try_clone).transpose())
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            len: self.len,
        })
    }

    /// Appends `k`, `v` (`(batch, kv_heads, new, head_dim)`) to layer `layer` and returns the
    /// layer's full keys and values: views of its buffers, not copies (not contiguous while the
    /// buffers have room to spare). An `append` after a `truncate` writes over positions that
    /// earlier views show: use them before the layer's next `append`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if k.dims() != v.dims() || k.rank() != 4 {
            return Err(Error::InvalidInput(format!(
                "KV cache layer {layer}: keys {:?} and values {:?} are not one \
                 (batch, kv_heads, positions, head_dim) shape",
                k.dims(),
                v.dims()
            )));
        }
        let block = KvBlock {
            dims: k.dims4()?.into(),
            dtype: k.dtype(),
            device: k.device(),
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        // Each half of the buffer is contiguous: keys and values go in with one copy each.
        self.append_with(layer, block, |kv, start| {
            kv.get(0)?.slice_set(&k, 2, start)?;
            Ok(kv.get(1)?.slice_set(&v, 2, start)?)
        })
    }

    /// Appends a block of `block.dims` positions to layer `layer` that `write` puts in place:
    /// it gets the layer's buffer, `(2, batch, kv_heads, capacity, head_dim)` (keys, then
    /// values), and the position to write at, with room for the block. Returns the layer's
    /// keys and values as [`KvCache::append`] does. Lets one kernel write keys and values
    /// straight into the cache.
    pub(crate) fn append_with(
        &mut self,
        layer: usize,
        block: KvBlock<'_>,
        write: impl FnOnce(&Tensor, usize) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::InvalidInput(format!("KV cache has no layer {layer}")))?;
        let state = match slot {
            Some(state) => state,
            None => slot.insert(Layer::with_capacity(
                &block,
                capacity_for(block.dims[2], 0),
            )?),
        };
        state.append_with(&block, write)
    }

    /// Records that a forward pass added `n` positions to every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

impl Layer {
    /// An empty buffer for blocks like `block` with room for `capacity` positions.
    fn with_capacity(block: &KvBlock<'_>, capacity: usize) -> Result<Self> {
        let [b, heads, _, d] = block.dims;
        Ok(Self {
            kv: Tensor::zeros((2, b, heads, capacity, d), block.dtype, block.device)?,
            filled: 0,
        })
    }

    fn capacity(&self) -> usize {
        self.kv.dims()[3]
    }

    /// Lets `write` put `block` after the filled positions (growing first if it does not fit)
    /// and returns views of the filled keys and values.
    fn append_with(
        &mut self,
        block: &KvBlock<'_>,
        write: impl FnOnce(&Tensor, usize) -> Result<()>,
    ) -> Result<(Tensor, Tensor)> {
        let [b, heads, new, d] = block.dims;
        let held = self.kv.dims();
        if held[1..3] != [b, heads] || held[4] != d || self.kv.dtype() != block.dtype {
            return Err(Error::InvalidInput(format!(
                "KV cache holds keys (batch, kv_heads, _, head_dim) = {:?} of {:?}, appending \
                 {:?} of {:?}",
                [held[1], held[2], held[3], held[4]],
                self.kv.dtype(),
                block.dims,
                block.dtype
            )));
        }
        let (start, end) = (self.filled, self.filled + new);
        if end > self.capacity() {
            self.grow(end)?;
        }
        write(&self.kv, start)?;
        self.filled = end;
        Ok((
            self.kv.get(0)?.narrow(2, 0, end)?,
            self.kv.get(1)?.narrow(2, 0, end)?,
        ))
    }

    /// Moves to a buffer with room for at least `needed` positions.
    fn grow(&mut self, needed: usize) -> Result<()> {
        let capacity = capacity_for(needed, self.capacity());
        let [_, b, heads, _, d] = self.kv.dims5()?.into();
        let block = KvBlock {
            dims: [b, heads, 0, d],
            dtype: self.kv.dtype(),
            device: self.kv.device(),
        };
        let mut grown = Self::with_capacity(&block, capacity)?;
        // The old buffer is contiguous: its filled prefix goes over in one copy (with the stale
        // tail past it, if any, which stays unread).
        grown.kv.slice_set(&self.kv, 3, 0)?;
        grown.filled = self.filled;
        *self = grown;
        Ok(())
    }

    fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            kv: self.kv.copy()?,
            filled: self.filled,
        })
    }
}

/// Capacity of a layer's new buffers when `needed` positions outgrow `current`: double (so a
/// generation of `n` positions copies `O(n)` elements in all, not `O(n^2)`), at least
/// [`MIN_CAPACITY`], exactly `needed` where one block (a long prompt) asks for more.
fn capacity_for(needed: usize, current: usize) -> usize {
    needed.max(2 * current).max(MIN_CAPACITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Keys or values `(2, 3, n, 4)` of positions `first..first + n`, every element distinct
    /// and offset by `salt`, so a misplaced or stale position shows.
    fn positions(first: usize, n: usize, salt: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * 3 * n * 4)
            .map(|i| {
                let (b, h, p, e) = (i / (3 * n * 4), i / (n * 4) % 3, i / 4 % n, i % 4);
                salt + (b * 100_000 + h * 10_000 + (first + p) * 10 + e) as f32
            })
            .collect();
        Tensor::from_vec(data, (2, 3, n, 4), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// The cache beside the `Tensor::cat` cache it replaced, as the reference.
    struct Checked {
        cache: KvCache,
        concat: Vec<Option<(Tensor, Tensor)>>,
    }

    impl Checked {
        fn new(layers: usize) -> Self {
            Self {
                cache: KvCache::new(layers),
                concat: vec![None; layers],
            }
        }

        /// Appends `n` positions to every layer (values offset by `salt`) and checks each
        /// layer returns what concatenation gives.
        fn append(&mut self, n: usize, salt: f32) {
            let len = self.cache.len();
            for (l, concat) in self.concat.iter_mut().enumerate() {
                let salt = salt + l as f32 * 0.25;
                let (k, v) = (positions(len, n, salt), positions(len, n, salt + 0.125));
                let want = match concat.take() {
                    Some((pk, pv)) => (
                        Tensor::cat(&[&pk, &k], 2).unwrap(),
                        Tensor::cat(&[&pv, &v], 2).unwrap(),
                    ),
                    None => (k.clone(), v.clone()),
                };
                let got = self.cache.append(l, k, v).unwrap();
                assert_eq!(got.0.dims(), &[2, 3, len + n, 4]);
                assert_eq!(values(&got.0), values(&want.0), "layer {l} keys");
                assert_eq!(values(&got.1), values(&want.1), "layer {l} values");
                *concat = Some(want);
            }
            self.cache.advance(n);
        }

        fn truncate(&mut self, len: usize) {
            self.cache.truncate(len).unwrap();
            let len = self.cache.len();
            for (k, v) in self.concat.iter_mut().flatten() {
                *k = k.narrow(2, 0, len).unwrap();
                *v = v.narrow(2, 0, len).unwrap();
            }
        }

        fn capacity(&self) -> usize {
            self.cache.layers[0].as_ref().unwrap().capacity()
        }
    }

    #[test]
    fn appends_across_growth_match_concatenation() {
        let mut c = Checked::new(2);
        assert!(c.cache.is_empty());
        c.append(5, 0.0);
        assert_eq!(c.capacity(), MIN_CAPACITY);
        while c.cache.len() + 7 <= MIN_CAPACITY {
            c.append(7, 0.0);
        }
        // Past the capacity: the buffers double and keep every position.
        c.append(7, 0.0);
        assert_eq!(c.capacity(), 2 * MIN_CAPACITY);
        // A block longer than the doubled capacity gets exactly the room it needs.
        c.append(4 * MIN_CAPACITY, 0.0);
        assert_eq!(c.capacity(), c.cache.len());
        c.append(1, 0.0);
        assert_eq!(c.cache.len(), c.cache.layers[1].as_ref().unwrap().filled);
    }

    #[test]
    fn truncate_then_append_overwrites_and_repairs_layers() {
        let mut c = Checked::new(3);
        c.append(6, 0.0);
        c.truncate(2);
        assert_eq!(c.cache.len(), 2);
        // Other values at the dropped positions: the views hold the new ones.
        c.append(3, 0.5);
        // Across a growth too: the stale tail copied along stays unread.
        c.truncate(1);
        c.append(MIN_CAPACITY + 3, 0.75);
        // A failed pass that appended to layer 0 only: truncating to the length repairs it.
        let len = c.cache.len();
        c.cache
            .append(0, positions(len, 4, 1.0), positions(len, 4, 1.0))
            .unwrap();
        c.truncate(len);
        assert!(c.cache.layers.iter().flatten().all(|l| l.filled == len));
        c.append(2, 0.0);
        c.truncate(len + 9);
        assert_eq!(c.cache.len(), len + 2);
        c.truncate(0);
        assert!(c.cache.is_empty());
        c.append(4, 0.5);
        c.cache.clear();
        assert!(c.cache.is_empty() && c.cache.layers.iter().all(Option::is_none));
        c.concat.iter_mut().for_each(|kv| *kv = None);
        c.append(1, 0.0);
    }

    /// A writer gets the layer's whole buffer and the first new position, after any growth; a
    /// writer's error leaves the layer as it was.
    #[test]
    fn append_with_hands_the_writer_the_buffer_and_position() {
        let mut c = Checked::new(1);
        c.append(MIN_CAPACITY - 1, 0.0);
        let block = |n| KvBlock {
            dims: [2, 3, n, 4],
            dtype: DType::F32,
            device: &Device::Cpu,
        };
        let failed = c.cache.append_with(0, block(5), |kv, start| {
            assert_eq!(
                (kv.dims(), start),
                (&[2, 2, 3, 2 * MIN_CAPACITY, 4][..], MIN_CAPACITY - 1)
            );
            Err(Error::InvalidInput("writer failed".into()))
        });
        assert!(matches!(failed, Err(Error::InvalidInput(_))));
        assert_eq!(c.cache.layers[0].as_ref().unwrap().filled, MIN_CAPACITY - 1);
        // The next block lands where the failed one would have.
        c.append(2, 0.5);
        let wrong = KvBlock {
            dtype: DType::BF16,
            ..block(1)
        };
        assert!(c.cache.append_with(0, wrong, |_, _| Ok(())).is_err());
        assert!(c.cache.append_with(1, block(1), |_, _| Ok(())).is_err());
    }

    #[test]
    fn a_clone_has_buffers_of_its_own() {
        let mut original = Checked::new(2);
        original.append(8, 0.0);
        let mut copy = Checked {
            cache: original.cache.try_clone().unwrap(),
            concat: original.concat.clone(),
        };
        copy.truncate(3);
        copy.append(2, 0.5);
        assert_eq!((original.cache.len(), copy.cache.len()), (8, 5));
        // The original still holds its own positions 3 and 4.
        original.append(1, 0.0);
        copy.append(1, 0.0);
    }

    /// The decoder's attention multiplies the views as they are: the products must be those of
    /// contiguous copies, bit for bit (greedy speculative decoding relies on it).
    #[test]
    fn products_of_views_equal_those_of_contiguous_copies() {
        let tensor = |dims: (usize, usize, usize, usize), seed: usize| {
            let n = dims.0 * dims.1 * dims.2 * dims.3;
            let data = (0..n)
                .map(|i| ((i * 7919 + seed) % 1009) as f32 / 504.5 - 1.0)
                .collect();
            Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
        };
        let bits = |t: Tensor| -> Vec<u32> { values(&t).iter().map(|x| x.to_bits()).collect() };
        let mut cache = KvCache::new(1);
        for (step, n) in [37, 1, 300].into_iter().enumerate() {
            let (k, v) = cache
                .append(
                    0,
                    tensor((2, 3, n, 64), step),
                    tensor((2, 3, n, 64), step + 9),
                )
                .unwrap();
            cache.advance(n);
            assert!(!k.is_contiguous() && !v.is_contiguous());
            let q = tensor((2, 3, 4, 64), step + 5);
            let p = tensor((2, 3, 4, cache.len()), step + 7);
            let (kc, vc) = (k.contiguous().unwrap(), v.contiguous().unwrap());
            assert_eq!(
                bits(q.matmul(&k.t().unwrap()).unwrap()),
                bits(q.matmul(&kc.t().unwrap()).unwrap())
            );
            assert_eq!(bits(p.matmul(&v).unwrap()), bits(p.matmul(&vc).unwrap()));
        }
    }

    #[test]
    fn rejects_mismatched_shapes_and_layers() {
        let mut cache = KvCache::new(1);
        let k = positions(0, 2, 0.0);
        let bad = |r: Result<(Tensor, Tensor)>| matches!(r, Err(Error::InvalidInput(_)));
        assert!(bad(cache.append(1, k.clone(), k.clone())));
        assert!(bad(cache.append(0, k.clone(), positions(0, 3, 0.0))));
        let flat = Tensor::zeros((2, 3, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(bad(cache.append(0, flat.clone(), flat)));
        cache.append(0, k.clone(), k).unwrap();
        let other = Tensor::zeros((1, 3, 1, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(bad(cache.append(0, other.clone(), other)));
    }
}
