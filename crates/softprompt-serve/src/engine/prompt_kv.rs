//! Prompt keys/values computed once per prompt and kept within a byte budget, and the count
//! of what each batch's prefill computed and reused.
//!
//! Every task's prompts share one [`PromptKvStore`] (`--kv-cache-bytes`): when a new prompt's
//! keys/values would take the cached total over the budget, the least recently used prompts
//! are evicted first. An evicted prompt is simply computed again on its next use (the same
//! forward as the first time, so the same numbers): the budget bounds memory, never answers.

use candle_core::{DType, Tensor};
use softprompt::model::{CausalLm, KvCache, LogitsAt};
use softprompt::Result;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The cached keys/values of every prompt a registry serves, at most `budget` bytes together.
pub struct PromptKvStore {
    budget: usize,
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    entries: HashMap<u64, Entry>,
    /// Bytes of all entries.
    bytes: usize,
    /// Incremented on every use: an entry's `last_used` orders evictions.
    clock: u64,
    next_id: u64,
    evictions: u64,
}

struct Entry {
    kv: Arc<KvCache>,
    bytes: usize,
    last_used: u64,
}

impl PromptKvStore {
    /// A store holding at most `budget` bytes of keys/values.
    pub fn new(budget: usize) -> Self {
        PromptKvStore { budget, state: Mutex::new(StoreState::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of keys/values cached now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Most bytes cached at once (`--kv-cache-bytes`).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Prompts evicted so far.
    pub fn evictions(&self) -> u64 {
        self.lock().evictions
    }

    /// The entry `id`, marked as just used.
    fn touch(&self, id: u64) -> Option<Arc<KvCache>> {
        let mut s = self.lock();
        s.clock += 1;
        let now = s.clock;
        let e = s.entries.get_mut(&id)?;
        e.last_used = now;
        Some(e.kv.clone())
    }

    /// Keeps `kv` as entry `id`, evicting the least recently used entries until it fits; a
    /// cache larger than the whole budget is not kept (it is recomputed on every use).
    fn insert(&self, id: u64, kv: Arc<KvCache>, bytes: usize) {
        if bytes > self.budget {
            tracing::warn!("a prompt's keys/values ({bytes} bytes) exceed --kv-cache-bytes {}: not cached", self.budget);
            return;
        }
        let mut s = self.lock();
        if let Some(old) = s.entries.remove(&id) {
            s.bytes -= old.bytes;
        }
        while s.bytes + bytes > self.budget {
            let Some(oldest) = s.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(&k, _)| k) else {
                break;
            };
            if let Some(e) = s.entries.remove(&oldest) {
                s.bytes -= e.bytes;
                s.evictions += 1;
            }
        }
        s.clock += 1;
        let last_used = s.clock;
        s.bytes += bytes;
        s.entries.insert(id, Entry { kv, bytes, last_used });
    }

    fn remove(&self, id: u64) {
        let mut s = self.lock();
        if let Some(e) = s.entries.remove(&id) {
            s.bytes -= e.bytes;
        }
    }

    fn new_id(&self) -> u64 {
        let mut s = self.lock();
        s.next_id += 1;
        s.next_id
    }
}

/// Keys and values of one prompt run alone (batch 1, positions `0..N-1`): a [`KvCache`] of
/// `N` positions, each layer `[1, H_kv, N, Dh]`, held in its registry's [`PromptKvStore`].
/// Computed by the first batch that needs it, again after an eviction; kept with its task in
/// the registry, so replacing or deleting the task drops it (and its store entry). A registry
/// serves one model, so this is one cache per (prompt, model).
pub struct PromptKv {
    id: u64,
    store: Arc<PromptKvStore>,
    /// Held while computing, so concurrent batches compute a prompt once.
    fill: Mutex<()>,
}

impl Default for PromptKv {
    /// A prompt cache of its own, without a budget.
    fn default() -> Self {
        PromptKv::new(&Arc::new(PromptKvStore::new(usize::MAX)))
    }
}

impl Drop for PromptKv {
    fn drop(&mut self) {
        self.store.remove(self.id);
    }
}

impl PromptKv {
    /// An empty cache whose keys/values will live in `store`.
    pub fn new(store: &Arc<PromptKvStore>) -> Self {
        PromptKv { id: store.new_id(), store: store.clone(), fill: Mutex::new(()) }
    }

    /// Whether the keys/values are cached now (computed and not evicted since).
    pub fn is_filled(&self) -> bool {
        self.store.lock().entries.contains_key(&self.id)
    }

    /// The cache of `prompt` `[N, D]`, computed now (and counted) when missing.
    pub(crate) fn get(&self, m: &dyn CausalLm, prompt: &Tensor, dtype: DType, count: &mut Prefill) -> Result<Arc<KvCache>> {
        if let Some(kv) = self.store.touch(self.id) {
            return Ok(kv);
        }
        let _filling = self.fill.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(kv) = self.store.touch(self.id) {
            return Ok(kv);
        }
        let n = prompt.dim(0)?;
        let x = prompt.to_dtype(dtype)?.unsqueeze(0)?; // [1, N, D]
        let mask = Tensor::ones((1, n), DType::F32, prompt.device())?; // [1, N]
        let mut cache = KvCache::new(m.info().n_layers);
        m.forward(&x, &mask, Some(&mut cache), LogitsAt::Last)?;
        count.computed += n;
        let (kv, bytes) = compact(&cache)?;
        let kv = Arc::new(kv);
        self.store.insert(self.id, kv.clone(), bytes);
        Ok(kv)
    }
}

/// A copy of `cache` holding exactly its positions, and its size in bytes: the forward's
/// cache keeps spare room for appends (`KvCache::append`), which a prompt never needs.
fn compact(cache: &KvCache) -> Result<(KvCache, usize)> {
    let mut out = KvCache::new(cache.layers.len());
    let mut bytes = 0;
    for (slot, layer) in out.layers.iter_mut().zip(&cache.layers) {
        if let Some((k, v)) = layer {
            let (k, v) = (k.force_contiguous()?, v.force_contiguous()?); // [1, H_kv, N, Dh] each, own storage
            bytes += (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
            *slot = Some((k, v));
        }
    }
    Ok((out, bytes))
}

/// How a batch starts, and what its prefill cost: positions run through the model
/// (`computed`; pads not counted, prompt caches filled on the way included) and prompt
/// positions taken from cached keys/values (`reused`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prefill {
    /// Start from the rows' cached prompt keys/values where the layout allows (module doc).
    pub reuse: bool,
    pub computed: usize,
    pub reused: usize,
}

impl Prefill {
    pub fn new(reuse: bool) -> Self {
        Prefill { reuse, computed: 0, reused: 0 }
    }
}
