//! The `server_request` fuzz target's input layout, server state and checks. Shared with
//! `crates/softprompt-serve/tests/fuzz_regressions.rs` (which includes this file with
//! `#[path]`), so the test decodes inputs exactly as the target does.
//!
//! Input: one control byte; `control % 3` picks the endpoint: 0 `POST /v1/generate`,
//! 1 `POST /v1/classify`, 2 `PUT /v1/tasks/{name}`, where the next byte is the length L of
//! the task name and L bytes of name follow (UTF-8, lossy). The rest is the JSON body.
//!
//! The body goes through the functions the handlers use: `http::generate_job`,
//! `http::classify_job` (parse, validate, look the task up, tokenize, check lengths), and
//! `http::parse_json::<Upload>` then `Registry::put` (validate, stage, rename into place).
//! No HTTP and no worker thread: the jobs are checked, not run. The server state is built
//! once: the tiny Llama GGUF seed `fuzz/seeds/gguf/tiny_f32_f16.gguf` (hidden size 8, 64
//! positions, byte-level BPE vocabulary `<|endoftext|> <|im_start|> a b c ab Ġ Ġa`) with the
//! tasks of [`TASKS`].

use candle_core::{Device, Tensor};
use softprompt_serve::batcher::Batcher;
use softprompt_serve::http::{classify_job, generate_job, parse_json, AppState};
use softprompt_serve::metrics::Metrics;
use softprompt_serve::registry::{write_task_folder, Registry, TaskMeta, Upload};
use softprompt_serve::{ApiError, ServeConfig};
use std::path::Path;
use std::sync::Arc;

/// `plain`: a 3-token prompt, no labels; `cls`: 2 tokens, a template, two labels; `ens`: an
/// ensemble of 2- and 4-token prompts, three labels. Uploads never replace them.
pub const TASKS: [&str; 3] = ["plain", "cls", "ens"];

/// The server state for the model at `model_path`, with a prompts folder `scratch/prompts`
/// holding [`TASKS`] (made afresh).
pub fn state(model_path: &Path, scratch: &Path) -> Arc<AppState> {
    let device = Device::Cpu;
    let model = Arc::new(softprompt::load::load_model(model_path, &device).expect("load the tiny GGUF seed"));
    let d = model.backbone.info().d_model;
    // [n, d], small deterministic values.
    let prompt = |n: usize, k: usize| {
        let v: Vec<f32> = (0..n * d).map(|i| ((i * 37 + k * 11) % 17) as f32 / 40.0 - 0.2).collect();
        Tensor::from_vec(v, (n, d), &device).expect("prompt")
    };
    let meta = |template: Option<&str>, labels: &[&str], verbalizer: &[&str]| TaskMeta {
        template: template.map(str::to_string),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        verbalizer: verbalizer.iter().map(|s| s.to_string()).collect(),
        ..TaskMeta::default()
    };
    let dir = scratch.join("prompts");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the prompts folder");
    write_task_folder(&dir.join("plain"), &[prompt(3, 0)], &model, None).expect("write `plain`");
    let cls = meta(Some("a {text} b"), &["yes", "no"], &[" a", " ab"]);
    write_task_folder(&dir.join("cls"), &[prompt(2, 1)], &model, Some(&cls)).expect("write `cls`");
    let ens = meta(None, &["x", "y", "z"], &[" a", " b", " c"]);
    write_task_folder(&dir.join("ens"), &[prompt(2, 2), prompt(4, 3)], &model, Some(&ens)).expect("write `ens`");
    let cfg = ServeConfig::new(&dir);
    let registry = Arc::new(Registry::load(&dir, &model, cfg.store.clone()).expect("load the tasks"));
    let metrics = Arc::new(Metrics::default());
    let batcher = Arc::new(Batcher::new(cfg.batch.clone(), model.clone(), metrics.clone()));
    Arc::new(AppState { model, registry, batcher, metrics, cfg })
}

/// Runs one input. `Ok` when the server would accept the request, the error it would answer
/// otherwise. Panics when an accepted request breaks what validation promises (lengths within
/// the model's positions, a finite temperature, the upload served and complete), when a
/// rejection is not a 4xx, or when a rejected upload leaves files behind.
pub fn run(s: &AppState, data: &[u8]) -> Result<(), ApiError> {
    let Some((&control, rest)) = data.split_first() else {
        return Err(ApiError::bad_request("empty input"));
    };
    let result = match control % 3 {
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
    let result = s.registry.put(&name, upload, &s.model);
    // Success or not, no staging or old folder is left (hidden entries in the prompts folder).
    let hidden: Vec<String> = std::fs::read_dir(&s.registry.dir)
        .expect("read the prompts folder")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "left behind: {hidden:?}");
    let (task, replaced) = result?;
    assert!(!replaced, "uploads here never replace");
    assert_eq!(task.name, name);
    assert!(!task.prompts.is_empty());
    let d = s.model.backbone.info().d_model;
    for p in &task.prompts {
        let (n, width) = p.dims2().expect("a prompt is [N, D]");
        assert!(n > 0 && width == d, "prompt [{n}, {width}] on a model of width {d}");
        let values = p.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("prompt values");
        assert!(values.iter().all(|v| v.is_finite()), "non-finite prompt values");
    }
    assert_eq!(task.label_targets.len(), task.labels.len());
    assert!(s.registry.get(&name).is_some(), "uploaded but not served");
    // Remove it again, so every input starts from the same three tasks.
    assert!(s.registry.delete(&name).expect("delete the upload"));
    assert!(!s.registry.dir.join(&name).exists(), "deleted but its folder is still there");
    Ok(())
}
