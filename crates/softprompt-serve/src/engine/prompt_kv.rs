//! Prompt keys/values computed once per prompt and kept with its task, and the count of
//! what each batch's prefill computed and reused.

use candle_core::{DType, Tensor};
use softprompt::model::{CausalLm, KvCache, LogitsAt};
use softprompt::Result;
use std::sync::{Arc, Mutex, MutexGuard};

/// Keys and values of one prompt run alone (batch 1, positions `0..N-1`): a [`KvCache`] of
/// `N` positions, each layer `[1, H_kv, N, Dh]`. Empty until the first batch that needs it
/// fills it; kept with its task in the registry, so replacing or deleting the task drops it.
/// A registry serves one model, so this is one cache per (prompt, model).
#[derive(Default)]
pub struct PromptKv(Mutex<Option<Arc<KvCache>>>);

impl PromptKv {
    /// Whether the keys/values have been computed.
    pub fn is_filled(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Arc<KvCache>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache of `prompt` `[N, D]`, computed now (and counted) when missing.
    pub(crate) fn get(&self, m: &dyn CausalLm, prompt: &Tensor, dtype: DType, count: &mut Prefill) -> Result<Arc<KvCache>> {
        let mut slot = self.lock();
        if let Some(kv) = slot.as_ref() {
            return Ok(kv.clone());
        }
        let n = prompt.dim(0)?;
        let x = prompt.to_dtype(dtype)?.unsqueeze(0)?; // [1, N, D]
        let mask = Tensor::ones((1, n), DType::F32, prompt.device())?; // [1, N]
        let mut cache = KvCache::new(m.info().n_layers);
        m.forward(&x, &mask, Some(&mut cache), LogitsAt::Last)?;
        count.computed += n;
        let kv = Arc::new(cache);
        *slot = Some(kv.clone());
        Ok(kv)
    }
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
