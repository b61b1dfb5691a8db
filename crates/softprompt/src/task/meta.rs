//! `task.json`: what a training run (or an upload) records beside its adapter, so that
//! `softprompt eval`, `softprompt inspect` and the server can use the adapter without being
//! told the task again. [`TaskMeta`] is its one reader and writer.
//!
//! The model is named by its file (or folder) name and sha256, never by a path of the machine
//! that trained it; data sources are recorded relative or by name ([`data_source`]). Files
//! written before these rules (an absolute `model_path`, fields missing) still read.

use crate::model::ModelInfo;
use crate::prompt::PromptInit;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// File name of the task description in an adapter folder.
pub const TASK_FILE: &str = "task.json";

/// A bigger `task.json` is not one this library wrote.
const MAX_FILE_BYTES: u64 = 16 << 20;
/// Most labels a classification task may have (each is scored for every input).
pub const MAX_LABELS: usize = 10_000;
/// Longest template, label or verbalizer entry, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 << 10;

/// The content of `task.json`. Every field is optional so that older files, uploads and
/// tools that write only a few of them all read; fields this version does not know are kept
/// in [`TaskMeta::extra`] and written back unchanged.
// Unset options are left out of the file (older readers and tools see only what was recorded).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TaskMeta {
    /// How the adapter was trained: absent for prompt tuning, `p-tuning`, `model-tuning`.
    pub method: Option<String>,
    /// The model's own name (`base_model_name_or_path` of the adapter).
    pub model: Option<String>,
    /// File (GGUF) or folder (Hugging Face) name of the model, without its directory.
    pub model_file: Option<String>,
    /// [`model_sha256`] of the model trained on.
    pub model_sha256: Option<String>,
    /// Older files only: the model's path on the training machine. Read, never written.
    pub model_path: Option<String>,
    /// `llama`, `gpt2` or `t5`.
    pub arch: Option<String>,
    /// Prompt length (virtual tokens).
    pub n_tokens: Option<usize>,
    /// The prompt initialisation ([`crate::prompt::PromptInit::describe`]).
    pub init: Option<serde_json::Value>,
    /// How training laid out each example.
    pub format: Option<ExampleLayout>,
    /// P-tuning's prompt encoder.
    pub encoder: Option<EncoderMeta>,
    /// Model tuning's optimizer (its `Debug` form).
    pub optimizer: Option<String>,
    /// Model tuning's learning rate.
    pub lr: Option<f64>,
    pub train_examples: Option<usize>,
    pub dev_examples: Option<usize>,
    pub seed: Option<u64>,
    /// Decoder-only models: the prompt was trained after BOS, `[BOS; P; X]`
    /// (`softprompt train --prompt-after-bos`); see [`crate::prompt::prefix_after_bos`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub prompt_after_bos: bool,
    /// Examples were rendered with the model's chat template (`softprompt train --chat`):
    /// the input as the user's turn, the target as the assistant's; the server renders
    /// inputs the same way ([`crate::chat`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub chat: bool,
    /// Built-in task name (`movie-sentiment`).
    pub name: Option<String>,
    /// Input template with `{text}`.
    pub template: Option<String>,
    /// Class labels (as the targets spell them when there is no verbalizer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The target text of each label.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verbalizer: Vec<String>,
    pub input_format: Option<String>,
    pub target_format: Option<String>,
    /// Training data: a built-in task name or a file ([`data_source`]).
    pub data: Option<String>,
    /// Dev data, as [`TaskMeta::data`].
    pub dev: Option<String>,
    pub dev_limit: Option<usize>,
    /// The dev metric that chose the exported prompt (`loss`, `accuracy`).
    pub select_by: Option<String>,
    /// Fields this version does not know, kept as written.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `format` of `task.json`: the layout of one training example.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExampleLayout {
    pub layout: String,
    pub target: String,
}

impl ExampleLayout {
    /// The layout of prompt tuning: `seq2seq` for encoder-decoder models, `after_bos` for
    /// `[BOS; P; X]`.
    pub fn prompt_tuning(seq2seq: bool, after_bos: bool) -> ExampleLayout {
        let layout = if seq2seq {
            "encoder: [prompt; source], right padded; decoder: [start] + target[..-1], scored on target"
        } else if after_bos {
            "[BOS; prompt; source (without its BOS) + target], left padded; every target token scored"
        } else {
            "[prompt; source + target], left padded; every target token scored"
        };
        ExampleLayout {
            layout: layout.into(),
            target: "target tokens followed by EOS".into(),
        }
    }
}

/// `encoder` of `task.json` (P-tuning).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderMeta {
    pub kind: String,
    pub hidden: usize,
}

/// A field of `task.json` at fault, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub msg: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.msg)
    }
}

impl TaskMeta {
    /// Reads `dir/task.json`; `None` when there is none. Malformed JSON, a field of the wrong
    /// type or a hostile value is an error naming the file and the field.
    pub fn read(dir: &Path) -> Result<Option<TaskMeta>> {
        let path = dir.join(TASK_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let size = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if size > MAX_FILE_BYTES {
            return Err(Error::format(&path, format!("{size} bytes; a task.json is at most {MAX_FILE_BYTES}")));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        TaskMeta::parse(&text).map(Some).map_err(|e| Error::config(&path, e.field, e.msg))
    }

    /// Parses and validates `task.json` text.
    pub fn parse(text: &str) -> std::result::Result<TaskMeta, FieldError> {
        let mut de = serde_json::Deserializer::from_str(text);
        let meta: TaskMeta = serde_path_to_error::deserialize(&mut de).map_err(|e| FieldError {
            field: match e.path().to_string().as_str() {
                "." => "(top level)".to_string(),
                p => p.to_string(),
            },
            msg: e.into_inner().to_string(),
        })?;
        meta.validate()?;
        Ok(meta)
    }

    /// [`TaskMeta::parse`] of a JSON value (an upload's `task` object).
    pub fn from_value(value: serde_json::Value) -> std::result::Result<TaskMeta, FieldError> {
        TaskMeta::parse(&value.to_string())
    }

    /// Writes `dir/task.json` atomically. Not validated: a finished training run must not be
    /// lost at its last step; readers ([`TaskMeta::read`], uploads) validate.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(TASK_FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::invalid(format!("task.json: {e}")))?;
        crate::fsutil::write_atomic(&path, text.as_bytes())
    }

    /// Rejects values no real task has: too many labels, huge strings, a verbalizer that does
    /// not match the labels, a template without `{text}`.
    pub fn validate(&self) -> std::result::Result<(), FieldError> {
        let bad = |field: &str, msg: String| Err(FieldError { field: field.into(), msg });
        for (field, list) in [("labels", &self.labels), ("verbalizer", &self.verbalizer)] {
            if list.len() > MAX_LABELS {
                return bad(field, format!("{} entries; at most {MAX_LABELS}", list.len()));
            }
            if let Some(i) = list.iter().position(|s| s.len() > MAX_TEXT_BYTES) {
                return bad(field, format!("entry {i} is {} bytes; at most {MAX_TEXT_BYTES}", list[i].len()));
            }
        }
        if !self.verbalizer.is_empty() && self.verbalizer.len() != self.labels.len() {
            return bad(
                "verbalizer",
                format!("{} entries for {} labels", self.verbalizer.len(), self.labels.len()),
            );
        }
        if let Some(t) = &self.template {
            if t.len() > MAX_TEXT_BYTES {
                return bad("template", format!("{} bytes; at most {MAX_TEXT_BYTES}", t.len()));
            }
            if !t.contains("{text}") {
                return bad("template", "has no `{text}`".into());
            }
        }
        Ok(())
    }

    /// The target text of each label: the verbalizer, or the labels themselves when it is
    /// absent (labels recorded by `softprompt train` are its targets as written).
    pub fn label_texts(&self) -> &[String] {
        if self.verbalizer.is_empty() {
            &self.labels
        } else {
            &self.verbalizer
        }
    }

    /// The facts every training method records: `method` (`None` for prompt tuning), the
    /// model trained on (`info`, loaded from `model_path`: name, file name, sha256, family),
    /// the number of train and dev examples and the seed.
    pub fn for_run(
        method: Option<&str>,
        info: &ModelInfo,
        model_path: &Path,
        train_examples: usize,
        dev_examples: Option<usize>,
        seed: u64,
    ) -> Result<TaskMeta> {
        Ok(TaskMeta {
            method: method.map(str::to_string),
            model: Some(info.name.clone()),
            model_file: model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            model_sha256: Some(model_sha256(model_path)?),
            arch: Some(format!("{:?}", info.arch).to_lowercase()),
            train_examples: Some(train_examples),
            dev_examples,
            seed: Some(seed),
            ..TaskMeta::default()
        })
    }

    /// Copies every field that `other` sets over `self` (the caller's task facts over the
    /// trainer's run facts).
    pub fn merge(&mut self, other: &TaskMeta) -> Result<()> {
        let mut mine = serde_json::to_value(&*self).map_err(|e| Error::invalid(format!("task.json: {e}")))?;
        let theirs = serde_json::to_value(other).map_err(|e| Error::invalid(format!("task.json: {e}")))?;
        if let (Some(m), serde_json::Value::Object(t)) = (mine.as_object_mut(), theirs) {
            m.extend(t);
        }
        *self = serde_json::from_value(mine).map_err(|e| Error::invalid(format!("task.json: {e}")))?;
        Ok(())
    }
}

/// `init` of `task.json`: [`PromptInit::describe`], with a transferred prompt's adapter
/// folder recorded as [`data_source`] records files.
pub fn describe_init(init: &PromptInit) -> serde_json::Value {
    match init {
        PromptInit::File(dir) => serde_json::json!({"kind": "file", "adapter": data_source(dir)}),
        other => other.describe(),
    }
}

/// sha256 (hex) of a model: of the file for GGUF; for a Hugging Face folder, of the list of
/// `name sha256` lines of its `config.json` and `*.safetensors` files, sorted by name.
pub fn model_sha256(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return crate::fetch::sha256_file(path);
    }
    let mut files: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && (p.file_name().is_some_and(|n| n == "config.json")
                    || p.extension().is_some_and(|x| x == "safetensors"))
        })
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in &files {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        h.update(format!("{name} {}\n", crate::fetch::sha256_file(f)?).as_bytes());
    }
    Ok(format!("{:x}", h.finalize()))
}

/// How `task.json` records a data source given on the command line: a built-in task name
/// (no such file) or a relative path as given; an absolute path by its file name only.
pub fn data_source(path: &Path) -> String {
    if path.is_absolute() {
        if let Some(name) = path.file_name() {
            return name.to_string_lossy().into_owned();
        }
    }
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_files_read_and_unknown_fields_are_kept() {
        let old = r#"{"model": "m", "model_path": "/home/x/m.gguf", "labels": ["a", "b"],
            "dev_examples": null, "custom": {"k": 1}}"#;
        let meta = TaskMeta::parse(old).unwrap();
        assert_eq!(meta.model_path.as_deref(), Some("/home/x/m.gguf"));
        assert_eq!(meta.label_texts(), ["a", "b"]);
        assert_eq!(meta.extra["custom"], serde_json::json!({"k": 1}));
        let again = TaskMeta::parse(&serde_json::to_string(&meta).unwrap()).unwrap();
        assert_eq!(again, meta);
    }

    #[test]
    fn bad_fields_are_named() {
        let e = TaskMeta::parse(r#"{"labels": ["a", 3]}"#).unwrap_err();
        assert!(e.field.starts_with("labels"), "{e}");
        let e = TaskMeta::parse(r#"{"prompt_after_bos": "yes"}"#).unwrap_err();
        assert_eq!(e.field, "prompt_after_bos", "{e}");
        let e = TaskMeta::parse(r#"{"labels": ["a"], "verbalizer": ["x", "y"]}"#).unwrap_err();
        assert_eq!(e.field, "verbalizer");
        let e = TaskMeta::parse(r#"{"template": "no slot"}"#).unwrap_err();
        assert_eq!(e.field, "template");
        let many: Vec<String> = (0..=MAX_LABELS).map(|i| i.to_string()).collect();
        let e = TaskMeta::parse(&serde_json::json!({ "labels": many }).to_string()).unwrap_err();
        assert_eq!(e.field, "labels");
        let e = TaskMeta::parse(&serde_json::json!({ "labels": ["x".repeat(MAX_TEXT_BYTES + 1)] }).to_string())
            .unwrap_err();
        assert_eq!(e.field, "labels");
        assert!(TaskMeta::parse("[1]").is_err());
    }

    #[test]
    fn read_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(TaskMeta::read(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join(TASK_FILE), r#"{"labels": "a"}"#).unwrap();
        let msg = TaskMeta::read(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(TASK_FILE) && msg.contains("labels"), "{msg}");
        let meta = TaskMeta { labels: vec!["x".into()], seed: Some(3), ..TaskMeta::default() };
        meta.write(dir.path()).unwrap();
        assert_eq!(TaskMeta::read(dir.path()).unwrap(), Some(meta));
    }

    #[test]
    fn data_sources_are_relative_or_by_name() {
        assert_eq!(data_source(Path::new("/abs/dir/train.jsonl")), "train.jsonl");
        assert_eq!(data_source(Path::new("data/train.jsonl")), "data/train.jsonl");
        assert_eq!(data_source(Path::new("movie-sentiment")), "movie-sentiment");
    }
}
