//! Tokenized examples and padded batches, laid out as PEFT does for prompt tuning.
//!
//! Decoder-only models: each row is `source + target`, LEFT padded; the logits at full
//! sequence position `t` (prompt included) predict token `t + 1`, so target token `s` of the
//! row is scored at position `N + s - 1`. Encoder-decoder models: the source goes to the
//! encoder (RIGHT padded), the decoder reads `[start] + target[..-1]` and is scored on
//! `target`.

use crate::model::ModelInfo;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// One tokenized example. `target` already ends with EOS where the task wants one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub source: Vec<u32>,
    pub target: Vec<u32>,
}

/// A padded batch plus where its target tokens are scored.
#[derive(Debug)]
pub struct Batch {
    /// Causal: `[B, S]` source+target ids, left padded. Seq2seq: `[B, S]` encoder ids, right padded.
    pub input_ids: Tensor,
    /// `[B, S]` f32, 1 = token, 0 = pad (without the prompt's ones).
    pub attention_mask: Tensor,
    /// Seq2seq only: `[B, T]` decoder input ids.
    pub decoder_input_ids: Option<Tensor>,
    /// `[M]` u32: rows of the flattened logits positions (`[B * (N+S)]` causal,
    /// `[B * T]` seq2seq) where a target token is predicted.
    pub label_rows: Tensor,
    /// `[M]` u32: the target token predicted at each of `label_rows`.
    pub label_ids: Tensor,
    /// For each of the `M` label tokens, the example (row) it belongs to.
    pub label_example: Vec<usize>,
    /// Number of target tokens per row.
    pub target_lens: Vec<usize>,
    /// Non-pad tokens in the batch (sources and targets), for tokens/s.
    pub n_tokens: usize,
}

/// Batches examples for a model with a prompt of `n_prompt` virtual tokens.
pub fn collate(examples: &[Example], info: &ModelInfo, n_prompt: usize, device: &Device) -> Result<Batch> {
    if examples.is_empty() {
        crate::bail!("cannot make a batch of no examples");
    }
    if examples.iter().any(|e| e.target.is_empty()) {
        crate::bail!("an example has an empty target: nothing to score");
    }
    let pad = info.pad_id();
    let b = examples.len();
    let mut label_rows = Vec::new();
    let mut label_ids = Vec::new();
    let mut label_example = Vec::new();
    let n_tokens = examples.iter().map(|e| e.source.len() + e.target.len()).sum();
    let target_lens = examples.iter().map(|e| e.target.len()).collect();
    if let Some(start) = info.decoder_start_token_id {
        // Encoder-decoder.
        let s = examples.iter().map(|e| e.source.len()).max().unwrap_or(0).max(1);
        let t = examples.iter().map(|e| e.target.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        let mut dec = Vec::with_capacity(b * t);
        for (i, e) in examples.iter().enumerate() {
            ids.extend(e.source.iter().copied().chain(std::iter::repeat(pad)).take(s));
            mask.extend((0..s).map(|j| if j < e.source.len() { 1f32 } else { 0. }));
            // transformers' shift_right of the padded labels: [start] + target, then pads
            // (the token after the last target only feeds positions that are not scored).
            let shifted = std::iter::once(start).chain(e.target.iter().copied());
            dec.extend(shifted.chain(std::iter::repeat(pad)).take(t));
            for (j, &tok) in e.target.iter().enumerate() {
                label_rows.push((i * t + j) as u32);
                label_ids.push(tok);
                label_example.push(i);
            }
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, s), device)?,
            attention_mask: Tensor::from_vec(mask, (b, s), device)?,
            decoder_input_ids: Some(Tensor::from_vec(dec, (b, t), device)?),
            label_rows: Tensor::new(label_rows, device)?,
            label_ids: Tensor::new(label_ids, device)?,
            label_example,
            target_lens,
            n_tokens,
        })
    } else {
        // Decoder-only.
        let s = examples.iter().map(|e| e.source.len() + e.target.len()).max().unwrap_or(0);
        let full = n_prompt + s;
        let mut ids = Vec::with_capacity(b * s);
        let mut mask = Vec::with_capacity(b * s);
        for (i, e) in examples.iter().enumerate() {
            let len = e.source.len() + e.target.len();
            let pads = s - len;
            ids.extend(std::iter::repeat_n(pad, pads));
            ids.extend(e.source.iter().chain(e.target.iter()).copied());
            mask.extend((0..s).map(|j| if j < pads { 0f32 } else { 1. }));
            for (j, &tok) in e.target.iter().enumerate() {
                let s_pos = pads + e.source.len() + j; // index of the target token in S
                let predicting = n_prompt + s_pos; // position in N+S of the token itself
                if predicting == 0 {
                    crate::bail!("the first token of a sequence cannot be predicted: give a non-empty source or a prompt");
                }
                label_rows.push((i * full + predicting - 1) as u32);
                label_ids.push(tok);
                label_example.push(i);
            }
        }
        Ok(Batch {
            input_ids: Tensor::from_vec(ids, (b, s), device)?,
            attention_mask: Tensor::from_vec(mask, (b, s), device)?,
            decoder_input_ids: None,
            label_rows: Tensor::new(label_rows, device)?,
            label_ids: Tensor::new(label_ids, device)?,
            label_example,
            target_lens,
            n_tokens,
        })
    }
}

/// Sums per-token values `[M]` into per-example totals using `label_example`.
pub fn per_example_sums(values: &Tensor, batch: &Batch) -> Result<Vec<f32>> {
    let v = values.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let mut out = vec![0f32; batch.target_lens.len()];
    for (x, &i) in v.iter().zip(&batch.label_example) {
        out[i] += x;
    }
    Ok(out)
}
