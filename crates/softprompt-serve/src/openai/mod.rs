//! OpenAI-compatible endpoints, so that existing clients and SDKs can use the served tasks:
//! `GET /v1/models` (every task, plus the bare model as `base`), `GET /v1/models/{model}`,
//! `POST /v1/completions` and `POST /v1/chat/completions` (`stream: true` as server-sent
//! events ending with `data: [DONE]`). Errors are OpenAI's error object ([`error`]).
//!
//! `model` picks the task's soft prompt(s). The requests become the native jobs
//! ([`request`]: the same tokenisation, input limits, budget, 429 and timeout as
//! `/v1/generate` and `/v1/classify`), so they join the same mixed-task batches. Chat
//! requests render the model's own chat template (`softprompt::chat`), the soft prompt
//! before the rendered conversation.

mod error;
pub mod openapi;
mod request;
mod response;
mod stream;

pub use error::{reshape_errors, OpenAiError};
pub use request::{chat_job, completion_job, resolve_model, Endpoint, Job};

use crate::batcher::Work;
use crate::body::JsonBody;
use crate::http::{queue, timed_out, worker_stopped, AppState};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;

/// The model name of the bare model (no soft prompt). A task of that name takes its place.
pub const BASE_MODEL: &str = "base";

/// The OpenAI-compatible routes (merged into `http::router`).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{model}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
}

/// Whether errors on `path` take OpenAI's shape.
pub fn is_openai_path(path: &str) -> bool {
    path == "/v1/models" || path.starts_with("/v1/models/") || path == "/v1/completions" || path == "/v1/chat/completions"
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "softprompt"})
}

async fn list_models(State(s): State<Arc<AppState>>) -> Response {
    let mut data: Vec<Value> = s.registry.list().iter().map(|t| model_object(&t.name)).collect();
    if s.registry.get(BASE_MODEL).is_none() {
        data.push(model_object(BASE_MODEL));
    }
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_model(State(s): State<Arc<AppState>>, Path(model): Path<String>) -> Result<Response, OpenAiError> {
    if s.registry.get(&model).is_none() && model != BASE_MODEL {
        return Err(OpenAiError::model_not_found(&model));
    }
    Ok(Json(model_object(&model)).into_response())
}

/// Runs `f` (parsing, tokenisation, template rendering) on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, OpenAiError> + Send + 'static) -> Result<T, OpenAiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| crate::error::ApiError::internal(e.to_string()))?
}

async fn completions(State(s): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, OpenAiError> {
    let state = s.clone();
    let (job, work) = blocking(move || completion_job(&state, &body)).await?;
    answer(s, job, work).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, JsonBody(body): JsonBody) -> Result<Response, OpenAiError> {
    let state = s.clone();
    let (job, work) = blocking(move || chat_job(&state, &body)).await?;
    answer(s, job, work).await
}

/// Queues the job and answers: whole, or streamed.
async fn answer(s: Arc<AppState>, job: Job, mut work: Work) -> Result<Response, OpenAiError> {
    let events = match &mut work {
        Work::Generate(g) if job.stream => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            g.stream = Some(tx);
            Some(rx)
        }
        _ => None,
    };
    let rx = queue(&s, &job.task.name, work)?;
    if job.stream {
        return Ok(stream::respond(s, job, events, rx));
    }
    let reply = match tokio::time::timeout(s.cfg.request_timeout, rx).await {
        Err(_) => Err(timed_out(&s)),
        Ok(Err(_)) => Err(worker_stopped()),
        Ok(Ok(r)) => r,
    }?;
    let tokenizer = s.model.tokenizer().map_err(|e| crate::error::ApiError::internal(e.to_string()))?;
    let a = response::answer(&job, tokenizer, &reply);
    Ok(Json(response::full(&job, &response::Head::new(job.endpoint), &a)).into_response())
}
