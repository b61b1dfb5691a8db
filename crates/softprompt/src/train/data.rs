//! The data a run reads: the input checks made before any work ([`validate`]), the data order
//! ([`epoch_batches`]) and the after-BOS placement of the prompt ([`after_bos`],
//! [`model_prefix`]).
//!
//! Data order: the batches of epoch `e` are a function of `(seed, e)` only: the examples are
//! shuffled, sorted by length inside windows of [`BUCKET_BATCHES`] batches (so a batch holds
//! examples of similar length and little padding), cut into batches, and the batches shuffled.
//! A run is therefore at `(epoch, batch index)` and resuming needs no random-generator state.

use crate::batch::Example;
use crate::load::Model;
use crate::model::ModelInfo;
use crate::prompt::init::Rng;
use crate::prompt::{prefix_after_bos, strip_leading_bos};
use crate::train::config::{SelectBy, TrainConfig};
use crate::train::dev_eval::gold_labels;
use crate::{bail, Result};
use candle_core::Tensor;
use std::borrow::Cow;

/// Batches per length-sorting window (see the module doc).
pub const BUCKET_BATCHES: usize = 32;
/// Seed stream of the data order.
const STREAM_DATA: u64 = 0x7c15_d3b2_04e9_a66f;

/// Checks every input before any work (see [`crate::train::train`]): an empty data set,
/// `n_tokens` 0, a bad learning rate or schedule, examples that do not fit the model's context
/// with the prompt, tokens outside the vocabulary, classes that do not match the dev targets.
pub fn validate(
    cfg: &TrainConfig,
    info: &ModelInfo,
    train: &[Example],
    dev: Option<&[Example]>,
) -> Result<()> {
    if cfg.n_tokens == 0 {
        bail!("n_tokens must be at least 1");
    }
    let lr = cfg.schedule.lr;
    if !(lr.is_finite() && lr > 0.0) {
        bail!("the learning rate must be a positive number, got {lr}");
    }
    cfg.schedule.validate()?;
    if cfg.steps == 0 {
        bail!("steps must be at least 1");
    }
    if cfg.batch_size == 0 {
        bail!("batch size must be at least 1");
    }
    if cfg.grad_accum == 0 {
        bail!("gradient accumulation must be at least 1 batch");
    }
    if let Some(c) = cfg.clip {
        if !(c.is_finite() && c > 0.0) {
            bail!("gradient clipping norm must be a positive number, got {c}");
        }
    }
    if cfg.patience == Some(0) {
        bail!("early-stopping patience must be at least 1 evaluation");
    }
    if let Some(classes) = &cfg.classes {
        if classes.is_empty() {
            bail!("classification needs at least one class");
        }
        for (i, c) in classes.iter().enumerate() {
            if c.is_empty() {
                bail!("class {}: its target has no tokens", i + 1);
            }
            if let Some(&bad) = c.iter().find(|&&t| t as usize >= info.vocab_size) {
                bail!(
                    "class {}: token id {bad} is outside the model's vocabulary of {}",
                    i + 1,
                    info.vocab_size
                );
            }
        }
    }
    if cfg.select_by == SelectBy::Accuracy {
        if cfg.classes.is_none() {
            bail!("selecting by dev accuracy needs the task's classes (labels)");
        }
        if dev.is_none() {
            bail!("selecting by dev accuracy needs a dev set");
        }
    }
    if train.is_empty() {
        bail!("the training set is empty");
    }
    if cfg.prompt_after_bos {
        if info.is_encoder_decoder() {
            bail!("placing the prompt after BOS is for decoder-only models; this one is encoder-decoder");
        }
        if info.bos_token_id.is_none() {
            bail!(
                "placing the prompt after BOS needs a BOS token, but model `{}` has no bos_token_id",
                info.name
            );
        }
    }
    let n_prefix = prefix_len(cfg);
    check_examples("training", train, n_prefix, info)?;
    if let Some(dev) = dev {
        if dev.is_empty() {
            bail!("the dev set is empty");
        }
        check_examples("dev", dev, n_prefix, info)?;
        if let Some(classes) = &cfg.classes {
            gold_labels(dev, classes, info)?;
        }
    }
    Ok(())
}

pub(crate) fn check_examples(
    what: &str,
    examples: &[Example],
    n_tokens: usize,
    info: &ModelInfo,
) -> Result<()> {
    let seq2seq = info.is_encoder_decoder();
    for (i, e) in examples.iter().enumerate() {
        if e.target.is_empty() {
            bail!(
                "{what} example {}: empty target, nothing to learn from",
                i + 1
            );
        }
        if let Some(&bad) = e
            .source
            .iter()
            .chain(&e.target)
            .find(|&&t| t as usize >= info.vocab_size)
        {
            bail!(
                "{what} example {}: token id {bad} is outside the model's vocabulary of {}",
                i + 1,
                info.vocab_size
            );
        }
        if let Some(max) = info.max_positions {
            let len = if seq2seq {
                (n_tokens + e.source.len()).max(e.target.len())
            } else {
                n_tokens + e.source.len() + e.target.len()
            };
            if len > max {
                bail!(
                    "{what} example {}: the prompt ({n_tokens} tokens) plus the example ({} + {} tokens) \
                     is {len} positions, longer than the model's context of {max}",
                    i + 1,
                    e.source.len(),
                    e.target.len()
                );
            }
        }
    }
    Ok(())
}

/// The batches of epoch `epoch`: lists of example indices (see the module doc). Depends only
/// on the lengths, the batch size, `seed` and `epoch`. Every example appears exactly once;
/// only the last batch of an epoch may be smaller.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = Rng::new(
        seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        STREAM_DATA,
    );
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    rng.shuffle(&mut order);
    let window = batch_size.max(1) * BUCKET_BATCHES;
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| lengths[i]); // stable: ties keep the shuffled order
    }
    let mut batches: Vec<Vec<usize>> = order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect();
    rng.shuffle(&mut batches);
    batches
}

/// With `cfg.prompt_after_bos`, `examples` without their leading BOS (the prompt prefix carries
/// it); otherwise `examples` as they are.
pub(crate) fn after_bos<'a>(
    model: &Model,
    cfg: &TrainConfig,
    examples: &'a [Example],
) -> Cow<'a, [Example]> {
    let bos = match model.backbone.info().bos_token_id {
        Some(bos) if cfg.prompt_after_bos => bos,
        // Without a BOS token, validate() names the problem.
        _ => return Cow::Borrowed(examples),
    };
    Cow::Owned(
        examples
            .iter()
            .map(|e| {
                let mut e = e.clone();
                strip_leading_bos(&mut e.source, bos);
                e
            })
            .collect(),
    )
}

/// The prompt as the model sees it: `prompt [N, D]`, or `[embed(BOS); prompt] [N+1, D]` with
/// `cfg.prompt_after_bos`.
pub(crate) fn model_prefix(model: &Model, cfg: &TrainConfig, prompt: &Tensor) -> Result<Tensor> {
    if cfg.prompt_after_bos {
        prefix_after_bos(prompt, &model.backbone)
    } else {
        Ok(prompt.clone())
    }
}

/// Positions the prefix takes in front of each example: the prompt, plus BOS after which it is
/// placed with `cfg.prompt_after_bos`.
pub(crate) fn prefix_len(cfg: &TrainConfig) -> usize {
    cfg.n_tokens + usize::from(cfg.prompt_after_bos)
}
