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
//!
//! Data parallel ([`TrainConfig::parallel`], see [`super::parallel`]): every rank walks the same
//! data order and computes its shard of each batch ([`shard_range`]), scaled by the whole
//! step's target tokens, so the sum over the ranks ([`final_gradients`]) is the single-process
//! gradient; the losses, token counts and dev scores are summed the same way. Every rank then
//! takes the same decisions (divergence, clipping, optimizer step, best evaluation, early
//! stop) on the same numbers; rank 0 alone writes the checkpoint, metrics and plot.

use crate::batch::Example;
use crate::train::config::{SelectBy, TrainConfig};
use crate::train::data::epoch_batches;
use crate::train::metrics::{MetricsLog, StepMetrics};
use crate::train::optim::{clip_grad_norm, Optimizer};
use crate::train::parallel::{shard_range, Parallel, BUCKET_FLOATS};
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
/// computed without gradient on this rank's share of the dev set (see [`DevShare`]).
pub(crate) type DevMetric<'a> = &'a dyn Fn(&[Tensor], DevShare) -> Result<Tally>;

/// Which dev batches a rank scores: of the dev set's batches (in the metric's own order),
/// those whose index is `rank` modulo `size`. One process scores them all.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DevShare {
    pub rank: usize,
    pub size: usize,
}

impl DevShare {
    pub const ALL: DevShare = DevShare { rank: 0, size: 1 };

    /// Whether batch `index` is this rank's.
    pub fn takes(self, index: usize) -> bool {
        index % self.size.max(1) == self.rank
    }
}

/// A metric's sum and count over some examples (the metric is `sum / count`), which add up
/// over the ranks' shares.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Tally {
    pub sum: f64,
    pub count: f64,
}

impl Tally {
    pub fn mean(self) -> f64 {
        self.sum / self.count.max(1.0)
    }
}

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
    /// The loss of the examples `range` of a micro-batch (this rank's shard; all of it in one
    /// process), laid out as in the whole micro-batch ([`crate::batch::collate_shard`]).
    pub loss: &'a ShardLoss<'a>,
    pub dev: Option<DevHook<'a>>,
    pub checkpoint: CheckpointKind<'a>,
    /// [`crate::train::run_id`] of the run, stored in and checked against its checkpoint.
    pub config_hash: &'a str,
    pub device: &'a Device,
}

/// The loss of the examples `range` of a micro-batch: see [`StepLoop::loss`].
pub(crate) type ShardLoss<'a> =
    dyn Fn(&[Example], std::ops::Range<usize>) -> Result<BatchLoss> + 'a;

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
        let par = &cfg.parallel;
        check_ranks_agree(par, self.config_hash, resumed_from)?;
        let mut log = if par.is_root() {
            MetricsLog::open(out, resumed_from)?
        } else {
            MetricsLog::read_only(out, resumed_from)?
        };
        self.recover_best_accuracy(&mut state, &log)?;

        let bar = progress_bar(cfg, state.step);
        let mut data = DataCursor::new(train, cfg, state.epoch);
        let mut final_loss = None;
        let mut pending = LogAccumulator::default();
        let mut last_accuracy: Option<f64> = None;

        while state.step < cfg.steps && !state.stopped_early {
            let started = Instant::now();
            let micro = data.next_step(&mut state, cfg.grad_accum);
            let (mut grads, loss_sum, n_tokens) = self.accumulate(&micro, state.step + 1)?;
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
            let comm_s = par.take_comm_seconds();
            pending.add_comm(comm_s);
            if last
                || dev_loss.is_some()
                || state.stopped_early
                || state.step.is_multiple_of(cfg.log_every.max(1))
            {
                let (loss, comm_s) = pending.take();
                log.append(StepMetrics {
                    step: state.step,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_s,
                    step_s: Some(elapsed),
                    dev_loss,
                    dev_accuracy,
                    comm_s: (par.size() > 1).then_some(comm_s),
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
            if save && par.is_root() {
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

    /// Forward and backward passes of this rank's shards of the micro-batches of step `step`:
    /// the summed gradient of each var, the step's loss (the mean over all their target
    /// tokens) and the non-pad tokens read, all summed over the ranks.
    fn accumulate(&self, micro: &[Vec<Example>], step: usize) -> Result<(GradStore, f64, usize)> {
        let par = &self.cfg.parallel;
        // Every rank has every batch: the step's token count needs no exchange.
        let target_tokens: usize = micro.iter().flatten().map(|e| e.target.len()).sum();
        let scale = 1.0 / target_tokens as f64;
        let mut grads = GradStore::default();
        let mut loss_sum = 0f64;
        let mut n_tokens = 0usize;
        for examples in micro {
            let shard = shard_range(examples.len(), par.rank(), par.size());
            if shard.is_empty() {
                continue;
            }
            let batch = (self.loss)(examples, shard)?;
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
        let (loss_sum, n_tokens) =
            final_gradients(par, step, &mut grads, &self.vars, loss_sum, n_tokens)?;
        if !self.vars.iter().any(|v| grads.get(v.as_tensor()).is_some()) {
            bail!(
                "the trained parameters received no gradient: the model's forward pass goes \
                 through an operation without a backward pass (e.g. a fused candle kernel)"
            );
        }
        Ok((grads, loss_sum, n_tokens))
    }

    /// A dev metric summed over the ranks' shares of the dev set.
    fn dev_metric(&self, metric: DevMetric<'_>, params: &[Tensor], what: &str) -> Result<f64> {
        let par = &self.cfg.parallel;
        let share = DevShare {
            rank: par.rank(),
            size: par.size(),
        };
        let tally = metric(params, share)?;
        let mut sums = [tally.sum, tally.count];
        par.all_reduce_sum_f64(what, &mut sums)?;
        Ok(Tally {
            sum: sums[0],
            count: sums[1],
        }
        .mean())
    }

    /// Evaluates the vars' current values on the dev set and updates the best evaluation and
    /// the early-stopping counter; returns the dev loss and accuracy.
    fn evaluate(&self, dev: &DevHook<'_>, state: &mut RunState) -> Result<(f64, Option<f64>)> {
        let params: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        let loss = self.dev_metric(dev.loss, &params, "the sum of the dev loss")?;
        let accuracy = match dev.accuracy {
            Some(accuracy) => Some(self.dev_metric(accuracy, &params, "the sum of the dev accuracy")?),
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
            None => self.dev_metric(accuracy, &best.params, "the sum of the dev accuracy")?,
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
/// yet clipped: with several ranks, each var's gradient, the loss and the token count are
/// summed over the ranks here (each rank's gradient is already scaled by the whole step's
/// target tokens, so the sum is the single-process mean), so that clipping, the divergence
/// checks and the optimizer see the global gradient. Returns the global loss and tokens.
///
/// The vars are packed into buckets of about [`BUCKET_FLOATS`] (model tuning reduces every
/// weight); a var no rank computed a gradient for stays without one.
fn final_gradients(
    par: &Parallel,
    step: usize,
    grads: &mut GradStore,
    vars: &[Var],
    loss_sum: f64,
    n_tokens: usize,
) -> Result<(f64, usize)> {
    if par.size() == 1 {
        return Ok((loss_sum, n_tokens));
    }
    // [loss, tokens, whether this rank has var i's gradient...]
    let mut scalars = vec![loss_sum, n_tokens as f64];
    scalars.extend(
        vars.iter()
            .map(|v| f64::from(u8::from(grads.get(v.as_tensor()).is_some()))),
    );
    par.all_reduce_sum_f64(&format!("the sum of the losses of step {step}"), &mut scalars)?;
    let what = format!("the all-reduce of the gradients of step {step}");
    let mut start = 0;
    while start < vars.len() {
        // Consecutive vars up to a bucket (a larger var alone).
        let mut end = start + 1;
        let mut floats = vars[start].elem_count();
        while end < vars.len() && floats + vars[end].elem_count() <= BUCKET_FLOATS {
            floats += vars[end].elem_count();
            end += 1;
        }
        let bucket = &vars[start..end];
        let mut flat = Vec::with_capacity(floats);
        for var in bucket {
            match grads.get(var.as_tensor()) {
                Some(g) => flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, var.elem_count())),
            }
        }
        par.all_reduce_sum_f32(&what, &mut flat)?;
        let mut offset = 0;
        for (i, var) in bucket.iter().enumerate() {
            let n = var.elem_count();
            if scalars[2 + start + i] > 0.0 {
                let g = Tensor::from_slice(&flat[offset..offset + n], var.shape(), var.device())?
                    .to_dtype(var.dtype())?;
                grads.insert(var.as_tensor(), g);
            }
            offset += n;
        }
        start = end;
    }
    Ok((scalars[0], scalars[1] as usize))
}

/// Every rank must run the same configuration on the same data (the hash of both) and resume
/// from the same step (the output folder on a file system every rank sees).
fn check_ranks_agree(par: &Parallel, config_hash: &str, resumed_from: Option<usize>) -> Result<()> {
    if par.size() == 1 {
        return Ok(());
    }
    // 12 hex digits: 48 bits, exact in an f64.
    let hash_prefix = u64::from_str_radix(config_hash.get(..12).unwrap_or(config_hash), 16)
        .map_or(-1.0, |h| h as f64);
    let step = resumed_from.map_or(-1.0, |s| s as f64);
    let mut root = [hash_prefix, step];
    par.broadcast_f64("the check that every rank runs the same job", &mut root)?;
    if root[0] != hash_prefix {
        bail!(
            "rank {}: this rank's run (configuration and data) differs from rank 0's: every \
             rank must read the same data with the same options",
            par.rank()
        );
    }
    if root[1] != step {
        let at = |s: f64| {
            if s < 0.0 {
                "starts afresh".to_string()
            } else {
                format!("resumes at step {s}")
            }
        };
        bail!(
            "rank {} {} but rank 0 {}: every rank must see the same output folder (a shared file \
             system) to resume",
            par.rank(),
            at(step),
            at(root[1])
        );
    }
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

/// Mean of the step losses and of the seconds in collectives per step since the previous
/// metrics line.
#[derive(Default)]
struct LogAccumulator {
    sum: f64,
    comm_s: f64,
    n: usize,
}

impl LogAccumulator {
    fn add(&mut self, loss: f64) {
        self.sum += loss;
        self.n += 1;
    }
    fn add_comm(&mut self, seconds: f64) {
        self.comm_s += seconds;
    }
    /// (mean loss, mean seconds in collectives per step).
    fn take(&mut self) -> (f64, f64) {
        let n = self.n.max(1) as f64;
        let v = (self.sum / n, self.comm_s / n);
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
        let loss = |examples: &[Example], range: std::ops::Range<usize>| -> Result<BatchLoss> {
            let targets: Vec<f32> = examples[range]
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

    /// Two ranks (threads), each computing half of every batch, give the single process's
    /// losses and gradient norms (so its trained values: each step's loss is of the previous
    /// step's), the same bits on both ranks; rank 0 alone writes the log.
    #[test]
    fn two_ranks_train_as_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let one_dir = dir.path().join("one");
        let mut cfg = config(&one_dir);
        cfg.steps = 3;
        run(&cfg, &|w, t| Ok((w - t)?.sqr()?)).unwrap();
        let one_rows = metrics::read(&one_dir.join(metrics::FILE)).unwrap();

        let two_dir = dir.path().join("two");
        let mut two_cfg = cfg.clone();
        two_cfg.output = two_dir.clone();
        let ranks = crate::train::parallel::tests::on_ranks(2, move |par| {
            let mut cfg = two_cfg.clone();
            cfg.parallel = par;
            let run = run(&cfg, &|w, t| Ok((w - t)?.sqr()?)).unwrap();
            let seen: Vec<(u64, u64)> = run
                .log
                .rows
                .iter()
                .map(|r| (r.loss.to_bits(), r.grad_norm.to_bits()))
                .collect();
            seen
        });
        assert_eq!(ranks[0], ranks[1]);
        let two_rows = metrics::read(&two_dir.join(metrics::FILE)).unwrap();
        assert_eq!(two_rows.len(), 3);
        assert_eq!(one_rows.len(), 3);
        for (a, b) in one_rows.iter().zip(&two_rows) {
            assert!((a.loss - b.loss).abs() < 1e-6, "{} vs {}", a.loss, b.loss);
            assert!((a.grad_norm - b.grad_norm).abs() < 1e-6);
            assert!(b.comm_s.is_some() && a.comm_s.is_none());
        }
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
