//! Optimisers for a list of [`Var`]s (the soft prompt is one `[N, D]` var; model tuning passes many),
//! and gradient clipping by global norm.
//!
//! * [`Adafactor`]: the prompt-tuning paper's optimiser (T5X / optax Adafactor, see `adafactor.rs`).
//! * [`AdamW`]: `torch.optim.AdamW`, update for update (see `adamw.rs`).
//!
//! Both keep their state in float32 whatever the dtype of the vars, take the learning rate per step
//! (from a [`crate::train::schedule::Schedule`]), skip vars that have no gradient in the
//! [`GradStore`] (the returned count tells the caller), and export / import all their state
//! ([`OptimizerState`]) so that a run resumed from a checkpoint is bit-identical to one that never
//! stopped.

pub mod adafactor;
pub mod adamw;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig};

use crate::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;

/// Everything an optimiser needs to continue where it stopped: named tensors (moments, float32)
/// and named scalars (step counts). Keys are `<optimizer>.<var index>.<what>`, e.g.
/// `adafactor.0.v_row`, `adamw.0.step`; the var index is the position in the list the optimiser was
/// built with, so a resumed run must build it with the same vars in the same order.
/// Tensors can be stored with safetensors; scalars are integers below 2^53, exact in JSON.
#[derive(Debug, Clone, Default)]
pub struct OptimizerState {
    pub tensors: HashMap<String, Tensor>,
    pub scalars: HashMap<String, f64>,
}

impl OptimizerState {
    /// The tensor `key`, or an error naming it.
    pub fn tensor(&self, key: &str) -> Result<&Tensor> {
        match self.tensors.get(key) {
            Some(t) => Ok(t),
            None => bail!("optimizer state: missing tensor `{key}`"),
        }
    }

    /// The scalar `key`, or an error naming it.
    pub fn scalar(&self, key: &str) -> Result<f64> {
        match self.scalars.get(key) {
            Some(v) => Ok(*v),
            None => bail!("optimizer state: missing scalar `{key}`"),
        }
    }

    /// A step count stored as a scalar (a non-negative integer).
    pub fn count(&self, key: &str) -> Result<u64> {
        let v = self.scalar(key)?;
        if !(v >= 0.0 && v.fract() == 0.0 && v < 9.0e15) {
            bail!("optimizer state: scalar `{key}` = {v} is not a step count");
        }
        Ok(v as u64)
    }
}

/// An optimiser over a fixed list of vars.
pub trait Optimizer {
    /// Updates every var that has a gradient in `grads`, with learning rate `lr`, and returns how
    /// many vars were updated; vars without a gradient are left as they are, their state unchanged.
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<usize>;
    /// The vars, in the order the optimiser was built with.
    fn vars(&self) -> &[Var];
    /// A copy of the whole state.
    fn state(&self) -> Result<OptimizerState>;
    /// Replaces the whole state (from [`Optimizer::state`] of an optimiser of the same kind built on
    /// vars of the same shapes). Keys that this optimiser does not use are an error.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// Which optimiser, with its settings; [`OptimizerConfig::build`] makes it.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerConfig {
    Adafactor(AdafactorConfig),
    AdamW(AdamWConfig),
}

impl OptimizerConfig {
    pub fn build(&self, vars: Vec<Var>) -> Result<Box<dyn Optimizer>> {
        Ok(match self {
            OptimizerConfig::Adafactor(c) => Box::new(Adafactor::new(vars, c.clone())?),
            OptimizerConfig::AdamW(c) => Box::new(AdamW::new(vars, c.clone())?),
        })
    }
}

/// Scales the gradients of `vars` in place so that their global L2 norm (over all of them together)
/// is at most `max_norm`, as `torch.nn.utils.clip_grad_norm_` does: with `norm` the norm before
/// clipping, every gradient is multiplied by `max_norm / (norm + 1e-6)` when that is below 1.
/// Vars without a gradient are ignored. Returns `norm`. A non-finite norm (NaN / inf gradients)
/// leaves the gradients untouched and is returned as is, for the caller to act on.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        bail!("clip_grad_norm: max_norm must be a positive number, got {max_norm}");
    }
    let mut sum_sq = 0.0f64;
    for var in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let s = g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            sum_sq += s as f64;
        }
    }
    let norm = sum_sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let scaled = g.affine(coef, 0.0)?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// The gradient of `var` as float32, checked against the var's shape; `None` if it has none.
pub(crate) fn grad_f32(grads: &GradStore, var: &Var, index: usize) -> Result<Option<Tensor>> {
    let Some(g) = grads.get(var.as_tensor()) else {
        return Ok(None);
    };
    if g.dims() != var.dims() {
        bail!(
            "optimizer: gradient of var {index} has shape {:?}, the var {:?}",
            g.dims(),
            var.dims()
        );
    }
    Ok(Some(g.to_dtype(DType::F32)?))
}

/// Checks a learning rate given to `step`.
pub(crate) fn check_lr(lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        bail!("optimizer: learning rate must be a finite number >= 0, got {lr}");
    }
    Ok(())
}

/// Checks the vars an optimiser is built with: floating point.
pub(crate) fn check_vars(vars: &[Var]) -> Result<()> {
    for (i, v) in vars.iter().enumerate() {
        if !v.dtype().is_float() {
            bail!(
                "optimizer: var {i} has dtype {:?}, only floating point vars can be trained",
                v.dtype()
            );
        }
    }
    Ok(())
}

/// Takes `key` from a state being loaded: a float32 tensor of `shape`, moved to `like`'s device.
pub(crate) fn take_tensor(
    state: &OptimizerState,
    key: &str,
    shape: &[usize],
    like: &Tensor,
    used: &mut Vec<String>,
) -> Result<Tensor> {
    let t = state.tensor(key)?;
    if t.dims() != shape {
        bail!(
            "optimizer state: tensor `{key}` has shape {:?}, expected {shape:?}",
            t.dims()
        );
    }
    if t.dtype() != DType::F32 {
        bail!(
            "optimizer state: tensor `{key}` has dtype {:?}, expected F32",
            t.dtype()
        );
    }
    used.push(key.to_string());
    // A copy, so the loaded state shares no storage with the caller's tensors.
    Ok(t.to_device(like.device())?.copy()?)
}

/// Fails if `state` has keys that were not used while loading it.
pub(crate) fn check_no_extra(state: &OptimizerState, used: &[String], scalars_used: &[String]) -> Result<()> {
    let mut extra: Vec<&String> = state.tensors.keys().filter(|k| !used.contains(k)).collect();
    extra.extend(state.scalars.keys().filter(|k| !scalars_used.contains(k)));
    if !extra.is_empty() {
        extra.sort();
        bail!("optimizer state: unexpected entries {extra:?} (another optimizer, or other vars?)");
    }
    Ok(())
}
