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
/// Most prompt rows a server task may have unless `softprompt serve --max-prompt-tokens`
/// says otherwise (see [`PeftAdapter::validate_within`]).
pub const DEFAULT_MAX_PROMPT_TOKENS: usize = 512;

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

    /// PEFT's `num_transformer_submodules` (1 when absent); [`AdapterConfig::check`] keeps it
    /// at 1 or 2.
    fn submodules(&self) -> usize {
        self.num_transformer_submodules.unwrap_or(1)
    }

    /// Checks the fields that size memory, whatever the model: a PROMPT_TUNING config with
    /// `num_virtual_tokens` and `token_dim` of at least 1, `num_transformer_submodules` 1 or 2
    /// (PEFT writes 2 for seq2seq models: encoder and decoder prompt), and a stored table
    /// `[num_virtual_tokens * num_transformer_submodules, token_dim]` whose size fits in memory
    /// arithmetic. Every read and write of an adapter calls it first, so no client number
    /// multiplies an allocation. `config_path` names the file in errors.
    pub fn check(&self, config_path: &Path) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::config(config_path, field, msg));
        if self.peft_type != "PROMPT_TUNING" {
            return bad(
                "peft_type",
                format!("`{}` is not a prompt-tuning adapter (expected PROMPT_TUNING)", self.peft_type),
            );
        }
        if self.num_virtual_tokens == 0 {
            return bad("num_virtual_tokens", "must be at least 1".into());
        }
        if self.token_dim == 0 {
            return bad("token_dim", "must be at least 1".into());
        }
        if !matches!(self.num_transformer_submodules, None | Some(1) | Some(2)) {
            return bad(
                "num_transformer_submodules",
                format!("{} is neither 1 nor 2 (2 only for seq2seq models)", self.submodules()),
            );
        }
        if self.table_elements().is_none() {
            return bad(
                "num_virtual_tokens",
                format!("{} rows of {} values do not fit in memory", self.num_virtual_tokens, self.token_dim),
            );
        }
        Ok(())
    }

    /// Rows of the stored table: `num_virtual_tokens * num_transformer_submodules`.
    fn table_rows(&self) -> Option<usize> {
        self.num_virtual_tokens.checked_mul(self.submodules())
    }

    /// Values of the stored table (`None` when the product overflows or exceeds what a
    /// safetensors file of f32 can address).
    fn table_elements(&self) -> Option<usize> {
        self.table_rows()?
            .checked_mul(self.token_dim)
            .filter(|&n| n.checked_mul(4).is_some_and(|b| b <= isize::MAX as usize))
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
        config.check(Path::new(CONFIG_FILE))?;
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
        config.check(&config_path)?;
        let weights_path = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&weights_path).map_err(|e| Error::io(&weights_path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&weights_path, format!("not a valid safetensors file: {e}")))?;
        let view = st.tensor(TENSOR_NAME).map_err(|_| {
            Error::format(&weights_path, format!("no tensor named `{TENSOR_NAME}`"))
        })?;
        // `check` bounds the product; the shape is compared before anything is decoded.
        let expected = [config.table_rows().unwrap_or(usize::MAX), config.token_dim];
        if view.shape() != expected {
            return Err(Error::format(
                &weights_path,
                format!(
                    "`{TENSOR_NAME}` has shape {:?} but {CONFIG_FILE} implies {expected:?} \
                     (num_virtual_tokens * num_transformer_submodules, token_dim)",
                    view.shape()
                ),
            ));
        }
        let table = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| Error::format(&weights_path, format!("`{TENSOR_NAME}`: {e}")))?
            .to_dtype(DType::F32)?;
        let prompt = table.narrow(0, 0, config.num_virtual_tokens)?.contiguous()?;
        Ok(PeftAdapter { config, prompt })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`, each atomically.
    /// For seq2seq adapters (`num_transformer_submodules` 2) the prompt is stored twice, PEFT's
    /// layout; the config is checked first, so no other count multiplies the table.
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.config.check(&dir.join(CONFIG_FILE))?;
        self.check_prompt_shape(dir)?;
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

    /// Checks that this adapter fits `info`'s model (see [`PeftAdapter::validate_within`]),
    /// with no cap on the prompt's length but the model's positions: what the library's
    /// loaders use for a user's own files.
    pub fn validate(&self, info: &ModelInfo, dir: &Path) -> Result<()> {
        self.validate_within(info, usize::MAX, dir)
    }

    /// Checks that this adapter fits `info`'s model and has at most `max_prompt_tokens` rows:
    /// the config's fields ([`AdapterConfig::check`]), `num_transformer_submodules` 2 only for
    /// a seq2seq model, `token_dim` equal to the model's hidden size, the prompt `[N, D]` as
    /// the config says, `N` within the model's positions. `dir` names the adapter in errors.
    pub fn validate_within(&self, info: &ModelInfo, max_prompt_tokens: usize, dir: &Path) -> Result<()> {
        let config_path = dir.join(CONFIG_FILE);
        self.config.check(&config_path)?;
        if self.config.num_virtual_tokens > max_prompt_tokens {
            return Err(Error::config(
                &config_path,
                "num_virtual_tokens",
                format!("{} is more than the {max_prompt_tokens} prompt tokens allowed", self.config.num_virtual_tokens),
            ));
        }
        self.check_prompt_shape(dir)?;
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
        // After `task_type`, which names the mismatch better when both are set.
        if self.config.submodules() == 2 && !info.is_encoder_decoder() {
            return Err(Error::config(
                &config_path,
                "num_transformer_submodules",
                format!("2 is for seq2seq models; {:?} is decoder-only (use 1)", info.arch),
            ));
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

    /// The prompt is `[num_virtual_tokens, token_dim]` (the fields are public, so they may
    /// have changed since [`PeftAdapter::new`]).
    fn check_prompt_shape(&self, dir: &Path) -> Result<()> {
        let expected = [self.config.num_virtual_tokens, self.config.token_dim];
        if self.prompt.dims() != expected {
            return Err(Error::config(
                dir.join(CONFIG_FILE),
                "num_virtual_tokens",
                format!("the prompt is {:?} but the config says {expected:?}", self.prompt.dims()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;

    fn info(arch: Arch, d_model: usize, max_positions: Option<usize>) -> ModelInfo {
        ModelInfo {
            arch,
            name: "tiny".into(),
            d_model,
            vocab_size: 32,
            n_layers: 2,
            n_heads: 2,
            max_positions,
            bos_token_id: None,
            eos_token_ids: vec![1],
            pad_token_id: Some(0),
            decoder_start_token_id: None,
        }
    }

    fn adapter(info: &ModelInfo, n: usize) -> PeftAdapter {
        let prompt = Tensor::ones((n, info.d_model), DType::F32, &Device::Cpu).unwrap();
        PeftAdapter::new(AdapterConfig::new(info, n, "RANDOM"), prompt).unwrap()
    }

    fn field_of(e: &Error) -> String {
        match e {
            Error::Config { field, .. } => field.clone(),
            other => panic!("expected a config error, got {other}"),
        }
    }

    /// The crash: a client's `num_transformer_submodules` of 10^12 made `save`
    /// allocate `vec![&prompt; 10^12]`. It is refused by `new`, `save`, `load` and `validate`.
    #[test]
    fn a_huge_submodule_count_is_refused_everywhere() {
        let llama = info(Arch::Llama, 4, Some(64));
        let mut config = AdapterConfig::new(&llama, 3, "RANDOM");
        config.num_transformer_submodules = Some(1_000_000_000_000);
        let prompt = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        let e = PeftAdapter::new(config.clone(), prompt).unwrap_err();
        assert_eq!(field_of(&e), "num_transformer_submodules", "{e}");

        let dir = tempfile::tempdir().unwrap();
        let mut a = adapter(&llama, 3);
        a.config.num_transformer_submodules = Some(1_000_000_000_000);
        let e = a.save(dir.path()).unwrap_err();
        assert_eq!(field_of(&e), "num_transformer_submodules", "{e}");
        assert!(!dir.path().join(WEIGHTS_FILE).exists(), "nothing is written");
        let e = a.validate(&llama, dir.path()).unwrap_err();
        assert_eq!(field_of(&e), "num_transformer_submodules", "{e}");

        // On disk: the config is refused before the weights are read.
        std::fs::write(dir.path().join(CONFIG_FILE), serde_json::to_string(&a.config).unwrap()).unwrap();
        let e = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap_err();
        assert_eq!(field_of(&e), "num_transformer_submodules", "{e}");
    }

    /// Products that overflow are errors, not panics or wrapped sizes.
    #[test]
    fn overflowing_table_sizes_are_refused() {
        let t5 = info(Arch::T5, 4, None);
        let mut config = AdapterConfig::new(&t5, 3, "RANDOM");
        config.num_virtual_tokens = usize::MAX / 2 + 1;
        let e = config.check(Path::new(CONFIG_FILE)).unwrap_err();
        assert_eq!(field_of(&e), "num_virtual_tokens", "{e}");
        let mut config = AdapterConfig::new(&t5, 3, "RANDOM");
        config.token_dim = usize::MAX / 4;
        assert!(config.check(Path::new(CONFIG_FILE)).is_err());
        config.token_dim = 0;
        let e = config.check(Path::new(CONFIG_FILE)).unwrap_err();
        assert_eq!(field_of(&e), "token_dim", "{e}");
    }

    /// `num_transformer_submodules` is 1, or 2 for seq2seq models; the prompt length is capped.
    #[test]
    fn validate_checks_every_field_against_the_model() {
        let dir = Path::new("adapter");
        let llama = info(Arch::Llama, 4, Some(64));
        let t5 = info(Arch::T5, 4, None);
        let seq2seq = adapter(&t5, 5);
        assert_eq!(seq2seq.config.num_transformer_submodules, Some(2));
        seq2seq.validate(&t5, dir).unwrap();
        let mut two = adapter(&llama, 5);
        two.config.num_transformer_submodules = Some(2);
        let e = two.validate(&llama, dir).unwrap_err();
        assert_eq!(field_of(&e), "num_transformer_submodules", "{e}");

        // T5 has no position limit: only the cap bounds the prompt.
        let long = adapter(&t5, 600);
        long.validate(&t5, dir).unwrap();
        let e = long.validate_within(&t5, 512, dir).unwrap_err();
        assert_eq!(field_of(&e), "num_virtual_tokens", "{e}");
        adapter(&t5, 512).validate_within(&t5, 512, dir).unwrap();

        let e = adapter(&llama, 64).validate(&llama, dir).unwrap_err();
        assert_eq!(field_of(&e), "num_virtual_tokens", "{e}");
        let e = adapter(&info(Arch::Llama, 8, Some(64)), 3).validate(&llama, dir).unwrap_err();
        assert_eq!(field_of(&e), "token_dim", "{e}");

        // Fields changed after `new` no longer match the prompt.
        let mut changed = adapter(&llama, 3);
        changed.config.num_virtual_tokens = 4;
        assert!(changed.validate(&llama, dir).is_err());
        assert!(changed.save(&tempfile::tempdir().unwrap().path().join("a")).is_err());
    }

    /// PEFT's seq2seq layout survives a round trip: two copies stored, the first read back.
    #[test]
    fn seq2seq_adapters_round_trip() {
        let t5 = info(Arch::T5, 4, None);
        let a = adapter(&t5, 3);
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor(TENSOR_NAME).unwrap().shape(), [6, 4]);
        let back = PeftAdapter::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(back.prompt.dims(), [3, 4]);
        back.validate_within(&t5, 512, dir.path()).unwrap();
    }
}
