//! One prompt-tuning step (forward + backward of the prompt loss) on a SmolLM2-135M-shaped
//! Llama with random weights, with the frozen-weight linear path (`model::frozen`) against
//! candle's plain matmul, whose backward also computes every weight's gradient.
//!
//! ```text
//! cargo bench -p softprompt --bench train_step                 # release build
//! cargo bench -p softprompt --bench train_step --profile dev   # reuses the dev build
//! ```
//!
//! Environment: `RAYON_NUM_THREADS` (default 2), `BENCH_ITERS` (timed steps per variant,
//! default 2, after one warm-up step; the two variants alternate).

use candle_core::{DType, Device, Tensor, Var};
use softprompt::batch::{collate, Example};
use softprompt::load::Weights;
use softprompt::model::llama::{Config, Llama};
use softprompt::model::{frozen, Backbone};
use softprompt::objective::mean_loss;
use std::collections::HashMap;
use std::time::Instant;

const BATCH: usize = 8;
const SEQ: usize = 64;
const TARGET: usize = 8;
const PROMPT: usize = 20;

fn config() -> Config {
    serde_json::from_value(serde_json::json!({
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2
    }))
    .expect("config")
}

/// Random weights with the Hugging Face Llama names.
fn weights(cfg: &Config) -> candle_core::Result<Weights> {
    let dev = Device::Cpu;
    let (d, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let hd = cfg.head_dim();
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_kv_heads() * hd);
    let mut map = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32| -> candle_core::Result<()> {
        let t = if std == 0.0 {
            Tensor::ones(shape, DType::F32, &dev)?
        } else {
            Tensor::randn(0f32, std, shape, &dev)?
        };
        map.insert(name, t);
        Ok(())
    };
    put("model.embed_tokens.weight".into(), &[v, d], 0.02)?;
    put("model.norm.weight".into(), &[d], 0.0)?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[d], 0.0)?;
        put(format!("{p}.post_attention_layernorm.weight"), &[d], 0.0)?;
        put(format!("{p}.self_attn.q_proj.weight"), &[q, d], 0.02)?;
        put(format!("{p}.self_attn.k_proj.weight"), &[kv, d], 0.02)?;
        put(format!("{p}.self_attn.v_proj.weight"), &[kv, d], 0.02)?;
        put(format!("{p}.self_attn.o_proj.weight"), &[d, q], 0.02)?;
        put(format!("{p}.mlp.gate_proj.weight"), &[f, d], 0.02)?;
        put(format!("{p}.mlp.up_proj.weight"), &[f, d], 0.02)?;
        put(format!("{p}.mlp.down_proj.weight"), &[d, f], 0.02)?;
    }
    Ok(Weights::new(map, "random"))
}

#[derive(Default)]
struct Timing {
    fwd_s: f64,
    step_s: f64,
    grad: Option<Tensor>,
}

/// One forward + backward of the prompt loss; adds its times to `t` (when `timed`).
fn step(
    backbone: &Backbone,
    prompt: &Var,
    batch: &softprompt::batch::Batch,
    use_frozen: bool,
    t: &mut Timing,
    timed: bool,
) -> softprompt::Result<()> {
    frozen::set_enabled(use_frozen);
    let t0 = Instant::now();
    let loss = mean_loss(backbone, Some(prompt.as_tensor()), batch)?;
    let _ = loss.to_scalar::<f32>()?;
    let t1 = Instant::now();
    let grads = loss.backward()?;
    let g = grads
        .get(prompt.as_tensor())
        .ok_or_else(|| softprompt::Error::invalid("the prompt has no gradient"))?
        .clone();
    let t2 = Instant::now();
    if timed {
        t.fwd_s += (t1 - t0).as_secs_f64();
        t.step_s += (t2 - t0).as_secs_f64();
    }
    t.grad = Some(g);
    Ok(())
}

fn main() -> softprompt::Result<()> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2);

    let cfg = config();
    let t0 = Instant::now();
    let model = Llama::new(&cfg, &weights(&cfg)?, "smollm2-135m-random".into())?;
    let backbone = Backbone::Causal(Box::new(model));
    eprintln!(
        "random weights built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // 8 rows of 56 source + 8 target tokens, no padding; a 20-token prompt.
    let mut state = 12345u64;
    let mut tok = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % cfg.vocab_size as u64) as u32
    };
    let examples: Vec<Example> = (0..BATCH)
        .map(|_| Example {
            source: (0..SEQ - TARGET).map(|_| tok()).collect(),
            target: (0..TARGET).map(|_| tok()).collect(),
        })
        .collect();
    let batch = collate(&examples, backbone.info(), PROMPT, &Device::Cpu)?;
    let prompt = Var::from_tensor(&Tensor::randn(
        0f32,
        0.5,
        (PROMPT, cfg.hidden_size),
        &Device::Cpu,
    )?)?;
    let positions = BATCH * (PROMPT + SEQ);

    // One warm-up step, then the variants alternate so that drifting machine load hits both.
    let (mut plain, mut fast) = (Timing::default(), Timing::default());
    step(&backbone, &prompt, &batch, true, &mut fast, false)?;
    for _ in 0..iters {
        step(&backbone, &prompt, &batch, false, &mut plain, true)?;
        step(&backbone, &prompt, &batch, true, &mut fast, true)?;
    }
    frozen::set_enabled(true);
    let (g_fast, g_plain) = (
        fast.grad.clone().expect("a step ran"),
        plain.grad.clone().expect("a step ran"),
    );

    let diff = (&g_fast - &g_plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = g_plain.abs()?.max_all()?.to_scalar::<f32>()?;

    println!(
        "\nSmolLM2-135M shape, random weights: batch {BATCH} x {SEQ} tokens + {PROMPT} prompt tokens \
         ({positions} positions), {TARGET} labels/row, {threads} threads, mean of {iters} steps per variant after 1 warm-up"
    );
    println!("| variant | forward ms | fwd+bwd ms/step | positions/s |");
    println!("|---|---:|---:|---:|");
    for (name, t) in [("plain matmul", &plain), ("frozen linear", &fast)] {
        let (fwd_ms, step_ms) = (t.fwd_s * 1e3 / iters as f64, t.step_s * 1e3 / iters as f64);
        println!(
            "| {name} | {fwd_ms:.0} | {step_ms:.0} | {:.0} |",
            positions as f64 / (step_ms / 1e3)
        );
    }
    println!(
        "speed-up (fwd+bwd): {:.2}x; prompt gradient max abs diff {diff:.3e} (max |grad| {scale:.3e})",
        plain.step_s / fast.step_s
    );
    Ok(())
}
