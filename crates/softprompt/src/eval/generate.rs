//! Greedy generation with a KV cache, the prompt injected once at prefill.
//!
//! Follows transformers' conventions: decoder-only inputs are left padded; a row that has
//! emitted EOS continues with the pad id; decoding stops when every row is done or after
//! `max_new_tokens`.

use crate::model::{ids_tensor, Backbone, KvCache, LogitsAt};
use crate::prompt::prepend;
use crate::Result;
use candle_core::{DType, Device, Tensor, D};

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop a row at any of the model's EOS ids.
    pub stop_at_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 20,
            stop_at_eos: true,
        }
    }
}

/// The output of [`greedy`]: per row the new tokens (EOS included, padding after it
/// excluded), and the logits `[B, V]` that chose each step's tokens.
pub struct Generation {
    pub tokens: Vec<Vec<u32>>,
    pub step_logits: Vec<Tensor>,
}

/// Greedy decoding of `sources` (token ids, one row each) with an optional prompt
/// (`[N, D]` or `[B, N, D]`).
pub fn greedy(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    sources: &[Vec<u32>],
    opts: &GenerateOptions,
    device: &Device,
) -> Result<Generation> {
    let info = backbone.info();
    let b = sources.len();
    if b == 0 {
        return Ok(Generation { tokens: vec![], step_logits: vec![] });
    }
    let pad = info.pad_id();
    let seq2seq = backbone.is_seq2seq();
    // Pad the sources: left for decoder-only, right for the encoder.
    let s = sources.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut rows = Vec::with_capacity(b);
    let mut mask_rows = Vec::with_capacity(b * s);
    for src in sources {
        let pads = s - src.len();
        let mut row: Vec<u32> = Vec::with_capacity(s);
        if seq2seq {
            row.extend(src);
            row.extend(std::iter::repeat_n(pad, pads));
            mask_rows.extend((0..s).map(|j| if j < src.len() { 1f32 } else { 0. }));
        } else {
            row.extend(std::iter::repeat_n(pad, pads));
            row.extend(src);
            mask_rows.extend((0..s).map(|j| if j < pads { 0f32 } else { 1. }));
        }
        rows.push(row);
    }
    let ids = ids_tensor(&rows, device)?; // [B, S]
    let mask = Tensor::from_vec(mask_rows, (b, s), device)?; // [B, S]
    let embeds = backbone.embed(&ids)?;
    // Generation never differentiates: a prompt still tracked (a training `Var`) would make
    // every layer build an autograd graph and miss the fused, cache-filling prefill.
    let (embeds, mut mask) = match prompt {
        Some(p) => prepend(&p.detach(), &embeds, &mask)?,
        None => (embeds, mask),
    };
    if let Some(max) = info.max_positions {
        let needed = embeds.dim(1)? + opts.max_new_tokens;
        if needed > max {
            crate::bail!("prompt + input + {} new tokens = {needed} positions, more than the model's {max}", opts.max_new_tokens);
        }
    }

    let mut cache = KvCache::new(info.n_layers);
    let mut done = vec![false; b];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut step_logits = Vec::new();
    let encoder = match backbone {
        Backbone::Seq2Seq(m) => Some(m.encode(&embeds, &mask)?),
        Backbone::Causal(_) => None,
    };
    let start = info.decoder_start_token_id.unwrap_or(pad);
    let mut next_input: Tensor = Tensor::from_vec(vec![start; b], (b, 1), device)?;
    for step in 0..opts.max_new_tokens {
        let logits = match backbone {
            Backbone::Causal(m) => {
                if step == 0 {
                    m.forward(&embeds, &mask, Some(&mut cache), LogitsAt::Last)?
                } else {
                    let e = m.embed(&next_input)?; // [B, 1, D]
                    mask = Tensor::cat(&[&mask, &Tensor::ones((b, 1), mask.dtype(), device)?], 1)?;
                    m.forward(&e, &mask, Some(&mut cache), LogitsAt::Last)?
                }
            }
            Backbone::Seq2Seq(m) => {
                let enc = encoder
                    .as_ref()
                    .ok_or_else(|| crate::Error::invalid("seq2seq generation without encoder output"))?;
                m.decode(&next_input, enc, &mask, Some(&mut cache), LogitsAt::Last)?
            }
        }; // [B, V]
        let chosen = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        step_logits.push(logits);
        let mut next = Vec::with_capacity(b);
        for (i, &tok) in chosen.iter().enumerate() {
            if done[i] {
                next.push(pad);
                continue;
            }
            tokens[i].push(tok);
            if opts.stop_at_eos && info.eos_token_ids.contains(&tok) {
                done[i] = true;
            }
            next.push(tok);
        }
        if done.iter().all(|&d| d) {
            break;
        }
        next_input = Tensor::from_vec(next, (b, 1), device)?;
    }
    Ok(Generation { tokens, step_logits })
}
