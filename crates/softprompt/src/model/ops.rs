//! Differentiable building blocks shared by the layers, each written with candle primitives
//! (the readable reference) and run as a fused kernel of [`crate::kernels`] where the
//! [`Kernels`] policy and the operands allow it (CPU, f32, frozen weights).
//!
//! candle's own fused kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope`) have no
//! backward and silently drop gradients, so training never uses them.

use crate::kernels::weight::FrozenWeight;
use crate::kernels::{activation, frozen_matmul, loss, norm, rope as rope_kernel, softmax};
use crate::Result;
use candle_core::{DType, Device, Tensor, D};

pub use crate::kernels::Kernels;

/// `x [.., K] @ w^T` for a weight stored as `[N, K]` (nn.Linear layout) -> `[.., N]`.
///
/// When `x` needs a gradient and `w` is frozen (not a variable, not computed from one), the
/// product goes through the frozen matmul, whose backward skips the weight's gradient; same
/// forward result (candle's own matmul kernel), cheaper backward. Otherwise candle's matmul.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    over_rows(x, w.dim(0)?, b, |x2| {
        if frozen_matmul::applies(x2, w) {
            Ok(frozen_matmul::matmul_t(x2, w)?)
        } else {
            Ok(x2.matmul(&w.t()?)?)
        }
    })
}

/// Runs `product` (`[rows, K] -> [rows, N]`) on `x [.., K]` flattened to rows, adds the bias
/// `[N]` and restores the leading dims: `[.., N]`.
fn over_rows(
    x: &Tensor,
    n: usize,
    b: Option<&Tensor>,
    product: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = product(&x.reshape((rows, k))?)?; // [rows, N]
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = n;
    Ok(y.reshape(out)?)
}

/// [`linear`] on a frozen weight in any encoding: a tensor runs [`linear`] itself; stored
/// blocks are dequantised for this product only (the same values load-time dequantisation
/// gave, so the same result; a large matrix panel by panel) by the stored frozen matmul,
/// whose backward dequantises again rather than keeping an f32 copy alive.
pub fn linear_frozen(x: &Tensor, w: &FrozenWeight, b: Option<&Tensor>) -> Result<Tensor> {
    if let FrozenWeight::Dense(w) = w {
        return linear(x, w, b);
    }
    let (n, k2) = w.dims2()?;
    over_rows(x, n, b, |x2| {
        let (rows, k) = x2.dims2()?;
        if k == k2 && rows > 0 && n > 0 && k > 0 && x2.dtype() == DType::F32 && x2.device().is_cpu() {
            Ok(frozen_matmul::stored_matmul_t(x2, w)?)
        } else {
            let dense = w.to_f32()?.to_device(x2.device())?;
            Ok(x2.matmul(&dense.t()?)?)
        }
    })
}

/// Softmax over the last dimension. The max is detached: it only keeps `exp` in range and
/// its gradient cancels exactly.
fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Per-token negative log-likelihood: `logits [M, V]`, `targets [M]` (u32) -> `[M]`, with the
/// fast kernels (see [`token_nll_with`]).
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    token_nll_with(Kernels::fast(), logits, targets)
}

/// [`token_nll`] under the policy `kernels`.
pub fn token_nll_with(kernels: Kernels, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if kernels.ops_apply(&[&logits]) && targets.dtype() == DType::U32 && targets.device().is_cpu() {
        return Ok(loss::token_nll(&logits, targets)?);
    }
    let logp = log_softmax_last_dim(&logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(picked.neg()?)
}

/// RMSNorm (Llama, and T5's "LayerNorm"): `x * rsqrt(mean(x^2) + eps) * w`.
/// The weight gets a gradient only through the composite path (when it is trained).
pub fn rms_norm(kernels: Kernels, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if kernels.ops_apply(&[x, w]) && !w.track_op() {
        return Ok(norm::rms_norm(x, w, eps)?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?)
}

/// LayerNorm (GPT-2): `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(
    kernels: Kernels,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if kernels.ops_apply(&[x, w, b]) && !w.track_op() && !b.track_op() {
        return Ok(norm::layer_norm(x, w, b, eps)?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Plain RoPE's rotary tables for positions `start .. start+t`: `(cos, sin)`, each `[t, Dh/2]`.
pub fn rope_tables(
    head_dim: usize,
    theta: f64,
    start: usize,
    t: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    rope_tables_for(
        &super::rope::plain_inv_freq(head_dim, theta),
        start,
        t,
        device,
    )
}

/// Rotary tables for positions `start .. start+t` and inverse frequencies `inv_freq [Dh/2]`:
/// `(cos, sin)`, each `[t, Dh/2]`.
pub fn rope_tables_for(
    inv_freq: &[f32],
    start: usize,
    t: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in start..start + t {
        for &f in inv_freq {
            // Same rounding as transformers: the angle in f32.
            let angle = (p as f32) * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), device)?,
        Tensor::from_vec(sin, (t, half), device)?,
    ))
}

/// Applies rotary embeddings to `x [B, H, T, Dh]` with tables `[T, Dh/2]`.
///
/// `interleaved = false`: transformers' `rotate_half` layout (pairs `(i, i + Dh/2)`).
/// `interleaved = true`: GGML's layout (adjacent pairs `(2i, 2i+1)`), for q/k weights as
/// stored in GGUF files, which the converter permuted.
pub fn rope(
    kernels: Kernels,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    interleaved: bool,
) -> Result<Tensor> {
    if kernels.ops_apply(&[x, cos, sin]) && !cos.track_op() && !sin.track_op() {
        return Ok(rope_kernel::rope(x, cos, sin, interleaved)?);
    }
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    let cos = cos.reshape((1, 1, t, half))?;
    let sin = sin.reshape((1, 1, t, half))?;
    if interleaved {
        let pairs = x.reshape((b, h, t, half, 2))?;
        let x1 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let x2 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        Ok(Tensor::stack(&[&r1, &r2], 4)?.reshape((b, h, t, d))?)
    } else {
        let x1 = x.narrow(3, 0, half)?;
        let x2 = x.narrow(3, half, half)?;
        let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
        Ok(Tensor::cat(&[&r1, &r2], 3)?)
    }
}

/// Scaled dot-product attention with an additive bias.
/// `q [B, H, T, Dh]`, `k`/`v [B, H_kv, K, Dh]` (grouped-query: `H` a multiple of `H_kv`),
/// `bias` broadcastable to `[B, H, T, K]`, `scale` multiplies the scores.
pub fn attention(
    kernels: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    attention_capped(kernels, q, k, v, bias, scale, None)
}

/// [`attention`] with the scaled scores soft-capped, `cap * tanh(scores / cap)`, before the
/// bias is added (Gemma 2's `attn_logit_softcapping`) when `softcap` is given.
pub fn attention_capped(
    kernels: Kernels,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let k_len = k.dim(2)?;
    let group = h / h_kv;
    // Group queries by their kv head instead of repeating k/v: [B, H_kv, group*T, Dh].
    let q = q.reshape((b, h_kv, group * t, d))?;
    let scores = q.matmul(&k.t()?)?; // [B, H_kv, group*T, K]
    let probs = if softcap.is_none() && kernels.ops_apply(&[&scores, bias]) && !bias.track_op() {
        // Scale, bias and softmax in one pass; the bias gets no gradient.
        softmax::softmax_scaled(&scores.reshape((b, h, t, k_len))?, Some(bias), scale)?
    } else {
        let scores = if scale != 1.0 {
            (scores * scale)?
        } else {
            scores
        };
        let scores = match softcap {
            Some(cap) => ((scores / cap)?.tanh()? * cap)?,
            None => scores,
        };
        let scores = scores.reshape((b, h, t, k_len))?.broadcast_add(bias)?;
        softmax_composite(&scores)?
    };
    let probs = probs.reshape((b, h_kv, group * t, k_len))?;
    Ok(probs.matmul(v)?.reshape((b, h, t, d))?) // [B, H, T, Dh]
}

/// Activation of a feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    Silu,
    /// tanh approximation (`gelu_new`, candle's `gelu`)
    GeluTanh,
    /// exact erf GELU (composite ops only)
    GeluErf,
}

impl Activation {
    /// The fused kernel's activation, if there is one.
    pub(crate) fn fused(self) -> Option<activation::Act> {
        match self {
            Activation::Relu => Some(activation::Act::Relu),
            Activation::Silu => Some(activation::Act::Silu),
            Activation::GeluTanh => Some(activation::Act::GeluTanh),
            Activation::GeluErf => None,
        }
    }

    /// `act(x)`, element-wise.
    pub fn apply(self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        match self.fused() {
            Some(act) if self != Activation::Relu && kernels.ops_apply(&[x]) => {
                Ok(activation::act(x, act)?)
            }
            _ => self.composite(x),
        }
    }

    /// `act(a) * b`, element-wise (SwiGLU's `silu(gate) * up`, T5 v1.1's gated GELU).
    pub fn apply_mul(self, kernels: Kernels, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match self.fused() {
            Some(act) if self != Activation::Relu && kernels.ops_apply(&[a, b]) => {
                Ok(activation::act_mul(a, b, act)?)
            }
            _ => Ok((self.composite(a)? * b)?),
        }
    }

    /// candle's own op; each has a backward.
    fn composite(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Silu => x.silu()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::GeluErf => x.gelu_erf()?,
        })
    }
}

/// `[B, T, H*Dh]` -> `[B, H, T, Dh]`
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    Ok(x.reshape((b, t, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// `[B, H, T, Dh]` -> `[B, T, H*Dh]`
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((b, t, h * d))?)
}

/// The flattened positions `[M]` (u32) that [`super::LogitsAt`] picks from `[B, T, ..]`, or
/// `None` for all of them. The rows [`select_positions`] takes, in the same order.
pub fn logit_rows(
    at: super::LogitsAt,
    b: usize,
    t: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    Ok(match at {
        super::LogitsAt::All => None,
        super::LogitsAt::Rows(rows) => Some(rows.clone()),
        super::LogitsAt::Last => {
            let last: Vec<u32> = (0..b).map(|i| (i * t + t - 1) as u32).collect();
            Some(Tensor::from_vec(last, b, device)?)
        }
    })
}

/// Picks the LM-head input rows for [`super::LogitsAt`]: `hidden [B, T, D]` -> `[B, T, D]`,
/// `[B, D]` or `[M, D]`.
pub fn select_positions(hidden: &Tensor, at: super::LogitsAt) -> Result<Tensor> {
    let (b, t, d) = hidden.dims3()?;
    Ok(match at {
        super::LogitsAt::All => hidden.clone(),
        super::LogitsAt::Last => hidden.narrow(1, t - 1, 1)?.squeeze(1)?,
        super::LogitsAt::Rows(rows) => hidden.reshape((b * t, d))?.index_select(rows, 0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LogitsAt;

    /// `logit_rows` names the rows `select_positions` picks, in its order.
    #[test]
    fn logit_rows_match_select_positions() {
        let (b, t, d) = (3, 4, 2);
        let dev = Device::Cpu;
        let hidden = Tensor::arange(0f32, (b * t * d) as f32, &dev)
            .unwrap()
            .reshape((b, t, d))
            .unwrap();
        let rows = Tensor::new(&[5u32, 0, 11], &dev).unwrap();
        for at in [LogitsAt::Last, LogitsAt::Rows(&rows)] {
            let want = select_positions(&hidden, at).unwrap();
            let r = logit_rows(at, b, t, &dev).unwrap().unwrap();
            let got = hidden
                .reshape((b * t, d))
                .unwrap()
                .index_select(&r, 0)
                .unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                want.to_vec2::<f32>().unwrap()
            );
        }
        assert!(logit_rows(LogitsAt::All, b, t, &dev).unwrap().is_none());
    }
}
