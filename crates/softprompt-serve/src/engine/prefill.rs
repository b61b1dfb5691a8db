//! Batch assembly for decoder-only models: the cache, inputs and mask a batch's first forward
//! starts from (the layouts and why they leave every row's result unchanged: [`super`]).

use super::prompt_kv::{Prefill, PromptKv};
use candle_core::{Device, Tensor};
use softprompt::batch::{pad_embeds, pad_ids, pad_mask, Side};
use softprompt::model::{CausalLm, KvCache};
use softprompt::Result;
use std::sync::Arc;

/// One row of a batch: the prefix before its tokens (`[N, D]`), that prefix's cached
/// keys/values, and the tokens.
pub(crate) struct RowSpec<'a> {
    pub prompt: &'a Tensor,
    pub kv: Option<&'a PromptKv>,
    pub tokens: &'a [u32],
}

/// A batch ready for its first forward.
pub(crate) struct Start {
    /// `C` cached positions, each layer `[B, H_kv, C, Dh]` (no entries when none are reused).
    pub cache: KvCache,
    /// `[B, T, D]`: the positions still to run.
    pub embeds: Tensor,
    /// `[B, C + T]`, 1 = real, 0 = pad.
    pub mask: Tensor,
    /// Per row, the index in `embeds` of its first token (position `N_i` of the row alone).
    pub first: Vec<usize>,
}

/// Lays out `rows` for their first forward (see [`super`]), from cached prompt keys/values
/// when `count.reuse` and the model allow. With `decode`, generation continues after every
/// row's last position, so rows are left padded; without (classification: one forward), rows
/// that cannot be moved are right padded, which no model's positions notice.
pub(crate) fn start(m: &dyn CausalLm, rows: &[RowSpec], count: &mut Prefill, decode: bool, device: &Device) -> Result<Start> {
    if rows.is_empty() {
        softprompt::bail!("a batch needs at least one row");
    }
    let tokens: Vec<&[u32]> = rows.iter().map(|r| r.tokens).collect();
    let inputs = pad_ids(&tokens, Side::Left, m.info().pad_id(), 1, device)?;
    let emb = m.embed(&inputs.ids)?; // [B, S, D], left padded
    if count.reuse && rows.iter().all(|r| r.kv.is_some() && !r.tokens.is_empty()) {
        let mut kvs = Vec::with_capacity(rows.len());
        for r in rows {
            if let Some(kv) = r.kv {
                kvs.push(kv.get(m, r.prompt, emb.dtype(), count)?);
            }
        }
        if let Some(s) = shifted(m, rows, &kvs, &emb, count)? {
            return Ok(s);
        }
        if let Some(s) = aligned(m, rows, &kvs, &emb, count, decode)? {
            return Ok(s);
        }
    }
    let side = if decode { Side::Left } else { Side::Right };
    whole(m, rows, &emb, count, side)
}

/// Stacks one cache per row (`[1, H_kv, N_i, Dh]` per layer) into `[B, H_kv, C, Dh]`, each
/// row left padded (with zeros) or cut to its first `C` positions.
fn stack(m: &dyn CausalLm, rows: &[KvCache], c: usize) -> Result<KvCache> {
    let n_layers = m.info().n_layers;
    let mut out = KvCache::new(n_layers);
    for l in 0..n_layers {
        let mut ks = Vec::with_capacity(rows.len());
        let mut vs = Vec::with_capacity(rows.len());
        for kv in rows {
            let Some((k, v)) = kv.layers.get(l).and_then(Option::as_ref) else {
                softprompt::bail!("prompt cache: layer {l} is missing");
            };
            let n = k.dim(2)?;
            if n >= c {
                ks.push(k.narrow(2, 0, c)?);
                vs.push(v.narrow(2, 0, c)?);
            } else {
                ks.push(k.pad_with_zeros(2, c - n, 0)?);
                vs.push(v.pad_with_zeros(2, c - n, 0)?);
            }
        }
        out.layers[l] = Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?)); // [B, H_kv, C, Dh]
    }
    Ok(out)
}

/// Row `i`'s token embeddings `[S_i, D]` out of the left-padded `emb [B, S, D]`.
fn tokens_of(emb: &Tensor, i: usize, s: usize) -> Result<Tensor> {
    let s_max = emb.dim(1)?;
    Ok(emb.get(i)?.narrow(0, s_max - s, s)?)
}

/// Rotary models: every row's whole prompt from the cache, its keys rotated so the prompt
/// sits right before the row's input. `None` when the model cannot move positions, and for
/// sliding-window models when an input is padded: the pads would sit between the prompt and
/// the input, and a window counts slots, pads included.
fn shifted(m: &dyn CausalLm, rows: &[RowSpec], kvs: &[Arc<KvCache>], emb: &Tensor, count: &mut Prefill) -> Result<Option<Start>> {
    let b = rows.len();
    let t = emb.dim(1)?;
    if m.sliding_window().is_some() && rows.iter().any(|r| r.tokens.len() != t) {
        return Ok(None);
    }
    let mut n = Vec::with_capacity(b);
    for r in rows {
        n.push(r.prompt.dim(0)?);
    }
    let c = n.iter().copied().max().unwrap_or(0);
    let mut moved: Vec<KvCache> = Vec::with_capacity(b);
    // Rows of one prompt and one input length share the rotation: (row, shift).
    let mut done: Vec<(usize, usize)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let by = c + t - r.tokens.len() - n[i];
        if let Some(&(j, _)) = done.iter().find(|&&(j, s)| s == by && Arc::ptr_eq(&kvs[j], &kvs[i])) {
            let same = moved[j].clone();
            moved.push(same);
            continue;
        }
        let mut kv = (*kvs[i]).clone();
        if !m.shift_cache(&mut kv, by)? {
            return Ok(None);
        }
        done.push((i, by));
        moved.push(kv);
    }
    // Prompts left padded to `C`, inputs left padded to `T`.
    let mut mask = Vec::with_capacity(b * (c + t));
    let mut first = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let s = r.tokens.len();
        mask.extend(Side::Left.mask(n[i], c).chain(Side::Left.mask(s, t)));
        first.push(t - s);
        count.computed += s;
        count.reused += n[i];
    }
    Ok(Some(Start {
        cache: stack(m, &moved, c)?,
        embeds: emb.clone(),
        mask: Tensor::from_vec(mask, (b, c + t), emb.device())?,
        first,
    }))
}

/// Any model: the first `C = min N_i` prompt positions of every row from the cache, at
/// their own positions, then `[P_i[C..]; x_i]`, right padded to the longest row (no padding
/// for rows of one length `N_i + S_i`, the batcher's groups for absolute positions). With
/// `decode`, `None` unless every row has the same length.
fn aligned(
    m: &dyn CausalLm,
    rows: &[RowSpec],
    kvs: &[Arc<KvCache>],
    emb: &Tensor,
    count: &mut Prefill,
    decode: bool,
) -> Result<Option<Start>> {
    let b = rows.len();
    let mut n = Vec::with_capacity(b);
    let mut lens = Vec::with_capacity(b);
    for r in rows {
        n.push(r.prompt.dim(0)?);
        lens.push(r.prompt.dim(0)? + r.tokens.len());
    }
    let l = lens.iter().copied().max().unwrap_or(0);
    if decode && lens.iter().any(|&li| li != l) {
        return Ok(None);
    }
    let c = n.iter().copied().min().unwrap_or(0);
    let mut pieces = Vec::with_capacity(b);
    let mut first = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let prompt_rest = r.prompt.narrow(0, c, n[i] - c)?; // [N_i - C, D]
        pieces.push(vec![prompt_rest, tokens_of(emb, i, r.tokens.len())?]);
        first.push(n[i] - c);
        count.computed += lens[i] - c;
        count.reused += c;
    }
    let rows_kv: Vec<KvCache> = kvs.iter().map(|kv| (**kv).clone()).collect();
    Ok(Some(Start {
        cache: stack(m, &rows_kv, c)?,
        embeds: pad_embeds(&pieces, Side::Right, emb.dtype())?.embeds, // [B, L - C, D]
        mask: pad_mask(&lens, l, Side::Right, emb.device())?, // [B, L]
        first,
    }))
}

/// No reuse: rows `[P_i; embed(x_i)]` padded on `side` to `L = max(N_i + S_i)`, and an
/// empty cache.
fn whole(m: &dyn CausalLm, rows: &[RowSpec], emb: &Tensor, count: &mut Prefill, side: Side) -> Result<Start> {
    let mut pieces = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        pieces.push(vec![r.prompt.clone(), tokens_of(emb, i, r.tokens.len())?]);
    }
    let padded = pad_embeds(&pieces, side, emb.dtype())?; // [B, L, D]
    let l = padded.embeds.dim(1)?;
    let mut first = Vec::with_capacity(rows.len());
    for (r, &len) in rows.iter().zip(&padded.lens) {
        first.push(side.lead(len, l) + len - r.tokens.len());
        count.computed += len;
    }
    Ok(Start {
        cache: KvCache::new(m.info().n_layers),
        embeds: padded.embeds,
        mask: padded.mask,
        first,
    })
}
