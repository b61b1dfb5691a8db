//! The decoder-only model, written once: embeddings -> blocks -> final norm -> LM head at the
//! chosen rows. A family (Llama, GPT-2, ...) is a description that builds a [`Decoder`] from
//! its config and weights: the layers, the position scheme and the facts in [`ModelInfo`].

use super::layers::{
    Attention, AttentionContext, Embedding, FeedForward, FfnInner, LmHead, Norm, Rotary,
    SlidingContext,
};
use super::rope::{plain_inv_freq, RopeFrequencies};
use super::{attention_bias, ops, sliding_window_bias, CausalLm, KvCache, LogitsAt, ModelInfo};
use crate::kernels::Kernels;
use crate::Result;
use candle_core::Tensor;

/// One pre-norm layer: `x + attention(norm(x))`, then `x + feed_forward(norm(x))`.
#[derive(Clone, Debug)]
pub struct Block {
    pub attention: Attention,
    pub feed_forward: FeedForward,
}

/// How positions enter the model.
#[derive(Clone, Debug)]
pub enum Positions {
    /// Rotary embeddings of queries and keys (Llama family): head dim, frequencies (plain or
    /// scaled), pair layout (`interleaved`: GGML's adjacent pairs, for q/k weights as stored
    /// in GGUF files).
    Rotary {
        head_dim: usize,
        frequencies: RopeFrequencies,
        interleaved: bool,
    },
    /// A learned table `[n_positions, D]` added to the input embeddings (GPT-2).
    Learned(Tensor),
}

/// A decoder-only language model: a list of blocks and a small per-family description.
pub struct Decoder {
    pub info: ModelInfo,
    pub embedding: Embedding,
    pub positions: Positions,
    pub blocks: Vec<Block>,
    pub final_norm: Norm,
    pub head: LmHead,
    /// The RoPE base of the sliding-window layers when it differs from the model's (Gemma 3's
    /// `rope_local_base_freq`).
    pub sliding_rope_theta: Option<f64>,
    pub kernels: Kernels,
}

impl Decoder {
    /// Rotary tables `[T, Dh/2]` for positions `start .. start+t`, when the model rotates;
    /// `sliding`: those of the sliding-window layers.
    fn rotary(
        &self,
        sliding: bool,
        start: usize,
        t: usize,
        device: &candle_core::Device,
    ) -> Result<Option<Rotary>> {
        Ok(match &self.positions {
            Positions::Rotary {
                head_dim,
                frequencies,
                interleaved,
            } => {
                let inv_freq = match (sliding, self.sliding_rope_theta) {
                    (true, Some(local)) => plain_inv_freq(*head_dim, local),
                    _ => frequencies.inv_freq(start + t),
                };
                let (cos, sin) = ops::rope_tables_for(&inv_freq, start, t, device)?;
                Some(Rotary {
                    cos,
                    sin,
                    interleaved: *interleaved,
                })
            }
            Positions::Learned(_) => None,
        })
    }

    /// Runs the blocks and the final norm; returns the hidden states at the positions `at`
    /// picks: the last block runs at those rows only. With `states`, also collects
    /// transformers' `output_hidden_states` (pass `LogitsAt::All` then).
    fn run(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        mut states: Option<&mut Vec<Tensor>>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let name = self.info.arch.name();
        let n = self.blocks.len();
        let kernels = self.kernels_for(cache.as_deref(), &at);
        let (b, t, past) =
            check_decoder_input(name, embeds, mask, cache.as_deref(), self.info.d_model, n)?;
        let device = embeds.device();
        let mut x = match &self.positions {
            Positions::Learned(table) => {
                let max = table.dim(0)?;
                if past + t > max {
                    crate::bail!(
                        "{name}: sequence of {} positions ({past} cached + {t} new, soft prompt \
                         included) exceeds the model's n_positions = {max}",
                        past + t
                    );
                }
                embeds.broadcast_add(&table.narrow(0, past, t)?)? // [B, T, D]
            }
            Positions::Rotary { .. } => embeds.contiguous()?,
        };
        let bias = attention_bias(mask, t, true)?; // [B, 1, T, P+T]
        let rotary = self.rotary(false, past, t, device)?;
        let sliding = match self.window() {
            Some(window) => Some((
                window,
                sliding_window_bias(mask, t, window)?, // [B, 1, T, P+T]
                match self.sliding_rope_theta {
                    Some(_) => self.rotary(true, past, t, device)?,
                    None => None,
                },
            )),
            None => None,
        };
        let ctx = AttentionContext {
            bias: &bias,
            rotary: rotary.as_ref(),
            sliding: sliding
                .as_ref()
                .map(|(window, bias, local)| SlidingContext {
                    window: *window,
                    bias,
                    rotary: local.as_ref().or(rotary.as_ref()),
                }),
            kernels,
        };
        let rows = ops::logit_rows(at, b, t, device)?;
        for (i, block) in self.blocks.iter().enumerate() {
            if let Some(s) = states.as_deref_mut() {
                s.push(x.clone());
            }
            let last_rows = if i + 1 == n { rows.as_ref() } else { None };
            let fill = cache.as_deref_mut().map(|c| (c, i));
            x = block.attention.forward(&x, &ctx, last_rows, fill)?;
            x = block.feed_forward.forward(kernels, &x)?;
        }
        let out = self.final_norm.forward(kernels, &x)?;
        if let Some(s) = states {
            // [0] is the input of block 0, [i] the output of block i-1; the last block's
            // output is pushed after the final norm.
            s.push(out.clone());
        }
        match rows {
            Some(_) => Ok(out.squeeze(0)?), // [1, M, D] -> [M, D]
            None => Ok(out),
        }
    }
}

impl Decoder {
    /// The policy of one call: quantised products only for generation steps (a KV cache that
    /// already holds positions, the last position's logits), never for scoring,
    /// classification or filling an empty cache (the server's cached prompts serve
    /// classification too).
    fn kernels_for(&self, cache: Option<&KvCache>, at: &LogitsAt) -> Kernels {
        let generating = cache.is_some_and(|c| c.seq_len() > 0) && matches!(at, LogitsAt::Last);
        self.kernels.with_quantized_decode(self.kernels.quantized_decode && generating)
    }

    /// The window of the sliding-window layers (one per model; the families check it).
    fn window(&self) -> Option<usize> {
        self.blocks
            .iter()
            .find_map(|b| b.attention.options.sliding_window)
    }
}

impl CausalLm for Decoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embedding.forward(ids)
    }

    fn forward(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let kernels = self.kernels_for(cache.as_deref(), &at);
        let picked = self.run(embeds, mask, cache, None, at)?;
        self.head.forward_with(kernels, &picked)
    }

    fn hidden_states(&self, embeds: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(self.blocks.len() + 1);
        self.run(embeds, mask, None, Some(&mut states), LogitsAt::All)?;
        Ok(states)
    }

    fn shift_cache(&self, cache: &mut KvCache, by: usize) -> Result<bool> {
        let Positions::Rotary {
            head_dim,
            ref frequencies,
            interleaved,
        } = self.positions
        else {
            return Ok(false);
        };
        if !frequencies.shift_invariant() {
            return Ok(false);
        }
        let p = cache.seq_len();
        let device = match cache.layers.iter().flatten().next() {
            Some((k, _)) if by > 0 && p > 0 => k.device().clone(),
            _ => return Ok(true),
        };
        // One rotation by `by` at every cached position, in the model's pair layout and with
        // each layer's RoPE base.
        let half = head_dim / 2;
        let rotation = |sliding: bool| -> Result<Option<(Tensor, Tensor)>> {
            Ok(match self.rotary(sliding, by, 1, &device)? {
                Some(r) => Some((
                    r.cos.broadcast_as((p, half))?.contiguous()?, // [P, Dh/2]
                    r.sin.broadcast_as((p, half))?.contiguous()?,
                )),
                None => None,
            })
        };
        let (Some(global), Some(local)) = (rotation(false)?, rotation(true)?) else {
            return Ok(false);
        };
        for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let Some((k, _)) = layer else { continue };
            let (cos, sin) = match block.attention.options.sliding_window {
                Some(_) => &local,
                None => &global,
            };
            *k = ops::rope(self.kernels, k, cos, sin, interleaved)?; // [B, Hkv, P, Dh]
        }
        Ok(true)
    }

    fn sliding_window(&self) -> Option<usize> {
        self.window()
    }

    fn kernels(&self) -> Kernels {
        self.kernels
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    fn stored_matrices(&self) -> (usize, usize) {
        let mut ws = vec![self.embedding.table(), self.head.weight()];
        for b in &self.blocks {
            let a = &b.attention;
            ws.extend([&a.q.w, &a.k.w, &a.v.w, &a.o.w, &b.feed_forward.down.w]);
            match &b.feed_forward.inner {
                FfnInner::Gated { gate, up } => ws.extend([&gate.w, &up.w]),
                FfnInner::Plain(w) => ws.push(&w.w),
            }
        }
        let stored = ws.iter().filter(|w| w.stored_dtype().is_some()).count();
        (stored, ws.len())
    }
}

/// Checks a decoder-only model's inputs and returns `(B, T, P)`: `embeds [B, T, D]` with
/// `T > 0` and the model's width, a cache with one entry per layer (`P` cached positions),
/// and a mask `[B, P + T]`. `arch` names the model in the errors.
fn check_decoder_input(
    arch: &str,
    embeds: &Tensor,
    mask: &Tensor,
    cache: Option<&KvCache>,
    d_model: usize,
    n_layers: usize,
) -> Result<(usize, usize, usize)> {
    let (b, t, d) = embeds.dims3()?;
    if d != d_model {
        crate::bail!("{arch}: embeddings have width {d}, the model expects {d_model}");
    }
    if t == 0 {
        crate::bail!("{arch}: empty input (no positions)");
    }
    let past = match cache {
        Some(c) if c.layers.len() != n_layers => {
            crate::bail!(
                "{arch}: KV cache has {} layers, the model has {n_layers}",
                c.layers.len()
            )
        }
        Some(c) => c.seq_len(),
        None => 0,
    };
    if mask.dims() != [b, past + t] {
        crate::bail!(
            "{arch}: attention mask has shape {:?}, expected [{b}, {}] ({past} cached + {t} new positions)",
            mask.dims(),
            past + t
        );
    }
    Ok((b, t, past))
}
