//! One decoding loop for every generator: library greedy decoding ([`crate::eval::generate`])
//! and the server's decoder-only and encoder-decoder engines. Beam search keeps its own search
//! but steps the model through the same [`DecodeState`].
//!
//! A step reads the logits `[R, V]` of the batch's rows, lets the [`DecodeStep`] choose each
//! running sequence's token and apply the stop rules ([`choose`]), then feeds the chosen
//! tokens back through the [`DecodeState`] (a KV cache: one new position per step).
//! Finished rows either leave the batch ([`Finished::Leave`], the server) or stay, fed the pad
//! id ([`Finished::FeedPad`], transformers' convention, which keeps the library's step logits
//! `[B, V]` for every row).

mod choose;

pub use choose::{DecodeParams, DecodeStep, Finish, Sequence, TokenObserver};

use crate::model::{Backbone, CausalLm, KvCache, LogitsAt, Seq2SeqLm};
use crate::Result;
use candle_core::{DType, Tensor};

/// The model side of a batch being decoded: what the next step's forward needs.
pub enum DecodeState<'m> {
    /// Decoder-only: keys/values of every past position and their mask `[R, P]`.
    Causal { model: &'m dyn CausalLm, cache: KvCache, mask: Tensor },
    /// Encoder-decoder: the decoder cache (self and cross attention), the encoder output
    /// `[R, L, D]` and its mask `[R, L]`.
    Seq2Seq { model: &'m dyn Seq2SeqLm, cache: KvCache, encoder: Tensor, encoder_mask: Tensor },
}

impl<'m> DecodeState<'m> {
    /// Starts `backbone` on the (prompted) inputs `embeds [R, T, D]`, `mask [R, T]` with an
    /// empty cache; returns the state and the first step's logits `[R, V]`.
    pub fn start(backbone: &'m Backbone, embeds: &Tensor, mask: Tensor) -> Result<(Self, Tensor)> {
        match backbone {
            Backbone::Causal(m) => Self::causal(m.as_ref(), embeds, mask, KvCache::new(m.info().n_layers)),
            Backbone::Seq2Seq(m) => Self::seq2seq(m.as_ref(), embeds, mask),
        }
    }

    /// Decoder-only: runs `embeds [R, T, D]` after the `P` positions of `cache` (`mask
    /// [R, P + T]`, 1 = real, 0 = pad); returns the state and the logits `[R, V]` at the last
    /// position.
    pub fn causal(model: &'m dyn CausalLm, embeds: &Tensor, mask: Tensor, mut cache: KvCache) -> Result<(Self, Tensor)> {
        let logits = model.forward(embeds, &mask, Some(&mut cache), LogitsAt::Last)?; // [R, V]
        Ok((DecodeState::Causal { model, cache, mask }, logits))
    }

    /// Encoder-decoder: encodes `embeds [R, L, D]` (`mask [R, L]`) once and runs the decoder
    /// start token; returns the state and the first logits `[R, V]`.
    pub fn seq2seq(model: &'m dyn Seq2SeqLm, embeds: &Tensor, mask: Tensor) -> Result<(Self, Tensor)> {
        let info = model.info();
        let start = info.decoder_start_token_id.unwrap_or_else(|| info.pad_id());
        let encoder = model.encode(embeds, &mask)?; // [R, L, D]
        let mut state = DecodeState::Seq2Seq {
            model,
            cache: KvCache::new(info.n_layers),
            encoder,
            encoder_mask: mask,
        };
        let rows = embeds.dim(0)?;
        let logits = state.next(&vec![start; rows])?;
        Ok((state, logits))
    }

    /// Feeds one token per row (`tokens [R]`); returns the logits `[R, V]` that follow.
    pub fn next(&mut self, tokens: &[u32]) -> Result<Tensor> {
        match self {
            DecodeState::Causal { model, cache, mask } => {
                let (rows, device) = (tokens.len(), mask.device().clone());
                let ids = Tensor::from_vec(tokens.to_vec(), (rows, 1), &device)?; // [R, 1]
                let ones = Tensor::ones((rows, 1), mask.dtype(), &device)?;
                *mask = Tensor::cat(&[&*mask, &ones], 1)?; // [R, P + 1]
                let embeds = model.embed(&ids)?; // [R, 1, D]
                model.forward(&embeds, mask, Some(cache), LogitsAt::Last)
            }
            DecodeState::Seq2Seq { model, cache, encoder, encoder_mask } => {
                let ids = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), encoder.device())?; // [R, 1]
                model.decode(&ids, encoder, encoder_mask, Some(cache), LogitsAt::Last)
            }
        }
    }

    /// Row `i` of the batch becomes old row `rows[i]` (indices may repeat: beam search).
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        match self {
            DecodeState::Causal { cache, mask, .. } => {
                let idx = Tensor::new(rows, mask.device())?; // [R']
                cache.index_rows(&idx)?;
                *mask = mask.index_select(&idx, 0)?;
            }
            DecodeState::Seq2Seq { cache, encoder, encoder_mask, .. } => {
                let idx = Tensor::new(rows, encoder.device())?; // [R']
                cache.index_rows(&idx)?; // self and cross keys/values
                *encoder = encoder.index_select(&idx, 0)?;
                *encoder_mask = encoder_mask.index_select(&idx, 0)?;
            }
        }
        Ok(())
    }
}

/// What happens to the rows of a finished sequence.
#[derive(Clone, Copy, Debug)]
pub enum Finished {
    /// They leave the batch at once.
    Leave,
    /// They stay until every sequence is finished, fed this (pad) id.
    FeedPad(u32),
}

/// Decodes until every sequence of `decoder` is finished. `logits [R, V]` are the first
/// step's, `owners[r]` the sequence of row `r` (a sequence's rows adjacent); `cancelled(i)` is
/// asked every step for every running sequence; `on_logits` sees every step's logits.
pub fn run(
    state: &mut DecodeState,
    mut logits: Tensor,
    decoder: &mut DecodeStep,
    mut owners: Vec<usize>,
    finished: Finished,
    cancelled: &dyn Fn(usize) -> bool,
    on_logits: &mut dyn FnMut(Tensor),
) -> Result<()> {
    loop {
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?; // [R][V]
        on_logits(logits);
        let chosen = decoder.step(&rows, &owners, cancelled)?;
        if decoder.all_finished() {
            return Ok(());
        }
        let running = |i: usize| decoder.sequences.get(i).is_some_and(|s| !s.is_finished());
        let token = |i: usize| chosen.get(i).copied().flatten();
        let next: Vec<u32> = match finished {
            Finished::Leave => {
                if owners.iter().any(|&i| !running(i)) {
                    let keep: Vec<u32> = (0..owners.len()).filter(|&r| running(owners[r])).map(|r| r as u32).collect();
                    state.select_rows(&keep)?;
                    owners = keep.iter().map(|&r| owners[r as usize]).collect();
                }
                owners.iter().map(|&i| token(i).unwrap_or_default()).collect()
            }
            // A row finished at this step is fed its last token, then the pad id.
            Finished::FeedPad(pad) => owners.iter().map(|&i| token(i).unwrap_or(pad)).collect(),
        };
        logits = state.next(&next)?;
    }
}
