//! Importer for BIG-bench JSON tasks (`task.json`: `examples` with `input` and `target` or
//! `target_scores`, plus optional prompt fields), e.g. the NLI-style tasks
//! `analytic_entailment` and `epistemic_reasoning` fetched by [`crate::fetch::bigbench_task`].
//!
//! Inputs are formatted as BIG-bench does for zero-shot evaluation:
//! `task_prefix + example_input_prefix + input [+ choices] + example_output_prefix`, with
//! BIG-bench's defaults (`"\nQ: "`, `"\nA: "`, `"\n  choice: "`, choices appended). Two
//! differences: appended choices are listed in sorted order (BIG-bench permutes them with
//! numpy's generator), and trailing spaces of the output prefix move to the answer, which is
//! `" " + answer` (`"\nRelation: "` + `"entailment"` becomes `"\nRelation:"` + `" entailment"`,
//! the same text tokenized the way BPE vocabularies expect); after an output prefix ending in
//! a newline the answer has no leading space. Examples repeating an earlier one's input,
//! targets and scores are dropped (BIG-bench drops only examples identical in every field,
//! ids and comments included; repeats in both train and test would inflate test scores).
//! The `line` of rows made from a task is the 1-based example number.
//!
//! Multiple-choice tasks whose examples all offer the same choices become a
//! [`ClassificationTask`] (labels = choices); others keep per-example choices for rank
//! classification ([`MultipleChoiceExample`]). Text-to-text tasks become [`TextPair`]s.

use super::formats::split_checked;
use super::{ClassificationTask, LabeledText, TextPair};
use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// One example of a BIG-bench task.
#[derive(Clone, Debug, PartialEq)]
pub struct BigBenchExample {
    pub input: String,
    /// `target` (a string or a list of strings); empty when the example has none.
    pub targets: Vec<String>,
    /// `target_scores` in file order; empty when the example has none.
    pub target_scores: Vec<(String, f64)>,
    /// 1-based position in the file's `examples`.
    pub number: usize,
}

impl BigBenchExample {
    /// Index (into `target_scores`) of the correct choice: the first with the highest score.
    pub fn gold(&self) -> Option<usize> {
        let mut best: Option<usize> = None;
        for (i, (_, s)) in self.target_scores.iter().enumerate() {
            if best.is_none_or(|b| *s > self.target_scores[b].1) {
                best = Some(i);
            }
        }
        best
    }
}

/// A parsed `task.json`.
#[derive(Clone, Debug)]
pub struct BigBenchTask {
    pub name: String,
    pub description: String,
    pub task_prefix: String,
    pub example_input_prefix: String,
    pub example_output_prefix: String,
    pub choice_prefix: String,
    pub append_choices_to_input: bool,
    /// Distinct examples, in file order.
    pub examples: Vec<BigBenchExample>,
    /// Examples dropped for repeating an earlier one's input, targets and scores.
    pub duplicates: usize,
}

/// How a task's examples are split: a seeded shuffle, then `train` / `dev` / the rest.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SplitSpec {
    pub seed: u64,
    pub train: f64,
    pub dev: f64,
}

impl Default for SplitSpec {
    /// 80 / 10 / 10 with seed 0.
    fn default() -> Self {
        SplitSpec {
            seed: 0,
            train: 0.8,
            dev: 0.1,
        }
    }
}

/// A multiple-choice example scored by ranking its choices.
#[derive(Clone, Debug, PartialEq)]
pub struct MultipleChoiceExample {
    /// The formatted model input.
    pub input: String,
    /// The answer texts to rank, as the model should produce them (see [`BigBenchTask::answer`]).
    pub choices: Vec<String>,
    /// Index of the correct choice.
    pub gold: usize,
    /// 1-based example number.
    pub line: usize,
}

/// A multiple-choice task whose examples do not share one set of choices.
#[derive(Clone, Debug)]
pub struct MultipleChoiceTask {
    pub name: String,
    pub train: Vec<MultipleChoiceExample>,
    pub dev: Vec<MultipleChoiceExample>,
    pub test: Vec<MultipleChoiceExample>,
}

/// A text-to-text task. Each pair keeps the example's first target.
#[derive(Clone, Debug)]
pub struct TextTask {
    pub name: String,
    pub train: Vec<TextPair>,
    pub dev: Vec<TextPair>,
    pub test: Vec<TextPair>,
}

/// What a BIG-bench task becomes.
#[derive(Clone, Debug)]
pub enum Imported {
    Text(TextTask),
    Classification(ClassificationTask),
    MultipleChoice(MultipleChoiceTask),
}

/// Fetches (cached) and imports BIG-bench task `name`.
pub fn load(name: &str, spec: SplitSpec) -> Result<Imported> {
    let path = crate::fetch::bigbench_task(name)?;
    from_file(&path, spec)
}

/// Parses and imports a `task.json`.
pub fn from_file(path: &Path, spec: SplitSpec) -> Result<Imported> {
    parse(path)?.import(spec, path)
}

#[derive(Deserialize)]
struct RawTask {
    name: Option<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    task_prefix: String,
    example_input_prefix: Option<String>,
    example_output_prefix: Option<String>,
    choice_prefix: Option<String>,
    append_choices_to_input: Option<bool>,
    examples: Vec<RawExample>,
}

#[derive(Deserialize)]
struct RawExample {
    input: Option<String>,
    target: Option<RawTarget>,
    target_scores: Option<Scores>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTarget {
    One(String),
    Many(Vec<String>),
}

/// `target_scores` with the file's key order kept.
struct Scores(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for Scores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scores;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object mapping each choice to a number")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Scores, A::Error> {
                let mut out: Vec<(String, f64)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, f64>()? {
                    if out.iter().any(|(c, _)| *c == k) {
                        return Err(serde::de::Error::custom(format!("choice `{k}` appears twice")));
                    }
                    out.push((k, v));
                }
                Ok(Scores(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Reads a `task.json`. Malformed JSON is an error naming the file and line; a bad example is
/// one naming the file and the example's number.
pub fn parse(path: &Path) -> Result<BigBenchTask> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::format(path, format!("invalid UTF-8: {e}")))?;
    let raw: RawTask = serde_json::from_str(text)
        .map_err(|e| Error::data(path, e.line(), format!("not a BIG-bench task.json: {e}")))?;
    let mut examples: Vec<BigBenchExample> = Vec::with_capacity(raw.examples.len());
    let mut duplicates = 0;
    let mut seen = std::collections::HashSet::new();
    for (i, ex) in raw.examples.into_iter().enumerate() {
        let number = i + 1;
        let bad = |msg: &str| Error::format(path, format!("example {number}: {msg}"));
        let input = ex.input.ok_or_else(|| bad("missing `input`"))?;
        let targets = match ex.target {
            None => Vec::new(),
            Some(RawTarget::One(t)) => vec![t],
            Some(RawTarget::Many(ts)) if ts.is_empty() => return Err(bad("`target` is an empty list")),
            Some(RawTarget::Many(ts)) => ts,
        };
        let target_scores = match ex.target_scores {
            None => Vec::new(),
            Some(Scores(s)) => {
                if s.is_empty() {
                    return Err(bad("`target_scores` has no choices"));
                }
                if s.iter().any(|(_, v)| !v.is_finite()) {
                    return Err(bad("a score in `target_scores` is not a finite number"));
                }
                let max = s.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
                let min = s.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
                if (s.len() == 1 && max == 0.0) || (s.len() > 1 && max <= min) {
                    return Err(bad("`target_scores` gives no choice a higher score than the others"));
                }
                s
            }
        };
        if targets.is_empty() && target_scores.is_empty() {
            return Err(bad("has neither `target` nor `target_scores`"));
        }
        let ex = BigBenchExample {
            input,
            targets,
            target_scores,
            number,
        };
        let scores: Vec<(String, u64)> = ex.target_scores.iter().map(|(c, s)| (c.clone(), s.to_bits())).collect();
        if !seen.insert((ex.input.clone(), ex.targets.clone(), scores)) {
            duplicates += 1;
            continue;
        }
        examples.push(ex);
    }
    if examples.is_empty() {
        return Err(Error::format(path, "the task has no examples"));
    }
    let name = raw.name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| {
        path.parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bigbench".into())
    });
    Ok(BigBenchTask {
        name,
        description: raw.description,
        task_prefix: raw.task_prefix,
        example_input_prefix: raw.example_input_prefix.unwrap_or_else(|| "\nQ: ".into()),
        example_output_prefix: raw.example_output_prefix.unwrap_or_else(|| "\nA: ".into()),
        choice_prefix: raw.choice_prefix.unwrap_or_else(|| "\n  choice: ".into()),
        append_choices_to_input: raw.append_choices_to_input.unwrap_or(true),
        examples,
        duplicates,
    })
}

impl BigBenchTask {
    /// Whether every example has `target_scores` (then the task is scored by ranking choices).
    pub fn is_multiple_choice(&self) -> bool {
        self.examples.iter().all(|e| !e.target_scores.is_empty())
    }

    /// The output prefix without its trailing spaces: what ends every model input.
    fn prompt_end(&self) -> &str {
        self.example_output_prefix.trim_end_matches(' ')
    }

    /// An answer as the model should produce it after the input: `" " + text`, or `text`
    /// alone when the output prefix ends with a newline.
    pub fn answer(&self, text: &str) -> String {
        if self.prompt_end().ends_with('\n') {
            text.to_string()
        } else {
            format!(" {text}")
        }
    }

    /// `input` with the choices listed after it (sorted), when the task asks for that.
    fn with_choices(&self, input: &str, choices: &[&str]) -> String {
        let mut s = input.to_string();
        if self.append_choices_to_input && !choices.is_empty() {
            let mut sorted = choices.to_vec();
            sorted.sort_unstable();
            for c in sorted {
                s.push_str(&self.choice_prefix);
                s.push_str(c);
            }
        }
        s
    }

    /// The full model input of an example (zero-shot).
    pub fn format_input(&self, ex: &BigBenchExample) -> String {
        let choices: Vec<&str> = ex.target_scores.iter().map(|(c, _)| c.as_str()).collect();
        format!(
            "{}{}{}{}",
            self.task_prefix,
            self.example_input_prefix,
            self.with_choices(&ex.input, &choices),
            self.prompt_end()
        )
    }

    /// The choices shared by every example (in the first example's order), if they share one set.
    pub fn shared_choices(&self) -> Option<Vec<String>> {
        if !self.is_multiple_choice() {
            return None;
        }
        let first: Vec<String> = self.examples[0].target_scores.iter().map(|(c, _)| c.clone()).collect();
        let mut key = first.clone();
        key.sort_unstable();
        let same = self.examples.iter().all(|e| {
            let mut k: Vec<&String> = e.target_scores.iter().map(|(c, _)| c).collect();
            k.sort_unstable();
            k.len() == key.len() && k.iter().zip(&key).all(|(a, b)| *a == b)
        });
        same.then_some(first)
    }

    /// Text pairs (formatted input, answer to the first target, or to the gold choice).
    pub fn text_pairs(&self) -> Vec<TextPair> {
        self.examples
            .iter()
            .map(|e| {
                let target = match e.targets.first() {
                    Some(t) => t.clone(),
                    None => e.gold().map(|g| e.target_scores[g].0.clone()).unwrap_or_default(),
                };
                TextPair {
                    input: self.format_input(e),
                    target: self.answer(&target),
                    line: e.number,
                }
            })
            .collect()
    }

    /// Splits the examples (see [`SplitSpec`]) into the fitting kind of task. `source` names
    /// the data in errors (an empty split is an error).
    pub fn import(&self, spec: SplitSpec, source: &Path) -> Result<Imported> {
        let what = source.display().to_string();
        if !self.is_multiple_choice() {
            if let Some(e) = self.examples.iter().find(|e| e.targets.is_empty()) {
                return Err(Error::format(
                    source,
                    format!(
                        "example {}: no `target`, but other examples have no `target_scores`",
                        e.number
                    ),
                ));
            }
            let (train, dev, test) = split_checked(self.text_pairs(), spec.seed, spec.train, spec.dev, &what)?;
            return Ok(Imported::Text(TextTask {
                name: self.name.clone(),
                train,
                dev,
                test,
            }));
        }
        if let Some(labels) = self.shared_choices() {
            let template = self.format_input(&BigBenchExample {
                input: "{text}".into(),
                targets: Vec::new(),
                target_scores: labels.iter().map(|l| (l.clone(), 0.0)).collect(),
                number: 0,
            });
            let fixed = [
                &self.task_prefix,
                &self.example_input_prefix,
                &self.example_output_prefix,
                &self.choice_prefix,
            ];
            if fixed.iter().any(|p| p.contains("{text}")) || labels.iter().any(|l| l.contains("{text}")) {
                return Err(Error::format(source, "the task's prefixes or choices contain `{text}`"));
            }
            let rows: Vec<LabeledText> = self
                .examples
                .iter()
                .map(|e| {
                    let (gold, _) = &e.target_scores[e.gold().unwrap_or(0)];
                    LabeledText {
                        text: e.input.clone(),
                        label: labels.iter().position(|l| l == gold).unwrap_or(0),
                        line: e.number,
                    }
                })
                .collect();
            let (train, dev, test) = split_checked(rows, spec.seed, spec.train, spec.dev, &what)?;
            return Ok(Imported::Classification(ClassificationTask {
                name: self.name.clone(),
                template,
                verbalizer: labels.iter().map(|l| self.answer(l)).collect(),
                labels,
                train,
                dev,
                test,
            }));
        }
        let rows: Vec<MultipleChoiceExample> = self
            .examples
            .iter()
            .map(|e| MultipleChoiceExample {
                input: self.format_input(e),
                choices: e.target_scores.iter().map(|(c, _)| self.answer(c)).collect(),
                gold: e.gold().unwrap_or(0),
                line: e.number,
            })
            .collect();
        let (train, dev, test) = split_checked(rows, spec.seed, spec.train, spec.dev, &what)?;
        Ok(Imported::MultipleChoice(MultipleChoiceTask {
            name: self.name.clone(),
            train,
            dev,
            test,
        }))
    }
}
