//! GGUF reader: any bytes given to `load::gguf::load` must give a model or an error.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = common::file("model.gguf", data);
    let _ = softprompt::load::gguf::load(&path, &candle_core::Device::Cpu);
});
