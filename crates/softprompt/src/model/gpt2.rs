//! GPT-2 (transformers' `GPT2LMHeadModel`): learned absolute positions, pre-LayerNorm blocks,
//! fused q/k/v projection, GELU (tanh approximation) MLP, LM head tied to `wte`.
//!
//! Checkpoints store the projections as `Conv1D` weights `[in, out]`; they are transposed once
//! at load time so that [`ops::linear`] (nn.Linear layout `[out, in]`) applies.

use super::{attention_bias, ops, Arch, CausalLm, KvCache, LogitsAt, ModelInfo};
use crate::load::Weights;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Deserialize;

/// The fields of a transformers `config.json` (model_type `gpt2`) that the forward pass uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_positions: usize,
    pub vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// MLP width; `null` or absent means `4 * n_embd`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_activation() -> String {
    "gelu_new".to_string()
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`)
    GeluTanh,
    /// exact erf GELU (`gelu`)
    GeluErf,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "gelu" => Activation::GeluErf,
            "relu" => Activation::Relu,
            other => crate::bail!(
                "gpt2 config: activation_function `{other}` is not supported \
                 (supported: gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu)"
            ),
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        // All three have a backward in candle (unlike its fused kernels).
        Ok(match self {
            Activation::GeluTanh => ops::gelu_tanh(x)?,
            Activation::GeluErf => x.gelu_erf()?,
            Activation::Relu => x.relu()?,
        })
    }
}

struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    fn load(w: &Weights, prefix: &str, d: usize) -> Result<Self> {
        Ok(Norm {
            w: w.get(&format!("{prefix}.weight"), &[d])?,
            b: w.get(&format!("{prefix}.bias"), &[d])?,
        })
    }
}

/// A Conv1D projection, stored transposed to nn.Linear layout.
struct Proj {
    w: Tensor, // [out, in]
    b: Tensor, // [out]
}

impl Proj {
    fn load(w: &Weights, prefix: &str, d_in: usize, d_out: usize) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[d_in, d_out])?; // [in, out]
        Ok(Proj {
            w: weight.t()?.contiguous()?,
            b: w.get(&format!("{prefix}.bias"), &[d_out])?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.w, Some(&self.b))
    }
}

struct Block {
    ln_1: Norm,
    c_attn: Proj, // D -> 3D
    attn_proj: Proj,
    ln_2: Norm,
    c_fc: Proj, // D -> I
    mlp_proj: Proj,
    /// Multiplies the attention scores.
    scale: f64,
}

pub struct Gpt2 {
    info: ModelInfo,
    wte: Tensor, // [V, D]
    wpe: Tensor, // [n_positions, D]
    blocks: Vec<Block>,
    ln_f: Norm,
    n_head: usize,
    eps: f64,
    act: Activation,
}

impl Gpt2 {
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Self> {
        let d = cfg.n_embd;
        if cfg.n_head == 0 || !d.is_multiple_of(cfg.n_head) {
            crate::bail!(
                "gpt2 config: n_embd = {d} is not a multiple of n_head = {}",
                cfg.n_head
            );
        }
        let act = Activation::parse(&cfg.activation_function)?;
        let inner = cfg.n_inner.unwrap_or(4 * d);
        let head_dim = d / cfg.n_head;
        // GPT2LMHeadModel checkpoints name tensors `transformer.h.0...`; GPT2Model ones (e.g.
        // openai-community/gpt2) have no prefix.
        let root = if !w.contains("transformer.wte.weight") && w.contains("wte.weight") {
            ""
        } else {
            "transformer."
        };
        let wte = w.get(&format!("{root}wte.weight"), &[cfg.vocab_size, d])?;
        let wpe = w.get(&format!("{root}wpe.weight"), &[cfg.n_positions, d])?;
        let mut blocks = Vec::new(); // not with_capacity: the count comes from the file
        for i in 0..cfg.n_layer {
            let p = format!("{root}h.{i}");
            let mut scale = if cfg.scale_attn_weights {
                1.0 / (head_dim as f64).sqrt()
            } else {
                1.0
            };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            blocks.push(Block {
                ln_1: Norm::load(w, &format!("{p}.ln_1"), d)?,
                c_attn: Proj::load(w, &format!("{p}.attn.c_attn"), d, 3 * d)?,
                attn_proj: Proj::load(w, &format!("{p}.attn.c_proj"), d, d)?,
                ln_2: Norm::load(w, &format!("{p}.ln_2"), d)?,
                c_fc: Proj::load(w, &format!("{p}.mlp.c_fc"), d, inner)?,
                mlp_proj: Proj::load(w, &format!("{p}.mlp.c_proj"), inner, d)?,
                scale,
            });
        }
        let ln_f = Norm::load(w, &format!("{root}ln_f"), d)?;
        let info = ModelInfo {
            arch: Arch::Gpt2,
            name,
            d_model: d,
            vocab_size: cfg.vocab_size,
            n_layers: cfg.n_layer,
            n_heads: cfg.n_head,
            max_positions: Some(cfg.n_positions),
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg.eos_token_id.into_iter().collect(),
            // GPT-2 has no pad token; transformers pads (and generate fills finished rows) with EOS.
            pad_token_id: cfg.pad_token_id.or(cfg.eos_token_id),
            decoder_start_token_id: None,
        };
        Ok(Gpt2 {
            info,
            wte,
            wpe,
            blocks,
            ln_f,
            n_head: cfg.n_head,
            eps: cfg.layer_norm_epsilon,
            act,
        })
    }

    fn norm(&self, x: &Tensor, n: &Norm) -> Result<Tensor> {
        ops::layer_norm(x, &n.w, &n.b, self.eps)
    }

    /// One block as [`ops::attention_block`] and [`ops::feed_forward_block`]: `h [B, T, D]`,
    /// `bias [B, 1, T, T]`. With `rows` (flattened positions `[M]`), only those: `[1, M, D]`
    /// out. With `fill` (an empty KV cache and this block's index), also appends the block's
    /// keys and values to the cache, through the fused forward-only op
    /// ([`ops::attention_block_kv`]); `None` when that op does not apply (the caller then runs
    /// the cache path of single ops). Without `fill`, always `Some`.
    fn block(
        &self,
        h: &Tensor,
        blk: &Block,
        bias: &Tensor,
        rows: Option<&Tensor>,
        fill: Option<(&mut KvCache, usize)>,
    ) -> Result<Option<Tensor>> {
        let d = self.info.d_model;
        // c_attn stacks q, k, v: rows of `w [3D, D]` and `b [3D]` (contiguous views).
        let (w, b) = (&blk.c_attn.w, &blk.c_attn.b);
        let part = |i: usize| -> Result<(Tensor, Tensor)> {
            Ok((w.narrow(0, i * d, d)?, b.narrow(0, i * d, d)?))
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        fn lin((w, b): &(Tensor, Tensor)) -> ops::Linear<'_> {
            ops::Linear { w, b: Some(b) }
        }
        fn proj(p: &Proj) -> ops::Linear<'_> {
            ops::Linear {
                w: &p.w,
                b: Some(&p.b),
            }
        }
        fn norm(n: &Norm, eps: f64) -> ops::Norm<'_> {
            ops::Norm::Layer {
                w: &n.w,
                b: &n.b,
                eps,
            }
        }
        let attn = ops::SelfAttention {
            norm: norm(&blk.ln_1, self.eps),
            q: lin(&q),
            k: lin(&k),
            v: lin(&v),
            o: proj(&blk.attn_proj),
            heads: self.n_head,
            kv_heads: self.n_head,
            head_dim: d / self.n_head,
            rope: None,
            bias,
            scale: blk.scale,
        };
        let h = match (fill, rows) {
            (Some((cache, i)), rows) => match ops::attention_block_kv(h, &attn, rows)? {
                Some((y, k, v)) => {
                    cache.append(i, k, v)?;
                    y
                }
                None => return Ok(None),
            },
            (None, Some(rows)) => ops::attention_block_at(h, &attn, rows)?,
            (None, None) => ops::attention_block(h, &attn)?,
        };
        let act = match self.act {
            Activation::GeluTanh => ops::FfnAct::GeluTanh,
            Activation::GeluErf => ops::FfnAct::GeluErf,
            Activation::Relu => ops::FfnAct::Relu,
        };
        let ffn = ops::FeedForward {
            norm: norm(&blk.ln_2, self.eps),
            inner: ops::FfnIn::Plain {
                w: proj(&blk.c_fc),
                act,
            },
            down: proj(&blk.mlp_proj),
        };
        Ok(Some(ops::feed_forward_block(&h, &ffn)?))
    }

    /// Runs the blocks and the final norm, at the positions `at` picks (see
    /// [`ops::select_positions`]). With `hidden`, also collects transformers'
    /// `output_hidden_states` (pass `LogitsAt::All` then).
    fn run(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        mut hidden: Option<&mut Vec<Tensor>>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let (b, t, past) = super::check_decoder_input(
            "gpt2",
            embeds,
            mask,
            cache.as_deref(),
            self.info.d_model,
            self.blocks.len(),
        )?;
        let d = self.info.d_model;
        let max = self.wpe.dim(0)?;
        if past + t > max {
            crate::bail!(
                "gpt2: sequence of {} positions ({past} cached + {t} new, soft prompt included) \
                 exceeds the model's n_positions = {max}",
                past + t
            );
        }
        let pos = self.wpe.narrow(0, past, t)?; // [T, D]
        let mut h = embeds.broadcast_add(&pos)?; // [B, T, D]
        let bias = attention_bias(mask, t, true)?; // [B, 1, T, P+T]
        let mut picked = false;
        // An empty cache (a prefill) is filled by the fused sub-blocks where they apply.
        let fresh = past == 0;
        for (i, blk) in self.blocks.iter().enumerate() {
            if let Some(hs) = hidden.as_deref_mut() {
                // [0] is the input of block 0, [i] the output of block i-1; the last block's
                // output is pushed after the final norm below.
                hs.push(h.clone());
            }
            if cache.is_none() || fresh {
                // Each residual sub-block as one op, the last block only at the positions `at`
                // picks.
                let rows = match i + 1 == self.blocks.len() {
                    true => ops::logit_rows(at, b, t, embeds.device())?,
                    false => None,
                };
                let fill = cache.as_deref_mut().map(|c| (c, i));
                if let Some(y) = self.block(&h, blk, &bias, rows.as_ref(), fill)? {
                    picked = rows.is_some();
                    h = y;
                    continue;
                }
            }
            // Attention.
            let x = self.norm(&h, &blk.ln_1)?;
            let qkv = blk.c_attn.forward(&x)?; // [B, T, 3D]
            let q = ops::split_heads(&qkv.narrow(2, 0, d)?, self.n_head)?; // [B, H, T, Dh]
            let k = ops::split_heads(&qkv.narrow(2, d, d)?, self.n_head)?;
            let v = ops::split_heads(&qkv.narrow(2, 2 * d, d)?, self.n_head)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(c) => c.append(i, k, v)?, // [B, H, P+T, Dh]
                None => (k, v),
            };
            let a = ops::attention(&q, &k, &v, &bias, blk.scale)?; // [B, H, T, Dh]
            let a = blk.attn_proj.forward(&ops::merge_heads(&a)?)?; // [B, T, D]
            h = (h + a)?;
            // MLP.
            let x = self.norm(&h, &blk.ln_2)?;
            let m = self.act.apply(&blk.c_fc.forward(&x)?)?; // [B, T, I]
            h = (h + blk.mlp_proj.forward(&m)?)?;
        }
        let out = self.norm(&h, &self.ln_f)?;
        if let Some(hs) = hidden {
            hs.push(out.clone());
        }
        match picked {
            true => Ok(out.squeeze(0)?), // [1, M, D] -> [M, D]
            false => ops::select_positions(&out, at),
        }
    }
}

impl CausalLm for Gpt2 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let e = self.wte.index_select(&flat, 0).map_err(|e| {
            Error::invalid(format!(
                "gpt2: token ids outside the vocabulary ({}): {e}",
                self.info.vocab_size
            ))
        })?;
        Ok(e.reshape((b, t, self.info.d_model))?)
    }

    fn forward(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let h = self.run(embeds, mask, cache, None, at)?;
        ops::linear(&h, &self.wte, None) // tied LM head
    }

    fn hidden_states(&self, embeds: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        let mut hs = Vec::with_capacity(self.blocks.len() + 1);
        self.run(embeds, mask, None, Some(&mut hs), LogitsAt::All)?;
        Ok(hs)
    }
}
