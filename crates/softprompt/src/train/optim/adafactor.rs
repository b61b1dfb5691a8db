//! Adafactor (Shazeer & Stern 2018), as the prompt-tuning paper trains its prompts: T5X's Adafactor
//! (`t5x/adafactor.py`, a port of flax's) with `multiply_by_parameter_scale = False`, which computes
//! the same update as `optax.adafactor` (checked against optax in tests/optim.rs).
//!
//! For each var `p` with gradient `g` (float32), at its `t`-th update (`t` = 1, 2, ...):
//!
//! ```text
//! beta2   = 1 - t^(-decay_rate)                      (0 at t = 1: the first step keeps no history)
//! g2      = g² + epsilon1                            (epsilon1 added before any averaging)
//! factored (see below), axes a (the smaller) and b (the larger of the two largest axes):
//!   v_row = beta2 * v_row + (1 - beta2) * mean_b(g2)          [p's shape with axis b -> 1]
//!   v_col = beta2 * v_col + (1 - beta2) * mean_a(g2)          [p's shape with axis a -> 1]
//!   y     = g * (v_row / mean_a(v_row))^-1/2 * v_col^-1/2
//! not factored:
//!   v     = beta2 * v + (1 - beta2) * g2                      [p's shape]
//!   y     = g * v^-1/2
//! clipping (threshold d): y = y / max(1, rms(y) / d)      (rms over all elements of the var)
//! u       = lr * y
//! momentum (b1, optional): m = b1 * m + (1 - b1) * u;  u = m   (no bias correction)
//! p       = p - u - weight_decay * p
//! ```
//!
//! Weight decay is NOT scaled by the learning rate: T5X computes `(1 - weight_decay_rate) * p -
//! subtrahend` and optax adds `weight_decay_rate * p` after its learning-rate scaling; both are the
//! line above. With the recipe's 1e-5 a var shrinks by a factor 1 - 1e-5 every step, whatever `lr`.
//!
//! Factoring rule (T5X's heuristic = optax's `_factored_dims`): a var is factored when it has at
//! least 2 axes and the second largest axis has at least `min_dim_size_to_factor` (default 128)
//! elements; the two largest axes are then `a` (second largest) and `b` (largest), ties going to
//! the earlier axis. A `[100, 768]` prompt is therefore NOT factored with the default (100 < 128):
//! it keeps a full second moment `v`, like Adam without momentum. Vars of 3 or more axes are
//! factored over their two largest axes as optax does (T5X requires explicit rules for those).
//!
//! Not implemented: `multiply_by_parameter_scale` (scaling the step by the var's RMS; the prompt
//! tuning recipe turns it off), T5X's logical-axis factor rules, `step_offset`.

use super::{check_lr, check_no_extra, check_vars, grad_f32, take_tensor, Optimizer, OptimizerState};
use crate::{bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// Adafactor settings. [`Default`] is the prompt-tuning recipe (Lester et al. 2021, T5X gin files):
/// decay 0.8, epsilon1 1e-30, clipping 1.0, no momentum, weight decay 1e-5, factoring from 128.
/// The learning rate (0.3 constant in the paper) is given to every `step`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdafactorConfig {
    /// Exponent of the second-moment decay schedule, `beta2_t = 1 - t^-decay_rate`.
    pub decay_rate: f64,
    /// Added to the squared gradient before it is averaged.
    pub epsilon1: f64,
    /// Update clipping: the update's RMS is scaled down to this value when above it. `None`: off.
    pub clipping_threshold: Option<f64>,
    /// First-moment coefficient (`beta1`); `None`: no momentum (no extra state).
    pub momentum: Option<f64>,
    /// Per-step decay of the weights, not multiplied by the learning rate (see the module doc).
    pub weight_decay: f64,
    /// Whether 2+-axis vars may use factored second moments at all.
    pub factored: bool,
    /// A var is factored only if its second largest axis has at least this many elements.
    pub min_dim_size_to_factor: usize,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        AdafactorConfig {
            decay_rate: 0.8,
            epsilon1: 1e-30,
            clipping_threshold: Some(1.0),
            momentum: None,
            weight_decay: 1e-5,
            factored: true,
            min_dim_size_to_factor: 128,
        }
    }
}

impl AdafactorConfig {
    fn validate(&self) -> Result<()> {
        if !(self.decay_rate.is_finite() && self.decay_rate > 0.0) {
            bail!("adafactor: decay_rate must be > 0, got {}", self.decay_rate);
        }
        if !(self.epsilon1.is_finite() && self.epsilon1 >= 0.0) {
            bail!("adafactor: epsilon1 must be >= 0, got {}", self.epsilon1);
        }
        if let Some(c) = self.clipping_threshold {
            if !(c.is_finite() && c > 0.0) {
                bail!("adafactor: clipping_threshold must be > 0, got {c}");
            }
        }
        if let Some(b1) = self.momentum {
            if !(0.0..1.0).contains(&b1) {
                bail!("adafactor: momentum must be in [0, 1), got {b1}");
            }
        }
        if !(0.0..1.0).contains(&self.weight_decay) {
            bail!("adafactor: weight_decay must be in [0, 1), got {}", self.weight_decay);
        }
        Ok(())
    }

    /// The axes `(a, b)` a var of this shape is factored over (`a` the smaller), or `None`.
    pub fn factored_dims(&self, shape: &[usize]) -> Option<(usize, usize)> {
        if !self.factored || shape.len() < 2 {
            return None;
        }
        let mut order: Vec<usize> = (0..shape.len()).collect();
        order.sort_by_key(|&i| shape[i]); // stable: ties keep the earlier axis first
        let (a, b) = (order[order.len() - 2], order[order.len() - 1]);
        if shape[a] < self.min_dim_size_to_factor {
            return None;
        }
        Some((a, b))
    }
}

/// Second-moment statistics of one var.
enum Second {
    /// `row`: p's shape with axis `b` set to 1; `col`: with axis `a` set to 1.
    Factored {
        a: usize,
        b: usize,
        row: Tensor,
        col: Tensor,
    },
    Full {
        v: Tensor,
    },
}

struct VarState {
    /// Number of updates applied to this var.
    step: u64,
    second: Second,
    /// Momentum, p's shape (only with `momentum`).
    m: Option<Tensor>,
}

pub struct Adafactor {
    vars: Vec<Var>,
    config: AdafactorConfig,
    states: Vec<VarState>,
}

fn with_axis_one(shape: &[usize], axis: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[axis] = 1;
    s
}

impl Adafactor {
    pub fn new(vars: Vec<Var>, config: AdafactorConfig) -> Result<Self> {
        config.validate()?;
        check_vars(&vars)?;
        let mut states = Vec::with_capacity(vars.len());
        for var in &vars {
            let (shape, dev) = (var.dims(), var.device());
            let second = match config.factored_dims(shape) {
                Some((a, b)) => Second::Factored {
                    a,
                    b,
                    row: Tensor::zeros(with_axis_one(shape, b), DType::F32, dev)?,
                    col: Tensor::zeros(with_axis_one(shape, a), DType::F32, dev)?,
                },
                None => Second::Full {
                    v: Tensor::zeros(shape, DType::F32, dev)?,
                },
            };
            let m = match config.momentum {
                Some(_) => Some(Tensor::zeros(shape, DType::F32, dev)?),
                None => None,
            };
            states.push(VarState { step: 0, second, m });
        }
        Ok(Adafactor { vars, config, states })
    }

    pub fn config(&self) -> &AdafactorConfig {
        &self.config
    }

    /// Whether var `i` uses factored second moments.
    pub fn is_factored(&self, i: usize) -> bool {
        matches!(self.states.get(i).map(|s| &s.second), Some(Second::Factored { .. }))
    }
}

impl Optimizer for Adafactor {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<usize> {
        check_lr(lr)?;
        let cfg = &self.config;
        let mut updated = 0;
        for (i, (var, st)) in self.vars.iter().zip(self.states.iter_mut()).enumerate() {
            let Some(g) = grad_f32(grads, var, i)? else { continue };
            let t = st.step + 1;
            let beta2 = 1.0 - (t as f64).powf(-cfg.decay_rate);
            let mix = 1.0 - beta2;
            let g2 = g.sqr()?.affine(1.0, cfg.epsilon1)?;
            let y = match &mut st.second {
                Second::Factored { a, b, row, col } => {
                    let new_row = (row.affine(beta2, 0.0)? + g2.mean_keepdim(*b)?.affine(mix, 0.0)?)?;
                    let new_col = (col.affine(beta2, 0.0)? + g2.mean_keepdim(*a)?.affine(mix, 0.0)?)?;
                    let row_mean = new_row.mean_keepdim(*a)?; // [1, 1] for a matrix
                    let row_factor = new_row.broadcast_div(&row_mean)?.sqrt()?.recip()?;
                    let col_factor = new_col.sqrt()?.recip()?;
                    let y = g.broadcast_mul(&row_factor)?.broadcast_mul(&col_factor)?;
                    *row = new_row;
                    *col = new_col;
                    y
                }
                Second::Full { v } => {
                    let new_v = (v.affine(beta2, 0.0)? + g2.affine(mix, 0.0)?)?;
                    let y = (&g * new_v.sqrt()?.recip()?)?;
                    *v = new_v;
                    y
                }
            };
            let y = match cfg.clipping_threshold {
                Some(d) => {
                    let rms = y.sqr()?.mean_all()?.sqrt()?; // []
                    let denom = (rms / d)?.maximum(1.0)?;
                    y.broadcast_div(&denom)?
                }
                None => y,
            };
            let mut u = y.affine(lr, 0.0)?;
            if let (Some(b1), Some(m)) = (cfg.momentum, st.m.as_mut()) {
                let new_m = (m.affine(b1, 0.0)? + u.affine(1.0 - b1, 0.0)?)?;
                u = new_m.clone();
                *m = new_m;
            }
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let new_p = if cfg.weight_decay != 0.0 {
                (&p - (u + p.affine(cfg.weight_decay, 0.0)?)?)?
            } else {
                (&p - u)?
            };
            var.set(&new_p.to_dtype(var.dtype())?)?;
            st.step = t;
            updated += 1;
        }
        Ok(updated)
    }

    fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Keys per var `i`: `adafactor.{i}.step` (scalar), `adafactor.{i}.v_row` and
    /// `adafactor.{i}.v_col` (factored) or `adafactor.{i}.v`, and `adafactor.{i}.m` (momentum).
    fn state(&self) -> Result<OptimizerState> {
        let mut out = OptimizerState::default();
        for (i, st) in self.states.iter().enumerate() {
            out.scalars.insert(format!("adafactor.{i}.step"), st.step as f64);
            match &st.second {
                Second::Factored { row, col, .. } => {
                    out.tensors.insert(format!("adafactor.{i}.v_row"), row.copy()?);
                    out.tensors.insert(format!("adafactor.{i}.v_col"), col.copy()?);
                }
                Second::Full { v } => {
                    out.tensors.insert(format!("adafactor.{i}.v"), v.copy()?);
                }
            }
            if let Some(m) = &st.m {
                out.tensors.insert(format!("adafactor.{i}.m"), m.copy()?);
            }
        }
        Ok(out)
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        let (mut used, mut scalars_used) = (Vec::new(), Vec::new());
        let mut new_states = Vec::with_capacity(self.vars.len());
        for (i, (var, old)) in self.vars.iter().zip(&self.states).enumerate() {
            let shape = var.dims();
            let like = var.as_tensor();
            let key = format!("adafactor.{i}.step");
            let step = state.count(&key)?;
            scalars_used.push(key);
            let second = match &old.second {
                Second::Factored { a, b, .. } => Second::Factored {
                    a: *a,
                    b: *b,
                    row: take_tensor(
                        state,
                        &format!("adafactor.{i}.v_row"),
                        &with_axis_one(shape, *b),
                        like,
                        &mut used,
                    )?,
                    col: take_tensor(
                        state,
                        &format!("adafactor.{i}.v_col"),
                        &with_axis_one(shape, *a),
                        like,
                        &mut used,
                    )?,
                },
                Second::Full { .. } => Second::Full {
                    v: take_tensor(state, &format!("adafactor.{i}.v"), shape, like, &mut used)?,
                },
            };
            let m = match &old.m {
                Some(_) => Some(take_tensor(state, &format!("adafactor.{i}.m"), shape, like, &mut used)?),
                None => None,
            };
            new_states.push(VarState { step, second, m });
        }
        check_no_extra(state, &used, &scalars_used)?;
        self.states = new_states;
        Ok(())
    }
}
