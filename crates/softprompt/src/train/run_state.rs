//! The state of a run between two steps ([`RunState`]) and its round trip through the
//! checkpoint file: prompt tuning stores a [`Checkpoint`] (the prompt and the best dev
//! evaluation), the baselines a [`ParamsCheckpoint`] (their tensors by name); see
//! [`super::checkpoint`].

use crate::train::checkpoint::{self, Best, Checkpoint, ParamsCheckpoint};
use crate::train::optim::OptimizerState;
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// Position and bookkeeping of a run: what a checkpoint holds besides the trained tensors and
/// the optimizer's state.
#[derive(Clone, Debug, Default)]
pub(crate) struct RunState {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within that epoch's order.
    pub position: usize,
    /// The best dev evaluation so far.
    pub best: Option<BestEval>,
    /// Evaluations since the best one (for early stopping).
    pub evals_since_best: usize,
    /// Patience ran out; resuming does nothing more.
    pub stopped_early: bool,
}

/// The best dev evaluation so far and the trained tensors that scored it.
#[derive(Clone, Debug)]
pub(crate) struct BestEval {
    pub step: usize,
    pub dev_loss: f64,
    /// Dev accuracy, when the task's classes are known.
    pub dev_accuracy: Option<f64>,
    /// A copy of each trained var at that step, in the order of the vars.
    pub params: Vec<Tensor>,
}

/// How a run stores its state in `OUTPUT/checkpoint/checkpoint.safetensors`.
pub(crate) enum CheckpointKind<'a> {
    /// Prompt tuning: a [`Checkpoint`]; the run trains one var, the prompt `[N, D]`.
    Prompt,
    /// A baseline: a [`ParamsCheckpoint`] of `method` holding the vars under `names` (one name
    /// per var, in the same order).
    Params {
        method: &'a str,
        names: &'a [String],
    },
}

/// What a resumed run starts from.
pub(crate) struct Resumed {
    pub state: RunState,
    pub optimizer: OptimizerState,
}

const OTHER_CHECKPOINT: &str = "the output folder already has a checkpoint: pass --resume to \
                                continue that run, or choose another output folder";

impl CheckpointKind<'_> {
    /// Restores `vars` from the checkpoint of `output` when `resume` (and there is one), after
    /// checking that it was written by this kind of run with configuration hash `hash`. Without
    /// `resume`, an existing checkpoint is an error (a fresh run would overwrite it).
    pub fn resume(
        &self,
        output: &Path,
        resume: bool,
        hash: &str,
        vars: &[Var],
        device: &Device,
    ) -> Result<Option<Resumed>> {
        let path = checkpoint::path(output);
        match self {
            CheckpointKind::Prompt => {
                let Some(c) = Checkpoint::load(output, device)? else {
                    return Ok(None);
                };
                if !resume {
                    return Err(Error::format(path, OTHER_CHECKPOINT));
                }
                if c.config_hash != hash {
                    return Err(Error::format(
                        path,
                        "the checkpoint was written by a run with another configuration or data \
                         (prompt length, init, optimizer, schedule, batching, clipping, seed, \
                         model or examples differ); use the same settings to resume or another \
                         output folder",
                    ));
                }
                let [prompt] = vars else {
                    return Err(Error::invalid("prompt tuning trains exactly one var"));
                };
                if c.prompt.dims() != prompt.dims() {
                    crate::bail!(
                        "checkpoint prompt {:?} does not match {:?}",
                        c.prompt.dims(),
                        prompt.dims()
                    );
                }
                set_var(prompt, &c.prompt)?;
                let best = c.best.map(|b| BestEval {
                    step: b.step,
                    dev_loss: b.dev_loss,
                    // Measured again or read back from the metrics by the loop.
                    dev_accuracy: None,
                    params: vec![b.prompt],
                });
                let state = RunState {
                    step: c.step,
                    epoch: c.epoch,
                    position: c.position,
                    best,
                    evals_since_best: c.evals_since_best,
                    stopped_early: c.stopped_early,
                };
                Ok(Some(Resumed {
                    state,
                    optimizer: c.optimizer,
                }))
            }
            CheckpointKind::Params { method, names } => {
                if !path.exists() {
                    return Ok(None);
                }
                if !resume {
                    return Err(Error::format(path, OTHER_CHECKPOINT));
                }
                let Some(c) = ParamsCheckpoint::load(output, device)? else {
                    return Ok(None);
                };
                restore_params(&c, names, vars, method, hash, &path)?;
                let state = RunState {
                    step: c.step,
                    epoch: c.epoch,
                    position: c.position,
                    ..RunState::default()
                };
                Ok(Some(Resumed {
                    state,
                    optimizer: c.optimizer,
                }))
            }
        }
    }

    /// Writes the checkpoint of `state`, `vars` and the optimizer's state to `output`.
    pub fn save(
        &self,
        output: &Path,
        state: &RunState,
        vars: &[Var],
        optimizer: OptimizerState,
        hash: &str,
    ) -> Result<()> {
        match self {
            CheckpointKind::Prompt => {
                let [prompt] = vars else {
                    return Err(Error::invalid("prompt tuning trains exactly one var"));
                };
                let best =
                    match &state.best {
                        Some(b) => Some(Best {
                            dev_loss: b.dev_loss,
                            step: b.step,
                            prompt: b.params.first().cloned().ok_or_else(|| {
                                Error::invalid("the best evaluation kept no prompt")
                            })?,
                        }),
                        None => None,
                    };
                Checkpoint {
                    step: state.step,
                    epoch: state.epoch,
                    position: state.position,
                    prompt: prompt.as_tensor().detach(),
                    optimizer,
                    best,
                    evals_since_best: state.evals_since_best,
                    stopped_early: state.stopped_early,
                    config_hash: hash.to_string(),
                }
                .save(output)
            }
            CheckpointKind::Params { method, names } => ParamsCheckpoint {
                method: method.to_string(),
                step: state.step,
                epoch: state.epoch,
                position: state.position,
                params: names
                    .iter()
                    .zip(vars)
                    .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
                    .collect(),
                optimizer,
                config_hash: hash.to_string(),
            }
            .save(output),
        }
    }
}

/// Copies `value` into `var` in the var's dtype and on its device.
fn set_var(var: &Var, value: &Tensor) -> Result<()> {
    Ok(var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?)
}

/// Checks that `c` was written by this run's method and configuration and holds exactly the
/// tensors `names` with the shapes of `vars`, then copies them into the vars.
fn restore_params(
    c: &ParamsCheckpoint,
    names: &[String],
    vars: &[Var],
    method: &str,
    hash: &str,
    path: &Path,
) -> Result<()> {
    if c.method != method {
        return Err(Error::format(
            path,
            format!(
                "the checkpoint was written by a {} run, not {method}; resume it with \
                 --method {}, or choose another output folder",
                c.method, c.method
            ),
        ));
    }
    if c.config_hash != hash {
        return Err(Error::format(
            path,
            "the checkpoint was written by a run with another configuration or data \
             (optimizer, schedule, batching, clipping, seed, encoder, model or examples differ); \
             use the same settings to resume or another output folder",
        ));
    }
    let mut saved: HashMap<&str, &Tensor> = c.params.iter().map(|(n, t)| (n.as_str(), t)).collect();
    for (name, var) in names.iter().zip(vars) {
        let Some(t) = saved.remove(name.as_str()) else {
            return Err(Error::format(
                path,
                format!("checkpoint: missing tensor `{name}`"),
            ));
        };
        if t.dims() != var.dims() {
            return Err(Error::format(
                path,
                format!(
                    "checkpoint: tensor `{name}` is {:?}, the run's is {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        set_var(var, t)?;
    }
    if let Some(extra) = saved.keys().next() {
        return Err(Error::format(
            path,
            format!("checkpoint: unexpected tensor `{extra}` (not a parameter of this run)"),
        ));
    }
    Ok(())
}
