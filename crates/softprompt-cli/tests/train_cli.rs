//! `softprompt train` end to end on the llama-tiny fixture with a word-level tokenizer
//! (`w{i}` is token `i`), so that JSONL text data can be used.

mod common;

use common::*;

use std::path::Path;
use std::process::Command;

fn train_cmd(s: &Setup, out: &Path, extra: &[&str]) -> Command {
    let mut c = train_on(s);
    c.args(["--batch-size", "4", "--eval-every", "2", "--quiet"])
        .arg("--output")
        .arg(out)
        .args(extra);
    if !extra.contains(&"--n-tokens") {
        c.args(["--n-tokens", "4"]);
    }
    c
}

#[test]
fn train_writes_an_adapter_and_resumes() {
    let s = setup(16);
    let out = s.root.join("run");
    let (ok, stdout, stderr) = run(&mut train_cmd(
        &s,
        &out,
        &["--steps", "4", "--labels", "w100,w200"],
    ));
    assert!(ok, "train failed: {stderr}");
    assert!(stdout.contains("trained 4 steps"), "{stdout}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "task.json",
        "metrics.jsonl",
        "loss.svg",
        "checkpoint/checkpoint.safetensors",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let task: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("task.json")).unwrap()).unwrap();
    assert_eq!(task["init"]["kind"], "class-labels");
    assert_eq!(task["labels"], serde_json::json!(["w100", "w200"]));
    assert!(task["target_format"].is_string());

    // Same folder without --resume: refused; with it: continues.
    let (ok, _, stderr) = run(&mut train_cmd(
        &s,
        &out,
        &["--steps", "6", "--labels", "w100,w200"],
    ));
    assert!(!ok && stderr.contains("--resume"), "{stderr}");
    let (ok, stdout, stderr) = run(&mut train_cmd(
        &s,
        &out,
        &["--steps", "6", "--labels", "w100,w200", "--resume"],
    ));
    assert!(ok, "resume failed: {stderr}");
    assert!(
        stdout.contains("trained 6 steps (resumed at step 4)"),
        "{stdout}"
    );
    let lines = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);

    // The adapter is usable by `score`.
    let (ok, stdout, stderr) = run(bin()
        .arg("score")
        .arg("--model")
        .arg(&s.model)
        .arg("--prompt")
        .arg(&out)
        .arg("--data")
        .arg(&s.dev)
        .arg("--json"));
    assert!(ok, "score with the trained adapter failed: {stderr}");
    assert!(stdout.contains("mean_nll"), "{stdout}");
}

#[test]
fn bad_arguments_fail_before_training() {
    let s = setup(16);
    let empty = s.root.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--lr".into(), "nan".into()],
            "--lr must be a positive number",
        ),
        (
            vec!["--lr".into(), "0".into()],
            "--lr must be a positive number",
        ),
        (
            vec!["--n-tokens".into(), "0".into()],
            "--n-tokens must be at least 1",
        ),
        (
            vec!["--labels".into(), "w100, ".into()],
            "tokenizes to no tokens",
        ),
        (vec!["--init".into(), "text".into()], "--init-text"),
        (vec!["--n-tokens".into(), "2045".into()], "context of 2048"),
    ];
    for (extra, want) in cases {
        let out = s.root.join("bad");
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (ok, _, stderr) = run(&mut train_cmd(&s, &out, &extra));
        assert!(!ok, "{extra:?} should fail");
        assert!(
            stderr.contains(want),
            "{extra:?}: expected `{want}` in: {stderr}"
        );
        assert!(
            !out.join("metrics.jsonl").exists(),
            "{extra:?}: training started"
        );
    }
    let out = s.root.join("bad-empty");
    let (ok, _, stderr) = run(bin()
        .arg("train")
        .arg("--model")
        .arg(&s.model)
        .arg("--data")
        .arg(&empty)
        .arg("--output")
        .arg(&out)
        .arg("--quiet"));
    assert!(!ok && stderr.contains("no examples"), "{stderr}");
}
