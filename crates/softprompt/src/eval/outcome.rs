//! Running an [`EvalPlan`] with zero, one or several prompts, and its results as JSON: the
//! summary and one prediction line per example.

use super::ensemble::{evaluate_ensemble, mean_scores, EnsembleReport};
use super::plan::{EvalData, EvalPlan};
use super::report::{
    classify, generate_text, multiple_choice, ClassificationEval, Decoding, Mode, MultipleChoiceEval, TextEval,
};
use crate::load::Model;
use crate::task::{ClassificationTask, LabeledText, TextPair};
use crate::{Error, Result};
use candle_core::Tensor;
use serde_json::{json, Map, Value};

/// Generation settings of an evaluation (with the `clap` feature, `softprompt eval`'s
/// generation flags).
#[derive(Clone, Debug)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
pub struct DecodeSpec {
    /// Beams for generation (1: greedy).
    #[cfg_attr(feature = "clap", arg(long, default_value_t = 1))]
    pub beams: usize,
    /// [default: the longest label's tokens for classification, else 32]
    #[cfg_attr(feature = "clap", arg(long))]
    pub max_new_tokens: Option<usize>,
    /// Rank beams by log-probability / length^alpha.
    #[cfg_attr(feature = "clap", arg(long))]
    pub length_penalty: Option<f64>,
}

impl DecodeSpec {
    /// Rejects settings that would generate nothing.
    pub fn check(&self) -> Result<()> {
        if self.beams == 0 {
            return Err(Error::invalid("--beams must be at least 1"));
        }
        if self.max_new_tokens == Some(0) {
            return Err(Error::invalid("--max-new-tokens must be at least 1"));
        }
        Ok(())
    }
}

/// The result of an evaluation.
pub enum Outcome {
    /// Several prompts on a classification task (rank mode).
    Ensemble {
        task: ClassificationTask,
        rows: Vec<LabeledText>,
        report: EnsembleReport,
    },
    Class {
        task: ClassificationTask,
        report: ClassificationEval,
        mode: Mode,
    },
    Text(TextEval),
    Choice(MultipleChoiceEval),
}

/// Evaluates `plan` in `mode` (from [`EvalPlan::mode`]) with `prompts` (none: prompt
/// design; several: an ensemble, scored on a classification task in rank mode).
pub fn evaluate_plan(
    model: &Model,
    prompts: &[Tensor],
    plan: EvalPlan,
    mode: Mode,
    decode: &DecodeSpec,
    batch_size: usize,
) -> Result<Outcome> {
    let mut decoding = Decoding {
        beams: decode.beams,
        max_new_tokens: decode.max_new_tokens.unwrap_or(32),
        length_penalty: decode.length_penalty,
    };
    let prompt = prompts.first();
    // EvalPlan::mode refused the other ensembles.
    Ok(match plan.data {
        EvalData::Class(task, rows) if prompts.len() > 1 => {
            let (tokenizer, info) = (model.tokenizer()?, model.backbone.info());
            let stacked = Tensor::stack(prompts, 0)?; // [E, N, D]
            let sources = task.sources(tokenizer, info, &rows)?;
            let labels = task.label_targets(tokenizer, info)?;
            let gold: Vec<usize> = rows.iter().map(|r| r.label).collect();
            let report =
                evaluate_ensemble(&model.backbone, &stacked, &sources, &labels, &gold, batch_size, &model.device)?;
            Outcome::Ensemble { task, rows, report }
        }
        EvalData::Class(task, rows) => {
            if decode.max_new_tokens.is_none() {
                let labels = task.label_targets(model.tokenizer()?, model.backbone.info())?;
                decoding.max_new_tokens = labels.iter().map(Vec::len).max().unwrap_or(1);
            }
            let report = classify(model, prompt, &task, &rows, mode, &decoding, batch_size)?;
            Outcome::Class { task, report, mode }
        }
        EvalData::Text(pairs) => Outcome::Text(generate_text(model, prompt, &pairs, &decoding, batch_size)?),
        EvalData::Choice(rows) if mode == Mode::Generate => {
            let pairs: Vec<TextPair> = rows
                .iter()
                .map(|r| TextPair { input: r.input.clone(), target: r.choices[r.gold].clone(), line: r.line })
                .collect();
            Outcome::Text(generate_text(model, prompt, &pairs, &decoding, batch_size)?)
        }
        EvalData::Choice(rows) => Outcome::Choice(multiple_choice(model, prompt, &rows, batch_size)?),
    })
}

fn to_map(v: impl serde::Serialize) -> Result<Map<String, Value>> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(other) => Err(Error::invalid(format!("expected a JSON object, got {other}"))),
        Err(e) => Err(Error::invalid(e.to_string())),
    }
}

impl Outcome {
    /// The metrics as JSON fields (task, labels, counts, scores), to merge into a summary.
    pub fn summary(&self) -> Result<Map<String, Value>> {
        let mut obj = Map::new();
        match self {
            Outcome::Ensemble { task, report, .. } => {
                obj.insert("task".into(), task.name.clone().into());
                obj.insert("labels".into(), json!(task.labels));
                let mut ens = to_map(report)?;
                for per_example in ["scores", "majority_predictions", "mean_predictions"] {
                    ens.remove(per_example);
                }
                obj.insert("ensemble".into(), Value::Object(ens));
                obj.insert("examples".into(), report.examples.into());
            }
            Outcome::Class { task, report, .. } => {
                obj.insert("task".into(), task.name.clone().into());
                obj.insert("labels".into(), json!(task.labels));
                obj.extend(to_map(report)?);
            }
            Outcome::Text(report) => obj.extend(to_map(report)?),
            Outcome::Choice(report) => obj.extend(to_map(report)?),
        }
        Ok(obj)
    }

    /// One JSON object per example: input, gold, prediction and per-label scores.
    pub fn prediction_lines(&self) -> Result<Vec<Value>> {
        Ok(match self {
            Outcome::Ensemble { task, rows, report } => rows
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let labels = &task.labels;
                    json!({
                        "line": r.line,
                        "input": task.format(&r.text),
                        "gold": labels[r.label],
                        "prediction": labels[report.mean_predictions[i]],
                        "majority_vote": labels[report.majority_predictions[i]],
                        "scores": scores_map(labels, &mean_scores(&report.scores[i])),
                        "per_prompt_scores": report.scores[i].iter().map(|s| scores_map(labels, s)).collect::<Vec<_>>(),
                    })
                })
                .collect(),
            Outcome::Class { task, report, .. } => report
                .predictions
                .iter()
                .map(|p| {
                    json!({
                        "line": p.line,
                        "input": p.input,
                        "gold": task.labels[p.gold],
                        "prediction": p.prediction.map(|i| task.labels[i].clone()),
                        "scores": p.scores.as_ref().map(|s| scores_map(&task.labels, s)),
                        "generated": p.generated,
                    })
                })
                .collect(),
            Outcome::Text(report) => report
                .predictions
                .iter()
                .map(|p| serde_json::to_value(p).map_err(|e| Error::invalid(e.to_string())))
                .collect::<Result<_>>()?,
            Outcome::Choice(report) => report
                .predictions
                .iter()
                .map(|(ex, p, scores)| {
                    json!({
                        "line": ex.line,
                        "input": ex.input,
                        "gold": ex.choices[ex.gold],
                        "prediction": ex.choices[*p],
                        "scores": scores_map(&ex.choices, scores),
                    })
                })
                .collect(),
        })
    }

    /// The human-readable summary: metrics per line, then the confusion matrix of a
    /// classification. `what` names the data, `prompts` the ensemble's members.
    pub fn text(&self, what: &str, prompts: &[String]) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = match self {
            Outcome::Ensemble { task, report, .. } => {
                let _ = writeln!(s, "{what}: {} examples, ensemble of {} prompts", report.examples, prompts.len());
                for (i, (m, name)) in report.per_prompt.iter().zip(prompts).enumerate() {
                    let _ = writeln!(s, "  prompt {i} ({name}): accuracy {:.4}  macro-F1 {:.4}", m.accuracy, m.macro_f1);
                }
                let (vote, mean) = (&report.majority_vote, &report.mean_log_prob);
                let _ = writeln!(s, "  majority vote:      accuracy {:.4}  macro-F1 {:.4}", vote.accuracy, vote.macro_f1);
                let _ = writeln!(s, "  mean log-prob:      accuracy {:.4}  macro-F1 {:.4}", mean.accuracy, mean.macro_f1);
                write_confusion(&mut s, &task.labels, &mean.confusion)
            }
            Outcome::Class { task, report, mode } => {
                let unmatched = match mode {
                    Mode::Generate => format!("  unmatched generations {}", report.unmatched),
                    Mode::Rank => String::new(),
                };
                let _ = writeln!(
                    s,
                    "{what}: {} examples  accuracy {:.4}  macro-F1 {:.4}{unmatched}",
                    report.examples, report.accuracy, report.macro_f1
                );
                write_confusion(&mut s, &task.labels, &report.confusion)
            }
            Outcome::Text(r) => writeln!(
                s,
                "{what}: {} examples  exact match {:.4}  token F1 {:.4}",
                r.examples, r.exact_match, r.f1
            ),
            Outcome::Choice(r) => writeln!(s, "{what}: {} examples  accuracy {:.4}", r.examples, r.accuracy),
        };
        s
    }
}

/// `m[gold][predicted]` as a table with the label names as row and column heads.
fn write_confusion(s: &mut String, labels: &[String], m: &[Vec<usize>]) -> std::fmt::Result {
    use std::fmt::Write;
    let width = labels.iter().map(String::len).max().unwrap_or(4).max(6);
    writeln!(s, "confusion (rows: gold, columns: predicted)")?;
    write!(s, "  {:width$}", "")?;
    for l in labels {
        write!(s, " {l:>width$}")?;
    }
    writeln!(s)?;
    for (l, row) in labels.iter().zip(m) {
        write!(s, "  {l:width$}")?;
        for c in row {
            write!(s, " {c:>width$}")?;
        }
        writeln!(s)?;
    }
    Ok(())
}

/// `{name: score}` for each name.
fn scores_map(names: &[String], scores: &[f32]) -> Value {
    Value::Object(names.iter().cloned().zip(scores.iter().map(|&s| json!(s))).collect())
}
