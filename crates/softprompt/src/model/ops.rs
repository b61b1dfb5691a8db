//! Differentiable building blocks shared by the backbones.
//!
//! candle's fused kernels (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope`) have no
//! backward and silently drop gradients, so training goes through these compositions of
//! primitive ops, each of which candle can differentiate. On the CPU in f32 the row-wise and
//! element-wise ops run as the fused kernels of [`super::fused`] (same results to rounding,
//! with their own backward, much less allocation); elsewhere they fall back to the
//! compositions below.

use super::fused::{self, Act};
use crate::Result;
use candle_core::{DType, Device, Tensor, D};

pub use super::frozen::{FeedForward, FfnAct, FfnIn, Linear, Norm, Rotary, SelfAttention};

/// `x [.., K] @ w^T` for a weight stored as `[N, K]` (nn.Linear layout) -> `[.., N]`.
///
/// When `x` needs a gradient and `w` is frozen (not a variable, not computed from one), the
/// product goes through [`super::frozen::matmul_t`], whose backward skips the weight's
/// gradient; same forward result, cheaper backward. Otherwise candle's plain matmul.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, k))?;
    let y = if super::frozen::applies(&x2, w) {
        super::frozen::matmul_t(&x2, w)?
    } else {
        x2.matmul(&w.t()?)?
    }; // [rows, N]
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    let last = out.len() - 1;
    out[last] = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused::usable(&[x]) {
        return Ok(fused::softmax_scaled(x, None, 1.0)?);
    }
    softmax_composite(x)
}

/// The max is detached: it only keeps `exp` in range and its gradient cancels exactly.
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

/// Per-token negative log-likelihood: `logits [M, V]`, `targets [M]` (u32) -> `[M]`.
pub fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    if fused::usable(&[&logits]) && targets.dtype() == DType::U32 && targets.device().is_cpu() {
        return Ok(fused::token_nll(&logits, targets)?);
    }
    let logp = log_softmax_last_dim(&logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(picked.neg()?)
}

/// RMSNorm (Llama, and T5's "LayerNorm"): `x * rsqrt(mean(x^2) + eps) * w`.
/// The weight gets a gradient only through the composite path (when it is trained).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::usable(&[x, w]) && !w.track_op() {
        return Ok(fused::rms_norm(x, w, eps)?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?)
}

/// LayerNorm (GPT-2): `(x - mean) / sqrt(var + eps) * w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    if fused::usable(&[x, w, b]) && !w.track_op() && !b.track_op() {
        return Ok(fused::layer_norm(x, w, b, eps)?);
    }
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Rotary tables for positions `start .. start+t`: `(cos, sin)`, each `[t, Dh/2]`.
pub fn rope_tables(
    head_dim: usize,
    theta: f64,
    start: usize,
    t: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in start..start + t {
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            // Same rounding as transformers: inv_freq and the angle in f32.
            let angle = (p as f32) * (inv_freq as f32);
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
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    if fused::usable(&[x, cos, sin]) && !cos.track_op() && !sin.track_op() {
        return Ok(fused::rope(x, cos, sin, interleaved)?);
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
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let h_kv = k.dim(1)?;
    let k_len = k.dim(2)?;
    let group = h / h_kv;
    // Group queries by their kv head instead of repeating k/v: [B, H_kv, group*T, Dh].
    let q = q.reshape((b, h_kv, group * t, d))?;
    let scores = q.matmul(&k.t()?)?; // [B, H_kv, group*T, K]
    let probs = if fused::usable(&[&scores, bias]) && !bias.track_op() {
        // Scale, bias and softmax in one pass; the bias gets no gradient.
        fused::softmax_scaled(&scores.reshape((b, h, t, k_len))?, Some(bias), scale)?
    } else {
        let scores = if scale != 1.0 {
            (scores * scale)?
        } else {
            scores
        };
        let scores = scores.reshape((b, h, t, k_len))?.broadcast_add(bias)?;
        softmax_composite(&scores)?
    };
    let probs = probs.reshape((b, h_kv, group * t, k_len))?;
    Ok(probs.matmul(v)?.reshape((b, h, t, d))?) // [B, H, T, Dh]
}

/// GELU, tanh approximation (`gelu_new`; candle's `gelu`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fused::usable(&[x]) {
        return Ok(fused::act(x, Act::GeluTanh)?);
    }
    Ok(x.gelu()?)
}

/// `silu(a) * b`, SwiGLU's gate.
pub fn silu_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused::usable(&[a, b]) {
        return Ok(fused::act_mul(a, b, Act::Silu)?);
    }
    Ok((a.silu()? * b)?)
}

/// `gelu_tanh(a) * b`, T5 v1.1's gated GELU.
pub fn gelu_tanh_mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused::usable(&[a, b]) {
        return Ok(fused::act_mul(a, b, Act::GeluTanh)?);
    }
    Ok((a.gelu()? * b)?)
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

/// The attention sub-block of a pre-norm layer, without a KV cache: `x + o(attn(norm(x)))`,
/// `x [B, T, D]` -> `[B, T, D]` (see [`SelfAttention`]). On the CPU in f32 with frozen weights
/// one fused op ([`super::frozen::attention_block`]) that keeps only what its backward needs;
/// otherwise composed from the ops above.
pub fn attention_block(x: &Tensor, s: &SelfAttention) -> Result<Tensor> {
    match super::frozen::attention_block(x, s, None)? {
        Some(y) => Ok(y),
        None => attention_block_composite(x, s),
    }
}

/// [`attention_block`] at some positions only: `rows` (u32 `[M]`) index the flattened `B*T`
/// positions, the result is `[1, M, D]`. Keys and values come from every position; fused,
/// the queries, attention and output projection run at the `M` rows only. For the last layer
/// when logits are wanted at a few positions ([`logit_rows`]).
pub fn attention_block_at(x: &Tensor, s: &SelfAttention, rows: &Tensor) -> Result<Tensor> {
    if let Some(y) = super::frozen::attention_block(x, s, Some(rows))? {
        return Ok(y);
    }
    let (b, t, d) = x.dims3()?;
    let y = attention_block_composite(x, s)?.reshape((b * t, d))?;
    Ok(y.index_select(rows, 0)?.unsqueeze(0)?)
}

/// [`attention_block`] (at `rows` when given, as [`attention_block_at`]) for a forward pass
/// that starts an empty KV cache: also returns the keys (rotated) and values of every
/// position, `[B, H_kv, T, Dh]`, for [`super::KvCache::append`]. Fused only: `None` where the
/// fused op does not apply or `x` needs a gradient; the caller then runs the single ops.
pub fn attention_block_kv(
    x: &Tensor,
    s: &SelfAttention,
    rows: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    Ok(super::frozen::attention_block_kv(x, s, rows)?)
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

/// [`attention_block`] composed from single ops.
pub(crate) fn attention_block_composite(x: &Tensor, s: &SelfAttention) -> Result<Tensor> {
    let h = norm(x, &s.norm)?;
    let q = split_heads(&linear(&h, s.q.w, s.q.b)?, s.heads)?; // [B, H, T, Dh]
    let k = split_heads(&linear(&h, s.k.w, s.k.b)?, s.kv_heads)?; // [B, Hkv, T, Dh]
    let v = split_heads(&linear(&h, s.v.w, s.v.b)?, s.kv_heads)?;
    let (q, k) = match &s.rope {
        Some(r) => (
            rope(&q, r.cos, r.sin, r.interleaved)?,
            rope(&k, r.cos, r.sin, r.interleaved)?,
        ),
        None => (q, k),
    };
    let a = merge_heads(&attention(&q, &k, &v, s.bias, s.scale)?)?; // [B, T, H*Dh]
    Ok((x + linear(&a, s.o.w, s.o.b)?)?)
}

/// The feed-forward sub-block of a pre-norm layer: `x + down(inner(norm(x)))`, `x [B, T, D]`
/// (see [`FeedForward`]). Fused ([`super::frozen::feed_forward_block`]) where it applies, as
/// [`attention_block`]; otherwise composed from the ops above.
pub fn feed_forward_block(x: &Tensor, s: &FeedForward) -> Result<Tensor> {
    match super::frozen::feed_forward_block(x, s)? {
        Some(y) => Ok(y),
        None => feed_forward_block_composite(x, s),
    }
}

/// [`feed_forward_block`] composed from single ops.
pub(crate) fn feed_forward_block_composite(x: &Tensor, s: &FeedForward) -> Result<Tensor> {
    let h = norm(x, &s.norm)?;
    let a = match s.inner {
        FfnIn::Gated { gate, up, act } => {
            let (g, u) = (linear(&h, gate.w, gate.b)?, linear(&h, up.w, up.b)?); // [B, T, F]
            match act {
                FfnAct::Silu => silu_mul(&g, &u)?,
                FfnAct::GeluTanh => gelu_tanh_mul(&g, &u)?,
                other => (ffn_act(&g, other)? * u)?,
            }
        }
        FfnIn::Plain { w, act } => ffn_act(&linear(&h, w.w, w.b)?, act)?,
    };
    Ok((x + linear(&a, s.down.w, s.down.b)?)?)
}

fn norm(x: &Tensor, n: &Norm) -> Result<Tensor> {
    match *n {
        Norm::Rms { w, eps } => rms_norm(x, w, eps),
        Norm::Layer { w, b, eps } => layer_norm(x, w, b, eps),
    }
}

fn ffn_act(x: &Tensor, act: FfnAct) -> Result<Tensor> {
    Ok(match act {
        FfnAct::Relu => x.relu()?,
        FfnAct::Silu => x.silu()?,
        FfnAct::GeluTanh => gelu_tanh(x)?,
        FfnAct::GeluErf => x.gelu_erf()?,
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

    /// `KvCache::append` writes into buffers with spare room: what it returns must equal the
    /// plain concatenation, and views handed out earlier, clones and rewound caches must
    /// never see another append's positions.
    #[test]
    fn kv_cache_room_never_aliases() {
        use crate::model::KvCache;
        let dev = Device::Cpu;
        let step = |seed: usize, t: usize| {
            let n = 2 * 3 * t * 4;
            let v: Vec<f32> = (0..n).map(|i| (seed * 1000 + i) as f32).collect();
            Tensor::from_vec(v, (2, 3, t, 4), &dev).unwrap() // [B, H, T, Dh]
        };
        let vals = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut cache = KvCache::new(1);
        let mut want_k = step(0, 5);
        cache.append(0, want_k.clone(), want_k.clone()).unwrap();
        let mut views = Vec::new();
        // Past the room of the first buffer (5 + 32 positions): a second buffer.
        for s in 1..45 {
            let x = step(s, 1);
            want_k = Tensor::cat(&[&want_k, &x], 2).unwrap();
            let (k, v) = cache.append(0, x.clone(), x).unwrap();
            assert_eq!(vals(&k), vals(&want_k), "step {s}");
            assert_eq!(vals(&v), vals(&want_k), "step {s}");
            views.push((k, v, want_k.clone()));
        }
        // A clone and the original append different positions.
        let mut other = cache.clone();
        let (a, _) = cache.append(0, step(100, 2), step(100, 2)).unwrap();
        let (b, _) = other.append(0, step(200, 2), step(200, 2)).unwrap();
        assert_eq!(
            vals(&a),
            vals(&Tensor::cat(&[&want_k, &step(100, 2)], 2).unwrap())
        );
        assert_eq!(
            vals(&b),
            vals(&Tensor::cat(&[&want_k, &step(200, 2)], 2).unwrap())
        );
        // Rewound to an earlier view, then appended: the longer view keeps its values.
        cache.layers[0] = Some((views[40].0.clone(), views[40].1.clone()));
        cache.append(0, step(300, 1), step(300, 1)).unwrap();
        assert_eq!(
            vals(&a),
            vals(&Tensor::cat(&[&want_k, &step(100, 2)], 2).unwrap())
        );
        for (k, v, want) in &views {
            assert_eq!(vals(k), vals(want));
            assert_eq!(vals(v), vals(want));
        }
    }
}
