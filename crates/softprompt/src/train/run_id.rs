//! The identity of a run: a hash of everything that determines its trajectory, stored in its
//! checkpoint so that a resume with other settings or data is refused.

use crate::batch::Example;
use crate::model::ModelInfo;
use crate::train::config::{SelectBy, TrainConfig};
use crate::train::schedule::Decay;
use sha2::{Digest, Sha256};

/// sha256 of everything that determines the run's trajectory: prompt length and init,
/// optimizer, schedule, batching, clipping, seed, model and data. Not `steps` (unless the
/// schedule decays over them), so a finished run can be resumed for more steps; not the
/// evaluation cadence, patience, output folder, logging or checkpoint frequency. Selecting by
/// dev accuracy (and its classes) is included, as it decides the checkpoint's best prompt.
pub fn config_hash(
    cfg: &TrainConfig,
    info: &ModelInfo,
    train: &[Example],
    dev: Option<&[Example]>,
) -> String {
    let schedule = match cfg.schedule.decay {
        Decay::Constant => format!(
            "constant lr={:?} warmup={}",
            cfg.schedule.lr, cfg.schedule.warmup_steps
        ),
        _ => format!("{:?}", cfg.schedule),
    };
    let mut desc = serde_json::json!({
        "n_tokens": cfg.n_tokens,
        "init": cfg.init.describe(),
        "optimizer": format!("{:?}", cfg.optimizer),
        "schedule": schedule,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "clip": format!("{:?}", cfg.clip),
        "seed": cfg.seed,
        "model": {"name": info.name, "arch": info.arch, "d_model": info.d_model, "vocab": info.vocab_size, "layers": info.n_layers},
        "train": examples_hash(train),
        "dev": dev.map(examples_hash),
    });
    if cfg.prompt_after_bos {
        // Only when set, so the hashes of runs made before this option stay the same.
        if let Some(o) = desc.as_object_mut() {
            o.insert("prompt_after_bos".into(), true.into());
        }
    }
    if cfg.select_by == SelectBy::Accuracy {
        // The checkpoint's best prompt was chosen by accuracy on these classes: a resumed run
        // must keep choosing that way. Only when set, as above.
        if let Some(o) = desc.as_object_mut() {
            o.insert("select_by".into(), "accuracy".into());
            o.insert("classes".into(), serde_json::json!(cfg.classes));
        }
    }
    hex(&Sha256::digest(desc.to_string().as_bytes()))
}

fn examples_hash(examples: &[Example]) -> String {
    let mut h = Sha256::new();
    for e in examples {
        for part in [&e.source, &e.target] {
            h.update((part.len() as u64).to_le_bytes());
            for t in part.iter() {
                h.update(t.to_le_bytes());
            }
        }
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The prompt-tuning [`config_hash`] of `cfg` extended with a baseline's own settings
/// (`extra`: its method, its encoder...).
pub(crate) fn baseline_hash(
    cfg: &TrainConfig,
    info: &ModelInfo,
    train: &[Example],
    dev: Option<&[Example]>,
    extra: serde_json::Value,
) -> String {
    let text = format!("{} {extra}", config_hash(cfg, info, train, dev));
    hex(&Sha256::digest(text.as_bytes()))
}
