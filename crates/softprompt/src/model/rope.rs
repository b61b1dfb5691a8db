//! Rotary position frequencies: plain RoPE and the scaled variants transformers applies to
//! Llama-layout models (`linear`, `dynamic` NTK, `llama3`), read from a Hugging Face config
//! (`rope_parameters` in transformers 5, `rope_scaling` in 4.x) or from a GGUF file (the
//! `rope_freqs` tensor of per-frequency divisors and `rope.scaling.*` metadata).
//!
//! Any other variant, and any field of a variant this file does not read, is an error naming
//! it: a model never runs with part of its position scheme ignored.

use crate::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The widest head the constructors accept: the frequencies are built from the config
/// before any weight shows the real width, and a crafted `head_dim` must not allocate
/// without bound.
pub const MAX_HEAD_DIM: usize = 1 << 16;

/// How the inverse frequencies `[Dh/2]` of the rotation are obtained.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeFrequencies {
    /// The same at every sequence length (plain, `linear`, `llama3`, GGUF divisors).
    Fixed(Vec<f32>),
    /// transformers' dynamic NTK: past `max_positions` the base grows with the length of the
    /// sequence (`theta * (factor * len / max - (factor - 1)) ^ (Dh / (Dh - 2))`).
    /// transformers keeps the largest base it has seen in the module; here the base follows
    /// the length of each forward pass (the same when lengths only grow, as in generation).
    DynamicNtk {
        head_dim: usize,
        theta: f64,
        factor: f64,
        max_positions: usize,
    },
}

/// Plain RoPE's inverse frequencies `theta^(-2i/Dh)`, rounded to f32 as transformers does.
pub fn plain_inv_freq(head_dim: usize, theta: f64) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect()
}

impl RopeFrequencies {
    /// Plain RoPE with base `theta`.
    pub fn plain(head_dim: usize, theta: f64) -> Self {
        RopeFrequencies::Fixed(plain_inv_freq(head_dim, theta))
    }

    /// The inverse frequencies `[Dh/2]` for a forward pass whose last position is `seq_len - 1`.
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        match self {
            RopeFrequencies::Fixed(f) => f.clone(),
            RopeFrequencies::DynamicNtk {
                head_dim,
                theta,
                factor,
                max_positions,
            } => {
                let (len, max) = (seq_len.max(*max_positions) as f64, *max_positions as f64);
                let dim = *head_dim as f64;
                let base = theta * (factor * len / max - (factor - 1.0)).powf(dim / (dim - 2.0));
                plain_inv_freq(*head_dim, base)
            }
        }
    }

    /// Whether a key rotated for position `j` becomes the key of position `j + by` by one more
    /// rotation (what moving a KV cache needs): not when the frequencies follow the length.
    pub fn shift_invariant(&self) -> bool {
        matches!(self, RopeFrequencies::Fixed(_))
    }

    /// From a Hugging Face config: `sections` are the config's `rope_scaling` and
    /// `rope_parameters` objects (either may be absent or null; a field of the later one wins),
    /// `theta` the base, `max_positions` its `max_position_embeddings`. Errors name `source`
    /// and the field.
    pub fn from_hf(
        source: &Path,
        sections: [(&str, Option<&Value>); 2],
        theta: f64,
        head_dim: usize,
        max_positions: Option<usize>,
    ) -> Result<Self> {
        if head_dim > MAX_HEAD_DIM {
            return Err(Error::config(
                source,
                "head_dim",
                format!("{head_dim} is wider than the largest supported ({MAX_HEAD_DIM})"),
            ));
        }
        let fields = RopeFields::collect(source, sections)?;
        let kind = fields.kind()?;
        let allowed: &[&str] = match kind.as_str() {
            "default" => &[],
            "linear" | "dynamic" => &["factor"],
            "llama3" => &[
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ],
            other => {
                let (section, _) = fields.type_field();
                return Err(Error::config(
                    source,
                    section,
                    format!(
                        "unsupported rope type `{other}` (supported: default, linear, dynamic, llama3)"
                    ),
                ));
            }
        };
        fields.check_known(allowed, &kind)?;
        let plain = plain_inv_freq(head_dim, theta);
        Ok(match kind.as_str() {
            "default" => RopeFrequencies::Fixed(plain),
            "linear" => {
                let factor = fields.positive("factor")? as f32;
                RopeFrequencies::Fixed(plain.iter().map(|f| f / factor).collect())
            }
            "dynamic" => {
                let factor = fields.positive("factor")?;
                if factor < 1.0 || head_dim <= 2 {
                    return Err(fields.error(
                        "factor",
                        format!("dynamic NTK needs factor >= 1 and head_dim > 2 (factor {factor}, head_dim {head_dim})"),
                    ));
                }
                let max_positions = match max_positions {
                    Some(m) if m > 0 => m,
                    _ => {
                        return Err(Error::config(
                            source,
                            "max_position_embeddings",
                            "dynamic NTK rope scaling needs a positive max_position_embeddings",
                        ))
                    }
                };
                RopeFrequencies::DynamicNtk {
                    head_dim,
                    theta,
                    factor,
                    max_positions,
                }
            }
            _ => RopeFrequencies::Fixed(llama3_inv_freq(&plain, &fields)?),
        })
    }

    /// From a GGUF file: `divisors` (the `rope_freqs` tensor, `[Dh/2]`, llama.cpp divides each
    /// frequency by its entry; how llama3 scaling is stored) and a linear `factor`
    /// (`rope.scaling.factor`, 1 for none).
    pub fn from_gguf(
        source: &Path,
        head_dim: usize,
        theta: f64,
        divisors: Option<&[f32]>,
        factor: f64,
    ) -> Result<Self> {
        if head_dim > MAX_HEAD_DIM {
            return Err(Error::format(
                source,
                format!(
                    "head width {head_dim} is wider than the largest supported ({MAX_HEAD_DIM})"
                ),
            ));
        }
        let mut freqs = plain_inv_freq(head_dim, theta);
        if let Some(div) = divisors {
            if div.len() != freqs.len() || div.iter().any(|d| !d.is_finite() || *d <= 0.0) {
                return Err(Error::format(
                    source,
                    format!(
                        "tensor `rope_freqs.weight` must hold {} positive divisors (head_dim {head_dim} / 2), found {} values",
                        freqs.len(),
                        div.len()
                    ),
                ));
            }
            freqs.iter_mut().zip(div).for_each(|(f, d)| *f /= d);
        }
        let factor = factor as f32;
        Ok(RopeFrequencies::Fixed(
            freqs.iter().map(|f| f / factor).collect(),
        ))
    }
}

/// transformers' `_compute_llama3_parameters` (in f32, as there): low frequencies divided by
/// `factor`, high ones kept, the band between interpolated.
fn llama3_inv_freq(plain: &[f32], fields: &RopeFields) -> Result<Vec<f32>> {
    let factor = fields.positive("factor")? as f32;
    let low = fields.positive("low_freq_factor")? as f32;
    let high = fields.positive("high_freq_factor")? as f32;
    let old_context = fields.positive("original_max_position_embeddings")? as f32;
    if high <= low {
        return Err(fields.error(
            "high_freq_factor",
            format!("must be larger than low_freq_factor ({high} <= {low})"),
        ));
    }
    let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
    Ok(plain
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect())
}

/// The merged fields of a config's rope sections, each with the section it came from.
struct RopeFields<'a> {
    source: &'a Path,
    map: BTreeMap<&'a str, (&'a str, &'a Value)>,
}

impl<'a> RopeFields<'a> {
    fn collect(source: &'a Path, sections: [(&'a str, Option<&'a Value>); 2]) -> Result<Self> {
        let mut map = BTreeMap::new();
        for (section, value) in sections {
            match value {
                None | Some(Value::Null) => {}
                Some(Value::Object(obj)) => {
                    for (k, v) in obj {
                        map.insert(k.as_str(), (section, v));
                    }
                }
                Some(other) => {
                    return Err(Error::config(
                        source,
                        section,
                        format!("expected an object, found {other}"),
                    ))
                }
            }
        }
        Ok(RopeFields { source, map })
    }

    /// `section.key` for errors.
    fn name(&self, key: &str) -> String {
        match self.map.get(key) {
            Some((section, _)) => format!("{section}.{key}"),
            None => format!("rope_parameters.{key}"),
        }
    }

    fn error(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(self.source, self.name(key), msg)
    }

    /// The field naming the variant (`rope_type`, 4.x configs also `type`) and its value.
    fn type_field(&self) -> (String, Option<&'a Value>) {
        for key in ["rope_type", "type"] {
            if let Some((_, v)) = self.map.get(key) {
                return (self.name(key), Some(v));
            }
        }
        (self.name("rope_type"), None)
    }

    fn kind(&self) -> Result<String> {
        match self.type_field() {
            (_, None) => Ok("default".into()),
            (_, Some(Value::String(s))) => Ok(s.clone()),
            (field, Some(other)) => Err(Error::config(
                self.source,
                field,
                format!("expected a string, found {other}"),
            )),
        }
    }

    /// Every field is one the variant `kind` reads (or the base, or the variant's name).
    fn check_known(&self, allowed: &[&str], kind: &str) -> Result<()> {
        for (key, (_, value)) in &self.map {
            match *key {
                "rope_type" | "type" | "rope_theta" => {}
                "partial_rotary_factor" if value.as_f64() == Some(1.0) => {}
                "partial_rotary_factor" => {
                    return Err(self.error(
                        key,
                        format!("partial rotary embeddings ({value}) are not supported"),
                    ))
                }
                k if allowed.contains(&k) => {}
                _ => {
                    return Err(self.error(
                        key,
                        format!("unsupported field (value {value}) for rope type `{kind}`"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// A required positive, finite number.
    fn positive(&self, key: &str) -> Result<f64> {
        match self.map.get(key).map(|(_, v)| v.as_f64()) {
            Some(Some(x)) if x.is_finite() && x > 0.0 => Ok(x),
            Some(_) => Err(self.error(key, "must be a positive number")),
            None => Err(self.error(key, "missing")),
        }
    }
}
