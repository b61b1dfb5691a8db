//! Hugging Face model folders: `config.json` + `model.safetensors` (or a sharded index) +
//! `tokenizer.json`.

use super::{model_name, Model, WeightStorage, Weights};
use crate::model::{gemma, gpt2, llama, mistral, phi3, qwen2, qwen3, t5, Backbone};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// Deserialises a config file into `T`; a missing or mistyped field is an error naming it.
pub fn parse_config<T: serde::de::DeserializeOwned>(path: &Path, value: &serde_json::Value) -> Result<T> {
    serde_json::from_value(value.clone()).map_err(|e| Error::format(path, format!("bad config: {e}")))
}

/// The weight files of a folder: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    Err(Error::format(
        dir,
        "no model.safetensors or model.safetensors.index.json in this folder",
    ))
}

pub fn load(dir: &Path, device: &Device) -> Result<Model> {
    load_with(dir, device, WeightStorage::Stored)
}

/// Loads the folder `dir`; with [`WeightStorage::Stored`], bf16/f16 matrices stay in half
/// precision (the Llama-layout and Gemma families hold them so; the others read f32).
pub fn load_with(dir: &Path, device: &Device, storage: WeightStorage) -> Result<Model> {
    let weights = Weights::from_safetensors_with(&weight_files(dir)?, device, storage)?;
    build(dir, &weights, device)
}

/// Builds the model of folder `dir` (its `config.json` and `tokenizer.json`) from the given
/// `weights` instead of its weight files, e.g. tensors of trainable variables: the model then
/// computes with those very tensors, so updates to the variables are seen by it.
pub fn build(dir: &Path, weights: &Weights, device: &Device) -> Result<Model> {
    let (backbone, model_type) = build_backbone(dir, weights)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        let info = backbone.info();
        let mut tok = Tokenizer::from_file(&tok_path)?;
        tok.bos_token_id = info.bos_token_id;
        tok.eos_token_id = info.eos_token_ids.first().copied();
        // Llama tokenizers put BOS first; their tokenizer.json post-processor does it when
        // encoding with special tokens, which we do not use, so do it here, unless
        // tokenizer_config.json says otherwise (`add_bos_token`).
        let bos_first = matches!(model_type.as_str(), "llama" | "mistral" | "gemma2" | "gemma3_text");
        tok.add_bos = add_bos_token(dir)?.unwrap_or(bos_first)
            && info.bos_token_id.is_some();
        tok.set_chat_template(chat_template(dir)?);
        Some(tok)
    } else {
        None
    };
    Ok(Model {
        backbone,
        tokenizer,
        path: dir.to_path_buf(),
        device: device.clone(),
    })
}

/// The folder's chat template: `chat_template.jinja` (newer transformers), else
/// `tokenizer_config.json` `chat_template`, a string or a list of named templates (the one
/// named `default`, as transformers picks it).
fn chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| Error::io(&jinja, e));
    }
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    match read_json(&path)?.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let default = named.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
            Ok(default.and_then(|t| t.get("template")).and_then(|t| t.as_str()).map(str::to_string))
        }
        Some(_) => Err(Error::config(&path, "chat_template", "expected a string or a list of {name, template}")),
    }
}

/// `add_bos_token` of the folder's `tokenizer_config.json`, when it has one.
fn add_bos_token(dir: &Path) -> Result<Option<bool>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    Ok(read_json(&path)?.get("add_bos_token").and_then(|v| v.as_bool()))
}

/// The backbone of folder `dir` (its `config.json`) computed with `weights`, and the config's
/// `model_type`. Reads no weight or tokenizer file.
pub fn build_backbone(dir: &Path, weights: &Weights) -> Result<(Backbone, String)> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path)?;
    let model_type = config
        .get("model_type")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::config(&config_path, "model_type", "missing"))?
        .to_string();
    let name = model_name(dir);
    let backbone = match model_type.as_str() {
        "llama" => {
            let cfg: llama::Config = parse_config(&config_path, &config)?;
            Backbone::Causal(Box::new(llama::Llama::new(&cfg, weights, name)?))
        }
        "qwen2" => {
            let cfg: qwen2::Config = parse_config(&config_path, &config)?;
            Backbone::Causal(Box::new(qwen2::Qwen2::new(&cfg, weights, name)?))
        }
        "qwen3" => {
            let cfg: qwen3::Config = parse_config(&config_path, &config)?;
            Backbone::Causal(Box::new(qwen3::Qwen3::new(&cfg, weights, name)?))
        }
        "phi3" => {
            let cfg: phi3::Config = parse_config(&config_path, &config)?;
            Backbone::Causal(Box::new(phi3::Phi3::new(&cfg, weights, name)?))
        }
        "mistral" => {
            let cfg: mistral::Config = parse_config(&config_path, &config)?;
            Backbone::Causal(Box::new(mistral::Mistral::new(&cfg, weights, name)?))
        }
        "gemma2" | "gemma3_text" => {
            let version = match model_type.as_str() {
                "gemma2" => gemma::Version::Gemma2,
                _ => gemma::Version::Gemma3,
            };
            let cfg: gemma::Config = parse_config(&config_path, &config)?;
            Backbone::Causal(Box::new(gemma::Gemma::new(version, &cfg, weights, name)?))
        }
        "gemma3" => {
            return Err(Error::config(
                &config_path,
                "model_type",
                "`gemma3` is the multimodal Gemma 3 (supported: its text-only form, `gemma3_text`)",
            ))
        }
        "gpt2" => {
            let cfg: gpt2::Config = parse_config(&config_path, &config)?;
            Backbone::Causal(Box::new(gpt2::Gpt2::new(&cfg, weights, name)?))
        }
        "t5" | "mt5" => {
            let cfg: t5::Config = parse_config(&config_path, &config)?;
            Backbone::Seq2Seq(Box::new(t5::T5::new(&cfg, weights, name)?))
        }
        other => {
            return Err(Error::config(
                &config_path,
                "model_type",
                format!(
                    "unsupported architecture `{other}` (supported: llama, mistral, qwen2, \
                     qwen3, phi3, gemma2, gemma3_text, gpt2, t5)"
                ),
            ))
        }
    };
    Ok((backbone, model_type))
}
