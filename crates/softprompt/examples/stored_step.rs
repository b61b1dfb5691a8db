//! One model, `--weights stored` or `f32`: prompt-tuning steps (loss + prompt gradient) and
//! batch-1 greedy generation, timed, for the memory and speed tables of docs/performance.md.
//! Run it under `/usr/bin/time -v` for the peak RSS (one storage mode per process).
//!
//! ```text
//! cargo build -p softprompt --example stored_step
//! /usr/bin/time -v target/debug/examples/stored_step MODEL.gguf stored train 8 120 8 20 3
//! /usr/bin/time -v target/debug/examples/stored_step MODEL.gguf stored generate 64
//! ```
//!
//! Arguments: model path, `stored` | `f32`, then `train BATCH SOURCE TARGET PROMPT STEPS`
//! (random token ids, a random prompt; one warm-up step is not timed) or `generate TOKENS`
//! (8 source tokens, greedy, no early stop; with `stored`, generation steps run on the
//! quantised blocks as `softprompt generate` does; `generate-exact TOKENS` keeps them exact).

use candle_core::{Device, Tensor, Var};
use softprompt::batch::{collate, Example};
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::load::{load_model_with, WeightStorage};
use softprompt::objective::mean_loss;
use std::path::PathBuf;
use std::time::Instant;

fn arg(args: &[String], i: usize, what: &str) -> softprompt::Result<usize> {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| softprompt::Error::invalid(format!("argument {i} ({what}): a number")))
}

fn main() -> softprompt::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: stored_step MODEL stored|f32 train B S T N STEPS | generate[-exact] TOKENS";
    let (Some(path), Some(mode), Some(job)) = (args.get(1), args.get(2), args.get(3)) else {
        return Err(softprompt::Error::invalid(usage));
    };
    let storage = match mode.as_str() {
        "stored" => WeightStorage::Stored,
        "f32" => WeightStorage::F32,
        _ => return Err(softprompt::Error::invalid(usage)),
    };
    let t0 = Instant::now();
    let mut model = load_model_with(&PathBuf::from(path), &Device::Cpu, storage)?;
    let info = model.backbone.info().clone();
    eprintln!("loaded {} ({mode}) in {:.1} s", info.name, t0.elapsed().as_secs_f64());
    let v = info.vocab_size as u32;
    let id = |i: usize| ((i as u64 * 2654435761 % 1_000_003) as u32 % (v - 10)) + 5;
    match job.as_str() {
        "train" => {
            let (b, s, t, n, steps) = (
                arg(&args, 4, "batch")?,
                arg(&args, 5, "source")?,
                arg(&args, 6, "target")?,
                arg(&args, 7, "prompt")?,
                arg(&args, 8, "steps")?,
            );
            let data: Vec<Example> = (0..b)
                .map(|r| Example {
                    source: (0..s).map(|i| id(r * 1000 + i)).collect(),
                    target: (0..t).map(|i| id(r * 1000 + 500 + i)).collect(),
                })
                .collect();
            let batch = collate(&data, &info, n, &Device::Cpu)?;
            let prompt = Var::from_tensor(&Tensor::randn(0f32, 0.5, (n, info.d_model), &Device::Cpu)?)?;
            let mut times = Vec::new();
            for step in 0..=steps {
                let t1 = Instant::now();
                let loss = mean_loss(&model.backbone, Some(prompt.as_tensor()), &batch)?;
                let grads = loss.backward()?;
                let g = grads
                    .get(prompt.as_tensor())
                    .ok_or_else(|| softprompt::Error::invalid("no prompt gradient"))?;
                let norm = g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
                let secs = t1.elapsed().as_secs_f64();
                let loss = loss.to_scalar::<f32>()?;
                eprintln!("step {step}: loss {loss:.6} |grad| {norm:.6e} {secs:.2} s");
                if step > 0 {
                    times.push(secs);
                }
            }
            if !times.is_empty() {
                let mean = times.iter().sum::<f64>() / times.len() as f64;
                println!("RESULT train {mode} b={b} s={s} t={t} n={n}: {mean:.3} s/step");
            }
        }
        "generate" | "generate-exact" => {
            let tokens = arg(&args, 4, "tokens")?;
            if storage == WeightStorage::Stored && job == "generate" {
                let k = model.backbone.kernels().with_quantized_decode(true);
                model.backbone.set_kernels(k);
            }
            let source: Vec<u32> = (0..8).map(id).collect();
            let opts = GenerateOptions {
                max_new_tokens: tokens,
                stop_at_eos: false,
            };
            greedy(&model.backbone, None, &[source.clone()], &GenerateOptions { max_new_tokens: 2, stop_at_eos: false }, &Device::Cpu)?; // warm-up
            let t1 = Instant::now();
            let out = greedy(&model.backbone, None, &[source], &opts, &Device::Cpu)?;
            let secs = t1.elapsed().as_secs_f64();
            let n = out.tokens[0].len();
            println!("RESULT {job} {mode}: {n} tokens in {secs:.2} s = {:.2} tokens/s; first {:?}", n as f64 / secs, &out.tokens[0][..n.min(8)]);
        }
        _ => return Err(softprompt::Error::invalid(usage)),
    }
    Ok(())
}
