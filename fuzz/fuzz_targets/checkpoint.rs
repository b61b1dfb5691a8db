//! Training checkpoints (`checkpoint/checkpoint.safetensors`): `Checkpoint::from_bytes`
//! reads them from memory. A checkpoint that parses must also serialise again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use softprompt::train::checkpoint::Checkpoint;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("checkpoint.safetensors");
    if let Ok(c) = Checkpoint::from_bytes(data, path, &candle_core::Device::Cpu) {
        let _ = c.to_bytes();
    }
});
