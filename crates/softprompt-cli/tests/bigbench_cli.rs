//! `softprompt train --data bigbench:<task>` and `softprompt eval --task bigbench:<task>` end
//! to end on the llama-tiny fixture with a word-level tokenizer (`w{i}` is token `i`), with a
//! small BIG-bench `task.json` named by its path; and `softprompt eval --task FILE`.

mod common;

use common::*;
use std::path::Path;

/// A BIG-bench task of 40 examples sharing the choices `w100` / `w200` (a classification
/// task): the class word `w60` goes with `w100`, `w70` with `w200`.
fn write_task(dir: &Path) -> String {
    let examples: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            let class = i % 2;
            serde_json::json!({"input": format!("w{} w{}", 10 + i, [60, 70][class]),
                "target_scores": {"w100": u8::from(class == 0), "w200": u8::from(class == 1)}})
        })
        .collect();
    let path = dir.join("toy/task.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::json!({"name": "toy", "examples": examples}).to_string()).unwrap();
    format!("bigbench:{}", path.display())
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().rfind(|l| l.starts_with('{')).expect("a JSON line")).unwrap()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_bigbench_task_trains_and_evaluates_on_one_split() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let task = write_task(tmp.path());
    let (out, splits) = (tmp.path().join("run"), tmp.path().join("splits"));
    let (ok, stdout, stderr) = run(bin()
        .arg("train")
        .arg("--model")
        .arg(&model)
        .args(["--data", &task, "--dev", &task])
        .args(["--steps", "4", "--batch-size", "4", "--n-tokens", "4", "--eval-every", "2", "--quiet"])
        .arg("--output")
        .arg(&out)
        .arg("--write-splits")
        .arg(&splits));
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stderr.contains("wrote 32 train / 4 dev / 4 test examples"), "{stderr}");
    // task.json names the task; the shared choices are its labels, their answers the verbalizer.
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
    assert_eq!(meta["name"], task.as_str());
    assert_eq!(meta["labels"], serde_json::json!(["w100", "w200"]));
    assert_eq!(meta["verbalizer"], serde_json::json!([" w100", " w200"]));
    // The dev accuracy was logged: the labels are the task's (no --labels needed).
    let metrics = lines(&out.join("metrics.jsonl"));
    assert!(metrics.iter().any(|m| m.get("dev_accuracy").is_some_and(|a| a.is_number())), "{metrics:?}");

    // Evaluating the adapter alone: its task's test split, the split training left out.
    let preds = tmp.path().join("preds.jsonl");
    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--prompt")
        .arg(&out)
        .arg("--json")
        .arg("--predictions")
        .arg(&preds));
    assert!(ok, "{stdout}\n{stderr}");
    let summary = last_json(&stdout);
    assert_eq!(summary["examples"], 4, "{summary}");
    assert!(summary["data"].as_str().unwrap().ends_with("(test split)"), "{summary}");
    let evaluated: Vec<String> = lines(&preds).iter().map(|l| l["input"].as_str().unwrap().to_string()).collect();
    let written: Vec<String> = lines(&splits.join("test.jsonl")).iter().map(|l| l["input"].as_str().unwrap().to_string()).collect();
    assert_eq!(evaluated, written, "eval's test split is the one training wrote");
    let trained: Vec<String> = lines(&splits.join("train.jsonl")).iter().map(|l| l["input"].as_str().unwrap().to_string()).collect();
    assert!(evaluated.iter().all(|i| !trained.contains(i)), "a test example was trained on");
}

#[test]
fn eval_task_takes_a_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let data = tmp.path().join("pairs.jsonl");
    write_data(&data, 6, 0);
    let summaries: Vec<serde_json::Value> = ["--task", "--data"]
        .iter()
        .map(|flag| {
            let (ok, stdout, stderr) = run(bin()
                .arg("eval")
                .arg("--model")
                .arg(&model)
                .arg(flag)
                .arg(&data)
                .args(["--labels", "w100,w200", "--json"]));
            assert!(ok, "{flag}: {stdout}\n{stderr}");
            last_json(&stdout)
        })
        .collect();
    assert_eq!(summaries[0], summaries[1]);
    assert_eq!(summaries[0]["examples"], 6);
    // A name that is neither a task nor a file is still an error naming the known tasks.
    let (ok, _, stderr) = run(bin().arg("eval").arg("--model").arg(&model).args(["--task", "no-such-task"]));
    assert!(!ok);
    assert!(stderr.contains("bigbench:"), "{stderr}");
}
