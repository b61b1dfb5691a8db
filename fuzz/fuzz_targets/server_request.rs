//! The server's request bodies: `POST /v1/generate`, `POST /v1/classify` and the upload of
//! `PUT /v1/tasks/{name}`, through the handlers' own parsing and validation, on the tiny
//! GGUF seed model with three tasks (layout and checks: `server_request_input.rs`).
#![no_main]

mod common;
mod server_request_input;

use libfuzzer_sys::fuzz_target;
use softprompt_serve::http::AppState;
use std::path::Path;
use std::sync::{Arc, OnceLock};

fuzz_target!(|data: &[u8]| {
    static STATE: OnceLock<Arc<AppState>> = OnceLock::new();
    let state = STATE.get_or_init(|| {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/gguf/tiny_f32_f16.gguf");
        server_request_input::state(&model, common::scratch())
    });
    let _ = server_request_input::run(state, data);
});
