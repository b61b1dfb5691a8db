//! What an evaluation runs on: the task (a built-in task, a BIG-bench task or a data file,
//! completed by what the adapters' `task.json` records), the rows, the k-shot
//! demonstrations and the mode. `softprompt eval` is argument parsing over [`EvalPlan`].

use super::prompt_design::{k_shot_pairs, k_shot_task};
use super::report::Mode;
use crate::task::bigbench::MultipleChoiceExample;
use crate::task::formats::{read_labeled, read_pairs, ReadOptions};
use crate::task::named::{is_task_name, NamedTask};
use crate::task::{movie, ClassificationTask, LabeledText, TaskMeta, TextPair};
use crate::{bail, Error, Result};
use std::path::PathBuf;

/// The built-in classification task.
pub const MOVIE_SENTIMENT: &str = movie::NAME;

/// A split of a named task (the split training uses: `task::named`).
pub use crate::task::named::Split;

/// Where the examples come from.
#[derive(Clone, Debug)]
pub enum EvalSource {
    /// `movie-sentiment` or `bigbench:<task name>` ([`NamedTask`]), and the split to evaluate.
    Task { name: String, split: Split },
    /// A data file evaluated whole, and a file of demonstrations for k-shot prompts.
    File {
        path: PathBuf,
        read: ReadOptions,
        train: Option<PathBuf>,
    },
}

/// The classification facts given for a data file (each falls back on `task.json`).
#[derive(Clone, Debug, Default)]
pub struct LabelSpec {
    /// Input template with `{text}`.
    pub template: Option<String>,
    /// Class labels: the data file is a classification task.
    pub labels: Vec<String>,
    /// The target text of each label.
    pub verbalizer: Vec<String>,
}

/// What is evaluated.
pub enum EvalData {
    /// A classification task and the rows to classify.
    Class(ClassificationTask, Vec<LabeledText>),
    /// Text-to-text pairs.
    Text(Vec<TextPair>),
    /// Examples with their own choices.
    Choice(Vec<MultipleChoiceExample>),
}

/// A resolved evaluation.
pub struct EvalPlan {
    pub data: EvalData,
    /// What is evaluated, for messages (`movie-sentiment (test split)`, the file).
    pub what: String,
    /// Bad records skipped while reading the data file.
    pub skipped: usize,
}

/// Rows of a split before demonstrations and the limit are applied.
enum Resolved {
    Class(ClassificationTask, Vec<LabeledText>),
    Text { train: Vec<TextPair>, rows: Vec<TextPair> },
    Choice(Vec<MultipleChoiceExample>),
}

impl EvalPlan {
    /// Resolves `source` (none: the test split of the task `saved` names, as `softprompt
    /// train --data <task>` records it), completes a data file's labels,
    /// verbalizer and template from `given`, then `saved`; draws `shots` demonstrations (with
    /// `seed`) and keeps the first `limit` rows.
    pub fn resolve(
        source: Option<EvalSource>,
        given: &LabelSpec,
        saved: &TaskMeta,
        shots: usize,
        seed: u64,
        limit: Option<usize>,
    ) -> Result<EvalPlan> {
        let source = match source {
            Some(s) => s,
            None => match saved.name.as_deref() {
                Some(name) if is_task_name(name) => EvalSource::Task { name: name.into(), split: Split::Test },
                _ => bail!("give --task (movie-sentiment, bigbench:<name>, or a data file) or --data FILE"),
            },
        };
        let (resolved, what, skipped) = match source {
            EvalSource::Task { name, split } => {
                let what = format!("{name} ({} split)", split.name());
                (named_task(&name, split)?, what, 0)
            }
            EvalSource::File { path, read, train } => {
                let what = path.display().to_string();
                let (resolved, skipped) = data_file(&path, &read, train.as_ref(), given, saved)?;
                (resolved, what, skipped)
            }
        };
        let data = match resolved {
            Resolved::Class(task, rows) => {
                let task = if shots > 0 {
                    k_shot_task(&task, shots, seed).map_err(|e| Error::invalid(format!("{what}: --shots: {e}")))?
                } else {
                    task
                };
                EvalData::Class(task, limited(rows, limit, &what)?)
            }
            Resolved::Text { train, rows } => {
                let rows = limited(rows, limit, &what)?;
                if shots == 0 {
                    EvalData::Text(rows)
                } else if train.is_empty() {
                    bail!("--shots needs training examples: give --train-data with --data");
                } else {
                    let rows = k_shot_pairs(&train, &rows, shots, seed)
                        .map_err(|e| Error::invalid(format!("{what}: --shots: {e}")))?;
                    EvalData::Text(rows)
                }
            }
            Resolved::Choice(rows) => {
                if shots > 0 {
                    bail!("--shots is not supported for multiple-choice tasks with per-example choices");
                }
                EvalData::Choice(limited(rows, limit, &what)?)
            }
        };
        Ok(EvalPlan { data, what, skipped })
    }

    /// `requested`, or the default: rank for classification and multiple choice, generation
    /// for text. Rank on a text task is an error, and so is an ensemble (`n_prompts > 1`)
    /// other than of a classification task in rank mode.
    pub fn mode(&self, requested: Option<Mode>, n_prompts: usize) -> Result<Mode> {
        let mode = match (requested, &self.data) {
            (Some(Mode::Rank), EvalData::Text(_)) => {
                bail!("--mode rank needs labels or choices; a text-to-text task is evaluated by generation")
            }
            (Some(m), _) => m,
            (None, EvalData::Text(_)) => Mode::Generate,
            (None, _) => Mode::Rank,
        };
        if n_prompts > 1 && !(mode == Mode::Rank && matches!(self.data, EvalData::Class(..))) {
            bail!("a prompt ensemble (several --prompt) needs a classification task in rank mode");
        }
        Ok(mode)
    }
}

/// The rows of `split` of the task `name` names: the split training uses.
fn named_task(name: &str, split: Split) -> Result<Resolved> {
    Ok(match NamedTask::load(name)? {
        NamedTask::Class(t) => {
            let rows = split.pick(&t.train, &t.dev, &t.test);
            Resolved::Class(t, rows)
        }
        NamedTask::Text(t) => {
            let rows = split.pick(&t.train, &t.dev, &t.test);
            Resolved::Text { train: t.train, rows }
        }
        NamedTask::Choice(t) => Resolved::Choice(split.pick(&t.train, &t.dev, &t.test)),
    })
}

/// The verbalizer of `labels`: the one given, else the saved one (when the labels are the
/// saved ones too), else the labels themselves (saved labels without a verbalizer were the
/// training targets as written; a template ending in whitespace), else each label after a
/// space.
pub fn default_verbalizer(given: &LabelSpec, saved: &TaskMeta, labels: &[String], template: &str) -> Vec<String> {
    if !given.verbalizer.is_empty() {
        given.verbalizer.clone()
    } else if given.labels.is_empty() {
        saved.label_texts().to_vec()
    } else if template.ends_with(char::is_whitespace) {
        labels.to_vec()
    } else {
        labels.iter().map(|l| format!(" {l}")).collect()
    }
}

fn data_file(
    path: &std::path::Path,
    read: &ReadOptions,
    train: Option<&PathBuf>,
    given: &LabelSpec,
    saved: &TaskMeta,
) -> Result<(Resolved, usize)> {
    let template = given.template.clone().or_else(|| saved.template.clone());
    if let Some(t) = &template {
        if !t.contains("{text}") {
            bail!("the template `{t}` has no `{{text}}`");
        }
    }
    let labels = if given.labels.is_empty() { saved.labels.clone() } else { given.labels.clone() };
    if labels.is_empty() {
        let apply = |rows: Vec<TextPair>| -> Vec<TextPair> {
            match &template {
                Some(t) => rows.into_iter().map(|p| TextPair { input: t.replace("{text}", &p.input), ..p }).collect(),
                None => rows,
            }
        };
        let rows = read_pairs(path, read)?;
        let train = match train {
            Some(p) => apply(read_pairs(p, read)?.rows),
            None => Vec::new(),
        };
        return Ok((Resolved::Text { train, rows: apply(rows.rows) }, rows.skipped));
    }
    let template = template.unwrap_or_else(|| "{text}".into());
    let verbalizer = default_verbalizer(given, saved, &labels, &template);
    if verbalizer.len() != labels.len() {
        bail!("{} labels but {} verbalizer entries", labels.len(), verbalizer.len());
    }
    let rows = read_labeled(path, read, &labels, &verbalizer)?;
    let train = match train {
        Some(p) => read_labeled(p, read, &labels, &verbalizer)?.rows,
        None => Vec::new(),
    };
    let task = ClassificationTask {
        name: saved.name.clone().unwrap_or_else(|| path.display().to_string()),
        template,
        labels,
        verbalizer,
        train,
        dev: Vec::new(),
        test: rows.rows.clone(),
    };
    Ok((Resolved::Class(task, rows.rows), rows.skipped))
}

fn limited<T>(mut rows: Vec<T>, limit: Option<usize>, what: &str) -> Result<Vec<T>> {
    if limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if let Some(n) = limit {
        rows.truncate(n);
    }
    if rows.is_empty() {
        bail!("{what}: no examples to evaluate (the split is empty)");
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_verbalizer_comes_from_the_user_then_task_json_then_the_labels() {
        let saved = TaskMeta { labels: strings(&["a", "b"]), verbalizer: strings(&[" A", " B"]), ..TaskMeta::default() };
        let labels = strings(&["a", "b"]);
        let given = LabelSpec { verbalizer: strings(&["x", "y"]), ..LabelSpec::default() };
        assert_eq!(default_verbalizer(&given, &saved, &labels, "{text}"), ["x", "y"]);
        assert_eq!(default_verbalizer(&LabelSpec::default(), &saved, &labels, "{text}"), [" A", " B"]);
        let bare = TaskMeta { labels: labels.clone(), ..TaskMeta::default() };
        assert_eq!(default_verbalizer(&LabelSpec::default(), &bare, &labels, "{text}"), ["a", "b"]);
        let given = LabelSpec { labels: labels.clone(), ..LabelSpec::default() };
        assert_eq!(default_verbalizer(&given, &saved, &labels, "{text}"), [" a", " b"]);
        assert_eq!(default_verbalizer(&given, &saved, &labels, "{text} "), ["a", "b"]);
    }

    #[test]
    fn without_a_source_the_saved_task_is_evaluated_or_the_user_is_asked() {
        let err = EvalPlan::resolve(None, &LabelSpec::default(), &TaskMeta::default(), 0, 0, None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("--task") && err.contains("--data"), "{err}");
    }
}
