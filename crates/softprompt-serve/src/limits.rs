//! What one generate/classify request may ask for, checked before any work is done.
//!
//! Every bound is cheap to check and comes before the work it bounds: the body size before
//! JSON parsing (`body`), the characters of the input before tokenisation, the input's tokens
//! before queueing, whatever the model's position limit (T5 has none; long-context models
//! have limits far beyond what the server should run per request), and the request's model
//! work ([`Cost`]) against the per-batch budget (`BatchConfig::max_tokens`).
//! Refusals name the field and the flag that sets the limit.

use crate::engine::{ClsItem, GenItem};
use crate::error::ApiError;
use axum::http::StatusCode;

/// Most stop strings in one generate request.
pub const MAX_STOP_STRINGS: usize = 16;
/// Most characters in one stop string.
pub const MAX_STOP_CHARS: usize = 256;

/// The model work of a job, or of a batch of jobs: `rows` sequences run side by side, the
/// longest `positions` long (prompt + input + generated tokens or label tokens). Rows are
/// padded to the longest, so a batch costs `rows x positions` ([`Cost::padded`]); for
/// classification it is an upper bound (the engine pads per chunk of `max_rows` rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub rows: usize,
    pub positions: usize,
}

impl Cost {
    /// Padded token positions.
    pub fn padded(&self) -> usize {
        self.rows.saturating_mul(self.positions)
    }

    /// The cost of two jobs run together.
    pub fn and(self, other: Cost) -> Cost {
        Cost { rows: self.rows.saturating_add(other.rows), positions: self.positions.max(other.positions) }
    }

    /// A generation: a row per prompt, `max_new_tokens` generated after the input.
    pub fn generate(g: &GenItem) -> Cost {
        let positions = longest_prompt(&g.prompts) + g.source.len() + g.params.max_new_tokens;
        Cost { rows: g.prompts.len(), positions }
    }

    pub fn classify(c: &ClsItem) -> Cost {
        Cost::classification(&c.prompts, c.source.len(), &c.label_targets)
    }

    /// A classification of an input of `input_len` tokens (the verbalizer counts here: see
    /// the rows).
    pub fn classification(prompts: &[candle_core::Tensor], input_len: usize, label_targets: &[Vec<u32>]) -> Cost {
        let longest_label = label_targets.iter().map(Vec::len).max().unwrap_or(0);
        let input = longest_prompt(prompts) + input_len;
        if longest_label <= 1 {
            // One-token labels: one row per prompt, every label read at its last position.
            Cost { rows: prompts.len(), positions: input }
        } else {
            // One row per (prompt, label) holding input + label.
            Cost { rows: prompts.len().saturating_mul(label_targets.len()), positions: input + longest_label }
        }
    }
}

fn longest_prompt(prompts: &[candle_core::Tensor]) -> usize {
    prompts.iter().map(|p| p.dim(0).unwrap_or(0)).max().unwrap_or(0)
}

/// Per-request input limits (the `--max-input-chars` and `--max-input-tokens` flags).
#[derive(Clone, Debug)]
pub struct InputLimits {
    /// Most characters in one input (413 above), checked before tokenisation so that the
    /// tokenizer's work is bounded too.
    pub max_input_chars: usize,
    /// Most tokens in one input after the task's template (413 above), for every model,
    /// including those without a position limit.
    pub max_input_tokens: usize,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits { max_input_chars: 32_768, max_input_tokens: 2048 }
    }
}

fn too_large(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message)
}

impl InputLimits {
    /// Largest generate/classify body: the input at 6 bytes a character (a JSON `\uXXXX`
    /// escape), plus room for the other fields and the stop strings.
    pub fn body_bytes(&self) -> usize {
        let stops = MAX_STOP_STRINGS * MAX_STOP_CHARS * 6;
        self.max_input_chars.saturating_mul(6).saturating_add(stops + (16 << 10))
    }

    /// 413 when `input` has more than `max_input_chars` characters.
    pub fn check_chars(&self, input: &str) -> Result<(), ApiError> {
        // A string has at most as many characters as bytes: most inputs need no count.
        if input.len() <= self.max_input_chars {
            return Ok(());
        }
        let n = input.chars().count();
        if n > self.max_input_chars {
            return Err(too_large(format!(
                "`input` has {n} characters, more than the server's limit of {} (--max-input-chars)",
                self.max_input_chars
            )));
        }
        Ok(())
    }

    /// 413 when the tokenized input (template applied) is longer than `max_input_tokens`.
    pub fn check_tokens(&self, n_tokens: usize) -> Result<(), ApiError> {
        if n_tokens > self.max_input_tokens {
            return Err(too_large(format!(
                "`input` is {n_tokens} tokens with the task's template, more than the server's limit of {} (--max-input-tokens)",
                self.max_input_tokens
            )));
        }
        Ok(())
    }
}

/// 400 unless there are at most [`MAX_STOP_STRINGS`] stop strings of at most
/// [`MAX_STOP_CHARS`] characters each (every generation step searches the text for each).
pub fn check_stop(stop: &[String]) -> Result<(), ApiError> {
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::bad_request(format!(
            "`stop` has {} strings, more than {MAX_STOP_STRINGS}",
            stop.len()
        )));
    }
    if let Some((i, s)) = stop.iter().enumerate().find(|(_, s)| s.chars().count() > MAX_STOP_CHARS) {
        return Err(ApiError::bad_request(format!(
            "`stop[{i}]` has {} characters, more than {MAX_STOP_CHARS}",
            s.chars().count()
        )));
    }
    Ok(())
}

/// 413 when one request alone needs more model work than a whole batch may hold
/// (`--max-batch-tokens`): such a request could never be run within the budget.
pub fn check_cost(cost: Cost, max_tokens: usize, what: &str) -> Result<(), ApiError> {
    if cost.padded() > max_tokens {
        return Err(too_large(format!(
            "this request needs {} rows x {} positions = {} token positions of model work ({what}), more than the per-batch budget of {max_tokens} (--max-batch-tokens)",
            cost.rows,
            cost.positions,
            cost.padded()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chars_are_counted_not_bytes() {
        let l = InputLimits { max_input_chars: 3, max_input_tokens: 10 };
        assert!(l.check_chars("ééé").is_ok()); // 6 bytes, 3 characters
        let e = l.check_chars("éééé").unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(e.message.contains("--max-input-chars"), "{}", e.message);
        assert!(l.check_tokens(10).is_ok());
        assert!(l.check_tokens(11).unwrap_err().message.contains("--max-input-tokens"));
    }

    #[test]
    fn stop_strings_are_bounded() {
        assert!(check_stop(&vec!["x".to_string(); MAX_STOP_STRINGS]).is_ok());
        assert!(check_stop(&vec!["x".to_string(); MAX_STOP_STRINGS + 1]).is_err());
        assert!(check_stop(&["y".repeat(MAX_STOP_CHARS)]).is_ok());
        let e = check_stop(&["a".into(), "y".repeat(MAX_STOP_CHARS + 1)]).unwrap_err();
        assert!(e.message.contains("stop[1]"), "{}", e.message);
    }

    #[test]
    fn the_body_limit_holds_the_largest_input() {
        let l = InputLimits::default();
        let input = "\u{1}".repeat(l.max_input_chars); // escaped as \u0001: 6 bytes each
        let stop = vec!["\u{1}".repeat(MAX_STOP_CHARS); MAX_STOP_STRINGS];
        let body = serde_json::json!({"task": "t".repeat(100), "input": input, "stop": stop, "max_new_tokens": 1}).to_string();
        assert!(body.len() <= l.body_bytes(), "{} > {}", body.len(), l.body_bytes());
    }
}
