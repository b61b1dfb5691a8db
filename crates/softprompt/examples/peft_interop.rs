//! Writes one adapter per fixture model with softprompt's writer (the fixture's prompt,
//! `PeftAdapter::save`), for `scripts/peft_interop.py` to load with PEFT and compare.
//!
//! `cargo run -p softprompt --example peft_interop -- OUT_DIR`

use candle_core::Device;
use softprompt::load::load_model;
use softprompt::prompt::{AdapterConfig, PeftAdapter};
use std::path::PathBuf;

fn main() -> softprompt::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "peft-interop".into()));
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["t5-tiny", "flan-t5-tiny", "llama-tiny", "gpt2-tiny"] {
        let model = load_model(&fixtures.join(name), &Device::Cpu)?;
        let expected = candle_core::safetensors::load(fixtures.join(name).join("expected.safetensors"), &Device::Cpu)?;
        let prompt = expected
            .get("prompt")
            .ok_or_else(|| softprompt::Error::invalid(format!("{name}: no prompt in expected.safetensors")))?
            .clone();
        let info = model.backbone.info();
        PeftAdapter::new(AdapterConfig::new(info, prompt.dim(0)?, "RANDOM"), prompt)?.save(&out.join(name))?;
        println!("{}", out.join(name).display());
    }
    Ok(())
}
