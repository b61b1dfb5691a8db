//! `stream: true`: the answer as server-sent events, one chunk per piece of text as the
//! batch produces it, then the finish reason, the usage when asked for, and `data: [DONE]`.
//!
//! Tokens arrive from the worker as they are chosen (`GenItem::stream`). Their text is the
//! decoded text of all tokens so far; a piece is sent once it is final: text that could be
//! the start of a stop string, or an incomplete UTF-8 character (the tokenizer's U+FFFD), is
//! held back until the next token decides. The reply that ends the job is authoritative: the
//! last piece is the rest of its text (cut before the stop string).
//!
//! A client that disconnects drops this stream, and with it the job's reply receiver: the
//! worker sees the job cancelled at its next step and frees its row. The request timeout
//! bounds the whole stream (an error event after it).

use super::error::OpenAiError;
use super::request::{Endpoint, Job};
use super::response::{self, Head, TokenLogprob};
use crate::batcher::{Reply, ReplyResult};
use crate::engine::TokenEvent;
use crate::http::{timed_out, worker_stopped, AppState};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

struct Streaming {
    s: Arc<AppState>,
    job: Job,
    head: Head,
    events: Option<mpsc::UnboundedReceiver<TokenEvent>>,
    reply: oneshot::Receiver<ReplyResult>,
    deadline: tokio::time::Instant,
    /// Tokens received so far.
    tokens: Vec<u32>,
    /// Text sent so far.
    sent: String,
    /// Log-probabilities of the tokens received since the last piece was sent.
    unsent_logprobs: Vec<TokenLogprob>,
    /// Tokens whose log-probabilities were sent.
    logprobs_sent: usize,
    ready: VecDeque<Event>,
    started: bool,
    done: bool,
}

/// The streamed response of `job`, whose tokens arrive on `events` (none for a
/// classification) and whose answer arrives on `reply`.
pub fn respond(
    s: Arc<AppState>,
    job: Job,
    events: Option<mpsc::UnboundedReceiver<TokenEvent>>,
    reply: oneshot::Receiver<ReplyResult>,
) -> Response {
    let deadline = tokio::time::Instant::now() + s.cfg.request_timeout;
    let head = Head::new(job.endpoint);
    let state = Streaming {
        s,
        job,
        head,
        events,
        reply,
        deadline,
        tokens: Vec::new(),
        sent: String::new(),
        unsent_logprobs: Vec::new(),
        logprobs_sent: 0,
        ready: VecDeque::new(),
        started: false,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.ready.pop_front() {
                return Some((Ok::<Event, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            st.advance().await;
        }
    });
    Sse::new(stream).into_response()
}

/// The next token event; never, once the channel is gone (the reply then ends the stream).
async fn next_event(events: &mut Option<mpsc::UnboundedReceiver<TokenEvent>>) -> Option<TokenEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Bytes at the end of `text` that may not be final yet: an incomplete character (U+FFFD
/// at the end) or the longest end of `text` that begins one of the stop strings.
fn held_back(text: &str, stop: &[String]) -> usize {
    let complete = text.trim_end_matches('\u{FFFD}');
    let mut hold = text.len() - complete.len();
    let longest_start = stop
        .iter()
        .flat_map(|s| s.char_indices().skip(1).map(move |(k, _)| &s[..k]))
        .filter(|start| complete.ends_with(start))
        .map(str::len)
        .max()
        .unwrap_or(0);
    hold += longest_start;
    hold
}

impl Streaming {
    fn push(&mut self, value: serde_json::Value) {
        self.ready.push_back(Event::default().data(value.to_string()));
    }

    async fn advance(&mut self) {
        if !self.started {
            self.started = true;
            if self.job.endpoint == Endpoint::Chat {
                let first = response::chunk(&self.job, &self.head, "", &[], 0, None, true);
                self.push(first);
            }
            return;
        }
        tokio::select! {
            // Tokens first: they were sent before the reply.
            biased;
            ev = next_event(&mut self.events) => match ev {
                Some(ev) => self.on_token(ev),
                None => self.events = None,
            },
            r = &mut self.reply => match r {
                Err(_) => self.fail(worker_stopped().into()),
                Ok(Err(e)) => self.fail(e.into()),
                Ok(Ok(reply)) => self.finish(&reply),
            },
            _ = tokio::time::sleep_until(self.deadline) => self.fail(timed_out(&self.s).into()),
        }
    }

    fn on_token(&mut self, ev: TokenEvent) {
        let Ok(tokenizer) = self.s.model.tokenizer() else {
            return;
        };
        self.tokens.push(ev.token);
        if self.job.logprobs.is_some() {
            let top = ev.top_logprobs.iter().map(|&(t, lp)| (response::token_text(tokenizer, t), lp)).collect();
            let text = response::token_text(tokenizer, ev.token);
            self.unsent_logprobs.push(TokenLogprob { text, logprob: ev.logprob.unwrap_or(0.0), top });
        }
        let Ok(text) = tokenizer.decode(&self.tokens) else {
            return;
        };
        // A stop string ends the sequence at this very token: the text stops before it.
        let text = match self.job.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min() {
            Some(cut) => &text[..cut],
            None => &text[..],
        };
        let safe = &text[..text.len() - held_back(text, &self.job.stop)];
        if safe.len() > self.sent.len() && safe.starts_with(self.sent.as_str()) {
            let delta = safe[self.sent.len()..].to_string();
            let logprobs = std::mem::take(&mut self.unsent_logprobs);
            let chunk = response::chunk(&self.job, &self.head, &delta, &logprobs, self.sent.len(), None, false);
            self.logprobs_sent += logprobs.len();
            self.sent.push_str(&delta);
            self.push(chunk);
        }
    }

    fn finish(&mut self, reply: &Reply) {
        let Ok(tokenizer) = self.s.model.tokenizer() else {
            return self.fail(crate::error::ApiError::internal("the model has no tokenizer").into());
        };
        let answer = response::answer(&self.job, tokenizer, reply);
        // What was sent is a beginning of the answer (only final text is sent).
        let rest = answer.text.strip_prefix(self.sent.as_str()).unwrap_or("").to_string();
        let logprobs = match reply {
            Reply::Generate(o) if self.job.logprobs.is_some() => response::generation_logprobs(tokenizer, o, self.logprobs_sent),
            Reply::Classify(_) => answer.tokens.clone(),
            Reply::Generate(_) => Vec::new(),
        };
        if !rest.is_empty() || !logprobs.is_empty() {
            let chunk = response::chunk(&self.job, &self.head, &rest, &logprobs, self.sent.len(), None, false);
            self.push(chunk);
        }
        let last = response::chunk(&self.job, &self.head, "", &[], 0, Some(answer.finish_reason), false);
        self.push(last);
        if self.job.stream_usage {
            let usage = response::usage_chunk(&self.job, &self.head, answer.completion_tokens);
            self.push(usage);
        }
        self.ready.push_back(Event::default().data("[DONE]"));
        self.done = true;
    }

    /// An error event (the official clients raise it), then the end.
    fn fail(&mut self, e: OpenAiError) {
        let body = e.body();
        self.push(body);
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn text_that_may_begin_a_stop_string_is_held_back() {
        let stop = vec!["\n\nUser:".to_string(), "END".to_string()];
        assert_eq!(held_back("hello", &stop), 0);
        assert_eq!(held_back("hello\n", &stop), 1);
        assert_eq!(held_back("hello\n\nUs", &stop), 4);
        assert_eq!(held_back("hello EN", &stop), 2);
        // A stop string itself is not held back here: the decoder ends the sequence on it.
        assert_eq!(held_back("hello END", &stop), 0);
        // An incomplete character, and a stop start before it.
        assert_eq!(held_back("ab\u{FFFD}", &[]), 3);
        assert_eq!(held_back("aE\u{FFFD}", &stop), 4);
        assert_eq!(held_back("", &stop), 0);
    }
}
