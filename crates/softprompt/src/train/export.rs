//! What a finished run leaves in its output folder besides the checkpoint and the metrics:
//! the PEFT adapter of a prompt, the trained tensors, and `task.json` (written here only, by
//! [`write_task_json`]).

use crate::batch::Example;
use crate::fsutil::write_atomic;
use crate::load::Model;
use crate::prompt::init::PromptInit;
use crate::prompt::{AdapterConfig, PeftAdapter};
use crate::train::config::TrainConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The task description next to a trained prompt or model.
pub const TASK_FILE: &str = "task.json";

/// A `task.json` object under construction.
pub(crate) type TaskFields = serde_json::Map<String, serde_json::Value>;

/// The facts every training method records in `task.json`: the model, how many examples it
/// was trained and evaluated on, and the seed.
pub(crate) fn run_task_fields(
    model: &Model,
    cfg: &TrainConfig,
    train: &[Example],
    dev: Option<&[Example]>,
) -> TaskFields {
    let mut task = TaskFields::new();
    task.insert("model".into(), model.backbone.info().name.clone().into());
    task.insert("model_path".into(), model.path.display().to_string().into());
    task.insert("train_examples".into(), train.len().into());
    task.insert("dev_examples".into(), dev.map(|d| d.len()).into());
    task.insert("seed".into(), cfg.seed.into());
    task
}

/// Writes `cfg.output/task.json`: `fields`, then the caller's extra facts `cfg.task` (input and
/// target formats, labels, data files...), which win over `fields`.
pub(crate) fn write_task_json(cfg: &TrainConfig, mut fields: TaskFields) -> Result<()> {
    for (k, v) in &cfg.task {
        fields.insert(k.clone(), v.clone());
    }
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(fields))
        .map_err(|e| Error::invalid(format!("task.json: {e}")))?;
    write_atomic(&cfg.output.join(TASK_FILE), text.as_bytes())
}

/// Writes `prompt` (`[N, D]`) as a PEFT prompt-tuning adapter in `cfg.output`. With
/// `record_init_text` and a text init, the adapter names the text and the tokenizer (PEFT
/// requires both for TEXT; it only reads them when re-initialising); otherwise it names no
/// tokenizer.
pub(crate) fn save_prompt_adapter(
    model: &Model,
    cfg: &TrainConfig,
    prompt: &Tensor,
    record_init_text: bool,
) -> Result<()> {
    let mut config = AdapterConfig::new(model.backbone.info(), cfg.n_tokens, cfg.init.peft_name());
    match &cfg.init {
        PromptInit::Text(text) if record_init_text => {
            config.prompt_tuning_init_text = Some(text.clone());
            config.tokenizer_name_or_path = Some(model.path.display().to_string());
        }
        _ if !record_init_text => config.tokenizer_name_or_path = None,
        _ => {}
    }
    let prompt = prompt.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    PeftAdapter::new(config, prompt)?.save(&cfg.output)
}

/// Saves `tensors` as the safetensors file `path`, atomically (written next to it, then
/// renamed): a reader sees the old file or the new one.
pub(crate) fn save_tensors_atomic(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    candle_core::safetensors::save(tensors, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
