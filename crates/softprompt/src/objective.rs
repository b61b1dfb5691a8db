//! The prompt-tuning objective: -log P(Y | [P; X]) per target token.

use crate::batch::Batch;
use crate::model::ops::token_nll_with;
use crate::model::{Backbone, LogitsAt};
use crate::prompt::prepend;
use crate::Result;
use candle_core::Tensor;

/// Per-target-token negative log-likelihood `[M]` (natural log) of `batch` under the frozen
/// backbone with `prompt` (`[N, D]` or `[B, N, D]`, or none) prepended to the input
/// embeddings (the encoder input for seq2seq). The LM head runs only at label positions.
/// Differentiable with respect to `prompt`.
pub fn target_nll(backbone: &Backbone, prompt: Option<&Tensor>, batch: &Batch) -> Result<Tensor> {
    let embeds = backbone.embed(&batch.input_ids)?; // [B, S, D]
    let (embeds, mask) = match prompt {
        Some(p) => prepend(p, &embeds, &batch.attention_mask)?,
        None => (embeds, batch.attention_mask.clone()),
    };
    let at = LogitsAt::Rows(&batch.label_rows);
    let logits = match backbone {
        Backbone::Causal(m) => m.forward(&embeds, &mask, None, at)?,
        Backbone::Seq2Seq(m) => {
            let enc = m.encode(&embeds, &mask)?;
            let dec = batch
                .decoder_input_ids
                .as_ref()
                .ok_or_else(|| crate::Error::invalid("seq2seq batch without decoder inputs"))?;
            m.decode(dec, &enc, &mask, None, at)?
        }
    }; // [M, V]
    token_nll_with(backbone.kernels(), &logits, &batch.label_ids)
}

/// Mean token cross-entropy over the whole batch (PEFT's loss).
pub fn mean_loss(backbone: &Backbone, prompt: Option<&Tensor>, batch: &Batch) -> Result<Tensor> {
    Ok(target_nll(backbone, prompt, batch)?.mean_all()?)
}
