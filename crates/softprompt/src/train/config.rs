//! What defines a training run: [`TrainConfig`] (shared by prompt tuning, P-tuning and model
//! tuning) and [`SelectBy`], the dev metric that picks the exported prompt.

use crate::task::TaskMeta;
use crate::prompt::init::PromptInit;
use crate::train::optim::{AdafactorConfig, OptimizerConfig};
use crate::train::parallel::Parallel;
use crate::train::schedule::Schedule;
use std::path::PathBuf;

/// Which dev metric chooses the exported prompt and drives early stopping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum SelectBy {
    /// The lowest dev loss (mean target-token NLL).
    #[default]
    Loss,
    /// The highest dev accuracy (rank classification over the labels, the training
    /// configuration's `classes`); among equal accuracies the lower dev loss wins.
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
    /// The ranks of a data-parallel run (see [`crate::train::parallel`]); one process by
    /// default. Not part of the run's identity: a checkpoint resumes on any number of ranks.
    pub parallel: Parallel,
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
            parallel: Parallel::single(),
        }
    }
}
