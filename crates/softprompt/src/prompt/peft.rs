//! Hugging Face PEFT prompt-tuning adapters: `adapter_config.json` +
//! `adapter_model.safetensors` holding one F32 tensor `prompt_embeddings`
//! `[num_virtual_tokens * num_transformer_submodules, token_dim]`.
//!
//! For seq2seq models PEFT stores `num_transformer_submodules = 2` by default; prompt tuning
//! only ever reads the first `num_virtual_tokens` rows (the encoder prompt), so that is what
//! we load. When writing a seq2seq adapter we keep PEFT's default layout and repeat the
//! prompt in the unused rows.

use crate::fsutil::write_atomic;
use crate::model::ModelInfo;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const TENSOR_NAME: &str = "prompt_embeddings";

/// `adapter_config.json` of a PROMPT_TUNING adapter. Unknown keys are kept as they were.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub num_virtual_tokens: usize,
    pub token_dim: usize,
    #[serde(default)]
    pub num_transformer_submodules: Option<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<usize>,
    #[serde(default)]
    pub num_layers: Option<usize>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default = "default_init")]
    pub prompt_tuning_init: String,
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
    #[serde(default)]
    pub tokenizer_name_or_path: Option<String>,
    #[serde(default)]
    pub inference_mode: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_init() -> String {
    "RANDOM".into()
}

impl AdapterConfig {
    /// A config for a prompt of `n_tokens` rows trained on `info`'s model.
    /// `init` is PEFT's name of the initialisation (RANDOM, TEXT, SAMPLE_VOCAB).
    pub fn new(info: &ModelInfo, n_tokens: usize, init: &str) -> Self {
        let seq2seq = info.is_encoder_decoder();
        let mut extra = serde_json::Map::new();
        for key in ["auto_mapping", "modules_to_save", "revision", "tokenizer_kwargs"] {
            extra.insert(key.into(), serde_json::Value::Null);
        }
        extra.insert("peft_version".into(), "0.21.2".into());
        AdapterConfig {
            peft_type: "PROMPT_TUNING".into(),
            task_type: Some(if seq2seq { "SEQ_2_SEQ_LM" } else { "CAUSAL_LM" }.into()),
            num_virtual_tokens: n_tokens,
            token_dim: info.d_model,
            num_transformer_submodules: Some(if seq2seq { 2 } else { 1 }),
            num_attention_heads: Some(info.n_heads),
            num_layers: Some(info.n_layers),
            base_model_name_or_path: Some(info.name.clone()),
            prompt_tuning_init: init.into(),
            prompt_tuning_init_text: None,
            tokenizer_name_or_path: None,
            inference_mode: true,
            extra,
        }
    }

    fn submodules(&self) -> usize {
        self.num_transformer_submodules.unwrap_or(1).max(1)
    }
}

/// A prompt-tuning adapter: its config and the prompt rows in use, `[N, D]`.
#[derive(Clone, Debug)]
pub struct PeftAdapter {
    pub config: AdapterConfig,
    /// `[num_virtual_tokens, token_dim]`
    pub prompt: Tensor,
}

impl PeftAdapter {
    pub fn new(config: AdapterConfig, prompt: Tensor) -> Result<Self> {
        let (n, d) = prompt.dims2()?;
        if n != config.num_virtual_tokens || d != config.token_dim {
            crate::bail!(
                "prompt is [{n}, {d}] but the config says num_virtual_tokens {} and token_dim {}",
                config.num_virtual_tokens,
                config.token_dim
            );
        }
        Ok(PeftAdapter { config, prompt })
    }

    /// Reads an adapter folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| Error::format(&config_path, format!("bad adapter config: {e}")))?;
        if config.peft_type != "PROMPT_TUNING" {
            return Err(Error::config(
                &config_path,
                "peft_type",
                format!("`{}` is not a prompt-tuning adapter (expected PROMPT_TUNING)", config.peft_type),
            ));
        }
        if config.num_virtual_tokens == 0 {
            return Err(Error::config(&config_path, "num_virtual_tokens", "must be at least 1"));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&weights_path, format!("not a valid safetensors file: {e}")))?;
        let view = st.tensor(TENSOR_NAME).map_err(|_| {
            Error::format(&weights_path, format!("no tensor named `{TENSOR_NAME}`"))
        })?;
        let table = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| Error::format(&weights_path, format!("`{TENSOR_NAME}`: {e}")))?
            .to_dtype(DType::F32)?;
        let expected = [config.num_virtual_tokens * config.submodules(), config.token_dim];
        if table.dims() != expected {
            return Err(Error::format(
                &weights_path,
                format!(
                    "`{TENSOR_NAME}` has shape {:?} but {CONFIG_FILE} implies {expected:?} \
                     (num_virtual_tokens * num_transformer_submodules, token_dim)",
                    table.dims()
                ),
            ));
        }
        let prompt = table.narrow(0, 0, config.num_virtual_tokens)?.contiguous()?;
        Ok(PeftAdapter { config, prompt })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let rows: Vec<&Tensor> = vec![&self.prompt; self.config.submodules()];
        let table = Tensor::cat(&rows, 0)?.to_dtype(DType::F32)?.contiguous()?;
        let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
        let bytes = safetensors::serialize([(TENSOR_NAME, &table)], metadata)
            .map_err(|e| Error::format(dir.join(WEIGHTS_FILE), e.to_string()))?;
        write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
        let json = serde_json::to_string_pretty(&self.config)
            .map_err(|e| Error::format(dir.join(CONFIG_FILE), e.to_string()))?;
        write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// Checks that this adapter fits `info`'s model; `dir` names the adapter in errors.
    pub fn validate(&self, info: &ModelInfo, dir: &Path) -> Result<()> {
        let config_path = dir.join(CONFIG_FILE);
        if self.config.token_dim != info.d_model {
            return Err(Error::config(
                &config_path,
                "token_dim",
                format!(
                    "{} does not match the model's hidden size {} (adapter made for `{}`?)",
                    self.config.token_dim,
                    info.d_model,
                    self.config.base_model_name_or_path.as_deref().unwrap_or("another model")
                ),
            ));
        }
        if let Some(task) = &self.config.task_type {
            let seq2seq = info.is_encoder_decoder();
            let ok = match task.as_str() {
                "SEQ_2_SEQ_LM" => seq2seq,
                "CAUSAL_LM" => !seq2seq,
                _ => true,
            };
            if !ok {
                return Err(Error::config(
                    &config_path,
                    "task_type",
                    format!("{task} adapter cannot be used with a {:?} model", info.arch),
                ));
            }
        }
        if let Some(max) = info.max_positions {
            if self.config.num_virtual_tokens >= max {
                return Err(Error::config(
                    &config_path,
                    "num_virtual_tokens",
                    format!("{} leaves no room in the model's context of {max}", self.config.num_virtual_tokens),
                ));
            }
        }
        Ok(())
    }
}
