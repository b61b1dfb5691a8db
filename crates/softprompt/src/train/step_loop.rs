//! The one training loop: prompt tuning, P-tuning and model tuning are configurations of
//! [`StepLoop`] (which vars are trained, how a micro-batch's loss is computed, how the state is
//! checkpointed, whether the dev set is evaluated during training).
//!
//! One optimizer step reads `grad_accum` batches of `batch_size` examples (in the data order of
//! [`epoch_batches`]); its loss is the mean NLL over all the target tokens of those batches
//! (PEFT's token mean, also across the accumulated batches), so accumulation gives the gradient
//! of the large batch. The gradients are summed over the micro-batches, made final
//! ([`final_gradients`]), checked, optionally clipped to a global norm, and handed to the
//! optimizer with the schedule's learning rate.
//!
//! Dev evaluation ([`DevHook`]) runs every `eval_every` steps and after the last; the best
//! evaluation by [`SelectBy`] (dev loss, or dev accuracy with ties going to the lower dev loss)
//! is kept, with a copy of the trained tensors, and `patience` evaluations without a better one
//! stop the run. Every `checkpoint_every` steps and at the end the state is checkpointed (see
//! [`CheckpointKind`]) and the loss plotted; `metrics.jsonl` gets a line every `log_every` steps.

use crate::batch::Example;
use crate::train::config::{SelectBy, TrainConfig};
use crate::train::data::epoch_batches;
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::optim::{clip_grad_norm, Optimizer};
use crate::train::plot;
use crate::train::run_state::{BestEval, CheckpointKind, RunState};
use crate::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use std::time::Instant;

/// The loss of one micro-batch.
pub(crate) struct BatchLoss {
    /// NLL of each target token, `[M]`, differentiable with respect to the trained vars.
    pub nll: Tensor,
    /// Non-pad tokens (sources and targets) the batch held, for the throughput.
    pub tokens: usize,
}

/// A dev metric of given values of the trained vars (one tensor per var, in their order),
/// computed without gradient.
pub(crate) type DevMetric<'a> = &'a dyn Fn(&[Tensor]) -> Result<f64>;

/// Dev evaluation during training.
pub(crate) struct DevHook<'a> {
    /// Mean target-token NLL on the dev set.
    pub loss: DevMetric<'a>,
    /// Dev accuracy, for a task with classes.
    pub accuracy: Option<DevMetric<'a>>,
}

/// A training run: see the module doc.
pub(crate) struct StepLoop<'a> {
    /// Steps, batching, accumulation, clipping, schedule, evaluation, patience, selection,
    /// checkpoint and log cadence, output folder, resume, quiet.
    pub cfg: &'a TrainConfig,
    /// The trained vars, in the optimizer's (and the checkpoint's) order.
    pub vars: Vec<Var>,
    pub optimizer: Box<dyn Optimizer>,
    /// The loss of a micro-batch of examples.
    pub loss: &'a dyn Fn(&[Example]) -> Result<BatchLoss>,
    pub dev: Option<DevHook<'a>>,
    pub checkpoint: CheckpointKind<'a>,
    /// [`crate::train::run_id`] of the run, stored in and checked against its checkpoint.
    pub config_hash: &'a str,
    pub device: &'a Device,
}

/// What [`StepLoop::run`] did.
pub(crate) struct LoopOutcome {
    pub state: RunState,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<usize>,
    /// Loss of the last step of this invocation.
    pub final_loss: Option<f64>,
    /// Every metrics line, resumed ones included.
    pub log: MetricsLog,
}

impl StepLoop<'_> {
    /// Trains on `train` from the checkpoint of `cfg.output` (with `cfg.resume`) or from the
    /// vars' current values, up to `cfg.steps` steps or early stopping.
    pub fn run(mut self, train: &[Example]) -> Result<LoopOutcome> {
        if train.is_empty() {
            bail!("the training set is empty");
        }
        let cfg = self.cfg;
        let out = &cfg.output;
        let resumed =
            self.checkpoint
                .resume(out, cfg.resume, self.config_hash, &self.vars, self.device)?;
        let mut state = RunState::default();
        let mut resumed_from = None;
        if let Some(r) = resumed {
            self.optimizer.load_state(&r.optimizer)?;
            resumed_from = Some(r.state.step);
            state = r.state;
        }
        let mut log = MetricsLog::open(out, resumed_from)?;
        self.recover_best_accuracy(&mut state, &log)?;

        let bar = progress_bar(cfg, state.step);
        let mut data = DataCursor::new(train, cfg, state.epoch);
        let mut final_loss = None;
        let mut pending = LogAccumulator::default();
        let mut last_accuracy: Option<f64> = None;

        while state.step < cfg.steps && !state.stopped_early {
            let started = Instant::now();
            let micro = data.next_step(&mut state, cfg.grad_accum);
            let (mut grads, loss_sum, n_tokens) = self.accumulate(&micro)?;
            if !loss_sum.is_finite() {
                bail!(
                    "training diverged at step {}: the loss is {loss_sum} (try a lower learning \
                     rate); the last checkpoint is intact",
                    state.step + 1
                );
            }
            let grad_norm = match cfg.clip {
                Some(max) => clip_grad_norm(&mut grads, &self.vars, max)?,
                None => global_norm(&grads, &self.vars)?,
            };
            if !grad_norm.is_finite() {
                bail!(
                    "the gradient is not finite at step {} (norm {grad_norm})",
                    state.step + 1
                );
            }
            let lr = cfg.schedule.lr_at(state.step);
            if self.optimizer.step(&grads, lr)? == 0 {
                bail!("no trained parameter received a gradient");
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
            let due = last || (cfg.eval_every > 0 && state.step.is_multiple_of(cfg.eval_every));
            let scores = match &self.dev {
                Some(dev) if due => Some(self.evaluate(dev, &mut state)?),
                _ => None,
            };
            let (dev_loss, dev_accuracy) = match scores {
                Some((loss, accuracy)) => (Some(loss), accuracy),
                None => (None, None),
            };
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
            if dev_accuracy.is_some() {
                last_accuracy = dev_accuracy;
            }
            bar.set_position(state.step as u64);
            bar.set_message(progress_message(
                loss_sum,
                &state,
                last_accuracy,
                tokens_per_s,
            ));
            let save = last
                || state.stopped_early
                || (cfg.checkpoint_every > 0 && state.step.is_multiple_of(cfg.checkpoint_every));
            if save {
                self.checkpoint.save(
                    out,
                    &state,
                    &self.vars,
                    self.optimizer.state()?,
                    self.config_hash,
                )?;
                plot::plot_loss(&log.rows, &out.join(plot::FILE))?;
            }
        }
        bar.finish_and_clear();
        Ok(LoopOutcome {
            state,
            resumed_from,
            final_loss,
            log,
        })
    }

    /// Forward and backward passes of the micro-batches of one step: the summed gradient of
    /// each var, the step's loss (the mean over all their target tokens) and the non-pad
    /// tokens read.
    fn accumulate(&self, micro: &[Vec<Example>]) -> Result<(GradStore, f64, usize)> {
        let target_tokens: usize = micro.iter().flatten().map(|e| e.target.len()).sum();
        let scale = 1.0 / target_tokens as f64;
        let mut grads = GradStore::default();
        let mut loss_sum = 0f64;
        let mut n_tokens = 0usize;
        for examples in micro {
            let batch = (self.loss)(examples)?;
            n_tokens += batch.tokens;
            // This batch's share of the step's mean.
            let loss = batch.nll.sum_all()?.affine(scale, 0.0)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut batch_grads = loss.backward()?;
            for var in &self.vars {
                if let Some(g) = batch_grads.remove(var.as_tensor()) {
                    let sum = match grads.get(var.as_tensor()) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    grads.insert(var.as_tensor(), sum);
                }
            }
        }
        if !self.vars.iter().any(|v| grads.get(v.as_tensor()).is_some()) {
            bail!(
                "the trained parameters received no gradient: the model's forward pass goes \
                 through an operation without a backward pass (e.g. a fused candle kernel)"
            );
        }
        final_gradients(&mut grads, &self.vars)?;
        Ok((grads, loss_sum, n_tokens))
    }

    /// Evaluates the vars' current values on the dev set and updates the best evaluation and
    /// the early-stopping counter; returns the dev loss and accuracy.
    fn evaluate(&self, dev: &DevHook<'_>, state: &mut RunState) -> Result<(f64, Option<f64>)> {
        let params: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = (dev.loss)(&params)?;
        let accuracy = match dev.accuracy {
            Some(accuracy) => Some(accuracy(&params)?),
            None => None,
        };
        let improved = match (&state.best, self.cfg.select_by) {
            (None, _) => true,
            (Some(b), SelectBy::Loss) => loss < b.dev_loss,
            (Some(b), SelectBy::Accuracy) => match (accuracy, b.dev_accuracy) {
                (Some(a), Some(best)) => a > best || (a == best && loss < b.dev_loss),
                // validate() makes sure the accuracy is measured.
                _ => loss < b.dev_loss,
            },
        };
        if improved {
            state.best = Some(BestEval {
                step: state.step,
                dev_loss: loss,
                dev_accuracy: accuracy,
                params: self
                    .vars
                    .iter()
                    .map(|v| Ok(v.as_tensor().detach().copy()?))
                    .collect::<Result<_>>()?,
            });
            state.evals_since_best = 0;
        } else {
            state.evals_since_best += 1;
            if self
                .cfg
                .patience
                .is_some_and(|p| state.evals_since_best >= p)
            {
                state.stopped_early = true;
            }
        }
        Ok((loss, accuracy))
    }

    /// A checkpoint keeps the best evaluation's tensors and dev loss; its accuracy is in the
    /// metrics line of its step, or is measured again (same tensors, data and batching).
    fn recover_best_accuracy(&self, state: &mut RunState, log: &MetricsLog) -> Result<()> {
        let (Some(best), Some(accuracy)) = (
            state.best.as_mut(),
            self.dev.as_ref().and_then(|d| d.accuracy),
        ) else {
            return Ok(());
        };
        let logged = log
            .rows
            .iter()
            .rev()
            .find(|r| r.step == best.step)
            .and_then(|r| r.dev_accuracy);
        best.dev_accuracy = Some(match logged {
            Some(a) => a,
            None => accuracy(&best.params)?,
        });
        Ok(())
    }
}

/// Where a run is in the data order ([`epoch_batches`]): the batches of one step after the
/// other, across epochs, at the position kept in [`RunState`].
struct DataCursor<'a> {
    train: &'a [Example],
    /// Tokens of each example (source and target), which the order buckets by.
    lengths: Vec<usize>,
    batch_size: usize,
    seed: u64,
    /// The batches of the current epoch (example indices).
    plan: Vec<Vec<usize>>,
}

impl<'a> DataCursor<'a> {
    fn new(train: &'a [Example], cfg: &TrainConfig, epoch: usize) -> Self {
        let lengths: Vec<usize> = train
            .iter()
            .map(|e| e.source.len() + e.target.len())
            .collect();
        let plan = epoch_batches(&lengths, cfg.batch_size, cfg.seed, epoch);
        DataCursor {
            train,
            lengths,
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            plan,
        }
    }

    /// The next `n` batches, moving `state`'s epoch and position past them.
    fn next_step(&mut self, state: &mut RunState, n: usize) -> Vec<Vec<Example>> {
        let mut micro = Vec::with_capacity(n);
        for _ in 0..n {
            if state.position >= self.plan.len() {
                state.epoch += 1;
                state.position = 0;
                self.plan = epoch_batches(&self.lengths, self.batch_size, self.seed, state.epoch);
            }
            let batch = self
                .plan
                .get(state.position)
                .map_or(&[][..], |b| b.as_slice());
            micro.push(batch.iter().map(|&i| self.train[i].clone()).collect());
            state.position += 1;
        }
        micro
    }
}

/// The one place where a step's gradients are final (summed over its micro-batches) and not
/// yet clipped: training on several machines would all-reduce (average) each var's gradient
/// here, so that clipping, the divergence checks and the optimizer see the global gradient.
fn final_gradients(_grads: &mut GradStore, _vars: &[Var]) -> Result<()> {
    Ok(())
}

/// The global L2 norm of the gradients of `vars` (vars without one count as zero).
fn global_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sum_sq = 0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum_sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sum_sq.sqrt())
}

/// Mean of the step losses since the previous metrics line.
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

fn progress_message(
    loss: f64,
    state: &RunState,
    last_accuracy: Option<f64>,
    tokens_per_s: f64,
) -> String {
    let mut message = format!("loss {loss:.4}");
    if let Some(b) = &state.best {
        message.push_str(&format!("  best dev loss {:.4}", b.dev_loss));
        if let Some(a) = b.dev_accuracy {
            message.push_str(&format!(" acc {:.1}% (step {})", 100.0 * a, b.step));
        }
    }
    if let Some(a) = last_accuracy {
        message.push_str(&format!("  last dev acc {:.1}%", 100.0 * a));
    }
    message.push_str(&format!("  {tokens_per_s:.0} tok/s"));
    message
}

#[cfg(test)]
mod tests {
    //! The loop on a model-free loss: one scalar var `w`, each target token `t` contributing
    //! `(w - t)^2`, so the step's loss and gradient have closed forms.
    use super::*;
    use crate::train::metrics;
    use crate::train::optim::{AdamWConfig, OptimizerConfig};
    use crate::train::schedule::Schedule;

    /// Four examples whose targets have 3, 1, 1 and 1 tokens.
    fn examples() -> Vec<Example> {
        [vec![1u32, 1, 1], vec![3], vec![5], vec![7]]
            .into_iter()
            .map(|target| Example {
                source: vec![0],
                target,
            })
            .collect()
    }

    fn config(out: &std::path::Path) -> TrainConfig {
        let mut cfg = TrainConfig::paper(out);
        cfg.optimizer = OptimizerConfig::AdamW(AdamWConfig::new(0.0));
        cfg.schedule = Schedule::constant(0.1);
        cfg.steps = 1;
        cfg.batch_size = 2;
        cfg.grad_accum = 2;
        cfg.quiet = true;
        cfg
    }

    /// Runs `cfg` on [`examples`] with `nll` computing each token's loss from `w` `[1]`.
    fn run(
        cfg: &TrainConfig,
        nll: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<LoopOutcome> {
        let device = Device::Cpu;
        let w = Var::zeros(1, DType::F32, &device)?;
        let names = vec!["w".to_string()];
        let loss = |examples: &[Example]| -> Result<BatchLoss> {
            let targets: Vec<f32> = examples
                .iter()
                .flat_map(|e| e.target.iter().map(|&t| t as f32))
                .collect();
            let t = Tensor::new(targets.as_slice(), &device)?; // [M]
            let w = w.as_tensor().broadcast_as(t.shape())?; // [M]
            Ok(BatchLoss {
                nll: nll(&w, &t)?,
                tokens: t.dim(0)?,
            })
        };
        StepLoop {
            cfg,
            vars: vec![w.clone()],
            optimizer: cfg.optimizer.build(vec![w.clone()])?,
            loss: &loss,
            dev: None,
            checkpoint: CheckpointKind::Params {
                method: "test",
                names: &names,
            },
            config_hash: "test",
            device: &device,
        }
        .run(&examples())
    }

    /// Two micro-batches of two examples make one step whose loss is the mean over all six
    /// target tokens (not the mean of the batches' means) and whose gradient is that mean's.
    #[test]
    fn accumulation_gives_the_token_mean_of_the_whole_step() {
        let dir = tempfile::tempdir().unwrap();
        let run = run(&config(dir.path()), &|w, t| Ok((w - t)?.sqr()?)).unwrap();
        assert_eq!(
            (run.state.step, run.state.epoch, run.state.position),
            (1, 0, 2)
        );
        let rows = metrics::read(&dir.path().join(metrics::FILE)).unwrap();
        let tokens = [1.0, 1.0, 1.0, 3.0, 5.0, 7.0f64];
        let n = tokens.len() as f64;
        // At w = 0: loss mean(t^2), gradient mean(-2t).
        let loss = tokens.iter().map(|t| t * t).sum::<f64>() / n;
        let grad = 2.0 * tokens.iter().sum::<f64>() / n;
        assert_eq!(rows.len(), 1);
        assert!(
            (rows[0].loss - loss).abs() < 1e-5,
            "{} vs {loss}",
            rows[0].loss
        );
        assert!(
            (rows[0].grad_norm - grad).abs() < 1e-5,
            "{} vs {grad}",
            rows[0].grad_norm
        );
    }

    #[test]
    fn a_non_finite_loss_stops_the_run() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(&config(dir.path()), &|w, t| Ok((w - t)?.log()?.sqr()?))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("diverged at step 1"), "{err}");
    }

    #[test]
    fn a_loss_without_gradient_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(&config(dir.path()), &|w, t| Ok((w.detach() - t)?.sqr()?))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no gradient"), "{err}");
    }
}
