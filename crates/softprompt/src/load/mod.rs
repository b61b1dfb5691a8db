//! Loading a frozen model from what users have: a Hugging Face model folder or a GGUF file.

pub(crate) mod export;
pub mod gguf;
mod gguf_bpe;
mod gguf_checks;
mod gguf_spm;
pub mod hf;
mod weights;

pub use weights::Weights;
pub use crate::kernels::weight::FrozenWeight;

use crate::model::Backbone;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// A frozen backbone with its tokenizer (absent for folders without `tokenizer.json`).
pub struct Model {
    pub backbone: Backbone,
    pub tokenizer: Option<Tokenizer>,
    pub path: PathBuf,
    /// Where the weights live.
    pub device: Device,
}

impl Model {
    /// The tokenizer, or an error naming the model path when it has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::format(&self.path, "model has no tokenizer (tokenizer.json is missing)")
        })
    }
}

/// How a loaded model keeps its frozen matrices (`--weights`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum WeightStorage {
    /// As the file stores them (GGUF blocks; bf16/f16 safetensors matrices in half
    /// precision), dequantised one matrix at a time when a product runs; same results as
    /// `f32`, a fraction of the memory. On the CPU only (another device loads f32).
    #[default]
    Stored,
    /// Every weight dequantised to f32 at load (the reference path).
    F32,
}

/// Loads `path`: a `.gguf` file, or a folder with `config.json` + safetensors weights,
/// keeping the frozen matrices as stored ([`WeightStorage::Stored`]).
pub fn load_model(path: &Path, device: &Device) -> Result<Model> {
    load_model_with(path, device, WeightStorage::default())
}

/// [`load_model`] with the weights kept as `storage` says.
pub fn load_model_with(path: &Path, device: &Device, storage: WeightStorage) -> Result<Model> {
    if path.is_dir() {
        hf::load_with(path, device, storage)
    } else if path.is_file() {
        gguf::load_with(path, device, storage)
    } else {
        Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file or folder"),
        ))
    }
}

/// Name recorded as `base_model_name_or_path`: the folder or file name without extension.
pub fn model_name(path: &Path) -> String {
    let p = if path.extension().is_some_and(|e| e == "gguf") {
        path.file_stem()
    } else {
        path.file_name()
    };
    p.map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
