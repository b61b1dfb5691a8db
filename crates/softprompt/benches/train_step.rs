//! Prompt-tuning step and greedy generation on CPU, random weights, four model shapes:
//! t5-small, flan-t5-small, gpt2 (124M) and a SmolLM2-135M-shaped Llama. Each model runs in
//! the chosen variants, alternating step by step so that drifting machine load hits all:
//! `fused` (the default path, `Kernels::fast()`: fused sub-blocks, fused element-wise kernels,
//! frozen matmuls), `ops` (`Kernels::fused_ops_only()`: sub-blocks composed of single ops,
//! with the fused element-wise kernels and the frozen matmul) and `composite`
//! (`Kernels::reference()`: candle primitives only, frozen matmul included). The variant is
//! the model's kernel policy, set with `Backbone::set_kernels`.
//!
//! ```text
//! cargo bench -p softprompt --bench train_step --profile dev
//! BENCH_MODELS=smollm2 BENCH_VARIANTS=fused cargo bench -p softprompt --bench train_step --profile dev
//! ```
//!
//! Workload (same as `bench/peft_baseline.py`): batch 8; decoder-only rows are 120 source +
//! 8 target tokens (128 input tokens), seq2seq rows are 128 encoder tokens and 8 target
//! tokens; 20 virtual tokens; loss = mean token cross-entropy on the targets (PEFT's).
//! Generation: the same 8 x 128 sources (without targets) with the prompt, 20 new tokens
//! per row, greedy, no early stop.
//!
//! Environment: `RAYON_NUM_THREADS` (default 2), `BENCH_MODELS` (comma list of t5-small,
//! flan-t5-small, gpt2, smollm2; default all), `BENCH_VARIANTS` (comma list of `composite`,
//! `ops`, `fused`; `both` = `composite,fused`; default `ops,fused`), `BENCH_ITERS` (timed
//! steps per variant, default 2, after one warm-up step each), `BENCH_GEN` (0 skips
//! generation), `BENCH_TRAIN` (0 skips the training steps). Every result is also printed as
//! one `BENCH_JSON {...}` line for `bench/run_side_by_side.sh`.
//!
//! GPU (`bench/gpu.sh`): `BENCH_DEVICE` is `cpu` (default), `cuda` or `cuda:N` (the latter two
//! with the crate's `cuda` feature), `BENCH_DTYPE` is `f32` (default) or `bf16`. The same
//! weights and batches are built on the CPU and moved; a step's clock stops after
//! `Device::synchronize`. bf16 runs the T5 models only: GPT-2 and Llama build their attention
//! bias and rotary tables in f32, which candle will not add to bf16 activations. The fused
//! kernels (`Kernels`) are CPU f32 only, so on CUDA `ops` and `fused`
//! both run the single ops with the frozen matmul and `composite` the plain matmul. The memory
//! column is then the high-water mark of the CUDA memory pool that candle allocates from
//! (reset before each step) instead of the peak RSS, and the JSON lines gain `device` and
//! `dtype` and say `peak_gpu_mib` instead of `peak_rss_mib`.

use candle_core::{DType, Device, Tensor, Var};
use softprompt::batch::{collate, Batch, Example};
use softprompt::eval::generate::{greedy, GenerateOptions};
use softprompt::load::Weights;
use softprompt::model::{gpt2, llama, t5, Backbone, Kernels};
use softprompt::objective::mean_loss;
use std::collections::HashMap;
use std::time::Instant;

#[cfg(feature = "cuda")]
use candle_core::cuda::cudarc::driver::{result as cu, sys as cusys};

const BATCH: usize = 8;
const INPUT: usize = 128;
const TARGET: usize = 8;
const PROMPT: usize = 20;
const NEW_TOKENS: usize = 20;

/// Shape facts for the analytic FLOP count.
struct Shape {
    d: usize,
    /// Query heads x head dim.
    inner: usize,
    /// Key/value heads x head dim.
    kv_inner: usize,
    heads: usize,
    head_dim: usize,
    /// Feed-forward matrices per layer (2 plain, 3 gated) and their width.
    ff_mats: usize,
    ff: usize,
    enc_layers: usize,
    dec_layers: usize,
    vocab: usize,
}

struct Model {
    backbone: Backbone,
    shape: Shape,
}

fn randn(shape: &[usize], std: f32) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, std, shape, &Device::Cpu)
}

/// Where the models run and in which dtype (`BENCH_DEVICE`, `BENCH_DTYPE`).
struct Target {
    device: Device,
    dtype: DType,
    /// `cpu` or `cuda:N`.
    name: String,
}

impl Target {
    fn from_env(device: Option<&str>, dtype: Option<&str>) -> softprompt::Result<Target> {
        let dtype = match dtype.unwrap_or("f32") {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            other => softprompt::bail!("unknown BENCH_DTYPE {other} (f32, bf16)"),
        };
        let (device, name) = match device.unwrap_or("cpu") {
            "cpu" => (Device::Cpu, "cpu".to_string()),
            spec if spec == "cuda" || spec.starts_with("cuda:") => {
                let ordinal = match spec.strip_prefix("cuda:") {
                    Some(n) => n.parse::<usize>().map_err(|_| {
                        softprompt::Error::invalid(format!("BENCH_DEVICE={spec}: bad ordinal"))
                    })?,
                    None => 0,
                };
                (cuda_device(ordinal)?, format!("cuda:{ordinal}"))
            }
            other => softprompt::bail!("unknown BENCH_DEVICE {other} (cpu, cuda, cuda:N)"),
        };
        Ok(Target {
            device,
            dtype,
            name,
        })
    }

    fn is_cpu(&self) -> bool {
        self.device.is_cpu()
    }

    fn dtype_name(&self) -> &'static str {
        match self.dtype {
            DType::BF16 => "bf16",
            _ => "f32",
        }
    }

    /// A tensor made on the CPU in f32, in this target's dtype and on its device.
    fn place(&self, t: Tensor) -> candle_core::Result<Tensor> {
        t.to_dtype(self.dtype)?.to_device(&self.device)
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> softprompt::Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> softprompt::Result<Device> {
    softprompt::bail!(
        "BENCH_DEVICE=cuda needs the cuda feature: cargo bench -p softprompt --features cuda --bench train_step"
    )
}

struct Builder<'a> {
    tensors: HashMap<String, Tensor>,
    target: &'a Target,
}

impl<'a> Builder<'a> {
    fn new(target: &'a Target) -> Self {
        Builder {
            tensors: HashMap::new(),
            target,
        }
    }
    fn put(&mut self, name: impl Into<String>, shape: &[usize]) -> candle_core::Result<()> {
        let t = self.target.place(randn(shape, 0.02)?)?;
        self.tensors.insert(name.into(), t);
        Ok(())
    }
    fn ones(&mut self, name: impl Into<String>, shape: &[usize]) -> candle_core::Result<()> {
        let t = Tensor::ones(shape, self.target.dtype, &self.target.device)?;
        self.tensors.insert(name.into(), t);
        Ok(())
    }
    fn weights(self) -> Weights {
        Weights::new(self.tensors, "random")
    }
}

fn smollm2(target: &Target) -> softprompt::Result<Model> {
    let cfg: llama::Config = serde_json::from_value(serde_json::json!({
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "vocab_size": 49152,
        "max_position_embeddings": 8192, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2
    }))
    .map_err(|e| softprompt::Error::invalid(e.to_string()))?;
    let (d, f, v, hd) = (576, 1536, 49152, 64);
    let (q, kv) = (9 * hd, 3 * hd);
    let mut b = Builder::new(target);
    b.put("model.embed_tokens.weight", &[v, d])?;
    b.ones("model.norm.weight", &[d])?;
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        b.ones(format!("{p}.input_layernorm.weight"), &[d])?;
        b.ones(format!("{p}.post_attention_layernorm.weight"), &[d])?;
        b.put(format!("{p}.self_attn.q_proj.weight"), &[q, d])?;
        b.put(format!("{p}.self_attn.k_proj.weight"), &[kv, d])?;
        b.put(format!("{p}.self_attn.v_proj.weight"), &[kv, d])?;
        b.put(format!("{p}.self_attn.o_proj.weight"), &[d, q])?;
        b.put(format!("{p}.mlp.gate_proj.weight"), &[f, d])?;
        b.put(format!("{p}.mlp.up_proj.weight"), &[f, d])?;
        b.put(format!("{p}.mlp.down_proj.weight"), &[d, f])?;
    }
    let m = llama::Llama::new(&cfg, &b.weights(), "smollm2-135m-random".into())?;
    Ok(Model {
        backbone: Backbone::Causal(Box::new(m)),
        shape: Shape {
            d,
            inner: q,
            kv_inner: kv,
            heads: 9,
            head_dim: hd,
            ff_mats: 3,
            ff: f,
            enc_layers: 0,
            dec_layers: 30,
            vocab: v,
        },
    })
}

fn gpt2(target: &Target) -> softprompt::Result<Model> {
    let cfg: gpt2::Config = serde_json::from_value(serde_json::json!({
        "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257,
        "bos_token_id": 50256, "eos_token_id": 50256
    }))
    .map_err(|e| softprompt::Error::invalid(e.to_string()))?;
    let (d, v) = (768, 50257);
    let mut b = Builder::new(target);
    b.put("transformer.wte.weight", &[v, d])?;
    b.put("transformer.wpe.weight", &[1024, d])?;
    let lin = |b: &mut Builder, p: String, i: usize, o: usize| -> candle_core::Result<()> {
        b.put(format!("{p}.weight"), &[i, o])?;
        b.put(format!("{p}.bias"), &[o])
    };
    let norm = |b: &mut Builder, p: String| -> candle_core::Result<()> {
        b.ones(format!("{p}.weight"), &[d])?;
        b.put(format!("{p}.bias"), &[d])
    };
    for i in 0..12 {
        let p = format!("transformer.h.{i}");
        norm(&mut b, format!("{p}.ln_1"))?;
        norm(&mut b, format!("{p}.ln_2"))?;
        lin(&mut b, format!("{p}.attn.c_attn"), d, 3 * d)?;
        lin(&mut b, format!("{p}.attn.c_proj"), d, d)?;
        lin(&mut b, format!("{p}.mlp.c_fc"), d, 4 * d)?;
        lin(&mut b, format!("{p}.mlp.c_proj"), 4 * d, d)?;
    }
    norm(&mut b, "transformer.ln_f".into())?;
    let m = gpt2::Gpt2::new(&cfg, &b.weights(), "gpt2-random".into())?;
    Ok(Model {
        backbone: Backbone::Causal(Box::new(m)),
        shape: Shape {
            d,
            inner: d,
            kv_inner: d,
            heads: 12,
            head_dim: 64,
            ff_mats: 2,
            ff: 4 * d,
            enc_layers: 0,
            dec_layers: 12,
            vocab: v,
        },
    })
}

/// t5-small (`flan = false`: relu, 6+6 layers, 8 heads, d_ff 2048, tied) or flan-t5-small
/// (gated-gelu, 8+8 layers, 6 heads, d_ff 1024, untied head).
fn t5(flan: bool, target: &Target) -> softprompt::Result<Model> {
    let (layers, heads, ff) = if flan { (8, 6, 1024) } else { (6, 8, 2048) };
    let (d, dkv, v) = (512, 64, 32128);
    let cfg: t5::Config = serde_json::from_value(serde_json::json!({
        "vocab_size": v, "d_model": d, "d_kv": dkv, "d_ff": ff, "num_layers": layers,
        "num_heads": heads, "feed_forward_proj": if flan { "gated-gelu" } else { "relu" },
        "tie_word_embeddings": !flan, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0
    }))
    .map_err(|e| softprompt::Error::invalid(e.to_string()))?;
    let inner = heads * dkv;
    let mut b = Builder::new(target);
    b.put("shared.weight", &[v, d])?;
    if flan {
        b.put("lm_head.weight", &[v, d])?;
    }
    let attn = |b: &mut Builder, p: String| -> candle_core::Result<()> {
        b.put(format!("{p}.q.weight"), &[inner, d])?;
        b.put(format!("{p}.k.weight"), &[inner, d])?;
        b.put(format!("{p}.v.weight"), &[inner, d])?;
        b.put(format!("{p}.o.weight"), &[d, inner])
    };
    let mlp = |b: &mut Builder, p: String| -> candle_core::Result<()> {
        let p = format!("{p}.DenseReluDense");
        if flan {
            b.put(format!("{p}.wi_0.weight"), &[ff, d])?;
            b.put(format!("{p}.wi_1.weight"), &[ff, d])?;
        } else {
            b.put(format!("{p}.wi.weight"), &[ff, d])?;
        }
        b.put(format!("{p}.wo.weight"), &[d, ff])
    };
    for stack in ["encoder", "decoder"] {
        b.put(
            format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            &[32, heads],
        )?;
        b.ones(format!("{stack}.final_layer_norm.weight"), &[d])?;
        for i in 0..layers {
            let p = format!("{stack}.block.{i}.layer");
            b.ones(format!("{p}.0.layer_norm.weight"), &[d])?;
            attn(&mut b, format!("{p}.0.SelfAttention"))?;
            b.ones(format!("{p}.1.layer_norm.weight"), &[d])?;
            if stack == "encoder" {
                mlp(&mut b, format!("{p}.1"))?;
            } else {
                attn(&mut b, format!("{p}.1.EncDecAttention"))?;
                b.ones(format!("{p}.2.layer_norm.weight"), &[d])?;
                mlp(&mut b, format!("{p}.2"))?;
            }
        }
    }
    let name = if flan { "flan-t5-small" } else { "t5-small" };
    let m = t5::T5::new(&cfg, &b.weights(), format!("{name}-random"))?;
    Ok(Model {
        backbone: Backbone::Seq2Seq(Box::new(m)),
        shape: Shape {
            d,
            inner,
            kv_inner: inner,
            heads,
            head_dim: dkv,
            ff_mats: if flan { 3 } else { 2 },
            ff,
            enc_layers: layers,
            dec_layers: layers,
            vocab: v,
        },
    })
}

/// Matmul FLOPs of one training step (forward + backward to the prompt), counted
/// analytically: a frozen linear layer costs its forward product again backward (input
/// gradient only), attention products three times (both operands need gradients). Counted as
/// the fused path does them: decoder-only models run the last layer's queries, attention,
/// output projection and MLP at the label rows only (the `ops` and `composite` variants do
/// the whole last layer, so their GFLOP/s are slightly understated).
fn train_flops(s: &Shape, seq2seq: bool) -> f64 {
    let b = BATCH as f64;
    let per_pos = |cross: bool| {
        let attn = s.d * s.inner * 2 + s.d * s.kv_inner * 2;
        let cross = if cross { s.d * s.inner * 2 } else { 0 }; // q and o of cross-attention
        2.0 * (attn + cross + s.ff_mats * s.d * s.ff) as f64
    };
    let attn = |tq: usize, tk: usize| 4.0 * b * (s.heads * tq * tk * s.head_dim) as f64;
    let head = 2.0 * b * TARGET as f64 * (s.d * s.vocab) as f64;
    let (linear, attention) = if seq2seq {
        let (n, t) = ((PROMPT + INPUT) as f64, TARGET as f64);
        let enc = s.enc_layers as f64 * (b * n * per_pos(false));
        let dec = s.dec_layers as f64
            * (b * t * per_pos(true) + 2.0 * b * n * 2.0 * (s.d * s.kv_inner) as f64);
        let att = s.enc_layers as f64 * attn(PROMPT + INPUT, PROMPT + INPUT)
            + s.dec_layers as f64 * (attn(TARGET, TARGET) + attn(TARGET, PROMPT + INPUT));
        (enc + dec, att)
    } else {
        // The last layer needs keys and values everywhere, the rest at the label rows only.
        let (n, t, l) = ((PROMPT + INPUT) as f64, TARGET as f64, s.dec_layers as f64);
        let kv = 2.0 * (2 * s.d * s.kv_inner) as f64;
        let linear =
            (l - 1.0) * b * n * per_pos(false) + b * n * kv + b * t * (per_pos(false) - kv);
        let att = (l - 1.0) * attn(PROMPT + INPUT, PROMPT + INPUT) + attn(TARGET, PROMPT + INPUT);
        (linear, att)
    };
    2.0 * (linear + head) + 3.0 * attention
}

/// Resets the kernel's peak-RSS counter of this process (Linux; a no-op elsewhere).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size in MiB since the last reset (Linux `VmHWM`).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The memory column: the CPU's peak RSS, or on CUDA the high-water mark of the memory pool
/// that candle's allocations come from (cudarc allocates with `cuMemAllocAsync` from the
/// device's current pool where the device supports pools). Reset before each timed step.
enum PeakMem {
    Rss,
    #[cfg(feature = "cuda")]
    Pool(cusys::CUmemoryPool),
    Unavailable,
}

impl PeakMem {
    fn new(device: &Device) -> PeakMem {
        match device {
            Device::Cpu => PeakMem::Rss,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let stream = d.cuda_stream();
                let ctx = stream.context();
                if !ctx.has_async_alloc() {
                    return PeakMem::Unavailable;
                }
                // SAFETY: the device handle comes from candle's live context.
                match unsafe { cu::device::get_mem_pool(ctx.cu_device()) } {
                    Ok(pool) => PeakMem::Pool(pool),
                    Err(_) => PeakMem::Unavailable,
                }
            }
            #[allow(unreachable_patterns)]
            _ => PeakMem::Unavailable,
        }
    }

    fn reset(&self) {
        match self {
            PeakMem::Rss => reset_peak_rss(),
            #[cfg(feature = "cuda")]
            PeakMem::Pool(pool) => {
                // Setting the high-water mark to 0 resets it to the current use.
                let mut zero = 0u64;
                // SAFETY: a pool of the live device; USED_MEM_HIGH takes a cuuint64_t.
                let _ = unsafe {
                    cu::mem_pool::set_attribute(
                        *pool,
                        cusys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut zero as *mut u64 as *mut std::ffi::c_void,
                    )
                };
            }
            PeakMem::Unavailable => {}
        }
    }

    fn peak_mib(&self) -> f64 {
        match self {
            PeakMem::Rss => peak_rss_mib(),
            #[cfg(feature = "cuda")]
            PeakMem::Pool(pool) => {
                let mut bytes = 0u64;
                // SAFETY: as in `reset`.
                let got = unsafe {
                    cu::mem_pool::get_attribute(
                        *pool,
                        cusys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        &mut bytes as *mut u64 as *mut std::ffi::c_void,
                    )
                };
                match got {
                    Ok(()) => bytes as f64 / (1024.0 * 1024.0),
                    Err(_) => f64::NAN,
                }
            }
            PeakMem::Unavailable => f64::NAN,
        }
    }
}

fn lcg_tokens(n: usize, vocab: usize, state: &mut u64) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Stay clear of the special ids at the bottom of the vocabulary.
            (10 + (*state >> 33) % (vocab as u64 - 10)) as u32
        })
        .collect()
}

fn examples(seq2seq: bool, vocab: usize) -> Vec<Example> {
    let mut state = 12345u64;
    let source = if seq2seq { INPUT } else { INPUT - TARGET };
    (0..BATCH)
        .map(|_| Example {
            source: lcg_tokens(source, vocab, &mut state),
            target: lcg_tokens(TARGET, vocab, &mut state),
        })
        .collect()
}

/// Which implementation of the step runs (see the module docs).
#[derive(Clone, Copy)]
enum Variant {
    Composite,
    Ops,
    Fused,
}

impl Variant {
    /// The model's kernel policy for this variant.
    fn kernels(self) -> Kernels {
        match self {
            Variant::Composite => Kernels::reference(),
            Variant::Ops => Kernels::fused_ops_only(),
            Variant::Fused => Kernels::fast(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Composite => "composite",
            Variant::Ops => "ops",
            Variant::Fused => "fused",
        }
    }
}

#[derive(Default)]
struct Stats {
    steps: usize,
    step_s: f64,
    peak_mib: f64,
    gen_s: Option<f64>,
    grad: Option<Tensor>,
}

fn step(
    m: &Model,
    prompt: &Var,
    batch: &Batch,
    st: &mut Stats,
    timed: bool,
    target: &Target,
    mem: &PeakMem,
) -> softprompt::Result<()> {
    target.device.synchronize()?;
    mem.reset();
    let t0 = Instant::now();
    let loss = mean_loss(&m.backbone, Some(prompt.as_tensor()), batch)?;
    let grads = loss.backward()?;
    let g = grads
        .get(prompt.as_tensor())
        .ok_or_else(|| softprompt::Error::invalid("the prompt has no gradient"))?
        .clone();
    let _ = g.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
    target.device.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    if timed {
        st.steps += 1;
        st.step_s += dt;
        st.peak_mib = st.peak_mib.max(mem.peak_mib());
    }
    st.grad = Some(g);
    Ok(())
}

/// Seconds per `BATCH x NEW_TOKENS` greedy generation.
fn generate(
    m: &Model,
    prompt: &Var,
    batch: &[Example],
    target: &Target,
) -> softprompt::Result<f64> {
    let sources: Vec<Vec<u32>> = batch.iter().map(|e| e.source.clone()).collect();
    let opts = GenerateOptions {
        max_new_tokens: NEW_TOKENS,
        stop_at_eos: false,
    };
    target.device.synchronize()?;
    let t0 = Instant::now();
    let out = greedy(
        &m.backbone,
        Some(prompt.as_tensor()),
        &sources,
        &opts,
        &target.device,
    )?;
    target.device.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    assert!(out.tokens.iter().all(|r| r.len() == NEW_TOKENS));
    Ok(dt)
}

/// The size of the peak-rate matmul: 2048 on the CPU, 8192 on a GPU.
fn gemm_n(target: &Target) -> usize {
    if target.is_cpu() {
        2048
    } else {
        8192
    }
}

/// Best of three `n x n x n` matmuls in the target's dtype ([`gemm_n`]): the gemm rate candle
/// reaches here.
fn sgemm_peak(target: &Target) -> candle_core::Result<f64> {
    let n = gemm_n(target);
    let (a, b) = (
        target.place(randn(&[n, n], 1.0)?)?,
        target.place(randn(&[n, n], 1.0)?)?,
    );
    let _ = a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        target.device.synchronize()?;
        let t0 = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.get(0)?.get(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        target.device.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * n * n) as f64 / best)
}

/// Adds the device and dtype to a JSON line, except on the CPU in f32 (the lines
/// `bench/run_side_by_side.sh` reads stay as they were), and renames the memory field on a GPU.
fn tag_json(mut v: serde_json::Value, target: &Target) -> serde_json::Value {
    if target.is_cpu() && target.dtype == DType::F32 {
        return v;
    }
    if let Some(o) = v.as_object_mut() {
        o.insert("device".into(), target.name.clone().into());
        o.insert("dtype".into(), target.dtype_name().into());
        if !target.is_cpu() {
            if let Some(peak) = o.remove("peak_rss_mib") {
                o.insert("peak_gpu_mib".into(), peak);
            }
        }
    }
    v
}

fn main() -> softprompt::Result<()> {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    let env = |k: &str| std::env::var(k).ok().filter(|s| !s.is_empty());
    let iters: usize = env("BENCH_ITERS")
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(2);
    let variants: Vec<Variant> = match env("BENCH_VARIANTS").as_deref() {
        None => vec![Variant::Ops, Variant::Fused],
        Some("both") => vec![Variant::Composite, Variant::Fused],
        Some(list) => list
            .split(',')
            .map(|v| match v.trim() {
                "composite" => Ok(Variant::Composite),
                "ops" => Ok(Variant::Ops),
                "fused" => Ok(Variant::Fused),
                other => softprompt::bail!(
                    "unknown BENCH_VARIANTS entry {other} (composite, ops, fused)"
                ),
            })
            .collect::<softprompt::Result<_>>()?,
    };
    let with_gen = env("BENCH_GEN").as_deref() != Some("0");
    let with_train = env("BENCH_TRAIN").as_deref() != Some("0");
    let names = env("BENCH_MODELS").unwrap_or_else(|| "t5-small,flan-t5-small,gpt2,smollm2".into());
    let target = Target::from_env(
        env("BENCH_DEVICE").as_deref(),
        env("BENCH_DTYPE").as_deref(),
    )?;
    let mem = PeakMem::new(&target.device);
    let (cpu, dev, dt) = (target.is_cpu(), target.name.as_str(), target.dtype_name());
    if target.dtype != DType::F32 {
        if let Some(m) = names
            .split(',')
            .map(str::trim)
            .find(|m| !matches!(*m, "t5-small" | "flan-t5-small"))
        {
            softprompt::bail!(
                "BENCH_DTYPE={dt}: {m} runs in f32 only (GPT-2 and Llama build their attention \
                 bias, Llama its rotary tables, in f32); bf16 runs t5-small and flan-t5-small"
            );
        }
    }

    let peak = sgemm_peak(&target)?;
    if cpu && target.dtype == DType::F32 {
        println!(
            "sgemm peak (2048^3 candle matmul, {threads} threads): {:.1} GFLOP/s",
            peak / 1e9
        );
    } else {
        println!(
            "gemm peak ({}^3 {dt} candle matmul, {dev}): {:.1} GFLOP/s",
            gemm_n(&target),
            peak / 1e9
        );
    }
    println!(
        "BENCH_JSON {}",
        tag_json(
            serde_json::json!({"kind": "sgemm", "threads": threads, "gflops": peak / 1e9}),
            &target
        )
    );
    if cpu {
        let dtype = if target.dtype == DType::F32 {
            String::new()
        } else {
            format!(" in {dt}")
        };
        println!(
            "\nbatch {BATCH} x {INPUT} input tokens + {PROMPT} virtual tokens, {TARGET} target tokens/row, \
             {threads} threads{dtype}, mean of {iters} steps per variant after 1 warm-up; generation {BATCH} x {NEW_TOKENS} tokens\n"
        );
        println!("| model | variant | step ms | input tokens/s | peak RSS MiB | GFLOP/s (% of sgemm) | gen tokens/s |");
    } else {
        println!(
            "\nbatch {BATCH} x {INPUT} input tokens + {PROMPT} virtual tokens, {TARGET} target tokens/row, \
             {dev} in {dt}, mean of {iters} steps per variant after 1 warm-up; generation {BATCH} x {NEW_TOKENS} tokens \
             (the fused kernels are CPU-only: here `ops` and `fused` run the same single ops with the frozen matmul)\n"
        );
        println!("| model | variant | step ms | input tokens/s | peak GPU pool MiB | GFLOP/s (% of gemm peak) | gen tokens/s |");
    }
    println!("|---|---|---:|---:|---:|---:|---:|");
    for name in names.split(',').map(str::trim) {
        let t0 = Instant::now();
        let mut m = match name {
            "smollm2" => smollm2(&target)?,
            "gpt2" => gpt2(&target)?,
            "t5-small" => t5(false, &target)?,
            "flan-t5-small" => t5(true, &target)?,
            other => {
                softprompt::bail!("unknown model {other} (t5-small, flan-t5-small, gpt2, smollm2)")
            }
        };
        eprintln!(
            "{name}: random weights in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        let seq2seq = m.backbone.is_seq2seq();
        let ex = examples(seq2seq, m.shape.vocab);
        let batch = collate(&ex, m.backbone.info(), PROMPT, &target.device)?;
        let prompt = Var::from_tensor(&target.place(randn(&[PROMPT, m.shape.d], 0.5)?)?)?;
        let flops = train_flops(&m.shape, seq2seq);

        let mut stats: Vec<Stats> = variants.iter().map(|_| Stats::default()).collect();
        for (v, st) in variants.iter().zip(stats.iter_mut()).filter(|_| with_train) {
            m.backbone.set_kernels(v.kernels());
            step(&m, &prompt, &batch, st, false, &target, &mem)?;
        }
        for _ in 0..if with_train { iters } else { 0 } {
            for (v, st) in variants.iter().zip(stats.iter_mut()) {
                m.backbone.set_kernels(v.kernels());
                step(&m, &prompt, &batch, st, true, &target, &mem)?;
            }
        }
        if with_gen {
            for (v, st) in variants.iter().zip(stats.iter_mut()) {
                m.backbone.set_kernels(v.kernels());
                st.gen_s = Some(generate(&m, &prompt, &ex, &target)?);
            }
        }
        for (v, st) in variants.iter().zip(&stats) {
            let step_s = st.step_s / st.steps as f64;
            let tok_s = (BATCH * INPUT) as f64 / step_s;
            let gen_tok_s = st.gen_s.map(|s| (BATCH * NEW_TOKENS) as f64 / s);
            let variant = v.name();
            println!(
                "| {name} | {variant} | {:.0} | {tok_s:.0} | {:.0} | {:.1} ({:.0}%) | {} |",
                step_s * 1e3,
                st.peak_mib,
                flops / step_s / 1e9,
                100.0 * flops / step_s / peak,
                gen_tok_s
                    .map(|g| format!("{g:.1}"))
                    .unwrap_or_else(|| "-".into()),
            );
            println!(
                "BENCH_JSON {}",
                tag_json(
                    serde_json::json!({
                        "kind": "train", "impl": "softprompt", "model": name, "variant": variant,
                        "threads": threads, "step_ms": step_s * 1e3, "input_tokens_per_s": tok_s,
                        "peak_rss_mib": st.peak_mib, "train_gflop": flops / 1e9,
                        "gflops": flops / step_s / 1e9, "gen_tokens_per_s": gen_tok_s,
                    }),
                    &target
                )
            );
        }
        let last = stats.len() - 1;
        for i in (0..last).filter(|_| with_train) {
            let (a, b) = (
                stats[i].grad.as_ref().unwrap(),
                stats[last].grad.as_ref().unwrap(),
            );
            let diff = (a - b)?
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            let scale = a
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            let speed = (stats[i].step_s / stats[i].steps as f64)
                / (stats[last].step_s / stats[last].steps as f64);
            println!(
                "|  | {} vs {}: speed-up {speed:.2}x; prompt grad max abs diff {diff:.2e} (max {scale:.2e}) | | | | | |",
                variants[last].name(),
                variants[i].name(),
            );
        }
    }
    Ok(())
}
