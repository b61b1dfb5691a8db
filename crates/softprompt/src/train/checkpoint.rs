//! Training checkpoints: `OUTPUT/checkpoint/checkpoint.safetensors`, ONE file holding
//! everything a run needs to continue exactly where it stopped:
//!
//! * tensors: `prompt` (the current prompt `[N, D]`), `best_prompt` (the prompt with the best
//!   dev loss so far, when there is one), `optimizer.<key>` (the optimizer's state tensors);
//! * metadata key `softprompt.checkpoint`: a JSON object with the step, the data position
//!   (epoch and batch index: the data order of an epoch depends only on the seed and the
//!   epoch, so nothing else is needed), the best dev loss and its step, the early-stopping
//!   counter, the optimizer's scalars and the hash of the configuration that wrote it.
//!
//! The baselines (P-tuning, model tuning) write a [`ParamsCheckpoint`] to the same file in the
//! same format, with their trained tensors by name (`param.<name>`) instead of `prompt` and the
//! method's name in the JSON (`"method"`, absent from prompt-tuning checkpoints).
//!
//! Floating-point values in the JSON are stored as the hex of their bits, so they come back
//! exactly. The file is written with [`write_atomic`]: a reader sees the previous checkpoint
//! or the new one, never a mix or a half-written file.

use crate::fsutil::write_atomic;
use crate::train::optim::OptimizerState;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const DIR: &str = "checkpoint";
pub const FILE: &str = "checkpoint.safetensors";
const METADATA_KEY: &str = "softprompt.checkpoint";
const FORMAT_VERSION: u32 = 1;
const OPTIMIZER_PREFIX: &str = "optimizer.";
const PARAM_PREFIX: &str = "param.";

/// The best dev result seen so far.
#[derive(Clone, Debug)]
pub struct Best {
    pub dev_loss: f64,
    pub step: usize,
    /// `[N, D]`
    pub prompt: Tensor,
}

/// The whole state of a run between two steps.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within that epoch's order.
    pub position: usize,
    /// `[N, D]` f32
    pub prompt: Tensor,
    pub optimizer: OptimizerState,
    pub best: Option<Best>,
    /// Evaluations since the best one (for early stopping).
    pub evals_since_best: usize,
    /// The run stopped early (patience exhausted); resuming it does nothing more.
    pub stopped_early: bool,
    /// Hash of the configuration and data that produced this state.
    pub config_hash: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    step: usize,
    epoch: usize,
    position: usize,
    best_dev_loss: Option<String>,
    best_step: Option<usize>,
    evals_since_best: usize,
    stopped_early: bool,
    config_hash: String,
    optimizer_scalars: BTreeMap<String, String>,
    /// The baseline that wrote a [`ParamsCheckpoint`]; absent for prompt tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
}

fn f64_to_hex(v: f64) -> String {
    format!("{:016x}", v.to_bits())
}

fn hex_to_f64(s: &str, path: &Path, what: &str) -> Result<f64> {
    u64::from_str_radix(s, 16).map(f64::from_bits).map_err(|_| {
        Error::format(
            path,
            format!("checkpoint: `{what}` = `{s}` is not a hex float"),
        )
    })
}

/// `OUTPUT/checkpoint/checkpoint.safetensors`
pub fn path(output: &Path) -> PathBuf {
    output.join(DIR).join(FILE)
}

impl Checkpoint {
    /// Serialises the checkpoint into the bytes of one safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = Header {
            version: FORMAT_VERSION,
            step: self.step,
            epoch: self.epoch,
            position: self.position,
            best_dev_loss: self.best.as_ref().map(|b| f64_to_hex(b.dev_loss)),
            best_step: self.best.as_ref().map(|b| b.step),
            evals_since_best: self.evals_since_best,
            stopped_early: self.stopped_early,
            config_hash: self.config_hash.clone(),
            optimizer_scalars: scalars_to_hex(&self.optimizer),
            method: None,
        };
        let mut tensors: Vec<(String, Tensor)> = vec![("prompt".into(), cpu_f32(&self.prompt)?)];
        if let Some(best) = &self.best {
            tensors.push(("best_prompt".into(), cpu_f32(&best.prompt)?));
        }
        serialize(&header, tensors, &self.optimizer)
    }

    /// Parses bytes written by [`Checkpoint::to_bytes`]; `path` names the file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let bad = |msg: String| Error::format(path, format!("checkpoint: {msg}"));
        let (header, st) = parse(bytes, path)?;
        if let Some(method) = &header.method {
            return Err(bad(format!(
                "this is the checkpoint of a {method} run, not of prompt tuning \
                 (resume it with --method {method}, or choose another output folder)"
            )));
        }
        let load = |name: &str| load_tensor(&st, name, path, device);
        let prompt = load("prompt")?;
        let best = match (header.best_dev_loss.as_deref(), header.best_step) {
            (Some(loss), Some(step)) => Some(Best {
                dev_loss: hex_to_f64(loss, path, "best_dev_loss")?,
                step,
                prompt: load("best_prompt")?,
            }),
            (None, None) => None,
            _ => {
                return Err(bad(
                    "best_dev_loss and best_step must be given together".into()
                ))
            }
        };
        let optimizer = load_optimizer(&header, &st, path, device)?;
        Ok(Checkpoint {
            step: header.step,
            epoch: header.epoch,
            position: header.position,
            prompt,
            optimizer,
            best,
            evals_since_best: header.evals_since_best,
            stopped_early: header.stopped_early,
            config_hash: header.config_hash,
        })
    }

    /// Writes `OUTPUT/checkpoint/checkpoint.safetensors` atomically.
    pub fn save(&self, output: &Path) -> Result<()> {
        write_atomic(&path(output), &self.to_bytes()?)
    }

    /// Reads the checkpoint of `output`, or `None` when there is none.
    pub fn load(output: &Path, device: &Device) -> Result<Option<Self>> {
        let p = path(output);
        read_if_present(&p)?
            .map(|bytes| Self::from_bytes(&bytes, &p, device))
            .transpose()
    }
}

/// The state of a baseline run (P-tuning, model tuning) between two steps: its trained tensors
/// by name, the optimizer's state and the data position (see the module doc). Stored in the
/// same file and format as a [`Checkpoint`]; each kind refuses to read the other's.
#[derive(Clone, Debug)]
pub struct ParamsCheckpoint {
    /// The baseline that wrote it (`"p-tuning"`, `"model-tuning"`).
    pub method: String,
    /// Optimizer steps done.
    pub step: usize,
    /// Epoch of the next batch.
    pub epoch: usize,
    /// Index of the next batch within that epoch's order.
    pub position: usize,
    /// The trained tensors, by name, in their own dtype.
    pub params: Vec<(String, Tensor)>,
    pub optimizer: OptimizerState,
    /// Hash of the configuration and data that produced this state.
    pub config_hash: String,
}

impl ParamsCheckpoint {
    /// Serialises the checkpoint into the bytes of one safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = Header {
            version: FORMAT_VERSION,
            step: self.step,
            epoch: self.epoch,
            position: self.position,
            best_dev_loss: None,
            best_step: None,
            evals_since_best: 0,
            stopped_early: false,
            config_hash: self.config_hash.clone(),
            optimizer_scalars: scalars_to_hex(&self.optimizer),
            method: Some(self.method.clone()),
        };
        let tensors = self
            .params
            .iter()
            .map(|(n, t)| Ok((format!("{PARAM_PREFIX}{n}"), t.to_device(&Device::Cpu)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        serialize(&header, tensors, &self.optimizer)
    }

    /// Parses bytes written by [`ParamsCheckpoint::to_bytes`]; `path` names the file in errors.
    /// The params come back sorted by name.
    pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Self> {
        let (header, st) = parse(bytes, path)?;
        let Some(method) = header.method.clone() else {
            return Err(Error::format(
                path,
                "checkpoint: this is the checkpoint of a prompt-tuning run (resume it with \
                 --method prompt-tuning, or choose another output folder)",
            ));
        };
        let mut names: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| n.starts_with(PARAM_PREFIX))
            .map(|n| n.to_string())
            .collect();
        names.sort();
        let mut params = Vec::with_capacity(names.len());
        for name in names {
            let key = &name[PARAM_PREFIX.len()..];
            params.push((key.to_string(), load_tensor(&st, &name, path, device)?));
        }
        let optimizer = load_optimizer(&header, &st, path, device)?;
        Ok(ParamsCheckpoint {
            method,
            step: header.step,
            epoch: header.epoch,
            position: header.position,
            params,
            optimizer,
            config_hash: header.config_hash,
        })
    }

    /// Writes `OUTPUT/checkpoint/checkpoint.safetensors` atomically.
    pub fn save(&self, output: &Path) -> Result<()> {
        write_atomic(&path(output), &self.to_bytes()?)
    }

    /// Reads the checkpoint of `output`, or `None` when there is none.
    pub fn load(output: &Path, device: &Device) -> Result<Option<Self>> {
        let p = path(output);
        read_if_present(&p)?
            .map(|bytes| Self::from_bytes(&bytes, &p, device))
            .transpose()
    }
}

/// The bytes of the file `path`, or `None` when there is none.
fn read_if_present(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn scalars_to_hex(optimizer: &OptimizerState) -> BTreeMap<String, String> {
    optimizer
        .scalars
        .iter()
        .map(|(k, v)| (k.clone(), f64_to_hex(*v)))
        .collect()
}

/// One safetensors file: `tensors`, the optimizer's tensors (`optimizer.<key>`), and `header`
/// as JSON metadata.
fn serialize(
    header: &Header,
    mut tensors: Vec<(String, Tensor)>,
    optimizer: &OptimizerState,
) -> Result<Vec<u8>> {
    let json = serde_json::to_string(header)
        .map_err(|e| Error::invalid(format!("checkpoint header: {e}")))?;
    for (k, t) in &optimizer.tensors {
        tensors.push((
            format!("{OPTIMIZER_PREFIX}{k}"),
            t.to_device(&Device::Cpu)?.contiguous()?,
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = HashMap::from([
        (METADATA_KEY.to_string(), json),
        ("format".to_string(), "pt".to_string()),
    ]);
    safetensors::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(metadata))
        .map_err(|e| Error::invalid(format!("checkpoint: cannot serialise: {e}")))
}

/// The header and tensors of a checkpoint file's bytes.
fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<(Header, safetensors::SafeTensors<'a>)> {
    let bad = |msg: String| Error::format(path, format!("checkpoint: {msg}"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| {
            bad(format!(
                "no `{METADATA_KEY}` metadata: not a softprompt checkpoint"
            ))
        })?;
    let header: Header =
        serde_json::from_str(json).map_err(|e| bad(format!("bad state JSON: {e}")))?;
    if header.version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} (this build reads {FORMAT_VERSION})",
            header.version
        )));
    }
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    Ok((header, st))
}

fn load_tensor(
    st: &safetensors::SafeTensors<'_>,
    name: &str,
    path: &Path,
    device: &Device,
) -> Result<Tensor> {
    let bad = |msg: String| Error::format(path, format!("checkpoint: {msg}"));
    let view = st
        .tensor(name)
        .map_err(|_| bad(format!("missing tensor `{name}`")))?;
    candle_core::safetensors::Load::load(&view, device)
        .map_err(|e| bad(format!("tensor `{name}`: {e}")))
}

fn load_optimizer(
    header: &Header,
    st: &safetensors::SafeTensors<'_>,
    path: &Path,
    device: &Device,
) -> Result<OptimizerState> {
    let mut optimizer = OptimizerState::default();
    for name in st.names() {
        if let Some(key) = name.strip_prefix(OPTIMIZER_PREFIX) {
            optimizer
                .tensors
                .insert(key.to_string(), load_tensor(st, name, path, device)?);
        }
    }
    for (k, v) in &header.optimizer_scalars {
        optimizer.scalars.insert(k.clone(), hex_to_f64(v, path, k)?);
    }
    Ok(optimizer)
}

fn cpu_f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .contiguous()?)
}
