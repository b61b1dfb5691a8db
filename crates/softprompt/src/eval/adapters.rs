//! The adapters an evaluation uses: one soft prompt, or several (an ensemble), each a PEFT
//! folder with its `task.json`, placed before the input as training placed them.

use crate::load::Model;
use crate::prompt::{model_prefix, PeftAdapter};
use crate::task::TaskMeta;
use crate::{bail, Error, Result};
use candle_core::Tensor;
use std::path::PathBuf;

/// Adapter folders and the task the first one records.
pub struct AdapterSet {
    pub dirs: Vec<PathBuf>,
    /// `task.json` of the first adapter (empty when there is none or no adapter).
    pub meta: TaskMeta,
}

impl AdapterSet {
    /// Reads every adapter's `task.json`; the members of an ensemble must place their prompts
    /// the same way (all after BOS or none).
    pub fn read(dirs: &[PathBuf]) -> Result<AdapterSet> {
        let mut metas = Vec::with_capacity(dirs.len());
        for dir in dirs {
            metas.push(TaskMeta::read(dir)?.unwrap_or_default());
        }
        if let Some(first) = metas.first() {
            for (dir, m) in dirs.iter().zip(&metas).skip(1) {
                if m.prompt_after_bos != first.prompt_after_bos {
                    bail!(
                        "{} and {} place their prompts differently (one after BOS, one before the input); \
                         an ensemble needs one layout",
                        dirs[0].display(),
                        dir.display()
                    );
                }
            }
        }
        Ok(AdapterSet {
            dirs: dirs.to_vec(),
            meta: metas.into_iter().next().unwrap_or_default(),
        })
    }

    /// Loads each adapter's prompt (checked against the model; an ensemble needs one length)
    /// as the model sees it before the input: after BOS when trained so, in which case the
    /// tokenizer stops adding BOS to inputs (BOS is part of the prefix). Returns `[N, D]`
    /// prefixes, one per adapter.
    pub fn load_prompts(&self, model: &mut Model) -> Result<Vec<Tensor>> {
        let mut out: Vec<Tensor> = Vec::with_capacity(self.dirs.len());
        for dir in &self.dirs {
            let adapter = PeftAdapter::load(dir, &model.device)?;
            adapter.validate(model.backbone.info(), dir)?;
            let p = adapter.prompt; // [N, D]
            if let Some(first) = out.first() {
                if first.dims() != p.dims() {
                    bail!(
                        "{}: prompt {:?} differs in shape from {}'s {:?}; an ensemble needs prompts of one length",
                        dir.display(),
                        p.dims(),
                        self.dirs[0].display(),
                        first.dims()
                    );
                }
            }
            out.push(p);
        }
        let after_bos = self.meta.prompt_after_bos;
        let prefixes = out
            .iter()
            .map(|p| model_prefix(p, &model.backbone, after_bos))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| match self.dirs.first() {
                Some(d) => Error::config(d.join(crate::task::TASK_FILE), "prompt_after_bos", e.to_string()),
                None => e,
            })?;
        if after_bos {
            if let Some(t) = model.tokenizer.as_mut() {
                t.add_bos = false;
            }
        }
        Ok(prefixes)
    }
}
