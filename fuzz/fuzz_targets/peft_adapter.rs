//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Input layout: 2 bytes (little-endian) giving the length L of the config JSON, then the L
//! bytes of the config, then the safetensors bytes (what is left). A valid adapter is then
//! checked against a model description and saved again, as `softprompt train --init file` does.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use softprompt::prompt::peft::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let len = (u16::from_le_bytes(*len) as usize).min(rest.len());
    let (config, weights) = rest.split_at(len);
    let dir = common::scratch().join("adapter");
    std::fs::create_dir_all(&dir).expect("adapter folder");
    std::fs::write(dir.join(CONFIG_FILE), config).expect("write config");
    std::fs::write(dir.join(WEIGHTS_FILE), weights).expect("write weights");
    let Ok(adapter) = PeftAdapter::load(&dir, &candle_core::Device::Cpu) else {
        return;
    };
    // What a loaded adapter goes through next: the shape check and a round trip.
    let _ = adapter.prompt.dims2();
    let out = common::scratch().join("adapter-out");
    if adapter.save(&out).is_ok() {
        let again = PeftAdapter::load(&out, &candle_core::Device::Cpu).expect("a saved adapter loads");
        assert_eq!(again.prompt.dims(), adapter.prompt.dims());
    }
});
