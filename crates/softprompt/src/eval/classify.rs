//! Rank classification: score every label's verbalizer text by its log-likelihood given the
//! (prompted) input and pick the most likely, as the official prompt-tuning code can.

use crate::batch::{collate, pad_ids, per_example_sums, Example, Side};
use crate::model::Backbone;
use crate::objective::target_nll;
use crate::Result;
use candle_core::{Device, Tensor};

/// Log-likelihood scores `[K][L]` of `labels` (tokenized targets, EOS included) for each
/// source, computed `batch_size` rows (source x label pairs) at a time.
///
/// With one prompt for all rows (or none) the sources are batched in order of length, which
/// saves most of the padding (and, for decoder-only models, keeps the pad gaps between prompt
/// and input small); the scores come back in the caller's order.
pub fn label_log_likelihoods(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    sources: &[Vec<u32>],
    labels: &[Vec<u32>],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    if prompt.is_some_and(|p| p.rank() == 3) {
        return scores_in_order(backbone, prompt, sources, labels, batch_size, device);
    }
    let mut order: Vec<usize> = (0..sources.len()).collect();
    order.sort_by_key(|&i| sources[i].len());
    let sorted: Vec<Vec<u32>> = order.iter().map(|&i| sources[i].clone()).collect();
    let scores = scores_in_order(backbone, prompt, &sorted, labels, batch_size, device)?;
    let mut out = vec![Vec::new(); sources.len()];
    for (score, &i) in scores.into_iter().zip(&order) {
        out[i] = score;
    }
    Ok(out)
}

/// [`label_log_likelihoods`] batching the sources in the given order.
fn scores_in_order(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    sources: &[Vec<u32>],
    labels: &[Vec<u32>],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    if labels.is_empty() {
        crate::bail!("rank classification needs at least one label");
    }
    if labels.iter().all(|l| l.len() == 1) && !backbone.info().is_encoder_decoder() {
        return single_token_scores(backbone, prompt, sources, labels, batch_size, device);
    }
    let n_prompt = match prompt {
        Some(p) => p.dim(p.rank() - 2)?,
        None => 0,
    };
    let pairs: Vec<Example> = sources
        .iter()
        .flat_map(|s| {
            labels.iter().map(move |l| Example {
                source: s.clone(),
                target: l.clone(),
            })
        })
        .collect();
    let mut flat = Vec::with_capacity(pairs.len());
    let step = batch_size.max(1);
    for chunk in pairs.chunks(step) {
        let batch = collate(chunk, backbone.info(), n_prompt, device)?;
        let nll = target_nll(backbone, prompt, &batch)?;
        flat.extend(per_example_sums(&nll, &batch)?.into_iter().map(|x| -x));
    }
    Ok(flat.chunks(labels.len()).map(|c| c.to_vec()).collect())
}

/// Decoder-only models with one-token labels: a single forward per source; the scores are
/// the log-probabilities of the label tokens at the last input position.
fn single_token_scores(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    sources: &[Vec<u32>],
    labels: &[Vec<u32>],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let label_ids: Vec<u32> = labels.iter().map(|l| l[0]).collect();
    let label_ids = Tensor::new(label_ids.as_slice(), device)?; // [L]
    let mut out = Vec::with_capacity(sources.len());
    for (c, chunk) in sources.chunks(batch_size.max(1)).enumerate() {
        let logits = last_logits(backbone, prompt, chunk, c * batch_size.max(1), device)?; // [B, V]
        let logp = crate::model::ops::log_softmax_last_dim(&logits)?;
        let picked = logp.index_select(&label_ids, 1)?; // [B, L]
        out.extend(picked.to_vec2::<f32>()?);
    }
    Ok(out)
}

/// Logits `[B, V]` at the last position of left-padded `sources` with the prompt
/// (`[N, D]`, or `[B_total, N, D]` per row, of which rows `offset..offset+B` are used).
pub fn last_logits(
    backbone: &Backbone,
    prompt: Option<&Tensor>,
    sources: &[Vec<u32>],
    offset: usize,
    device: &Device,
) -> Result<Tensor> {
    let Backbone::Causal(m) = backbone else {
        crate::bail!("last_logits needs a decoder-only model");
    };
    if sources.iter().all(Vec::is_empty) {
        crate::bail!("cannot score an empty input");
    }
    let b = sources.len();
    let inputs = pad_ids(sources, Side::Left, m.info().pad_id(), 0, device)?; // [B, S]
    let embeds = m.embed(&inputs.ids)?; // [B, S, D]
    let (embeds, mask) = match prompt {
        Some(p) if p.rank() == 3 => crate::prompt::prepend(&p.narrow(0, offset, b)?, &embeds, &inputs.mask)?,
        Some(p) => crate::prompt::prepend(p, &embeds, &inputs.mask)?,
        None => (embeds, inputs.mask),
    };
    m.forward(&embeds, &mask, None, crate::model::LogitsAt::Last)
}

/// Index of the largest score (ties: the first).
pub fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

/// Result of classifying a split.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClassificationReport {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    /// `confusion[gold][predicted]`
    pub confusion: Vec<Vec<usize>>,
    pub predictions: Vec<usize>,
    /// Per example, the log-likelihood of each label.
    pub scores: Vec<Vec<f32>>,
}

/// Rank-classifies `rows` of `task` (template applied) with an optional prompt.
pub fn evaluate(
    model: &crate::load::Model,
    prompt: Option<&Tensor>,
    task: &crate::task::ClassificationTask,
    rows: &[crate::task::LabeledText],
    batch_size: usize,
) -> Result<ClassificationReport> {
    let tokenizer = model.tokenizer()?;
    let info = model.backbone.info();
    let device = model.device.clone();
    let sources = task.sources(tokenizer, info, rows)?;
    let labels = task.label_targets(tokenizer, info)?;
    let scores = label_log_likelihoods(&model.backbone, prompt, &sources, &labels, batch_size, &device)?;
    let predictions: Vec<usize> = scores.iter().map(|s| argmax(s)).collect();
    let gold: Vec<usize> = rows.iter().map(|r| r.label).collect();
    let n = task.labels.len();
    Ok(ClassificationReport {
        examples: rows.len(),
        accuracy: super::metrics::accuracy(&predictions, &gold),
        macro_f1: super::metrics::macro_f1(&predictions, &gold, n),
        confusion: super::metrics::confusion_matrix(&predictions, &gold, n),
        predictions,
        scores,
    })
}
