//! Soft prompts: the trainable `[N, D]` matrix `P` prepended to the input embeddings,
//! `[P; embed(X)]`, while the backbone stays frozen.

mod encoder;
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

/// The prompt-tuning code's `prefix_prompt_after_bos` (decoder-only models): the model sees
/// `[embed(BOS); P; embed(X)]` instead of `[P; embed(X)]`. Returns the effective prefix
/// `[embed(BOS) (detached); prompt]`, `[N+1, D]`, to be used wherever the prompt `[N, D]`
/// would be (batches then made with `N + 1` prompt positions), with each source's own
/// leading BOS removed by [`strip_leading_bos`] so BOS appears once. The gradient reaches
/// `prompt`; the BOS row is a frozen embedding.
pub fn prefix_after_bos(prompt: &Tensor, backbone: &crate::model::Backbone) -> Result<Tensor> {
    let bos = after_bos_token(backbone.info())?;
    let (_n, d) = prompt.dims2()?;
    let ids = Tensor::new(&[[bos]], prompt.device())?; // [1, 1]
    let row = backbone.embed(&ids)?.detach(); // [1, 1, D]
    let row = row.reshape((1, d))?.to_dtype(prompt.dtype())?; // [1, D]
    Ok(Tensor::cat(&[&row, prompt], 0)?) // [N+1, D]
}

/// The BOS id that [`prefix_after_bos`] places before the prompt; an error when `info`'s
/// model cannot take the prompt after BOS (encoder-decoder, or no BOS token).
pub fn after_bos_token(info: &crate::model::ModelInfo) -> Result<u32> {
    if info.is_encoder_decoder() {
        crate::bail!(
            "placing the prompt after BOS is for decoder-only models; this one is encoder-decoder"
        );
    }
    match info.bos_token_id {
        Some(bos) => Ok(bos),
        None => crate::bail!(
            "placing the prompt after BOS needs a BOS token, but model `{}` has no bos_token_id",
            info.name
        ),
    }
}

/// What the model sees before the input for a prompt `[N, D]` trained with
/// `after_bos` (`task.json`'s `prompt_after_bos`): `[embed(BOS); prompt]` `[N+1, D]`, else
/// the prompt itself. Training, evaluation and the server all place prompts with this.
pub fn model_prefix(prompt: &Tensor, backbone: &crate::model::Backbone, after_bos: bool) -> Result<Tensor> {
    if after_bos {
        prefix_after_bos(prompt, backbone)
    } else {
        Ok(prompt.clone())
    }
}

/// Removes `source`'s first token when it is `bos` (see [`prefix_after_bos`]).
pub fn strip_leading_bos(source: &mut Vec<u32>, bos: u32) {
    if source.first() == Some(&bos) {
        source.remove(0);
    }
}
