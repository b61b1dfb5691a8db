//! The server's request bodies: `POST /v1/generate`, `POST /v1/classify` and the upload of
//! `PUT /v1/tasks/{name}`, through the handlers' own parsing and validation, and accepted
//! jobs run through the engine, on the tiny GGUF seed model and the tiny T5 (no position
//! limit), three tasks each (layout and checks: `server_request_input.rs`).
#![no_main]

mod common;
mod server_request_input;

use libfuzzer_sys::fuzz_target;
use softprompt_serve::http::AppState;
use std::path::Path;
use std::sync::{Arc, OnceLock};

fuzz_target!(|data: &[u8]| {
    static STATES: OnceLock<[Arc<AppState>; 2]> = OnceLock::new();
    let states = STATES.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        server_request_input::states(&repo, common::scratch())
    });
    let _ = server_request_input::run(states, data);
});
