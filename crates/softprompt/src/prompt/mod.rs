//! Soft prompts: the trainable `[N, D]` matrix `P` prepended to the input embeddings,
//! `[P; embed(X)]`, while the backbone stays frozen.

pub mod encoder;
pub mod init;
pub mod peft;

pub use encoder::{EncoderKind, PromptEncoder};
pub use init::PromptInit;
pub use peft::{AdapterConfig, PeftAdapter};

use crate::Result;
use candle_core::{DType, Tensor, Var};

/// A trainable soft prompt.
pub struct SoftPrompt {
    /// `[N, D]`
    pub embeddings: Var,
}

impl SoftPrompt {
    /// Wraps initial values `[N, D]` as a trainable variable.
    pub fn new(init: &Tensor) -> Result<Self> {
        let (n, _d) = init.dims2()?;
        if n == 0 {
            crate::bail!("a soft prompt needs at least one token");
        }
        Ok(SoftPrompt {
            embeddings: Var::from_tensor(&init.to_dtype(DType::F32)?.contiguous()?)?,
        })
    }

    pub fn n_tokens(&self) -> usize {
        self.embeddings.dim(0).unwrap_or(0)
    }

    /// The prompt as a tensor `[N, D]` that tracks gradients.
    pub fn tensor(&self) -> &Tensor {
        self.embeddings.as_tensor()
    }
}

/// `[P; X]`: prepends `prompt` (`[N, D]`, shared by all rows, or `[B, N, D]`, one prompt
/// per row) to `embeds [B, T, D]` and ones to `mask [B, T]` (the prompt is never masked).
/// Returns `(embeds [B, N+T, D], mask [B, N+T])`.
pub fn prepend(prompt: &Tensor, embeds: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, _t, d) = embeds.dims3()?;
    let per_row = match prompt.rank() {
        2 => prompt.unsqueeze(0)?.broadcast_as((b, prompt.dim(0)?, d))?,
        3 => prompt.clone(),
        r => crate::bail!("prompt must be [N, D] or [B, N, D], got rank {r}"),
    };
    let n = per_row.dim(1)?;
    if per_row.dim(0)? != b || per_row.dim(2)? != d {
        crate::bail!(
            "prompt {:?} does not fit embeddings {:?}",
            prompt.dims(),
            embeds.dims()
        );
    }
    let x = Tensor::cat(&[&per_row.to_dtype(embeds.dtype())?, embeds], 1)?; // [B, N+T, D]
    let ones = Tensor::ones((b, n), mask.dtype(), mask.device())?;
    let m = Tensor::cat(&[&ones, mask], 1)?; // [B, N+T]
    Ok((x, m))
}
