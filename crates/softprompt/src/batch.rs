//! Tokenized examples and padded batches, laid out as PEFT does for prompt tuning.
//!
//! Decoder-only models: each row is `source + target`, LEFT padded; the logits at full
//! sequence position `t` (prompt included) predict token `t + 1`, so target token `s` of the
//! row is scored at position `N + s - 1`. Encoder-decoder models: the source goes to the
//! encoder (RIGHT padded), the decoder reads `[start] + target[..-1]` and is scored on
//! `target`.
//!
//! [`pad_ids`] and [`pad_embeds`] are the one padding helper: batches, generation, beam search,
//! rank classification and both server engines lay their rows out with them.

use crate::model::ModelInfo;
use crate::Result;
use candle_core::{DType, Device, Tensor};

/// Which end of a row its padding goes to. Decoder-only inputs are padded on the left, so
/// that every row's last token is the batch's last position and generation continues right
/// after it; encoder inputs and decoder targets on the right, where nothing reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

impl Side {
    /// The side `info`'s model takes its inputs padded on: right for an encoder, left for a
    /// decoder-only model.
    pub fn of_inputs(info: &ModelInfo) -> Side {
        if info.is_encoder_decoder() {
            Side::Right
        } else {
            Side::Left
        }
    }

    /// Pads before a row of `len` padded to `width`.
    pub fn lead(self, len: usize, width: usize) -> usize {
        match self {
            Side::Left => width.saturating_sub(len),
            Side::Right => 0,
        }
    }

    /// The mask of a row of `len` padded to `width`: 1 = token, 0 = pad.
    pub fn mask(self, len: usize, width: usize) -> impl Iterator<Item = f32> {
        let lead = self.lead(len, width);
        (0..width).map(move |j| if j >= lead && j < lead + len { 1f32 } else { 0. })
    }
}

/// Rows of token ids padded to one width.
#[derive(Debug)]
pub struct PaddedIds {
    /// `[B, W]` u32.
    pub ids: Tensor,
    /// `[B, W]` f32: 1 = token, 0 = pad.
    pub mask: Tensor,
    /// `W`: the longest row, or the minimum width asked for.
    pub width: usize,
}

/// Pads `rows` with `pad` on `side` to the longest row (at least `min_width`).
pub fn pad_ids<R: AsRef<[u32]>>(rows: &[R], side: Side, pad: u32, min_width: usize, device: &Device) -> Result<PaddedIds> {
    let b = rows.len();
    let width = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0).max(min_width);
    let mut ids = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    for row in rows {
        let row = row.as_ref();
        let lead = side.lead(row.len(), width);
        ids.extend(std::iter::repeat_n(pad, lead));
        ids.extend(row);
        ids.extend(std::iter::repeat_n(pad, width - lead - row.len()));
        mask.extend(side.mask(row.len(), width));
    }
    Ok(PaddedIds {
        ids: Tensor::from_vec(ids, (b, width), device)?,
        mask: Tensor::from_vec(mask, (b, width), device)?,
        width,
    })
}

/// The mask `[B, W]` of rows of `lens` padded on `side` to `width`.
pub fn pad_mask(lens: &[usize], width: usize, side: Side, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = lens.iter().flat_map(|&len| side.mask(len, width)).collect();
    Ok(Tensor::from_vec(mask, (lens.len(), width), device)?)
}

/// Rows of vectors padded with zero vectors to one length.
#[derive(Debug)]
pub struct PaddedEmbeds {
    /// `[B, L, D]`.
    pub embeds: Tensor,
    /// `[B, L]` f32: 1 = real, 0 = pad.
    pub mask: Tensor,
    /// `L_i` per row, pads not counted.
    pub lens: Vec<usize>,
}

/// Pads rows of vectors, each the concatenation of its `pieces` (`[L_ik, D]`, empty ones
/// allowed), with zero vectors on `side` to the longest row, all in `dtype`.
pub fn pad_embeds(rows: &[Vec<Tensor>], side: Side, dtype: DType) -> Result<PaddedEmbeds> {
    let Some(like) = rows.iter().flatten().next() else {
        crate::bail!("padding: no rows of vectors");
    };
    let (_, d) = like.dims2()?;
    let device = like.device();
    let mut lens = Vec::with_capacity(rows.len());
    for pieces in rows {
        let mut len = 0;
        for p in pieces {
            len += p.dim(0)?;
        }
        lens.push(len);
    }
    let width = lens.iter().copied().max().unwrap_or(0);
    let mut padded = Vec::with_capacity(rows.len());
    for (pieces, &len) in rows.iter().zip(&lens) {
        let lead = side.lead(len, width);
        let mut parts = Vec::with_capacity(pieces.len() + 2);
        parts.push(Tensor::zeros((lead, d), dtype, device)?);
        for p in pieces.iter().filter(|p| p.dim(0).is_ok_and(|n| n > 0)) {
            parts.push(p.to_dtype(dtype)?);
        }
        parts.push(Tensor::zeros((width - lead - len, d), dtype, device)?);
        parts.retain(|t| t.dim(0).is_ok_and(|n| n > 0));
        padded.push(Tensor::cat(&parts, 0)?); // [L, D]
    }
    Ok(PaddedEmbeds {
        embeds: Tensor::stack(&padded, 0)?, // [B, L, D]
        mask: pad_mask(&lens, width, side, device)?,
        lens,
    })
}

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
    collate_to_width(examples, info, n_prompt, 0, device)
}

/// The examples `range` of `batch`, batched as they are in the whole `batch`: decoder-only
/// rows are left padded to the whole batch's longest row, so each token keeps the position
/// (and the distance to the prompt) it has in the whole batch. This is one rank's shard in
/// data-parallel training; its losses are those of the same rows of `collate(batch)`.
pub fn collate_shard(
    batch: &[Example],
    range: std::ops::Range<usize>,
    info: &ModelInfo,
    n_prompt: usize,
    device: &Device,
) -> Result<Batch> {
    let Some(shard) = batch.get(range.clone()) else {
        crate::bail!("shard {range:?} of a batch of {} examples", batch.len());
    };
    let width = if info.is_encoder_decoder() {
        // Encoder rows are right padded: their width changes no token's position.
        0
    } else {
        batch.iter().map(|e| e.source.len() + e.target.len()).max().unwrap_or(0)
    };
    collate_to_width(shard, info, n_prompt, width, device)
}

/// [`collate`] with decoder-only rows padded to at least `min_width` tokens.
fn collate_to_width(
    examples: &[Example],
    info: &ModelInfo,
    n_prompt: usize,
    min_width: usize,
    device: &Device,
) -> Result<Batch> {
    if examples.is_empty() {
        crate::bail!("cannot make a batch of no examples");
    }
    if examples.iter().any(|e| e.target.is_empty()) {
        crate::bail!("an example has an empty target: nothing to score");
    }
    let pad = info.pad_id();
    let mut label_rows = Vec::new();
    let mut label_ids = Vec::new();
    let mut label_example = Vec::new();
    let n_tokens = examples.iter().map(|e| e.source.len() + e.target.len()).sum();
    let target_lens = examples.iter().map(|e| e.target.len()).collect();
    let (inputs, decoder_input_ids) = if info.is_encoder_decoder() {
        let sources: Vec<&[u32]> = examples.iter().map(|e| e.source.as_slice()).collect();
        let encoder = pad_ids(&sources, Side::Right, pad, 1, device)?; // [B, S]
        // transformers' shift_right of the padded labels: [start] + target, then pads
        // (the token after the last target only feeds positions that are not scored).
        let start = info.decoder_start_token_id.unwrap_or(pad);
        let t = examples.iter().map(|e| e.target.len()).max().unwrap_or(0);
        let shifted: Vec<Vec<u32>> =
            examples.iter().map(|e| std::iter::once(start).chain(e.target.iter().copied()).take(t).collect()).collect();
        let decoder = pad_ids(&shifted, Side::Right, pad, t, device)?; // [B, T]
        for (i, e) in examples.iter().enumerate() {
            for (j, &tok) in e.target.iter().enumerate() {
                label_rows.push((i * t + j) as u32);
                label_ids.push(tok);
                label_example.push(i);
            }
        }
        (encoder, Some(decoder.ids))
    } else {
        // `source + target`, left padded.
        let rows: Vec<Vec<u32>> = examples.iter().map(|e| [e.source.as_slice(), &e.target].concat()).collect();
        let inputs = pad_ids(&rows, Side::Left, pad, min_width, device)?; // [B, S]
        let full = n_prompt + inputs.width;
        for (i, (e, row)) in examples.iter().zip(&rows).enumerate() {
            let pads = Side::Left.lead(row.len(), inputs.width);
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
        (inputs, None)
    };
    Ok(Batch {
        input_ids: inputs.ids,
        attention_mask: inputs.mask,
        decoder_input_ids,
        label_rows: Tensor::new(label_rows, device)?,
        label_ids: Tensor::new(label_ids, device)?,
        label_example,
        target_lens,
        n_tokens,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_pad_left_or_right_with_their_masks() {
        let rows = [vec![5u32, 6, 7], vec![8]];
        let left = pad_ids(&rows, Side::Left, 0, 0, &Device::Cpu).unwrap();
        assert_eq!(left.width, 3);
        assert_eq!(left.ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7], vec![0, 0, 8]]);
        assert_eq!(left.mask.to_vec2::<f32>().unwrap(), vec![vec![1., 1., 1.], vec![0., 0., 1.]]);
        let right = pad_ids(&rows, Side::Right, 9, 4, &Device::Cpu).unwrap();
        assert_eq!(right.ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7, 9], vec![8, 9, 9, 9]]);
        assert_eq!(right.mask.to_vec2::<f32>().unwrap(), vec![vec![1., 1., 1., 0.], vec![1., 0., 0., 0.]]);
    }

    #[test]
    fn embeddings_pad_with_zero_vectors() {
        let a = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::full(2f32, (1, 3), &Device::Cpu).unwrap();
        let empty = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let rows = vec![vec![a.clone(), b.clone()], vec![b, empty]];
        for side in [Side::Left, Side::Right] {
            let p = pad_embeds(&rows, side, DType::F32).unwrap();
            assert_eq!(p.lens, vec![3, 1]);
            assert_eq!(p.embeds.dims(), &[2, 3, 3]);
            let second: Vec<f32> = p.embeds.get(1).unwrap().sum(1).unwrap().to_vec1().unwrap(); // [L]
            let mask = p.mask.to_vec2::<f32>().unwrap();
            let expected = if side == Side::Left { [0., 0., 6.] } else { [6., 0., 0.] };
            assert_eq!(second, expected);
            assert_eq!(mask[1], expected.map(|x| if x > 0. { 1. } else { 0. }));
        }
    }
}
