//! Llama-family decoder (Llama 2/3 without rope scaling, SmolLM, Mistral-style configs):
//! RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP.
//!
//! Weights use the Hugging Face names (`model.layers.{i}.self_attn.q_proj.weight`, ...);
//! the GGUF loader renames GGUF tensors to these.

use super::{attention_bias, ops, CausalLm, KvCache, LogitsAt, ModelInfo};
use crate::load::Weights;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::Deserialize;

/// The fields of a Hugging Face `config.json` that the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no grouping).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    /// transformers 4.x; transformers 5.x writes `rope_parameters.rope_theta` instead.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// transformers 4.x name of the rope variant (only plain RoPE is supported).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    pub vocab_size: usize,
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// When absent, the head is `lm_head.weight` if the weights have it, else the embedding.
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// GGML's adjacent-pair RoPE layout, for q/k weights as stored in GGUF files.
    #[serde(default)]
    pub rope_interleaved: bool,
}

/// `eos_token_id` is an int or a list of ints.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

impl Config {
    /// `rope_theta`, wherever the config stores it (default 10000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The rope variant if it is anything but plain RoPE (which is all this file implements).
    fn unsupported_rope(&self) -> Option<String> {
        let kind = |v: &serde_json::Value| {
            v.get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(|t| t.as_str())
                .map(str::to_string)
        };
        [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
            .filter(|v| !v.is_null())
            .filter_map(kind)
            .find(|k| k != "default")
    }
}

struct Layer {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Qwen2-style q/k/v biases when the weights have them.
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

pub struct Llama {
    info: ModelInfo,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[V, D]`; the embedding table when tied.
    lm_head: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    theta: f64,
    interleaved: bool,
}

impl Llama {
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Self> {
        let bad = |msg: String| Error::format(w.source(), msg);
        if let Some(kind) = cfg.unsupported_rope() {
            return Err(bad(format!(
                "unsupported rope type `{kind}` (only plain RoPE)"
            )));
        }
        let (d, heads, kv_heads, hd) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_kv_heads(),
            cfg.head_dim(),
        );
        if heads == 0
            || kv_heads == 0
            || heads % kv_heads != 0
            || hd == 0
            || hd % 2 != 0
            || heads.checked_mul(hd).is_none()
        {
            return Err(bad(format!(
                "bad attention shape: {heads} heads, {kv_heads} kv heads, head_dim {hd}"
            )));
        }
        let (ff, v) = (cfg.intermediate_size, cfg.vocab_size);
        let embed = w.get("model.embed_tokens.weight", &[v, d])?;
        let mut layers = Vec::new(); // not with_capacity: the count comes from the file
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = |n: &str, shape: &[usize]| w.get(&format!("{p}.self_attn.{n}"), shape);
            let bias = |n: &str, len: usize| w.get_opt(&format!("{p}.self_attn.{n}.bias"), &[len]);
            layers.push(Layer {
                input_norm: w.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                q: attn("q_proj.weight", &[heads * hd, d])?,
                k: attn("k_proj.weight", &[kv_heads * hd, d])?,
                v: attn("v_proj.weight", &[kv_heads * hd, d])?,
                q_bias: bias("q_proj", heads * hd)?,
                k_bias: bias("k_proj", kv_heads * hd)?,
                v_bias: bias("v_proj", kv_heads * hd)?,
                o: attn("o_proj.weight", &[d, heads * hd])?,
                post_norm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                gate: w.get(&format!("{p}.mlp.gate_proj.weight"), &[ff, d])?,
                up: w.get(&format!("{p}.mlp.up_proj.weight"), &[ff, d])?,
                down: w.get(&format!("{p}.mlp.down_proj.weight"), &[d, ff])?,
            });
        }
        let norm = w.get("model.norm.weight", &[d])?;
        let lm_head = match cfg.tie_word_embeddings {
            Some(true) => embed.clone(),
            _ => w
                .get_opt("lm_head.weight", &[v, d])?
                .unwrap_or_else(|| embed.clone()),
        };
        let info = ModelInfo {
            arch: super::Arch::Llama,
            name,
            d_model: d,
            vocab_size: v,
            n_layers: cfg.num_hidden_layers,
            n_heads: cfg.num_attention_heads,
            max_positions: cfg.max_position_embeddings,
            bos_token_id: cfg.bos_token_id,
            eos_token_ids: cfg
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
            pad_token_id: cfg.pad_token_id,
            decoder_start_token_id: None,
        };
        Ok(Llama {
            info,
            embed,
            layers,
            norm,
            lm_head,
            heads,
            kv_heads,
            head_dim: hd,
            eps: cfg.rms_norm_eps,
            theta: cfg.rope_theta(),
            interleaved: cfg.rope_interleaved,
        })
    }

    /// One layer as [`ops::attention_block`] and [`ops::feed_forward_block`]: `x [B, T, D]`,
    /// `bias [B, 1, T, T]`, rotary tables `[T, Dh/2]`. With `rows` (flattened positions
    /// `[M]`), only those: `[1, M, D]` out. With `fill` (an empty KV cache and this layer's
    /// index), also appends the layer's keys and values to the cache, through the fused
    /// forward-only op ([`ops::attention_block_kv`]); `None` when that op does not apply (the
    /// caller then runs the cache path of single ops). Without `fill`, always `Some`.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        x: &Tensor,
        layer: &Layer,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        scale: f64,
        rows: Option<&Tensor>,
        fill: Option<(&mut KvCache, usize)>,
    ) -> Result<Option<Tensor>> {
        fn lin<'a>(w: &'a Tensor, b: &'a Option<Tensor>) -> ops::Linear<'a> {
            ops::Linear { w, b: b.as_ref() }
        }
        let norm = |w| ops::Norm::Rms { w, eps: self.eps };
        let attn = ops::SelfAttention {
            norm: norm(&layer.input_norm),
            q: lin(&layer.q, &layer.q_bias),
            k: lin(&layer.k, &layer.k_bias),
            v: lin(&layer.v, &layer.v_bias),
            o: lin(&layer.o, &None),
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rope: Some(ops::Rotary {
                cos,
                sin,
                interleaved: self.interleaved,
            }),
            bias,
            scale,
        };
        let x = match (fill, rows) {
            (Some((cache, i)), rows) => match ops::attention_block_kv(x, &attn, rows)? {
                Some((y, k, v)) => {
                    cache.append(i, k, v)?;
                    y
                }
                None => return Ok(None),
            },
            (None, Some(rows)) => ops::attention_block_at(x, &attn, rows)?,
            (None, None) => ops::attention_block(x, &attn)?,
        };
        let ffn = ops::FeedForward {
            norm: norm(&layer.post_norm),
            inner: ops::FfnIn::Gated {
                gate: lin(&layer.gate, &None),
                up: lin(&layer.up, &None),
                act: ops::FfnAct::Silu,
            },
            down: lin(&layer.down, &None),
        };
        Ok(Some(ops::feed_forward_block(&x, &ffn)?))
    }

    /// Runs every block; returns the final-normed hidden states at the positions `at` picks
    /// (see [`ops::select_positions`]). When `states` is given, pushes the `L + 1` hidden
    /// states into it (pass `LogitsAt::All` then).
    fn run(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        mut states: Option<&mut Vec<Tensor>>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let (b, t, past) = super::check_decoder_input(
            "llama",
            embeds,
            mask,
            cache.as_deref(),
            self.info.d_model,
            self.layers.len(),
        )?;
        let device = embeds.device();
        let bias = attention_bias(mask, t, true)?; // [B, 1, T, P+T]
        let (cos, sin) = ops::rope_tables(self.head_dim, self.theta, past, t, device)?; // [T, Dh/2]
        let scale = 1.0 / (self.head_dim as f64).sqrt();

        let mut x = embeds.contiguous()?;
        if let Some(s) = states.as_mut() {
            s.push(x.clone());
        }
        let mut picked = false;
        // An empty cache (a prefill) is filled by the fused sub-blocks where they apply.
        let fresh = past == 0;
        for (i, layer) in self.layers.iter().enumerate() {
            if cache.is_none() || fresh {
                // Each residual sub-block as one op, the last layer only at the positions `at`
                // picks.
                let rows = match i + 1 == self.layers.len() {
                    true => ops::logit_rows(at, b, t, device)?,
                    false => None,
                };
                let fill = cache.as_deref_mut().map(|c| (c, i));
                let y = self.block(&x, layer, &bias, &cos, &sin, scale, rows.as_ref(), fill)?;
                if let Some(y) = y {
                    picked = rows.is_some();
                    x = y;
                    if let Some(s) = states.as_mut() {
                        if i + 1 < self.layers.len() {
                            s.push(x.clone());
                        }
                    }
                    continue;
                }
            }
            let h = ops::rms_norm(&x, &layer.input_norm, self.eps)?;
            let q = ops::linear(&h, &layer.q, layer.q_bias.as_ref())?; // [B, T, H*Dh]
            let k = ops::linear(&h, &layer.k, layer.k_bias.as_ref())?; // [B, T, Hkv*Dh]
            let v = ops::linear(&h, &layer.v, layer.v_bias.as_ref())?;
            let q = ops::split_heads(&q, self.heads)?; // [B, H, T, Dh]
            let k = ops::split_heads(&k, self.kv_heads)?; // [B, Hkv, T, Dh]
            let v = ops::split_heads(&v, self.kv_heads)?;
            let q = ops::rope(&q, &cos, &sin, self.interleaved)?;
            let k = ops::rope(&k, &cos, &sin, self.interleaved)?;
            let (k, v) = match cache.as_mut() {
                Some(c) => c.append(i, k, v)?, // [B, Hkv, P+T, Dh]
                None => (k, v),
            };
            let a = ops::attention(&q, &k, &v, &bias, scale)?; // [B, H, T, Dh]
            let a = ops::merge_heads(&a)?; // [B, T, H*Dh]
            x = (x + ops::linear(&a, &layer.o, None)?)?;

            let h = ops::rms_norm(&x, &layer.post_norm, self.eps)?;
            let g = ops::linear(&h, &layer.gate, None)?; // [B, T, F]
            let u = ops::linear(&h, &layer.up, None)?;
            x = (x + ops::linear(&ops::silu_mul(&g, &u)?, &layer.down, None)?)?;
            if let Some(s) = states.as_mut() {
                if i + 1 < self.layers.len() {
                    s.push(x.clone());
                }
            }
        }
        let out = ops::rms_norm(&x, &self.norm, self.eps)?;
        if let Some(s) = states.as_mut() {
            s.push(out.clone());
        }
        match picked {
            true => Ok(out.squeeze(0)?), // [1, M, D] -> [M, D]
            false => ops::select_positions(&out, at),
        }
    }
}

impl CausalLm for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let rows = self.embed.index_select(&flat, 0)?; // [B*T, D]
        Ok(rows.reshape((b, t, self.info.d_model))?)
    }

    fn forward(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let picked = self.run(embeds, mask, cache, None, at)?;
        ops::linear(&picked, &self.lm_head, None)
    }

    fn hidden_states(&self, embeds: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        self.run(embeds, mask, None, Some(&mut states), LogitsAt::All)?;
        Ok(states)
    }

    fn shift_cache(&self, cache: &mut KvCache, by: usize) -> Result<bool> {
        let p = cache.seq_len();
        let device = match cache.layers.iter().flatten().next() {
            Some((k, _)) if by > 0 && p > 0 => k.device().clone(),
            _ => return Ok(true),
        };
        // One rotation by `by` at every cached position, in the model's pair layout.
        let (cos, sin) = ops::rope_tables(self.head_dim, self.theta, by, 1, &device)?; // [1, Dh/2]
        let half = self.head_dim / 2;
        let cos = cos.broadcast_as((p, half))?.contiguous()?; // [P, Dh/2]
        let sin = sin.broadcast_as((p, half))?.contiguous()?;
        for (k, _) in cache.layers.iter_mut().flatten() {
            *k = ops::rope(k, &cos, &sin, self.interleaved)?; // [B, Hkv, P, Dh]
        }
        Ok(true)
    }
}
