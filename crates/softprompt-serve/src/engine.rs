//! Batched forwards over rows that each carry their own prompt (decoder-only models).
//!
//! Every row is a request's input `x_i` (`S_i` tokens) after one of its task's prompts `P_i`
//! (`N_i` rows; with `prompt_after_bos` the prefix `[embed(BOS); P]`), so prompts of different
//! lengths (different tasks) share one forward pass. The reference answer of a row is the
//! row run alone, `[P_i; embed(x_i)]` at positions `0..N_i+S_i-1`.
//!
//! **Prompt keys/values computed once.** A prompt's per-layer keys and values do not depend
//! on what follows it (causal attention), so each prompt is run alone once (batch 1,
//! positions `0..N_i-1`) and its [`PromptKv`] kept with its task; a batch then starts from a
//! KV cache assembled from its rows' cached prompts and runs only the input tokens. The
//! cache holds `C = max N_i` positions, row `i`'s prompt in the last `N_i` (left padded, pads
//! masked); the new positions are the inputs, left padded to `T = max S_i`:
//!
//! ```text
//! cache (C):   [pad x (C-N_i); P_i]      new (T):   [pad x (T-S_i); x_i]
//! ```
//!
//! The difficulty is positions: the model numbers the new positions `C..C+T-1` for every
//! row, so `x_i` sits at `C+T-S_i..`, while its cached prompt was computed at `0..N_i-1`.
//! - Rotary models (Llama family): attention sees positions only through the rotation of
//!   queries and keys, and `R(a + b) = R(b) R(a)`, so the cached keys are rotated once more
//!   by `C+T-S_i-N_i` (`CausalLm::shift_cache`, in the model's own pair layout: adjacent pairs
//!   for GGUF weights, halves for Hugging Face ones). The prompt then sits at
//!   `C+T-S_i-N_i..C+T-S_i-1`, right before `x_i`, exactly as in the row alone; a key's slot
//!   in the cache does not matter, and every pad has zero attention weight. Values carry no
//!   position. Of the other options, keeping keys unrotated needs a model change at every
//!   layer and step, and per-row position offsets change every backbone's forward; one
//!   rotation per (row, layer) at the start of a batch is cheap and leaves the models as
//!   they are.
//! - Absolute positions (GPT-2) cannot be moved. The cache then holds the first `C = min N_i`
//!   prompt positions of every row, at their own positions `0..C-1`, and the new positions
//!   are `[P_i[C..]; x_i]`, `C..N_i+S_i-1`, the row alone exactly. Rows shorter than the
//!   longest are padded on the right, which causal attention never sees; that is fine for
//!   classification (one forward), but generation continues after the last position, so the
//!   batcher only groups generations of equal `N_i + S_i` for such models (no padding).
//!   (An ensemble whose prompts differ in length brings rows of several lengths by itself;
//!   its generation on GPT-2 is left padded, so not exact: a known limitation.)
//!
//! Without reuse (`Prefill::reuse` false, a row without a `PromptKv`, an empty input, or
//! absolute positions with unequal lengths in generation) the whole row runs,
//! `[P_i; embed(x_i)]` padded to the longest `N_i + S_i`: on the left for generation (with
//! rotary embeddings attention depends only on relative positions and masked pads get
//! exactly zero weight, so this equals the row alone up to float rounding, well under 1e-4),
//! on the right for classification (exact for any model).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt::load::Model;
use softprompt::model::{Backbone, CausalLm, KvCache, LogitsAt};
use softprompt::Result;
use std::sync::{Arc, Mutex, MutexGuard};

/// Decoding parameters of one request.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax); otherwise sample from `softmax(scores / temperature)`.
    pub temperature: f32,
    /// Stop as soon as the decoded text contains one of these (cut before it).
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

/// One generation request: its task's prompts (an ensemble averages log-probabilities at
/// every step) and the tokenized input.
pub struct GenItem {
    pub prompts: Vec<Tensor>,
    /// The prompts' cached keys/values, in the same order (the task's `prompt_kv`); a prompt
    /// without one is run in full.
    pub prompt_kv: Vec<Arc<PromptKv>>,
    pub source: Vec<u32>,
    pub params: GenParams,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GenOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Log-probability of each chosen token (mean over the ensemble's prompts).
    pub logprobs: Vec<f32>,
    /// `eos`, `stop`, `length` or `cancelled`.
    pub finish_reason: &'static str,
}

/// One classification request: prompts, tokenized input and tokenized label targets.
pub struct ClsItem {
    pub prompts: Vec<Tensor>,
    /// As [`GenItem::prompt_kv`].
    pub prompt_kv: Vec<Arc<PromptKv>>,
    pub source: Vec<u32>,
    pub label_targets: Vec<Vec<u32>>,
}

#[derive(Clone, Debug)]
pub struct ClsOutput {
    /// Per label, the mean over prompts of the target's log-likelihood.
    pub scores: Vec<f32>,
    /// `[n_prompts][n_labels]` log-likelihoods.
    pub per_prompt: Vec<Vec<f32>>,
}

/// The decoder-only backbone of `model`, or an error for encoder-decoder models.
pub fn causal(model: &Model) -> Result<&dyn CausalLm> {
    match &model.backbone {
        Backbone::Causal(m) => Ok(m.as_ref()),
        Backbone::Seq2Seq(_) => softprompt::bail!(
            "serving supports decoder-only models (Llama family, GPT-2); {} is encoder-decoder",
            model.path.display()
        ),
    }
}


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
    fn get(&self, m: &dyn CausalLm, prompt: &Tensor, dtype: DType, count: &mut Prefill) -> Result<Arc<KvCache>> {
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

/// One row of a batch: the prefix before its tokens (`[N, D]`), that prefix's cached
/// keys/values, and the tokens.
struct RowSpec<'a> {
    prompt: &'a Tensor,
    kv: Option<&'a PromptKv>,
    tokens: &'a [u32],
}

/// A batch ready for its first forward.
struct Start {
    /// `C` cached positions, each layer `[B, H_kv, C, Dh]` (no entries when none are reused).
    cache: KvCache,
    /// `[B, T, D]`: the positions still to run.
    embeds: Tensor,
    /// `[B, C + T]`, 1 = real, 0 = pad.
    mask: Tensor,
    /// Per row, the index in `embeds` of its first token (position `N_i` of the row alone).
    first: Vec<usize>,
}

/// Lays out `rows` for their first forward (see the module doc), from cached prompt
/// keys/values when `count.reuse` and the model allow. With `decode`, generation continues
/// after every row's last position, so rows are left padded; without (classification: one
/// forward), rows that cannot be moved are right padded, which no model's positions notice.
fn start(m: &dyn CausalLm, rows: &[RowSpec], count: &mut Prefill, decode: bool, device: &Device) -> Result<Start> {
    let b = rows.len();
    if b == 0 {
        softprompt::bail!("a batch needs at least one row");
    }
    let pad = m.info().pad_id();
    let s_max = rows.iter().map(|r| r.tokens.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(b * s_max);
    for r in rows {
        ids.extend(std::iter::repeat_n(pad, s_max - r.tokens.len()));
        ids.extend(r.tokens.iter().copied());
    }
    let emb = m.embed(&Tensor::from_vec(ids, (b, s_max), device)?)?; // [B, S, D], left padded
    if count.reuse && rows.iter().all(|r| r.kv.is_some() && !r.tokens.is_empty()) {
        let mut kvs = Vec::with_capacity(b);
        for r in rows {
            if let Some(kv) = r.kv {
                kvs.push(kv.get(m, r.prompt, emb.dtype(), count)?);
            }
        }
        if let Some(s) = shifted(m, rows, &kvs, &emb, count)? {
            return Ok(s);
        }
        if let Some(s) = aligned(m, rows, &kvs, &emb, count, decode)? {
            return Ok(s);
        }
    }
    whole(m, rows, &emb, count, decode)
}

/// Stacks one cache per row (`[1, H_kv, N_i, Dh]` per layer) into `[B, H_kv, C, Dh]`, each
/// row left padded (with zeros) or cut to its first `C` positions.
fn stack(m: &dyn CausalLm, rows: &[KvCache], c: usize) -> Result<KvCache> {
    let n_layers = m.info().n_layers;
    let mut out = KvCache::new(n_layers);
    for l in 0..n_layers {
        let mut ks = Vec::with_capacity(rows.len());
        let mut vs = Vec::with_capacity(rows.len());
        for kv in rows {
            let Some((k, v)) = kv.layers.get(l).and_then(Option::as_ref) else {
                softprompt::bail!("prompt cache: layer {l} is missing");
            };
            let n = k.dim(2)?;
            if n >= c {
                ks.push(k.narrow(2, 0, c)?);
                vs.push(v.narrow(2, 0, c)?);
            } else {
                ks.push(k.pad_with_zeros(2, c - n, 0)?);
                vs.push(v.pad_with_zeros(2, c - n, 0)?);
            }
        }
        out.layers[l] = Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)); // [B, H_kv, C, Dh]
    }
    Ok(out)
}

/// Rotary models: every row's whole prompt from the cache, its keys rotated so the prompt
/// sits right before the row's input. `None` when the model cannot move positions.
fn shifted(m: &dyn CausalLm, rows: &[RowSpec], kvs: &[Arc<KvCache>], emb: &Tensor, count: &mut Prefill) -> Result<Option<Start>> {
    let b = rows.len();
    let t = emb.dim(1)?;
    let mut n = Vec::with_capacity(b);
    for r in rows {
        n.push(r.prompt.dim(0)?);
    }
    let c = n.iter().copied().max().unwrap_or(0);
    let mut moved: Vec<KvCache> = Vec::with_capacity(b);
    // Rows of one prompt and one input length share the rotation: (row, shift).
    let mut done: Vec<(usize, usize)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let by = c + t - r.tokens.len() - n[i];
        if let Some(&(j, _)) = done.iter().find(|&&(j, s)| s == by && Arc::ptr_eq(&kvs[j], &kvs[i])) {
            let same = moved[j].clone();
            moved.push(same);
            continue;
        }
        let mut kv = (*kvs[i]).clone();
        if !m.shift_cache(&mut kv, by)? {
            return Ok(None);
        }
        done.push((i, by));
        moved.push(kv);
    }
    let mut mask = Vec::with_capacity(b * (c + t));
    let mut first = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let s = r.tokens.len();
        mask.extend((0..c).map(|j| if j < c - n[i] { 0f32 } else { 1. }));
        mask.extend((0..t).map(|j| if j < t - s { 0f32 } else { 1. }));
        first.push(t - s);
        count.computed += s;
        count.reused += n[i];
    }
    Ok(Some(Start {
        cache: stack(m, &moved, c)?,
        embeds: emb.clone(),
        mask: Tensor::from_vec(mask, (b, c + t), emb.device())?,
        first,
    }))
}

/// Any model: the first `C = min N_i` prompt positions of every row from the cache, at
/// their own positions, then `[P_i[C..]; x_i]`, right padded to the longest row (no padding
/// for rows of one length `N_i + S_i`, the batcher's groups for absolute positions). With
/// `decode`, `None` unless every row has the same length.
fn aligned(
    m: &dyn CausalLm,
    rows: &[RowSpec],
    kvs: &[Arc<KvCache>],
    emb: &Tensor,
    count: &mut Prefill,
    decode: bool,
) -> Result<Option<Start>> {
    let b = rows.len();
    let (s_max, d) = (emb.dim(1)?, emb.dim(2)?);
    let mut n = Vec::with_capacity(b);
    let mut lens = Vec::with_capacity(b);
    for r in rows {
        n.push(r.prompt.dim(0)?);
        lens.push(r.prompt.dim(0)? + r.tokens.len());
    }
    let l = lens.iter().copied().max().unwrap_or(0);
    if decode && lens.iter().any(|&li| li != l) {
        return Ok(None);
    }
    let c = n.iter().copied().min().unwrap_or(0);
    let mut xs = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b * l);
    let mut first = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let s = r.tokens.len();
        let mut parts = Vec::with_capacity(3);
        if n[i] > c {
            parts.push(r.prompt.narrow(0, c, n[i] - c)?.to_dtype(emb.dtype())?); // [N_i - C, D]
        }
        parts.push(emb.get(i)?.narrow(0, s_max - s, s)?); // [S_i, D]
        if lens[i] < l {
            parts.push(Tensor::zeros((l - lens[i], d), emb.dtype(), emb.device())?);
        }
        xs.push(Tensor::cat(&parts, 0)?); // [L - C, D]
        mask.extend((0..l).map(|j| if j < lens[i] { 1f32 } else { 0. }));
        first.push(n[i] - c);
        count.computed += lens[i] - c;
        count.reused += c;
    }
    let rows_kv: Vec<KvCache> = kvs.iter().map(|kv| (**kv).clone()).collect();
    Ok(Some(Start {
        cache: stack(m, &rows_kv, c)?,
        embeds: Tensor::stack(&xs, 0)?, // [B, L - C, D]
        mask: Tensor::from_vec(mask, (b, l), emb.device())?,
        first,
    }))
}

/// No reuse: rows `[P_i; embed(x_i)]` padded to `L = max(N_i + S_i)` (on the left with
/// `left`, else on the right), and an empty cache.
fn whole(m: &dyn CausalLm, rows: &[RowSpec], emb: &Tensor, count: &mut Prefill, left: bool) -> Result<Start> {
    let b = rows.len();
    let d = m.info().d_model;
    let device = emb.device();
    let s_max = emb.dim(1)?;
    let mut lens = Vec::with_capacity(b);
    for r in rows {
        lens.push(r.prompt.dim(0)? + r.tokens.len());
    }
    let l = lens.iter().copied().max().unwrap_or(0);
    let mut xs = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b * l);
    let mut first = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let s = r.tokens.len();
        let n_pad = l - lens[i];
        let lead = if left { n_pad } else { 0 }; // pads before the prompt
        let mut parts = Vec::with_capacity(4);
        parts.push(Tensor::zeros((lead, d), emb.dtype(), device)?);
        parts.push(r.prompt.to_dtype(emb.dtype())?);
        parts.push(emb.get(i)?.narrow(0, s_max - s, s)?); // [S_i, D]
        parts.push(Tensor::zeros((n_pad - lead, d), emb.dtype(), device)?);
        parts.retain(|t| t.dim(0).is_ok_and(|n| n > 0));
        xs.push(Tensor::cat(&parts, 0)?); // [L, D]
        mask.extend((0..l).map(|j| if j >= lead && j < lead + lens[i] { 1f32 } else { 0. }));
        first.push(lead + lens[i] - s);
        count.computed += lens[i];
    }
    Ok(Start {
        cache: KvCache::new(m.info().n_layers),
        embeds: Tensor::stack(&xs, 0)?, // [B, L, D]
        mask: Tensor::from_vec(mask, (b, l), device)?,
        first,
    })
}

/// `log_softmax` of one row, in f64 for the sums.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from the logits of a request's rows (one per prompt).
pub(crate) fn choose(rows: &[&[f32]], temperature: f32, rng: &mut rand::rngs::StdRng) -> (u32, f32) {
    let (scores, logp) = if rows.len() == 1 {
        (rows[0].to_vec(), log_softmax(rows[0]))
    } else {
        let mut mean = vec![0f32; rows[0].len()];
        for r in rows {
            for (m, x) in mean.iter_mut().zip(log_softmax(r)) {
                *m += x / rows.len() as f32;
            }
        }
        (mean.clone(), mean)
    };
    let tok = if temperature <= 0.0 {
        argmax(&scores)
    } else {
        let scaled: Vec<f32> = scores.iter().map(|s| s / temperature).collect();
        let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = scaled.iter().map(|&s| ((s - max) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        let mut pick = weights.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                pick = i;
                break;
            }
            u -= w;
        }
        pick
    };
    (tok as u32, logp[tok])
}

/// Generates for every item in one batch with a shared KV cache, started from the prompts'
/// cached keys/values when `count.reuse` (which also receives the prefill counts). Finished
/// (or cancelled: `cancelled(i)` is polled every step) requests leave the batch at once.
pub fn generate(
    model: &Model,
    items: &[GenItem],
    count: &mut Prefill,
    cancelled: &dyn Fn(usize) -> bool,
) -> Result<Vec<GenOutput>> {
    let m = causal(model)?;
    let device = &model.device;
    let info = m.info();
    let tokenizer = model.tokenizer()?;
    let mut states = Decoding::start(items);
    // Row -> request, one row per (request, prompt).
    let mut owners: Vec<usize> = Vec::new();
    let mut rows: Vec<RowSpec> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if states[i].is_finished() {
            continue;
        }
        for (j, p) in it.prompts.iter().enumerate() {
            owners.push(i);
            rows.push(RowSpec { prompt: p, kv: it.prompt_kv.get(j).map(Arc::as_ref), tokens: &it.source });
        }
    }
    if !rows.is_empty() {
        let Start { mut cache, embeds, mut mask, .. } = start(m, &rows, count, true, device)?;
        let mut logits = m.forward(&embeds, &mask, Some(&mut cache), LogitsAt::Last)?; // [B, V]
        loop {
            let lv: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?; // [B][V]
            let (chosen, keep) = decode_step(&lv, &owners, items, &mut states, tokenizer, info, cancelled)?;
            if keep.is_empty() {
                break;
            }
            if keep.len() < owners.len() {
                let idx = Tensor::new(keep.as_slice(), device)?;
                cache.index_rows(&idx)?;
                mask = mask.index_select(&idx, 0)?;
                owners = keep.iter().map(|&r| owners[r as usize]).collect();
            }
            let b = owners.len();
            let next: Vec<u32> = owners.iter().map(|&i| chosen[i]).collect();
            let next = Tensor::from_vec(next, (b, 1), device)?;
            mask = Tensor::cat(&[&mask, &Tensor::ones((b, 1), mask.dtype(), device)?], 1)?; // [B, P+1]
            let e = m.embed(&next)?; // [B, 1, D]
            logits = m.forward(&e, &mask, Some(&mut cache), LogitsAt::Last)?;
        }
    }
    Decoding::outputs(states, tokenizer)
}

/// One request's decoding so far (decoder-only and encoder-decoder generation alike).
pub(crate) struct Decoding {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// `eos`, `stop`, `length` or `cancelled` once finished.
    finish: Option<&'static str>,
    /// The text cut before a stop string.
    text: Option<String>,
    rng: rand::rngs::StdRng,
}

impl Decoding {
    /// One state per item; an item asking for no tokens is finished at once.
    pub(crate) fn start(items: &[GenItem]) -> Vec<Decoding> {
        items
            .iter()
            .map(|it| Decoding {
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finish: if it.params.max_new_tokens == 0 { Some("length") } else { None },
                text: None,
                rng: match it.params.seed {
                    Some(s) => rand::rngs::StdRng::seed_from_u64(s),
                    None => rand::rngs::StdRng::from_os_rng(),
                },
            })
            .collect()
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The answers, in item order.
    pub(crate) fn outputs(states: Vec<Decoding>, tokenizer: &softprompt::tokenizer::Tokenizer) -> Result<Vec<GenOutput>> {
        states
            .into_iter()
            .map(|st| {
                let text = match st.text {
                    Some(t) => t,
                    None => tokenizer.decode(&st.tokens)?,
                };
                Ok(GenOutput {
                    text,
                    tokens: st.tokens,
                    logprobs: st.logprobs,
                    finish_reason: st.finish.unwrap_or("length"),
                })
            })
            .collect()
    }
}

/// One decoding step of a batch: `logits [B][V]` of the rows, `owners[r]` the item of row `r`
/// (an item's rows, one per prompt of its ensemble, are adjacent and vote through [`choose`]).
/// Records each item's token, finishes items on EOS, a stop string, `max_new_tokens` or
/// cancellation, and returns the token chosen per item (indexed by item) and the rows still
/// running (indices into `owners`).
pub(crate) fn decode_step(
    logits: &[Vec<f32>],
    owners: &[usize],
    items: &[GenItem],
    states: &mut [Decoding],
    tokenizer: &softprompt::tokenizer::Tokenizer,
    info: &softprompt::model::ModelInfo,
    cancelled: &dyn Fn(usize) -> bool,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let mut chosen = vec![0u32; items.len()];
    let mut r = 0;
    while r < owners.len() {
        let i = owners[r];
        let mut end = r;
        while end < owners.len() && owners[end] == i {
            end += 1;
        }
        let group: Vec<&[f32]> = logits[r..end].iter().map(Vec::as_slice).collect();
        let params = &items[i].params;
        let st = &mut states[i];
        let (tok, lp) = choose(&group, params.temperature, &mut st.rng);
        chosen[i] = tok;
        st.tokens.push(tok);
        st.logprobs.push(lp);
        if info.eos_token_ids.contains(&tok) {
            st.finish = Some("eos");
        } else if !params.stop.is_empty() {
            let text = tokenizer.decode(&st.tokens)?;
            let cut = params.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
            if let Some(cut) = cut {
                st.text = Some(text[..cut].to_string());
                st.finish = Some("stop");
            }
        }
        if st.finish.is_none() && st.tokens.len() >= params.max_new_tokens {
            st.finish = Some("length");
        }
        if st.finish.is_none() && cancelled(i) {
            st.finish = Some("cancelled");
        }
        r = end;
    }
    let keep = (0..owners.len()).filter(|&r| states[owners[r]].finish.is_none()).map(|r| r as u32).collect();
    Ok((chosen, keep))
}

/// Rank classification of every item: the log-likelihood of each label's target after
/// `[prompt; input]`, for every prompt of the item's task. Rows are processed `max_rows`
/// at a time. One-token labels need one row per (item, prompt); longer labels one row per
/// (item, prompt, label) holding `input + target`. Each chunk starts from the prompts' cached
/// keys/values when `count.reuse` (which also receives the prefill counts).
pub fn classify(model: &Model, items: &[ClsItem], max_rows: usize, count: &mut Prefill) -> Result<Vec<ClsOutput>> {
    let m = causal(model)?;
    let device = &model.device;
    struct Row<'a> {
        item: usize,
        prompt: usize,
        tensor: &'a Tensor,
        kv: Option<&'a PromptKv>,
        /// Prompt length `N`.
        n: usize,
        tokens: Vec<u32>,
        /// (position in the unpadded row whose logits are read, token, label)
        score: Vec<(usize, u32, usize)>,
        /// One-token labels: all scores at the last position.
        single: bool,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut out: Vec<ClsOutput> = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let n_labels = it.label_targets.len();
        out.push(ClsOutput {
            scores: vec![0.0; n_labels],
            per_prompt: vec![vec![0.0; n_labels]; it.prompts.len()],
        });
        if it.source.is_empty() || it.label_targets.iter().any(|t| t.is_empty()) {
            softprompt::bail!("classification needs a non-empty input and non-empty label targets");
        }
        let single = it.label_targets.iter().all(|t| t.len() == 1);
        for (j, p) in it.prompts.iter().enumerate() {
            let n = p.dim(0)?;
            let s = it.source.len();
            let kv = it.prompt_kv.get(j).map(Arc::as_ref);
            if single {
                let score = it.label_targets.iter().enumerate().map(|(l, t)| (n + s - 1, t[0], l)).collect();
                rows.push(Row { item: i, prompt: j, tensor: p, kv, n, tokens: it.source.clone(), score, single: true });
            } else {
                for (l, t) in it.label_targets.iter().enumerate() {
                    let mut tokens = it.source.clone();
                    tokens.extend(t);
                    let score = t.iter().enumerate().map(|(k, &tok)| (n + s + k - 1, tok, l)).collect();
                    rows.push(Row { item: i, prompt: j, tensor: p, kv, n, tokens, score, single: false });
                }
            }
        }
    }
    let (single_rows, multi_rows): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.single);
    let chunks = single_rows
        .chunks(max_rows.max(1))
        .map(|c| (true, c))
        .chain(multi_rows.chunks(max_rows.max(1)).map(|c| (false, c)));
    for (single_token, chunk) in chunks {
        let spec: Vec<RowSpec> =
            chunk.iter().map(|r| RowSpec { prompt: r.tensor, kv: r.kv, tokens: &r.tokens }).collect();
        let Start { mut cache, embeds, mask, first } = start(m, &spec, count, false, device)?;
        let t = embeds.dim(1)?;
        // Unique flattened positions of `embeds` whose logits are needed (every scored
        // position is an input or target token: `pos >= N`).
        let mut positions: Vec<u32> = Vec::new();
        let mut picks: Vec<(usize, usize, u32)> = Vec::new(); // (row in chunk, index into positions, token)
        for (r, row) in chunk.iter().enumerate() {
            for &(pos, tok, _) in &row.score {
                let flat = (r * t + first[r] + pos - row.n) as u32;
                let k = match positions.iter().rposition(|&p| p == flat) {
                    Some(k) => k,
                    None => {
                        positions.push(flat);
                        positions.len() - 1
                    }
                };
                picks.push((r, k, tok));
            }
        }
        let rows_t = Tensor::new(positions.as_slice(), device)?; // [M]
        // Nothing cached (no reuse): no cache at all, so the backbone may take its cache-free path.
        let cache = if cache.seq_len() > 0 { Some(&mut cache) } else { None };
        let logits = m.forward(&embeds, &mask, cache, LogitsAt::Rows(&rows_t))?.to_dtype(DType::F32)?; // [M, V]
        // Scored as the library scores: one-token labels by `log_softmax` at the last
        // position (`single_token_scores`), longer labels by the objective's `token_nll`.
        let picked = if single_token {
            let v = logits.dim(1)?;
            let logp = softprompt::model::ops::log_softmax_last_dim(&logits)?.flatten_all()?; // [M*V]
            let idx: Vec<u32> = picks.iter().map(|&(_, k, tok)| (k * v) as u32 + tok).collect();
            logp.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?.to_vec1::<f32>()?
        } else {
            let at: Vec<u32> = picks.iter().map(|&(_, k, _)| k as u32).collect();
            let toks: Vec<u32> = picks.iter().map(|&(_, _, tok)| tok).collect();
            let per_pick = logits.index_select(&Tensor::new(at.as_slice(), device)?, 0)?; // [K, V]
            let nll = softprompt::model::ops::token_nll(&per_pick, &Tensor::new(toks.as_slice(), device)?)?; // [K]
            nll.to_vec1::<f32>()?.into_iter().map(|x| -x).collect()
        };
        let mut q = 0;
        for (r, row) in chunk.iter().enumerate() {
            for &(_, _, label) in &row.score {
                debug_assert_eq!(picks[q].0, r);
                out[row.item].per_prompt[row.prompt][label] += picked[q];
                q += 1;
            }
        }
    }
    for o in &mut out {
        let k = o.per_prompt.len().max(1) as f32;
        for l in 0..o.scores.len() {
            o.scores[l] = o.per_prompt.iter().map(|p| p[l]).sum::<f32>() / k;
        }
    }
    Ok(out)
}

/// The label each prompt votes for (argmax of its scores).
pub fn votes(per_prompt: &[Vec<f32>]) -> Vec<usize> {
    per_prompt.iter().map(|s| argmax(s)).collect()
}
