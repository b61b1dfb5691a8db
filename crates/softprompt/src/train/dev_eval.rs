//! Dev evaluation (no gradient): the mean target-token NLL ([`dev_nll`]) and, for a
//! classification task, the accuracy of rank classification ([`dev_accuracy`], scored by
//! [`crate::eval::classify::label_log_likelihoods`] as `softprompt eval` does), with the gold
//! class of each dev example ([`gold_labels`]).

use crate::batch::{collate, Example};
use crate::eval::classify::{argmax, label_log_likelihoods};
use crate::load::Model;
use crate::model::ModelInfo;
use crate::objective::target_nll;
use crate::train::config::TrainConfig;
use crate::train::data::{after_bos, model_prefix, prefix_len};
use crate::train::step_loop::{DevShare, Tally};
use crate::{Error, Result};
use candle_core::{DType, Tensor};

/// The gold class of each example: the index of the class whose tokens are its target, or
/// its target without a final EOS (decoder-only targets carry EOS, classes do not). An example
/// whose target is no class is an error naming it.
pub fn gold_labels(
    examples: &[Example],
    classes: &[Vec<u32>],
    info: &ModelInfo,
) -> Result<Vec<usize>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let bare = match e.target.split_last() {
                Some((last, rest)) if info.eos_token_ids.contains(last) => Some(rest),
                _ => None,
            };
            classes
                .iter()
                .position(|c| *c == e.target)
                .or_else(|| bare.and_then(|b| classes.iter().position(|c| c.as_slice() == b)))
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "dev example {}: its target {:?} is none of the {} classes' targets, so \
                         its dev accuracy cannot be measured",
                        i + 1,
                        e.target,
                        classes.len()
                    ))
                })
        })
        .collect()
}

/// Mean target-token NLL of `dev` under `prompt` (no gradient), batched in length order.
/// With `cfg.prompt_after_bos`, the sources' leading BOS is removed and the prompt placed
/// after BOS, as in training.
pub fn dev_nll(model: &Model, prompt: &Tensor, dev: &[Example], cfg: &TrainConfig) -> Result<f64> {
    Ok(prepared_dev_nll(model, prompt, &after_bos(model, cfg, dev), cfg, DevShare::ALL)?.mean())
}

/// [`dev_nll`]'s sum and count on `share`'s batches, of examples already without their leading
/// BOS when `cfg.prompt_after_bos`.
pub(crate) fn prepared_dev_nll(
    model: &Model,
    prompt: &Tensor,
    dev: &[Example],
    cfg: &TrainConfig,
    share: DevShare,
) -> Result<Tally> {
    let prefix = model_prefix(model, cfg, &prompt.detach())?; // [N(+1), D]
    let mut order: Vec<usize> = (0..dev.len()).collect();
    order.sort_by_key(|&i| dev[i].source.len() + dev[i].target.len());
    let batches = order
        .chunks(cfg.batch_size.max(1))
        .enumerate()
        .filter(|&(b, _)| share.takes(b))
        .map(|(_, chunk)| chunk.iter().map(|&i| dev[i].clone()).collect::<Vec<_>>());
    target_nll_tally(model, Some(&prefix), prefix_len(cfg), batches)
}

/// Mean target-token NLL of `dev` with no prompt (model tuning's dev loss), in batches of
/// `cfg.batch_size` in the data's order.
pub(crate) fn dev_nll_without_prompt(
    model: &Model,
    dev: &[Example],
    cfg: &TrainConfig,
) -> Result<f64> {
    let batches = dev.chunks(cfg.batch_size.max(1)).map(|c| c.to_vec());
    Ok(target_nll_tally(model, None, 0, batches)?.mean())
}

/// Sum and count over every target token of `batches` of its NLL given `prefix`
/// (`[n_prefix, D]`).
fn target_nll_tally(
    model: &Model,
    prefix: Option<&Tensor>,
    n_prefix: usize,
    batches: impl Iterator<Item = Vec<Example>>,
) -> Result<Tally> {
    let info = model.backbone.info();
    let mut total = 0f64;
    let mut count = 0usize;
    for examples in batches {
        let batch = collate(&examples, info, n_prefix, &model.device)?;
        let nll = target_nll(&model.backbone, prefix, &batch)?.detach(); // [M]
        total += nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        count += nll.dim(0)?;
    }
    Ok(Tally {
        sum: total,
        count: count as f64,
    })
}

/// Rank-classification accuracy on `dev` under `prompt` (no gradient): each example's class
/// is the one of `classes` with the highest log-likelihood given `[P; source]`, scored as
/// `softprompt eval` does. With `cfg.prompt_after_bos`, as in training. Errors when a dev
/// target is none of `classes` (see [`gold_labels`]).
pub fn dev_accuracy(
    model: &Model,
    prompt: &Tensor,
    dev: &[Example],
    classes: &[Vec<u32>],
    cfg: &TrainConfig,
) -> Result<f64> {
    let gold = gold_labels(dev, classes, model.backbone.info())?;
    let dev = after_bos(model, cfg, dev);
    Ok(prepared_dev_accuracy(model, prompt, &dev, classes, &gold, cfg, DevShare::ALL)?.mean())
}

/// [`dev_accuracy`]'s correct and scored examples among `share`'s batches, of examples already
/// without their leading BOS when `cfg.prompt_after_bos`.
///
/// The batches are those [`label_log_likelihoods`] makes of the whole dev set (sources in
/// length order, stable, `cfg.batch_size` at a time), so each example is scored in the same
/// batch, with the same padding, on any number of ranks.
pub(crate) fn prepared_dev_accuracy(
    model: &Model,
    prompt: &Tensor,
    dev: &[Example],
    classes: &[Vec<u32>],
    gold: &[usize],
    cfg: &TrainConfig,
    share: DevShare,
) -> Result<Tally> {
    let prefix = model_prefix(model, cfg, &prompt.detach())?; // [N(+1), D]
    let mut order: Vec<usize> = (0..dev.len()).collect();
    order.sort_by_key(|&i| dev[i].source.len());
    // Whole batches but the last, so this share's batches are batched again as they are here.
    let mine: Vec<usize> = order
        .chunks(cfg.batch_size.max(1))
        .enumerate()
        .filter(|&(b, _)| share.takes(b))
        .flat_map(|(_, chunk)| chunk.iter().copied())
        .collect();
    let sources: Vec<Vec<u32>> = mine.iter().map(|&i| dev[i].source.clone()).collect();
    let gold: Vec<usize> = mine.iter().map(|&i| gold.get(i).copied().unwrap_or(usize::MAX)).collect();
    if sources.is_empty() {
        return Ok(Tally::default());
    }
    let scores = label_log_likelihoods(
        &model.backbone,
        Some(&prefix),
        &sources,
        classes,
        cfg.batch_size,
        &model.device,
    )?; // [examples][classes]
    let predicted: Vec<usize> = scores.iter().map(|s| argmax(s)).collect();
    let correct = predicted.iter().zip(&gold).filter(|(p, g)| p == g).count();
    Ok(Tally {
        sum: correct as f64,
        count: predicted.len() as f64,
    })
}
