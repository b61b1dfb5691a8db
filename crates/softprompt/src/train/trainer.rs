//! Prompt tuning: only the `[N, D]` prompt is trained; the backbone is frozen (its weights are
//! plain tensors, never handed to the optimizer). A configuration of the one training loop
//! (`train::step_loop`): one var (the prompt), the loss of `[P; example]`, dev evaluation and
//! selection of the best prompt, a prompt [`Checkpoint`](super::checkpoint::Checkpoint).
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

use crate::batch::{collate_shard, Example};
use crate::load::Model;
use crate::objective::target_nll;
use crate::prompt::init::{init_prompt, PromptInit};
use crate::train::data::{after_bos, model_prefix, prefix_len};
use crate::train::dev_eval::{prepared_dev_accuracy, prepared_dev_nll};
use crate::task::{describe_init, ExampleLayout};
use crate::train::export::{run_task_fields, save_prompt_adapter, write_task_json};
use crate::train::plot;
use crate::train::run_state::CheckpointKind;
use crate::train::step_loop::{BatchLoss, DevHook, DevMetric, DevShare, StepLoop, Tally};
use crate::{Error, Result};
use candle_core::{Tensor, Var};

// The names this module has always offered, now in the modules of their concept.
pub use crate::train::config::{SelectBy, TrainConfig};
pub use crate::train::data::{epoch_batches, validate, BUCKET_BATCHES};
pub use crate::train::dev_eval::{dev_accuracy, dev_nll, gold_labels};
pub use crate::train::export::TASK_FILE;
pub use crate::train::run_id::config_hash;

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

impl TrainReport {
    /// One line for the user: steps, the last train loss, the best dev evaluation (the
    /// `select_by` metric first) and whether the run stopped early.
    pub fn summary(&self, select_by: SelectBy) -> String {
        let mut line = format!("trained {} steps", self.steps);
        if let Some(from) = self.resumed_from {
            line.push_str(&format!(" (resumed at step {from})"));
        }
        if let Some(loss) = self.final_loss {
            line.push_str(&format!("; last train loss {loss:.4}"));
        }
        match (self.best_dev_loss, self.best_dev_accuracy, self.best_step) {
            (Some(d), Some(a), Some(s)) if select_by == SelectBy::Accuracy => {
                line.push_str(&format!("; best dev accuracy {a:.4} at step {s} (dev loss {d:.4})"));
            }
            (Some(d), Some(a), Some(s)) => {
                line.push_str(&format!("; best dev loss {d:.4} at step {s} (dev accuracy {a:.4})"));
            }
            (Some(d), None, Some(s)) => line.push_str(&format!("; best dev loss {d:.4} at step {s}")),
            _ => {}
        }
        if self.stopped_early {
            line.push_str("; stopped early");
        }
        line
    }
}

/// Trains a prompt on `train` (and keeps the best on `dev`) for `model`; see the module doc.
/// All input checks run before the first step ([`validate`], and the init is made even when
/// resuming, so a bad one fails before any work).
pub fn train(
    model: &Model,
    train: &[Example],
    dev: Option<&[Example]>,
    cfg: &TrainConfig,
) -> Result<TrainReport> {
    let info = model.backbone.info();
    // With the prompt after BOS, the examples lose their leading BOS (the prefix carries it);
    // the run's hash is of the examples as given.
    let (given_train, given_dev) = (train, dev);
    let train = after_bos(model, cfg, train);
    let dev = dev.map(|d| after_bos(model, cfg, d));
    let dev = dev.as_deref();
    validate(cfg, info, &train, dev)?;
    // Gold label of each dev example, when the dev accuracy is measured.
    let dev_gold = match (&cfg.classes, dev) {
        (Some(classes), Some(dev)) => Some(gold_labels(dev, classes, info)?),
        _ => None,
    };
    // Made even when resuming: it checks the init (labels, text, adapter) before any work.
    let initial = init_prompt(&cfg.init, model, cfg.n_tokens, cfg.seed)?; // [N, D]
    let hash = config_hash(cfg, info, given_train, given_dev);
    let out = &cfg.output;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let prompt = Var::from_tensor(&initial)?;
    let n_prefix = prefix_len(cfg);
    let loss = |examples: &[Example], shard: std::ops::Range<usize>| -> Result<BatchLoss> {
        let batch = collate_shard(examples, shard, info, n_prefix, &model.device)?;
        let prefix = model_prefix(model, cfg, prompt.as_tensor())?; // [N(+1), D]
        let nll = target_nll(&model.backbone, Some(&prefix), &batch)?; // [M]
        Ok(BatchLoss {
            nll,
            tokens: batch.n_tokens,
        })
    };
    let dev_loss = |p: &[Tensor], share: DevShare| -> Result<Tally> {
        match (dev, p) {
        (Some(dev), [prompt]) => prepared_dev_nll(model, prompt, dev, cfg, share),
        _ => Err(Error::invalid(
            "dev evaluation needs a dev set and one prompt",
        )),
        }
    };
    let dev_accuracy = |p: &[Tensor], share: DevShare| -> Result<Tally> {
        match (dev, &cfg.classes, &dev_gold, p) {
        (Some(dev), Some(classes), Some(gold), [prompt]) => {
            prepared_dev_accuracy(model, prompt, dev, classes, gold, cfg, share)
        }
        _ => Err(Error::invalid(
            "dev accuracy needs a dev set, classes and one prompt",
        )),
        }
    };
    let run = StepLoop {
        cfg,
        vars: vec![prompt.clone()],
        optimizer: cfg.optimizer.build(vec![prompt.clone()])?,
        loss: &loss,
        dev: dev.map(|_| DevHook {
            loss: &dev_loss,
            accuracy: dev_gold.as_ref().map(|_| &dev_accuracy as DevMetric),
        }),
        checkpoint: CheckpointKind::Prompt,
        config_hash: &hash,
        device: &model.device,
    }
    .run(&train)?;

    // (A resumed run with nothing left to do still rewrites its outputs below.)
    let state = &run.state;
    let writes = cfg.parallel.is_root();
    let (exported, exported_step) = match &state.best {
        Some(b) => match b.params.first() {
            Some(p) => (p.clone(), b.step),
            None => return Err(Error::invalid("the best evaluation kept no prompt")),
        },
        None => (prompt.as_tensor().detach().copy()?, state.step),
    };
    // Rank 0 writes; the other ranks of a data-parallel run hold the same prompt.
    if writes {
        export(model, cfg, &exported, &train, dev)?;
        plot::plot_loss(&run.log.rows, &out.join(plot::FILE))?;
    }
    Ok(TrainReport {
        steps: state.step,
        resumed_from: run.resumed_from,
        final_loss: run.final_loss,
        best_dev_loss: state.best.as_ref().map(|b| b.dev_loss),
        best_dev_accuracy: state.best.as_ref().and_then(|b| b.dev_accuracy),
        best_step: state.best.as_ref().map(|b| b.step),
        exported_step,
        stopped_early: state.stopped_early,
        prompt: exported,
    })
}

/// Writes the adapter and `task.json`.
fn export(
    model: &Model,
    cfg: &TrainConfig,
    prompt: &Tensor,
    train: &[Example],
    dev: Option<&[Example]>,
) -> Result<()> {
    save_prompt_adapter(model, cfg, prompt, true)?;
    let info = model.backbone.info();
    let mut task = run_task_fields(model, cfg, train, dev)?;
    task.n_tokens = Some(cfg.n_tokens);
    task.init = Some(describe_init(&cfg.init));
    task.format = Some(ExampleLayout::prompt_tuning(info.is_encoder_decoder(), cfg.prompt_after_bos));
    if let PromptInit::ClassLabels(labels) = &cfg.init {
        task.labels = labels.clone();
    }
    task.prompt_after_bos = cfg.prompt_after_bos;
    write_task_json(cfg, task)
}
