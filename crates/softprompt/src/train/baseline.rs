//! What the two baselines of the prompt-tuning paper's comparison (model tuning and P-tuning)
//! share: their run on the one training loop and their report.

use crate::batch::Example;
use crate::train::config::TrainConfig;
use crate::train::run_state::CheckpointKind;
use crate::train::step_loop::{LoopOutcome, ShardLoss, StepLoop};
use crate::Result;
use candle_core::{Device, Var};

/// What a baseline run did.
#[derive(Clone, Debug)]
pub struct BaselineReport {
    /// Optimizer steps done in total (resumed steps included).
    pub steps: usize,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// Loss of the first and last steps (read back from the metrics log after a resume).
    pub first_loss: f64,
    pub final_loss: f64,
    /// Mean target-token NLL on the dev set after training.
    pub dev_loss: Option<f64>,
}

impl BaselineReport {
    /// One line for the user: steps, the first and last train losses, the dev loss.
    pub fn summary(&self) -> String {
        let mut line = format!("trained {} steps", self.steps);
        if let Some(from) = self.resumed_from {
            line.push_str(&format!(" (resumed at step {from})"));
        }
        line.push_str(&format!("; train loss {:.4} -> {:.4}", self.first_loss, self.final_loss));
        if let Some(d) = self.dev_loss {
            line.push_str(&format!("; dev loss {d:.4}"));
        }
        line
    }

    /// The report of `run` (whose log has a line every step) and the dev loss after it.
    pub(crate) fn from_run(run: &LoopOutcome, dev_loss: Option<f64>) -> Self {
        BaselineReport {
            steps: run.state.step,
            resumed_from: run.resumed_from,
            first_loss: run.log.rows.first().map_or(f64::NAN, |r| r.loss),
            final_loss: run.log.rows.last().map_or(f64::NAN, |r| r.loss),
            dev_loss,
        }
    }
}

/// The training of a baseline (`method`) on the one loop: the `named` vars trained on `loss`,
/// no dev evaluation during training, a metrics line every step (the report's first and last
/// losses are read from the log), a [`CheckpointKind::Params`] checkpoint.
pub(crate) fn run_baseline(
    cfg: &TrainConfig,
    method: &str,
    named: Vec<(String, Var)>,
    loss: &ShardLoss<'_>,
    config_hash: &str,
    device: &Device,
    train: &[Example],
) -> Result<LoopOutcome> {
    let (names, vars): (Vec<String>, Vec<Var>) = named.into_iter().unzip();
    let mut every_step = cfg.clone();
    every_step.log_every = 1;
    StepLoop {
        cfg: &every_step,
        optimizer: cfg.optimizer.build(vars.clone())?,
        vars,
        loss,
        dev: None,
        checkpoint: CheckpointKind::Params {
            method,
            names: &names,
        },
        config_hash,
        device,
    }
    .run(train)
}
