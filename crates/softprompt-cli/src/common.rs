//! Helpers shared by the subcommands: resolving and loading models and prompts.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use softprompt::eval::adapters::AdapterSet;
use softprompt::load::{load_model_with, Model, WeightStorage};
use std::path::{Path, PathBuf};

/// `--model`: a path, or the name of a model `softprompt fetch` knows (fetched on first use).
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    match fetch_known(spec)? {
        Some(path) => Ok(path),
        None => anyhow::bail!("{spec}: no such model file or folder (known names: {KNOWN_MODELS})"),
    }
}

/// The names `softprompt fetch` and `--model` know.
pub const KNOWN_MODELS: &str = "smollm2, gemma3-270m";

/// The model `name` fetches (downloaded and verified on first use; Gemma's terms are shown
/// then), or `None` for an unknown name.
pub fn fetch_known(name: &str) -> Result<Option<PathBuf>> {
    Ok(match name {
        "smollm2" => Some(softprompt::fetch::smollm2()?),
        "gemma3-270m" => {
            let fetched = softprompt::fetch::gemma3_270m()?;
            if let Some(terms) = fetched.new_terms {
                eprintln!(
                    "Gemma 3 is provided under and subject to the Gemma Terms of Use \
                     (https://ai.google.dev/gemma/terms); a copy is at {}. Using the model means \
                     accepting them.",
                    terms.display()
                );
            }
            Some(fetched.path)
        }
        _ => None,
    })
}

pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return Ok(d);
        }
    }
    Ok(Device::Cpu)
}

/// Loads `--model`, its frozen weights kept as `weights` says (`--weights`).
pub fn load(spec: &str, device: &Device, weights: WeightStorage) -> Result<Model> {
    let path = resolve_model(spec)?;
    load_model_with(&path, device, weights).with_context(|| format!("loading model {}", path.display()))
}

/// [`load`] for generation and serving: with stored weights, generation steps multiply the
/// quantised blocks directly (`Kernels::quantized_decode`; scoring and classification stay
/// on the exact path).
pub fn load_generating(spec: &str, device: &Device, weights: WeightStorage) -> Result<Model> {
    let mut model = load(spec, device, weights)?;
    if weights == WeightStorage::Stored {
        let kernels = model.backbone.kernels().with_quantized_decode(true);
        model.backbone.set_kernels(kernels);
    }
    Ok(model)
}

/// Loads a PEFT adapter folder, checked against the model, as the model sees it before the
/// input (after BOS when its `task.json` says it was trained so). Returns the prefix `[N, D]`
/// (`[N+1, D]` after BOS).
pub fn load_prompt(dir: Option<&Path>, model: &mut Model) -> Result<Option<Tensor>> {
    let Some(dir) = dir else { return Ok(None) };
    let adapters = AdapterSet::read(&[dir.to_path_buf()])?;
    Ok(adapters.load_prompts(model)?.pop())
}
