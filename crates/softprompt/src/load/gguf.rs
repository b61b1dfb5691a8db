//! GGUF files (llama.cpp): matrices kept in their file encoding ([`WeightStorage::Stored`],
//! see [`crate::kernels::weight`]) or dequantized to f32, a config and a tokenizer (byte-level
//! BPE in [`super::gguf_bpe`], SentencePiece-style in [`super::gguf_spm`]) built from the
//! metadata. Llama-layout files (`llama`, `mistral`, `qwen2`, `qwen3`, `phi3`) are read here,
//! with a family's extra tensor names from its description; Gemma's metadata and tensor names
//! are read by its description ([`crate::model::gemma`]).
//!
//! The q/k weights of `llama` / `mistral` files stay in GGUF's permuted row order, so the
//! model uses GGML's adjacent-pair RoPE (`rope_interleaved`), which gives the same numbers as
//! un-permuting them; the other families' converters do not permute.

use super::{gguf_bpe, model_name, Model, WeightStorage, Weights};
use crate::model::rope::RopeFrequencies;
use crate::model::{gemma, llama, mistral, phi3, qwen2, qwen3, Backbone};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;

/// Architectures (`general.architecture`) this loader knows.
const SUPPORTED: &str = "llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3";

/// A GGUF Llama file read into memory.
pub struct GgufLlama {
    /// f32 tensors under Hugging Face names; q/k rows in GGUF's permuted order (see the
    /// module doc and [`super::export::unpermute_rows`]).
    pub tensors: HashMap<String, Tensor>,
    /// Matrices kept in their file encoding (empty when read as f32), same names and order.
    pub stored: HashMap<String, Arc<QTensor>>,
    /// The config from the metadata (`rope_interleaved` set).
    pub config: llama::Config,
    /// The byte-level BPE tokenizer built from the metadata.
    pub tokenizer: Tokenizer,
}

/// Loads the GGUF file `path`, its matrices kept as stored (see [`load_with`]).
pub fn load(path: &Path, device: &Device) -> Result<Model> {
    load_with(path, device, WeightStorage::Stored)
}

/// Loads the GGUF file `path`; `storage` says whether its matrices stay in their file
/// encoding (on the CPU) or are dequantised to f32 now.
pub fn load_with(path: &Path, device: &Device, storage: WeightStorage) -> Result<Model> {
    let (content, mut reader) = open(path)?;
    let meta = Meta {
        path,
        map: &content.metadata,
    };
    let arch = meta.string("general.architecture")?;
    let name = model_name(path);
    let (decoder, tokenizer) = match arch.as_str() {
        "gemma2" | "gemma3" => {
            let version = match arch.as_str() {
                "gemma2" => gemma::Version::Gemma2,
                _ => gemma::Version::Gemma3,
            };
            let rename = |n: &str| hf_tensor_name(n, gemma::gguf_layer_part);
            let mut config = gemma::gguf_config(&meta, version, vocab_size(path, &content)?)?;
            let has_head = content.tensor_infos.keys().any(|n| rename(n).as_deref() == Some("lm_head.weight"));
            config.base.tie_word_embeddings = Some(!has_head);
            let (tensors, stored) = read_tensors(path, &content, &mut reader, device, storage, rename, |w| {
                gemma::Gemma::new(version, &config, w, String::new())
            })?;
            let eos = config.base.eos_token_id.as_ref().and_then(|e| e.to_vec().first().copied());
            let tokenizer = tokenizer(&meta, &arch, config.base.bos_token_id, eos)?;
            let weights = Weights::new(tensors, path).with_stored(stored);
            (gemma::Gemma::new(version, &config, &weights, name)?, tokenizer)
        }
        _ => {
            let (llama, sliding_window) = read_llama(&meta, &content, &mut reader, device, storage)?;
            let weights = Weights::new(llama.tensors, path).with_stored(llama.stored);
            let decoder = build_llama_layout(&arch, llama.config, sliding_window, &weights, name)?;
            (decoder, llama.tokenizer)
        }
    };
    Ok(Model {
        backbone: Backbone::Causal(Box::new(decoder)),
        tokenizer: Some(tokenizer),
        path: path.to_path_buf(),
        device: device.clone(),
    })
}

/// Reads the tensors (dequantised to f32 on `device`), the config and the tokenizer of the
/// GGUF Llama file `path` (a sliding-window Mistral file is refused: its window has no place
/// in a Llama config; so are the other families).
pub fn read(path: &Path, device: &Device) -> Result<GgufLlama> {
    let (content, mut reader) = open(path)?;
    let meta = Meta {
        path,
        map: &content.metadata,
    };
    let arch = meta.string("general.architecture")?;
    if arch != "llama" && arch != "mistral" {
        return Err(Error::config(
            path,
            "general.architecture",
            format!("`{arch}`: only llama GGUF files can be read as a Llama model"),
        ));
    }
    let (llama, window) = read_llama(&meta, &content, &mut reader, device, WeightStorage::F32)?;
    if let Some(w) = window {
        return Err(Error::config(
            path,
            "attention.sliding_window",
            format!("a sliding window ({w}) is not supported here (Llama without a window only)"),
        ));
    }
    Ok(llama)
}

/// The Llama-layout file of `meta` (`llama`, `mistral`, `qwen2`, `qwen3`, `phi3`) and its
/// sliding window.
fn read_llama(
    meta: &Meta,
    content: &Content,
    reader: &mut BufReader<File>,
    device: &Device,
    storage: WeightStorage,
) -> Result<(GgufLlama, Option<usize>)> {
    let path = meta.path;
    let arch = meta.string("general.architecture")?;
    let layer_part: fn(&str) -> Option<&'static str> = match arch.as_str() {
        "llama" | "mistral" | "qwen2" => llama_layer_part,
        "qwen3" => qwen3::gguf_layer_part,
        "phi3" => phi3::gguf_layer_part,
        _ => {
            return Err(Error::config(
                path,
                "general.architecture",
                format!("unsupported architecture `{arch}` (supported: {SUPPORTED})"),
            ))
        }
    };
    let divisors = rope_divisors(path, content, reader)?;
    let config = config(meta, &arch, vocab_size(path, content)?, divisors.as_deref())?;
    let window = meta.opt(&format!("{arch}.attention.sliding_window"), Meta::usize)?;
    let rename = |n: &str| hf_name(n, layer_part);
    let (mut tensors, stored) = read_tensors(path, content, reader, device, storage, rename, |w| {
        if let Some(d) = &divisors {
            w.get(ROPE_FREQS, &[d.len()])?; // taken: the config holds them
        }
        build_llama_layout(&arch, config.clone(), window, w, String::new())
    })?;
    tensors.remove(ROPE_FREQS);
    let eos = config.eos_token_id.as_ref().and_then(|e| e.to_vec().first().copied());
    let tokenizer = tokenizer(meta, &arch, config.bos_token_id, eos)?;
    Ok((
        GgufLlama {
            tensors,
            stored,
            config,
            tokenizer,
        },
        window,
    ))
}

/// The decoder of a Llama-layout file of architecture `arch` (checked by `read_llama`).
fn build_llama_layout(
    arch: &str,
    config: llama::Config,
    sliding_window: Option<usize>,
    weights: &Weights,
    name: String,
) -> Result<crate::model::Decoder> {
    match arch {
        "qwen2" => qwen2::Qwen2::new(&qwen2::Config::from(config), weights, name),
        "qwen3" => qwen3::Qwen3::new(&qwen3::Config::from(config), weights, name),
        "phi3" => phi3::Phi3::new(&phi3::Config::gguf(config, sliding_window), weights, name),
        _ => mistral::Mistral::new(&mistral::Config { llama: config, sliding_window }, weights, name),
    }
}

/// llama.cpp's per-frequency RoPE divisors (`rope_freqs.weight`, llama3 scaling), decoded
/// ahead of the other tensors because the config depends on them (a small 1-D tensor).
fn rope_divisors(path: &Path, content: &Content, reader: &mut BufReader<File>) -> Result<Option<Vec<f32>>> {
    let Some(info) = content.tensor_infos.get(ROPE_FREQS) else { return Ok(None) };
    if !matches!(info.shape.dims(), [n] if *n <= 1 << 16) {
        return Ok(None); // not divisors: left untaken, so the tensor check refuses the file
    }
    let decoded = catch_unwind(AssertUnwindSafe(|| -> candle_core::Result<Vec<f32>> {
        content.tensor(reader, ROPE_FREQS, &Device::Cpu)?.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?.to_vec1()
    }))
    .map_err(|_| Error::format(path, format!("tensor `{ROPE_FREQS}` cannot be decoded")))?
    .map_err(|e| Error::format(path, format!("tensor `{ROPE_FREQS}`: {}", first_line(&e))))?;
    Ok(Some(decoded))
}

/// The rows of `token_embd.weight` (read from the tensor table: nothing is decoded yet).
fn vocab_size(path: &Path, content: &Content) -> Result<usize> {
    match content.tensor_infos.get("token_embd.weight") {
        Some(info) => Ok(info.shape.dims().first().copied().unwrap_or(0)),
        None => Err(Error::format(path, "missing tensor `token_embd.weight`")),
    }
}

/// The header of the GGUF file `path`, checked, and a reader positioned anywhere.
fn open(path: &Path) -> Result<(Content, BufReader<File>)> {
    let corrupt = |e: &dyn std::fmt::Display| {
        Error::format(
            path,
            format!(
                "not a valid GGUF file (truncated or corrupt): {}",
                first_line(e)
            ),
        )
    };
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut reader = BufReader::new(file);
    // candle's reader checks lengths against the file size; the catch is a last resort
    // against arithmetic panics on crafted headers.
    let content = catch_unwind(AssertUnwindSafe(|| Content::read(&mut reader)))
        .map_err(|_| corrupt(&"unreadable header"))?
        .map_err(
            |e| match first_line(&e).strip_prefix("unknown dtype for tensor ") {
                Some(code) => Error::format(
                    path,
                    format!(
                    "unsupported GGML tensor type {code} (supported: F32, F16, BF16, Q4_0, Q4_1, \
                     Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)"
                ),
                ),
                None => corrupt(&e),
            },
        )?;
    super::gguf_checks::check_extents(path, &content, file_size)?;
    let meta = Meta {
        path,
        map: &content.metadata,
    };
    let arch = meta.string("general.architecture")?;
    if !SUPPORTED.split(", ").any(|s| s == arch) {
        return Err(Error::config(
            path,
            "general.architecture",
            format!("unsupported architecture `{arch}` (supported: {SUPPORTED})"),
        ));
    }
    Ok((content, reader))
}

/// A stored tensor or one dequantised to f32.
enum Read {
    Stored(Arc<QTensor>),
    F32(Tensor),
}

/// Tensors decoded to f32 (or kept as candle tensors), by their HF name.
type DenseTensors = HashMap<String, Tensor>;
/// Matrices kept in their GGUF blocks, by their HF name.
type StoredTensors = HashMap<String, Arc<QTensor>>;

/// The tensors `rename` gives a Hugging Face name, after checking
/// (`gguf_checks::check_referenced`, nothing decoded yet) that `build`, the family's builder
/// with the parsed config, takes every tensor of the file with its shape. With
/// [`WeightStorage::Stored`] on the CPU, the matrices not stored as F32 are kept in their
/// encoding (second map); every other tensor is dequantised to f32 on `device` (first map).
fn read_tensors<T>(
    path: &Path,
    content: &Content,
    reader: &mut BufReader<File>,
    device: &Device,
    storage: WeightStorage,
    rename: impl Fn(&str) -> Option<String>,
    build: impl FnOnce(&Weights) -> Result<T>,
) -> Result<(DenseTensors, StoredTensors)> {
    super::gguf_checks::check_referenced(path, content, &rename, build)?;
    let keep = storage == WeightStorage::Stored && device.is_cpu();
    let mut tensors = HashMap::with_capacity(content.tensor_infos.len());
    let mut stored = HashMap::new();
    for (name, info) in &content.tensor_infos {
        let Some(hf) = rename(name) else {
            continue; // none left: `check_referenced` refused tensors without a name
        };
        let kept = keep && info.shape.rank() == 2 && info.ggml_dtype != GgmlDType::F32;
        let t = catch_unwind(AssertUnwindSafe(|| -> candle_core::Result<Read> {
            let q = content.tensor(reader, name, &Device::Cpu)?;
            if kept {
                return Ok(Read::Stored(Arc::new(q)));
            }
            let t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?.to_device(device)?;
            Ok(Read::F32(t))
        }))
        .map_err(|_| {
            let msg = format!("not a valid GGUF file (truncated or corrupt): tensor `{name}` cannot be decoded");
            Error::format(path, msg)
        })?
        .map_err(|e| Error::format(path, format!("tensor `{name}`: {}", first_line(&e))))?;
        match t {
            Read::Stored(q) => stored.insert(hf, q).map(drop),
            Read::F32(t) => tensors.insert(hf, t).map(drop),
        };
    }
    Ok((tensors, stored))
}

/// llama.cpp's per-frequency RoPE divisors (llama3 scaling), kept under this name until the
/// config reads them.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// GGUF tensor name -> Hugging Face name of a Llama-layout model (`None` for tensors no
/// family reads), `layer_part` naming the parts of a layer (the family's).
fn hf_name(gguf: &str, layer_part: fn(&str) -> Option<&'static str>) -> Option<String> {
    if gguf == ROPE_FREQS {
        return Some(ROPE_FREQS.into());
    }
    hf_tensor_name(gguf, layer_part)
}

/// llama.cpp's names of the parts of a Llama layer -> Hugging Face names.
pub(crate) fn llama_layer_part(part: &str) -> Option<&'static str> {
    Some(match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    })
}

/// GGUF tensor name -> Hugging Face name: the embedding, final norm and head, and layer
/// tensors `blk.{i}.{part}` with `layer_part` naming the part in the layer (`None` for
/// tensors the model does not use).
pub(crate) fn hf_tensor_name(
    gguf: &str,
    layer_part: fn(&str) -> Option<&'static str>,
) -> Option<String> {
    let (base, kind) = gguf.rsplit_once('.')?; // kind: weight / bias
    let fixed = match base {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(format!("{f}.{kind}"));
    }
    let (layer, part) = base.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    Some(format!("model.layers.{layer}.{}.{kind}", layer_part(part)?))
}

/// Typed access to the metadata, with errors naming the file and the key.
pub(crate) struct Meta<'a> {
    pub path: &'a Path,
    pub(super) map: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.map
            .get(key)
            .ok_or_else(|| Error::config(self.path, key, "missing from the GGUF metadata"))
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> Error {
        Error::config(
            self.path,
            key,
            format!("expected {want}, found {:?}", v.value_type()),
        )
    }

    pub(crate) fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(self.wrong(key, "a string", v)),
        }
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n: Option<i128> = match *v {
            Value::U8(x) => Some(x.into()),
            Value::I8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::I16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::I32(x) => Some(x.into()),
            Value::U64(x) => Some(x.into()),
            Value::I64(x) => Some(x.into()),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    pub(crate) fn f64(&self, key: &str) -> Result<f64> {
        match *self.get(key)? {
            Value::F32(x) => Ok(x as f64),
            Value::F64(x) => Ok(x),
            ref v => Err(self.wrong(key, "a float", v)),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> Result<bool> {
        match *self.get(key)? {
            Value::Bool(b) => Ok(b),
            ref v => Err(self.wrong(key, "a bool", v)),
        }
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let v = self.get(key)?;
        let Value::Array(items) = v else {
            return Err(self.wrong(key, "an array of strings", v));
        };
        items
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.wrong(key, "an array of strings", other)),
            })
            .collect()
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// An array of floats (`tokenizer.ggml.scores`).
    pub(crate) fn f32s(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.get(key)?;
        let Value::Array(items) = v else {
            return Err(self.wrong(key, "an array of floats", v));
        };
        items
            .iter()
            .map(|x| match *x {
                Value::F32(f) => Ok(f),
                Value::F64(f) => Ok(f as f32),
                ref other => Err(self.wrong(key, "an array of floats", other)),
            })
            .collect()
    }

    /// An array of integers (`tokenizer.ggml.token_type`), when the key is present.
    pub(crate) fn ints_opt(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.map.get(key) else {
            return Ok(None);
        };
        let Value::Array(items) = v else {
            return Err(self.wrong(key, "an array of integers", v));
        };
        items
            .iter()
            .map(|x| match *x {
                Value::I8(i) => Ok(i.into()),
                Value::U8(i) => Ok(i.into()),
                Value::I16(i) => Ok(i.into()),
                Value::U16(i) => Ok(i.into()),
                Value::I32(i) => Ok(i.into()),
                Value::U32(i) => Ok(i.into()),
                Value::I64(i) => Ok(i),
                ref other => Err(self.wrong(key, "an array of integers", other)),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// `Some(value)` when the key is present, `None` when absent; a wrong type is an error.
    pub(crate) fn opt<T>(&self, key: &str, f: impl Fn(&Self, &str) -> Result<T>) -> Result<Option<T>> {
        if self.has(key) {
            f(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// The Llama-layout config of the metadata keys `{arch}.*`; `divisors` is the `rope_freqs`
/// tensor when the file has one.
fn config(
    meta: &Meta,
    arch: &str,
    vocab_size: usize,
    divisors: Option<&[f32]>,
) -> Result<llama::Config> {
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = meta.usize(&key("embedding_length"))?;
    let heads = meta.usize(&key("attention.head_count"))?;
    if heads == 0 || hidden % heads != 0 {
        return Err(Error::config(
            meta.path,
            key("attention.head_count"),
            format!("{heads} heads do not divide embedding_length {hidden}"),
        ));
    }
    let head_dim = meta
        .opt(&key("attention.key_length"), Meta::usize)?
        .unwrap_or(hidden / heads);
    if let Some(rot) = meta.opt(&key("rope.dimension_count"), Meta::usize)? {
        if rot != head_dim {
            return Err(Error::config(
                meta.path,
                key("rope.dimension_count"),
                format!("partial rotary ({rot} of {head_dim} dims) is not supported"),
            ));
        }
    }
    if let Some(v) = meta.opt(&key("attention.value_length"), Meta::usize)? {
        if v != head_dim {
            return Err(Error::config(
                meta.path,
                key("attention.value_length"),
                format!("{v}: a value width other than the key width {head_dim} is not supported"),
            ));
        }
    }
    let theta = meta
        .opt(&key("rope.freq_base"), Meta::f64)?
        .unwrap_or(10000.0);
    let rope = RopeFrequencies::from_gguf(
        meta.path,
        head_dim,
        theta,
        divisors,
        rope_linear_factor(meta, arch)?,
    )?;
    let eos = meta.opt("tokenizer.ggml.eos_token_id", Meta::usize)?;
    let eot = meta.opt("tokenizer.ggml.eot_token_id", Meta::usize)?;
    let mut eos_ids: Vec<u32> = eos.into_iter().chain(eot).map(|i| i as u32).collect();
    eos_ids.dedup();
    Ok(llama::Config {
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: Some(
            meta.opt(&key("attention.head_count_kv"), Meta::usize)?
                .unwrap_or(heads),
        ),
        head_dim: Some(head_dim),
        rms_norm_eps: meta.f64(&key("attention.layer_norm_rms_epsilon"))?,
        rope_theta: Some(theta),
        rope_parameters: None,
        rope_scaling: None,
        hidden_act: None,
        vocab_size,
        max_position_embeddings: Some(meta.usize(&key("context_length"))?),
        // Without `output.weight` the head is the embedding.
        tie_word_embeddings: None,
        bos_token_id: meta
            .opt("tokenizer.ggml.bos_token_id", Meta::usize)?
            .map(|i| i as u32),
        eos_token_id: Some(llama::TokenIds::Many(eos_ids)),
        pad_token_id: meta
            .opt("tokenizer.ggml.padding_token_id", Meta::usize)?
            .map(|i| i as u32),
        rope_interleaved: matches!(arch, "llama" | "mistral"),
        rope_frequencies: Some(rope),
    })
}

/// The linear RoPE factor of `{arch}.rope.scaling.*` (llama.cpp's default type is linear; a
/// factor of 0 means none); any other scaling type is an error.
fn rope_linear_factor(meta: &Meta, arch: &str) -> Result<f64> {
    let type_key = format!("{arch}.rope.scaling.type");
    let kind = meta.opt(&type_key, Meta::string)?;
    let factor = match meta.opt(&format!("{arch}.rope.scaling.factor"), Meta::f64)? {
        Some(f) => Some(f),
        None => meta.opt(&format!("{arch}.rope.scale_linear"), Meta::f64)?,
    };
    match kind.as_deref() {
        Some("none") => Ok(1.0),
        None | Some("linear") => match factor {
            None | Some(0.0) => Ok(1.0),
            Some(f) if f.is_finite() && f > 0.0 => Ok(f),
            Some(f) => Err(Error::config(
                meta.path,
                format!("{arch}.rope.scaling.factor"),
                format!("{f}: must be a positive number"),
            )),
        },
        Some(other) => Err(Error::config(
            meta.path,
            type_key,
            format!("unsupported rope scaling `{other}` (supported: none, linear)"),
        )),
    }
}

/// The tokenizer of the metadata, by `tokenizer.ggml.model`: `gpt2` (byte-level BPE, here)
/// or `llama` (SentencePiece-style, [`super::gguf_spm`]); `arch` is the file's architecture.
fn tokenizer(meta: &Meta, arch: &str, bos: Option<u32>, eos: Option<u32>) -> Result<Tokenizer> {
    if meta.opt("tokenizer.ggml.add_bos_token", Meta::bool)? == Some(true) && bos.is_none() {
        return Err(Error::config(
            meta.path,
            "tokenizer.ggml.bos_token_id",
            "missing, but add_bos_token is true",
        ));
    }
    let model = meta.string("tokenizer.ggml.model")?;
    let mut tokenizer = match model.as_str() {
        "gpt2" => gguf_bpe::tokenizer(meta, bos, eos)?,
        "llama" => super::gguf_spm::tokenizer(meta, arch, bos, eos)?,
        other => {
            return Err(Error::config(
                meta.path,
                "tokenizer.ggml.model",
                format!(
                    "unsupported tokenizer `{other}` (supported: gpt2 = byte-level BPE, llama = \
                     SentencePiece-style BPE)"
                ),
            ))
        }
    };
    tokenizer.set_chat_template(meta.opt("tokenizer.chat_template", Meta::string)?);
    Ok(tokenizer)
}

/// The first line of an error message (candle appends a backtrace when RUST_BACKTRACE is set).
fn first_line(e: &dyn std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or("").to_string()
}
