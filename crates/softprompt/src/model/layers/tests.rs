//! The fused sub-blocks against the same sub-blocks composed of single ops (whose gradients
//! candle's autograd computes): outputs, the input gradient of a random projection of the
//! output, and the keys and values a prefill hands to the KV cache.

use super::*;
use crate::kernels::attention::ROW_BLOCK;
use crate::kernels::Kernels;
use crate::model::ops::{self, Activation};
use crate::model::{attention_bias, sliding_window_bias, KvCache};
use candle_core::{DType, Device, Tensor, Var};

/// Deterministic pseudo-random values in [-scale, scale).
fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

use crate::kernels::tests::{assert_rel, max_abs};

/// Runs `fused` and `composite` on the same input; compares outputs and input gradients
/// of `sum(y * probe)`.
fn check(
    what: &str,
    x: &Tensor,
    fused: impl Fn(&Tensor) -> Tensor,
    composite: impl Fn(&Tensor) -> Tensor,
) {
    let xv = Var::from_tensor(x).unwrap();
    let y = fused(xv.as_tensor());
    let y_ref = composite(xv.as_tensor());
    assert_rel(&format!("{what}: forward"), &y, &y_ref, 1e-5);
    let probe = rand(y.dims(), 99, 1.0);
    let g = (&y * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_ref = (&y_ref * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (g, g_ref) = (
        g.get(xv.as_tensor()).unwrap(),
        g_ref.get(xv.as_tensor()).unwrap(),
    );
    assert_rel(&format!("{what}: grad x"), g, g_ref, 1e-4);
    // Without a gradient to compute: same output, nothing kept.
    let y_inf = fused(x);
    assert_rel(&format!("{what}: inference"), &y_inf, &y, 1e-6);
    assert!(max_abs(&y) > 0.0);
}

/// Random attention weights: `D`, heads, kv heads, head dim; q/k/v biases when `biased`,
/// an o bias when `o_bias`.
fn attention(
    d: usize,
    (h, hkv, dh): (usize, usize, usize),
    seed: u64,
    biased: bool,
    o_bias: bool,
    norm: &str,
    scale: f64,
) -> Attention {
    let lin = |n: usize, k: usize, s: u64, b: bool| {
        Linear::new(rand(&[n, k], s, 0.4), b.then(|| rand(&[n], s + 1, 0.2)))
    };
    let w = (rand(&[d], seed, 0.3) + 1.0).unwrap();
    Attention {
        norm: match norm {
            "layer" => Norm::layer(w, rand(&[d], seed + 1, 0.3), 1e-5),
            _ => Norm::rms(w, 1e-5),
        },
        q: lin(h * dh, d, seed + 2, biased),
        k: lin(hkv * dh, d, seed + 4, biased),
        v: lin(hkv * dh, d, seed + 6, biased),
        qkv: None,
        o: lin(d, h * dh, seed + 8, o_bias),
        heads: h,
        kv_heads: hkv,
        head_dim: dh,
        scale,
        options: AttentionOptions::default(),
    }
}

/// `attn` with its q, k, v stacked into `qkv` and replaced by views of it.
fn stacked(mut attn: Attention) -> Attention {
    let parts = [&attn.q, &attn.k, &attn.v];
    let w = Tensor::cat(&parts.map(|p| p.w.as_dense().unwrap()), 0).unwrap();
    let b = Tensor::cat(&parts.map(|p| p.b.as_ref().unwrap()), 0).unwrap();
    let sizes = parts.map(|p| p.w.dims2().unwrap().0);
    let mut start = 0;
    for (p, n) in [&mut attn.q, &mut attn.k, &mut attn.v]
        .into_iter()
        .zip(sizes)
    {
        *p = Linear::new(
            w.narrow(0, start, n).unwrap(),
            Some(b.narrow(0, start, n).unwrap()),
        );
        start += n;
    }
    attn.qkv = Some(Linear::new(w, Some(b)));
    attn
}

/// A padded batch mask `[B, T]`: row `i` has its last `i` positions padded.
fn padded_mask(b: usize, t: usize) -> Tensor {
    let v: Vec<f32> = (0..b)
        .flat_map(|i| (0..t).map(move |j| if j + i < t { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

fn rotary(dh: usize, t: usize, interleaved: bool) -> Rotary {
    let (cos, sin) = ops::rope_tables(dh, 10000.0, 0, t, &Device::Cpu).unwrap();
    Rotary {
        cos,
        sin,
        interleaved,
    }
}

/// [`check`] on the whole sequence and at some rows (a repeated one included).
fn check_attn(what: &str, x: &Tensor, attn: &Attention, ctx: &AttentionContext) {
    assert!(attn.fused_applies(x, ctx), "{what}: fused path not taken");
    check(
        what,
        x,
        |x| attn.forward(x, ctx, None, None).unwrap(),
        |x| attn.composite(x, ctx, None).unwrap(),
    );
    let (b, t, d) = x.dims3().unwrap();
    let rows = Tensor::new(&[(b * t - 1) as u32, 2, 13, 6, 13], &Device::Cpu).unwrap();
    check(
        &format!("{what} at rows"),
        x,
        |x| attn.forward(x, ctx, Some(&rows), None).unwrap(),
        |x| {
            let y = attn.composite(x, ctx, None).unwrap();
            y.reshape((b * t, d))
                .unwrap()
                .index_select(&rows, 0)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
        },
    );
}

fn ctx<'a>(bias: &'a Tensor, rotary: Option<&'a Rotary>) -> AttentionContext<'a> {
    AttentionContext {
        bias,
        rotary,
        sliding: None,
        kernels: Kernels::fast(),
    }
}

#[test]
fn attention_block_matches_composite() {
    let (b, t, d) = (3, 7, 24);
    let x = rand(&[b, t, d], 1, 1.0);
    let causal = attention_bias(&padded_mask(b, t), t, true).unwrap(); // [B, 1, T, T]
                                                                       // Llama-style: RMSNorm, grouped-query attention, rotary (both layouts), q/k/v biases or
                                                                       // none.
    for (interleaved, biased) in [(false, false), (true, true)] {
        let attn = attention(d, (6, 2, 4), 10, biased, false, "rms", 0.5);
        let r = rotary(4, t, interleaved);
        check_attn(
            &format!("llama-style (interleaved {interleaved}, biases {biased})"),
            &x,
            &attn,
            &ctx(&causal, Some(&r)),
        );
    }
    // GPT-2-style: LayerNorm, biases everywhere, no rotary; q, k, v also stacked in one
    // projection (the composite path's single product) with q, k, v as views of it.
    let attn = attention(d, (3, 3, 8), 20, true, true, "layer", 0.3);
    check_attn("gpt2-style", &x, &attn, &ctx(&causal, None));
    check_attn(
        "gpt2-style, stacked qkv",
        &x,
        &stacked(attn),
        &ctx(&causal, None),
    );
    // T5-style: a bias per head and row `[B, H, T, T]` (position bias plus padding), and one
    // shared by the batch `[1, H, T, T]`; no scaling, inner width != D.
    let (h, dh) = (4, 5);
    let attn = attention(d, (h, h, dh), 30, false, false, "rms", 1.0);
    let pos = rand(&[1, h, t, t], 31, 2.0);
    let full = attention_bias(&padded_mask(b, t), t, false)
        .unwrap()
        .broadcast_add(&pos)
        .unwrap();
    for bias in [&full, &pos] {
        check_attn(
            &format!("t5-style (bias {:?})", bias.dims()),
            &x,
            &attn,
            &ctx(bias, None),
        );
    }
}

/// Sequences longer than a row block, causal, padded on the right (row 0) and on the left
/// (row 1: its first queries see no real key, so their softmax spreads over every key):
/// the blocks skip masked keys exactly.
#[test]
fn causal_row_blocks_match_composite() {
    let (b, t, d) = (2, 2 * ROW_BLOCK + 6, 16);
    let x = rand(&[b, t, d], 5, 1.0);
    let mask: Vec<f32> = (0..t)
        .map(|j| if j + 5 < t { 1.0 } else { 0.0 })
        .chain((0..t).map(|j| if j >= 3 { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
    let causal = attention_bias(&mask, t, true).unwrap(); // [B, 1, T, T]
    let attn = attention(d, (4, 2, 4), 60, true, true, "rms", 0.5);
    let r = rotary(4, t, false);
    check_attn("causal, 3 row blocks", &x, &attn, &ctx(&causal, Some(&r)));
}

#[test]
fn feed_forward_block_matches_composite() {
    let (b, t, d, f) = (2, 5, 12, 20);
    let x = rand(&[b, t, d], 2, 1.0);
    let norm_w = (rand(&[d], 40, 0.3) + 1.0).unwrap();
    let rms = Norm::rms(norm_w.clone(), 1e-5);
    let layer = Norm::layer(norm_w, rand(&[d], 41, 0.3), 1e-5);
    let (wg, bg) = (rand(&[f, d], 42, 0.5), rand(&[f], 43, 0.3));
    let (wu, bu) = (rand(&[f, d], 44, 0.5), rand(&[f], 45, 0.3));
    let (wd, bd) = (rand(&[d, f], 46, 0.5), rand(&[d], 47, 0.3));
    let lin = |w: &Tensor, b: Option<&Tensor>| Linear::new(w.clone(), b.cloned());
    let cases = [
        (
            "swiglu",
            &rms,
            FfnInner::Gated {
                gate: lin(&wg, None),
                up: lin(&wu, None),
            },
            Activation::Silu,
            None,
        ),
        (
            "gated gelu",
            &rms,
            FfnInner::Gated {
                gate: lin(&wg, Some(&bg)),
                up: lin(&wu, Some(&bu)),
            },
            Activation::GeluTanh,
            None,
        ),
        (
            "relu",
            &rms,
            FfnInner::Plain(lin(&wg, None)),
            Activation::Relu,
            None,
        ),
        (
            "gpt2 gelu",
            &layer,
            FfnInner::Plain(lin(&wg, Some(&bg))),
            Activation::GeluTanh,
            Some(&bd),
        ),
    ];
    let k = Kernels::fast();
    for (what, norm, inner, act, down_b) in cases {
        let ffn = FeedForward {
            norm: norm.clone(),
            inner,
            act,
            down: lin(&wd, down_b),
            output_norm: None,
        };
        assert!(ffn.fused_applies(k, &x), "{what}: fused path not taken");
        check(
            what,
            &x,
            |x| ffn.forward(k, x).unwrap(),
            |x| ffn.composite(k, x).unwrap(),
        );
    }
    // Exact GELU has no fused kernel: the composite ops run instead.
    let ffn = FeedForward {
        norm: rms,
        inner: FfnInner::Plain(lin(&wg, None)),
        act: Activation::GeluErf,
        down: lin(&wd, None),
        output_norm: None,
    };
    assert!(!ffn.fused_applies(k, &x));
}

#[test]
fn trained_weight_takes_the_composite_path() {
    let (b, t, d, f) = (2, 3, 8, 10);
    let x = Var::from_tensor(&rand(&[b, t, d], 3, 1.0)).unwrap();
    let wg = Var::from_tensor(&rand(&[f, d], 50, 0.5)).unwrap();
    let ffn = FeedForward {
        norm: Norm::rms(Tensor::ones(d, DType::F32, &Device::Cpu).unwrap(), 1e-5),
        inner: FfnInner::Plain(Linear::new(wg.as_tensor().clone(), None)),
        act: Activation::Relu,
        down: Linear::new(rand(&[d, f], 51, 0.5), None),
        output_norm: None,
    };
    assert!(!ffn.fused_applies(Kernels::fast(), x.as_tensor()));
    let y = ffn.forward(Kernels::fast(), x.as_tensor()).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(
        grads.get(wg.as_tensor()).is_some(),
        "the trained weight has a gradient"
    );
}

/// The forward-only op that fills an empty KV cache against the cache path of single ops:
/// the output (whole sequence and at rows) and the keys (rotated) and values
/// `[B, H_kv, T, Dh]` in the cache, with a left-padded causal mask longer than a row block;
/// a grouped-query rotary (Llama) and a GPT-2-style block. An input that needs a gradient
/// takes the cache path of single ops, with the same results.
#[test]
fn prefill_with_kv_matches_cache_path() {
    let (b, t, d) = (3, ROW_BLOCK + 9, 24);
    let x = rand(&[b, t, d], 7, 1.0);
    // Row `i` has its first `3 i` positions padded.
    let mask: Vec<f32> = (0..b)
        .flat_map(|i| (0..t).map(move |j| if j < 3 * i { 0.0 } else { 1.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
    let causal = attention_bias(&mask, t, true).unwrap(); // [B, 1, T, T]
    let check_kv = |what: &str, attn: &Attention, ctx: &AttentionContext| {
        assert!(attn.fused_applies(&x, ctx), "{what}: fused path not taken");
        let mut want = KvCache::new(1);
        let y_ref = attn.composite(&x, ctx, Some((&mut want, 0))).unwrap();
        let (k, v) = want.layers[0].clone().unwrap();
        let rows = Tensor::new(
            &[(t - 1) as u32, (2 * t - 1) as u32, (3 * t - 1) as u32],
            &Device::Cpu,
        )
        .unwrap();
        let y_rows = y_ref
            .reshape((b * t, d))
            .unwrap()
            .index_select(&rows, 0)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        for (label, input, at, y_want) in [
            ("", &x, None, &y_ref),
            (" at rows", &x, Some(&rows), &y_rows),
            (" with a gradient", xv.as_tensor(), None, &y_ref),
        ] {
            let mut cache = KvCache::new(1);
            let y = attn.forward(input, ctx, at, Some((&mut cache, 0))).unwrap();
            let (k_got, v_got) = cache.layers[0].clone().unwrap();
            assert_rel(&format!("{what}{label}: output"), &y, y_want, 1e-5);
            assert_rel(&format!("{what}{label}: keys"), &k_got, &k, 1e-5);
            assert_rel(&format!("{what}{label}: values"), &v_got, &v, 1e-5);
        }
    };
    // Llama-style: RMSNorm, grouped-query attention, rotary in both layouts.
    for interleaved in [false, true] {
        let attn = attention(d, (6, 2, 4), 70, interleaved, false, "rms", 0.5);
        let r = rotary(4, t, interleaved);
        check_kv(
            &format!("llama-style (interleaved {interleaved})"),
            &attn,
            &ctx(&causal, Some(&r)),
        );
    }
    // GPT-2-style: LayerNorm, biases everywhere, no rotary.
    let attn = attention(d, (3, 3, 8), 80, true, true, "layer", 0.3);
    check_kv("gpt2-style", &attn, &ctx(&causal, None));
}

/// Per-head q/k norms (Qwen3) through the fused op: forward, gradient, at rows and filling a
/// cache, against the composite path; the norms change the output (they are not dropped).
#[test]
fn attention_block_with_head_norms_matches_composite() {
    let (b, t, d, dh) = (3, 7, 24, 4);
    let x = rand(&[b, t, d], 3, 1.0);
    let causal = attention_bias(&padded_mask(b, t), t, true).unwrap();
    let plain = attention(d, (6, 2, dh), 30, true, false, "rms", 0.5);
    let mut normed = plain.clone();
    normed.options.head_norms = Some(HeadNorms {
        q: Norm::rms((rand(&[dh], 40, 0.3) + 1.0).unwrap(), 1e-6),
        k: Norm::rms((rand(&[dh], 41, 0.3) + 1.0).unwrap(), 1e-6),
    });
    for interleaved in [false, true] {
        let r = rotary(dh, t, interleaved);
        let ctx = ctx(&causal, Some(&r));
        check_attn(
            &format!("head norms (interleaved {interleaved})"),
            &x,
            &normed,
            &ctx,
        );
        let y = normed.forward(&x, &ctx, None, None).unwrap();
        let without = plain.forward(&x, &ctx, None, None).unwrap();
        assert!(
            max_abs(&(&y - &without).unwrap()) > 1e-2,
            "the norms change the output"
        );
        let mut cache = KvCache::new(1);
        let cached = normed
            .forward(&x, &ctx, None, Some((&mut cache, 0)))
            .unwrap();
        assert_rel("head norms: filling a cache", &cached, &y, 1e-6);
        let mut reference_cache = KvCache::new(1);
        normed
            .composite(&x, &ctx, Some((&mut reference_cache, 0)))
            .unwrap();
        let (keys, want) = (&cache.layers[0], &reference_cache.layers[0]);
        let (keys, want) = (keys.as_ref().unwrap(), want.as_ref().unwrap());
        assert_rel("head norms: cached keys", &keys.0, &want.0, 1e-5);
    }
    // Gemma 3's head norms, gain `1 + w`.
    let mut gemma = plain.clone();
    gemma.options.head_norms = Some(HeadNorms {
        q: Norm::rms_plus_one(rand(&[dh], 42, 0.3), 1e-6),
        k: Norm::rms_plus_one(rand(&[dh], 43, 0.3), 1e-6),
    });
    let r = rotary(dh, t, false);
    check_attn("(1 + w) head norms", &x, &gemma, &ctx(&causal, Some(&r)));
}

/// The sliding-window bias: query at position `q` sees keys `k` with `0 <= q - k < window`
/// and real, also with cached positions before the new ones.
#[test]
fn sliding_window_bias_masks_outside_the_window() {
    let (t, past, window) = (4, 3, 3);
    let mask = Tensor::from_vec(
        vec![0f32, 1., 1., 1., 1., 1., 1.], // slot 0 is a pad
        (1, past + t),
        &Device::Cpu,
    )
    .unwrap();
    let bias = sliding_window_bias(&mask, t, window).unwrap(); // [1, 1, T, P+T]
    let got: Vec<Vec<f32>> = bias
        .squeeze(0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    for (i, row) in got.iter().enumerate() {
        let q = past + i;
        for (k, &v) in row.iter().enumerate() {
            let seen = k != 0 && k <= q && q - k < window;
            assert_eq!(v == 0.0, seen, "query {q}, key {k}: bias {v}");
        }
    }
}

/// A sliding-window layer runs the fused op with the window's bias and its own rotary
/// tables, equal to the composite path (outputs and input gradients, whole sequence and at
/// rows, sequences longer than the window and than a row block), and fills a KV cache the
/// same way.
#[test]
fn sliding_window_attention_matches_composite() {
    let (b, t, d, window) = (2, ROW_BLOCK + 9, 16, 5);
    let x = rand(&[b, t, d], 9, 1.0);
    let mask: Vec<f32> = (0..b)
        .flat_map(|i| (0..t).map(move |j| if j < 4 * i { 0.0 } else { 1.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (b, t), &Device::Cpu).unwrap();
    let causal = attention_bias(&mask, t, true).unwrap();
    let windowed = sliding_window_bias(&mask, t, window).unwrap();
    let global = rotary(4, t, false);
    let (cos, sin) = ops::rope_tables(4, 100.0, 0, t, &Device::Cpu).unwrap();
    let local = Rotary {
        cos,
        sin,
        interleaved: false,
    };
    let mut attn = attention(d, (4, 2, 4), 90, false, false, "rms", 0.5);
    attn.options.sliding_window = Some(window);
    let c = AttentionContext {
        sliding: Some(SlidingContext {
            window,
            bias: &windowed,
            rotary: Some(&local),
        }),
        ..ctx(&causal, Some(&global))
    };
    check_attn("sliding window", &x, &attn, &c);
    // The window changes the result: the same layer without it differs.
    let plain = attention(d, (4, 2, 4), 90, false, false, "rms", 0.5);
    let y = attn.forward(&x, &c, None, None).unwrap();
    let y_plain = plain.forward(&x, &c, None, None).unwrap();
    assert!(max_abs(&(&y - &y_plain).unwrap()) > 1e-3);
    // Prefill with a cache, then one more position through the cache path.
    let mut cache = KvCache::new(1);
    let y_fill = attn.forward(&x, &c, None, Some((&mut cache, 0))).unwrap();
    assert_rel("sliding window prefill", &y_fill, &y, 1e-5);
    // Without a context for the window: an error, never the plain bias.
    let err = attn.forward(&x, &ctx(&causal, Some(&global)), None, None);
    assert!(err.is_err());
}

/// The options the fused op does not implement (soft-capped scores, a norm of the branch
/// output; here with Gemma's per-head `1 + w` norms) run the composite path, which equals
/// the same computation written out with candle ops.
#[test]
fn gemma_options_take_the_composite_path() {
    let (b, t, d, dh) = (2, 6, 16, 4);
    let x = rand(&[b, t, d], 11, 1.0);
    let causal = attention_bias(&padded_mask(b, t), t, true).unwrap();
    let r = rotary(dh, t, false);
    let c = ctx(&causal, Some(&r));
    let mut attn = attention(d, (4, 2, dh), 95, false, false, "rms", 0.5);
    let wq = rand(&[dh], 96, 0.5);
    let wk = rand(&[dh], 97, 0.5);
    let wo = rand(&[d], 98, 0.5);
    attn.options = AttentionOptions {
        sliding_window: None,
        head_norms: Some(HeadNorms {
            q: Norm::rms_plus_one(wq.clone(), 1e-6),
            k: Norm::rms_plus_one(wk.clone(), 1e-6),
        }),
        logit_softcap: Some(2.0),
        output_norm: Some(Norm::rms_plus_one(wo.clone(), 1e-6)),
    };
    assert!(!attn.fused_applies(&x, &c));
    let y = attn.forward(&x, &c, None, None).unwrap();
    // Written out: RMSNorm with gain 1 + w, per-head norms before the rotation.
    let rms = |v: &Tensor, w: &Tensor| {
        let ms = v
            .sqr()
            .unwrap()
            .mean_keepdim(candle_core::D::Minus1)
            .unwrap();
        let n = v
            .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        n.broadcast_mul(&(w + 1.0).unwrap()).unwrap()
    };
    let k = Kernels::reference();
    let h = attn.norm.forward(k, &x).unwrap();
    let q = rms(
        &ops::split_heads(&attn.q.forward(&h).unwrap(), 4).unwrap(),
        &wq,
    );
    let kk = rms(
        &ops::split_heads(&attn.k.forward(&h).unwrap(), 2).unwrap(),
        &wk,
    );
    let v = ops::split_heads(&attn.v.forward(&h).unwrap(), 2).unwrap();
    let (q, kk) = (r.apply(k, &q).unwrap(), r.apply(k, &kk).unwrap());
    // Scores by hand with the kv heads repeated: [B, H, T, T].
    let rep = |t: &Tensor| {
        let (b, hkv, n, e) = t.dims4().unwrap();
        t.unsqueeze(2)
            .unwrap()
            .broadcast_as((b, hkv, 2, n, e))
            .unwrap()
            .reshape((b, hkv * 2, n, e))
            .unwrap()
    };
    let scores = (q.matmul(&rep(&kk).t().unwrap()).unwrap() * 0.5).unwrap();
    let scores = ((scores / 2.0).unwrap().tanh().unwrap() * 2.0).unwrap();
    let probs = candle_nn_softmax(&scores.broadcast_add(&causal).unwrap());
    let a = probs.matmul(&rep(&v)).unwrap();
    let out = attn.o.forward(&ops::merge_heads(&a).unwrap()).unwrap();
    let want = (&x + rms(&out, &wo)).unwrap();
    assert_rel("gemma-style attention", &y, &want, 1e-5);
    // The same with the fused element-wise kernels and gradients: composite reference.
    check(
        "gemma-style attention, gradients",
        &x,
        |x| attn.forward(x, &c, None, None).unwrap(),
        |x| {
            let cr = AttentionContext {
                kernels: Kernels::reference(),
                ..c
            };
            attn.composite(x, &cr, None).unwrap()
        },
    );
}

/// Softmax over the last dimension with candle primitives.
fn candle_nn_softmax(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(candle_core::D::Minus1).unwrap();
    let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1).unwrap())
        .unwrap()
}

/// Gemma's feed-forward: `x + post(down(gelu(gate(n)) * up(n)))`, `n = pre(x)`, norms with
/// gain `1 + w`: the fused op gives the branch alone, equal to the composite path (outputs
/// and input gradients).
#[test]
fn feed_forward_with_output_norm_matches_composite() {
    let (b, t, d, f) = (2, 5, 12, 20);
    let x = rand(&[b, t, d], 12, 1.0);
    let ffn = FeedForward {
        norm: Norm::rms_plus_one(rand(&[d], 60, 0.3), 1e-6),
        inner: FfnInner::Gated {
            gate: Linear::new(rand(&[f, d], 61, 0.5), None),
            up: Linear::new(rand(&[f, d], 62, 0.5), None),
        },
        act: Activation::GeluTanh,
        down: Linear::new(rand(&[d, f], 63, 0.5), None),
        output_norm: Some(Norm::rms_plus_one(rand(&[d], 64, 0.3), 1e-6)),
    };
    let k = Kernels::fast();
    assert!(ffn.fused_applies(k, &x), "fused path not taken");
    check(
        "gemma feed-forward",
        &x,
        |x| ffn.forward(k, x).unwrap(),
        |x| ffn.composite(Kernels::reference(), x).unwrap(),
    );
}
