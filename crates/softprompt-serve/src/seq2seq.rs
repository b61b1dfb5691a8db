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

use crate::engine::{decode_step, ClsItem, ClsOutput, Decoding, GenItem, GenOutput};
use candle_core::{DType, Device, Tensor};
use softprompt::batch::{collate, per_example_sums, Example};
use softprompt::load::Model;
use softprompt::model::ops::token_nll;
use softprompt::model::{Backbone, KvCache, LogitsAt, Seq2SeqLm};
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
fn encoder_input(m: &dyn Seq2SeqLm, rows: &[(&Tensor, &[u32])], device: &Device) -> Result<(Tensor, Tensor)> {
    let b = rows.len();
    let d = m.info().d_model;
    let pad = m.info().pad_id();
    let s_max = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(b * s_max);
    for (_, src) in rows {
        ids.extend(src.iter().copied());
        ids.extend(std::iter::repeat_n(pad, s_max - src.len()));
    }
    let ids = Tensor::from_vec(ids, (b, s_max), device)?;
    let emb = m.embed(&ids)?; // [B, S, D]
    let mut lens = Vec::with_capacity(b);
    for (p, s) in rows {
        lens.push(p.dim(0)? + s.len());
    }
    let l = lens.iter().copied().max().unwrap_or(0);
    let mut xs = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b * l);
    for (i, (p, src)) in rows.iter().enumerate() {
        let s = src.len();
        let mut parts = Vec::with_capacity(3);
        parts.push(p.to_dtype(emb.dtype())?); // [N_i, D]
        if s > 0 {
            parts.push(emb.get(i)?.narrow(0, 0, s)?); // [S_i, D]
        }
        if lens[i] < l {
            parts.push(Tensor::zeros((l - lens[i], d), emb.dtype(), device)?);
        }
        xs.push(Tensor::cat(&parts, 0)?); // [L, D]
        mask.extend((0..l).map(|j| if j < lens[i] { 1f32 } else { 0. }));
    }
    let x = Tensor::stack(&xs, 0)?; // [B, L, D]
    Ok((x, Tensor::from_vec(mask, (b, l), device)?))
}

/// Generates for every item in one batch: one encoder pass, then one decoder step per token
/// with the decoder KV cache (self-attention keys/values grow, cross-attention keys/values
/// are computed once). Finished (or cancelled: `cancelled(i)` is polled every step)
/// requests leave the batch at once.
pub fn generate(model: &Model, items: &[GenItem], cancelled: &dyn Fn(usize) -> bool) -> Result<Vec<GenOutput>> {
    let m = seq2seq(model)?;
    let device = &model.device;
    let info = m.info();
    let tokenizer = model.tokenizer()?;
    let mut states = Decoding::start(items);
    // Row -> request, one row per (request, prompt); a request's rows are adjacent.
    let mut owners: Vec<usize> = Vec::new();
    let mut rows: Vec<(&Tensor, &[u32])> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if states[i].is_finished() {
            continue;
        }
        for p in &it.prompts {
            owners.push(i);
            rows.push((p, it.source.as_slice()));
        }
    }
    if !rows.is_empty() {
        let (x, mut enc_mask) = encoder_input(m, &rows, device)?; // [B, L, D], [B, L]
        let mut enc = m.encode(&x, &enc_mask)?; // [B, L, D]
        let mut cache = KvCache::new(info.n_layers);
        let start = info.decoder_start_token_id.unwrap_or_else(|| info.pad_id());
        let mut next = Tensor::from_vec(vec![start; owners.len()], (owners.len(), 1), device)?; // [B, 1]
        loop {
            let logits = m.decode(&next, &enc, &enc_mask, Some(&mut cache), LogitsAt::Last)?; // [B, V]
            let lv: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?; // [B][V]
            let (chosen, keep) = decode_step(&lv, &owners, items, &mut states, tokenizer, info, cancelled)?;
            if keep.is_empty() {
                break;
            }
            if keep.len() < owners.len() {
                let idx = Tensor::new(keep.as_slice(), device)?;
                cache.index_rows(&idx)?; // self and cross keys/values
                enc = enc.index_select(&idx, 0)?;
                enc_mask = enc_mask.index_select(&idx, 0)?;
                owners = keep.iter().map(|&r| owners[r as usize]).collect();
            }
            let ids: Vec<u32> = owners.iter().map(|&i| chosen[i]).collect();
            next = Tensor::from_vec(ids, (owners.len(), 1), device)?; // [B, 1]
        }
    }
    Decoding::outputs(states, tokenizer)
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
        let n_labels = it.label_targets.len();
        out.push(ClsOutput {
            scores: vec![0.0; n_labels],
            per_prompt: vec![vec![0.0; n_labels]; it.prompts.len()],
        });
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
        let (x, mask) = encoder_input(m, &spec, device)?; // [E, L, D], [E, L]
        let enc = m.encode(&x, &mask)?; // [E, L, D]

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
    for o in &mut out {
        let k = o.per_prompt.len().max(1) as f32;
        for l in 0..o.scores.len() {
            o.scores[l] = o.per_prompt.iter().map(|p| p[l]).sum::<f32>() / k;
        }
    }
    Ok(out)
}
