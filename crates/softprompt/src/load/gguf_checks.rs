//! Checks of a GGUF file's tensor table, made before any tensor is decoded:
//!
//! * every tensor has elements and lies inside the file (catches truncated downloads);
//! * no two tensors' bytes overlap (a crafted file could otherwise make one region decode
//!   as many tensors);
//! * every tensor is one the architecture takes, with the shape its config implies, so the
//!   bytes decoded are exactly what the config implies.
//!
//! The last check needs no list per family: the family's own builder runs on placeholder
//! tensors of the file's shapes (broadcast views of one zero: no memory) through a
//! [`Weights`] table that records what it took. The builder refuses missing tensors and
//! wrong shapes as it always does; whatever it did not take is refused here.

use super::Weights;
use crate::{Error, Result};
use candle_core::quantized::gguf_file::{Content, TensorInfo};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// `[start, end)` of a tensor's bytes in the file; `None` when its size overflows or its
/// element count is not a whole number of blocks.
fn extent(content: &Content, info: &TensorInfo) -> Option<(u64, u64)> {
    let elems = info.shape.dims().iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))?;
    let (block, type_size) = (info.ggml_dtype.block_size() as u64, info.ggml_dtype.type_size() as u64);
    if block == 0 || elems % block != 0 {
        return None;
    }
    let bytes = (elems / block).checked_mul(type_size)?;
    let start = content.tensor_data_offset.checked_add(info.offset)?;
    Some((start, start.checked_add(bytes)?))
}

/// Every tensor has elements and lies inside the file; no two overlap.
pub(crate) fn check_extents(path: &Path, content: &Content, file_size: u64) -> Result<()> {
    let mut extents: Vec<(u64, u64, &str)> = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let dims = info.shape.dims();
        // An empty tensor is no model weight (and candle's decoder would build a slice from
        // the dangling pointer of an empty buffer).
        if dims.contains(&0) {
            return Err(Error::format(
                path,
                format!("not a valid GGUF file: tensor `{name}` has no elements (shape {dims:?})"),
            ));
        }
        let Some((start, end)) = extent(content, info) else {
            return Err(Error::format(path, format!("not a valid GGUF file: tensor `{name}` has a bad shape {dims:?}")));
        };
        if end > file_size {
            return Err(Error::format(
                path,
                format!("GGUF file is truncated: tensor `{name}` ends at byte {end}, the file has {file_size}"),
            ));
        }
        extents.push((start, end, name));
    }
    extents.sort();
    for pair in extents.windows(2) {
        let [(_, end_a, a), (start_b, _, b)] = pair else { continue };
        if start_b < end_a {
            return Err(Error::format(
                path,
                format!("not a valid GGUF file: the bytes of tensors `{a}` and `{b}` overlap"),
            ));
        }
    }
    Ok(())
}

/// Every tensor is taken by the family's builder with its file shape (module doc). `rename`
/// maps a GGUF tensor name to the name the builder asks for (`None`: a tensor the loader does
/// not know); `build` is the family's builder with the config parsed from the metadata.
pub(crate) fn check_referenced<T>(
    path: &Path,
    content: &Content,
    rename: impl Fn(&str) -> Option<String>,
    build: impl FnOnce(&Weights) -> Result<T>,
) -> Result<()> {
    let arch = match content.metadata.get("general.architecture") {
        Some(candle_core::quantized::gguf_file::Value::String(a)) => a.as_str(),
        _ => "?",
    };
    let not_used = |name: &str| Error::format(path, format!("tensor `{name}` is not used by the model's architecture (`{arch}`)"));
    let zero = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let mut placeholders: HashMap<String, Tensor> = HashMap::with_capacity(content.tensor_infos.len());
    let mut gguf_names: HashMap<String, &str> = HashMap::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let Some(renamed) = rename(name) else {
            return Err(not_used(name));
        };
        if let Some(other) = gguf_names.insert(renamed.clone(), name) {
            return Err(Error::format(path, format!("tensors `{other}` and `{name}` are the same weight")));
        }
        placeholders.insert(renamed, zero.broadcast_as(info.shape.dims())?); // no memory
    }
    let weights = Weights::new(placeholders, path);
    build(&weights)?;
    if let Some(unused) = weights.untaken().first() {
        let name = gguf_names.get(unused.as_str()).copied().unwrap_or(unused.as_str());
        return Err(not_used(name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::Error;
    use candle_core::quantized::gguf_file::{self, Content};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use std::path::{Path, PathBuf};

    /// The tiny Llama GGUF of the fuzz seeds (2 layers, hidden size 8).
    fn seed() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/gguf/tiny_f32_f16.gguf")
    }

    /// The seed written again with `extra` tensors added, tensors in name order; returns the
    /// bytes and the tensor names in file order.
    fn rewrite(extra: Vec<(&str, QTensor)>) -> (Vec<u8>, Vec<String>) {
        let mut file = std::fs::File::open(seed()).unwrap();
        let content = Content::read(&mut file).unwrap();
        let mut tensors: Vec<(String, QTensor)> = content
            .tensor_infos
            .keys()
            .map(|n| (n.clone(), content.tensor(&mut file, n, &Device::Cpu).unwrap()))
            .collect();
        tensors.extend(extra.into_iter().map(|(n, t)| (n.to_string(), t)));
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut out = std::io::Cursor::new(Vec::new());
        gguf_file::write(&mut out, &metadata, &refs).unwrap();
        (out.into_inner(), tensors.into_iter().map(|(n, _)| n).collect())
    }

    fn load(bytes: &[u8]) -> crate::Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        crate::load::gguf::load(&path, &Device::Cpu).map(drop)
    }

    fn message(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn the_seed_rewritten_loads() {
        let (bytes, _) = rewrite(vec![]);
        load(&bytes).unwrap();
    }

    /// A tensor the architecture does not take is refused, named, before decoding: here one
    /// of a layer past `block_count`, and one the loader has no name for.
    #[test]
    fn tensors_the_architecture_does_not_take_are_refused() {
        let t = || QTensor::quantize(&Tensor::zeros((8, 8), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        let (bytes, _) = rewrite(vec![("blk.5.attn_q.weight", t())]);
        let e = message(load(&bytes).unwrap_err());
        assert!(e.contains("`blk.5.attn_q.weight` is not used"), "{e}");
        let (bytes, _) = rewrite(vec![("rope_freqs.weight", t())]);
        let e = message(load(&bytes).unwrap_err());
        assert!(e.contains("`rope_freqs.weight` is not used"), "{e}");
    }

    /// Two tensors pointing at the same bytes are refused.
    #[test]
    fn overlapping_tensors_are_refused() {
        let (mut bytes, names) = rewrite(vec![]);
        // The second tensor's info: name (u64 length + bytes), n_dims (u32), dims (u64 each),
        // type (u32), offset (u64); point its offset at the first tensor's data (offset 0).
        let second = names[1].as_bytes();
        let mut key = (second.len() as u64).to_le_bytes().to_vec();
        key.extend_from_slice(second);
        let at = bytes.windows(key.len()).position(|w| w == key.as_slice()).unwrap() + key.len();
        let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let offset_at = at + 4 + 8 * n_dims + 4;
        assert_ne!(u64::from_le_bytes(bytes[offset_at..offset_at + 8].try_into().unwrap()), 0);
        bytes[offset_at..offset_at + 8].copy_from_slice(&0u64.to_le_bytes());
        let e = message(load(&bytes).unwrap_err());
        assert!(e.contains("overlap"), "{e}");
        assert!(e.contains(&names[0]) && e.contains(&names[1]), "{e}");
    }
}
