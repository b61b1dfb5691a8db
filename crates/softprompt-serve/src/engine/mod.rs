//! Batched forwards over rows that each carry their own prompt (decoder-only models).
//!
//! Every row is a request's input `x_i` (`S_i` tokens) after one of its task's prompts `P_i`
//! (`N_i` rows; with `prompt_after_bos` the prefix `[embed(BOS); P]`), so prompts of different
//! lengths (different tasks) share one forward pass. The reference answer of a row is the
//! row run alone, `[P_i; embed(x_i)]` at positions `0..N_i+S_i-1`.
//!
//! **Prompt keys/values computed once.** A prompt's per-layer keys and values do not depend
//! on what follows it (causal attention), so each prompt is run alone once (batch 1,
//! positions `0..N_i-1`) and its [`PromptKv`] kept with its task (within the byte budget of a
//! [`PromptKvStore`]: least recently used prompts are evicted and recomputed on their next
//! use, giving the same numbers); a batch then starts from a
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
//! - Sliding-window models (Mistral, Gemma): a window counts slots, pads included, so the
//!   rotated layout is used only when no input is padded (no pads between a prompt and its
//!   input); otherwise the layouts below, which keep every row contiguous.
//!
//! Without reuse (`Prefill::reuse` false, a row without a `PromptKv`, an empty input, or
//! absolute positions with unequal lengths in generation) the whole row runs,
//! `[P_i; embed(x_i)]` padded to the longest `N_i + S_i`: on the left for generation (with
//! rotary embeddings attention depends only on relative positions and masked pads get
//! exactly zero weight, so this equals the row alone up to float rounding, well under 1e-4),
//! on the right for classification (exact for any model).

mod classify;
mod prefill;
mod prompt_kv;

pub use classify::classify;
pub use prompt_kv::{Prefill, PromptKv, PromptKvStore};

use candle_core::Tensor;
use prefill::{start, RowSpec, Start};
use softprompt::decode::{self, DecodeParams, DecodeState, DecodeStep, Finished, Sequence};
use softprompt::eval::ensemble::mean_scores;
use softprompt::load::Model;
use softprompt::model::{Backbone, CausalLm};
use softprompt::tokenizer::Tokenizer;
use softprompt::Result;
use std::sync::Arc;

/// One generation request: its task's prompts (an ensemble averages log-probabilities at
/// every step) and the tokenized input.
pub struct GenItem {
    pub prompts: Vec<Tensor>,
    /// The prompts' cached keys/values, in the same order (the task's `prompt_kv`); a prompt
    /// without one is run in full.
    pub prompt_kv: Vec<Arc<PromptKv>>,
    pub source: Vec<u32>,
    pub params: DecodeParams,
    /// Streaming: every token is sent here as soon as it is chosen (the answer still comes
    /// whole in the reply, with the finish reason and the text cut at a stop string).
    pub stream: Option<TokenSender>,
}

/// One generated token, sent while the batch runs on ([`GenItem::stream`]).
#[derive(Clone, Debug)]
pub struct TokenEvent {
    pub token: u32,
    /// Its log-probability (mean over the ensemble's prompts).
    pub logprob: Option<f32>,
    /// The step's most likely tokens (`DecodeParams::top_logprobs` of them).
    pub top_logprobs: Vec<(u32, f32)>,
}

pub type TokenSender = tokio::sync::mpsc::UnboundedSender<TokenEvent>;

#[derive(Clone, Debug, serde::Serialize)]
pub struct GenOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Log-probability of each chosen token (mean over the ensemble's prompts).
    pub logprobs: Vec<f32>,
    /// Per token, the step's `top_logprobs` most likely tokens (empty unless asked for).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// `eos`, `stop`, `length` or `cancelled`.
    pub finish_reason: &'static str,
}

impl GenOutput {
    fn new(seq: Sequence, tokenizer: &Tokenizer) -> Result<Self> {
        Ok(GenOutput {
            text: seq.text(tokenizer)?,
            finish_reason: seq.finish.map_or("length", |f| f.as_str()),
            tokens: seq.tokens,
            logprobs: seq.logprobs,
            top_logprobs: seq.top_logprobs,
        })
    }
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

impl ClsOutput {
    /// All scores 0, to be summed into.
    pub(crate) fn zeros(item: &ClsItem) -> Self {
        let n_labels = item.label_targets.len();
        ClsOutput { scores: vec![0.0; n_labels], per_prompt: vec![vec![0.0; n_labels]; item.prompts.len()] }
    }

    /// `scores` from `per_prompt`: the mean over the prompts.
    pub(crate) fn average(&mut self) {
        if !self.per_prompt.is_empty() {
            self.scores = mean_scores(&self.per_prompt);
        }
    }
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

/// A batch of generation requests: their decoding state and rows, one row per (running
/// request, prompt), a request's rows adjacent.
pub(crate) struct GenerationBatch<'a> {
    decoder: DecodeStep<'a>,
    tokenizer: &'a Tokenizer,
    /// Per row: the request.
    owners: Vec<usize>,
    /// Per row: the request's prompt.
    prompts: Vec<usize>,
}

impl<'a> GenerationBatch<'a> {
    pub(crate) fn new(model: &'a Model, items: &[GenItem]) -> Result<Self> {
        let tokenizer = model.tokenizer()?;
        let eos = model.backbone.info().eos_token_ids.clone();
        let mut decoder = DecodeStep::new(items.iter().map(|it| it.params.clone()), eos, Some(tokenizer))?;
        let sinks: Vec<Option<TokenSender>> = items.iter().map(|it| it.stream.clone()).collect();
        if sinks.iter().any(Option::is_some) {
            decoder = decoder.on_token(Box::new(move |i, seq| {
                if let (Some(Some(tx)), Some(&token)) = (sinks.get(i), seq.tokens.last()) {
                    let top_logprobs = seq.top_logprobs.last().cloned().unwrap_or_default();
                    // A send fails only when the client has gone; the step's cancellation
                    // check frees its row.
                    let _ = tx.send(TokenEvent { token, logprob: seq.logprobs.last().copied(), top_logprobs });
                }
            }));
        }
        let (mut owners, mut prompts) = (Vec::new(), Vec::new());
        for (i, it) in items.iter().enumerate() {
            if decoder.sequences[i].is_finished() {
                continue;
            }
            owners.extend(std::iter::repeat_n(i, it.prompts.len()));
            prompts.extend(0..it.prompts.len());
        }
        Ok(GenerationBatch { decoder, tokenizer, owners, prompts })
    }

    /// Per row: (request, prompt of the request).
    pub(crate) fn rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.owners.iter().copied().zip(self.prompts.iter().copied())
    }

    /// Decodes from the first logits `[R, V]` of the rows until every request is finished
    /// (finished or cancelled requests leave the batch at once), and returns the answers in
    /// request order.
    pub(crate) fn run(mut self, state: Option<(DecodeState, Tensor)>, cancelled: &dyn Fn(usize) -> bool) -> Result<Vec<GenOutput>> {
        if let Some((mut state, logits)) = state {
            let owners = std::mem::take(&mut self.owners);
            decode::run(&mut state, logits, &mut self.decoder, owners, Finished::Leave, cancelled, &mut |_| {})?;
        }
        self.decoder.sequences.into_iter().map(|seq| GenOutput::new(seq, self.tokenizer)).collect()
    }
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
    let generation = GenerationBatch::new(model, items)?;
    let rows: Vec<RowSpec> = generation
        .rows()
        .map(|(i, j)| RowSpec { prompt: &items[i].prompts[j], kv: items[i].prompt_kv.get(j).map(Arc::as_ref), tokens: &items[i].source })
        .collect();
    let state = if rows.is_empty() {
        None
    } else {
        let Start { cache, embeds, mask, .. } = start(m, &rows, count, true, &model.device)?;
        Some(DecodeState::causal(m, &embeds, mask, cache)?)
    };
    generation.run(state, cancelled)
}
