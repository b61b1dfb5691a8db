//! The body of `PUT /v1/tasks/{name}` and its staging: every field is checked against the
//! model and the store's limits before anything is sized from it, then the adapters (and
//! `task.json`) are written into a hidden staging folder.

use super::StoreLimits;
use crate::error::ApiError;
use base64::Engine as _;
use candle_core::{Device, Tensor};
use serde::Deserialize;
use softprompt::load::Model;
use softprompt::prompt::peft::{AdapterConfig, PeftAdapter, TENSOR_NAME};
use softprompt::task::TaskMeta;
use std::path::Path;

/// Body of `PUT /v1/tasks/{name}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upload {
    /// One prompt.
    #[serde(default)]
    pub prompt: Option<PromptData>,
    /// Or an ensemble of prompts (members `p0`, `p1`, ...).
    #[serde(default)]
    pub prompts: Option<Vec<PromptData>>,
    /// PEFT `adapter_config.json`; default: a PROMPT_TUNING config for the served model.
    /// Its `num_virtual_tokens` is set from each prompt's row count.
    #[serde(default)]
    pub adapter_config: Option<serde_json::Value>,
    /// `task.json` content: `template`, `labels`, `verbalizer` (and anything else, kept).
    #[serde(default)]
    pub task: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A prompt as `N` rows of `D` floats, or a base64-encoded `adapter_model.safetensors`.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum PromptData {
    Rows(Vec<Vec<f32>>),
    Safetensors(String),
}

/// Writes the upload as adapter folders (+ `task.json`) into `staging`, validated: at most
/// `limits.max_prompt_tokens` prompt rows in all, each adapter checked by
/// `PeftAdapter::validate_within`.
pub(super) fn stage(staging: &Path, upload: &Upload, model: &Model, limits: &StoreLimits) -> Result<(), ApiError> {
    let info = model.backbone.info();
    let prompts: Vec<&PromptData> = match (&upload.prompt, &upload.prompts) {
        (Some(p), None) => vec![p],
        (None, Some(ps)) if !ps.is_empty() => ps.iter().collect(),
        (None, Some(_)) => return Err(ApiError::bad_request("`prompts` is empty")),
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give either `prompt` or `prompts`, not both")),
        (None, None) => return Err(ApiError::bad_request("missing `prompt` (or `prompts` for an ensemble)")),
    };
    let given: Option<AdapterConfig> = match &upload.adapter_config {
        Some(v) => {
            let c = serde_json::from_value::<AdapterConfig>(v.clone())
                .map_err(|e| ApiError::bad_request(format!("adapter_config: {e}")))?;
            // Before any field sizes anything (the PEFT seq2seq narrowing below, `save`).
            c.check(Path::new("adapter_config")).map_err(|e| ApiError::bad_request(e.to_string()))?;
            Some(c)
        }
        None => None,
    };
    let single = prompts.len() == 1 && upload.prompt.is_some();
    let mut total_rows = 0usize;
    for (i, data) in prompts.iter().enumerate() {
        let what = if single { "prompt".to_string() } else { format!("prompts[{i}]") };
        let tensor = prompt_tensor(data, &what)?;
        // PEFT's seq2seq layout: `[num_virtual_tokens * num_transformer_submodules, D]`, of
        // which prompt tuning uses the first `num_virtual_tokens` rows (as PeftAdapter::load).
        let tensor = match &given {
            Some(c) if c.num_transformer_submodules == Some(2)
                && c.num_virtual_tokens.checked_mul(2) == tensor.dim(0).ok() =>
            {
                tensor
                    .narrow(0, 0, c.num_virtual_tokens)
                    .and_then(|t| t.contiguous())
                    .map_err(|e| ApiError::internal(e.to_string()))?
            }
            _ => tensor,
        };
        let (n, d) = tensor.dims2().map_err(|e| ApiError::bad_request(e.to_string()))?;
        if d != info.d_model {
            return Err(ApiError::bad_request(format!(
                "{what} is [{n}, {d}] but the model's hidden size is {}",
                info.d_model
            )));
        }
        total_rows += n;
        if total_rows > limits.max_prompt_tokens {
            return Err(ApiError::bad_request(format!(
                "the prompts have more than {} rows together (the server's --max-prompt-tokens)",
                limits.max_prompt_tokens
            )));
        }
        let values = tensor.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| ApiError::internal(e.to_string()))?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ApiError::bad_request(format!("{what} holds NaN or infinite values")));
        }
        let mut config = given.clone().unwrap_or_else(|| AdapterConfig::new(info, n, "RANDOM"));
        if config.token_dim != d {
            return Err(ApiError::bad_request(format!(
                "adapter_config: token_dim {} does not match {what} [{n}, {d}]",
                config.token_dim
            )));
        }
        config.num_virtual_tokens = n;
        let adapter = PeftAdapter::new(config, tensor).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let dir = if single { staging.to_path_buf() } else { staging.join(format!("p{i}")) };
        // Errors name the upload's field (`prompt/adapter_config.json`), not server paths.
        adapter
            .validate_within(info, limits.max_prompt_tokens, Path::new(&what))
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        adapter.save(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    std::fs::create_dir_all(staging).map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(task) = &upload.task {
        let meta = TaskMeta::from_value(serde_json::Value::Object(task.clone()))
            .map_err(|e| ApiError::bad_request(format!("task: {e}")))?;
        super::check_template(&meta).map_err(|e| ApiError::bad_request(format!("task: field `template`: {e}")))?;
        meta.write(staging).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    Ok(())
}

/// One uploaded prompt as a tensor `[N, D]` (rows as given; safetensors decoded).
fn prompt_tensor(data: &PromptData, what: &str) -> Result<Tensor, ApiError> {
    match data {
        PromptData::Rows(rows) => {
            let n = rows.len();
            let d = rows.first().map(Vec::len).unwrap_or(0);
            if n == 0 || d == 0 {
                return Err(ApiError::bad_request(format!("{what} is empty")));
            }
            if rows.iter().any(|r| r.len() != d) {
                return Err(ApiError::bad_request(format!("{what}: rows have different lengths")));
            }
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            Tensor::from_vec(flat, (n, d), &Device::Cpu).map_err(|e| ApiError::bad_request(e.to_string()))
        }
        PromptData::Safetensors(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ApiError::bad_request(format!("{what}: not base64: {e}")))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| ApiError::bad_request(format!("{what}: not a safetensors file: {e}")))?;
            let view = st
                .tensor(TENSOR_NAME)
                .map_err(|_| ApiError::bad_request(format!("{what}: no tensor named `{TENSOR_NAME}`")))?;
            if view.shape().len() != 2 {
                return Err(ApiError::bad_request(format!("{what}: `{TENSOR_NAME}` must be [N, D], got {:?}", view.shape())));
            }
            candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
        }
    }
}
