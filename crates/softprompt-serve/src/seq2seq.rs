//! Batched forwards for encoder-decoder models (T5 v1.0, T5 v1.1 / flan-T5): the same items
//! and outputs as [`crate::engine`], so the batcher dispatches on the backbone.
//!
//! The soft prompt goes before the encoder input only. Encoder row `i` is
//! `[P_i; embed(x_i); pad x p_i]`, RIGHT padded to the longest `N_i + S_i` in the batch, so
//! prompts of different lengths (different tasks) share one encoder pass. Pad positions are
//! zero vectors masked out of encoder self-attention and of the decoder's cross-attention.
//! The decoder gets no prompt and no padding: every row starts from the decoder start token
//! at step 0.
//!
//! Why mixing does not change a request's result: T5 has no absolute positions; its
//! attention bias depends only on the distance `key - query`, and a row's real tokens sit at
//! positions `0..N_i+S_i-1` exactly as when the row runs alone (its pads come after them).
//! Masked keys receive exactly zero weight, so a row's encoder output at its real positions,
//! and everything the decoder reads, equal the unbatched values up to float rounding.
//! The inputs are the library's: encoder inputs end with EOS (the HTTP layer appends it) and
//! label targets end with EOS (`ClassificationTask::label_targets`).

use crate::engine::{ClsItem, ClsOutput, GenItem, GenOutput, GenerationBatch};
use candle_core::{Device, Tensor};
use softprompt::batch::{collate, pad_embeds, pad_ids, per_example_sums, Example, PaddedEmbeds, Side};
use softprompt::decode::DecodeState;
use softprompt::load::Model;
use softprompt::model::ops::token_nll;
use softprompt::model::{Backbone, LogitsAt, Seq2SeqLm};
use softprompt::Result;

/// The encoder-decoder backbone of `model`, or an error for decoder-only models.
pub fn seq2seq(model: &Model) -> Result<&dyn Seq2SeqLm> {
    match &model.backbone {
        Backbone::Seq2Seq(m) => Ok(m.as_ref()),
        Backbone::Causal(_) => softprompt::bail!(
            "{} is a decoder-only model; the encoder-decoder path serves T5-style models",
            model.path.display()
        ),
    }
}

/// Encoder input `[B, L, D]` and mask `[B, L]` for rows `(prompt [N_i, D], tokens)`:
/// `[P_i; embed(x_i)]` followed by zero vectors up to `L = max(N_i + S_i)`.
fn encoder_input(m: &dyn Seq2SeqLm, rows: &[(&Tensor, &[u32])], device: &Device) -> Result<PaddedEmbeds> {
    let tokens: Vec<&[u32]> = rows.iter().map(|r| r.1).collect();
    let inputs = pad_ids(&tokens, Side::Right, m.info().pad_id(), 1, device)?; // [B, S]
    let emb = m.embed(&inputs.ids)?; // [B, S, D]
    let mut pieces = Vec::with_capacity(rows.len());
    for (i, (prompt, src)) in rows.iter().enumerate() {
        pieces.push(vec![(*prompt).clone(), emb.get(i)?.narrow(0, 0, src.len())?]); // [N_i, D], [S_i, D]
    }
    pad_embeds(&pieces, Side::Right, emb.dtype())
}

/// Generates for every item in one batch: one encoder pass, then one decoder step per token
/// with the decoder KV cache (self-attention keys/values grow, cross-attention keys/values
/// are computed once). Finished (or cancelled: `cancelled(i)` is polled every step)
/// requests leave the batch at once.
pub fn generate(model: &Model, items: &[GenItem], cancelled: &dyn Fn(usize) -> bool) -> Result<Vec<GenOutput>> {
    let m = seq2seq(model)?;
    let generation = GenerationBatch::new(model, items)?;
    let rows: Vec<(&Tensor, &[u32])> =
        generation.rows().map(|(i, j)| (&items[i].prompts[j], items[i].source.as_slice())).collect();
    let state = if rows.is_empty() {
        None
    } else {
        let encoder = encoder_input(m, &rows, &model.device)?; // [B, L, D], [B, L]
        Some(DecodeState::seq2seq(m, &encoder.embeds, encoder.mask)?)
    };
    generation.run(state, cancelled)
}

/// Rank classification of every item: the decoder log-likelihood of each label's target
/// given `[prompt; input]` on the encoder side, for every prompt of the item's task (the sum
/// over the target's tokens, EOS included, as `eval::classify` scores it).
///
/// The encoder runs once per (item, prompt); its output is repeated for the decoder rows, one
/// per (item, prompt, label). Encoder rows are taken so that a forward holds at most
/// `max_rows` decoder rows (always at least one encoder row).
pub fn classify(model: &Model, items: &[ClsItem], max_rows: usize) -> Result<Vec<ClsOutput>> {
    let m = seq2seq(model)?;
    let device = &model.device;
    let info = m.info();
    let mut out: Vec<ClsOutput> = Vec::with_capacity(items.len());
    // (item, prompt) per encoder row.
    let mut enc_rows: Vec<(usize, usize)> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if it.source.is_empty() || it.label_targets.is_empty() || it.label_targets.iter().any(|t| t.is_empty()) {
            softprompt::bail!("classification needs a non-empty input and non-empty label targets");
        }
        out.push(ClsOutput::zeros(it));
        enc_rows.extend((0..it.prompts.len()).map(|j| (i, j)));
    }
    let mut first = 0;
    while first < enc_rows.len() {
        let mut end = first + 1;
        let mut n_dec = items[enc_rows[first].0].label_targets.len();
        while end < enc_rows.len() {
            let more = items[enc_rows[end].0].label_targets.len();
            if n_dec + more > max_rows {
                break;
            }
            n_dec += more;
            end += 1;
        }
        let chunk = &enc_rows[first..end];
        first = end;

        let spec: Vec<(&Tensor, &[u32])> =
            chunk.iter().map(|&(i, j)| (&items[i].prompts[j], items[i].source.as_slice())).collect();
        let PaddedEmbeds { embeds, mask, .. } = encoder_input(m, &spec, device)?; // [E, L, D], [E, L]
        let enc = m.encode(&embeds, &mask)?; // [E, L, D]

        // Decoder rows: the library's layout for (source, label) pairs (`[start] + target`,
        // scored on `target`), built by `collate`; its encoder side is `enc` instead, so the
        // pairs need no source here.
        let mut examples = Vec::with_capacity(n_dec);
        let mut owner: Vec<u32> = Vec::with_capacity(n_dec); // encoder row of each decoder row
        let mut slot: Vec<(usize, usize, usize)> = Vec::with_capacity(n_dec); // (item, prompt, label)
        for (r, &(i, j)) in chunk.iter().enumerate() {
            for (l, t) in items[i].label_targets.iter().enumerate() {
                examples.push(Example { source: Vec::new(), target: t.clone() });
                owner.push(r as u32);
                slot.push((i, j, l));
            }
        }
        let batch = collate(&examples, info, 0, device)?;
        let dec_ids = batch
            .decoder_input_ids
            .as_ref()
            .ok_or_else(|| softprompt::Error::invalid("seq2seq batch without decoder inputs"))?; // [R, T]
        let idx = Tensor::new(owner.as_slice(), device)?; // [R]
        let enc_r = enc.index_select(&idx, 0)?; // [R, L, D]
        let mask_r = mask.index_select(&idx, 0)?; // [R, L]
        let logits = m.decode(dec_ids, &enc_r, &mask_r, None, LogitsAt::Rows(&batch.label_rows))?; // [M, V]
        let nll = token_nll(&logits, &batch.label_ids)?; // [M]
        for (&(i, j, l), s) in slot.iter().zip(per_example_sums(&nll, &batch)?) {
            out[i].per_prompt[j][l] = -s;
        }
    }
    out.iter_mut().for_each(ClsOutput::average);
    Ok(out)
}
