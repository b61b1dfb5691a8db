//! OpenAI request bodies turned into the native jobs: the same tokenisation, limits and
//! budget checks as `POST /v1/generate` and `POST /v1/classify` (`http::encode`,
//! `http::generation_item`, `http::classification_item`).
//!
//! `model` names a task (or `base`, the bare model). A task with labels answers by rank
//! classification, as `/v1/classify` does (its ensemble averaging the prompts' scores): the
//! text is the winning label's verbalizer. Any other task generates, as `/v1/generate`
//! does (an ensemble voting at every step by the prompts' mean log-probability).

use super::error::OpenAiError;
use crate::batcher::Work;
use crate::http::{classification_item, encode, finish_source, generation_item, AppState, Stop};
use crate::limits::check_stop;
use crate::registry::Task;
use serde::Deserialize;
use softprompt::chat::{ChatTemplate, Message};
use softprompt::decode::DecodeParams;
use std::sync::Arc;

/// Most alternatives `logprobs` may ask for on `/v1/completions` (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;
/// Most alternatives `top_logprobs` may ask for on `/v1/chat/completions` (OpenAI's limit).
pub const MAX_CHAT_TOP_LOGPROBS: usize = 20;
/// Most messages in one chat request.
pub const MAX_MESSAGES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// A validated request (its native job apart: [`Work`]).
pub struct Job {
    pub endpoint: Endpoint,
    /// `model` as sent (echoed in the answer).
    pub model: String,
    pub task: Arc<Task>,
    /// Input tokens (the soft prompt's virtual tokens not counted).
    pub prompt_tokens: usize,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub stream_usage: bool,
    /// `None`: no log-probabilities; `Some(n)`: the chosen token's and `n` alternatives.
    pub logprobs: Option<usize>,
    /// The stop strings (a stream holds back text that may begin one).
    pub stop: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Other(serde::de::IgnoredAny),
}

/// The sampling fields both endpoints share.
#[derive(Deserialize)]
struct Sampling {
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    stop: Option<Stop>,
    seed: Option<u64>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    #[allow(dead_code)] // accepted and ignored, as OpenAI uses it only for abuse monitoring
    user: Option<String>,
}

/// The fields `/v1/completions` reads (others are refused by name: [`parse`]).
const COMPLETION_FIELDS: &[&str] = &["model", "prompt", "logprobs", "echo", "best_of", "suffix"];
/// The fields `/v1/chat/completions` reads.
const CHAT_FIELDS: &[&str] =
    &["model", "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice"];
/// The fields both read ([`Sampling`]).
const SAMPLING_FIELDS: &[&str] = &[
    "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "user",
];

#[derive(Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: PromptField,
    #[serde(flatten)]
    sampling: Sampling,
    logprobs: Option<usize>,
    echo: Option<bool>,
    best_of: Option<u32>,
    suffix: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    #[allow(dead_code)] // accepted: a participant's name, which templates do not show
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
    max_completion_tokens: Option<usize>,
    logprobs: Option<bool>,
    top_logprobs: Option<usize>,
    response_format: Option<serde_json::Value>,
    tools: Option<Vec<serde_json::Value>>,
    tool_choice: Option<serde_json::Value>,
}

/// Parses a body whose top-level fields must be among `fields` and [`SAMPLING_FIELDS`]
/// (checked first: `serde(flatten)` cannot deny unknown fields itself).
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], fields: &[&str]) -> Result<T, OpenAiError> {
    let invalid = |e: serde_json::Error| OpenAiError { param: None, ..OpenAiError::bad_param("body", format!("invalid JSON body: {e}")) };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(invalid)?;
    let Some(map) = value.as_object() else {
        return Err(OpenAiError { param: None, ..OpenAiError::bad_param("body", "the body must be a JSON object") });
    };
    if let Some(unknown) = map.keys().find(|k| !fields.contains(&k.as_str()) && !SAMPLING_FIELDS.contains(&k.as_str())) {
        return Err(OpenAiError { param: None, ..OpenAiError::bad_param("body", format!("unrecognized request argument: `{unknown}`")) });
    }
    serde_json::from_value(value).map_err(invalid)
}

/// The task `model` names: a served task, else `base` (the bare model: no soft prompt).
pub fn resolve_model(s: &AppState, model: &str) -> Result<Arc<Task>, OpenAiError> {
    if let Some(task) = s.registry.get(model) {
        return Ok(task);
    }
    if model == super::BASE_MODEL {
        return base_task(s);
    }
    Err(OpenAiError::model_not_found(model))
}

/// The bare model as a task: one empty prompt `[0, D]`, no template, no labels. Its rows
/// have no cached prompt keys/values, so a batch holding one runs every row in full
/// (`engine`: no reuse), with the same answers.
fn base_task(s: &AppState) -> Result<Arc<Task>, OpenAiError> {
    let info = s.model.backbone.info();
    let empty = candle_core::Tensor::zeros((0, info.d_model), candle_core::DType::F32, &s.model.device)
        .map_err(|e| crate::error::ApiError::internal(e.to_string()))?;
    Ok(Arc::new(Task {
        name: super::BASE_MODEL.to_string(),
        prompts: vec![empty],
        prompt_kv: Vec::new(),
        prompt_after_bos: false,
        chat: false,
        members: vec![".".into()],
        template: None,
        labels: Vec::new(),
        verbalizer: Vec::new(),
        label_targets: Vec::new(),
    }))
}

/// Refuses what this server does not do, naming the field.
fn check_unsupported(sm: &Sampling) -> Result<(), OpenAiError> {
    if sm.n.is_some_and(|n| n != 1) {
        return Err(OpenAiError::bad_param("n", "only n = 1 is supported (one choice per request); send several requests instead"));
    }
    if sm.presence_penalty.is_some_and(|x| x != 0.0) {
        return Err(OpenAiError::bad_param("presence_penalty", "presence_penalty is not supported (only 0)"));
    }
    if sm.frequency_penalty.is_some_and(|x| x != 0.0) {
        return Err(OpenAiError::bad_param("frequency_penalty", "frequency_penalty is not supported (only 0)"));
    }
    if sm.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(OpenAiError::bad_param("logit_bias", "logit_bias is not supported"));
    }
    Ok(())
}

/// The decoding parameters of a request; `max_tokens` defaults to `default_max`.
fn decode_params(s: &AppState, sm: &Sampling, max_tokens: Option<usize>, default_max: usize, top_logprobs: usize) -> Result<DecodeParams, OpenAiError> {
    let limit = s.cfg.max_new_tokens;
    let max_new = max_tokens.unwrap_or(default_max.min(limit));
    if max_new == 0 || max_new > limit {
        return Err(OpenAiError::bad_param("max_tokens", format!("max_tokens must be between 1 and {limit} (got {max_new})")));
    }
    // OpenAI's default temperature is 1 (sampling); 0 is greedy.
    let temperature = sm.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(OpenAiError::bad_param("temperature", format!("temperature must be between 0 and 2 (got {temperature})")));
    }
    let top_p = sm.top_p.unwrap_or(1.0);
    if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
        return Err(OpenAiError::bad_param("top_p", format!("top_p must be in (0, 1] (got {top_p})")));
    }
    let stop = Stop::strings(sm.stop.clone());
    check_stop(&stop).map_err(|e| OpenAiError { param: Some("stop"), ..e.into() })?;
    Ok(DecodeParams { max_new_tokens: max_new, temperature, stop, seed: sm.seed, top_p, top_logprobs })
}

/// The native job of `task` on the input ids: classification for a task with labels,
/// generation otherwise.
fn work(s: &AppState, task: &Task, source: Vec<u32>, params: DecodeParams) -> Result<Work, OpenAiError> {
    if task.labels.is_empty() {
        Ok(Work::Generate(generation_item(s, task, source, params)?))
    } else {
        Ok(Work::Classify(classification_item(s, task, source)?))
    }
}

/// Parses and validates a `POST /v1/completions` body.
pub fn completion_job(s: &AppState, body: &[u8]) -> Result<(Job, Work), OpenAiError> {
    let req: CompletionRequest = parse(body, COMPLETION_FIELDS)?;
    let sm = &req.sampling;
    check_unsupported(sm)?;
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(OpenAiError::bad_param("best_of", "only best_of = 1 is supported"));
    }
    if req.echo == Some(true) {
        return Err(OpenAiError::bad_param("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|x| !x.is_empty()) {
        return Err(OpenAiError::bad_param("suffix", "suffix (insertion) is not supported"));
    }
    let text = match req.prompt {
        PromptField::Text(t) => t,
        PromptField::Texts(mut v) if v.len() == 1 => v.remove(0),
        PromptField::Texts(v) => {
            return Err(OpenAiError::bad_param("prompt", format!("one prompt per request is supported (got {})", v.len())))
        }
        PromptField::Other(_) => return Err(OpenAiError::bad_param("prompt", "prompt must be a string (token-id prompts are not supported)")),
    };
    if let Some(n) = req.logprobs.filter(|&n| n > MAX_COMPLETION_LOGPROBS) {
        return Err(OpenAiError::bad_param("logprobs", format!("logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS} (got {n})")));
    }
    let params = decode_params(s, sm, sm.max_tokens, 16, req.logprobs.unwrap_or(0))?;
    let task = resolve_model(s, &req.model)?;
    let source = encode(s, &task, &text).map_err(|e| OpenAiError { param: Some("prompt"), ..e.into() })?;
    finish_job(s, Endpoint::Completions, req.model, task, source, params, sm, req.logprobs)
}

/// Parses and validates a `POST /v1/chat/completions` body: the conversation rendered with
/// the model's chat template (400 when it has none), the task's `template` applied to the
/// last user message, the soft prompt before it all.
pub fn chat_job(s: &AppState, body: &[u8]) -> Result<(Job, Work), OpenAiError> {
    let req: ChatRequest = parse(body, CHAT_FIELDS)?;
    let sm = &req.sampling;
    check_unsupported(sm)?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) || req.tool_choice.is_some() {
        return Err(OpenAiError::bad_param("tools", "tool calls are not supported"));
    }
    if let Some(kind) = req.response_format.as_ref().and_then(|f| f.get("type")).and_then(|t| t.as_str()).filter(|&t| t != "text") {
        return Err(OpenAiError::bad_param("response_format", format!("response_format `{kind}` is not supported (only text)")));
    }
    let logprobs = req.logprobs.unwrap_or(false);
    let top = req.top_logprobs.unwrap_or(0);
    if top > MAX_CHAT_TOP_LOGPROBS {
        return Err(OpenAiError::bad_param("top_logprobs", format!("top_logprobs must be between 0 and {MAX_CHAT_TOP_LOGPROBS} (got {top})")));
    }
    if top > 0 && !logprobs {
        return Err(OpenAiError::bad_param("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    let max_tokens = req.max_completion_tokens.or(sm.max_tokens);
    let params = decode_params(s, sm, max_tokens, s.cfg.max_new_tokens, top)?;
    let task = resolve_model(s, &req.model)?;
    let messages = messages(s, &task, req.messages)?;
    let tokenizer = s.model.tokenizer().map_err(|e| crate::error::ApiError::internal(e.to_string()))?;
    let template = ChatTemplate::of(tokenizer)
        .map_err(|e| OpenAiError::bad_param("messages", format!("the model's chat template cannot be used: {e}")))?
        .ok_or_else(|| {
            OpenAiError::bad_param(
                "messages",
                "the model has no chat template (GGUF tokenizer.chat_template, or chat_template in tokenizer_config.json); use /v1/completions",
            )
        })?;
    let ids = template
        .encode(tokenizer, &messages, true, task.prompt_after_bos)
        .map_err(|e| OpenAiError::bad_param("messages", e.to_string()))?;
    let source = finish_source(s, ids).map_err(|e| OpenAiError { param: Some("messages"), ..e.into() })?;
    finish_job(s, Endpoint::Chat, req.model, task, source, params, sm, logprobs.then_some(top))
}

/// The conversation as the template takes it: text contents (parts joined), `developer`
/// read as `system`, the task's template applied to the last user message; its characters
/// within `--max-input-chars`.
fn messages(s: &AppState, task: &Task, given: Vec<ChatMessage>) -> Result<Vec<Message>, OpenAiError> {
    if given.is_empty() {
        return Err(OpenAiError::bad_param("messages", "messages must not be empty"));
    }
    if given.len() > MAX_MESSAGES {
        return Err(OpenAiError::bad_param("messages", format!("at most {MAX_MESSAGES} messages (got {})", given.len())));
    }
    let mut out = Vec::with_capacity(given.len());
    for (i, m) in given.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            other => {
                return Err(OpenAiError::bad_param("messages", format!("messages[{i}]: role `{other}` is not supported (system, developer, user, assistant)")))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(OpenAiError::bad_param("messages", format!("messages[{i}]: content part `{kind}` is not supported (text only)")))
                        }
                    }
                }
                text
            }
        };
        out.push(Message::new(role, content));
    }
    if let Some(last_user) = out.iter_mut().rev().find(|m| m.role == "user") {
        last_user.content = task.format(&last_user.content);
    }
    let chars: usize = out.iter().map(|m| m.content.chars().count()).sum();
    let limit = s.cfg.input.max_input_chars;
    if chars > limit {
        return Err(OpenAiError {
            status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("the messages have {chars} characters, more than the server's limit of {limit} (--max-input-chars)"),
            param: Some("messages"),
            code: None,
        });
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn finish_job(
    s: &AppState,
    endpoint: Endpoint,
    model: String,
    task: Arc<Task>,
    source: Vec<u32>,
    params: DecodeParams,
    sm: &Sampling,
    logprobs: Option<usize>,
) -> Result<(Job, Work), OpenAiError> {
    let prompt_tokens = source.len();
    let stop = params.stop.clone();
    let work = work(s, &task, source, params)?;
    let job = Job {
        endpoint,
        model,
        task,
        prompt_tokens,
        stream: sm.stream.unwrap_or(false),
        stream_usage: sm.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        logprobs,
        stop,
    };
    Ok((job, work))
}
