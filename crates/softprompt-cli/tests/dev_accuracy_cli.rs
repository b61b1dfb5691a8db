//! `softprompt train --labels ... --select-by accuracy`: the dev accuracy logged in
//! metrics.jsonl is what `softprompt eval` measures for the saved prompt on the same dev file,
//! and the exported prompt is the most accurate evaluation. On the llama-tiny fixture with a
//! word-level tokenizer (`w{i}` is token `i`).

mod common;

use common::*;
use std::path::Path;

fn metrics(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Trains on the word data (`--eval-every 1`, 8 steps) with `extra`; returns the exported
/// step and the metrics lines that carry a dev evaluation.
fn train_words(s: &Setup, out: &Path, extra: &[&str]) -> (u64, Vec<serde_json::Value>) {
    let (ok, stdout, stderr) = run(train_on(s)
        .args(["--labels", "w100,w200", "--init", "random-uniform", "--seed", "0"])
        .args(["--n-tokens", "4", "--batch-size", "4", "--steps", "8", "--eval-every", "1"])
        .arg("--quiet")
        .arg("--output")
        .arg(out)
        .args(extra));
    assert!(ok, "train failed: {stderr}");
    // "adapter (prompt of step 7) written to ..."
    let step: u64 = stdout
        .split("prompt of step ")
        .nth(1)
        .and_then(|t| t.split(')').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no exported step in {stdout:?}"));
    let rows: Vec<serde_json::Value> = metrics(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|r| r.get("dev_loss").is_some())
        .collect();
    assert_eq!(rows.len(), 8);
    (step, rows)
}

fn accuracy(r: &serde_json::Value) -> f64 {
    r["dev_accuracy"].as_f64().expect("dev_accuracy logged")
}

/// `softprompt eval`'s accuracy of the adapter in `out` on the dev file (task.json records
/// the labels, so eval needs nothing else), with the training batch size.
fn eval_accuracy(s: &Setup, out: &Path) -> f64 {
    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--model")
        .arg(&s.model)
        .arg("--prompt")
        .arg(out)
        .arg("--data")
        .arg(&s.dev)
        .args(["--batch-size", "4", "--json"]));
    assert!(ok, "eval failed: {stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["examples"], 6);
    summary["accuracy"].as_f64().unwrap()
}

#[test]
fn logged_dev_accuracy_is_what_eval_measures_for_the_exported_prompt() {
    let s = setup(16);
    for select_by in ["loss", "accuracy"] {
        let out = s.root.join(select_by);
        let (step, rows) = train_words(&s, &out, &["--select-by", select_by]);
        let logged = rows.iter().find(|r| r["step"] == step).map(accuracy).unwrap();
        let accs: Vec<f64> = rows.iter().map(accuracy).collect();
        eprintln!("--select-by {select_by}: dev accuracy by step {accs:?}, exported step {step}");
        assert_eq!(eval_accuracy(&s, &out), logged, "--select-by {select_by}");
        let best_loss = rows.iter().map(|r| r["dev_loss"].as_f64().unwrap()).fold(f64::INFINITY, f64::min);
        let at_step = &rows.iter().find(|r| r["step"] == step).unwrap()["dev_loss"];
        if select_by == "loss" {
            assert_eq!(at_step.as_f64(), Some(best_loss));
        } else {
            let best = accs.iter().copied().fold(0.0, f64::max);
            assert_eq!(logged, best, "the exported step is not the most accurate");
        }
    }
}

#[test]
fn select_by_accuracy_needs_labels_that_are_the_dev_targets() {
    let s = setup(8);
    let train = |extra: &[&str]| {
        run(train_on(&s)
            .args(["--n-tokens", "4", "--batch-size", "4", "--steps", "2", "--quiet"])
            .arg("--output")
            .arg(s.root.join("run"))
            .args(extra))
    };
    let (ok, _, stderr) = train(&["--select-by", "accuracy"]);
    assert!(!ok && stderr.contains("--labels"), "{stderr}");
    let (ok, _, stderr) = train(&["--select-by", "accuracy", "--labels", "w100,w201"]);
    assert!(!ok && stderr.contains("dev example"), "{stderr}");
    // Labels only for the init: no accuracy, a note, and training goes on.
    let (ok, _, stderr) = train(&["--labels", "w100,w201"]);
    assert!(ok && stderr.contains("no dev accuracy"), "{stderr}");
}
