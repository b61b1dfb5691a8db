//! OpenAI response bodies from the native replies: `text_completion` and `chat.completion`
//! objects, their streamed chunks, log-probabilities in each endpoint's format, and usage.

use super::request::{Endpoint, Job};
use crate::batcher::Reply;
use crate::engine::{ClsOutput, GenOutput};
use crate::registry::Task;
use serde_json::{json, Value};
use softprompt::tokenizer::Tokenizer;

/// One answer, whichever job produced it.
pub struct Answer {
    pub text: String,
    /// OpenAI's `stop` (EOS or a stop string) or `length`.
    pub finish_reason: &'static str,
    /// Per answer token: its text, log-probability and alternatives (text, log-probability).
    pub tokens: Vec<TokenLogprob>,
    pub completion_tokens: usize,
}

#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// OpenAI's finish reason for the decoder's (`eos` and `stop` are both `stop`).
pub fn finish_reason(native: &str) -> &'static str {
    match native {
        "length" => "length",
        _ => "stop",
    }
}

/// The text of one token, as the streamed pieces and `logprobs` show it.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id]).unwrap_or_default()
}

/// Per-token log-probabilities of a generation; the EOS that ended it is left out, as the
/// text leaves it out.
pub fn generation_logprobs(tokenizer: &Tokenizer, o: &GenOutput, from: usize) -> Vec<TokenLogprob> {
    let mut n = o.tokens.len();
    if o.finish_reason == "eos" {
        n = n.saturating_sub(1);
    }
    (from..n)
        .map(|i| TokenLogprob {
            text: token_text(tokenizer, o.tokens[i]),
            logprob: o.logprobs.get(i).copied().unwrap_or(0.0),
            top: o
                .top_logprobs
                .get(i)
                .map(|alts| alts.iter().map(|&(t, lp)| (token_text(tokenizer, t), lp)).collect())
                .unwrap_or_default(),
        })
        .collect()
}

/// A generation's answer.
pub fn generated(tokenizer: &Tokenizer, o: &GenOutput) -> Answer {
    Answer {
        text: o.text.clone(),
        finish_reason: finish_reason(o.finish_reason),
        tokens: generation_logprobs(tokenizer, o, 0),
        completion_tokens: o.tokens.len(),
    }
}

/// A classification's answer: the winning label's verbalizer as the text; as its one
/// "token", the verbalizer with its log-likelihood, the labels' verbalizers as alternatives
/// (best first), `top` of them.
pub fn classified(task: &Task, o: &ClsOutput, top: usize) -> Answer {
    let best = softprompt::eval::classify::argmax(&o.scores);
    let text = task.verbalizer.get(best).cloned().unwrap_or_default();
    let mut order: Vec<usize> = (0..o.scores.len()).collect();
    order.sort_by(|&a, &b| o.scores[b].total_cmp(&o.scores[a]));
    let alternatives =
        order.into_iter().take(top).map(|l| (task.verbalizer.get(l).cloned().unwrap_or_default(), o.scores[l])).collect();
    Answer {
        text: text.clone(),
        finish_reason: "stop",
        tokens: vec![TokenLogprob { text, logprob: o.scores.get(best).copied().unwrap_or(0.0), top: alternatives }],
        completion_tokens: task.label_targets.get(best).map_or(0, Vec::len),
    }
}

/// The answer of a reply.
pub fn answer(job: &Job, tokenizer: &Tokenizer, reply: &Reply) -> Answer {
    match reply {
        Reply::Generate(o) => generated(tokenizer, o),
        Reply::Classify(o) => classified(&job.task, o, job.logprobs.unwrap_or(0)),
    }
}

/// `logprobs` of a completion choice (the legacy format: parallel lists).
pub fn completion_logprobs(tokens: &[TokenLogprob], text_offset: usize) -> Value {
    let mut offset = text_offset;
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        offsets.push(offset);
        offset += t.text.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top.iter().map(|(s, lp)| (s.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// `logprobs` of a chat choice: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
pub fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |text: &str, lp: f32| json!({"token": text, "logprob": lp, "bytes": text.as_bytes()});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.text, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(s, lp)| entry(s, *lp)).collect::<Vec<_>>().into();
            e
        })
        .collect();
    json!({ "content": content })
}

/// The `logprobs` value of a choice: null unless asked for.
pub fn logprobs_value(job: &Job, tokens: &[TokenLogprob], text_offset: usize) -> Value {
    match (job.logprobs, job.endpoint) {
        (None, _) => Value::Null,
        (Some(_), Endpoint::Completions) => completion_logprobs(tokens, text_offset),
        (Some(_), Endpoint::Chat) => chat_logprobs(tokens),
    }
}

pub fn usage(job: &Job, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": job.prompt_tokens + completion_tokens,
    })
}

/// Identity of one response: its id and creation time, shared by all chunks of a stream.
pub struct Head {
    pub id: String,
    pub created: u64,
}

impl Head {
    pub fn new(endpoint: Endpoint) -> Self {
        let prefix = match endpoint {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        };
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Head { id: format!("{prefix}-{:032x}", rand::random::<u128>()), created }
    }
}

/// The whole (non-streamed) response.
pub fn full(job: &Job, head: &Head, a: &Answer) -> Value {
    let logprobs = logprobs_value(job, &a.tokens, 0);
    match job.endpoint {
        Endpoint::Completions => json!({
            "id": head.id, "object": "text_completion", "created": head.created, "model": job.model,
            "choices": [{"index": 0, "text": a.text, "logprobs": logprobs, "finish_reason": a.finish_reason}],
            "usage": usage(job, a.completion_tokens),
        }),
        Endpoint::Chat => json!({
            "id": head.id, "object": "chat.completion", "created": head.created, "model": job.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text, "refusal": null},
                "logprobs": logprobs, "finish_reason": a.finish_reason}],
            "usage": usage(job, a.completion_tokens),
        }),
    }
}

/// One streamed chunk: a piece of text (`delta`), its tokens' log-probabilities, and the
/// finish reason on the last. The first chat chunk carries the role (`role_only`).
pub fn chunk(job: &Job, head: &Head, delta: &str, tokens: &[TokenLogprob], text_offset: usize, finish: Option<&str>, role_only: bool) -> Value {
    let logprobs = if tokens.is_empty() { Value::Null } else { logprobs_value(job, tokens, text_offset) };
    let mut c = match job.endpoint {
        Endpoint::Completions => json!({
            "id": head.id, "object": "text_completion", "created": head.created, "model": job.model,
            "choices": [{"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}],
        }),
        Endpoint::Chat => {
            let d = if role_only {
                json!({"role": "assistant", "content": ""})
            } else if finish.is_some() && delta.is_empty() {
                json!({})
            } else {
                json!({"content": delta})
            };
            json!({
                "id": head.id, "object": "chat.completion.chunk", "created": head.created, "model": job.model,
                "system_fingerprint": null,
                "choices": [{"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish}],
            })
        }
    };
    if job.stream_usage {
        c["usage"] = Value::Null;
    }
    c
}

/// The last chunk with `stream_options.include_usage`: no choices, the usage.
pub fn usage_chunk(job: &Job, head: &Head, completion_tokens: usize) -> Value {
    let object = match job.endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    json!({"id": head.id, "object": object, "created": head.created, "model": job.model,
        "choices": [], "usage": usage(job, completion_tokens)})
}
