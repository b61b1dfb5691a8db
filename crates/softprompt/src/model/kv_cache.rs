//! The KV cache of generation: keys and values of past positions, per layer.

use crate::Result;
use candle_core::Tensor;

/// Keys and values of past positions, one entry per layer, each `[B, H_kv, P, Dh]`.
/// `cross` is used by encoder-decoder models for the (fixed) encoder keys/values.
#[derive(Debug, Default)]
pub struct KvCache {
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    pub cross: Vec<Option<(Tensor, Tensor)>>,
    /// Per layer, buffers `[B, H_kv, C, Dh]` with room for `C >= P` positions that the
    /// entries of `layers` are views of, and how many positions were written into them (see
    /// [`KvCache::append`]). Owned by this cache alone: a clone starts without them.
    room: Vec<Option<(Tensor, Tensor, usize)>>,
}

impl Clone for KvCache {
    fn clone(&self) -> Self {
        KvCache {
            layers: self.layers.clone(),
            cross: self.cross.clone(),
            room: Vec::new(),
        }
    }
}

/// Whether `view` is the first `P` positions (dim 2) of the buffer `buf`, sharing its storage.
fn is_prefix_of(view: &Tensor, buf: &Tensor) -> bool {
    let storage = |t: &Tensor| &*t.storage_and_layout().0 as *const candle_core::Storage;
    let (vd, bd) = (view.dims(), buf.dims());
    vd.len() == 4
        && bd.len() == 4
        && vd[..2] == bd[..2]
        && vd[3] == bd[3]
        && vd[2] <= bd[2]
        && view.stride() == buf.stride()
        && view.layout().start_offset() == buf.layout().start_offset()
        && std::ptr::eq(storage(view), storage(buf))
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            cross: vec![None; n_layers],
            room: Vec::new(),
        }
    }

    /// Number of cached positions `P`.
    pub fn seq_len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// Appends `k`, `v` (`[B, H, T, Dh]`) to layer `i` and returns the full keys/values.
    ///
    /// Without gradients, the cache keeps each layer in buffers with room for more positions
    /// and stores (and returns) views of their first `P + T` positions, so that a decoding
    /// step writes its own position only instead of copying the whole cache into a fresh,
    /// larger tensor (that copy and its page faults were most of GPT-2's generation time). A
    /// buffer is only written past every position written before (so never under a view
    /// handed out before), and a clone of the cache does not share it.
    pub fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        if self.room.len() < self.layers.len() {
            self.room.resize(self.layers.len(), None);
        }
        let tracked = k.track_op() || v.track_op();
        let (k, v) = match (self.layers[i].take(), self.room[i].take()) {
            (Some((pk, pv)), Some((bk, bv, written)))
                if !tracked
                    && is_prefix_of(&pk, &bk)
                    && is_prefix_of(&pv, &bv)
                    && pk.dim(2)? == written
                    && pv.dim(2)? == written
                    && written + k.dim(2)? <= bk.dim(2)? =>
            {
                bk.slice_set(&k.contiguous()?, 2, written)?;
                bv.slice_set(&v.contiguous()?, 2, written)?;
                let n = written + k.dim(2)?;
                let out = (bk.narrow(2, 0, n)?, bv.narrow(2, 0, n)?);
                self.room[i] = Some((bk, bv, n));
                out
            }
            (prev, _) => {
                let (k, v) = match prev {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                if tracked {
                    // Gradients flow through the concatenation, not through a buffer write.
                    self.layers[i] = Some((k.clone(), v.clone()));
                    return Ok((k, v));
                }
                // Room for half as many positions again (at least 32); untouched room is never
                // paged in.
                let n = k.dim(2)?;
                let cap = n + (n / 2).max(32);
                let grow = |x: &Tensor| -> Result<Tensor> {
                    let (b, h, _, d) = x.dims4()?;
                    let buf = Tensor::zeros((b, h, cap, d), x.dtype(), x.device())?;
                    buf.slice_set(&x.contiguous()?, 2, 0)?;
                    Ok(buf)
                };
                let (bk, bv) = (grow(&k)?, grow(&v)?);
                let out = (bk.narrow(2, 0, n)?, bv.narrow(2, 0, n)?);
                self.room[i] = Some((bk, bv, n));
                out
            }
        };
        self.layers[i] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Keeps only the given batch rows (used when generation drops finished rows or beams).
    pub fn index_rows(&mut self, rows: &Tensor) -> Result<()> {
        for entry in self.layers.iter_mut().chain(self.cross.iter_mut()) {
            if let Some((k, v)) = entry.take() {
                // Views into `room` are strided; index_select wants contiguous input.
                let (k, v) = (k.contiguous()?, v.contiguous()?);
                *entry = Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    /// `KvCache::append` writes into buffers with spare room: what it returns must equal the
    /// plain concatenation, and views handed out earlier, clones and rewound caches must
    /// never see another append's positions.
    #[test]
    fn kv_cache_room_never_aliases() {
        use super::KvCache;
        let dev = Device::Cpu;
        let step = |seed: usize, t: usize| {
            let n = 2 * 3 * t * 4;
            let v: Vec<f32> = (0..n).map(|i| (seed * 1000 + i) as f32).collect();
            Tensor::from_vec(v, (2, 3, t, 4), &dev).unwrap() // [B, H, T, Dh]
        };
        let vals = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut cache = KvCache::new(1);
        let mut want_k = step(0, 5);
        cache.append(0, want_k.clone(), want_k.clone()).unwrap();
        let mut views = Vec::new();
        // Past the room of the first buffer (5 + 32 positions): a second buffer.
        for s in 1..45 {
            let x = step(s, 1);
            want_k = Tensor::cat(&[&want_k, &x], 2).unwrap();
            let (k, v) = cache.append(0, x.clone(), x).unwrap();
            assert_eq!(vals(&k), vals(&want_k), "step {s}");
            assert_eq!(vals(&v), vals(&want_k), "step {s}");
            views.push((k, v, want_k.clone()));
        }
        // A clone and the original append different positions.
        let mut other = cache.clone();
        let (a, _) = cache.append(0, step(100, 2), step(100, 2)).unwrap();
        let (b, _) = other.append(0, step(200, 2), step(200, 2)).unwrap();
        assert_eq!(
            vals(&a),
            vals(&Tensor::cat(&[&want_k, &step(100, 2)], 2).unwrap())
        );
        assert_eq!(
            vals(&b),
            vals(&Tensor::cat(&[&want_k, &step(200, 2)], 2).unwrap())
        );
        // Rewound to an earlier view, then appended: the longer view keeps its values.
        cache.layers[0] = Some((views[40].0.clone(), views[40].1.clone()));
        cache.append(0, step(300, 1), step(300, 1)).unwrap();
        assert_eq!(
            vals(&a),
            vals(&Tensor::cat(&[&want_k, &step(100, 2)], 2).unwrap())
        );
        for (k, v, want) in &views {
            assert_eq!(vals(k), vals(want));
            assert_eq!(vals(v), vals(want));
        }
    }
}
