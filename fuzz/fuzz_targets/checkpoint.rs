//! Training checkpoints (`checkpoint/checkpoint.safetensors`): `Checkpoint::from_bytes`
//! reads them from memory. A checkpoint that parses must serialise again, and resuming from
//! it goes through what `--resume` checks: each optimiser (Adafactor, AdamW) built on a prompt
//! of the checkpoint's shape loads the optimiser state or refuses it with an error; a state
//! it loads, it gives back unchanged.
#![no_main]

use candle_core::{Device, Var};
use libfuzzer_sys::fuzz_target;
use softprompt::train::checkpoint::Checkpoint;
use softprompt::train::optim::{AdafactorConfig, AdamWConfig, OptimizerConfig};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("checkpoint.safetensors");
    let Ok(c) = Checkpoint::from_bytes(data, path, &Device::Cpu) else {
        return;
    };
    let _ = c.to_bytes();
    let Ok(prompt) = c.prompt.to_dtype(candle_core::DType::F32).and_then(|p| Var::from_tensor(&p)) else {
        return;
    };
    for config in [OptimizerConfig::Adafactor(AdafactorConfig::default()), OptimizerConfig::AdamW(AdamWConfig::new(0.01))] {
        let Ok(mut optimizer) = config.build(vec![prompt.clone()]) else {
            continue;
        };
        if optimizer.load_state(&c.optimizer).is_ok() {
            let back = optimizer.state().expect("a loaded state is given back");
            assert_eq!(back.scalars, c.optimizer.scalars, "optimizer scalars changed");
            let mut keys: Vec<&String> = back.tensors.keys().collect();
            let mut given: Vec<&String> = c.optimizer.tensors.keys().collect();
            keys.sort();
            given.sort();
            assert_eq!(keys, given, "optimizer tensors changed");
        }
    }
});
