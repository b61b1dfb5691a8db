//! Rank classification on decoder-only models, many tasks per forward.

use super::prefill::{start, RowSpec, Start};
use super::prompt_kv::{Prefill, PromptKv};
use super::{causal, ClsItem, ClsOutput};
use candle_core::{DType, Tensor};
use softprompt::load::Model;
use softprompt::model::ops::{log_softmax_last_dim, token_nll};
use softprompt::model::LogitsAt;
use softprompt::Result;
use std::sync::Arc;

/// Rank classification of every item: the log-likelihood of each label's target after
/// `[prompt; input]`, for every prompt of the item's task. Rows are processed `max_rows`
/// at a time. One-token labels need one row per (item, prompt); longer labels one row per
/// (item, prompt, label) holding `input + target`. Each chunk starts from the prompts' cached
/// keys/values when `count.reuse` (which also receives the prefill counts).
pub fn classify(model: &Model, items: &[ClsItem], max_rows: usize, count: &mut Prefill) -> Result<Vec<ClsOutput>> {
    let m = causal(model)?;
    let device = &model.device;
    struct Row<'a> {
        item: usize,
        prompt: usize,
        tensor: &'a Tensor,
        kv: Option<&'a PromptKv>,
        /// Prompt length `N`.
        n: usize,
        tokens: Vec<u32>,
        /// (position in the unpadded row whose logits are read, token, label)
        score: Vec<(usize, u32, usize)>,
        /// One-token labels: all scores at the last position.
        single: bool,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut out: Vec<ClsOutput> = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        out.push(ClsOutput::zeros(it));
        if it.source.is_empty() || it.label_targets.iter().any(|t| t.is_empty()) {
            softprompt::bail!("classification needs a non-empty input and non-empty label targets");
        }
        let single = it.label_targets.iter().all(|t| t.len() == 1);
        for (j, p) in it.prompts.iter().enumerate() {
            let n = p.dim(0)?;
            let s = it.source.len();
            let kv = it.prompt_kv.get(j).map(Arc::as_ref);
            if single {
                let score = it.label_targets.iter().enumerate().map(|(l, t)| (n + s - 1, t[0], l)).collect();
                rows.push(Row { item: i, prompt: j, tensor: p, kv, n, tokens: it.source.clone(), score, single: true });
            } else {
                for (l, t) in it.label_targets.iter().enumerate() {
                    let mut tokens = it.source.clone();
                    tokens.extend(t);
                    let score = t.iter().enumerate().map(|(k, &tok)| (n + s + k - 1, tok, l)).collect();
                    rows.push(Row { item: i, prompt: j, tensor: p, kv, n, tokens, score, single: false });
                }
            }
        }
    }
    let (single_rows, multi_rows): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.single);
    let chunks = single_rows
        .chunks(max_rows.max(1))
        .map(|c| (true, c))
        .chain(multi_rows.chunks(max_rows.max(1)).map(|c| (false, c)));
    for (single_token, chunk) in chunks {
        let spec: Vec<RowSpec> =
            chunk.iter().map(|r| RowSpec { prompt: r.tensor, kv: r.kv, tokens: &r.tokens }).collect();
        let Start { mut cache, embeds, mask, first } = start(m, &spec, count, false, device)?;
        let t = embeds.dim(1)?;
        // Unique flattened positions of `embeds` whose logits are needed (every scored
        // position is an input or target token: `pos >= N`).
        let mut positions: Vec<u32> = Vec::new();
        let mut picks: Vec<(usize, usize, u32)> = Vec::new(); // (row in chunk, index into positions, token)
        for (r, row) in chunk.iter().enumerate() {
            for &(pos, tok, _) in &row.score {
                let flat = (r * t + first[r] + pos - row.n) as u32;
                let k = match positions.iter().rposition(|&p| p == flat) {
                    Some(k) => k,
                    None => {
                        positions.push(flat);
                        positions.len() - 1
                    }
                };
                picks.push((r, k, tok));
            }
        }
        let rows_t = Tensor::new(positions.as_slice(), device)?; // [M]
        // Nothing cached (no reuse): no cache at all, so the backbone may take its cache-free path.
        let cache = if cache.seq_len() > 0 { Some(&mut cache) } else { None };
        let logits = m.forward(&embeds, &mask, cache, LogitsAt::Rows(&rows_t))?.to_dtype(DType::F32)?; // [M, V]
        // Scored as the library scores: one-token labels by `log_softmax` at the last
        // position (`single_token_scores`), longer labels by the objective's `token_nll`.
        let picked = if single_token {
            let v = logits.dim(1)?;
            let logp = log_softmax_last_dim(&logits)?.flatten_all()?; // [M*V]
            let idx: Vec<u32> = picks.iter().map(|&(_, k, tok)| (k * v) as u32 + tok).collect();
            logp.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?.to_vec1::<f32>()?
        } else {
            let at: Vec<u32> = picks.iter().map(|&(_, k, _)| k as u32).collect();
            let toks: Vec<u32> = picks.iter().map(|&(_, _, tok)| tok).collect();
            let per_pick = logits.index_select(&Tensor::new(at.as_slice(), device)?, 0)?; // [K, V]
            let nll = token_nll(&per_pick, &Tensor::new(toks.as_slice(), device)?)?; // [K]
            nll.to_vec1::<f32>()?.into_iter().map(|x| -x).collect()
        };
        let mut q = 0;
        for (r, row) in chunk.iter().enumerate() {
            for &(_, _, label) in &row.score {
                debug_assert_eq!(picks[q].0, r);
                out[row.item].per_prompt[row.prompt][label] += picked[q];
                q += 1;
            }
        }
    }
    out.iter_mut().for_each(ClsOutput::average);
    Ok(out)
}
