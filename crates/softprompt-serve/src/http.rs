//! Routes, request/response bodies and per-request limits.
//!
//! Before a handler runs: `access::guard` (Host allow-list, token, write access), then the
//! body is read within its limits (`body::JsonBody`). Parsing, tokenisation and the checks of
//! `limits` run on tokio's blocking pool (`off_thread`), so a large or slow-to-tokenize
//! input never holds up the threads that serve the other connections.

use crate::batcher::{Batcher, Reply, Work};
use crate::body::JsonBody;
use crate::engine::{ClsItem, GenItem};
use crate::error::ApiError;
use crate::limits::{check_cost, check_stop, Cost};
use crate::metrics::Metrics;
use crate::registry::{Registry, Task, Upload};
use crate::ServeConfig;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use softprompt::decode::DecodeParams;
use softprompt::eval::ensemble::votes;
use softprompt::load::Model;
use std::sync::Arc;
use std::time::Instant;

pub struct AppState {
    pub model: Arc<Model>,
    pub registry: Arc<Registry>,
    pub batcher: Arc<Batcher>,
    pub metrics: Arc<Metrics>,
    pub cfg: ServeConfig,
}

type AppResult = Result<Response, ApiError>;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/classify", post(classify))
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/{name}", put(put_task).delete(delete_task).get(get_task))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .merge(crate::openai::routes())
        .fallback(|| async { ApiError::not_found("no such endpoint (see /openapi.json)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint")
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::access::guard))
        .layer(axum::middleware::from_fn_with_state(state.clone(), record))
        .layer(axum::middleware::from_fn(crate::openai::reshape_errors))
        .with_state(state)
}

/// Request counts and latency by endpoint.
async fn record(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let start = Instant::now();
    let resp = next.run(req).await;
    s.metrics.request(&endpoint, resp.status().as_u16(), start.elapsed().as_secs_f64());
    resp
}

/// Runs `f` on tokio's blocking pool (parsing, tokenisation, file writes).
pub(crate) async fn off_thread<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::internal(e.to_string()))?
}

/// Parses a JSON request body (400 for malformed JSON or wrong fields), e.g. the upload body
/// [`Upload`] of `PUT /v1/tasks/{name}`.
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub(crate) fn task_or_404(s: &AppState, name: &str) -> Result<Arc<Task>, ApiError> {
    s.registry
        .get(name)
        .ok_or_else(|| ApiError::not_found(format!("unknown task `{name}` (see GET /v1/tasks)")))
}

/// The input's token ids (template applied), within the input limits: characters counted
/// before tokenizing, tokens after.
pub(crate) fn encode(s: &AppState, task: &Task, input: &str) -> Result<Vec<u32>, ApiError> {
    s.cfg.input.check_chars(input)?;
    let tokenizer = s.model.tokenizer().map_err(|e| ApiError::internal(e.to_string()))?;
    let ids = task
        .encode(tokenizer, input)
        .map_err(|e| ApiError::bad_request(format!("cannot tokenize the input: {e}")))?;
    finish_source(s, ids)
}

/// Tokenized input `ids` as the model takes them: not empty, EOS last for encoder-decoder
/// models, within `--max-input-tokens`.
pub(crate) fn finish_source(s: &AppState, mut ids: Vec<u32>) -> Result<Vec<u32>, ApiError> {
    if ids.is_empty() {
        return Err(ApiError::bad_request("the input tokenizes to nothing"));
    }
    if s.model.backbone.is_seq2seq() {
        // Encoder inputs end with EOS, as the library feeds them (`ClassificationTask::sources`).
        ids.extend(s.model.backbone.info().eos_token_ids.first());
    }
    s.cfg.input.check_tokens(ids.len())?;
    Ok(ids)
}

/// Queues the job and waits for its reply, at most the per-request timeout (504).
///
/// 429 when the queue already holds more than half the timeout's worth of work
/// (`Batcher::expected_wait`): under sustained overload a full queue would otherwise hold
/// more waiting than the timeout allows, and the worker would spend its batches on requests
/// that time out before their answer is ready (the soak bench, `benches/soak.rs`, measured
/// 2.3 answers/s instead of 10 with a 10 s timeout).
async fn dispatch(s: &AppState, task: &str, work: Work) -> Result<Reply, ApiError> {
    let rx = queue(s, task, work)?;
    match tokio::time::timeout(s.cfg.request_timeout, rx).await {
        Err(_) => Err(timed_out(s)),
        Ok(Err(_)) => Err(worker_stopped()),
        Ok(Ok(r)) => r,
    }
}

/// 504: no answer within the request timeout.
pub(crate) fn timed_out(s: &AppState) -> ApiError {
    ApiError::new(StatusCode::GATEWAY_TIMEOUT, format!("no answer within {} ms", s.cfg.request_timeout.as_millis()))
}

/// 503: the worker dropped the job without an answer.
pub(crate) fn worker_stopped() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model worker stopped")
}

/// Queues the job (429 as [`dispatch`] says) and returns where its reply will arrive;
/// dropping the receiver cancels the job (its batch row is freed at the next step).
pub(crate) fn queue(s: &AppState, task: &str, work: Work) -> Result<tokio::sync::oneshot::Receiver<crate::batcher::ReplyResult>, ApiError> {
    let limit = s.cfg.request_timeout / 2;
    if let Some(wait) = s.batcher.expected_wait().filter(|w| *w > limit) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "the queue holds about {} ms of work, over half the {} ms timeout; retry later",
                wait.as_millis(),
                s.cfg.request_timeout.as_millis()
            ),
        ));
    }
    s.batcher.submit(task, work)
}

/// `stop`: one string or a list (the native and the OpenAI endpoints take both).
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings of an optional field (none when absent).
    pub(crate) fn strings(stop: Option<Stop>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    task: String,
    input: String,
    #[serde(default)]
    max_new_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<u64>,
}

async fn generate(State(s): State<Arc<AppState>>, JsonBody(body): JsonBody) -> AppResult {
    let state = s.clone();
    let (task, item) = off_thread(move || generate_job(&state, &body)).await?;
    match dispatch(&s, &task.name, Work::Generate(item)).await? {
        Reply::Generate(o) => Ok(Json(serde_json::json!({
            "task": task.name,
            "text": o.text,
            "tokens": o.tokens,
            "logprobs": o.logprobs,
            "finish_reason": o.finish_reason,
            "n_prompts": task.prompts.len(),
        }))
        .into_response()),
        Reply::Classify(_) => Err(ApiError::internal("unexpected reply")),
    }
}

/// Parses and validates a `POST /v1/generate` body: everything the handler checks before
/// queueing (the `server_request` fuzz target calls it). Returns the task and the job.
pub fn generate_job(s: &AppState, body: &[u8]) -> Result<(Arc<Task>, GenItem), ApiError> {
    let req: GenerateRequest = parse_json(body)?;
    let max_new = req.max_new_tokens.unwrap_or(16.min(s.cfg.max_new_tokens));
    if max_new == 0 || max_new > s.cfg.max_new_tokens {
        return Err(ApiError::bad_request(format!(
            "max_new_tokens must be between 1 and {} (got {max_new})",
            s.cfg.max_new_tokens
        )));
    }
    let temperature = req.temperature.unwrap_or(0.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(ApiError::bad_request("temperature must be a number >= 0"));
    }
    let stop = Stop::strings(req.stop);
    check_stop(&stop)?;
    let task = task_or_404(s, &req.task)?;
    let source = encode(s, &task, &req.input)?;
    let params = DecodeParams { max_new_tokens: max_new, temperature, stop, seed: req.seed, ..DecodeParams::greedy(max_new) };
    let item = generation_item(s, &task, source, params)?;
    Ok((task, item))
}

/// The generation job of `task` on the tokenized input `source`: within the model's
/// positions and the per-batch budget.
pub(crate) fn generation_item(s: &AppState, task: &Task, source: Vec<u32>, params: DecodeParams) -> Result<GenItem, ApiError> {
    let max_new = params.max_new_tokens;
    if let Some(max) = s.model.backbone.info().max_positions {
        let needed = task.max_prompt_len() + source.len() + max_new;
        if needed > max {
            return Err(ApiError::bad_request(format!(
                "prompt + input + max_new_tokens = {needed} positions, more than the model's {max}"
            )));
        }
    }
    let item = GenItem { prompts: task.prompts.clone(), prompt_kv: task.prompt_kv.clone(), source, params, stream: None };
    let what = "prompts x (prompt + input + max_new_tokens)";
    check_cost(Cost::generate(&item), s.cfg.batch.max_tokens, what)?;
    Ok(item)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    task: String,
    input: String,
}

async fn classify(State(s): State<Arc<AppState>>, JsonBody(body): JsonBody) -> AppResult {
    let state = s.clone();
    let (task, item) = off_thread(move || classify_job(&state, &body)).await?;
    match dispatch(&s, &task.name, Work::Classify(item)).await? {
        Reply::Classify(o) => {
            let best = softprompt::eval::classify::argmax(&o.scores);
            let mut scores = serde_json::Map::new();
            let mut vote_counts = serde_json::Map::new();
            for (l, name) in task.labels.iter().enumerate() {
                scores.insert(name.clone(), o.scores[l].into());
                vote_counts.insert(name.clone(), 0.into());
            }
            for v in votes(&o.per_prompt) {
                let name = &task.labels[v];
                let n = vote_counts.get(name).and_then(|x| x.as_u64()).unwrap_or(0);
                vote_counts.insert(name.clone(), (n + 1).into());
            }
            let per_prompt: Vec<serde_json::Value> = task
                .members
                .iter()
                .zip(&o.per_prompt)
                .map(|(m, s)| serde_json::json!({"member": m, "scores": s}))
                .collect();
            Ok(Json(serde_json::json!({
                "task": task.name,
                "label": task.labels[best],
                "scores": scores,
                "votes": vote_counts,
                "n_prompts": task.prompts.len(),
                "per_prompt": per_prompt,
            }))
            .into_response())
        }
        Reply::Generate(_) => Err(ApiError::internal("unexpected reply")),
    }
}

/// Parses and validates a `POST /v1/classify` body: everything the handler checks before
/// queueing (the `server_request` fuzz target calls it). Returns the task and the job.
pub fn classify_job(s: &AppState, body: &[u8]) -> Result<(Arc<Task>, ClsItem), ApiError> {
    let req: ClassifyRequest = parse_json(body)?;
    let task = task_or_404(s, &req.task)?;
    if task.labels.is_empty() {
        return Err(ApiError::bad_request(format!(
            "task `{}` has no labels (its task.json needs `labels` and `verbalizer`)",
            task.name
        )));
    }
    let source = encode(s, &task, &req.input)?;
    let item = classification_item(s, &task, source)?;
    Ok((task, item))
}

/// The classification job of `task` (which has labels) on the tokenized input `source`:
/// within the model's positions and the per-batch budget.
pub(crate) fn classification_item(s: &AppState, task: &Task, source: Vec<u32>) -> Result<ClsItem, ApiError> {
    if let Some(max) = s.model.backbone.info().max_positions {
        let longest = task.label_targets.iter().map(Vec::len).max().unwrap_or(0);
        let needed = task.max_prompt_len() + source.len() + longest;
        if needed > max {
            return Err(ApiError::bad_request(format!(
                "prompt + input + label = {needed} positions, more than the model's {max}"
            )));
        }
    }
    // The verbalizer counts here: multi-token labels cost a row per (prompt, label). Checked
    // before the job copies the task's label targets.
    let cost = Cost::classification(&task.prompts, source.len(), &task.label_targets);
    let what = "prompts x labels x (prompt + input + longest label), or prompts x (prompt + input) for one-token labels";
    check_cost(cost, s.cfg.batch.max_tokens, what)?;
    Ok(ClsItem {
        prompts: task.prompts.clone(),
        prompt_kv: task.prompt_kv.clone(),
        source,
        label_targets: task.label_targets.clone(),
    })
}

async fn list_tasks(State(s): State<Arc<AppState>>, RawQuery(query): RawQuery) -> AppResult {
    if query.as_deref() == Some("errors") {
        return Ok(Json(s.registry.errors_json()).into_response());
    }
    let tasks: Vec<serde_json::Value> = s.registry.list().iter().map(|t| t.summary()).collect();
    Ok(Json(tasks).into_response())
}

async fn get_task(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> AppResult {
    Ok(Json(task_or_404(&s, &name)?.summary()).into_response())
}

async fn put_task(State(s): State<Arc<AppState>>, Path(name): Path<String>, JsonBody(body): JsonBody) -> AppResult {
    let (registry, model) = (s.registry.clone(), s.model.clone());
    let (task, replaced) = off_thread(move || {
        let upload: Upload = parse_json(&body)?;
        registry.put(&name, upload, &model)
    })
    .await?;
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(task.summary())).into_response())
}

async fn delete_task(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> AppResult {
    let registry = s.registry.clone();
    let n = name.clone();
    let removed = off_thread(move || registry.delete(&n)).await?;
    if !removed {
        return Err(ApiError::not_found(format!("unknown task `{name}`")));
    }
    Ok(Json(serde_json::json!({ "deleted": name })).into_response())
}

/// Liveness for anyone; the model, tasks and queue only for holders of the token (when the
/// server has one).
async fn health(State(s): State<Arc<AppState>>, headers: HeaderMap) -> AppResult {
    if !crate::access::authorized(&s.cfg, &headers) {
        return Ok(Json(serde_json::json!({ "status": "ok" })).into_response());
    }
    let info = s.model.backbone.info();
    Ok(Json(serde_json::json!({
        "status": "ok",
        "model": info.name,
        "arch": info.arch,
        "d_model": info.d_model,
        "tasks": s.registry.len(),
        "queue_depth": s.batcher.depth(),
    }))
    .into_response())
}

async fn metrics(State(s): State<Arc<AppState>>) -> AppResult {
    let kv = s.registry.kv_store();
    let gauges = crate::metrics::PromptKvGauges { bytes: kv.bytes(), budget: kv.budget(), evictions: kv.evictions() };
    let text = s.metrics.render(s.batcher.depth(), s.registry.len(), gauges);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

async fn openapi(State(s): State<Arc<AppState>>) -> AppResult {
    Ok(Json(crate::openapi::document(&s.cfg)).into_response())
}
