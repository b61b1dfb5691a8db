//! The `server_request` fuzz target's input layout, server state and checks. Shared with
//! `crates/softprompt-serve/tests/fuzz_regressions.rs` (which includes this file with
//! `#[path]`), so the test decodes inputs exactly as the target does.
//!
//! Input: one control byte. `control % 4` picks the endpoint: 0 `POST /v1/generate`,
//! 1 `POST /v1/classify`, 2 and 3 `PUT /v1/tasks/{name}`, where the next byte is the length
//! L of the task name and L bytes of name follow (UTF-8, lossy). Bit 2 (`control & 4`) picks
//! the model: 0 the tiny Llama GGUF seed, 1 the tiny T5 fixture (no position limit). The rest
//! is the JSON body.
//!
//! The body goes through the functions the handlers use: `http::generate_job`,
//! `http::classify_job` (parse, validate, look the task up, tokenize, check lengths), and
//! `http::parse_json::<Upload>` then `Registry::put` (validate, stage, rename into place).
//! An accepted generation or classification then RUNS through the engine the batcher calls
//! (`engine::generate` / `engine::classify`, `seq2seq::*` for T5), so what validation lets
//! through must also compute. Uploads to the name [`SWAP`] are kept, so a later input
//! replaces them (and may generate on them); other uploads are deleted again.
//!
//! Models: the tiny Llama GGUF seed `fuzz/seeds/gguf/tiny_f32_f16.gguf` (hidden size 8, 64
//! positions, byte-level BPE vocabulary `<|endoftext|> <|im_start|> a b c ab Ġ Ġa`) and the
//! `t5-tiny` fixture (hidden size 32) with a word-level tokenizer (`<pad> </s> <unk>`, then
//! `w3`..`w255`), each with the tasks of [`TASKS`]; `max_new_tokens` is capped at
//! [`MAX_NEW_TOKENS`] so every run stays short.

#[path = "../../crates/softprompt/tests/common/word_level.rs"]
mod word_level;

use candle_core::{Device, Tensor};
use softprompt_serve::batcher::Batcher;
use softprompt_serve::engine::{self, ClsOutput, GenOutput, Prefill};
use softprompt_serve::http::{classify_job, generate_job, parse_json, AppState};
use softprompt_serve::metrics::Metrics;
use softprompt_serve::registry::{write_task_folder, Registry, TaskMeta, Upload};
use softprompt_serve::{seq2seq, ApiError, ServeConfig};
use std::path::Path;
use std::sync::Arc;

/// `plain`: a 3-token prompt, no labels; `cls`: 2 tokens, a template, two labels; `ens`: an
/// ensemble of 2- and 4-token prompts, three labels. Uploads never replace them.
pub const TASKS: [&str; 3] = ["plain", "cls", "ens"];

/// The one upload name that is kept (and so replaced by the next upload to it).
pub const SWAP: &str = "swap";

pub const MAX_NEW_TOKENS: usize = 64;

/// The server states: `[tiny Llama GGUF, tiny T5]`, each with a prompts folder under
/// `scratch` holding [`TASKS`] (made afresh). `repo` is the repository's root.
pub fn states(repo: &Path, scratch: &Path) -> [Arc<AppState>; 2] {
    let llama = softprompt::load::load_model(&repo.join("fuzz/seeds/gguf/tiny_f32_f16.gguf"), &Device::Cpu)
        .expect("load the tiny GGUF seed");
    // The T5 fixture with a word-level tokenizer: 0 <pad>, 1 </s>, 2 <unk> (the unknown first).
    let t5_dir = scratch.join("t5-tiny");
    std::fs::create_dir_all(&t5_dir).expect("T5 folder");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(repo.join("crates/softprompt/tests/fixtures/t5-tiny").join(f), t5_dir.join(f)).expect("copy T5");
    }
    let tokenizer = word_level::word_level_json(&[(2, "<unk>"), (0, "<pad>"), (1, "</s>")], 256);
    std::fs::write(t5_dir.join("tokenizer.json"), tokenizer).expect("T5 tokenizer");
    let t5 = softprompt::load::load_model(&t5_dir, &Device::Cpu).expect("load the tiny T5");
    [state(llama, &scratch.join("llama"), ["a", "b", "c"]), state(t5, &scratch.join("t5"), ["w3", "w4", "w5"])]
}

/// A server state for `model` with [`TASKS`] in `dir/prompts`; `words` are three words of
/// its vocabulary for templates and verbalizers.
fn state(model: softprompt::load::Model, dir: &Path, words: [&str; 3]) -> Arc<AppState> {
    let device = Device::Cpu;
    let model = Arc::new(model);
    let d = model.backbone.info().d_model;
    // [n, d], small deterministic values.
    let prompt = |n: usize, k: usize| {
        let v: Vec<f32> = (0..n * d).map(|i| ((i * 37 + k * 11) % 17) as f32 / 40.0 - 0.2).collect();
        Tensor::from_vec(v, (n, d), &device).expect("prompt")
    };
    let meta = |template: Option<String>, labels: &[&str], verbalizer: Vec<String>| TaskMeta {
        template,
        labels: labels.iter().map(|s| s.to_string()).collect(),
        verbalizer,
        ..TaskMeta::default()
    };
    let [a, b, c] = words;
    let dir = dir.join("prompts");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the prompts folder");
    write_task_folder(&dir.join("plain"), &[prompt(3, 0)], &model, None).expect("write `plain`");
    let cls = meta(Some(format!("{a} {{text}} {b}")), &["yes", "no"], vec![format!(" {a}"), format!(" {a}{b}")]);
    write_task_folder(&dir.join("cls"), &[prompt(2, 1)], &model, Some(&cls)).expect("write `cls`");
    let ens = meta(None, &["x", "y", "z"], vec![format!(" {a}"), format!(" {b}"), format!(" {c}")]);
    write_task_folder(&dir.join("ens"), &[prompt(2, 2), prompt(4, 3)], &model, Some(&ens)).expect("write `ens`");
    let mut cfg = ServeConfig::new(&dir);
    cfg.max_new_tokens = MAX_NEW_TOKENS;
    let registry = Arc::new(Registry::load(&dir, &model, cfg.store.clone()).expect("load the tasks"));
    assert!(registry.errors().is_empty(), "fixed tasks refused: {:?}", registry.errors());
    let metrics = Arc::new(Metrics::default());
    let batcher = Arc::new(Batcher::new(cfg.batch.clone(), model.clone(), metrics.clone()));
    Arc::new(AppState { model, registry, batcher, metrics, cfg })
}

/// Runs one input. `Ok` when the server would accept (and answer) the request, the error it
/// would answer otherwise. Panics when an accepted request breaks what validation promises
/// (lengths within the model's positions, a finite temperature, the upload served and
/// complete), when the engine fails on an accepted job or answers out of shape, when a
/// rejection is not a 4xx, or when an upload leaves files behind.
pub fn run(states: &[Arc<AppState>; 2], data: &[u8]) -> Result<(), ApiError> {
    let Some((&control, rest)) = data.split_first() else {
        return Err(ApiError::bad_request("empty input"));
    };
    let s = &states[usize::from(control & 4 != 0)];
    let result = match control % 4 {
        0 => check_generate(s, rest),
        1 => check_classify(s, rest),
        _ => check_upload(s, rest),
    };
    if let Err(e) = &result {
        assert!(e.status.is_client_error(), "a request was refused with {e}");
    }
    result
}

fn check_generate(s: &AppState, body: &[u8]) -> Result<(), ApiError> {
    let (task, job) = generate_job(s, body)?;
    let p = &job.params;
    assert!((1..=s.cfg.max_new_tokens).contains(&p.max_new_tokens), "max_new_tokens {}", p.max_new_tokens);
    assert!(p.temperature.is_finite() && p.temperature >= 0.0, "temperature {}", p.temperature);
    assert!(!job.source.is_empty(), "empty source");
    assert_eq!(job.prompts.len(), task.prompts.len());
    if let Some(max) = s.model.backbone.info().max_positions {
        assert!(task.max_prompt_len() + job.source.len() + p.max_new_tokens <= max);
    }
    let vocab = s.model.backbone.info().vocab_size;
    assert!(job.source.iter().all(|&t| (t as usize) < vocab), "token id out of the vocabulary");
    let max_new = p.max_new_tokens;
    let out: GenOutput = if s.model.backbone.is_seq2seq() {
        seq2seq::generate(&s.model, &[job], &|_| false)
    } else {
        engine::generate(&s.model, &[job], &mut Prefill::new(true), &|_| false)
    }
    .expect("an accepted generation runs")
    .remove(0);
    assert!(out.tokens.len() <= max_new, "{} tokens for max_new_tokens {max_new}", out.tokens.len());
    assert_eq!(out.logprobs.len(), out.tokens.len());
    assert!(out.logprobs.iter().all(|l| !l.is_nan() && *l <= 1e-4), "log-probabilities {:?}", out.logprobs);
    Ok(())
}

fn check_classify(s: &AppState, body: &[u8]) -> Result<(), ApiError> {
    let (task, job) = classify_job(s, body)?;
    assert!(!task.labels.is_empty());
    assert_eq!(job.label_targets.len(), task.labels.len());
    assert!(!job.source.is_empty(), "empty source");
    if let Some(max) = s.model.backbone.info().max_positions {
        let longest = job.label_targets.iter().map(Vec::len).max().unwrap_or(0);
        assert!(task.max_prompt_len() + job.source.len() + longest <= max);
    }
    let vocab = s.model.backbone.info().vocab_size;
    assert!(job.source.iter().all(|&t| (t as usize) < vocab), "token id out of the vocabulary");
    let out: ClsOutput = if s.model.backbone.is_seq2seq() {
        seq2seq::classify(&s.model, &[job], 64)
    } else {
        engine::classify(&s.model, &[job], 64, &mut Prefill::new(true))
    }
    .expect("an accepted classification runs")
    .remove(0);
    assert_eq!(out.scores.len(), task.labels.len());
    assert_eq!(out.per_prompt.len(), task.prompts.len());
    assert!(out.scores.iter().all(|v| v.is_finite() && *v <= 1e-4), "scores {:?}", out.scores);
    Ok(())
}

fn check_upload(s: &AppState, rest: &[u8]) -> Result<(), ApiError> {
    let (&len, rest) = rest.split_first().ok_or_else(|| ApiError::bad_request("no name length"))?;
    let (name, body) = rest.split_at((len as usize).min(rest.len()));
    let name = String::from_utf8_lossy(name).into_owned();
    if TASKS.contains(&name.as_str()) {
        return Err(ApiError::bad_request("uploads do not replace the fixed tasks here"));
    }
    let upload: Upload = parse_json(body)?;
    let existed = s.registry.get(&name).is_some();
    let result = s.registry.put(&name, upload, &s.model);
    // Success or not, no staging or old folder is left (hidden entries in the prompts folder).
    let hidden: Vec<String> = std::fs::read_dir(&s.registry.dir)
        .expect("read the prompts folder")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
    let (task, replaced) = result?;
    assert_eq!(replaced, existed, "`replaced` must say whether a task was served");
    assert_eq!(task.name, name);
    assert!(!task.prompts.is_empty());
    let info = s.model.backbone.info();
    let rows: usize = task.prompts.iter().map(|p| p.dim(0).expect("[N, D]")).sum();
    assert!(rows <= s.registry.limits().max_prompt_tokens, "{rows} prompt rows");
    for p in &task.prompts {
        let (n, width) = p.dims2().expect("a prompt is [N, D]");
        assert!(n > 0 && width == info.d_model, "prompt [{n}, {width}] on a model of width {}", info.d_model);
        let values = p.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("prompt values");
        assert!(values.iter().all(|v| v.is_finite()), "non-finite prompt values");
    }
    // What was written is at most the prompts twice over (PEFT's seq2seq layout).
    let written: u64 = walk_bytes(&s.registry.dir.join(&name));
    assert!(written <= 2 * (rows * info.d_model * 4) as u64 + 64 * 1024, "{written} bytes written for {rows} rows");
    assert_eq!(task.label_targets.len(), task.labels.len());
    assert!(s.registry.get(&name).is_some(), "uploaded but not served");
    if name != SWAP {
        // Removed again, so every other input starts from the same tasks.
        assert!(s.registry.delete(&name).expect("delete the upload"));
        assert!(!s.registry.dir.join(&name).exists(), "deleted but its folder is still there");
    }
    Ok(())
}

/// Bytes of the files under `dir`.
fn walk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}
