//! Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's quirks.
//!
//! - token embeddings scaled by `sqrt(D)` (inside the embedding: a soft prompt is not);
//! - RMSNorm with gain `1 + w` (GGUF files store `1 + w` already: plain gain there);
//! - norms before and after both branches: `x + post(attention(pre(x)))`, same for the MLP;
//! - gated GELU (tanh approximation) MLP;
//! - scores scaled by `query_pre_attn_scalar^-0.5`;
//! - sliding-window layers (`layer_types`, or every other layer for Gemma 2 and five of six
//!   for Gemma 3), Gemma 3's with their own RoPE base (`rope_local_base_freq`);
//! - Gemma 2: attention scores and final logits soft-capped; Gemma 3: per-head q/k norms.
//!
//! Weights use the Hugging Face names; the GGUF loader renames GGUF tensors to these.

use super::decoder::{Block, Decoder, Positions};
use super::layers::{
    Attention, AttentionOptions, Embedding, FeedForward, FfnInner, HeadNorms, Linear, LmHead, Norm,
};
use super::llama::{self, TokenIds};
use super::ops::Activation;
use super::rope::RopeFrequencies;
use super::{Arch, ModelInfo};
use crate::kernels::Kernels;
use crate::load::gguf::Meta;
use crate::load::Weights;
use crate::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

/// Which Gemma.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Gemma2,
    Gemma3,
}

impl Version {
    fn arch(self) -> Arch {
        match self {
            Version::Gemma2 => Arch::Gemma2,
            Version::Gemma3 => Arch::Gemma3,
        }
    }
}

/// The fields of a Hugging Face `config.json` (`gemma2`, `gemma3_text`) the forward pass needs:
/// Llama's, and Gemma's own.
#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// Sizes, epsilon, RoPE base (`rope_parameters` per layer type for Gemma 3), special ids,
    /// tying.
    #[serde(flatten)]
    pub base: llama::Config,
    /// Gemma 3 configs of transformers 4.x: the sliding layers' RoPE base.
    pub rope_local_base_freq: Option<f64>,
    pub query_pre_attn_scalar: Option<f64>,
    pub sliding_window: Option<usize>,
    /// `sliding_attention` / `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 configs of transformers 4.x: every `n`-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub hidden_activation: Option<String>,
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    pub use_bidirectional_attention: Option<bool>,
    /// The norm weights already hold `1 + w` (GGUF files, converted by llama.cpp).
    #[serde(default)]
    pub norm_gain_stored: bool,
}

/// What a config means once its defaults and variants are resolved.
struct Resolved {
    head_dim: usize,
    kv_heads: usize,
    theta: f64,
    local_theta: Option<f64>,
    sliding: Vec<bool>,
    window: Option<usize>,
    scale: f64,
    act: Activation,
}

impl Config {
    /// Checks the config for `version` and resolves its defaults; `bad(field, message)`
    /// builds the error.
    fn resolve(&self, version: Version, bad: &dyn Fn(&str, String) -> Error) -> Result<Resolved> {
        let (d, heads, layers) = (
            self.base.hidden_size,
            self.base.num_attention_heads,
            self.base.num_hidden_layers,
        );
        let kv_heads = self.base.num_key_value_heads.unwrap_or(heads);
        let head_dim = self.base.head_dim.unwrap_or(d / heads.max(1));
        if heads == 0
            || kv_heads == 0
            || heads % kv_heads != 0
            || head_dim == 0
            || !head_dim.is_multiple_of(2)
        {
            return Err(bad(
                "num_attention_heads",
                format!(
                    "bad attention shape: {heads} heads, {kv_heads} kv heads, head_dim {head_dim}"
                ),
            ));
        }
        if heads.checked_mul(head_dim).is_none() {
            return Err(bad(
                "head_dim",
                format!("{heads} heads of {head_dim} overflow"),
            ));
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention",
                "true is not supported (causal only)".into(),
            ));
        }
        let act = match self
            .hidden_activation
            .as_deref()
            .or(self.hidden_act.as_deref())
        {
            None | Some("gelu_pytorch_tanh") | Some("gelu_new") => Activation::GeluTanh,
            Some("gelu") => Activation::GeluErf,
            Some(other) => {
                return Err(bad(
                    "hidden_activation",
                    format!("unsupported activation `{other}`"),
                ))
            }
        };
        let sliding: Vec<bool> = match &self.layer_types {
            Some(types) => {
                if types.len() != layers {
                    return Err(bad(
                        "layer_types",
                        format!("{} entries for {layers} layers", types.len()),
                    ));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(bad(
                            "layer_types",
                            format!("unsupported layer type `{other}`"),
                        )),
                    })
                    .collect::<Result<_>>()?
            }
            None => {
                let pattern = match version {
                    Version::Gemma2 => 2,
                    Version::Gemma3 => self.sliding_window_pattern.unwrap_or(6),
                };
                if pattern == 0 {
                    return Err(bad(
                        "sliding_window_pattern",
                        "must be positive, found 0".into(),
                    ));
                }
                (0..layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        let window = match (sliding.contains(&true), self.sliding_window) {
            (false, _) => None,
            (true, Some(0)) => {
                return Err(bad("sliding_window", "must be positive, found 0".into()))
            }
            (true, w) => Some(w.unwrap_or(4096)),
        };
        let (theta, local_theta) = self.rope_bases(version, bad)?;
        let scalar = self.query_pre_attn_scalar.unwrap_or(256.0);
        if scalar.is_nan() || scalar <= 0.0 {
            return Err(bad(
                "query_pre_attn_scalar",
                format!("must be positive, found {scalar}"),
            ));
        }
        for (field, cap) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if cap.is_some_and(|c| c.is_nan() || c <= 0.0) {
                return Err(bad(field, format!("must be positive, found {cap:?}")));
            }
        }
        Ok(Resolved {
            head_dim,
            kv_heads,
            theta,
            local_theta,
            sliding,
            window,
            scale: 1.0 / scalar.sqrt(),
            act,
        })
    }

    /// The RoPE bases of the global and (Gemma 3) the sliding-window layers; any RoPE type
    /// but the default is refused.
    fn rope_bases(
        &self,
        version: Version,
        bad: &dyn Fn(&str, String) -> Error,
    ) -> Result<(f64, Option<f64>)> {
        let check = |field: &str, v: Option<&Value>| -> Result<Option<f64>> {
            let Some(v) = v.filter(|v| !v.is_null()) else {
                return Ok(None);
            };
            match v
                .get("rope_type")
                .or_else(|| v.get("type"))
                .and_then(Value::as_str)
            {
                None | Some("default") => Ok(v.get("rope_theta").and_then(Value::as_f64)),
                Some(kind) => Err(bad(
                    field,
                    format!("unsupported rope type `{kind}` (only plain RoPE)"),
                )),
            }
        };
        check("rope_scaling", self.base.rope_scaling.as_ref())?;
        let params = self.base.rope_parameters.as_ref();
        Ok(match version {
            Version::Gemma2 => {
                let theta = check("rope_parameters", params)?.or(self.base.rope_theta);
                (theta.unwrap_or(10000.0), None)
            }
            Version::Gemma3 => {
                let full = check(
                    "rope_parameters.full_attention",
                    params.and_then(|p| p.get("full_attention")),
                )?;
                let local = check(
                    "rope_parameters.sliding_attention",
                    params.and_then(|p| p.get("sliding_attention")),
                )?;
                (
                    full.or(self.base.rope_theta).unwrap_or(1_000_000.0),
                    Some(local.or(self.rope_local_base_freq).unwrap_or(10000.0)),
                )
            }
        })
    }
}

/// The Gemma 2 / Gemma 3 description: builds a [`Decoder`].
pub struct Gemma;

impl Gemma {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(version: Version, cfg: &Config, w: &Weights, name: String) -> Result<Decoder> {
        let bad = |field: &str, msg: String| Error::config(w.source(), field, msg);
        let r = cfg.resolve(version, &bad)?;
        let (d, heads, hd, kv_heads) = (
            cfg.base.hidden_size,
            cfg.base.num_attention_heads,
            r.head_dim,
            r.kv_heads,
        );
        let (ff, v, eps) = (
            cfg.base.intermediate_size,
            cfg.base.vocab_size,
            cfg.base.rms_norm_eps,
        );
        let norm = |name: &str, dim: usize| -> Result<Norm> {
            let weight = w.get(&format!("{name}.weight"), &[dim])?;
            Ok(match cfg.norm_gain_stored {
                true => Norm::rms(weight, eps),
                false => Norm::rms_plus_one(weight, eps),
            })
        };
        let embed = w.get_frozen("model.embed_tokens.weight", &[v, d])?;
        let mut blocks = Vec::new(); // not with_capacity: the count comes from the file
        for (i, &sliding) in r.sliding.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let proj = |n: &str, shape: [usize; 2]| -> Result<Linear> {
                let name = format!("{p}.self_attn.{n}");
                let bias = match cfg.attention_bias {
                    true => Some(w.get(&format!("{name}.bias"), &shape[..1])?),
                    false => None,
                };
                Ok(Linear::frozen(w.get_frozen(&format!("{name}.weight"), &shape)?, bias))
            };
            let mlp = |n: &str, shape: [usize; 2]| -> Result<Linear> {
                Ok(Linear::frozen(
                    w.get_frozen(&format!("{p}.mlp.{n}.weight"), &shape)?,
                    None,
                ))
            };
            let head_norms = match version {
                Version::Gemma2 => None,
                Version::Gemma3 => Some(HeadNorms {
                    q: norm(&format!("{p}.self_attn.q_norm"), hd)?,
                    k: norm(&format!("{p}.self_attn.k_norm"), hd)?,
                }),
            };
            blocks.push(Block {
                attention: Attention {
                    norm: norm(&format!("{p}.input_layernorm"), d)?,
                    q: proj("q_proj", [heads * hd, d])?,
                    k: proj("k_proj", [kv_heads * hd, d])?,
                    v: proj("v_proj", [kv_heads * hd, d])?,
                    qkv: None,
                    o: proj("o_proj", [d, heads * hd])?,
                    heads,
                    kv_heads,
                    head_dim: hd,
                    scale: r.scale,
                    options: AttentionOptions {
                        sliding_window: if sliding { r.window } else { None },
                        head_norms,
                        logit_softcap: cfg.attn_logit_softcapping,
                        output_norm: Some(norm(&format!("{p}.post_attention_layernorm"), d)?),
                    },
                },
                feed_forward: FeedForward {
                    norm: norm(&format!("{p}.pre_feedforward_layernorm"), d)?,
                    inner: FfnInner::Gated {
                        gate: mlp("gate_proj", [ff, d])?,
                        up: mlp("up_proj", [ff, d])?,
                    },
                    act: r.act,
                    down: mlp("down_proj", [d, ff])?,
                    output_norm: Some(norm(&format!("{p}.post_feedforward_layernorm"), d)?),
                },
            });
        }
        // Gemma ties the head to the embedding unless the config says otherwise.
        let lm_head = match cfg.base.tie_word_embeddings {
            Some(false) => w.get_frozen("lm_head.weight", &[v, d])?,
            _ => embed.clone(),
        };
        let head = LmHead::frozen(lm_head, None);
        let arch = version.arch();
        let info = ModelInfo {
            arch,
            name,
            d_model: d,
            vocab_size: v,
            n_layers: cfg.base.num_hidden_layers,
            n_heads: heads,
            max_positions: cfg.base.max_position_embeddings,
            bos_token_id: cfg.base.bos_token_id,
            eos_token_ids: cfg
                .base
                .eos_token_id
                .as_ref()
                .map(TokenIds::to_vec)
                .unwrap_or_default(),
            pad_token_id: cfg.base.pad_token_id,
            decoder_start_token_id: None,
        };
        Ok(Decoder {
            info,
            embedding: Embedding::frozen(embed, arch.name()).scaled((d as f64).sqrt()),
            positions: Positions::Rotary {
                head_dim: hd,
                frequencies: RopeFrequencies::plain(hd, r.theta),
                interleaved: false,
            },
            blocks,
            final_norm: norm("model.norm", d)?,
            head: match cfg.final_logit_softcapping {
                Some(cap) => head.soft_capped(cap),
                None => head,
            },
            sliding_rope_theta: r.local_theta,
            kernels: Kernels::fast(),
        })
    }
}

/// The Hugging Face name of part `part` of a GGUF layer `blk.{i}.{part}` of a Gemma model
/// (`None` for parts it does not use). llama.cpp's `ffn_norm` is Gemma's pre-feed-forward norm.
pub(crate) fn gguf_layer_part(part: &str) -> Option<&'static str> {
    Some(match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "post_attention_norm" => "post_attention_layernorm",
        "ffn_norm" => "pre_feedforward_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    })
}

/// The config of a GGUF `gemma2` / `gemma3` file from its metadata, as llama.cpp reads it:
/// norm weights stored as `1 + w`; every other layer (Gemma 2) or five of six (Gemma 3)
/// sliding; scores scaled by `key_length^-0.5` (what `query_pre_attn_scalar` is for every
/// Gemma but the 27B ones); Gemma 3's local RoPE base `rope.freq_base_swa` or 10000.
pub(crate) fn gguf_config(meta: &Meta, version: Version, vocab_size: usize) -> Result<Config> {
    let arch = version.arch().name();
    let key = |k: &str| format!("{arch}.{k}");
    let heads = meta.usize(&key("attention.head_count"))?;
    let hidden = meta.usize(&key("embedding_length"))?;
    let head_dim = match meta.opt(&key("attention.key_length"), Meta::usize)? {
        Some(k) => k,
        None if heads > 0 => hidden / heads,
        None => {
            return Err(Error::config(
                meta.path,
                key("attention.head_count"),
                "must be positive, found 0",
            ))
        }
    };
    let float = |k: &str| meta.opt(&key(k), Meta::f64);
    let id = |k: &str| -> Result<Option<u32>> {
        Ok(meta
            .opt(k, Meta::usize)?
            .and_then(|i| u32::try_from(i).ok()))
    };
    let eos: Vec<u32> = [
        id("tokenizer.ggml.eos_token_id")?,
        id("tokenizer.ggml.eot_token_id")?,
    ]
    .into_iter()
    .flatten()
    .fold(Vec::new(), |mut acc, i| {
        if !acc.contains(&i) {
            acc.push(i);
        }
        acc
    });
    let (attn_cap, final_cap) = match version {
        // transformers' defaults when the file has no value, as its GGUF loader.
        Version::Gemma2 => (
            Some(float("attn_logit_softcapping")?.unwrap_or(50.0)),
            Some(float("final_logit_softcapping")?.unwrap_or(30.0)),
        ),
        Version::Gemma3 => (None, None),
    };
    Ok(Config {
        base: llama::Config {
            hidden_size: hidden,
            intermediate_size: meta.usize(&key("feed_forward_length"))?,
            num_hidden_layers: meta.usize(&key("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: meta.opt(&key("attention.head_count_kv"), Meta::usize)?,
            head_dim: Some(head_dim),
            rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: float("rope.freq_base")?,
            rope_parameters: None,
            rope_scaling: None,
            hidden_act: None,
            vocab_size,
            max_position_embeddings: meta.opt(&key("context_length"), Meta::usize)?,
            tie_word_embeddings: None,
            bos_token_id: id("tokenizer.ggml.bos_token_id")?,
            eos_token_id: Some(TokenIds::Many(eos)),
            pad_token_id: id("tokenizer.ggml.padding_token_id")?,
            rope_interleaved: false,
            rope_frequencies: None,
        },
        rope_local_base_freq: float("rope.freq_base_swa")?,
        query_pre_attn_scalar: Some(head_dim as f64),
        sliding_window: meta.opt(&key("attention.sliding_window"), Meta::usize)?,
        layer_types: None,
        sliding_window_pattern: None,
        final_logit_softcapping: final_cap,
        attn_logit_softcapping: attn_cap,
        hidden_activation: None,
        hidden_act: None,
        attention_bias: false,
        use_bidirectional_attention: None,
        norm_gain_stored: true,
    })
}
