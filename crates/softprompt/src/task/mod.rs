//! Tasks: reading text pairs and turning them into tokenized [`Example`]s.

use crate::batch::Example;
use crate::model::ModelInfo;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use std::path::Path;

/// One `{"input": ..., "target": ...}` record, with the line it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextPair {
    pub input: String,
    pub target: String,
    /// 1-based line number in the source file.
    pub line: usize,
}

/// Reads a JSONL file of `{"input": str, "target": str}` objects. Blank lines are skipped;
/// anything else that is not such an object is an error naming the file and line.
pub fn read_jsonl(path: &Path) -> Result<Vec<TextPair>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = std::str::from_utf8(raw).map_err(|e| Error::data(path, line, format!("invalid UTF-8: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::data(path, line, format!("invalid JSON: {e}")))?;
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(Error::data(path, line, format!("field `{name}` must be a string"))),
                None => Err(Error::data(path, line, format!("missing field `{name}`"))),
            }
        };
        out.push(TextPair {
            input: field("input")?,
            target: field("target")?,
            line,
        });
    }
    Ok(out)
}

/// Tokenizes a pair for `info`'s model: the input as model input (BOS where the model wants
/// one), the target followed by EOS (PEFT's recipe; T5 targets always end with EOS).
pub fn encode_pair(tokenizer: &Tokenizer, info: &ModelInfo, pair: &TextPair) -> Result<Example> {
    let mut source = tokenizer.encode_input(&pair.input)?;
    if info.decoder_start_token_id.is_some() {
        source.extend(info.eos_token_ids.first()); // T5 encoder inputs end with EOS
    }
    let mut target = tokenizer.encode(&pair.target)?;
    target.extend(info.eos_token_ids.first());
    Ok(Example { source, target })
}
