//! Tasks named on the command line instead of a data file: `movie-sentiment` (the built-in
//! task) and `bigbench:<task>` (a BIG-bench JSON task, fetched; or `bigbench:<path to a
//! task.json>`). Training (`softprompt train --data/--dev`) and evaluation (`softprompt eval
//! --task`) both resolve names here, so they see the same seeded split: a prompt trained on
//! the train split is never evaluated on its own examples.
//!
//! What a run trains on, per kind of task: a classification task (BIG-bench: every example
//! offers the same choices) the gold label's verbalizer; a multiple-choice task with choices
//! of its own per example the gold choice's text (as rank classification scores it: no EOS
//! after it on decoder-only models); a text-to-text task the example's first target,
//! followed by EOS.

use super::bigbench::{self, Imported, MultipleChoiceExample, MultipleChoiceTask, SplitSpec, TextTask};
use super::{encode_pair, encode_pair_with, movie, ClassificationTask, LabeledText, TaskMeta, TextPair};
use crate::batch::Example;
use crate::model::ModelInfo;
use crate::tokenizer::Tokenizer;
use crate::{bail, Result};
use std::path::Path;

/// The prefix of a BIG-bench task name: `bigbench:<task>`.
pub const BIGBENCH_PREFIX: &str = "bigbench:";

/// A split of a named task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Split {
    Train,
    Dev,
    #[default]
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Dev => "dev",
            Split::Test => "test",
        }
    }

    pub fn pick<T: Clone>(self, train: &[T], dev: &[T], test: &[T]) -> Vec<T> {
        match self {
            Split::Train => train.to_vec(),
            Split::Dev => dev.to_vec(),
            Split::Test => test.to_vec(),
        }
    }
}

/// Whether `name` names a task rather than a file: `movie-sentiment` or `bigbench:<task>`
/// (an existing file of that name wins).
pub fn is_task_name(name: &str) -> bool {
    (name == movie::NAME || name.starts_with(BIGBENCH_PREFIX)) && !Path::new(name).exists()
}

/// A task resolved from its name, split (seeded) into train, dev and test.
#[derive(Clone, Debug)]
pub enum NamedTask {
    /// Labels shared by every example (the built-in task; BIG-bench tasks whose examples all
    /// offer the same choices).
    Class(ClassificationTask),
    /// Choices of each example's own, ranked.
    Choice(MultipleChoiceTask),
    /// Text to text.
    Text(TextTask),
}

impl NamedTask {
    /// Loads the task `name` names (see [`is_task_name`]): the built-in task, or a BIG-bench
    /// task by name (fetched and cached) or by the path of its `task.json`, split with
    /// [`SplitSpec::default`] (seed 0, 80 / 10 / 10).
    pub fn load(name: &str) -> Result<NamedTask> {
        if name == movie::NAME {
            return Ok(NamedTask::Class(movie::load()?));
        }
        let Some(bb) = name.strip_prefix(BIGBENCH_PREFIX) else {
            bail!("unknown task `{name}` (known: {}, {BIGBENCH_PREFIX}<name>)", movie::NAME);
        };
        if bb.trim().is_empty() {
            bail!("`{name}`: name the BIG-bench task, e.g. {BIGBENCH_PREFIX}sports_understanding");
        }
        let local = Path::new(bb);
        let imported = if bb.ends_with(".json") && local.is_file() {
            bigbench::from_file(local, SplitSpec::default())?
        } else {
            bigbench::load(bb, SplitSpec::default())?
        };
        Ok(match imported {
            Imported::Classification(t) => NamedTask::Class(t),
            Imported::MultipleChoice(t) => NamedTask::Choice(t),
            Imported::Text(t) => NamedTask::Text(t),
        })
    }

    /// The classification task, when the task is one.
    pub fn classification(&self) -> Option<&ClassificationTask> {
        match self {
            NamedTask::Class(t) => Some(t),
            _ => None,
        }
    }

    /// Examples in each split: (train, dev, test).
    pub fn sizes(&self) -> (usize, usize, usize) {
        match self {
            NamedTask::Class(t) => (t.train.len(), t.dev.len(), t.test.len()),
            NamedTask::Choice(t) => (t.train.len(), t.dev.len(), t.test.len()),
            NamedTask::Text(t) => (t.train.len(), t.dev.len(), t.test.len()),
        }
    }

    /// Classification rows of a split (empty for other kinds).
    pub fn labeled(&self, split: Split) -> Vec<LabeledText> {
        match self {
            NamedTask::Class(t) => split.pick(&t.train, &t.dev, &t.test),
            _ => Vec::new(),
        }
    }

    /// Multiple-choice rows of a split (empty for other kinds).
    pub fn choices(&self, split: Split) -> Vec<MultipleChoiceExample> {
        match self {
            NamedTask::Choice(t) => split.pick(&t.train, &t.dev, &t.test),
            _ => Vec::new(),
        }
    }

    /// What training sees of a split: (model input, target text): the gold label's
    /// verbalizer, the gold choice, or the first target.
    pub fn pairs(&self, split: Split) -> Vec<TextPair> {
        match self {
            NamedTask::Class(t) => t.pairs(&split.pick(&t.train, &t.dev, &t.test)),
            NamedTask::Choice(t) => split
                .pick(&t.train, &t.dev, &t.test)
                .into_iter()
                .map(|e| TextPair { target: e.choices[e.gold].clone(), input: e.input, line: e.line })
                .collect(),
            NamedTask::Text(t) => split.pick(&t.train, &t.dev, &t.test),
        }
    }

    /// Tokenized training examples of a split (module doc: what each kind trains on).
    pub fn examples(&self, tokenizer: &Tokenizer, info: &ModelInfo, split: Split) -> Result<Vec<Example>> {
        match self {
            NamedTask::Class(t) => t.examples(tokenizer, info, &split.pick(&t.train, &t.dev, &t.test)),
            // The gold choice as rank classification scores it.
            NamedTask::Choice(_) => {
                self.pairs(split).iter().map(|p| encode_pair_with(tokenizer, info, p, false)).collect()
            }
            NamedTask::Text(_) => self.pairs(split).iter().map(|p| encode_pair(tokenizer, info, p)).collect(),
        }
    }

    /// What `task.json` records of the task: its name as given (so `softprompt eval` without
    /// `--task` evaluates the same task's test split) and, for classification, the template,
    /// labels and verbalizer.
    pub fn meta(&self, name: &str) -> TaskMeta {
        let meta = match self {
            NamedTask::Class(t) => TaskMeta {
                target_format: Some("the label's verbalizer (encoder-decoder models: followed by EOS)".into()),
                ..t.meta()
            },
            NamedTask::Choice(_) => TaskMeta {
                input_format: Some("the BIG-bench input with its choices listed".into()),
                target_format: Some("the gold choice (encoder-decoder models: followed by EOS)".into()),
                ..TaskMeta::default()
            },
            NamedTask::Text(_) => TaskMeta {
                input_format: Some("the BIG-bench input".into()),
                target_format: Some("the first target followed by EOS".into()),
                ..TaskMeta::default()
            },
        };
        TaskMeta { name: Some(name.to_string()), ..meta }
    }
}
