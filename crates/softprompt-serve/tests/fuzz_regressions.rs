//! The `server_request` fuzz target's inputs as ordinary tests (see docs/reliability.md),
//! decoded and checked by the target's own code (`fuzz/fuzz_targets/server_request_input.rs`):
//!
//! * every seed in `fuzz/seeds/server_request/` is a VALID request and must be accepted (and
//!   its job run through the engine);
//! * every prefix of a seed is refused with a 4xx, never a panic;
//! * every input in `fuzz/regressions/server_request/` once made the server panic (or is a
//!   hand-made bad request) and must now be refused with a 4xx.

#[path = "../../../fuzz/fuzz_targets/server_request_input.rs"]
mod server_request_input;

use softprompt_serve::http::AppState;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `fuzz/<kind>/server_request/` (none when the folder does not exist).
fn inputs(kind: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join("server_request");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

fn state(scratch: &Path) -> [Arc<AppState>; 2] {
    server_request_input::states(&fuzz_dir().join(".."), scratch)
}

#[test]
fn every_seed_is_accepted() {
    let scratch = tempfile::tempdir().unwrap();
    let s = state(scratch.path());
    let seeds = inputs("seeds");
    assert!(seeds.len() >= 8, "seeds missing: run python3 fuzz/seeds/make_seeds.py");
    // Per model (Llama GGUF, T5): generate, classify, upload.
    let mut endpoints = [[0usize; 3]; 2];
    // Twice: the second round replaces the kept upload (`swap`).
    for _ in 0..2 {
        for seed in &seeds {
            let data = std::fs::read(seed).unwrap();
            if let Err(e) = server_request_input::run(&s, &data) {
                panic!("seed {} refused: {e}", seed.display());
            }
            endpoints[usize::from(data[0] & 4 != 0)][(data[0] as usize % 4).min(2)] += 1;
        }
    }
    assert!(endpoints.iter().flatten().all(|&n| n >= 2), "seeds per model and endpoint: {endpoints:?}");
    // Uploads were removed again but the kept one: the fixed tasks and `swap` remain.
    let names: Vec<String> = s[0].registry.list().iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, ["cls", "ens", "plain", server_request_input::SWAP]);
    let names: Vec<String> = s[1].registry.list().iter().map(|t| t.name.clone()).collect();
    assert_eq!(names, ["cls", "ens", "plain"]);
}

/// A truncated body is malformed JSON: refused with a 4xx, never a panic.
#[test]
fn truncated_seeds_are_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let s = state(scratch.path());
    for seed in inputs("seeds") {
        let data = std::fs::read(&seed).unwrap();
        let step = (data.len() / 64).max(1);
        for cut in (0..data.len()).step_by(step) {
            let result = catch_unwind(AssertUnwindSafe(|| server_request_input::run(&s, &data[..cut])));
            match result {
                Ok(Err(_)) => {}
                Ok(Ok(())) => panic!("{} cut to {cut} bytes was accepted", seed.display()),
                Err(_) => panic!("{} cut to {cut} bytes panicked", seed.display()),
            }
        }
    }
}

#[test]
fn regression_inputs_are_refused() {
    let scratch = tempfile::tempdir().unwrap();
    let s = state(scratch.path());
    let mut failures = Vec::new();
    for input in inputs("regressions") {
        let data = std::fs::read(&input).unwrap();
        match catch_unwind(AssertUnwindSafe(|| server_request_input::run(&s, &data))) {
            Ok(Err(e)) => eprintln!("{}: {e}", input.display()),
            Ok(Ok(())) => failures.push(format!("{}: accepted, expected a 4xx", input.display())),
            Err(_) => failures.push(format!("{}: panicked", input.display())),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
