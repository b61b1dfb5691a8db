//! AdamW as `torch.optim.AdamW` (amsgrad = false, maximize = false) computes it. For each var `p`
//! with gradient `g` (float32), at its `t`-th update (`t` = 1, 2, ...):
//!
//! ```text
//! p = p - lr * weight_decay * p            (decoupled decay, on the weights before the update)
//! m = b1 * m + (1 - b1) * g
//! v = b2 * v + (1 - b2) * g²
//! p = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! `eps` is added after the bias correction of `v`, as in torch (and optax's `adamw` with
//! `eps_root = 0`, against which tests/optim.rs checks it). Not candle-nn's `AdamW`, whose default
//! weight decay is 0.01: here the weight decay is always given explicitly.

use super::{check_lr, check_no_extra, check_vars, grad_f32, take_tensor, Optimizer, OptimizerState};
use crate::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// AdamW settings. There is no `Default`: the weight decay must be chosen (torch's default is
/// 0.01, the prompt-tuning CLI uses 0.0); [`AdamWConfig::new`] gives torch's betas and eps.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, multiplied by the learning rate of the step.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// betas (0.9, 0.999), eps 1e-8 (torch's defaults) and the given weight decay.
    pub fn new(weight_decay: f64) -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("adamw: {name} must be in [0, 1), got {b}");
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail!("adamw: eps must be >= 0, got {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("adamw: weight_decay must be >= 0, got {}", self.weight_decay);
        }
        Ok(())
    }
}

struct VarState {
    /// Number of updates applied to this var.
    step: u64,
    m: Tensor, // p's shape, f32
    v: Tensor, // p's shape, f32
}

pub struct AdamW {
    vars: Vec<Var>,
    config: AdamWConfig,
    states: Vec<VarState>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        check_vars(&vars)?;
        let mut states = Vec::with_capacity(vars.len());
        for var in &vars {
            let zeros = Tensor::zeros(var.dims(), DType::F32, var.device())?;
            states.push(VarState {
                step: 0,
                m: zeros.clone(),
                v: zeros,
            });
        }
        Ok(AdamW { vars, config, states })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<usize> {
        check_lr(lr)?;
        let c = &self.config;
        let mut updated = 0;
        for (i, (var, st)) in self.vars.iter().zip(self.states.iter_mut()).enumerate() {
            let Some(g) = grad_f32(grads, var, i)? else { continue };
            let t = st.step + 1;
            let mut p = var.as_tensor().to_dtype(DType::F32)?;
            if c.weight_decay != 0.0 {
                p = p.affine(1.0 - lr * c.weight_decay, 0.0)?;
            }
            let m = (st.m.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
            let v = (st.v.affine(c.beta2, 0.0)? + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
            let bc1 = 1.0 - c.beta1.powi(t.min(i32::MAX as u64) as i32);
            let bc2 = 1.0 - c.beta2.powi(t.min(i32::MAX as u64) as i32);
            let step_size = lr / bc1;
            let denom = v.sqrt()?.affine(1.0 / bc2.sqrt(), c.eps)?;
            let new_p = (p - (&m / &denom)?.affine(step_size, 0.0)?)?;
            var.set(&new_p.to_dtype(var.dtype())?)?;
            st.m = m;
            st.v = v;
            st.step = t;
            updated += 1;
        }
        Ok(updated)
    }

    fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Keys per var `i`: `adamw.{i}.step` (scalar), `adamw.{i}.m`, `adamw.{i}.v`.
    fn state(&self) -> Result<OptimizerState> {
        let mut out = OptimizerState::default();
        for (i, st) in self.states.iter().enumerate() {
            out.scalars.insert(format!("adamw.{i}.step"), st.step as f64);
            out.tensors.insert(format!("adamw.{i}.m"), st.m.copy()?);
            out.tensors.insert(format!("adamw.{i}.v"), st.v.copy()?);
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let (mut used, mut scalars_used) = (Vec::new(), Vec::new());
        let mut new_states = Vec::with_capacity(self.vars.len());
        for (i, var) in self.vars.iter().enumerate() {
            let key = format!("adamw.{i}.step");
            let step = state.count(&key)?;
            scalars_used.push(key);
            let like = var.as_tensor();
            let m = take_tensor(state, &format!("adamw.{i}.m"), var.dims(), like, &mut used)?;
            let v = take_tensor(state, &format!("adamw.{i}.v"), var.dims(), like, &mut used)?;
            new_states.push(VarState { step, m, v });
        }
        check_no_extra(state, &used, &scalars_used)?;
        self.states = new_states;
        Ok(())
    }
}
