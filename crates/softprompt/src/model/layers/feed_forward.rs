//! The feed-forward sub-block of a pre-norm layer: `x + down(inner(norm(x)))`, optionally
//! `x + output_norm(down(inner(norm(x))))` (Gemma).

use super::{Linear, Norm};
use crate::kernels::feed_forward::{feed_forward_block, FeedForwardArgs, FfnInner as KernelInner};
use crate::kernels::Kernels;
use crate::model::ops::Activation;
use crate::Result;
use candle_core::Tensor;

/// The first half of the branch: `[F, D]` projections of the normed input.
#[derive(Clone, Debug)]
pub enum FfnInner {
    /// `act(gate(n)) * up(n)` (SwiGLU, T5 v1.1's gated GELU).
    Gated { gate: Linear, up: Linear },
    /// `act(w(n))` (GPT-2, T5 v1.0).
    Plain(Linear),
}

/// `x [B, T, D]` -> `x + down(inner(norm(x)))`, inner width `F`, `down [D, F]`.
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub norm: Norm,
    pub inner: FfnInner,
    pub act: Activation,
    pub down: Linear,
    /// A norm of the branch output before the residual add (Gemma's post-feed-forward norm).
    pub output_norm: Option<Norm>,
}

impl FeedForward {
    /// The fused op (one candle op with a hand-written backward) where `kernels` and the
    /// operands allow it and the activation has a fused kernel, else [`Self::composite`].
    pub fn forward(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        if self.down.quantized_for(kernels, x) {
            return self.composite(kernels, x); // generation step on quantised blocks
        }
        match self.kernel_args()? {
            Some(args) if args.applies(x, kernels) => {
                let y = feed_forward_block(x, args)?;
                match &self.output_norm {
                    // The op gave the branch alone, [B, T, D].
                    Some(n) => Ok((x + n.forward(kernels, &y)?)?),
                    None => Ok(y),
                }
            }
            _ => self.composite(kernels, x),
        }
    }

    /// Whether the fused op runs on `x` (tests check the fast path is taken).
    #[cfg(test)]
    pub(crate) fn fused_applies(&self, kernels: Kernels, x: &Tensor) -> bool {
        matches!(self.kernel_args(), Ok(Some(a)) if a.applies(x, kernels))
    }

    /// The operands of the fused op (shared tensors, no copy); `None` when the activation
    /// has no fused kernel. With an output norm the op gives the branch alone.
    fn kernel_args(&self) -> Result<Option<FeedForwardArgs>> {
        let Some(act) = self.act.fused() else {
            return Ok(None);
        };
        Ok(Some(FeedForwardArgs {
            norm: self.norm.weights()?,
            inner: match &self.inner {
                FfnInner::Gated { gate, up } => KernelInner::Gated {
                    gate: gate.weights(),
                    up: up.weights(),
                },
                FfnInner::Plain(w) => KernelInner::Plain(w.weights()),
            },
            down: self.down.weights(),
            act,
            residual: self.output_norm.is_none(),
        }))
    }

    /// The sub-block composed of single ops (fused element-wise kernels where `kernels`
    /// allows): the reference the fused op is tested against.
    pub fn composite(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(kernels, x)?;
        let a = match &self.inner {
            FfnInner::Gated { gate, up } => {
                let (g, u) = (gate.forward_with(kernels, &h)?, up.forward_with(kernels, &h)?); // [B, T, F]
                self.act.apply_mul(kernels, &g, &u)?
            }
            FfnInner::Plain(w) => self.act.apply(kernels, &w.forward_with(kernels, &h)?)?,
        };
        let y = self.down.forward_with(kernels, &a)?; // [B, T, D]
        let y = match &self.output_norm {
            Some(n) => n.forward(kernels, &y)?,
            None => y,
        };
        Ok((x + y)?)
    }
}
