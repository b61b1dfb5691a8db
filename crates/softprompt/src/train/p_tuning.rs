//! P-tuning (Liu et al. 2021), a baseline of the prompt-tuning paper's comparison: the prompt
//! is the output of a [`PromptEncoder`], whose parameters are trained by the one training loop
//! (`train::step_loop`) on the data order and objective of prompt tuning. The exported
//! adapter holds the encoder's final output as `prompt_embeddings` (a plain PEFT
//! prompt-tuning adapter); `encoder.safetensors` holds every encoder parameter and `task.json`
//! records the encoder.

use crate::task::{describe_init, EncoderMeta};
use crate::batch::{collate_shard, Example};
use crate::load::Model;
use crate::objective::target_nll;
use crate::prompt::{EncoderKind, PromptEncoder};
use crate::prompt::init::init_prompt;
use crate::train::baseline::{run_baseline, BaselineReport};
use crate::train::config::TrainConfig;
use crate::train::data::validate;
use crate::train::dev_eval::dev_nll;
use crate::train::export::{
    run_task_fields, save_prompt_adapter, save_tensors_atomic, write_task_json,
};
use crate::train::plot;
use crate::train::run_id::baseline_hash;
use crate::train::step_loop::BatchLoss;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;

/// The method's name in checkpoints and `task.json`.
pub(crate) const P_TUNING: &str = "p-tuning";

/// P-tuning of a prompt of `cfg.n_tokens` tokens for the frozen `model`: the encoder's input
/// embeddings start from `cfg.init`, its network weights are drawn from `cfg.seed`. Writes the
/// adapter (the encoder's final output), `task.json` (with `"method": "p-tuning"` and the
/// encoder) and `encoder.safetensors` (every encoder parameter). Returns the report and the
/// trained encoder.
pub fn p_tuning(
    model: &Model,
    train: &[Example],
    dev: Option<&[Example]>,
    cfg: &TrainConfig,
    kind: EncoderKind,
    hidden: usize,
) -> Result<(BaselineReport, PromptEncoder)> {
    let info = model.backbone.info();
    validate(cfg, info, train, dev)?;
    let initial = init_prompt(&cfg.init, model, cfg.n_tokens, cfg.seed)?; // [N, D]
    let encoder = PromptEncoder::new(kind, &initial, hidden, cfg.seed)?;
    let out = &cfg.output;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let hash = baseline_hash(
        cfg,
        info,
        train,
        dev,
        serde_json::json!({"method": P_TUNING, "encoder": kind.name(), "hidden": hidden}),
    );
    let loss = |examples: &[Example], shard: std::ops::Range<usize>| -> Result<BatchLoss> {
        let batch = collate_shard(examples, shard, info, cfg.n_tokens, &model.device)?;
        let prompt = encoder.forward()?; // [N, D]
        let nll = target_nll(&model.backbone, Some(&prompt), &batch)?; // [M]
        Ok(BatchLoss {
            nll,
            tokens: batch.n_tokens,
        })
    };
    let run = run_baseline(
        cfg,
        P_TUNING,
        encoder.named_vars(),
        &loss,
        &hash,
        &model.device,
        train,
    )?;

    let prompt = encoder.forward()?.detach(); // [N, D]
    let dev_loss = match dev {
        Some(d) => Some(dev_nll(model, &prompt, d, cfg)?),
        None => None,
    };
    let report = BaselineReport::from_run(&run, dev_loss);
    if !cfg.parallel.is_root() {
        // Rank 0 writes; every rank holds the same encoder.
        return Ok((report, encoder));
    }
    save_prompt_adapter(model, cfg, &prompt, false)?;
    let params: HashMap<String, Tensor> = encoder
        .named_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().detach().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    save_tensors_atomic(&out.join("encoder.safetensors"), &params)?;

    let mut task = run_task_fields(model, cfg, train, dev)?;
    task.method = Some(P_TUNING.into());
    task.encoder = Some(EncoderMeta { kind: kind.name().into(), hidden });
    task.n_tokens = Some(cfg.n_tokens);
    task.init = Some(describe_init(&cfg.init));
    write_task_json(cfg, task)?;
    plot::plot_loss(&run.log.rows, &out.join(plot::FILE))?;
    Ok((report, encoder))
}
