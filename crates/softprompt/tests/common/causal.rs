//! Decoder-only fixture helpers: PEFT's prompted input, the scored rows, KV-cached greedy
//! decoding and a finite-difference check of the prompt gradient.

use super::{as_u32, to_vec2_i64};
use candle_core::{DType, Device, Tensor, Var, D};
use softprompt::model::{CausalLm, KvCache, LogitsAt};

/// `[P ; embed(ids)]` `[B, N+S, D]` and `[1]*N + mask` `[B, N+S]`: PEFT's causal
/// prompt-tuning input (`ids` of any integer type).
pub fn with_prompt(
    lm: &dyn CausalLm,
    prompt: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
) -> (Tensor, Tensor) {
    let b = ids.dim(0).unwrap();
    let (n, d) = prompt.dims2().unwrap();
    let p = prompt
        .unsqueeze(0)
        .unwrap()
        .broadcast_as((b, n, d))
        .unwrap(); // [B, N, D]
    let embeds = Tensor::cat(&[&p, &lm.embed(&as_u32(ids)).unwrap()], 1).unwrap(); // [B, N+S, D]
    let ones = Tensor::ones((b, n), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&ones, &mask.to_dtype(DType::F32).unwrap()], 1).unwrap(); // [B, N+S]
    (embeds, mask)
}

/// Rows of the flattened `[B * (N+S)]` logits that are scored, and their targets: position
/// `t` predicts `labels[t+1]` of the labels with `n` x -100 prepended.
pub fn loss_rows(labels: &Tensor, n: usize) -> (Tensor, Tensor) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (b, row) in to_vec2_i64(labels).iter().enumerate() {
        let full: Vec<i64> = std::iter::repeat_n(-100, n)
            .chain(row.iter().copied())
            .collect();
        let len = full.len();
        for t in 0..len - 1 {
            if full[t + 1] != -100 {
                rows.push((b * len + t) as u32);
                targets.push(full[t + 1] as u32);
            }
        }
    }
    let m = rows.len();
    (
        Tensor::from_vec(rows, m, &Device::Cpu).unwrap(),
        Tensor::from_vec(targets, m, &Device::Cpu).unwrap(),
    )
}

/// Greedy decoding of `steps` tokens from `[prompt ; embed(ids)]` with a KV cache (one
/// prefill, then one position per step): the tokens `[B][steps]` and the logits that chose
/// them `[steps, B, V]`.
pub fn greedy(
    lm: &dyn CausalLm,
    prompt: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    steps: usize,
) -> (Vec<Vec<i64>>, Tensor) {
    let (embeds, mut mask) = with_prompt(lm, prompt, ids, mask);
    let b = embeds.dim(0).unwrap();
    let mut cache = KvCache::new(lm.info().n_layers);
    let mut logits = lm
        .forward(&embeds, &mask, Some(&mut cache), LogitsAt::Last)
        .unwrap(); // [B, V]
    assert_eq!(cache.seq_len(), embeds.dim(1).unwrap());
    let (mut tokens, mut all) = (vec![Vec::new(); b], Vec::new());
    for step in 0..steps {
        all.push(logits.clone());
        let next = logits.argmax_keepdim(D::Minus1).unwrap(); // [B, 1] u32
        let ids = next.flatten_all().unwrap().to_vec1::<u32>().unwrap();
        for (row, id) in ids.into_iter().enumerate() {
            tokens[row].push(id as i64);
        }
        if step + 1 == steps {
            break;
        }
        let ones = Tensor::ones((b, 1), DType::F32, &Device::Cpu).unwrap();
        mask = Tensor::cat(&[&mask, &ones], 1).unwrap();
        let emb = lm.embed(&next).unwrap(); // [B, 1, D]
        logits = lm
            .forward(&emb, &mask, Some(&mut cache), LogitsAt::Last)
            .unwrap();
    }
    (tokens, Tensor::stack(&all, 0).unwrap())
}

/// The autodiff gradient of `loss` at `prompt` against central differences on its
/// `largest` largest and `smallest` smallest entries, in f32, Richardson-extrapolated from
/// steps h and 2h (truncation error O(h^4); the rounding error of a loss of ~10 is
/// ~1e-6 / h): within 5e-4 x max |g|.
pub fn check_prompt_gradient(
    what: &str,
    prompt: &Tensor,
    loss: impl Fn(&Tensor) -> Tensor,
    largest: usize,
    smallest: usize,
) {
    let var = Var::from_tensor(prompt).unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads.get(var.as_tensor()).expect("prompt gradient");
    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let gmax = g.iter().fold(0f32, |m, x| m.max(x.abs()));
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let p0 = prompt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let loss_at = |i: usize, delta: f32| -> f64 {
        let mut p = p0.clone();
        p[i] += delta;
        let t = Tensor::from_slice(&p, prompt.dims(), &Device::Cpu).unwrap();
        let l = loss(&t).flatten_all().unwrap().get(0).unwrap();
        l.to_scalar::<f32>().unwrap() as f64
    };
    let h = 1e-2f32;
    for &i in order
        .iter()
        .take(largest)
        .chain(order.iter().rev().take(smallest))
    {
        let d1 = (loss_at(i, h) - loss_at(i, -h)) / (2.0 * h as f64);
        let d2 = (loss_at(i, 2.0 * h) - loss_at(i, -2.0 * h)) / (4.0 * h as f64);
        let fd = (4.0 * d1 - d2) / 3.0;
        let err = (fd - g[i] as f64).abs();
        assert!(
            err <= 5e-4 * gmax as f64,
            "{what}: prompt entry {i}: finite difference {fd} vs autodiff {} (max |g| {gmax})",
            g[i]
        );
    }
}

/// Mean cross-entropy of a labelled batch with `prompt` prepended, logits computed at the
/// scored rows only (see [`loss_rows`]).
pub fn prompted_loss(
    lm: &dyn CausalLm,
    prompt: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    labels: &Tensor,
) -> Tensor {
    let (embeds, mask) = with_prompt(lm, prompt, ids, mask);
    let (rows, targets) = loss_rows(labels, prompt.dim(0).unwrap());
    let logits = lm
        .forward(&embeds, &mask, None, LogitsAt::Rows(&rows))
        .unwrap(); // [M, V]
    softprompt::model::ops::token_nll(&logits, &targets)
        .unwrap()
        .mean_all()
        .unwrap()
}

/// The first element of `t` as f32.
pub fn scalar(t: &Tensor) -> f32 {
    t.flatten_all()
        .unwrap()
        .get(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
