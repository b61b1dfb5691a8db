//! PEFT prompt-tuning adapters: reading PEFT's files, writing files PEFT reads, validation.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use softprompt::load::load_model;
use softprompt::prompt::{AdapterConfig, PeftAdapter};
use std::collections::BTreeSet;
use std::path::Path;

const MODELS: [&str; 4] = ["t5-tiny", "flan-t5-tiny", "llama-tiny", "gpt2-tiny"];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn json_keys(path: &Path) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v.as_object().unwrap().keys().cloned().collect()
}

#[test]
fn peft_adapters_load_with_the_prompt_rows_in_use() {
    for name in MODELS {
        let dir = fixture_dir(name).join("adapter");
        let a = PeftAdapter::load(&dir, &Device::Cpu).unwrap();
        let expected = &expected_tensors(name)["prompt"];
        assert_eq!(a.prompt.dims(), &[5, 32], "{name}");
        assert_eq!(max_abs_diff(&a.prompt, expected), 0.0, "{name}: prompt rows");
        assert_eq!(a.config.num_virtual_tokens, 5);
        let model = load_model(&fixture_dir(name), &Device::Cpu).unwrap();
        a.validate(model.backbone.info(), &dir).unwrap();
    }
    // The encoder-only layout of the same prompt loads to the same rows.
    for name in ["t5-tiny", "flan-t5-tiny"] {
        let two = PeftAdapter::load(&fixture_dir(name).join("adapter"), &Device::Cpu).unwrap();
        let one = PeftAdapter::load(&fixture_dir(name).join("adapter-encoder-only"), &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&two.prompt, &one.prompt), 0.0);
    }
}

#[test]
fn written_adapters_have_pefts_file_format_and_load_back() {
    let tmp = tempdir();
    let tmp = tmp.path();
    for name in MODELS {
        let model = load_model(&fixture_dir(name), &Device::Cpu).unwrap();
        let info = model.backbone.info();
        let prompt = Tensor::randn(0f32, 1.0, (5, 32), &Device::Cpu).unwrap();
        let out = tmp.join(name);
        PeftAdapter::new(AdapterConfig::new(info, 5, "RANDOM"), prompt.clone())
            .unwrap()
            .save(&out)
            .unwrap();
        // Same config keys as PEFT's own file, same tensor name, dtype and row layout.
        let peft_dir = fixture_dir(name).join("adapter");
        assert_eq!(
            json_keys(&out.join("adapter_config.json")),
            json_keys(&peft_dir.join("adapter_config.json")),
            "{name}: config keys"
        );
        let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        let theirs = candle_core::safetensors::load(peft_dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
        let (a, b) = (&ours["prompt_embeddings"], &theirs["prompt_embeddings"]);
        assert_eq!(a.dims(), b.dims(), "{name}: [N * submodules, D]");
        assert_eq!(a.dtype(), DType::F32);
        let ours_cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        let theirs_cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap()).unwrap();
        for key in ["peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_layers", "num_attention_heads"] {
            assert_eq!(ours_cfg[key], theirs_cfg[key], "{name}: {key}");
        }
        let back = PeftAdapter::load(&out, &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&back.prompt, &prompt), 0.0);
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}

#[test]
fn an_adapter_for_another_model_is_a_clear_error() {
    let llama = load_model(&fixture_dir("llama-tiny"), &Device::Cpu).unwrap();
    let t5_dir = fixture_dir("t5-tiny").join("adapter");
    let a = PeftAdapter::load(&t5_dir, &Device::Cpu).unwrap();
    let err = a.validate(llama.backbone.info(), &t5_dir).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json") && err.contains("task_type"), "{err}");

    // token_dim that does not match the model.
    let tmp = tempdir();
    let tmp = tmp.path();
    let dir = tmp.join("wide");
    copy_dir(&fixture_dir("llama-tiny").join("adapter"), &dir);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    cfg["token_dim"] = 64.into();
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let err = PeftAdapter::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors") && err.contains("[5, 32]"), "{err}");
}

#[test]
fn corrupt_adapter_files_are_errors_naming_the_file() {
    let tmp = tempdir();
    let tmp = tmp.path();
    let src = fixture_dir("gpt2-tiny").join("adapter");

    let dir = tmp.join("truncated");
    copy_dir(&src, &dir);
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = PeftAdapter::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let dir = tmp.join("wrong-name");
    copy_dir(&src, &dir);
    let t = Tensor::zeros((5, 32), DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("weight", t)]), dir.join("adapter_model.safetensors")).unwrap();
    let err = PeftAdapter::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("prompt_embeddings"), "{err}");

    let dir = tmp.join("bad-json");
    copy_dir(&src, &dir);
    std::fs::write(dir.join("adapter_config.json"), "{\"peft_type\": \"PROMPT_TUNING\"").unwrap();
    let err = PeftAdapter::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json"), "{err}");

    let dir = tmp.join("lora");
    copy_dir(&src, &dir);
    std::fs::write(dir.join("adapter_config.json"), "{\"peft_type\": \"LORA\", \"num_virtual_tokens\": 5, \"token_dim\": 32}").unwrap();
    let err = PeftAdapter::load(&dir, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("peft_type") && err.contains("LORA"), "{err}");
}

