//! A named set of frozen weight tensors, with errors that name the file and the tensor.

use crate::kernels::weight::FrozenWeight;
use crate::{Error, Result};
use super::WeightStorage;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Matrices kept in their GGUF encoding ([`Weights::get_frozen`]; [`Weights::get`]
    /// dequantises them).
    stored: HashMap<String, Arc<QTensor>>,
    /// File (or folder) the tensors came from, for error messages.
    source: PathBuf,
    /// Names a family asked for ([`Weights::get`]): what the architecture references.
    taken: Mutex<BTreeSet<String>>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Weights {
            tensors,
            stored: HashMap::new(),
            source: source.into(),
            taken: Mutex::new(BTreeSet::new()),
        }
    }

    /// The table with `stored` matrices added (kept in their file encoding).
    pub fn with_stored(self, stored: HashMap<String, Arc<QTensor>>) -> Self {
        Weights { stored, ..self }
    }

    /// The names no [`Weights::get`] asked for, sorted: tensors the model does not use.
    pub fn untaken(&self) -> Vec<&String> {
        let taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = self.names().filter(|n| !taken.contains(*n)).collect();
        names.sort();
        names
    }

    /// Reads one or more safetensors files as f32 on `device`.
    pub fn from_safetensors(files: &[PathBuf], device: &Device) -> Result<Self> {
        Self::from_safetensors_with(files, device, WeightStorage::F32)
    }

    /// Reads one or more safetensors files; with [`WeightStorage::Stored`] on the CPU, bf16
    /// and f16 matrices stay in half precision (stored, decoded on use), everything else is
    /// f32 on `device`.
    pub fn from_safetensors_with(files: &[PathBuf], device: &Device, storage: WeightStorage) -> Result<Self> {
        let keep_half = storage == WeightStorage::Stored && device.is_cpu();
        let mut tensors = HashMap::new();
        let mut stored = HashMap::new();
        for file in files {
            let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::format(file, format!("not a valid safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let bad = |e: candle_core::Error| Error::format(file, format!("tensor `{name}`: {e}"));
                let t = candle_core::safetensors::Load::load(&view, device).map_err(bad)?;
                let half = match t.dtype() {
                    DType::BF16 => Some(GgmlDType::BF16),
                    DType::F16 => Some(GgmlDType::F16),
                    _ => None,
                };
                match half {
                    // Half -> f32 -> half is exact: the stored values are the file's.
                    Some(h) if keep_half && t.rank() == 2 => {
                        let q = QTensor::quantize(&t, h).map_err(bad)?;
                        stored.insert(name, Arc::new(q));
                    }
                    _ => {
                        tensors.insert(name, t.to_dtype(DType::F32)?);
                    }
                }
            }
        }
        let source = match files {
            [one] => one.clone(),
            _ => files.first().and_then(|f| f.parent()).map(Path::to_path_buf).unwrap_or_default(),
        };
        Ok(Weights::new(tensors, source).with_stored(stored))
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.stored.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys().chain(self.stored.keys())
    }

    /// The tensor `name`, which must have exactly `shape` (a stored matrix is dequantised to
    /// f32: for the few tensors a model reads whole, such as norms).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self.get_frozen(name, shape)? {
            FrozenWeight::Dense(t) => Ok(t),
            stored => stored.to_f32().map_err(|e| self.decode_error(name, e)),
        }
    }

    /// The matrix `name` as the layers hold it: stored blocks when the file's encoding is
    /// kept, else the tensor. It must have exactly `shape`.
    pub fn get_frozen(&self, name: &str, shape: &[usize]) -> Result<FrozenWeight> {
        let (weight, dims) = if let Some(t) = self.tensors.get(name) {
            (FrozenWeight::Dense(t.clone()), t.dims().to_vec())
        } else if let Some(q) = self.stored.get(name) {
            let dims = q.shape().dims().to_vec();
            let w = FrozenWeight::stored(q.clone()).map_err(|e| self.decode_error(name, e))?;
            (w, dims)
        } else {
            return Err(Error::format(&self.source, format!("missing tensor `{name}`")));
        };
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        if dims != shape {
            return Err(Error::format(
                &self.source,
                format!("tensor `{name}` has shape {dims:?}, expected {shape:?}"),
            ));
        }
        Ok(weight)
    }

    fn decode_error(&self, name: &str, e: candle_core::Error) -> Error {
        Error::format(&self.source, format!("tensor `{name}`: {e}"))
    }

    /// Like [`Weights::get`] but `None` when absent.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Like [`Weights::get_frozen`] but `None` when absent.
    pub fn get_frozen_opt(&self, name: &str, shape: &[usize]) -> Result<Option<FrozenWeight>> {
        if self.contains(name) {
            self.get_frozen(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Removes and returns all tensors (e.g. to turn them into trainable variables); stored
    /// matrices are not among them (model tuning loads f32 weights).
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}
