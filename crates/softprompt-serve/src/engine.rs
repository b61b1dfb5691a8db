//! Batched forwards over rows that each carry their own prompt (decoder-only models).
//!
//! Layout: row `i` is `[pad x p_i; P_i; embed(x_i)]`, LEFT padded to the longest
//! `N_i + S_i` in the batch, so prompts of different lengths (different tasks) share one
//! forward pass. Pad positions are zero vectors masked out of attention.
//!
//! Why mixing does not change a request's result: the backbones number positions
//! `0..L-1` for every row, so left padding shifts a row's absolute positions by `p_i`.
//! With rotary embeddings (the Llama family) attention scores depend only on relative
//! positions, and masked pads receive exactly zero weight, so a row's logits are the same
//! as when it runs alone, up to float rounding (well under 1e-4). Models with absolute
//! position embeddings (GPT-2) would see a different input, so for them the batcher only
//! puts rows of equal `N_i + S_i` together (no padding at all; see `Batcher`).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use softprompt::load::Model;
use softprompt::model::{Backbone, CausalLm, KvCache, LogitsAt};
use softprompt::Result;

/// Decoding parameters of one request.
#[derive(Clone, Debug)]
pub struct GenParams {
    pub max_new_tokens: usize,
    /// 0: greedy (argmax); otherwise sample from `softmax(scores / temperature)`.
    pub temperature: f32,
    /// Stop as soon as the decoded text contains one of these (cut before it).
    pub stop: Vec<String>,
    pub seed: Option<u64>,
}

/// One generation request: its task's prompts (an ensemble averages log-probabilities at
/// every step) and the tokenized input.
pub struct GenItem {
    pub prompts: Vec<Tensor>,
    pub source: Vec<u32>,
    pub params: GenParams,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GenOutput {
    pub text: String,
    pub tokens: Vec<u32>,
    /// Log-probability of each chosen token (mean over the ensemble's prompts).
    pub logprobs: Vec<f32>,
    /// `eos`, `stop`, `length` or `cancelled`.
    pub finish_reason: &'static str,
}

/// One classification request: prompts, tokenized input and tokenized label targets.
pub struct ClsItem {
    pub prompts: Vec<Tensor>,
    pub source: Vec<u32>,
    pub label_targets: Vec<Vec<u32>>,
}

#[derive(Clone, Debug)]
pub struct ClsOutput {
    /// Per label, the mean over prompts of the target's log-likelihood.
    pub scores: Vec<f32>,
    /// `[n_prompts][n_labels]` log-likelihoods.
    pub per_prompt: Vec<Vec<f32>>,
}

/// The decoder-only backbone of `model`, or an error for encoder-decoder models.
pub fn causal(model: &Model) -> Result<&dyn CausalLm> {
    match &model.backbone {
        Backbone::Causal(m) => Ok(m.as_ref()),
        Backbone::Seq2Seq(_) => softprompt::bail!(
            "serving supports decoder-only models (Llama family, GPT-2); {} is encoder-decoder",
            model.path.display()
        ),
    }
}

fn pad_id(m: &dyn CausalLm) -> u32 {
    let info = m.info();
    info.pad_token_id.or(info.eos_token_ids.first().copied()).unwrap_or(0)
}

/// Embeddings `[B, L, D]`, mask `[B, L]` and the number of pads of each row, for rows
/// `(prompt [N_i, D], tokens)`, left padded to `L = max(N_i + S_i)`.
fn build(m: &dyn CausalLm, rows: &[(&Tensor, &[u32])], device: &Device) -> Result<(Tensor, Tensor, Vec<usize>)> {
    let b = rows.len();
    let d = m.info().d_model;
    let pad = pad_id(m);
    let s_max = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(b * s_max);
    for (_, src) in rows {
        ids.extend(std::iter::repeat_n(pad, s_max - src.len()));
        ids.extend(src.iter().copied());
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
    let mut pads = Vec::with_capacity(b);
    for (i, (p, src)) in rows.iter().enumerate() {
        let s = src.len();
        let n_pad = l - lens[i];
        let mut parts = Vec::with_capacity(3);
        if n_pad > 0 {
            parts.push(Tensor::zeros((n_pad, d), emb.dtype(), device)?);
        }
        parts.push(p.to_dtype(emb.dtype())?);
        if s > 0 {
            parts.push(emb.get(i)?.narrow(0, s_max - s, s)?); // [S_i, D]
        }
        xs.push(Tensor::cat(&parts, 0)?); // [L, D]
        mask.extend((0..l).map(|j| if j < n_pad { 0f32 } else { 1. }));
        pads.push(n_pad);
    }
    let x = Tensor::stack(&xs, 0)?; // [B, L, D]
    Ok((x, Tensor::from_vec(mask, (b, l), device)?, pads))
}

/// `log_softmax` of one row, in f64 for the sums.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Picks the next token from the logits of a request's rows (one per prompt).
fn choose(rows: &[&[f32]], temperature: f32, rng: &mut rand::rngs::StdRng) -> (u32, f32) {
    let (scores, logp) = if rows.len() == 1 {
        (rows[0].to_vec(), log_softmax(rows[0]))
    } else {
        let mut mean = vec![0f32; rows[0].len()];
        for r in rows {
            for (m, x) in mean.iter_mut().zip(log_softmax(r)) {
                *m += x / rows.len() as f32;
            }
        }
        (mean.clone(), mean)
    };
    let tok = if temperature <= 0.0 {
        argmax(&scores)
    } else {
        let scaled: Vec<f32> = scores.iter().map(|s| s / temperature).collect();
        let max = scaled.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = scaled.iter().map(|&s| ((s - max) as f64).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = rng.random::<f64>() * total;
        let mut pick = weights.len() - 1;
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                pick = i;
                break;
            }
            u -= w;
        }
        pick
    };
    (tok as u32, logp[tok])
}

/// Generates for every item in one batch with a shared KV cache. Finished (or cancelled:
/// `cancelled(i)` is polled every step) requests leave the batch at once.
pub fn generate(model: &Model, items: &[GenItem], cancelled: &dyn Fn(usize) -> bool) -> Result<Vec<GenOutput>> {
    let m = causal(model)?;
    let device = &model.device;
    let info = m.info();
    let tokenizer = model.tokenizer()?;
    struct State {
        tokens: Vec<u32>,
        logprobs: Vec<f32>,
        finish: Option<&'static str>,
        text: Option<String>,
        rng: rand::rngs::StdRng,
    }
    let mut states: Vec<State> = items
        .iter()
        .map(|it| State {
            tokens: Vec::new(),
            logprobs: Vec::new(),
            finish: if it.params.max_new_tokens == 0 { Some("length") } else { None },
            text: None,
            rng: match it.params.seed {
                Some(s) => rand::rngs::StdRng::seed_from_u64(s),
                None => rand::rngs::StdRng::from_os_rng(),
            },
        })
        .collect();
    // Row -> request, one row per (request, prompt).
    let mut owners: Vec<usize> = Vec::new();
    let mut rows: Vec<(&Tensor, &[u32])> = Vec::new();
    for (i, it) in items.iter().enumerate() {
        if states[i].finish.is_some() {
            continue;
        }
        for p in &it.prompts {
            owners.push(i);
            rows.push((p, it.source.as_slice()));
        }
    }
    if !rows.is_empty() {
        let (x, mut mask, _) = build(m, &rows, device)?;
        let mut cache = KvCache::new(info.n_layers);
        let mut logits = m.forward(&x, &mask, Some(&mut cache), LogitsAt::Last)?; // [B, V]
        loop {
            let lv: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
            let mut chosen = vec![0u32; items.len()];
            let mut r = 0;
            while r < owners.len() {
                let i = owners[r];
                let mut end = r;
                while end < owners.len() && owners[end] == i {
                    end += 1;
                }
                let group: Vec<&[f32]> = lv[r..end].iter().map(Vec::as_slice).collect();
                let params = &items[i].params;
                let st = &mut states[i];
                let (tok, lp) = choose(&group, params.temperature, &mut st.rng);
                chosen[i] = tok;
                st.tokens.push(tok);
                st.logprobs.push(lp);
                if info.eos_token_ids.contains(&tok) {
                    st.finish = Some("eos");
                } else if !params.stop.is_empty() {
                    let text = tokenizer.decode(&st.tokens)?;
                    let cut = params.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min();
                    if let Some(cut) = cut {
                        st.text = Some(text[..cut].to_string());
                        st.finish = Some("stop");
                    }
                }
                if st.finish.is_none() && st.tokens.len() >= params.max_new_tokens {
                    st.finish = Some("length");
                }
                if st.finish.is_none() && cancelled(i) {
                    st.finish = Some("cancelled");
                }
                r = end;
            }
            let keep: Vec<u32> = (0..owners.len()).filter(|&r| states[owners[r]].finish.is_none()).map(|r| r as u32).collect();
            if keep.is_empty() {
                break;
            }
            if keep.len() < owners.len() {
                let idx = Tensor::new(keep.as_slice(), device)?;
                cache.index_rows(&idx)?;
                mask = mask.index_select(&idx, 0)?;
                owners = keep.iter().map(|&r| owners[r as usize]).collect();
            }
            let b = owners.len();
            let next: Vec<u32> = owners.iter().map(|&i| chosen[i]).collect();
            let next = Tensor::from_vec(next, (b, 1), device)?;
            mask = Tensor::cat(&[&mask, &Tensor::ones((b, 1), mask.dtype(), device)?], 1)?; // [B, P+1]
            let e = m.embed(&next)?; // [B, 1, D]
            logits = m.forward(&e, &mask, Some(&mut cache), LogitsAt::Last)?;
        }
    }
    states
        .into_iter()
        .map(|st| {
            let text = match st.text {
                Some(t) => t,
                None => tokenizer.decode(&st.tokens)?,
            };
            Ok(GenOutput {
                text,
                tokens: st.tokens,
                logprobs: st.logprobs,
                finish_reason: st.finish.unwrap_or("length"),
            })
        })
        .collect()
}

/// Rank classification of every item: the log-likelihood of each label's target after
/// `[prompt; input]`, for every prompt of the item's task. Rows are processed `max_rows`
/// at a time. One-token labels need one row per (item, prompt); longer labels one row per
/// (item, prompt, label) holding `input + target`.
pub fn classify(model: &Model, items: &[ClsItem], max_rows: usize) -> Result<Vec<ClsOutput>> {
    let m = causal(model)?;
    let device = &model.device;
    struct Row<'a> {
        item: usize,
        prompt: usize,
        tensor: &'a Tensor,
        tokens: Vec<u32>,
        /// (position in the unpadded row whose logits are read, token, label)
        score: Vec<(usize, u32, usize)>,
        /// One-token labels: all scores at the last position.
        single: bool,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut out: Vec<ClsOutput> = Vec::with_capacity(items.len());
    for (i, it) in items.iter().enumerate() {
        let n_labels = it.label_targets.len();
        out.push(ClsOutput {
            scores: vec![0.0; n_labels],
            per_prompt: vec![vec![0.0; n_labels]; it.prompts.len()],
        });
        if it.source.is_empty() || it.label_targets.iter().any(|t| t.is_empty()) {
            softprompt::bail!("classification needs a non-empty input and non-empty label targets");
        }
        let single = it.label_targets.iter().all(|t| t.len() == 1);
        for (j, p) in it.prompts.iter().enumerate() {
            let n = p.dim(0)?;
            let s = it.source.len();
            if single {
                let score = it.label_targets.iter().enumerate().map(|(l, t)| (n + s - 1, t[0], l)).collect();
                rows.push(Row { item: i, prompt: j, tensor: p, tokens: it.source.clone(), score, single: true });
            } else {
                for (l, t) in it.label_targets.iter().enumerate() {
                    let mut tokens = it.source.clone();
                    tokens.extend(t);
                    let score = t.iter().enumerate().map(|(k, &tok)| (n + s + k - 1, tok, l)).collect();
                    rows.push(Row { item: i, prompt: j, tensor: p, tokens, score, single: false });
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
        let spec: Vec<(&Tensor, &[u32])> = chunk.iter().map(|r| (r.tensor, r.tokens.as_slice())).collect();
        let (x, mask, pads) = build(m, &spec, device)?;
        let l = x.dim(1)?;
        // Unique flattened positions whose logits are needed.
        let mut positions: Vec<u32> = Vec::new();
        let mut picks: Vec<(usize, usize, u32)> = Vec::new(); // (row in chunk, index into positions, token)
        for (r, row) in chunk.iter().enumerate() {
            for &(pos, tok, _) in &row.score {
                let flat = (r * l + pads[r] + pos) as u32;
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
        let logits = m.forward(&x, &mask, None, LogitsAt::Rows(&rows_t))?.to_dtype(DType::F32)?; // [M, V]
        // Scored as the library scores: one-token labels by `log_softmax` at the last
        // position (`single_token_scores`), longer labels by the objective's `token_nll`.
        let picked = if single_token {
            let v = logits.dim(1)?;
            let logp = softprompt::model::ops::log_softmax_last_dim(&logits)?.flatten_all()?; // [M*V]
            let idx: Vec<u32> = picks.iter().map(|&(_, k, tok)| (k * v) as u32 + tok).collect();
            logp.index_select(&Tensor::new(idx.as_slice(), device)?, 0)?.to_vec1::<f32>()?
        } else {
            let at: Vec<u32> = picks.iter().map(|&(_, k, _)| k as u32).collect();
            let toks: Vec<u32> = picks.iter().map(|&(_, _, tok)| tok).collect();
            let per_pick = logits.index_select(&Tensor::new(at.as_slice(), device)?, 0)?; // [K, V]
            let nll = softprompt::model::ops::token_nll(&per_pick, &Tensor::new(toks.as_slice(), device)?)?; // [K]
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
    for o in &mut out {
        let k = o.per_prompt.len().max(1) as f32;
        for l in 0..o.scores.len() {
            o.scores[l] = o.per_prompt.iter().map(|p| p[l]).sum::<f32>() / k;
        }
    }
    Ok(out)
}

/// The label each prompt votes for (argmax of its scores).
pub fn votes(per_prompt: &[Vec<f32>]) -> Vec<usize> {
    per_prompt.iter().map(|s| argmax(s)).collect()
}
