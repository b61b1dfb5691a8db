//! Beam search with a KV cache, for decoder-only and encoder-decoder models.
//!
//! Each source is searched on its own: the (prompted) input is run once with batch 1, then
//! the model state ([`DecodeState`]: KV cache, encoder output) is replicated to the live beams
//! and re-indexed before every step so that its row `i` always belongs to beam `i`.
//!
//! A step expands every live beam by every token, ranks the candidates by their total
//! log-probability (ties: lower beam, then lower token id, so one beam is exactly greedy
//! decoding), and keeps the best `beams` that do not end in EOS as the new live beams; the
//! candidates ending in EOS that rank above the last kept live beam become finished
//! hypotheses. Without length normalisation the search stops as soon as `beams` hypotheses
//! are finished and none of the live beams can still beat the best of them (log-probabilities
//! only decrease); with it, when the worst finished hypothesis beats the best live beam's
//! current normalised score (transformers' heuristic). Beams alive after `max_new_tokens`
//! steps compete with the finished ones.

use crate::batch::{pad_ids, Side};
use crate::decode::DecodeState;
use crate::model::ops::log_softmax_last_dim;
use crate::model::Backbone;
use crate::prompt::prepend;
use crate::Result;
use candle_core::{DType, Device, Tensor};

#[derive(Clone, Debug)]
pub struct BeamOptions {
    /// Number of beams (1: greedy).
    pub beams: usize,
    pub max_new_tokens: usize,
    /// `None`: rank by total log-probability. `Some(alpha)`: by total / length^alpha
    /// (length counts the generated tokens, EOS included).
    pub length_penalty: Option<f64>,
    /// A hypothesis is finished when it emits one of the model's EOS ids.
    pub stop_at_eos: bool,
}

impl Default for BeamOptions {
    fn default() -> Self {
        BeamOptions {
            beams: 4,
            max_new_tokens: 20,
            length_penalty: None,
            stop_at_eos: true,
        }
    }
}

/// One generated sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    /// New tokens, EOS included when the hypothesis finished.
    pub tokens: Vec<u32>,
    /// Sum of the tokens' log-probabilities (natural log).
    pub log_prob: f64,
    /// What the hypotheses are ranked by (see [`BeamOptions::length_penalty`]).
    pub score: f64,
    pub finished: bool,
}

fn normalised(log_prob: f64, len: usize, penalty: Option<f64>) -> f64 {
    match penalty {
        Some(alpha) => log_prob / (len.max(1) as f64).powf(alpha),
        None => log_prob,
    }
}

/// Beam search for every source. `prompt` is `[N, D]` (shared) or `[B, N, D]` (row `i` for
/// source `i`). Returns per source the final hypotheses, best first (at most `beams`).
pub fn beam_search(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    sources: &[Vec<u32>],
    opts: &BeamOptions,
    device: &Device,
) -> Result<Vec<Vec<Hypothesis>>> {
    if let Some(p) = prompt {
        if p.rank() == 3 && p.dim(0)? != sources.len() {
            crate::bail!(
                "beam search: {} per-row prompts for {} sources",
                p.dim(0)?,
                sources.len()
            );
        }
    }
    sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let p = match prompt {
                Some(p) if p.rank() == 3 => Some(p.get(i)?),
                Some(p) => Some(p.clone()),
                None => None,
            };
            beam_search_one(backbone, p.as_ref(), s, opts, device)
        })
        .collect()
}

/// Beam search for one source with an optional prompt `[N, D]`.
pub fn beam_search_one(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    source: &[u32],
    opts: &BeamOptions,
    device: &Device,
) -> Result<Vec<Hypothesis>> {
    let k = opts.beams.max(1);
    let info = backbone.info();
    if source.is_empty() && prompt.is_none() {
        crate::bail!("beam search needs a non-empty input or a prompt");
    }
    if opts.max_new_tokens == 0 {
        return Ok(vec![Hypothesis {
            tokens: vec![],
            log_prob: 0.0,
            score: 0.0,
            finished: false,
        }]);
    }
    let pad = info.pad_id();
    let input = pad_ids(&[source], Side::of_inputs(info), pad, 0, device)?; // [1, S], no pads
    let embeds = backbone.embed(&input.ids)?; // [1, S, D]
    let (embeds, mask) = match prompt {
        Some(p) => prepend(&p.detach(), &embeds, &input.mask)?, // no autograd graph in search
        None => (embeds, input.mask),
    };
    let prefix = embeds.dim(1)?;
    if let Some(max) = info.max_positions {
        let needed = prefix + opts.max_new_tokens;
        if !info.is_encoder_decoder() && needed > max {
            crate::bail!(
                "prompt + input + {} new tokens = {needed} positions, more than the model's {max}",
                opts.max_new_tokens
            );
        }
    }
    // Row i of the model state (KV cache, encoder output) is live beam i.
    let (mut state, mut logits) = DecodeState::start(backbone, &embeds, mask)?; // [1, V]

    // Live beams: tokens and total log-prob.
    let mut live: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    let mut parents: Vec<u32> = Vec::new();
    let mut finished: Vec<Hypothesis> = Vec::new();
    for step in 0..opts.max_new_tokens {
        if step > 0 {
            state.select_rows(&parents)?;
            let last: Vec<u32> = live.iter().map(|(t, _)| *t.last().unwrap_or(&pad)).collect();
            logits = state.next(&last)?; // [K, V]
        }
        let rows = live.len();
        let logp = log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?.to_vec2::<f32>()?;

        // Every candidate (beam, token, total); keep the best 2K (enough to find K live ones
        // even if K of them end in EOS).
        let mut cands: Vec<(usize, u32, f64)> = Vec::with_capacity(rows * logp[0].len());
        for (b, row) in logp.iter().enumerate() {
            let base = live[b].1;
            cands.extend(
                row.iter()
                    .enumerate()
                    .map(|(t, &lp)| (b, t as u32, base + lp as f64)),
            );
        }
        let order = |a: &(usize, u32, f64), b: &(usize, u32, f64)| {
            b.2.partial_cmp(&a.2)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.0.cmp(&b.0))
                .then(a.1.cmp(&b.1))
        };
        let keep = (2 * k).min(cands.len());
        if keep < cands.len() {
            cands.select_nth_unstable_by(keep - 1, order);
            cands.truncate(keep);
        }
        cands.sort_by(order);

        let mut next: Vec<(Vec<u32>, f64)> = Vec::with_capacity(k);
        parents.clear();
        for (b, tok, total) in cands {
            if next.len() == k {
                break;
            }
            let mut tokens = live[b].0.clone();
            tokens.push(tok);
            if opts.stop_at_eos && info.eos_token_ids.contains(&tok) {
                let len = tokens.len();
                finished.push(Hypothesis {
                    tokens,
                    log_prob: total,
                    score: normalised(total, len, opts.length_penalty),
                    finished: true,
                });
            } else {
                next.push((tokens, total));
                parents.push(b as u32);
            }
        }
        live = next;
        if live.is_empty() {
            break;
        }
        let best_score =
            |h: &[Hypothesis]| h.iter().map(|h| h.score).fold(f64::NEG_INFINITY, f64::max);
        if finished.len() >= k {
            let len = step + 1;
            let live_best = live
                .iter()
                .map(|(_, lp)| normalised(*lp, len, opts.length_penalty))
                .fold(f64::NEG_INFINITY, f64::max);
            let done = match opts.length_penalty {
                None => best_score(&finished) >= live_best,
                Some(_) => {
                    let mut scores: Vec<f64> = finished.iter().map(|h| h.score).collect();
                    scores.sort_by(|a, b| b.partial_cmp(a).unwrap_or(std::cmp::Ordering::Equal));
                    scores[k - 1] >= live_best
                }
            };
            if done {
                live.clear();
                break;
            }
        }
    }
    let mut all = finished;
    all.extend(live.into_iter().map(|(tokens, lp)| {
        let len = tokens.len();
        Hypothesis {
            tokens,
            log_prob: lp,
            score: normalised(lp, len, opts.length_penalty),
            finished: false,
        }
    }));
    all.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    all.truncate(k);
    Ok(all)
}
