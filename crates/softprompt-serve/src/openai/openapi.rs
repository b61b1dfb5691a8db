//! The OpenAI-compatible endpoints' part of `/openapi.json` (merged by `crate::openapi`).

use super::request::{MAX_CHAT_TOP_LOGPROBS, MAX_COMPLETION_LOGPROBS, MAX_MESSAGES};
use crate::limits::{MAX_STOP_CHARS, MAX_STOP_STRINGS};
use crate::ServeConfig;
use serde_json::{json, Value};

fn body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn errors(cfg: &ServeConfig) -> Value {
    let e = |d: String| json!({"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}}});
    json!({
        "400": e("malformed JSON, unrecognized argument, unsupported option (n > 1, penalties, logit_bias, echo, tools), invalid value, or (chat) a model without a chat template".into()),
        "401": e("missing or wrong bearer token (when the server has one)".into()),
        "404": e("unknown model (code model_not_found)".into()),
        "413": e(format!("input over {} characters or {} tokens, or model work over {} token positions", cfg.input.max_input_chars, cfg.input.max_input_tokens, cfg.batch.max_tokens)),
        "415": e("body not sent as Content-Type: application/json".into()),
        "429": e(format!("queue full ({} waiting requests) or over half the timeout's worth of work queued", cfg.batch.queue)),
        "503": e("shutting down".into()),
        "504": e(format!("no answer within {} ms", cfg.request_timeout.as_millis())),
    })
}

/// Schemas, keyed by name.
pub fn schemas(cfg: &ServeConfig) -> Value {
    let stop = json!({"oneOf": [{"type": "string", "maxLength": MAX_STOP_CHARS},
        {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "maxLength": MAX_STOP_CHARS}}], "nullable": true});
    let sampling = json!({
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_new_tokens, "nullable": true},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1, "description": "0: greedy (OpenAI's default is 1: sampling)"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "n": {"type": "integer", "enum": [1], "default": 1},
        "stream": {"type": "boolean", "default": false, "description": "server-sent events, ending with data: [DONE]"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
        "stop": stop,
        "seed": {"type": "integer", "description": "sampling seed"},
        "presence_penalty": {"type": "number", "enum": [0]},
        "frequency_penalty": {"type": "number", "enum": [0]},
        "logit_bias": {"type": "object", "maxProperties": 0},
        "user": {"type": "string", "description": "accepted, ignored"},
    });
    let with = |extra: Value, required: &[&str]| {
        let mut props = sampling.clone();
        if let (Some(p), Some(e)) = (props.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        json!({"type": "object", "required": required, "additionalProperties": false, "properties": props})
    };
    let model = json!({"type": "string", "description": "a task name (its soft prompt; labelled tasks answer by rank classification: the best label's verbalizer), or `base` (no soft prompt)"});
    let usage = json!({"type": "object", "properties": {"prompt_tokens": {"type": "integer", "description": "input tokens (the soft prompt not counted)"},
        "completion_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}});
    json!({
        "OpenAIError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": "string", "nullable": true}, "code": {"type": "string", "nullable": true}}}}},
        "Model": {"type": "object", "properties": {"id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
            "created": {"type": "integer"}, "owned_by": {"type": "string"}}},
        "CompletionRequest": with(json!({
            "model": model,
            "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}],
                "description": format!("text; the task's template (if any) is applied; at most {} characters", cfg.input.max_input_chars)},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_COMPLETION_LOGPROBS, "nullable": true},
            "echo": {"type": "boolean", "enum": [false]}, "best_of": {"type": "integer", "enum": [1]}, "suffix": {"type": "string", "nullable": true},
        }), &["model", "prompt"]),
        "ChatCompletionRequest": with(json!({
            "model": model,
            "messages": {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "description": "rendered with the model's chat template; the task's template is applied to the last user message; the soft prompt goes before the conversation",
                "items": {"type": "object", "required": ["role"], "properties": {
                    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]},
                    "name": {"type": "string"}}}},
            "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_new_tokens},
            "logprobs": {"type": "boolean", "default": false},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_CHAT_TOP_LOGPROBS},
            "response_format": {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]}}},
            "tools": {"type": "array", "maxItems": 0}, "tool_choice": {"description": "not supported"},
        }), &["model", "messages"]),
        "Completion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["text_completion"]}, "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                "logprobs": {"type": "object", "nullable": true, "description": "tokens, token_logprobs, top_logprobs, text_offset"},
                "finish_reason": {"type": "string", "enum": ["stop", "length"]}}}},
            "usage": usage.clone()}},
        "ChatCompletion": {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": ["chat.completion"]}, "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"},
                "message": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}},
                "logprobs": {"type": "object", "nullable": true, "description": "content: [{token, logprob, bytes, top_logprobs}]"},
                "finish_reason": {"type": "string", "enum": ["stop", "length"]}}}},
            "usage": usage}},
    })
}

/// Paths, keyed by path.
pub fn paths(cfg: &ServeConfig) -> Value {
    let stream_or = |schema: &str, what: &str| {
        json!({"200": {"description": format!("{what}; with stream: true, text/event-stream chunks (`data: {{...}}`) ending with `data: [DONE]`"),
            "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}, "text/event-stream": {}}}})
    };
    let merged = |ok: Value| {
        let mut m = errors(cfg);
        if let (Some(m), Some(o)) = (m.as_object_mut(), ok.as_object()) {
            m.extend(o.clone());
        }
        m
    };
    json!({
        "/v1/models": {"get": {"summary": "OpenAI-compatible: every task, and `base` (the bare model)", "responses": {"200": {"description": "{object: list, data: [Model]}",
            "content": {"application/json": {"schema": {"type": "object", "properties": {"object": {"type": "string"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}}}}}}},
        "/v1/models/{model}": {"parameters": [{"name": "model", "in": "path", "required": true, "schema": {"type": "string"}}],
            "get": {"summary": "OpenAI-compatible: one model", "responses": merged(json!({"200": {"description": "the model", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}}}))}},
        "/v1/completions": {"post": {"summary": "OpenAI-compatible completion with a task's soft prompt (joins the same mixed-task batches as /v1/generate and /v1/classify)",
            "requestBody": body("CompletionRequest"), "responses": merged(stream_or("Completion", "the completion"))}},
        "/v1/chat/completions": {"post": {"summary": "OpenAI-compatible chat completion: the model's chat template, the task's soft prompt before the conversation",
            "requestBody": body("ChatCompletionRequest"), "responses": merged(stream_or("ChatCompletion", "the chat completion"))}},
    })
}
