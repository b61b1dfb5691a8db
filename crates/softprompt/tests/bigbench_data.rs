//! BIG-bench tasks as training data (`softprompt train --data bigbench:<task>`): training
//! sees the same seeded split `softprompt eval --task bigbench:<task>` evaluates, the split is
//! the same on every run, and multiple-choice tasks train on the gold choice.
//!
//! The tasks are small `task.json` files written here, named as `bigbench:<path>`.

mod common;

use softprompt::eval::plan::{EvalData, EvalPlan, EvalSource, LabelSpec};
use softprompt::recipe::{DataSpec, TrainData};
use softprompt::task::named::{NamedTask, Split};
use softprompt::task::{TaskMeta, TextPair};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const SPLITS: [Split; 3] = [Split::Train, Split::Dev, Split::Test];

/// A classification-like task: 40 examples, every one offering `yes` / `no`.
fn shared_choices_task(dir: &Path) -> String {
    let examples: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            let yes = i % 3 == 0;
            serde_json::json!({"input": format!("w{} w{}", 10 + i, 60 + i), "target_scores": {"yes": u8::from(yes), "no": u8::from(!yes)}})
        })
        .collect();
    write_task(dir, "shared", serde_json::json!({"name": "shared", "description": "d", "keywords": [],
        "example_output_prefix": "\nAnswer: ", "examples": examples}))
}

/// A multiple-choice task whose examples have choices of their own; the gold choice (the
/// highest score, not the first) is `c{i}`.
fn own_choices_task(dir: &Path) -> String {
    let examples: Vec<serde_json::Value> = (0..30)
        .map(|i| {
            serde_json::json!({"input": format!("w{} w{}", 100 + i, 140 + i),
                "target_scores": {format!("a{i}"): 0, format!("b{i}"): 0.5, format!("c{i}"): 1, format!("d{i}"): 0}})
        })
        .collect();
    write_task(dir, "own", serde_json::json!({"name": "own", "description": "d", "keywords": [], "examples": examples}))
}

fn write_task(dir: &Path, name: &str, task: serde_json::Value) -> String {
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join("task.json");
    std::fs::write(&path, task.to_string()).unwrap();
    format!("bigbench:{}", path.display())
}

fn spec(data: &str, dev: Option<&str>) -> DataSpec {
    DataSpec { data: PathBuf::from(data), dev: dev.map(PathBuf::from), dev_limit: None, labels: Vec::new() }
}

/// What `softprompt eval --task NAME --split SPLIT` evaluates, as the (input, gold target)
/// pairs a prompt would be trained on.
fn eval_pairs(name: &str, split: Split) -> Vec<TextPair> {
    let source = EvalSource::Task { name: name.to_string(), split };
    let plan = EvalPlan::resolve(Some(source), &LabelSpec::default(), &TaskMeta::default(), 0, 0, None).unwrap();
    match plan.data {
        EvalData::Class(task, rows) => task.pairs(&rows),
        EvalData::Choice(rows) => rows
            .into_iter()
            .map(|e| TextPair { target: e.choices[e.gold].clone(), input: e.input, line: e.line })
            .collect(),
        EvalData::Text(rows) => rows,
    }
}

#[test]
fn training_sees_the_seeded_split_eval_uses() {
    let dir = tempfile::tempdir().unwrap();
    for name in [shared_choices_task(dir.path()), own_choices_task(dir.path())] {
        let data = TrainData::resolve(spec(&name, Some(&name))).unwrap();
        let task = data.task.as_ref().expect("a named task");
        let again = NamedTask::load(&name).unwrap();
        let mut seen = HashSet::new();
        let mut total = 0;
        for split in SPLITS {
            let train_side = task.pairs(split);
            assert!(!train_side.is_empty(), "{name}: empty {split:?} split");
            // The same split on every load, and the one evaluation reads.
            assert_eq!(train_side, again.pairs(split), "{name} {split:?}: not deterministic");
            assert_eq!(train_side, eval_pairs(&name, split), "{name} {split:?}: training and evaluation differ");
            total += train_side.len();
            for p in &train_side {
                assert!(seen.insert(p.line), "{name}: example {} in two splits", p.line);
            }
        }
        assert_eq!(seen.len(), total);
        let (train, dev, test) = task.sizes();
        assert_eq!((train + dev + test, dev, test), (total, total / 10, total - train - dev));
        // Not the file order: the split is shuffled (seed 0).
        let lines: Vec<usize> = task.pairs(Split::Train).iter().map(|p| p.line).collect();
        assert!(lines.windows(2).any(|w| w[0] > w[1]), "{lines:?}");
    }
}

#[test]
fn shared_choices_are_a_classification_task_recorded_for_eval() {
    let dir = tempfile::tempdir().unwrap();
    let name = shared_choices_task(dir.path());
    let data = TrainData::resolve(spec(&name, Some(&name))).unwrap();
    let Some(NamedTask::Class(task)) = &data.task else { panic!("not a classification task") };
    // In the file's order (`json!` writes the keys sorted).
    assert_eq!(task.labels, ["no", "yes"]);
    // The answer follows the output prefix's space, as a BPE vocabulary spells it.
    assert_eq!(task.verbalizer, [" no", " yes"]);
    assert_eq!(data.labels, [" no", " yes"], "the verbalizer is the default --labels (dev accuracy)");
    for p in task.pairs(&task.train) {
        assert!(p.input.ends_with("\nAnswer:"), "{p:?}");
        let i: usize = p.input.split_whitespace().nth(1).unwrap()[1..].parse::<usize>().unwrap() - 10;
        assert_eq!(p.target, if i % 3 == 0 { " yes" } else { " no" }, "{p:?}");
    }
    // task.json names the task, so `softprompt eval --prompt DIR` alone evaluates its test split.
    let meta = data.meta(softprompt::train::trainer::SelectBy::Loss);
    assert_eq!(meta.name.as_deref(), Some(name.as_str()));
    assert_eq!(meta.labels, ["no", "yes"]);
    let plan = EvalPlan::resolve(None, &LabelSpec::default(), &meta, 0, 0, None).unwrap();
    assert!(plan.what.ends_with("(test split)"), "{}", plan.what);
    let EvalData::Class(_, rows) = plan.data else { panic!("not classification") };
    assert_eq!(rows, task.test);
}

#[test]
fn multiple_choice_tasks_train_on_the_gold_choice() {
    let dir = tempfile::tempdir().unwrap();
    let name = own_choices_task(dir.path());
    let task = NamedTask::load(&name).unwrap();
    assert!(matches!(task, NamedTask::Choice(_)));
    for split in SPLITS {
        let rows = task.choices(split);
        let pairs = task.pairs(split);
        assert_eq!(rows.len(), pairs.len());
        for (row, pair) in rows.iter().zip(&pairs) {
            let i = row.line - 1;
            assert_eq!(row.choices[row.gold], format!(" c{i}"), "gold = the highest score: {row:?}");
            assert_eq!(pair.target, format!(" c{i}"));
            assert_eq!(pair.input, row.input);
            // The choices are listed in the input, sorted.
            assert!(pair.input.ends_with(&format!("choice: a{i}\n  choice: b{i}\n  choice: c{i}\n  choice: d{i}\nA:")), "{}", pair.input);
        }
    }
    // Tokenized: the gold choice's tokens, without EOS (as rank classification scores it).
    let model = common::llama_with_words(dir.path());
    let (tokenizer, info) = (model.tokenizer().unwrap(), model.backbone.info());
    let examples = task.examples(tokenizer, info, Split::Train).unwrap();
    for (ex, pair) in examples.iter().zip(task.pairs(Split::Train)) {
        assert_eq!(ex.target, tokenizer.encode(&pair.target).unwrap(), "{pair:?}");
        assert_eq!(ex.source, tokenizer.encode_input(&pair.input).unwrap());
    }
}

#[test]
fn a_dev_task_goes_with_its_data_task() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (shared_choices_task(dir.path()), own_choices_task(dir.path()));
    let jsonl = dir.path().join("train.jsonl");
    std::fs::write(&jsonl, "{\"input\": \"w1\", \"target\": \"w2\"}\n").unwrap();
    for (data, dev) in [(a.as_str(), b.as_str()), (jsonl.to_str().unwrap(), a.as_str())] {
        let err = TrainData::resolve(spec(data, Some(dev))).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("--dev") && err.contains(dev), "{data} / {dev}: {err}");
    }
    let err = NamedTask::load("bigbench:").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("name the BIG-bench task"), "{err}");
}
