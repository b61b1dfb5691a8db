//! Initial values of a soft prompt (Lester et al. 2021, section 2.2 / 3.2):
//!
//! * [`PromptInit::RandomUniform`]: every value drawn from `U[-range, range]` (the paper: 0.5).
//! * [`PromptInit::SampledVocab`]: the embeddings of tokens drawn without replacement from the
//!   5,000 most common tokens of the vocabulary (see [`common_token_ids`]).
//! * [`PromptInit::ClassLabels`]: slot `i` is the embedding of label `i` (the mean of its token
//!   embeddings when it has several tokens); the slots left over are filled as `SampledVocab`.
//! * [`PromptInit::Text`]: the embeddings of the text's tokens, repeated or cut to fill the
//!   prompt (PEFT's `TEXT`).
//! * [`PromptInit::File`]: the prompt of an existing PEFT adapter (prompt transfer).
//!
//! Every random choice comes from a small fixed generator (SplitMix64) seeded by the caller, so
//! the same seed gives the same prompt on every platform and with every version of `rand`.

use crate::load::Model;
use crate::model::{Backbone, ModelInfo};
use crate::prompt::PeftAdapter;
use crate::tokenizer::Tokenizer;
use crate::{bail, Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashSet;
use std::path::PathBuf;

/// How many of the most common tokens `SampledVocab` draws from (the paper's 5,000).
pub const COMMON_TOKENS: usize = 5000;

/// How to fill a new prompt of `N` rows.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInit {
    /// Values drawn uniformly from `[-range, range]`.
    RandomUniform { range: f64 },
    /// Embeddings of `N` distinct tokens drawn from the [`COMMON_TOKENS`] most common ones.
    SampledVocab,
    /// One slot per label (multi-token labels averaged), the rest as `SampledVocab`.
    ClassLabels(Vec<String>),
    /// Embeddings of the text's tokens, repeated or truncated to `N`.
    Text(String),
    /// The prompt of a PEFT adapter folder; it must have `N` rows of the model's width.
    File(PathBuf),
}

impl Default for PromptInit {
    /// The paper's random initialisation, `U[-0.5, 0.5]`.
    fn default() -> Self {
        PromptInit::RandomUniform { range: 0.5 }
    }
}

impl PromptInit {
    /// The name PEFT's `prompt_tuning_init` would record. PEFT knows only RANDOM, SAMPLE_VOCAB
    /// and TEXT: class-label prompts are vocabulary embeddings (SAMPLE_VOCAB), a transferred
    /// prompt has no PEFT name (RANDOM). `task.json` records the exact initialisation.
    pub fn peft_name(&self) -> &'static str {
        match self {
            PromptInit::RandomUniform { .. } | PromptInit::File(_) => "RANDOM",
            PromptInit::SampledVocab | PromptInit::ClassLabels(_) => "SAMPLE_VOCAB",
            PromptInit::Text(_) => "TEXT",
        }
    }

    /// A JSON description, for `task.json` and the checkpoint's configuration hash.
    pub fn describe(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            PromptInit::RandomUniform { range } => {
                json!({"kind": "random-uniform", "range": range})
            }
            PromptInit::SampledVocab => {
                json!({"kind": "sampled-vocab", "common_tokens": COMMON_TOKENS})
            }
            PromptInit::ClassLabels(labels) => json!({"kind": "class-labels", "labels": labels}),
            PromptInit::Text(text) => json!({"kind": "text", "text": text}),
            PromptInit::File(dir) => json!({"kind": "file", "adapter": dir.display().to_string()}),
        }
    }
}

/// Makes the initial prompt `[n_tokens, D]` (f32, on the model's device) for `model`. Deterministic given `seed`. `ClassLabels` and `Text` need the model's tokenizer.
/// Every problem (a label or text that tokenizes to nothing, more labels than slots, an
/// adapter of another shape) is an error.
pub fn init_prompt(init: &PromptInit, model: &Model, n_tokens: usize, seed: u64) -> Result<Tensor> {
    if n_tokens == 0 {
        bail!("the prompt needs at least one token (n_tokens is 0)");
    }
    let backbone = &model.backbone;
    let info = backbone.info();
    let device = model.device.clone();
    let mut rng = Rng::new(seed, STREAM_INIT);
    match init {
        PromptInit::RandomUniform { range } => {
            if !(range.is_finite() && *range > 0.0) {
                bail!("random-uniform init: range must be a positive number, got {range}");
            }
            let values: Vec<f32> = (0..n_tokens * info.d_model)
                .map(|_| ((rng.next_f64() * 2.0 - 1.0) * range) as f32)
                .collect();
            Ok(Tensor::from_vec(values, (n_tokens, info.d_model), &device)?)
        }
        PromptInit::SampledVocab => {
            let pool = common_token_ids(info, model.tokenizer.as_ref(), COMMON_TOKENS);
            let ids = sample_distinct(&pool, n_tokens, &mut rng)?;
            embed_rows(backbone, &ids, &device)
        }
        PromptInit::ClassLabels(labels) => {
            let tokenizer = model.tokenizer()?;
            let label_ids = labels
                .iter()
                .map(|label| {
                    let ids = tokenizer.encode(label)?;
                    if ids.is_empty() {
                        bail!("class label `{label}` tokenizes to no tokens: it cannot initialise a prompt slot");
                    }
                    Ok(ids)
                })
                .collect::<Result<Vec<_>>>()?;
            let pool = common_token_ids(info, Some(tokenizer), COMMON_TOKENS);
            class_label_prompt(backbone, &label_ids, &pool, n_tokens, &mut rng, &device)
        }
        PromptInit::Text(text) => {
            let ids = model.tokenizer()?.encode(text)?;
            if ids.is_empty() {
                bail!("init text `{text}` tokenizes to no tokens");
            }
            embed_rows(backbone, &fill_repeating(&ids, n_tokens), &device)
        }
        PromptInit::File(dir) => {
            let adapter = PeftAdapter::load(dir, &device)?;
            adapter.validate(info, dir)?;
            let (n, _d) = adapter.prompt.dims2()?;
            if n != n_tokens {
                return Err(Error::config(
                    dir.join(super::peft::CONFIG_FILE),
                    "num_virtual_tokens",
                    format!("the adapter's prompt has {n} tokens but {n_tokens} were asked for"),
                ));
            }
            Ok(adapter.prompt.to_dtype(DType::F32)?.contiguous()?)
        }
    }
}

/// Up to `limit` token ids that `SampledVocab` may draw, most common first.
///
/// "Most common" is the vocabulary order: BPE vocabularies (GPT-2, Llama 3, SmolLM) give the
/// lowest ids to the byte alphabet and then to merges in the order they were learned, i.e. by
/// decreasing pair frequency in the tokenizer's training corpus; SentencePiece vocabularies (T5,
/// Llama 2) are written by decreasing piece score (frequency). So the most common tokens are the
/// lowest ids, after removing: the model's special ids (BOS, EOS, pad, decoder start), tokens the
/// tokenizer marks as special (`<|endoftext|>`, `<unk>`, `<pad>`, control tokens), and
/// SentencePiece byte-fallback pieces `<0x00>`..`<0xFF>`, which sit at low ids but are rare.
/// Ids are below the embedding table's size (and the tokenizer's vocabulary when there is one).
pub fn common_token_ids(info: &ModelInfo, tokenizer: Option<&Tokenizer>, limit: usize) -> Vec<u32> {
    let mut special: HashSet<u32> = HashSet::new();
    special.extend(info.bos_token_id);
    special.extend(info.eos_token_ids.iter().copied());
    special.extend(info.pad_token_id);
    special.extend(info.decoder_start_token_id);
    let mut vocab = info.vocab_size;
    if let Some(tok) = tokenizer {
        vocab = vocab.min(tok.vocab_size().max(1));
        special.extend(tok.bos_token_id);
        special.extend(tok.eos_token_id);
        for (id, added) in tok.inner().get_added_tokens_decoder() {
            if added.special {
                special.insert(id);
            }
        }
    }
    let mut out = Vec::with_capacity(limit.min(vocab));
    for id in 0..vocab as u32 {
        if out.len() == limit {
            break;
        }
        if special.contains(&id) {
            continue;
        }
        if let Some(text) = tokenizer.and_then(|t| t.id_to_token(id)) {
            if is_byte_fallback(&text) {
                continue;
            }
        }
        out.push(id);
    }
    out
}

/// `<0x0A>`-style SentencePiece byte pieces.
fn is_byte_fallback(token: &str) -> bool {
    let b = token.as_bytes();
    b.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// `k` ids drawn from `pool` without replacement (a partial Fisher-Yates shuffle). When `k`
/// exceeds the pool, every id is used and the rest are drawn from a fresh shuffle, and so on.
pub fn sample_distinct(pool: &[u32], k: usize, rng: &mut Rng) -> Result<Vec<u32>> {
    if pool.is_empty() {
        bail!("the vocabulary has no ordinary tokens to sample a prompt from");
    }
    let mut out = Vec::with_capacity(k);
    while out.len() < k {
        let mut p = pool.to_vec();
        let take = (k - out.len()).min(p.len());
        for i in 0..take {
            let j = i + rng.below((p.len() - i) as u64) as usize;
            p.swap(i, j);
        }
        out.extend_from_slice(&p[..take]);
    }
    Ok(out)
}

/// `ids` repeated (whole copies, then cut) to exactly `n` entries; PEFT's TEXT rule.
pub fn fill_repeating(ids: &[u32], n: usize) -> Vec<u32> {
    ids.iter().copied().cycle().take(n).collect()
}

/// Class-label prompt `[n_tokens, D]`: row `i < labels` is the mean embedding of
/// `label_ids[i]`, the remaining rows the embeddings of ids sampled from `pool`.
pub fn class_label_prompt(
    backbone: &Backbone,
    label_ids: &[Vec<u32>],
    pool: &[u32],
    n_tokens: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<Tensor> {
    if label_ids.is_empty() {
        bail!("class-labels init needs at least one label");
    }
    if label_ids.len() > n_tokens {
        bail!(
            "class-labels init: {} labels do not fit in a prompt of {n_tokens} tokens (one slot per label)",
            label_ids.len()
        );
    }
    let mut rows = Vec::with_capacity(n_tokens);
    for ids in label_ids {
        if ids.is_empty() {
            bail!("class-labels init: a label has no tokens");
        }
        rows.push(embed_rows(backbone, ids, device)?.mean_keepdim(0)?); // [1, D]
    }
    let rest = n_tokens - label_ids.len();
    if rest > 0 {
        // Labels are not drawn again for the leftover slots.
        let label_set: HashSet<u32> = label_ids.iter().flatten().copied().collect();
        let pool: Vec<u32> = pool
            .iter()
            .copied()
            .filter(|id| !label_set.contains(id))
            .collect();
        let ids = sample_distinct(&pool, rest, rng)?;
        rows.push(embed_rows(backbone, &ids, device)?);
    }
    Ok(Tensor::cat(&rows, 0)?.contiguous()?)
}

/// Rows of the frozen embedding table, `[ids.len(), D]` f32.
pub fn embed_rows(backbone: &Backbone, ids: &[u32], device: &Device) -> Result<Tensor> {
    let vocab = backbone.info().vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab}");
    }
    let t = Tensor::new(ids, device)?.unsqueeze(0)?; // [1, K]
    Ok(backbone
        .embed(&t)?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .contiguous()?) // [K, D]
}

/// Seed stream for the prompt initialisation.
pub const STREAM_INIT: u64 = 0x1d3a_5f2c_9e47_b801;

/// A small deterministic random generator (SplitMix64), stable across platforms and crate
/// versions, so that seeds reproduce prompts and data orders forever.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator for `(seed, stream)`: different streams give unrelated sequences.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut r = Rng {
            state: seed ^ stream.rotate_left(17),
        };
        let s = r.next_u64() ^ stream;
        Rng { state: s }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`), without modulo bias (rejection sampling).
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}
