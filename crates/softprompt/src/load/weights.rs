//! A named set of frozen weight tensors, with errors that name the file and the tensor.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// File (or folder) the tensors came from, for error messages.
    source: PathBuf,
    /// Names a family asked for ([`Weights::get`]): what the architecture references.
    taken: Mutex<BTreeSet<String>>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Weights {
            tensors,
            source: source.into(),
            taken: Mutex::new(BTreeSet::new()),
        }
    }

    /// The names no [`Weights::get`] asked for, sorted: tensors the model does not use.
    pub fn untaken(&self) -> Vec<&String> {
        let taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<&String> = self.tensors.keys().filter(|n| !taken.contains(*n)).collect();
        names.sort();
        names
    }

    /// Reads one or more safetensors files (memory-mapped) as f32 on `device`.
    pub fn from_safetensors(files: &[PathBuf], device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in files {
            let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| Error::format(file, format!("not a valid safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let t = candle_core::safetensors::Load::load(&view, device)
                    .map_err(|e| Error::format(file, format!("tensor `{name}`: {e}")))?;
                tensors.insert(name, t.to_dtype(DType::F32)?);
            }
        }
        let source = match files {
            [one] => one.clone(),
            _ => files.first().and_then(|f| f.parent()).map(Path::to_path_buf).unwrap_or_default(),
        };
        Ok(Weights::new(tensors, source))
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::format(&self.source, format!("missing tensor `{name}`")))?;
        self.taken.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string());
        if t.dims() != shape {
            return Err(Error::format(
                &self.source,
                format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims()),
            ));
        }
        Ok(t.clone())
    }

    /// Like [`Weights::get`] but `None` when absent.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Removes and returns all tensors (e.g. to turn them into trainable variables).
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}
