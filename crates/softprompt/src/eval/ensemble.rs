//! Prompt ensembling (Lester et al. 2021, section 6): `E` prompts of one task on one frozen
//! model, evaluated together. Every input is replicated `E` times and row `b * E + e` gets
//! prompt `e` (a per-row prompt `[B * E, N, D]` through [`crate::prompt::prepend`]), so one
//! forward pass scores all prompts; batches always hold whole groups of `E` rows.
//!
//! Combination rules over the per-prompt label log-likelihoods `[E][L]` of an input:
//! * [`majority_vote`]: each prompt votes for its best label; most votes win; a tie goes to
//!   the tied label with the highest mean log-likelihood (then the lowest index);
//! * [`mean_log_prob`]: the label with the highest mean log-likelihood over the prompts.

use super::classify::{argmax, last_logits};
use super::metrics;
use crate::batch::{collate, per_example_sums, Example};
use crate::model::Backbone;
use crate::objective::target_nll;
use crate::Result;
use candle_core::{Device, Tensor};

/// Label log-likelihoods `[K][E][L]` of `sources` under each of `prompts` (`[E, N, D]`).
/// `batch_size` counts model rows (source x prompt, or source x prompt x label when labels
/// have several tokens); it is rounded up to whole groups of one input's rows.
pub fn ensemble_label_log_likelihoods(
    backbone: &Backbone,
    prompts: &Tensor,
    sources: &[Vec<u32>],
    labels: &[Vec<u32>],
    batch_size: usize,
    device: &Device,
) -> Result<Vec<Vec<Vec<f32>>>> {
    let (e, n, d) = prompts.dims3()?;
    if e == 0 {
        crate::bail!("an ensemble needs at least one prompt");
    }
    if labels.is_empty() {
        crate::bail!("rank classification needs at least one label");
    }
    let b = sources.len();
    if b == 0 {
        return Ok(Vec::new());
    }
    let l = labels.len();
    // Each input replicated E times: row b * E + e has prompt e.
    let rows: Vec<Vec<u32>> = sources
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.clone(), e))
        .collect();
    let prompts = prompts.to_dtype(candle_core::DType::F32)?;
    let flat: Vec<f32> = if labels.iter().all(|t| t.len() == 1) && !backbone.info().is_encoder_decoder() {
        // One forward per row: the label tokens' log-probabilities at the last position.
        let ids: Vec<u32> = labels.iter().map(|t| t[0]).collect();
        let ids = Tensor::new(ids.as_slice(), device)?; // [L]
        let group = batch_size.max(1).div_ceil(e) * e;
        let mut out = Vec::with_capacity(b * e * l);
        for chunk in rows.chunks(group) {
            let groups = chunk.len() / e;
            let per_row = prompts
                .unsqueeze(0)?
                .broadcast_as((groups, e, n, d))?
                .reshape((groups * e, n, d))?; // [B_c * E, N, D]
            let logits = last_logits(backbone, Some(&per_row), chunk, 0, device)?; // [B_c * E, V]
            let logp = crate::model::ops::log_softmax_last_dim(&logits)?;
            let picked = logp.index_select(&ids, 1)?; // [B_c * E, L]
            out.extend(picked.flatten_all()?.to_vec1::<f32>()?);
        }
        out
    } else {
        // Rows source x prompt x label, scored by the training objective.
        let n_prompt = n;
        let group = batch_size.max(1).div_ceil(e * l) * e * l;
        let triples: Vec<(usize, usize)> = (0..b * e)
            .flat_map(|r| (0..l).map(move |j| (r, j)))
            .collect();
        let mut out = Vec::with_capacity(b * e * l);
        for chunk in triples.chunks(group) {
            let examples: Vec<Example> = chunk
                .iter()
                .map(|&(r, j)| Example {
                    source: rows[r].clone(),
                    target: labels[j].clone(),
                })
                .collect();
            let which: Vec<u32> = chunk.iter().map(|&(r, _)| (r % e) as u32).collect();
            let per_row = prompts.index_select(&Tensor::new(which.as_slice(), device)?, 0)?; // [R, N, D]
            let batch = collate(&examples, backbone.info(), n_prompt, device)?;
            let nll = target_nll(backbone, Some(&per_row), &batch)?;
            out.extend(per_example_sums(&nll, &batch)?.into_iter().map(|x| -x));
        }
        out
    };
    Ok(flat
        .chunks(e * l)
        .map(|per_input| per_input.chunks(l).map(|s| s.to_vec()).collect())
        .collect())
}

/// Mean over prompts of each label's log-likelihood (`scores` is `[E][L]`).
pub fn mean_scores(scores: &[Vec<f32>]) -> Vec<f32> {
    let l = scores.first().map(Vec::len).unwrap_or(0);
    let e = scores.len().max(1) as f32;
    (0..l)
        .map(|j| scores.iter().map(|s| s[j]).sum::<f32>() / e)
        .collect()
}

/// The label with the highest mean log-likelihood over the prompts.
pub fn mean_log_prob(scores: &[Vec<f32>]) -> usize {
    argmax(&mean_scores(scores))
}

/// The label each prompt votes for: the best of its scores (`scores` is `[E][L]`).
pub fn votes(scores: &[Vec<f32>]) -> Vec<usize> {
    scores.iter().map(|s| argmax(s)).collect()
}

/// Each prompt votes for its best label; most votes win; ties go to the tied label with the
/// highest mean log-likelihood (then the lowest index).
pub fn majority_vote(scores: &[Vec<f32>]) -> usize {
    let l = scores.first().map(Vec::len).unwrap_or(0);
    let mut votes = vec![0usize; l];
    for s in scores.iter().filter(|s| !s.is_empty()) {
        if let Some(v) = votes.get_mut(argmax(s)) {
            *v += 1;
        }
    }
    let mean = mean_scores(scores);
    let top = votes.iter().copied().max().unwrap_or(0);
    let mut best: Option<usize> = None;
    for j in 0..l {
        if votes[j] == top && best.is_none_or(|b| mean[j] > mean[b]) {
            best = Some(j);
        }
    }
    best.unwrap_or(0)
}

/// Accuracy, macro-F1 and confusion matrix of one set of predictions.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Metrics {
    pub accuracy: f64,
    pub macro_f1: f64,
    /// `confusion[gold][predicted]`
    pub confusion: Vec<Vec<usize>>,
}

impl Metrics {
    pub fn new(predicted: &[usize], gold: &[usize], n_labels: usize) -> Self {
        Metrics {
            accuracy: metrics::accuracy(predicted, gold),
            macro_f1: metrics::macro_f1(predicted, gold, n_labels),
            confusion: metrics::confusion_matrix(predicted, gold, n_labels),
        }
    }
}

/// The result of evaluating an ensemble.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EnsembleReport {
    pub examples: usize,
    /// Each prompt alone.
    pub per_prompt: Vec<Metrics>,
    pub majority_vote: Metrics,
    pub mean_log_prob: Metrics,
    /// Per input, per prompt, per label log-likelihoods `[K][E][L]`.
    pub scores: Vec<Vec<Vec<f32>>>,
    pub majority_predictions: Vec<usize>,
    pub mean_predictions: Vec<usize>,
}

/// Scores `sources` (with gold labels `gold`) under every prompt and combines them.
pub fn evaluate_ensemble(
    backbone: &Backbone,
    prompts: &Tensor,
    sources: &[Vec<u32>],
    labels: &[Vec<u32>],
    gold: &[usize],
    batch_size: usize,
    device: &Device,
) -> Result<EnsembleReport> {
    let scores =
        ensemble_label_log_likelihoods(backbone, prompts, sources, labels, batch_size, device)?;
    let n = labels.len();
    let e = prompts.dim(0)?;
    let per_prompt = (0..e)
        .map(|i| {
            let p: Vec<usize> = scores.iter().map(|s| argmax(&s[i])).collect();
            Metrics::new(&p, gold, n)
        })
        .collect();
    let majority_predictions: Vec<usize> = scores.iter().map(|s| majority_vote(s)).collect();
    let mean_predictions: Vec<usize> = scores.iter().map(|s| mean_log_prob(s)).collect();
    Ok(EnsembleReport {
        examples: sources.len(),
        per_prompt,
        majority_vote: Metrics::new(&majority_predictions, gold, n),
        mean_log_prob: Metrics::new(&mean_predictions, gold, n),
        scores,
        majority_predictions,
        mean_predictions,
    })
}
