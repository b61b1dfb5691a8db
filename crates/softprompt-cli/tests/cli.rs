//! The `softprompt` binary end to end on the real SmolLM2 GGUF (fetched and cached on first
//! use) and the fixture models.

mod common;

use common::*;

#[test]
fn generate_continues_the_capital_of_france_with_paris() {
    let (ok, stdout, stderr) = run(bin()
        .args(["generate", "--model"])
        .arg(smollm2())
        .args(["--input", "The capital of France is", "--max-new-tokens", "4"]));
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with(" Paris"), "{stdout:?}");
}

/// `score --json` reproduces transformers' per-sentence NLL (fixtures/smollm2): the first
/// token is the input, the rest of the sentence is the target.
#[test]
fn score_matches_transformers_nll_on_smollm2() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2/expected.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let sentences = expected["sentences"].as_array().unwrap();
    let mut lines = String::new();
    for s in sentences {
        let text = s["text"].as_str().unwrap();
        let first = s["tokens"][0].as_str().unwrap(); // a word without a leading space
        assert!(text.starts_with(first));
        lines += &serde_json::json!({"input": first, "target": &text[first.len()..]}).to_string();
        lines += "\n";
    }
    std::fs::write(&data, lines).unwrap();
    let (ok, stdout, stderr) = run(bin()
        .args(["score", "--json", "--no-eos", "--batch-size", "1", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(&data));
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), sentences.len() + 1);
    let mut mean_of_means = 0.0;
    for (row, s) in rows.iter().zip(sentences) {
        let want = s["mean_nll"].as_f64().unwrap();
        let got = row["mean_nll"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-4, "{}: {got} vs {want}", s["text"]);
        mean_of_means += want / sentences.len() as f64;
    }
    let summary = rows.last().unwrap();
    assert_eq!(summary["examples"], sentences.len());
    assert!((summary["mean_nll"].as_f64().unwrap() - mean_of_means).abs() < 1e-4);
}

#[test]
fn bad_input_is_a_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, "{\"input\": \"a\", \"target\": \"b\"}\n{\"input\": \"a\"}\n").unwrap();
    let (ok, _, stderr) = run(bin()
        .args(["score", "--model"])
        .arg(smollm2())
        .arg("--data")
        .arg(&data));
    assert!(!ok);
    assert!(stderr.contains("bad.jsonl:2") && stderr.contains("target"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // A seq2seq adapter on a decoder-only model.
    let (ok, _, stderr) = run(bin()
        .args(["generate", "--input", "hi", "--model"])
        .arg(smollm2())
        .arg("--prompt")
        .arg(fixtures().join("t5-tiny/adapter")));
    assert!(!ok);
    assert!(stderr.contains("adapter_config.json"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // A missing model.
    let (ok, _, stderr) = run(bin().args(["generate", "--input", "hi", "--model", "/nonexistent/model.gguf"]));
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
}
