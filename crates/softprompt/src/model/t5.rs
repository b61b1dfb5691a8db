//! T5 encoder-decoder (T5 v1.0, T5 v1.1 / flan-T5, mT5) with Hugging Face tensor names.
//!
//! T5 differs from the decoder-only models in a few ways that matter numerically:
//! RMS "LayerNorm" without bias, no `1/sqrt(Dh)` score scaling, and a learned bias per
//! (relative-distance bucket, head) added to the attention scores. That bias lives in block 0
//! of each stack and is shared by all blocks. v1.0 ties the LM head to the embedding table and
//! scales the decoder output by `d_model^-0.5`; v1.1 has a separate `lm_head` and no scaling.
//!
//! Computation runs in the dtype of the weights (f32 as loaded; the tests also run f64).

use super::layers::{
    Attention, AttentionContext, AttentionOptions, Embedding, FeedForward, FfnInner, Linear,
    LmHead, Norm,
};
use super::ops;
use super::{attention_bias, Arch, KvCache, LogitsAt, ModelInfo, Seq2SeqLm};
use crate::kernels::Kernels;
use crate::load::Weights;
use crate::Result;
use candle_core::{DType, Tensor};
use serde::Deserialize;

/// The fields of a Hugging Face `config.json` (`model_type` "t5" or "mt5") that we use.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    /// Defaults to `num_layers`.
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `"relu"` (v1.0), `"gated-gelu"` (v1.1 / flan-T5), ...; checked while parsing.
    #[serde(default)]
    pub feed_forward_proj: FeedForwardProj,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Written by transformers 5; defaults to `tie_word_embeddings`.
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    /// Defaults to `pad_token_id` (as in transformers' T5).
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

fn default_num_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}

/// `eos_token_id` as one id or a list of ids.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// Activation of the feed-forward block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Relu,
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh approximation (transformers' `gelu_new`).
    GeluNew,
    Silu,
}

/// `feed_forward_proj`: `"[gated-]ACT"`. As in transformers, `"gated-gelu"` means `gelu_new`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FeedForwardProj {
    pub gated: bool,
    pub act: Activation,
}

impl Default for FeedForwardProj {
    fn default() -> Self {
        FeedForwardProj {
            gated: false,
            act: Activation::Relu,
        }
    }
}

impl TryFrom<String> for FeedForwardProj {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        let (gated, name) = match s.strip_prefix("gated-") {
            Some(rest) => (true, rest),
            None => (false, s.as_str()),
        };
        let act = match (gated, name) {
            (true, "gelu") => Activation::GeluNew,
            (_, "gelu") => Activation::Gelu,
            (_, "gelu_new") => Activation::GeluNew,
            (_, "relu") => Activation::Relu,
            (_, "silu") | (_, "swish") => Activation::Silu,
            _ => {
                return Err(format!(
                    "unsupported feed_forward_proj `{s}` (expected `ACT` or `gated-ACT` with ACT \
                     one of relu, gelu, gelu_new, silu)"
                ))
            }
        };
        Ok(FeedForwardProj { gated, act })
    }
}

impl Activation {
    fn layer(self) -> ops::Activation {
        match self {
            Activation::Relu => ops::Activation::Relu,
            Activation::Gelu => ops::Activation::GeluErf,
            Activation::GeluNew => ops::Activation::GeluTanh,
            Activation::Silu => ops::Activation::Silu,
        }
    }
}

struct Block {
    /// Self-attention with its pre-norm.
    self_attn: Attention,
    /// Decoder only: cross-attention over the encoder output, with its pre-norm.
    cross: Option<Attention>,
    ff: FeedForward,
}

struct Stack {
    blocks: Vec<Block>,
    final_norm: Norm,
    /// `[num_buckets, H]`, from block 0.
    relative_bias: Tensor,
}

pub struct T5 {
    info: ModelInfo,
    /// `shared` `[V, D]`, input embeddings of both stacks (and the head when tied).
    embedding: Embedding,
    encoder: Stack,
    decoder: Stack,
    /// The untied `lm_head`, or `shared` scaled by `d_model^-0.5` (v1.0).
    head: LmHead,
    heads: usize,
    num_buckets: usize,
    max_distance: usize,
    kernels: Kernels,
}

impl T5 {
    pub fn new(cfg: &Config, w: &Weights, name: String) -> Result<Self> {
        let d = cfg.d_model;
        let inner = cfg.num_heads * cfg.d_kv;
        if d == 0 || cfg.num_heads == 0 || cfg.d_kv == 0 || cfg.d_ff == 0 || cfg.vocab_size == 0 {
            crate::bail!(
                "t5 config: d_model, num_heads, d_kv, d_ff and vocab_size must be positive"
            );
        }
        if cfg.relative_attention_num_buckets == 0 {
            crate::bail!("t5 config: relative_attention_num_buckets must be positive");
        }
        let n_dec = cfg.num_decoder_layers.unwrap_or(cfg.num_layers);
        if cfg.num_layers == 0 || n_dec == 0 {
            crate::bail!("t5 config: num_layers and num_decoder_layers must be positive");
        }
        let eps = cfg.layer_norm_epsilon;
        let shared = w.get("shared.weight", &[cfg.vocab_size, d])?;
        let lin = |name: String, shape: [usize; 2]| -> Result<Linear> {
            Ok(Linear::new(w.get(&name, &shape)?, None))
        };
        let norm = |p: &str| -> Result<Norm> {
            Ok(Norm::rms(
                w.get(&format!("{p}.layer_norm.weight"), &[d])?,
                eps,
            ))
        };
        // Layer `p` (its norm) with the attention weights under `p.{kind}`; no score scaling.
        let attention = |p: &str, kind: &str| -> Result<Attention> {
            let q = |n: &str| lin(format!("{p}.{kind}.{n}.weight"), [inner, d]);
            Ok(Attention {
                norm: norm(p)?,
                q: q("q")?,
                k: q("k")?,
                v: q("v")?,
                qkv: None,
                o: lin(format!("{p}.{kind}.o.weight"), [d, inner])?,
                heads: cfg.num_heads,
                kv_heads: cfg.num_heads,
                head_dim: cfg.d_kv,
                scale: 1.0,
                options: AttentionOptions::default(),
            })
        };
        let ff = cfg.feed_forward_proj;
        let feed_forward = |p: &str| -> Result<FeedForward> {
            let dense = format!("{p}.DenseReluDense");
            let wi = |n: &str| lin(format!("{dense}.{n}.weight"), [cfg.d_ff, d]);
            Ok(FeedForward {
                norm: norm(p)?,
                inner: match ff.gated {
                    true => FfnInner::Gated {
                        gate: wi("wi_0")?,
                        up: wi("wi_1")?,
                    },
                    false => FfnInner::Plain(wi("wi")?),
                },
                act: ff.act.layer(),
                down: lin(format!("{dense}.wo.weight"), [d, cfg.d_ff])?,
                output_norm: None,
            })
        };
        let relative = |stack: &str| {
            w.get(
                &format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                &[cfg.relative_attention_num_buckets, cfg.num_heads],
            )
        };

        let mut enc_blocks = Vec::new(); // not with_capacity: the count comes from the file
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            enc_blocks.push(Block {
                self_attn: attention(&format!("{p}.0"), "SelfAttention")?,
                cross: None,
                ff: feed_forward(&format!("{p}.1"))?,
            });
        }
        let mut dec_blocks = Vec::new();
        for i in 0..n_dec {
            let p = format!("decoder.block.{i}.layer");
            dec_blocks.push(Block {
                self_attn: attention(&format!("{p}.0"), "SelfAttention")?,
                cross: Some(attention(&format!("{p}.1"), "EncDecAttention")?),
                ff: feed_forward(&format!("{p}.2"))?,
            });
        }
        let encoder = Stack {
            blocks: enc_blocks,
            final_norm: Norm::rms(w.get("encoder.final_layer_norm.weight", &[d])?, eps),
            relative_bias: relative("encoder")?,
        };
        let decoder = Stack {
            blocks: dec_blocks,
            final_norm: Norm::rms(w.get("decoder.final_layer_norm.weight", &[d])?, eps),
            relative_bias: relative("decoder")?,
        };
        let scale = cfg.scale_decoder_outputs.unwrap_or(cfg.tie_word_embeddings);
        let head = LmHead::new(
            match cfg.tie_word_embeddings {
                true => shared.clone(),
                false => w.get("lm_head.weight", &[cfg.vocab_size, d])?,
            },
            scale.then(|| (d as f64).powf(-0.5)),
        );
        let pad = cfg.pad_token_id.unwrap_or(0);
        let info = ModelInfo {
            arch: Arch::T5,
            name,
            d_model: d,
            vocab_size: cfg.vocab_size,
            // The decoder's: the number of self-attention caches generation needs.
            n_layers: n_dec,
            n_heads: cfg.num_heads,
            max_positions: None,
            bos_token_id: None,
            eos_token_ids: cfg
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_else(|| vec![1]),
            pad_token_id: Some(pad),
            decoder_start_token_id: Some(cfg.decoder_start_token_id.unwrap_or(pad)),
        };
        Ok(T5 {
            info,
            embedding: Embedding::new(shared, "t5"),
            encoder,
            decoder,
            head,
            heads: cfg.num_heads,
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
            kernels: Kernels::fast(),
        })
    }

    /// transformers' `_relative_position_bucket` for `rel = key - query`, in the same f32
    /// arithmetic so that bucket edges fall where PyTorch puts them.
    fn bucket(&self, rel: i64, bidirectional: bool) -> u32 {
        let mut nb = self.num_buckets as i64;
        let mut bucket = 0i64;
        let n = if bidirectional {
            nb /= 2;
            if rel > 0 {
                bucket += nb;
            }
            rel.abs()
        } else {
            (-rel).max(0)
        };
        let max_exact = nb / 2;
        bucket += if n < max_exact {
            n
        } else {
            let log_ratio = (n as f32 / max_exact as f32).ln();
            let log_range = (self.max_distance as f64 / max_exact as f64).ln() as f32;
            let large = max_exact + (log_ratio / log_range * (nb - max_exact) as f32) as i64;
            large.min(nb - 1)
        };
        // Degenerate configs (very few buckets) must still index the table.
        bucket.clamp(0, self.num_buckets as i64 - 1) as u32
    }

    /// Relative-position bias `[1, H, Tq, K]` for queries at `q_start .. q_start+Tq` and keys
    /// at `0 .. K`.
    fn position_bias(
        &self,
        table: &Tensor,
        q_start: usize,
        t_q: usize,
        k_len: usize,
        bidirectional: bool,
    ) -> Result<Tensor> {
        // One bucket per distinct relative distance `k - q`, from `-(q_end - 1)` up.
        let q_end = q_start + t_q;
        let lowest = 1 - q_end as i64;
        let by_distance: Vec<u32> = (lowest..k_len as i64)
            .map(|rel| self.bucket(rel, bidirectional))
            .collect();
        let ids: Vec<u32> = (q_start..q_end)
            .flat_map(|q| (0..k_len).map(move |k| (k as i64 - q as i64 - lowest) as usize))
            .map(|i| by_distance[i])
            .collect();
        let ids = Tensor::from_vec(ids, t_q * k_len, table.device())?;
        let bias = table.index_select(&ids, 0)?; // [Tq*K, H]
        Ok(bias
            .reshape((t_q, k_len, self.heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .contiguous()?)
    }

    fn check_hidden(&self, x: &Tensor, mask: &Tensor, what: &str) -> Result<(usize, usize)> {
        let (b, s, d) = x.dims3().map_err(|_| {
            crate::Error::invalid(format!("t5 {what}: expected [B, S, D], got {:?}", x.dims()))
        })?;
        if d != self.info.d_model {
            crate::bail!(
                "t5 {what}: last dimension is {d}, the model's d_model is {}",
                self.info.d_model
            );
        }
        if s == 0 {
            crate::bail!("t5 {what}: no positions");
        }
        if mask.dims() != [b, s] {
            crate::bail!(
                "t5 {what}: mask has shape {:?}, expected [{b}, {s}]",
                mask.dims()
            );
        }
        Ok((b, s))
    }

    fn run_encoder(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        mut states: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (_, s) = self.check_hidden(embeds, mask, "encoder input")?;
        let pos = self.position_bias(&self.encoder.relative_bias, 0, s, s, true)?; // [1,H,S,S]
        let bias = attention_bias(mask, s, false)?
            .to_dtype(embeds.dtype())?
            .broadcast_add(&pos)?; // [B,H,S,S]
        let ctx = AttentionContext {
            bias: &bias,
            rotary: None,
            sliding: None,
            kernels: self.kernels,
        };
        let mut x = embeds.clone();
        for block in &self.encoder.blocks {
            if let Some(st) = states.as_deref_mut() {
                st.push(x.clone());
            }
            x = block.self_attn.forward(&x, &ctx, None, None)?;
            x = block.ff.forward(self.kernels, &x)?;
        }
        let out = self.encoder.final_norm.forward(self.kernels, &x)?;
        if let Some(st) = states {
            st.push(out.clone());
        }
        Ok(out)
    }

    /// Decoder stack up to and including the final norm: `[B, T, D]`.
    fn run_decoder(
        &self,
        decoder_ids: &Tensor,
        encoder_out: &Tensor,
        encoder_mask: &Tensor,
        mut cache: Option<&mut KvCache>,
        mut states: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b_enc, _) = self.check_hidden(encoder_out, encoder_mask, "encoder output")?;
        let (b, t) = decoder_ids.dims2().map_err(|_| {
            crate::Error::invalid(format!(
                "t5 decoder ids: expected [B, T], got {:?}",
                decoder_ids.dims()
            ))
        })?;
        if b != b_enc {
            crate::bail!("t5 decode: {b} decoder rows but {b_enc} encoder rows");
        }
        if t == 0 {
            crate::bail!("t5 decode: no decoder positions");
        }
        let n = self.decoder.blocks.len();
        if let Some(c) = cache.as_deref_mut() {
            if c.layers.len() < n {
                c.layers.resize(n, None);
            }
            if c.cross.len() < n {
                c.cross.resize(n, None);
            }
        }
        let past = cache.as_deref().map(KvCache::seq_len).unwrap_or(0);
        let device = decoder_ids.device();

        let self_mask = Tensor::ones((b, past + t), DType::F32, device)?;
        let pos = self.position_bias(&self.decoder.relative_bias, past, t, past + t, false)?;
        let dtype = encoder_out.dtype();
        let self_bias = attention_bias(&self_mask, t, true)?
            .to_dtype(dtype)?
            .broadcast_add(&pos)?; // [B,H,T,P+T]
        let cross_bias = attention_bias(encoder_mask, t, false)?.to_dtype(dtype)?; // [B,1,T,S]

        let ctx = AttentionContext {
            bias: &self_bias,
            rotary: None,
            sliding: None,
            kernels: self.kernels,
        };
        let mut x = self.embed(decoder_ids)?; // [B,T,D]
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            if let Some(st) = states.as_deref_mut() {
                st.push(x.clone());
            }
            let fill = cache.as_deref_mut().map(|c| (c, i));
            x = block.self_attn.forward(&x, &ctx, None, fill)?;
            if let Some(cross) = &block.cross {
                let slot = cache.as_deref_mut().map(|c| &mut c.cross[i]);
                x = cross.cross(self.kernels, &x, encoder_out, &cross_bias, slot)?;
            }
            x = block.ff.forward(self.kernels, &x)?;
        }
        let out = self.decoder.final_norm.forward(self.kernels, &x)?;
        if let Some(st) = states {
            st.push(out.clone());
        }
        Ok(out)
    }
}

/// Checks that `ids` is a u32 tensor of in-range token ids.
fn check_ids(ids: &Tensor, vocab: usize) -> Result<()> {
    if ids.dtype() != DType::U32 {
        crate::bail!("t5: token ids must be u32, got {:?}", ids.dtype());
    }
    if ids.elem_count() > 0 {
        let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max as usize >= vocab {
            crate::bail!("t5: token id {max} is out of range (vocabulary size {vocab})");
        }
    }
    Ok(())
}

impl Seq2SeqLm for T5 {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        check_ids(ids, self.info.vocab_size)?;
        if ids.rank() != 2 {
            crate::bail!("t5 embed: expected ids [B, S], got {:?}", ids.dims());
        }
        self.embedding.forward(ids)
    }

    fn encode(&self, embeds: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.run_encoder(embeds, mask, None)
    }

    fn decode(
        &self,
        decoder_ids: &Tensor,
        encoder_out: &Tensor,
        encoder_mask: &Tensor,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
    ) -> Result<Tensor> {
        let h = self.run_decoder(decoder_ids, encoder_out, encoder_mask, cache, None)?;
        self.head.forward(&ops::select_positions(&h, at)?)
    }

    fn hidden_states(
        &self,
        embeds: &Tensor,
        mask: &Tensor,
        decoder_ids: &Tensor,
    ) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let mut enc_states = Vec::with_capacity(self.encoder.blocks.len() + 1);
        let enc = self.run_encoder(embeds, mask, Some(&mut enc_states))?;
        let mut dec_states = Vec::with_capacity(self.decoder.blocks.len() + 1);
        self.run_decoder(decoder_ids, &enc, mask, None, Some(&mut dec_states))?;
        Ok((enc_states, dec_states))
    }

    fn kernels(&self) -> Kernels {
        self.kernels
    }

    fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }
}
