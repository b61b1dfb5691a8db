//! The tasks being served: one folder per task under the prompts directory.
//!
//! A task folder is a training output dropped in as it is (`adapter_config.json` +
//! `adapter_model.safetensors` + `task.json`), or a folder whose subfolders are such
//! adapters (a prompt ensemble: every member scores, the members' log-probabilities are
//! averaged). `task.json` (in the task folder, else in the first member) supplies the
//! optional `template` (with `{text}`), `labels` and `verbalizer` of a classification task,
//! and `prompt_after_bos` (`softprompt train --prompt-after-bos`: the model sees
//! `[embed(BOS); P; embed(X)]`, X without its own BOS, as `softprompt eval` does).
//!
//! Each prompt's keys/values are computed once, on first use, and kept with its task
//! ([`PromptKv`]); replacing or deleting a task drops them with it.

use crate::engine::PromptKv;
use crate::error::ApiError;
use base64::Engine as _;
use candle_core::{Device, Tensor};
use serde::Deserialize;
use softprompt::load::Model;
use softprompt::prompt::peft::{AdapterConfig, PeftAdapter, CONFIG_FILE, TENSOR_NAME};
pub use softprompt::task::TaskMeta;
use softprompt::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// One served task.
pub struct Task {
    pub name: String,
    /// One prompt `[N_i, D]` per ensemble member (prompt lengths may differ): what the model
    /// sees before the input, so with `prompt_after_bos` the prefix `[embed(BOS); P]`.
    pub prompts: Vec<Tensor>,
    /// Each prompt's keys/values, computed on first use (decoder-only models).
    pub prompt_kv: Vec<Arc<PromptKv>>,
    /// The prompts were trained after BOS (task.json `prompt_after_bos`).
    pub prompt_after_bos: bool,
    /// Member folder names (`"."` for a single adapter).
    pub members: Vec<String>,
    pub template: Option<String>,
    pub labels: Vec<String>,
    pub verbalizer: Vec<String>,
    /// Tokenized verbalizer of each label (empty when the task has no labels).
    pub label_targets: Vec<Vec<u32>>,
}

impl Task {
    /// The model input for `text`: the template applied when the task has one.
    pub fn format(&self, text: &str) -> String {
        match &self.template {
            Some(t) => t.replace("{text}", text),
            None => text.to_string(),
        }
    }

    /// The input ids of `text`: the template applied; BOS first when the tokenizer adds it,
    /// except with `prompt_after_bos`, where BOS is part of the prefix (as in `softprompt eval`).
    pub fn encode(&self, tokenizer: &Tokenizer, text: &str) -> softprompt::Result<Vec<u32>> {
        let text = self.format(text);
        if self.prompt_after_bos {
            tokenizer.encode(&text)
        } else {
            tokenizer.encode_input(&text)
        }
    }

    /// Longest prompt of the ensemble (positions before the input).
    pub fn max_prompt_len(&self) -> usize {
        self.prompts.iter().map(|p| p.dim(0).unwrap_or(0)).max().unwrap_or(0)
    }

    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "labels": self.labels,
            "n_prompts": self.prompts.len(),
            "prompt_tokens": self
                .prompts
                .iter()
                .map(|p| p.dim(0).unwrap_or(0).saturating_sub(usize::from(self.prompt_after_bos)))
                .collect::<Vec<_>>(),
            "prompt_after_bos": self.prompt_after_bos,
            "template": self.template,
        })
    }
}

/// All tasks, and the folder they live in.
pub struct Registry {
    pub dir: PathBuf,
    tasks: RwLock<BTreeMap<String, Arc<Task>>>,
    /// Serialises uploads and deletions (file system changes).
    write_lock: Mutex<()>,
}

/// A task name is a plain folder name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Registry {
    /// Loads every task folder under `dir` (created when missing). Hidden folders are skipped;
    /// a folder that holds no adapter is skipped with a warning; a bad adapter is an error.
    pub fn load(dir: &Path, model: &Model) -> softprompt::Result<Registry> {
        std::fs::create_dir_all(dir).map_err(|e| softprompt::Error::io(dir, e))?;
        let mut tasks = BTreeMap::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| softprompt::Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if name.starts_with('.') {
                continue;
            }
            if !valid_name(&name) {
                tracing::warn!("skipping {}: not a valid task name", path.display());
                continue;
            }
            match load_task(&path, &name, model)? {
                Some(task) => {
                    tasks.insert(name, Arc::new(task));
                }
                None => tracing::warn!("skipping {}: no adapter_config.json in it or its subfolders", path.display()),
            }
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            tasks: RwLock::new(tasks),
            write_lock: Mutex::new(()),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Task>> {
        self.tasks.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Task>> {
        self.tasks.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.tasks.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Validates an upload, writes it into `dir/<name>` atomically (staged in a hidden folder,
    /// then renamed into place) and serves it. Returns the task and whether it replaced one.
    pub fn put(&self, name: &str, upload: Upload, model: &Model) -> Result<(Arc<Task>, bool), ApiError> {
        if !valid_name(name) {
            return Err(ApiError::bad_request(format!(
                "invalid task name `{name}`: use letters, digits, `-`, `_`, `.` (not first)"
            )));
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let nonce = format!("{}-{}", std::process::id(), rand::random::<u64>());
        let staging = self.dir.join(format!(".{name}.upload-{nonce}"));
        let result = (|| {
            stage(&staging, &upload, model)?;
            let task = load_task(&staging, name, model)
                .map_err(|e| ApiError::bad_request(e.to_string()))?
                .ok_or_else(|| ApiError::bad_request("the upload holds no prompt"))?;
            Ok::<_, ApiError>(task)
        })();
        let task = match result {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        let target = self.dir.join(name);
        let replaced = target.exists();
        let old = self.dir.join(format!(".{name}.old-{nonce}"));
        let swap = (|| {
            if replaced {
                std::fs::rename(&target, &old)?;
            }
            std::fs::rename(&staging, &target)?;
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = swap {
            let _ = std::fs::remove_dir_all(&staging);
            if replaced && !target.exists() {
                let _ = std::fs::rename(&old, &target);
            }
            return Err(ApiError::internal(format!("writing {}: {e}", target.display())));
        }
        if replaced {
            let _ = std::fs::remove_dir_all(&old);
        }
        let task = Arc::new(task);
        self.tasks
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), task.clone());
        Ok((task, replaced))
    }

    /// Stops serving `name` and removes its folder. `false` when there is no such task.
    pub fn delete(&self, name: &str) -> Result<bool, ApiError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self.tasks.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        if removed.is_none() {
            return Ok(false);
        }
        let target = self.dir.join(name);
        if target.exists() {
            // Rename first so a crash never leaves a half-deleted task that would load.
            let trash = self.dir.join(format!(".{name}.deleted-{}", rand::random::<u64>()));
            std::fs::rename(&target, &trash)
                .map_err(|e| ApiError::internal(format!("removing {}: {e}", target.display())))?;
            let _ = std::fs::remove_dir_all(&trash);
        }
        Ok(true)
    }
}

/// Reads a task folder: a single adapter, or adapters in subfolders (an ensemble).
fn load_task(dir: &Path, name: &str, model: &Model) -> softprompt::Result<Option<Task>> {
    let device = &model.device;
    let info = model.backbone.info();
    let mut member_dirs: Vec<(String, PathBuf)> = Vec::new();
    if dir.join(CONFIG_FILE).is_file() {
        member_dirs.push((".".into(), dir.to_path_buf()));
    } else {
        let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| softprompt::Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && p.join(CONFIG_FILE).is_file())
            .collect();
        subs.sort();
        for p in subs {
            let n = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if !n.starts_with('.') {
                member_dirs.push((n, p));
            }
        }
    }
    if member_dirs.is_empty() {
        return Ok(None);
    }
    let mut prompts = Vec::new();
    let mut members = Vec::new();
    for (n, p) in &member_dirs {
        let adapter = PeftAdapter::load(p, device)?;
        adapter.validate(info, p)?;
        prompts.push(adapter.prompt);
        members.push(n.clone());
    }
    // task.json of the task folder, else of the first member.
    let meta_dir = [dir, member_dirs[0].1.as_path()]
        .into_iter()
        .find(|d| d.join(softprompt::task::TASK_FILE).is_file());
    let meta = match meta_dir {
        Some(d) => TaskMeta::read(d)?.unwrap_or_default(),
        None => TaskMeta::default(),
    };
    let verbalizer = meta.label_texts().to_vec();
    let label_targets = if meta.labels.is_empty() {
        Vec::new()
    } else {
        softprompt::task::label_targets(name, &meta.labels, &verbalizer, model.tokenizer()?, info)?
    };
    // As `softprompt eval`: with `prompt_after_bos` the model sees `[embed(BOS); P]` before the input.
    let prompts = prompts
        .iter()
        .map(|p| softprompt::prompt::model_prefix(p, &model.backbone, meta.prompt_after_bos))
        .collect::<softprompt::Result<Vec<_>>>()
        .map_err(|e| {
            let at = meta_dir.unwrap_or(dir).join(softprompt::task::TASK_FILE);
            softprompt::Error::config(at, "prompt_after_bos", e.to_string())
        })?;
    Ok(Some(Task {
        name: name.to_string(),
        prompt_kv: prompts.iter().map(|_| Arc::new(PromptKv::default())).collect(),
        prompts,
        prompt_after_bos: meta.prompt_after_bos,
        members,
        template: meta.template,
        labels: meta.labels,
        verbalizer,
        label_targets,
    }))
}

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

/// Writes the upload as adapter folders (+ `task.json`) into `staging`, validated.
fn stage(staging: &Path, upload: &Upload, model: &Model) -> Result<(), ApiError> {
    let info = model.backbone.info();
    let prompts: Vec<&PromptData> = match (&upload.prompt, &upload.prompts) {
        (Some(p), None) => vec![p],
        (None, Some(ps)) if !ps.is_empty() => ps.iter().collect(),
        (None, Some(_)) => return Err(ApiError::bad_request("`prompts` is empty")),
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give either `prompt` or `prompts`, not both")),
        (None, None) => return Err(ApiError::bad_request("missing `prompt` (or `prompts` for an ensemble)")),
    };
    let single = prompts.len() == 1 && upload.prompt.is_some();
    for (i, data) in prompts.iter().enumerate() {
        let what = if single { "prompt".to_string() } else { format!("prompts[{i}]") };
        let tensor = match data {
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
                Tensor::from_vec(flat, (n, d), &Device::Cpu).map_err(|e| ApiError::bad_request(e.to_string()))?
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
                let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                    .and_then(|t| t.to_dtype(candle_core::DType::F32))
                    .map_err(|e| ApiError::bad_request(format!("{what}: {e}")))?;
                if t.rank() != 2 {
                    return Err(ApiError::bad_request(format!("{what}: `{TENSOR_NAME}` must be [N, D], got {:?}", t.dims())));
                }
                t
            }
        };
        let given: Option<AdapterConfig> = match &upload.adapter_config {
            Some(v) => Some(
                serde_json::from_value::<AdapterConfig>(v.clone())
                    .map_err(|e| ApiError::bad_request(format!("adapter_config: {e}")))?,
            ),
            None => None,
        };
        // PEFT's seq2seq layout: `[num_virtual_tokens * num_transformer_submodules, D]`, of
        // which prompt tuning uses the first `num_virtual_tokens` rows (as PeftAdapter::load).
        let tensor = match &given {
            Some(c) if c.num_transformer_submodules.unwrap_or(1) > 1
                && c.num_virtual_tokens > 0
                && tensor.dim(0).ok() == Some(c.num_virtual_tokens * c.num_transformer_submodules.unwrap_or(1)) =>
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
        let values = tensor.flatten_all().and_then(|t| t.to_vec1::<f32>()).map_err(|e| ApiError::internal(e.to_string()))?;
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ApiError::bad_request(format!("{what} holds NaN or infinite values")));
        }
        let mut config = given.unwrap_or_else(|| AdapterConfig::new(info, n, "RANDOM"));
        if config.peft_type != "PROMPT_TUNING" {
            return Err(ApiError::bad_request(format!(
                "adapter_config: peft_type `{}` is not PROMPT_TUNING",
                config.peft_type
            )));
        }
        if config.token_dim != d {
            return Err(ApiError::bad_request(format!(
                "adapter_config: token_dim {} does not match {what} [{n}, {d}]",
                config.token_dim
            )));
        }
        config.num_virtual_tokens = n;
        let adapter = PeftAdapter::new(config, tensor).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let dir = if single { staging.to_path_buf() } else { staging.join(format!("p{i}")) };
        adapter.validate(info, &dir).map_err(|e| ApiError::bad_request(e.to_string()))?;
        adapter.save(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    std::fs::create_dir_all(staging).map_err(|e| ApiError::internal(e.to_string()))?;
    if let Some(task) = &upload.task {
        let meta = TaskMeta::from_value(serde_json::Value::Object(task.clone()))
            .map_err(|e| ApiError::bad_request(format!("task: {e}")))?;
        meta.write(staging).map_err(|e| ApiError::internal(e.to_string()))?;
    }
    Ok(())
}

/// Writes a prompt `[N, D]` (+ optional task.json fields) as a task folder `dir/name`; used
/// by tests and the load generator to prepare a prompts directory.
pub fn write_task_folder(
    dir: &Path,
    prompts: &[Tensor],
    model: &Model,
    meta: Option<&TaskMeta>,
) -> softprompt::Result<()> {
    let info = model.backbone.info();
    for (i, p) in prompts.iter().enumerate() {
        let n = p.dim(0)?;
        let member = if prompts.len() == 1 { dir.to_path_buf() } else { dir.join(format!("p{i}")) };
        PeftAdapter::new(AdapterConfig::new(info, n, "RANDOM"), p.to_device(&Device::Cpu)?)?.save(&member)?;
    }
    if let Some(meta) = meta {
        meta.write(dir)?;
    }
    Ok(())
}
