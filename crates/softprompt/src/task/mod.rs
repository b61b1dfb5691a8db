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
    encode_pair_with(tokenizer, info, pair, true)
}

/// Like [`encode_pair`]; `target_eos = false` scores the target text alone (decoder-only).
pub fn encode_pair_with(tokenizer: &Tokenizer, info: &ModelInfo, pair: &TextPair, target_eos: bool) -> Result<Example> {
    let mut source = tokenizer.encode_input(&pair.input)?;
    info.end_source(&mut source);
    let seq2seq = info.is_encoder_decoder();
    let mut target = tokenizer.encode(&pair.target)?;
    if target_eos || seq2seq {
        target.extend(info.eos_token_ids.first());
    }
    if target.is_empty() {
        return Err(Error::invalid(format!("line {}: the target tokenizes to nothing", pair.line)));
    }
    Ok(Example { source, target })
}

pub mod bigbench;
pub mod formats;
mod meta;
pub mod movie;
pub mod named;

pub use meta::{
    data_source, describe_init, model_sha256, EncoderMeta, ExampleLayout, FieldError, TaskMeta, MAX_LABELS,
    MAX_TEXT_BYTES, TASK_FILE,
};

/// Tokenized target of each label of `task` (named in errors): `verbalizer[i]`'s tokens;
/// encoder-decoder targets end with EOS, decoder-only classification targets do not (the
/// label is the answer).
pub fn label_targets(
    task: &str,
    labels: &[String],
    verbalizer: &[String],
    tokenizer: &Tokenizer,
    info: &ModelInfo,
) -> Result<Vec<Vec<u32>>> {
    if labels.len() != verbalizer.len() {
        crate::bail!("task {task}: {} labels but {} verbalizer entries", labels.len(), verbalizer.len());
    }
    let mut out = Vec::with_capacity(verbalizer.len());
    for (label, text) in labels.iter().zip(verbalizer) {
        let mut ids = tokenizer.encode(text)?;
        if ids.is_empty() {
            crate::bail!("task {task}: label `{label}` (verbalizer `{text}`) tokenizes to nothing");
        }
        if info.is_encoder_decoder() {
            ids.extend(info.eos_token_ids.first());
        }
        out.push(ids);
    }
    Ok(out)
}

/// A text with a class label (index into the task's labels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabeledText {
    pub text: String,
    pub label: usize,
    /// 1-based line in the source file.
    pub line: usize,
}

/// A classification task: a template with `{text}`, label names, the verbalizer (the target
/// text of each label) and its splits.
#[derive(Clone, Debug)]
pub struct ClassificationTask {
    pub name: String,
    pub template: String,
    pub labels: Vec<String>,
    pub verbalizer: Vec<String>,
    pub train: Vec<LabeledText>,
    pub dev: Vec<LabeledText>,
    pub test: Vec<LabeledText>,
}

impl ClassificationTask {
    /// What `task.json` records of the task (`softprompt eval` and the server find the
    /// template, labels and verbalizer there).
    pub fn meta(&self) -> TaskMeta {
        TaskMeta {
            name: Some(self.name.clone()),
            template: Some(self.template.clone()),
            labels: self.labels.clone(),
            verbalizer: self.verbalizer.clone(),
            ..TaskMeta::default()
        }
    }

    /// The model input for `text`.
    pub fn format(&self, text: &str) -> String {
        self.template.replace("{text}", text)
    }

    /// Tokenized target of each label: the verbalizer's tokens; encoder-decoder targets end
    /// with EOS, decoder-only classification targets do not (the label is the answer).
    pub fn label_targets(&self, tokenizer: &Tokenizer, info: &ModelInfo) -> Result<Vec<Vec<u32>>> {
        label_targets(&self.name, &self.labels, &self.verbalizer, tokenizer, info)
    }

    /// Tokenized model inputs of a split (template applied; encoder inputs end with EOS).
    pub fn sources(&self, tokenizer: &Tokenizer, info: &ModelInfo, rows: &[LabeledText]) -> Result<Vec<Vec<u32>>> {
        rows.iter()
            .map(|r| {
                let mut ids = tokenizer.encode_input(&self.format(&r.text))?;
                info.end_source(&mut ids);
                Ok(ids)
            })
            .collect()
    }

    /// Training examples of a split: (source, target of the gold label).
    pub fn examples(&self, tokenizer: &Tokenizer, info: &ModelInfo, rows: &[LabeledText]) -> Result<Vec<Example>> {
        let targets = self.label_targets(tokenizer, info)?;
        let sources = self.sources(tokenizer, info, rows)?;
        Ok(sources
            .into_iter()
            .zip(rows)
            .map(|(source, r)| Example {
                source,
                target: targets[r.label].clone(),
            })
            .collect())
    }

    /// Text pairs (formatted input, verbalized label) of a split.
    pub fn pairs(&self, rows: &[LabeledText]) -> Vec<TextPair> {
        rows.iter()
            .map(|r| TextPair {
                input: self.format(&r.text),
                target: self.verbalizer[r.label].clone(),
                line: r.line,
            })
            .collect()
    }
}

/// Deterministic shuffle of `rows` with `seed`, then `train_frac` / `dev_frac` / rest.
pub fn split<T>(mut rows: Vec<T>, seed: u64, train_frac: f64, dev_frac: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    rows.shuffle(&mut rng);
    let n = rows.len();
    let n_train = (n as f64 * train_frac).round() as usize;
    let n_dev = (n as f64 * dev_frac).round() as usize;
    let test = rows.split_off((n_train + n_dev).min(n));
    let dev = rows.split_off(n_train.min(rows.len()));
    (rows, dev, test)
}
