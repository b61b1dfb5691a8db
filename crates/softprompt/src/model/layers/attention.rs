//! The attention sub-block of a pre-norm layer, `x + o(attention(q(n), k(n), v(n)))` with
//! `n = norm(x)`: grouped-query heads, optional q/k/v/o biases, rotary positions or none, an
//! additive bias (causal mask, padding, T5's position bias), and the KV cache; the options of
//! [`AttentionOptions`] (sliding window, per-head q/k norms, soft-capped scores, a norm of the
//! branch output).

use super::{Linear, Norm};
use crate::kernels::attention::{attention_block, attention_block_kv, AttentionArgs, RopeTables};
use crate::kernels::Kernels;
use crate::model::ops::{self, merge_heads, split_heads};
use crate::model::KvCache;
use crate::Result;
use candle_core::Tensor;

/// Rotary tables `cos`, `sin` `[T, Dh/2]` for the positions of a forward pass, and the pair
/// layout (see [`ops::rope`]).
#[derive(Clone, Debug)]
pub struct Rotary {
    pub cos: Tensor,
    pub sin: Tensor,
    pub interleaved: bool,
}

impl Rotary {
    /// `x [B, H, T, Dh]` rotated.
    pub fn apply(&self, kernels: Kernels, x: &Tensor) -> Result<Tensor> {
        ops::rope(kernels, x, &self.cos, &self.sin, self.interleaved)
    }
}

/// What one forward pass gives every attention layer: the additive bias
/// `[B or 1, H or 1, T, P+T]`, the rotary tables of its positions, what sliding-window layers
/// use instead, the kernel policy.
#[derive(Clone, Copy)]
pub struct AttentionContext<'a> {
    pub bias: &'a Tensor,
    pub rotary: Option<&'a Rotary>,
    pub sliding: Option<SlidingContext<'a>>,
    pub kernels: Kernels,
}

/// The bias and rotary tables of the sliding-window layers of one forward pass: the causal
/// bias limited to `window` (see [`crate::model::sliding_window_bias`]) and the tables of
/// their own RoPE base (Gemma 3's local layers) or the model's.
#[derive(Clone, Copy)]
pub struct SlidingContext<'a> {
    pub window: usize,
    pub bias: &'a Tensor,
    pub rotary: Option<&'a Rotary>,
}

/// Per-head norms `[Dh]` of the queries and keys, applied before the rotation (Qwen3, Gemma 3).
#[derive(Clone, Debug)]
pub struct HeadNorms {
    pub q: Norm,
    pub k: Norm,
}

/// What a family can switch on beyond the plain sub-block; all off by default. The fused op
/// runs sliding-window layers (the window is in their bias) and head norms (forward and
/// backward); the other options run the composite path.
#[derive(Clone, Debug, Default)]
pub struct AttentionOptions {
    /// Keys more than `window - 1` positions before a query are masked (Mistral, Gemma's
    /// local layers); the layer takes the context's [`SlidingContext`].
    pub sliding_window: Option<usize>,
    pub head_norms: Option<HeadNorms>,
    /// `cap * tanh(scores / cap)` before the bias (Gemma 2).
    pub logit_softcap: Option<f64>,
    /// A norm of the branch output before the residual add (Gemma's post-attention norm).
    pub output_norm: Option<Norm>,
}

/// `q [H*Dh, D]`, `k`, `v [H_kv*Dh, D]`, `o [D, H*Dh]`; `scale` multiplies the scores.
#[derive(Clone, Debug)]
pub struct Attention {
    pub norm: Norm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    /// The same q, k, v stacked, `[(H + 2 H_kv) Dh, D]`, when the checkpoint stores them so
    /// (GPT-2's `c_attn`; `q`, `k`, `v` are then views of it): the composite path runs one
    /// product instead of three.
    pub qkv: Option<Linear>,
    pub o: Linear,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
    pub options: AttentionOptions,
}

impl Attention {
    /// `x [B, T, D]` -> `[B, T, D]`, or `[1, M, D]` at `rows` (u32 `[M]`, flattened `B*T`
    /// positions; keys and values still come from every position). With `cache` (the cache
    /// and this layer's index) the layer's keys and values are appended to it and attention
    /// runs over every cached position.
    ///
    /// The one place that picks how attention runs: the fused op (differentiable) without a
    /// cache, the fused forward-only op that also returns the keys and values when it starts
    /// an empty cache without gradients, otherwise [`Self::composite`].
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        rows: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let fresh = match &cache {
            None => true,
            Some((c, i)) => !x.track_op() && c.layers.get(*i).is_none_or(Option::is_none),
        };
        // A generation step on quantised blocks runs the composite path, whose projections
        // take them (see `Linear::forward_with`).
        if fresh && !self.o.quantized_for(ctx.kernels, x) {
            if let Some(args) = self.kernel_args(ctx)?.filter(|a| a.applies(x, ctx.kernels)) {
                return match cache {
                    None => Ok(attention_block(x, args, rows)?),
                    Some((c, i)) => {
                        let (y, k, v) = attention_block_kv(x, args, rows)?;
                        c.append(i, k, v)?;
                        Ok(y)
                    }
                };
            }
        }
        let y = self.composite(x, ctx, cache)?;
        match rows {
            Some(rows) => {
                let (b, t, d) = y.dims3()?;
                Ok(y.reshape((b * t, d))?.index_select(rows, 0)?.unsqueeze(0)?)
            }
            None => Ok(y),
        }
    }

    /// The sub-block composed of single ops (fused element-wise kernels where the policy
    /// allows), appending to `cache` when given: the reference the fused op is tested against.
    pub fn composite(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor> {
        let kernels = ctx.kernels;
        let (bias, rotary) = self.bias_and_rotary(ctx)?;
        let h = self.norm.forward(kernels, x)?;
        let (q, k, v) = match &self.qkv {
            Some(qkv) => {
                let y = qkv.forward_with(kernels, &h)?; // [B, T, (H + 2 H_kv) Dh]
                let (nq, nkv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                (
                    y.narrow(2, 0, nq)?,
                    y.narrow(2, nq, nkv)?,
                    y.narrow(2, nq + nkv, nkv)?,
                )
            }
            None => (
                self.q.forward_with(kernels, &h)?,
                self.k.forward_with(kernels, &h)?,
                self.v.forward_with(kernels, &h)?,
            ),
        };
        let q = split_heads(&q, self.heads)?; // [B, H, T, Dh]
        let k = split_heads(&k, self.kv_heads)?; // [B, Hkv, T, Dh]
        let v = split_heads(&v, self.kv_heads)?;
        let (q, k) = match &self.options.head_norms {
            Some(n) => (n.q.forward(kernels, &q)?, n.k.forward(kernels, &k)?),
            None => (q, k),
        };
        let (q, k) = match rotary {
            Some(r) => (r.apply(kernels, &q)?, r.apply(kernels, &k)?),
            None => (q, k),
        };
        let (k, v) = match cache {
            Some((c, i)) => c.append(i, k, v)?, // [B, Hkv, P+T, Dh]
            None => (k, v),
        };
        let cap = self.options.logit_softcap;
        let a = ops::attention_capped(kernels, &q, &k, &v, bias, self.scale, cap)?; // [B, H, T, Dh]
        let y = self.o.forward_with(kernels, &merge_heads(&a)?)?; // [B, T, D]
        let y = match &self.options.output_norm {
            Some(n) => n.forward(kernels, &y)?,
            None => y,
        };
        Ok((x + y)?)
    }

    /// The bias and rotary tables this layer uses: the context's sliding-window ones for a
    /// sliding-window layer (an error when the context has none for its window).
    fn bias_and_rotary<'a>(
        &self,
        ctx: &AttentionContext<'a>,
    ) -> Result<(&'a Tensor, Option<&'a Rotary>)> {
        match (self.options.sliding_window, &ctx.sliding) {
            (None, _) => Ok((ctx.bias, ctx.rotary)),
            (Some(w), Some(s)) if s.window == w => Ok((s.bias, s.rotary)),
            (Some(w), _) => crate::bail!(
                "attention: a sliding-window layer (window {w}) without a bias for that window"
            ),
        }
    }

    /// Cross-attention (T5's decoder): queries from `norm(x)`, keys and values from
    /// `memory [B, S, D]` (not normed), `bias [B, 1, T, S]`; `x + o(attention)`. The keys and
    /// values are taken from `cached` when it holds them, and stored there otherwise.
    pub fn cross(
        &self,
        kernels: Kernels,
        x: &Tensor,
        memory: &Tensor,
        bias: &Tensor,
        cached: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<Tensor> {
        let h = self.norm.forward(kernels, x)?;
        let q = split_heads(&self.q.forward(&h)?, self.heads)?; // [B, H, T, Dh]
        let project = || -> Result<(Tensor, Tensor)> {
            let k = split_heads(&self.k.forward(memory)?, self.kv_heads)?; // [B, Hkv, S, Dh]
            let v = split_heads(&self.v.forward(memory)?, self.kv_heads)?;
            Ok((k, v))
        };
        let (k, v) = match cached {
            Some(slot) => match slot {
                Some(kv) => kv.clone(),
                None => slot.insert(project()?).clone(),
            },
            None => project()?,
        };
        let a = ops::attention(kernels, &q, &k, &v, bias, self.scale)?;
        Ok((x + self.o.forward(&merge_heads(&a)?)?)?)
    }

    /// Whether the fused op runs on `x` in this context (tests check the fast path is taken).
    #[cfg(test)]
    pub(crate) fn fused_applies(&self, x: &Tensor, ctx: &AttentionContext) -> bool {
        matches!(self.kernel_args(ctx), Ok(Some(a)) if a.applies(x, ctx.kernels))
    }

    /// The operands of the fused op (shared tensors, no copy); `None` when an option the op
    /// does not implement is on.
    fn kernel_args(&self, ctx: &AttentionContext) -> Result<Option<AttentionArgs>> {
        let o = &self.options;
        if o.logit_softcap.is_some() || o.output_norm.is_some() {
            return Ok(None);
        }
        let (bias, rotary) = self.bias_and_rotary(ctx)?;
        Ok(Some(AttentionArgs {
            norm: self.norm.weights()?,
            q: self.q.weights(),
            k: self.k.weights(),
            v: self.v.weights(),
            o: self.o.weights(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rope: rotary.map(|r| RopeTables {
                cos: r.cos.clone(),
                sin: r.sin.clone(),
                interleaved: r.interleaved,
            }),
            head_norms: match &o.head_norms {
                Some(n) => Some([n.q.weights()?, n.k.weights()?]),
                None => None,
            },
            bias: bias.clone(),
            scale: self.scale,
        }))
    }
}
