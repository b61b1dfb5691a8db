//! The prompt-tuning loop: only the `[N, D]` prompt is trained; the backbone is frozen (its
//! weights are plain tensors, never handed to the optimizer).
//!
//! Data order: the batches of epoch `e` are a function of `(seed, e)` only: the examples are
//! shuffled, sorted by length inside windows of [`BUCKET_BATCHES`] batches (so a batch holds
//! examples of similar length and little padding), cut into batches, and the batches shuffled.
//! A run is therefore at `(epoch, batch index)` and resuming needs no random-generator state.
//!
//! One optimizer step reads `grad_accum` batches of `batch_size` examples; its loss is the mean
//! NLL over all the target tokens of those batches (PEFT's token mean, also across the
//! accumulated batches), so accumulation gives the gradient of the large batch.
//!
//! Dev evaluation: the mean target-token NLL and, for a classification task
//! ([`TrainConfig::classes`]), the accuracy of rank classification
//! ([`crate::eval::classify::label_log_likelihoods`], the scorer of `softprompt eval`). The
//! best evaluation by [`TrainConfig::select_by`] (dev loss, or dev accuracy with ties going to
//! the lower dev loss) is the prompt exported, and the one early stopping waits to beat.
//!
//! Outputs in `output`: the adapter (`adapter_config.json`, `adapter_model.safetensors`, the
//! prompt of the best dev evaluation, or the last one without a dev set), `task.json`,
//! `metrics.jsonl`, `loss.svg`, and `checkpoint/` (see [`super::checkpoint`]).

use crate::batch::{collate, Example};
use crate::eval::classify::{argmax, label_log_likelihoods};
use crate::load::Model;
use crate::model::ModelInfo;
use crate::objective::target_nll;
use crate::prompt::init::{init_prompt, PromptInit, Rng};
use crate::prompt::{after_bos_token, model_prefix, strip_leading_bos, AdapterConfig, PeftAdapter};
use crate::task::meta::{describe_init, ExampleLayout, TaskMeta};
use crate::train::checkpoint::{self, Best, Checkpoint};
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::optim::{clip_grad_norm, AdafactorConfig, OptimizerConfig};
use crate::train::plot;
use crate::train::schedule::{Decay, Schedule};
use crate::{bail, Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Instant;

/// Batches per length-sorting window (see the module doc).
pub const BUCKET_BATCHES: usize = 32;
/// Seed stream of the data order.
const STREAM_DATA: u64 = 0x7c15_d3b2_04e9_a66f;
pub use crate::task::TASK_FILE;

/// Which dev metric chooses the exported prompt and drives early stopping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SelectBy {
    /// The lowest mean target-token NLL.
    #[default]
    Loss,
    /// The highest rank-classification accuracy (needs [`TrainConfig::classes`]); among equal
    /// accuracies the lower dev loss wins.
    Accuracy,
}

/// Everything that defines a training run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Prompt length `N` (the paper's default 100; 20 is nearly as good).
    pub n_tokens: usize,
    pub init: PromptInit,
    pub optimizer: OptimizerConfig,
    /// Learning rate per step (its `lr` is the base learning rate).
    pub schedule: Schedule,
    /// Total optimizer steps (a resumed run continues up to this many).
    pub steps: usize,
    /// Examples per batch.
    pub batch_size: usize,
    /// Batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the prompt gradient to this global L2 norm.
    pub clip: Option<f64>,
    pub seed: u64,
    /// Evaluate on the dev set every this many steps (and always after the last step); 0: only
    /// after the last step.
    pub eval_every: usize,
    /// Stop when this many evaluations in a row did not improve the best dev metric.
    pub patience: Option<usize>,
    /// Classification: each label's tokenized target as rank classification scores it
    /// ([`crate::task::ClassificationTask::label_targets`]: the verbalizer's tokens, with EOS
    /// for encoder-decoder models). Every dev example's target must be one of them, or one of
    /// them followed by EOS (its gold label). `None`: no dev accuracy.
    pub classes: Option<Vec<Vec<u32>>>,
    /// The dev metric that picks the exported prompt and drives `patience`.
    pub select_by: SelectBy,
    /// Write a checkpoint every this many steps (and always at the end); 0: only at the end.
    pub checkpoint_every: usize,
    /// Write a metrics line every this many steps (and at evaluations and the last step).
    pub log_every: usize,
    pub output: PathBuf,
    /// Continue from `output/checkpoint` when there is one.
    pub resume: bool,
    /// No progress bar.
    pub quiet: bool,
    /// Extra facts for `task.json` (input/target format, labels, data files...); the fields
    /// set here win over the trainer's own.
    pub task: TaskMeta,
    /// Decoder-only models: the prompt goes after BOS, `[embed(BOS); P; embed(X)]` (the
    /// prompt-tuning code's `prefix_prompt_after_bos`); see [`crate::prompt::prefix_after_bos`].
    pub prompt_after_bos: bool,
}

impl TrainConfig {
    /// The paper's recipe (Lester et al. 2021): 100 tokens, Adafactor (weight decay 1e-5,
    /// decay 0.8, clipping 1.0), constant learning rate 0.3, batch 32, 30,000 steps, random
    /// uniform init; dev evaluation and checkpoints every 100 steps.
    pub fn paper(output: impl Into<PathBuf>) -> Self {
        TrainConfig {
            n_tokens: 100,
            init: PromptInit::default(),
            optimizer: OptimizerConfig::Adafactor(AdafactorConfig::default()),
            schedule: Schedule::constant(0.3),
            steps: 30_000,
            batch_size: 32,
            grad_accum: 1,
            clip: None,
            seed: 0,
            eval_every: 100,
            patience: None,
            classes: None,
            select_by: SelectBy::Loss,
            checkpoint_every: 100,
            log_every: 1,
            output: output.into(),
            resume: false,
            quiet: false,
            task: TaskMeta::default(),
            prompt_after_bos: false,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// Optimizer steps done in total (resumed steps included).
    pub steps: usize,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// Loss of the last step of this invocation.
    pub final_loss: Option<f64>,
    /// Dev loss of the best evaluation (by `select_by`).
    pub best_dev_loss: Option<f64>,
    /// Dev accuracy of the best evaluation, with `classes`.
    pub best_dev_accuracy: Option<f64>,
    pub best_step: Option<usize>,
    /// The step whose prompt was exported.
    pub exported_step: usize,
    pub stopped_early: bool,
    /// The prompt written to the adapter, `[N, D]`.
    pub prompt: Tensor,
}

/// Trains a prompt on `train` (and keeps the best on `dev`) for `model`; see the module doc.
/// All input checks run before the first step: an empty data set, `n_tokens` 0, a bad learning
/// rate, examples that do not fit the model's context with the prompt, tokens outside the
/// vocabulary, an initialisation that cannot be made.
pub fn train(
    model: &Model,
    train: &[Example],
    dev: Option<&[Example]>,
    cfg: &TrainConfig,
) -> Result<TrainReport> {
    let info = model.backbone.info();
    // With the prompt after BOS, the examples lose their leading BOS (the prefix carries it).
    let stripped = after_bos_examples(model, cfg, train)?;
    let stripped_dev = dev.map(|d| after_bos_examples(model, cfg, d)).transpose()?;
    let (hash_train, hash_dev) = (train, dev);
    let train: &[Example] = stripped.as_deref().unwrap_or(train);
    let dev: Option<&[Example]> = match (&stripped_dev, dev) {
        (Some(Some(s)), _) => Some(s.as_slice()),
        (_, d) => d,
    };
    let n_prefix = cfg.n_tokens + usize::from(cfg.prompt_after_bos);
    validate(cfg, info, train, dev)?;
    // Gold label of each dev example, when the dev accuracy is measured.
    let dev_gold = match (&cfg.classes, dev) {
        (Some(classes), Some(dev)) => Some(gold_labels(dev, classes, info)?),
        _ => None,
    };
    // Made even when resuming: it checks the init (labels, text, adapter) before any work.
    let initial = init_prompt(&cfg.init, model, cfg.n_tokens, cfg.seed)?;
    let hash = config_hash(cfg, info, hash_train, hash_dev);
    let out = &cfg.output;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let existing = Checkpoint::load(out, &model.device)?;
    let resumed =
        match existing {
            Some(c) if cfg.resume => {
                if c.config_hash != hash {
                    return Err(Error::format(
                        checkpoint::path(out),
                        "the checkpoint was written by a run with another configuration or data \
                     (prompt length, init, optimizer, schedule, batching, clipping, seed, model \
                     or examples differ); use the same settings to resume or another output folder",
                    ));
                }
                if c.prompt.dims() != [cfg.n_tokens, info.d_model] {
                    bail!(
                        "checkpoint prompt {:?} does not match [{}, {}]",
                        c.prompt.dims(),
                        cfg.n_tokens,
                        info.d_model
                    );
                }
                Some(c)
            }
            Some(_) => return Err(Error::format(
                checkpoint::path(out),
                "the output folder already has a checkpoint: pass --resume to continue that run, \
                 or choose another output folder",
            )),
            None => None,
        };

    let prompt = Var::from_tensor(&match &resumed {
        Some(c) => c.prompt.to_dtype(DType::F32)?.to_device(&model.device)?,
        None => initial,
    })?;
    let mut optimizer = cfg.optimizer.build(vec![prompt.clone()])?;
    let mut state = RunState {
        step: 0,
        epoch: 0,
        position: 0,
        best: None,
        best_accuracy: None,
        evals_since_best: 0,
        stopped_early: false,
    };
    if let Some(c) = &resumed {
        optimizer.load_state(&c.optimizer)?;
        state = RunState {
            step: c.step,
            epoch: c.epoch,
            position: c.position,
            best: c.best.clone(),
            best_accuracy: None,
            evals_since_best: c.evals_since_best,
            stopped_early: c.stopped_early,
        };
    }
    let resumed_from = resumed.as_ref().map(|c| c.step);
    let mut log = MetricsLog::open(out, resumed_from)?;
    if let (Some(best), Some(gold), Some(classes), Some(dev)) =
        (&state.best, &dev_gold, &cfg.classes, dev)
    {
        // The checkpoint keeps the best prompt and its dev loss; its accuracy is in the
        // metrics line of its step, or is measured again (same prompt, data and batching).
        let logged = log
            .rows
            .iter()
            .rev()
            .find(|r| r.step == best.step)
            .and_then(|r| r.dev_accuracy);
        state.best_accuracy = match logged {
            Some(a) => Some(a),
            None => Some(prepared_dev_accuracy(model, &best.prompt, dev, classes, gold, cfg)?),
        };
    }

    let bar = progress_bar(cfg, state.step);
    let lengths: Vec<usize> = train
        .iter()
        .map(|e| e.source.len() + e.target.len())
        .collect();
    let mut plan = epoch_batches(&lengths, cfg.batch_size, cfg.seed, state.epoch);
    let mut final_loss = None;
    let mut pending = LogAccumulator::default();
    let mut last_accuracy: Option<f64> = None;

    while state.step < cfg.steps && !state.stopped_early {
        let started = Instant::now();
        // The batches of this step.
        let mut micro: Vec<Vec<Example>> = Vec::with_capacity(cfg.grad_accum);
        for _ in 0..cfg.grad_accum {
            if state.position >= plan.len() {
                state.epoch += 1;
                state.position = 0;
                plan = epoch_batches(&lengths, cfg.batch_size, cfg.seed, state.epoch);
            }
            micro.push(
                plan[state.position]
                    .iter()
                    .map(|&i| train[i].clone())
                    .collect(),
            );
            state.position += 1;
        }
        let target_tokens: usize = micro.iter().flatten().map(|e| e.target.len()).sum();
        let scale = 1.0 / target_tokens as f64;

        let mut grads: Option<GradStore> = None;
        let mut loss_sum = 0f64;
        let mut n_tokens = 0usize;
        for examples in &micro {
            let batch = collate(examples, info, n_prefix, &model.device)?;
            n_tokens += batch.n_tokens;
            let prefix = effective_prompt(model, cfg, prompt.as_tensor())?; // [N(+1), D]
            let nll = target_nll(&model.backbone, Some(&prefix), &batch)?; // [M]
            let loss = nll.sum_all()?.affine(scale, 0.0)?; // this batch's share of the step's mean
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut g = loss.backward()?;
            let Some(pg) = g.remove(prompt.as_tensor()) else {
                bail!(
                    "the prompt received no gradient: the model's forward pass goes through an \
                     operation without a backward pass (e.g. a fused candle kernel)"
                );
            };
            grads = Some(match grads {
                None => {
                    let mut store = GradStore::default();
                    store.insert(prompt.as_tensor(), pg);
                    store
                }
                Some(mut store) => {
                    let sum = match store.get(prompt.as_tensor()) {
                        Some(prev) => (prev + pg)?,
                        None => pg,
                    };
                    store.insert(prompt.as_tensor(), sum);
                    store
                }
            });
        }
        let Some(mut grads) = grads else {
            bail!("gradient accumulation must be at least 1 batch");
        };
        if !loss_sum.is_finite() {
            bail!(
                "training diverged at step {}: the loss is {loss_sum} (try a lower learning rate); \
                 the last checkpoint is intact",
                state.step + 1
            );
        }
        let grad_norm = match cfg.clip {
            Some(max) => clip_grad_norm(&mut grads, std::slice::from_ref(&prompt), max)?,
            None => global_norm(&grads, &prompt)?,
        };
        if !grad_norm.is_finite() {
            bail!(
                "the prompt gradient is not finite at step {} (norm {grad_norm})",
                state.step + 1
            );
        }
        let lr = cfg.schedule.lr_at(state.step);
        let updated = optimizer.step(&grads, lr)?;
        if updated != 1 {
            bail!("the optimizer updated {updated} vars instead of the prompt");
        }
        state.step += 1;
        final_loss = Some(loss_sum);
        let elapsed = started.elapsed().as_secs_f64();
        let tokens_per_s = if elapsed > 0.0 {
            n_tokens as f64 / elapsed
        } else {
            0.0
        };
        pending.add(loss_sum);

        let last = state.step == cfg.steps;
        let mut dev_loss = None;
        let mut dev_accuracy = None;
        if let Some(dev) = dev {
            if last || (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every)) {
                let d = prepared_dev_nll(model, prompt.as_tensor(), dev, cfg)?;
                dev_loss = Some(d);
                if let (Some(classes), Some(gold)) = (&cfg.classes, &dev_gold) {
                    dev_accuracy = Some(prepared_dev_accuracy(
                        model,
                        prompt.as_tensor(),
                        dev,
                        classes,
                        gold,
                        cfg,
                    )?);
                }
                let improved = match (&state.best, cfg.select_by) {
                    (None, _) => true,
                    (Some(b), SelectBy::Loss) => d < b.dev_loss,
                    (Some(b), SelectBy::Accuracy) => match (dev_accuracy, state.best_accuracy) {
                        (Some(a), Some(best)) => a > best || (a == best && d < b.dev_loss),
                        // validate() makes sure the accuracy is measured.
                        _ => d < b.dev_loss,
                    },
                };
                if improved {
                    state.best = Some(Best {
                        dev_loss: d,
                        step: state.step,
                        prompt: prompt.as_tensor().detach().copy()?,
                    });
                    state.best_accuracy = dev_accuracy;
                    state.evals_since_best = 0;
                } else {
                    state.evals_since_best += 1;
                    if cfg.patience.is_some_and(|p| state.evals_since_best >= p) {
                        state.stopped_early = true;
                    }
                }
            }
        }
        if last
            || dev_loss.is_some()
            || state.stopped_early
            || state.step.is_multiple_of(cfg.log_every.max(1))
        {
            log.append(StepMetrics {
                step: state.step,
                loss: pending.take(),
                lr,
                grad_norm,
                tokens_per_s,
                dev_loss,
                dev_accuracy,
            })?;
        }
        bar.set_position(state.step as u64);
        let mut message = format!("loss {loss_sum:.4}");
        if let Some(b) = &state.best {
            message.push_str(&format!("  best dev loss {:.4}", b.dev_loss));
            if let Some(a) = state.best_accuracy {
                message.push_str(&format!(" acc {:.1}% (step {})", 100.0 * a, b.step));
            }
        }
        if dev_accuracy.is_some() {
            last_accuracy = dev_accuracy;
        }
        if let Some(a) = last_accuracy {
            message.push_str(&format!("  last dev acc {:.1}%", 100.0 * a));
        }
        message.push_str(&format!("  {tokens_per_s:.0} tok/s"));
        bar.set_message(message);
        let save = last
            || state.stopped_early
            || (cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every));
        if save {
            save_checkpoint(cfg, &state, &prompt, optimizer.as_ref(), &hash)?;
            plot::plot_loss(&log.rows, &out.join(plot::FILE))?;
        }
    }
    bar.finish_and_clear();

    // (A resumed run with nothing left to do still rewrites its outputs below.)
    let (exported, exported_step) = match &state.best {
        Some(b) => (b.prompt.clone(), b.step),
        None => (prompt.as_tensor().detach().copy()?, state.step),
    };
    export(model, cfg, &exported, train, dev)?;
    plot::plot_loss(&log.rows, &out.join(plot::FILE))?;
    Ok(TrainReport {
        steps: state.step,
        resumed_from,
        final_loss,
        best_dev_loss: state.best.as_ref().map(|b| b.dev_loss),
        best_dev_accuracy: state.best_accuracy,
        best_step: state.best.as_ref().map(|b| b.step),
        exported_step,
        stopped_early: state.stopped_early,
        prompt: exported,
    })
}

/// Position and bookkeeping of a run (what a checkpoint holds besides tensors).
struct RunState {
    step: usize,
    epoch: usize,
    position: usize,
    best: Option<Best>,
    /// Dev accuracy of `best`, when measured.
    best_accuracy: Option<f64>,
    evals_since_best: usize,
    stopped_early: bool,
}

#[derive(Default)]
struct LogAccumulator {
    sum: f64,
    n: usize,
}

impl LogAccumulator {
    fn add(&mut self, loss: f64) {
        self.sum += loss;
        self.n += 1;
    }
    fn take(&mut self) -> f64 {
        let v = self.sum / self.n.max(1) as f64;
        *self = LogAccumulator::default();
        v
    }
}

fn save_checkpoint(
    cfg: &TrainConfig,
    state: &RunState,
    prompt: &Var,
    optimizer: &dyn crate::train::optim::Optimizer,
    hash: &str,
) -> Result<()> {
    Checkpoint {
        step: state.step,
        epoch: state.epoch,
        position: state.position,
        prompt: prompt.as_tensor().detach(),
        optimizer: optimizer.state()?,
        best: state.best.clone(),
        evals_since_best: state.evals_since_best,
        stopped_early: state.stopped_early,
        config_hash: hash.to_string(),
    }
    .save(&cfg.output)
}

/// Checks every input before any work (see [`train`]).
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
        after_bos_token(info)?;
    }
    let n_prefix = cfg.n_tokens + usize::from(cfg.prompt_after_bos);
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

/// The gold class of each example: the index of the class whose tokens are its target, or
/// its target without a final EOS (decoder-only targets carry EOS, classes do not). An example
/// whose target is no class is an error naming it.
pub fn gold_labels(examples: &[Example], classes: &[Vec<u32>], info: &ModelInfo) -> Result<Vec<usize>> {
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

fn check_examples(
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

/// With `cfg.prompt_after_bos`: copies of `examples` without their leading BOS; else `None`.
fn after_bos_examples(
    model: &Model,
    cfg: &TrainConfig,
    examples: &[Example],
) -> Result<Option<Vec<Example>>> {
    if !cfg.prompt_after_bos {
        return Ok(None);
    }
    let Some(bos) = model.backbone.info().bos_token_id else {
        // validate() names the problem.
        return Ok(None);
    };
    Ok(Some(
        examples
            .iter()
            .map(|e| {
                let mut e = e.clone();
                strip_leading_bos(&mut e.source, bos);
                e
            })
            .collect(),
    ))
}

/// The prompt as the model sees it: `prompt [N, D]`, or `[embed(BOS); prompt] [N+1, D]` with
/// `cfg.prompt_after_bos`.
fn effective_prompt(model: &Model, cfg: &TrainConfig, prompt: &Tensor) -> Result<Tensor> {
    model_prefix(prompt, &model.backbone, cfg.prompt_after_bos)
}

/// Mean target-token NLL of `dev` under `prompt` (no gradient), batched in length order.
/// With `cfg.prompt_after_bos`, the sources' leading BOS is removed and the prompt placed
/// after BOS, as in training.
pub fn dev_nll(model: &Model, prompt: &Tensor, dev: &[Example], cfg: &TrainConfig) -> Result<f64> {
    match after_bos_examples(model, cfg, dev)? {
        Some(stripped) => prepared_dev_nll(model, prompt, &stripped, cfg),
        None => prepared_dev_nll(model, prompt, dev, cfg),
    }
}

/// [`dev_nll`] of examples already without their leading BOS when `cfg.prompt_after_bos`.
fn prepared_dev_nll(
    model: &Model,
    prompt: &Tensor,
    dev: &[Example],
    cfg: &TrainConfig,
) -> Result<f64> {
    let info = model.backbone.info();
    let prompt = effective_prompt(model, cfg, &prompt.detach())?;
    let n_prefix = cfg.n_tokens + usize::from(cfg.prompt_after_bos);
    let mut order: Vec<usize> = (0..dev.len()).collect();
    order.sort_by_key(|&i| dev[i].source.len() + dev[i].target.len());
    let mut total = 0f64;
    let mut count = 0usize;
    for chunk in order.chunks(cfg.batch_size.max(1)) {
        let examples: Vec<Example> = chunk.iter().map(|&i| dev[i].clone()).collect();
        let batch = collate(&examples, info, n_prefix, &model.device)?;
        let nll = target_nll(&model.backbone, Some(&prompt), &batch)?;
        total += nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        count += nll.dim(0)?;
    }
    Ok(total / count.max(1) as f64)
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
    match after_bos_examples(model, cfg, dev)? {
        Some(stripped) => prepared_dev_accuracy(model, prompt, &stripped, classes, &gold, cfg),
        None => prepared_dev_accuracy(model, prompt, dev, classes, &gold, cfg),
    }
}

/// [`dev_accuracy`] of examples already without their leading BOS when `cfg.prompt_after_bos`.
fn prepared_dev_accuracy(
    model: &Model,
    prompt: &Tensor,
    dev: &[Example],
    classes: &[Vec<u32>],
    gold: &[usize],
    cfg: &TrainConfig,
) -> Result<f64> {
    let prompt = effective_prompt(model, cfg, &prompt.detach())?; // [N(+1), D]
    let sources: Vec<Vec<u32>> = dev.iter().map(|e| e.source.clone()).collect();
    let scores = label_log_likelihoods(
        &model.backbone,
        Some(&prompt),
        &sources,
        classes,
        cfg.batch_size,
        &model.device,
    )?; // [examples][classes]
    let predicted: Vec<usize> = scores.iter().map(|s| argmax(s)).collect();
    Ok(crate::eval::metrics::accuracy(&predicted, gold))
}

fn global_norm(grads: &GradStore, prompt: &Var) -> Result<f64> {
    Ok(match grads.get(prompt.as_tensor()) {
        Some(g) => g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?
            .sqrt(),
        None => 0.0,
    })
}

/// sha256 of everything that determines the run's trajectory: prompt length and init,
/// optimizer, schedule, batching, clipping, seed, model and data. Not `steps` (unless the
/// schedule decays over them), so a finished run can be resumed for more steps; not the
/// evaluation cadence, patience, output folder, logging or checkpoint frequency. Selecting by
/// dev accuracy (and its classes) is included, as it decides the checkpoint's best prompt.
pub fn config_hash(
    cfg: &TrainConfig,
    info: &ModelInfo,
    train: &[Example],
    dev: Option<&[Example]>,
) -> String {
    let schedule = match cfg.schedule.decay {
        Decay::Constant => format!(
            "constant lr={:?} warmup={}",
            cfg.schedule.lr, cfg.schedule.warmup_steps
        ),
        _ => format!("{:?}", cfg.schedule),
    };
    let desc = serde_json::json!({
        "n_tokens": cfg.n_tokens,
        "init": cfg.init.describe(),
        "optimizer": format!("{:?}", cfg.optimizer),
        "schedule": schedule,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "clip": format!("{:?}", cfg.clip),
        "seed": cfg.seed,
        "model": {"name": info.name, "arch": info.arch, "d_model": info.d_model, "vocab": info.vocab_size, "layers": info.n_layers},
        "train": examples_hash(train),
        "dev": dev.map(examples_hash),
    });
    let mut desc = desc;
    if cfg.prompt_after_bos {
        // Only when set, so the hashes of runs made before this option stay the same.
        if let Some(o) = desc.as_object_mut() {
            o.insert("prompt_after_bos".into(), true.into());
        }
    }
    if cfg.select_by == SelectBy::Accuracy {
        // The checkpoint's best prompt was chosen by accuracy on these classes: a resumed run
        // must keep choosing that way. Only when set, as above.
        if let Some(o) = desc.as_object_mut() {
            o.insert("select_by".into(), "accuracy".into());
            o.insert("classes".into(), serde_json::json!(cfg.classes));
        }
    }
    hex(&Sha256::digest(desc.to_string().as_bytes()))
}

fn examples_hash(examples: &[Example]) -> String {
    let mut h = Sha256::new();
    for e in examples {
        for part in [&e.source, &e.target] {
            h.update((part.len() as u64).to_le_bytes());
            for t in part.iter() {
                h.update(t.to_le_bytes());
            }
        }
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the adapter and `task.json`.
fn export(
    model: &Model,
    cfg: &TrainConfig,
    prompt: &Tensor,
    train: &[Example],
    dev: Option<&[Example]>,
) -> Result<()> {
    let info = model.backbone.info();
    let mut config = AdapterConfig::new(info, cfg.n_tokens, cfg.init.peft_name());
    if let PromptInit::Text(text) = &cfg.init {
        // PEFT requires both for TEXT (it only reads them when re-initialising).
        config.prompt_tuning_init_text = Some(text.clone());
        config.tokenizer_name_or_path = Some(model.path.display().to_string());
    }
    let prompt = prompt.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    PeftAdapter::new(config, prompt)?.save(&cfg.output)?;

    let mut task = TaskMeta::for_run(None, info, &model.path, train.len(), dev.map(<[_]>::len), cfg.seed)?;
    task.n_tokens = Some(cfg.n_tokens);
    task.init = Some(describe_init(&cfg.init));
    task.format = Some(ExampleLayout::prompt_tuning(info.is_encoder_decoder(), cfg.prompt_after_bos));
    if let PromptInit::ClassLabels(labels) = &cfg.init {
        task.labels = labels.clone();
    }
    task.prompt_after_bos = cfg.prompt_after_bos;
    task.merge(&cfg.task)?;
    task.write(&cfg.output)
}

fn progress_bar(cfg: &TrainConfig, start: usize) -> indicatif::ProgressBar {
    if cfg.quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(cfg.steps as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] step {pos}/{len}  {msg}  ETA {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_position(start as u64);
    bar.reset_eta();
    bar
}
