//! Learning-rate schedules: the learning rate of optimizer step `s` (0-based: `s = 0` is the first
//! update), for `lr` the base rate, `w` the warmup steps, `T` the total steps and `lr_end` the final
//! rate of a decay:
//!
//! ```text
//! warmup, s < w:   lr * (s + 1) / w                 (the first step is not wasted at 0; step w-1 has lr)
//! then, by kind:
//!   Constant:      lr
//!   Linear:        lr_end + (lr - lr_end) * (1 - q)
//!   Cosine:        lr_end + (lr - lr_end) * (1 + cos(pi * q)) / 2
//!   with q = min(1, (s - w) / max(1, T - w))        (progress through the decay, 0 at s = w)
//! ```
//!
//! After warmup the decays equal transformers' `get_linear_schedule_with_warmup` /
//! `get_cosine_schedule_with_warmup` (with `lr_end` = 0); past `T` they stay at `lr_end`.
//! The prompt-tuning paper uses `Constant` at 0.3 with no warmup.

use crate::{bail, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The base learning rate (reached at the end of warmup).
    pub lr: f64,
    /// Number of linear warmup steps (0: none).
    pub warmup_steps: usize,
    pub decay: Decay,
    /// Total number of steps `T` (end of the decay; unused by `Constant`).
    pub total_steps: usize,
    /// Learning rate at the end of a decay (unused by `Constant`).
    pub lr_end: f64,
}

impl Schedule {
    /// `lr` at every step.
    pub fn constant(lr: f64) -> Self {
        Schedule {
            lr,
            warmup_steps: 0,
            decay: Decay::Constant,
            total_steps: 0,
            lr_end: lr,
        }
    }

    /// Linear warmup over `warmup_steps`, then `lr`.
    pub fn warmup_constant(lr: f64, warmup_steps: usize) -> Self {
        Schedule {
            warmup_steps,
            ..Schedule::constant(lr)
        }
    }

    /// Optional warmup, then linear decay to 0 at `total_steps`.
    pub fn linear(lr: f64, warmup_steps: usize, total_steps: usize) -> Self {
        Schedule {
            lr,
            warmup_steps,
            decay: Decay::Linear,
            total_steps,
            lr_end: 0.0,
        }
    }

    /// Optional warmup, then cosine decay to 0 at `total_steps`.
    pub fn cosine(lr: f64, warmup_steps: usize, total_steps: usize) -> Self {
        Schedule {
            lr,
            warmup_steps,
            decay: Decay::Cosine,
            total_steps,
            lr_end: 0.0,
        }
    }

    /// Checks the settings (finite, non-negative rates; a decay needs `total_steps > warmup_steps`).
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            bail!("schedule: learning rate must be a finite number >= 0, got {}", self.lr);
        }
        if self.decay != Decay::Constant {
            if !(self.lr_end.is_finite() && self.lr_end >= 0.0) {
                bail!(
                    "schedule: final learning rate must be a finite number >= 0, got {}",
                    self.lr_end
                );
            }
            if self.total_steps <= self.warmup_steps {
                bail!(
                    "schedule: {:?} decay needs total steps ({}) > warmup steps ({})",
                    self.decay,
                    self.total_steps,
                    self.warmup_steps
                );
            }
        }
        Ok(())
    }

    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let q = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Linear => self.lr_end + (self.lr - self.lr_end) * (1.0 - q),
            Decay::Cosine => self.lr_end + (self.lr - self.lr_end) * 0.5 * (1.0 + (std::f64::consts::PI * q).cos()),
        }
    }
}
