//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! Input layout: 2 bytes (little-endian) giving the length L of the config JSON, then the L
//! bytes of the config, then the safetensors bytes (what is left). A loaded adapter is then
//! checked with `validate_within` against a decoder-only and an encoder-decoder model of its
//! width and of width 8 (what the server does with uploads and task folders), and saved
//! again, as `softprompt train --init file` does. An accepted adapter must keep what
//! validation promises, and saving it must never multiply memory.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use softprompt::model::{Arch, ModelInfo};
use softprompt::prompt::peft::{PeftAdapter, CONFIG_FILE, WEIGHTS_FILE};

const MAX_PROMPT_TOKENS: usize = 512;

fn model(arch: Arch, d_model: usize) -> ModelInfo {
    ModelInfo {
        arch,
        name: "fuzz".into(),
        d_model,
        vocab_size: 16,
        n_layers: 1,
        n_heads: 1,
        max_positions: (arch != Arch::T5).then_some(64),
        bos_token_id: None,
        eos_token_ids: vec![1],
        pad_token_id: Some(0),
        decoder_start_token_id: None,
    }
}

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
    let (n, d) = adapter.prompt.dims2().expect("a loaded prompt is [N, D]");
    for arch in [Arch::Llama, Arch::T5] {
        for width in [d, 8] {
            let info = model(arch, width);
            if adapter.validate_within(&info, MAX_PROMPT_TOKENS, &dir).is_ok() {
                assert!(n >= 1 && n <= MAX_PROMPT_TOKENS && info.max_positions.is_none_or(|m| n < m), "{n} rows");
                assert_eq!(d, info.d_model);
                let submodules = adapter.config.num_transformer_submodules.unwrap_or(1);
                assert!(submodules == 1 || (submodules == 2 && arch == Arch::T5), "{submodules} submodules");
            }
        }
    }
    // A loaded adapter always saves (its config was checked), to at most two copies.
    let out = common::scratch().join("adapter-out");
    adapter.save(&out).expect("a loaded adapter saves");
    let size = std::fs::metadata(out.join(WEIGHTS_FILE)).expect("saved weights").len();
    assert!(size <= 2 * (n * d * 4) as u64 + 4096, "{size} bytes for a [{n}, {d}] prompt");
    let again = PeftAdapter::load(&out, &candle_core::Device::Cpu).expect("a saved adapter loads");
    assert_eq!(again.prompt.dims(), adapter.prompt.dims());
});
