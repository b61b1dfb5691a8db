//! Greedy generation with a KV cache, the prompt injected once at prefill, through the
//! decoding loop the server uses too ([`crate::decode`]).
//!
//! Follows transformers' conventions: decoder-only inputs are left padded; a row that has
//! emitted EOS continues with the pad id; decoding stops when every row is done or after
//! `max_new_tokens`.

use crate::batch::{pad_ids, Side};
use crate::decode::{self, DecodeParams, DecodeState, DecodeStep, Finished};
use crate::model::Backbone;
use crate::prompt::prepend;
use crate::Result;
use candle_core::{Device, Tensor};

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
    let inputs = pad_ids(sources, Side::of_inputs(info), pad, 1, device)?; // [B, S]
    let embeds = backbone.embed(&inputs.ids)?; // [B, S, D]
    // Generation never differentiates: a prompt still tracked (a training `Var`) would make
    // every layer build an autograd graph and miss the fused, cache-filling prefill.
    let (embeds, mask) = match prompt {
        Some(p) => prepend(&p.detach(), &embeds, &inputs.mask)?,
        None => (embeds, inputs.mask),
    };
    if let Some(max) = info.max_positions {
        let needed = embeds.dim(1)? + opts.max_new_tokens;
        if needed > max {
            crate::bail!("prompt + input + {} new tokens = {needed} positions, more than the model's {max}", opts.max_new_tokens);
        }
    }
    let stop_ids = if opts.stop_at_eos { info.eos_token_ids.clone() } else { Vec::new() };
    let params = std::iter::repeat_n(DecodeParams::greedy(opts.max_new_tokens), b);
    let mut decoder = DecodeStep::new(params, stop_ids, None)?.without_logprobs();
    let mut step_logits = Vec::new();
    if !decoder.all_finished() {
        let (mut state, logits) = DecodeState::start(backbone, &embeds, mask)?;
        let rows = (0..b).collect();
        let mut record = |logits: Tensor| step_logits.push(logits);
        decode::run(&mut state, logits, &mut decoder, rows, Finished::FeedPad(pad), &|_| false, &mut record)?;
    }
    let tokens = decoder.sequences.into_iter().map(|s| s.tokens).collect();
    Ok(Generation { tokens, step_logits })
}
