//! Frozen backbones: token ids or embeddings in, logits out.
//!
//! Two small traits: [`CausalLm`] (decoder-only) and [`Seq2SeqLm`] (T5). Both expose the input
//! embedding table so a soft prompt can be prepended to `embed(ids)`. Decoder-only models are
//! one [`decoder::Decoder`] (embeddings, blocks, final norm, LM head) built by a small
//! per-family description ([`llama`], [`qwen2`], [`qwen3`], [`phi3`], [`mistral`], [`gemma`],
//! [`gpt2`]); T5 has its
//! own file. All of them are made of the owned [`layers`] and run with the [`Kernels`] policy
//! they own.
//!
//! Shapes: `B` batch, `T` new positions, `P` cached (past) positions, `D` d_model, `V` vocab,
//! `H` heads, `Dh` head dim.

mod decoder;
pub mod gemma;
pub mod gpt2;
mod kv_cache;
pub(crate) mod layers;
pub mod llama;
pub mod mistral;
pub mod ops;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod rope;
pub mod t5;

pub use crate::kernels::Kernels;
pub use decoder::Decoder;
pub use kv_cache::KvCache;

use crate::Result;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma2,
    Gemma3,
    Gpt2,
    T5,
}

impl Arch {
    /// The lowercase name (`llama`, `qwen2`, `gemma2`, `gpt2`, `t5`, ...), as in errors and
    /// serialised facts.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::Gpt2 => "gpt2",
            Arch::T5 => "t5",
        }
    }
}

/// Facts about a loaded model that the rest of the library needs.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    pub arch: Arch,
    /// Name recorded in adapters as `base_model_name_or_path`.
    pub name: String,
    pub d_model: usize,
    pub vocab_size: usize,
    pub n_layers: usize,
    /// Attention heads per layer (recorded in PEFT adapter configs).
    pub n_heads: usize,
    /// Longest sequence (prompt included) the model can take; `None` when unbounded (T5).
    pub max_positions: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Seq2seq only: first decoder input.
    pub decoder_start_token_id: Option<u32>,
}

impl ModelInfo {
    /// Whether the model is encoder-decoder (T5): the one test every caller uses.
    pub fn is_encoder_decoder(&self) -> bool {
        self.arch == Arch::T5
    }

    /// Ends an encoder input the way the model was trained: T5 encoder inputs end with EOS;
    /// decoder-only inputs are left as they are.
    pub fn end_source(&self, ids: &mut Vec<u32>) {
        if self.is_encoder_decoder() {
            ids.extend(self.eos_token_ids.first());
        }
    }

    /// The id that fills padded positions: the pad token, else the first EOS, else 0. Padded
    /// positions are masked out, so any id works; these are the ones transformers would use.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id
            .or(self.eos_token_ids.first().copied())
            .unwrap_or(0)
    }
}

/// Where the LM head is applied. Training needs logits only where labels are.
#[derive(Clone, Copy, Debug)]
pub enum LogitsAt<'a> {
    /// `[B, T, V]`
    All,
    /// `[B, V]`: the last position of every row.
    Last,
    /// `[M, V]`: rows of the flattened `[B*T]` positions, given as a u32 tensor `[M]`.
    Rows(&'a Tensor),
}

/// Decoder-only language model (Llama family, GPT-2).
pub trait CausalLm: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// `ids [B, T]` (u32) -> `[B, T, D]`, the frozen input embedding table.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;

    /// `embeds [B, T, D]`, `mask [B, P + T]` (1 = real, 0 = pad; any dtype) covering the cached
    /// positions too. Positions are numbered `P .. P+T-1` for every row, whatever the padding
    /// (what transformers does when PEFT passes no position ids). Appends to `cache` if given.
    fn forward(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
    ) -> Result<Tensor>;

    /// transformers' `output_hidden_states`: `L + 1` tensors `[B, T, D]` (input of block 0,
    /// output of each block, the last one after the final norm). For tests and inspection.
    fn hidden_states(&self, embeds: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>>;

    /// Moves every position of `cache` `by` places later: the keys become those the same
    /// inputs would have had `by` positions further on (values carry no position). Rotary
    /// models rotate the keys, `R(j + by) = R(by) R(j)`. `Ok(false)`, cache untouched, when
    /// positions cannot be moved after the fact (absolute position embeddings: GPT-2; rotary
    /// frequencies that follow the sequence length: dynamic NTK).
    fn shift_cache(&self, cache: &mut KvCache, by: usize) -> Result<bool> {
        let _ = (cache, by);
        Ok(false)
    }

    /// The attention window of the model's sliding-window layers, if it has any: a key more
    /// than `window - 1` slots before a query is not seen. Slots count pads too, so a caller
    /// that lays rows out with pads between a row's parts (the server's cached prompts) must
    /// not do so for such models.
    fn sliding_window(&self) -> Option<usize> {
        None
    }

    /// The kernel policy the model runs with (the fast kernels unless it says otherwise).
    fn kernels(&self) -> Kernels {
        Kernels::fast()
    }

    /// Changes the kernel policy (benchmarks, tests against the reference path). Models with
    /// a single path ignore it.
    fn set_kernels(&mut self, kernels: Kernels) {
        let _ = kernels;
    }

    /// How many of the model's frozen matrices (projections, embedding, head) are kept in
    /// their file encoding, of how many (`--weights stored` keeps a GGUF file's).
    fn stored_matrices(&self) -> (usize, usize) {
        (0, 0)
    }
}

/// Encoder-decoder language model (T5, flan-T5). The soft prompt goes before the encoder input.
pub trait Seq2SeqLm: Send + Sync {
    fn info(&self) -> &ModelInfo;

    /// `ids [B, S]` (u32) -> `[B, S, D]`, the shared embedding table.
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;

    /// `embeds [B, S, D]`, `mask [B, S]` -> encoder output `[B, S, D]`.
    fn encode(&self, embeds: &Tensor, mask: &Tensor) -> Result<Tensor>;

    /// `decoder_ids [B, T]` (u32), positions `P .. P+T-1` where `P` is the cache length;
    /// `encoder_out [B, S, D]`, `encoder_mask [B, S]`. Returns logits as chosen by `at`.
    fn decode(
        &self,
        decoder_ids: &Tensor,
        encoder_out: &Tensor,
        encoder_mask: &Tensor,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
    ) -> Result<Tensor>;

    /// Encoder and decoder hidden states as transformers' `output_hidden_states` (for tests).
    fn hidden_states(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        decoder_ids: &Tensor,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)>;

    /// The kernel policy the model runs with (the fast kernels unless it says otherwise).
    fn kernels(&self) -> Kernels {
        Kernels::fast()
    }

    /// Changes the kernel policy (benchmarks, tests against the reference path). Models with
    /// a single path ignore it.
    fn set_kernels(&mut self, kernels: Kernels) {
        let _ = kernels;
    }
}

/// A frozen backbone of either kind.
pub enum Backbone {
    Causal(Box<dyn CausalLm>),
    Seq2Seq(Box<dyn Seq2SeqLm>),
}

impl Backbone {
    pub fn info(&self) -> &ModelInfo {
        match self {
            Backbone::Causal(m) => m.info(),
            Backbone::Seq2Seq(m) => m.info(),
        }
    }

    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Backbone::Causal(m) => m.embed(ids),
            Backbone::Seq2Seq(m) => m.embed(ids),
        }
    }

    /// The kernel policy the model runs with.
    pub fn kernels(&self) -> Kernels {
        match self {
            Backbone::Causal(m) => m.kernels(),
            Backbone::Seq2Seq(m) => m.kernels(),
        }
    }

    /// Changes the kernel policy (benchmarks, tests against the reference path).
    pub fn set_kernels(&mut self, kernels: Kernels) {
        match self {
            Backbone::Causal(m) => m.set_kernels(kernels),
            Backbone::Seq2Seq(m) => m.set_kernels(kernels),
        }
    }

    pub fn is_seq2seq(&self) -> bool {
        self.info().is_encoder_decoder()
    }
}

/// Additive attention bias `[B, 1, T, P+T]` (f32): 0 where query `i` may attend key `j`,
/// a large negative number elsewhere. `mask [B, P+T]` marks real keys; with `causal`, query
/// `i` (at absolute position `P+i`) sees keys `j <= P+i` only. Rows with nothing to attend
/// to stay finite (softmax then spreads evenly) instead of producing NaN.
pub fn attention_bias(mask: &Tensor, t: usize, causal: bool) -> Result<Tensor> {
    let (b, k_len) = mask.dims2()?;
    if !causal {
        let keys = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, k_len))?; // [B,1,1,K]
        let allowed = keys.broadcast_as((b, 1, t, k_len))?.contiguous()?;
        return Ok(((allowed - 1.0)? * MASK_VALUE)?);
    }
    masked_bias(mask, t, |q, k| k <= q)
}

/// The causal bias of [`attention_bias`] limited to a sliding window (Mistral, Gemma's local
/// layers): query `i` at position `P+i` sees keys `j` with `0 <= P+i-j < window`, as
/// transformers' `sliding_window_causal_mask_function`. Positions are slots of the
/// sequence, pads and soft prompt included, as in transformers.
pub fn sliding_window_bias(mask: &Tensor, t: usize, window: usize) -> Result<Tensor> {
    masked_bias(mask, t, |q, k| k <= q && q - k < window)
}

/// `mask [B, K]` and `allowed(query position, key position)` -> additive bias `[B, 1, T, K]`,
/// queries at positions `K-T..K`.
fn masked_bias(mask: &Tensor, t: usize, allowed: impl Fn(usize, usize) -> bool) -> Result<Tensor> {
    let (b, k_len) = mask.dims2()?;
    if t > k_len {
        crate::bail!("attention mask covers {k_len} positions, fewer than the {t} new ones");
    }
    let device = mask.device();
    let keys = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, k_len))?; // [B,1,1,K]
    let past = k_len - t;
    let pattern: Vec<f32> = (0..t)
        .flat_map(|i| (0..k_len).map(move |j| (past + i, j)))
        .map(|(q, k)| if allowed(q, k) { 1.0 } else { 0.0 })
        .collect();
    let pattern = Tensor::from_vec(pattern, (1, 1, t, k_len), device)?;
    let allowed = keys.broadcast_mul(&pattern)?; // [B,1,T,K]
                                                 // (allowed - 1) * BIG: 0 where allowed, -BIG where not.
    Ok(((allowed - 1.0)? * MASK_VALUE)?)
}

/// Magnitude of the additive mask; finite so fully masked rows do not give NaN.
pub const MASK_VALUE: f64 = 1e30;

/// Converts user-facing ids to a u32 tensor `[B, T]`.
pub fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let t = rows.first().map(|r| r.len()).unwrap_or(0);
    if rows.iter().any(|r| r.len() != t) {
        crate::bail!("ids_tensor: rows have different lengths");
    }
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), t), device)?)
}
