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
//! Each prompt's keys/values are computed on first use and kept with its task
//! ([`PromptKv`]) within the store's byte budget ([`PromptKvStore`]: least recently used
//! prompts are evicted and computed again when next used); replacing or deleting a task
//! drops them with it.
//!
//! Limits ([`StoreLimits`], the server's flags): at most `max_tasks` tasks, at most
//! `max_prompt_tokens` prompt rows per task (all ensemble members together), a template of at
//! most [`MAX_TEMPLATE_BYTES`] with `{text}` exactly once; every adapter is checked against
//! the model (`PeftAdapter::validate_within`) whether uploaded or found at start-up.
//!
//! Start-up never fails on one task: a folder that cannot be served is skipped, logged and
//! listed by [`Registry::errors`] (`GET /v1/tasks?errors`). Before loading, what an
//! interrupted upload or deletion left is cleaned up, and a replaced task whose new version
//! never landed is restored (`recovery.rs`).

mod recovery;
mod upload;

pub use upload::{PromptData, Upload};

use crate::engine::{PromptKv, PromptKvStore};
use crate::error::ApiError;
use axum::http::StatusCode;
use candle_core::{Device, Tensor};
use softprompt::load::Model;
use softprompt::prompt::peft::{AdapterConfig, PeftAdapter, CONFIG_FILE, DEFAULT_MAX_PROMPT_TOKENS};
pub use softprompt::task::TaskMeta;
use softprompt::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Longest template a served task may have, in bytes: every request's input is formatted
/// with it and tokenized.
pub const MAX_TEMPLATE_BYTES: usize = 4096;

/// Limits of the task store (`softprompt serve` flags).
#[derive(Clone, Debug)]
pub struct StoreLimits {
    /// Most tasks served (`--max-tasks`): an upload of one more is refused (409); at start-up
    /// the folders past it (in name order) are skipped.
    pub max_tasks: usize,
    /// Most prompt rows of one task, its ensemble members together (`--max-prompt-tokens`).
    pub max_prompt_tokens: usize,
    /// Most bytes of cached prompt keys/values, all tasks together (`--kv-cache-bytes`).
    pub kv_cache_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits { max_tasks: 1000, max_prompt_tokens: DEFAULT_MAX_PROMPT_TOKENS, kv_cache_bytes: 1 << 30 }
    }
}

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
    /// Inputs are rendered as the user's turn of the model's chat template (task.json
    /// `chat`, `softprompt train --chat`).
    pub chat: bool,
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
    ///
    /// A chat task renders the formatted text as the user's turn of the model's chat
    /// template, ending with the generation prompt, as `softprompt train --chat` did.
    pub fn encode(&self, tokenizer: &Tokenizer, text: &str) -> softprompt::Result<Vec<u32>> {
        let text = self.format(text);
        if self.chat {
            let Some(template) = softprompt::chat::ChatTemplate::of(tokenizer)? else {
                softprompt::bail!("task `{}` was trained on chat-formatted examples, but the model has no chat template", self.name);
            };
            let user = [softprompt::chat::Message::new("user", text)];
            return template.encode(tokenizer, &user, true, self.prompt_after_bos);
        }
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
            "chat": self.chat,
            "template": self.template,
        })
    }
}

/// All tasks, and the folder they live in.
pub struct Registry {
    pub dir: PathBuf,
    limits: StoreLimits,
    tasks: RwLock<BTreeMap<String, Arc<Task>>>,
    /// Folders that could not be served at start-up, with why; an upload or deletion of the
    /// name clears its entry.
    errors: RwLock<BTreeMap<String, String>>,
    /// Where every task's prompt keys/values are cached.
    kv: Arc<PromptKvStore>,
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
    /// Loads every task folder under `dir` (created when missing), after cleaning up what an
    /// interrupted upload or deletion left (module doc). Hidden folders are skipped; a folder
    /// that cannot be served is skipped with a logged error and listed by [`Registry::errors`].
    /// Fails only when `dir` itself cannot be created or read.
    pub fn load(dir: &Path, model: &Model, limits: StoreLimits) -> softprompt::Result<Registry> {
        std::fs::create_dir_all(dir).map_err(|e| softprompt::Error::io(dir, e))?;
        for action in recovery::recover(dir) {
            tracing::warn!("{action}");
        }
        let kv = Arc::new(PromptKvStore::new(limits.kv_cache_bytes));
        let mut tasks = BTreeMap::new();
        let mut errors = BTreeMap::new();
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
            let error = if !valid_name(&name) {
                "not a valid task name (letters, digits, `-`, `_`, `.`)".to_string()
            } else if tasks.len() >= limits.max_tasks {
                format!("over the server's --max-tasks {}", limits.max_tasks)
            } else {
                match load_task(&path, &name, model, &limits, &kv) {
                    Ok(Some(task)) => {
                        tasks.insert(name, Arc::new(task));
                        continue;
                    }
                    Ok(None) => "no adapter_config.json in it or its subfolders".to_string(),
                    Err(e) => e.to_string(),
                }
            };
            tracing::error!("skipping task folder {}: {error}", path.display());
            errors.insert(name, error);
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            limits,
            tasks: RwLock::new(tasks),
            errors: RwLock::new(errors),
            kv,
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

    /// The folders that could not be served, `(folder name, why)`, in name order.
    pub fn errors(&self) -> Vec<(String, String)> {
        let errors = self.errors.read().unwrap_or_else(|e| e.into_inner());
        errors.iter().map(|(n, e)| (n.clone(), e.clone())).collect()
    }

    /// The errors as the JSON of `GET /v1/tasks?errors`: `[{"name", "error"}]`.
    pub fn errors_json(&self) -> serde_json::Value {
        self.errors().into_iter().map(|(name, error)| serde_json::json!({"name": name, "error": error})).collect()
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    /// The cache of every task's prompt keys/values.
    pub fn kv_store(&self) -> &Arc<PromptKvStore> {
        &self.kv
    }

    /// Validates an upload, writes it into `dir/<name>` (staged in a hidden folder, then
    /// renamed into place; crash-safe with the start-up recovery, module doc) and serves it.
    /// Returns the task and whether it replaced a served one. A new task beyond `max_tasks` is refused
    /// with 409.
    pub fn put(&self, name: &str, upload: Upload, model: &Model) -> Result<(Arc<Task>, bool), ApiError> {
        if !valid_name(name) {
            return Err(ApiError::bad_request(format!(
                "invalid task name `{name}`: use letters, digits, `-`, `_`, `.` (not first)"
            )));
        }
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let served = self.get(name).is_some();
        if !served && self.len() >= self.limits.max_tasks {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("the server holds its maximum of {} tasks (--max-tasks); delete one first", self.limits.max_tasks),
            ));
        }
        let nonce = format!("{}-{}", std::process::id(), rand::random::<u64>());
        let staging = self.dir.join(recovery::upload_dir(name, &nonce));
        let result = (|| {
            upload::stage(&staging, &upload, model, &self.limits)?;
            let task = load_task(&staging, name, model, &self.limits, &self.kv)
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
        // A folder that could not be served is replaced the same way (but is no task).
        let replaced = target.exists();
        let old = self.dir.join(recovery::old_dir(name, &nonce));
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
        self.errors.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        Ok((task, served))
    }

    /// Stops serving `name` (or forgets a folder that could not be served) and removes its
    /// folder. `false` when there is no such task or folder.
    pub fn delete(&self, name: &str) -> Result<bool, ApiError> {
        let _guard = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self.tasks.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        let failed = self.errors.write().unwrap_or_else(|e| e.into_inner()).remove(name);
        if removed.is_none() && failed.is_none() {
            return Ok(false);
        }
        let target = self.dir.join(name);
        if target.exists() {
            // Rename first so a crash never leaves a half-deleted task that would load.
            let trash = self.dir.join(recovery::deleted_dir(name, &rand::random::<u64>().to_string()));
            std::fs::rename(&target, &trash)
                .map_err(|e| ApiError::internal(format!("removing {}: {e}", target.display())))?;
            let _ = std::fs::remove_dir_all(&trash);
        }
        Ok(true)
    }
}

/// A served template: at most [`MAX_TEMPLATE_BYTES`], `{text}` exactly once (so an input is
/// never copied more than once into the model's input).
pub(crate) fn check_template(meta: &TaskMeta) -> Result<(), String> {
    let Some(t) = &meta.template else {
        return Ok(());
    };
    if t.len() > MAX_TEMPLATE_BYTES {
        return Err(format!("{} bytes; a served task's template has at most {MAX_TEMPLATE_BYTES}", t.len()));
    }
    let n = t.matches("{text}").count();
    if n != 1 {
        return Err(format!("`{{text}}` must appear exactly once, found {n} times"));
    }
    Ok(())
}

/// Reads a task folder: a single adapter, or adapters in subfolders (an ensemble).
/// Every adapter is checked against the model and `limits` (prompt rows of all members
/// together, template); its keys/values will be cached in `kv`.
fn load_task(dir: &Path, name: &str, model: &Model, limits: &StoreLimits, kv: &Arc<PromptKvStore>) -> softprompt::Result<Option<Task>> {
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
    let mut rows = 0usize;
    for (n, p) in &member_dirs {
        let adapter = PeftAdapter::load(p, device)?;
        adapter.validate_within(info, limits.max_prompt_tokens, p)?;
        rows += adapter.config.num_virtual_tokens;
        if rows > limits.max_prompt_tokens {
            return Err(softprompt::Error::config(
                p.join(CONFIG_FILE),
                "num_virtual_tokens",
                format!(
                    "the task's prompts have more than {} rows together (the server's --max-prompt-tokens)",
                    limits.max_prompt_tokens
                ),
            ));
        }
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
    if meta.chat && model.tokenizer()?.chat_template().is_none() {
        let at = meta_dir.unwrap_or(dir).join(softprompt::task::TASK_FILE);
        return Err(softprompt::Error::config(at, "chat", "the prompt was trained on chat-formatted examples, but the model has no chat template"));
    }
    if let Err(e) = check_template(&meta) {
        let at = meta_dir.unwrap_or(dir).join(softprompt::task::TASK_FILE);
        return Err(softprompt::Error::config(at, "template", e));
    }
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
        prompt_kv: prompts.iter().map(|_| Arc::new(PromptKv::new(kv))).collect(),
        prompts,
        prompt_after_bos: meta.prompt_after_bos,
        chat: meta.chat,
        members,
        template: meta.template,
        labels: meta.labels,
        verbalizer,
        label_targets,
    }))
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
