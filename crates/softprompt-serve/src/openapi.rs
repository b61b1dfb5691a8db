//! A hand-written OpenAPI 3 document of the HTTP API.

use crate::limits::{MAX_STOP_CHARS, MAX_STOP_STRINGS};
use crate::ServeConfig;
use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn json_body(schema: &str) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn ok(schema: &str, description: &str) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

/// The document, with the configured limits filled in (the OpenAI-compatible endpoints'
/// part from `crate::openai::openapi`).
pub fn document(cfg: &ServeConfig) -> Value {
    let mut doc = native_document(cfg);
    for (section, extra) in [("paths", crate::openai::openapi::paths(cfg)), ("schemas", crate::openai::openapi::schemas(cfg))] {
        let target = if section == "paths" { doc.get_mut("paths") } else { doc.pointer_mut("/components/schemas") };
        if let (Some(t), Some(e)) = (target.and_then(Value::as_object_mut), extra.as_object()) {
            t.extend(e.clone());
        }
    }
    doc
}

fn native_document(cfg: &ServeConfig) -> Value {
    let common = |extra: Value| {
        let mut m = json!({
            "400": error_response("malformed JSON, unknown field, or invalid value"),
            "401": error_response("missing or wrong bearer token (when the server has one)"),
            "403": error_response("Host header not allowed (--allowed-host), or PUT/DELETE while writes are off (--token or --allow-writes)"),
            "404": error_response("unknown task"),
            "408": error_response(&format!("body not received within {} ms", cfg.connections.body_timeout.as_millis())),
            "413": error_response(&format!(
                "body larger than {} bytes (uploads) or {} bytes (generate/classify); input over {} characters or {} tokens; or the request's model work over {} token positions",
                cfg.max_body_bytes,
                cfg.input.body_bytes(),
                cfg.input.max_input_chars,
                cfg.input.max_input_tokens,
                cfg.batch.max_tokens
            )),
            "415": error_response("body not sent as Content-Type: application/json"),
            "429": error_response(&format!("queue full ({} waiting requests)", cfg.batch.queue)),
            "503": error_response(&format!("shutting down, or {} connections open", cfg.connections.max_connections)),
            "504": error_response(&format!("no answer within {} ms", cfg.request_timeout.as_millis())),
        });
        if let (Some(m), Some(e)) = (m.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    };
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "softprompt serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Many soft prompts (PEFT prompt-tuning adapters) on one frozen model. Requests for different tasks share forward passes (dynamic batching, one prompt per row). Errors are {\"error\": \"...\"}."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "GenerateRequest": {"type": "object", "required": ["task", "input"], "additionalProperties": false, "properties": {
                    "task": {"type": "string"},
                    "input": {"type": "string", "maxLength": cfg.input.max_input_chars, "description": format!("text; the task's template (if any) is applied; at most {} tokens with it", cfg.input.max_input_tokens)},
                    "max_new_tokens": {"type": "integer", "minimum": 1, "maximum": cfg.max_new_tokens, "default": 16},
                    "temperature": {"type": "number", "minimum": 0, "default": 0, "description": "0: greedy"},
                    "stop": {"oneOf": [{"type": "string", "maxLength": MAX_STOP_CHARS}, {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": {"type": "string", "maxLength": MAX_STOP_CHARS}}]},
                    "seed": {"type": "integer", "description": "sampling seed"}}},
                "GenerateResponse": {"type": "object", "properties": {
                    "task": {"type": "string"}, "text": {"type": "string"},
                    "tokens": {"type": "array", "items": {"type": "integer"}},
                    "logprobs": {"type": "array", "items": {"type": "number"}, "description": "log-probability of each chosen token (ensembles: mean over prompts)"},
                    "finish_reason": {"type": "string", "enum": ["eos", "stop", "length", "cancelled"]},
                    "n_prompts": {"type": "integer"}}},
                "ClassifyRequest": {"type": "object", "required": ["task", "input"], "additionalProperties": false, "properties": {
                    "task": {"type": "string"}, "input": {"type": "string", "maxLength": cfg.input.max_input_chars}}},
                "ClassifyResponse": {"type": "object", "properties": {
                    "task": {"type": "string"}, "label": {"type": "string"},
                    "scores": {"type": "object", "additionalProperties": {"type": "number"}, "description": "label -> log-likelihood of its verbalizer (mean over the ensemble's prompts)"},
                    "votes": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "label -> number of prompts whose best label it is"},
                    "n_prompts": {"type": "integer"},
                    "per_prompt": {"type": "array", "items": {"type": "object", "properties": {"member": {"type": "string"}, "scores": {"type": "array", "items": {"type": "number"}}}}}}},
                "Task": {"type": "object", "properties": {
                    "name": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
                    "n_prompts": {"type": "integer"}, "prompt_tokens": {"type": "array", "items": {"type": "integer"}},
                    "prompt_after_bos": {"type": "boolean", "description": "the prompts were trained after BOS: the model sees [BOS; prompt; input]"},
                    "template": {"type": "string", "nullable": true}}},
                "TaskError": {"type": "object", "required": ["name", "error"], "properties": {
                    "name": {"type": "string", "description": "the folder's name under the prompts folder"},
                    "error": {"type": "string", "description": "why it is not served (the error logged at start-up)"}}},
                "Prompt": {"oneOf": [
                    {"type": "array", "items": {"type": "array", "items": {"type": "number"}}, "description": "N rows of D floats (D = the model's hidden size)"},
                    {"type": "string", "format": "byte", "description": "base64 of an adapter_model.safetensors holding `prompt_embeddings` [N, D]"}]},
                "Upload": {"type": "object", "additionalProperties": false, "properties": {
                    "prompt": {"$ref": "#/components/schemas/Prompt"},
                    "prompts": {"type": "array", "items": {"$ref": "#/components/schemas/Prompt"}, "description": "an ensemble instead of `prompt` (stored as members p0, p1, ...)"},
                    "adapter_config": {"type": "object", "description": "PEFT adapter_config.json (peft_type PROMPT_TUNING); default: one for the served model. num_virtual_tokens is taken from the prompt."},
                    "task": {"type": "object", "description": "task.json (softprompt::task::TaskMeta): template (must contain {text}), labels (at most 10,000), verbalizer (one per label); other fields are kept", "properties": {
                        "template": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}}, "verbalizer": {"type": "array", "items": {"type": "string"}},
                        "prompt_after_bos": {"type": "boolean", "description": "decoder-only models: [BOS; prompt; input] (softprompt train --prompt-after-bos)"}}}}}
            }
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/generate": {"post": {"summary": "Generate text with a task's prompt(s)", "requestBody": json_body("GenerateRequest"),
                "responses": common(json!({"200": ok("GenerateResponse", "generated text")}))}},
            "/v1/classify": {"post": {"summary": "Rank classification over the task's labels", "requestBody": json_body("ClassifyRequest"),
                "responses": common(json!({"200": ok("ClassifyResponse", "best label and scores")}))}},
            "/v1/tasks": {"get": {"summary": "List served tasks, or with `?errors` the task folders that could not be served",
                "parameters": [{"name": "errors", "in": "query", "required": false, "allowEmptyValue": true,
                    "schema": {"type": "boolean"},
                    "description": "`GET /v1/tasks?errors` (no value): instead of the tasks, the folders skipped at start-up (unreadable, invalid or over a limit), with why; an upload or deletion of the name removes its entry"}],
                "responses": {"200": {"description": "the served tasks; with `?errors`, the folders that could not be served",
                    "content": {"application/json": {"schema": {"oneOf": [
                        {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                        {"type": "array", "items": {"$ref": "#/components/schemas/TaskError"}}]}}}}}}},
            "/v1/tasks/{name}": {
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"}}],
                "get": {"summary": "One task", "responses": common(json!({"200": ok("Task", "the task")}))},
                "put": {"summary": "Upload (or replace) a task's adapter(s); validated against the model and written atomically into the prompts folder",
                    "requestBody": json_body("Upload"),
                    "responses": common(json!({"200": ok("Task", "replaced"), "201": ok("Task", "created")}))},
                "delete": {"summary": "Stop serving a task and delete its folder", "responses": common(json!({"200": {"description": "deleted"}}))}},
            "/health": {"get": {"summary": "Liveness (never needs the token; without it only {\"status\": \"ok\"} when the server has one)", "security": [], "responses": {"200": {"description": "ok"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition format", "content": {"text/plain": {}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3 document"}}}}
        }
    })
}
