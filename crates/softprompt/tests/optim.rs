//! Optimisers and schedules against independent references: tests/data/optim_reference.json, made
//! by scripts/optim_reference.py with optax's own `adafactor` / `adamw` (versions in the file), and
//! schedule values worked out by hand from the formulas in src/train/schedule.rs.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use softprompt::train::optim::{
    clip_grad_norm, Adafactor, AdafactorConfig, AdamW, AdamWConfig, Optimizer, OptimizerConfig, OptimizerState,
};
use softprompt::train::schedule::{Decay, Schedule};
use std::collections::HashMap;

/// Max |ours - reference| relative to max |reference| of each parameter, after each step.
const TOL_REL: f64 = 1e-6;

fn reference() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/optim_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("optim_reference.json")).expect("json")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn shape(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn tensor(values: &Value, shape: &[usize]) -> Tensor {
    Tensor::from_vec(floats(values), shape, &Device::Cpu).unwrap()
}

/// The case's initial parameters as vars.
fn init_vars(case: &Value) -> Vec<Var> {
    let params = case["params"].as_array().unwrap();
    params
        .iter()
        .map(|p| Var::from_tensor(&tensor(&p["init"], &shape(p))).unwrap())
        .collect()
}

/// A gradient store holding `grads[i]` for `vars[i]`.
fn grad_store(vars: &[Var], grads: &[Tensor]) -> GradStore {
    let mut store = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        store.insert(v.as_tensor(), g.clone());
    }
    store
}

/// The case's gradients of step `k`.
fn case_grads(case: &Value, k: usize) -> Vec<Tensor> {
    let params = case["params"].as_array().unwrap();
    let grads = case["grads"][k].as_array().unwrap();
    grads.iter().zip(params).map(|(g, p)| tensor(g, &shape(p))).collect()
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    let a = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let max_ref = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let max_diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    max_diff / max_ref
}

/// Runs every step of `case` with `opt` (built on `vars`) and compares with the expected params.
fn check_case(kind: &str, case: &Value, vars: &[Var], opt: &mut dyn Optimizer) {
    let name = case["name"].as_str().unwrap();
    let params = case["params"].as_array().unwrap();
    let lrs = case["lr"].as_array().unwrap();
    for (k, lr) in lrs.iter().enumerate() {
        let store = grad_store(vars, &case_grads(case, k));
        let n = opt.step(&store, lr.as_f64().unwrap()).unwrap();
        assert_eq!(n, vars.len(), "{kind}/{name}: every var has a gradient");
        for (i, (var, p)) in vars.iter().zip(params).enumerate() {
            let expected = tensor(&case["expected"][k][i], &shape(p));
            let err = rel_err(var.as_tensor(), &expected);
            assert!(
                err <= TOL_REL,
                "{kind}/{name}: step {}, param {i}: relative error {err:.3e}",
                k + 1
            );
        }
    }
}

fn adafactor_config(c: &Value) -> AdafactorConfig {
    assert_eq!(c["multiply_by_parameter_scale"], Value::Bool(false));
    AdafactorConfig {
        decay_rate: c["decay_rate"].as_f64().unwrap(),
        epsilon1: c["eps"].as_f64().unwrap(),
        clipping_threshold: c["clipping_threshold"].as_f64(),
        momentum: c["momentum"].as_f64(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        factored: true,
        min_dim_size_to_factor: c["min_dim_size_to_factor"].as_u64().unwrap() as usize,
    }
}

fn adamw_config(c: &Value) -> AdamWConfig {
    AdamWConfig {
        beta1: c["b1"].as_f64().unwrap(),
        beta2: c["b2"].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
    }
}

#[test]
fn adafactor_matches_optax() {
    let r = reference();
    let cases = r["adafactor"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let vars = init_vars(case);
        let mut opt = Adafactor::new(vars.clone(), adafactor_config(&case["config"])).unwrap();
        for (i, p) in case["params"].as_array().unwrap().iter().enumerate() {
            assert_eq!(
                opt.is_factored(i),
                p["factored"].as_bool().unwrap(),
                "{}: param {i}",
                case["name"]
            );
        }
        check_case("adafactor", case, &vars, &mut opt);
    }
}

#[test]
fn adamw_matches_optax() {
    let r = reference();
    let cases = r["adamw"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let vars = init_vars(case);
        let mut opt = AdamW::new(vars.clone(), adamw_config(&case["config"])).unwrap();
        check_case("adamw", case, &vars, &mut opt);
    }
}

#[test]
fn adafactor_default_is_the_recipe_and_factoring_rule() {
    let c = AdafactorConfig::default();
    assert_eq!(
        (c.decay_rate, c.epsilon1, c.clipping_threshold),
        (0.8, 1e-30, Some(1.0))
    );
    assert_eq!(
        (c.momentum, c.weight_decay, c.factored, c.min_dim_size_to_factor),
        (None, 1e-5, true, 128)
    );
    assert_eq!(c.factored_dims(&[100, 768]), None); // a 100-token prompt is not factored
    assert_eq!(c.factored_dims(&[128, 768]), Some((0, 1)));
    assert_eq!(c.factored_dims(&[768, 128]), Some((1, 0)));
    assert_eq!(c.factored_dims(&[130, 130]), Some((0, 1)));
    assert_eq!(c.factored_dims(&[4, 200, 300]), Some((1, 2)));
    assert_eq!(c.factored_dims(&[1000]), None);
    let off = AdafactorConfig { factored: false, ..c };
    assert_eq!(off.factored_dims(&[256, 256]), None);
}

/// Weight decay is not scaled by the learning rate (T5X / optax): with lr = 0 a step multiplies the
/// var by exactly 1 - weight_decay.
#[test]
fn adafactor_weight_decay_is_independent_of_lr() {
    let p0 = Tensor::new(&[[1.0f32, -2.0, 0.5], [3.0, 0.25, -1.0]], &Device::Cpu).unwrap();
    let var = Var::from_tensor(&p0).unwrap();
    let cfg = AdafactorConfig {
        weight_decay: 0.125,
        ..Default::default()
    };
    let mut opt = Adafactor::new(vec![var.clone()], cfg).unwrap();
    let g = Tensor::new(&[[0.1f32, 0.2, -0.3], [0.4, 0.5, 0.6]], &Device::Cpu).unwrap();
    assert_eq!(opt.step(&grad_store(std::slice::from_ref(&var), &[g]), 0.0).unwrap(), 1);
    let expected = (p0 * 0.875).unwrap();
    assert_eq!(
        var.as_tensor().to_vec2::<f32>().unwrap(),
        expected.to_vec2::<f32>().unwrap()
    );
}

#[test]
fn vars_without_gradient_are_skipped_and_counted() {
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[5.0f32, 6.0, 7.0], &dev).unwrap()).unwrap();
    let b0 = b.as_tensor().to_vec1::<f32>().unwrap();
    let ga = Tensor::new(&[[0.5f32, -0.5], [0.25, 1.0]], &dev).unwrap();
    let configs = [
        OptimizerConfig::Adafactor(AdafactorConfig {
            momentum: Some(0.9),
            ..Default::default()
        }),
        OptimizerConfig::AdamW(AdamWConfig::new(0.01)),
    ];
    for config in configs {
        let mut opt = config.build(vec![a.clone(), b.clone()]).unwrap();
        let store = grad_store(std::slice::from_ref(&a), std::slice::from_ref(&ga));
        assert_eq!(opt.step(&store, 0.1).unwrap(), 1);
        assert_eq!(opt.step(&GradStore::default(), 0.1).unwrap(), 0);
        assert_eq!(
            b.as_tensor().to_vec1::<f32>().unwrap(),
            b0,
            "{config:?}: b has no gradient"
        );
        let state = opt.state().unwrap();
        let prefix = match config {
            OptimizerConfig::Adafactor(_) => "adafactor",
            OptimizerConfig::AdamW(_) => "adamw",
        };
        assert_eq!(state.scalar(&format!("{prefix}.0.step")).unwrap(), 1.0);
        assert_eq!(state.scalar(&format!("{prefix}.1.step")).unwrap(), 0.0);
        // A gradient of the wrong shape is an error, not a silent broadcast.
        let bad = grad_store(
            std::slice::from_ref(&b),
            &[Tensor::zeros((2, 2), DType::F32, &dev).unwrap()],
        );
        assert!(opt.step(&bad, 0.1).is_err());
        assert!(opt.step(&store, f64::NAN).is_err());
    }
}

fn snapshot(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// Saves a state the way a checkpoint would: tensors through a safetensors file, scalars through JSON.
fn through_files(state: &OptimizerState, tag: &str) -> OptimizerState {
    let dir = std::env::temp_dir().join(format!("softprompt-optim-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let st = dir.join("optimizer.safetensors");
    candle_core::safetensors::save(&state.tensors, &st).unwrap();
    let json = serde_json::to_string(&state.scalars).unwrap();
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let scalars: HashMap<String, f64> = serde_json::from_str(&json).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    OptimizerState { tensors, scalars }
}

/// 2 steps, save, 2 more steps; versus: restore params + state into a fresh optimizer, the same
/// 2 steps. Params and states must be bit-identical.
#[test]
fn state_round_trip_resumes_bit_exactly() {
    let r = reference();
    // Factored + unfactored vars, with momentum; and AdamW with weight decay and a changing lr.
    let runs = [
        (&r["adafactor"][2], "adafactor"),
        (&r["adafactor"][0], "adafactor"),
        (&r["adamw"][1], "adamw"),
    ];
    for (case, kind) in runs {
        let name = case["name"].as_str().unwrap();
        let build = |vars: Vec<Var>| -> Box<dyn Optimizer> {
            match kind {
                "adafactor" => Box::new(Adafactor::new(vars, adafactor_config(&case["config"])).unwrap()),
                _ => Box::new(AdamW::new(vars, adamw_config(&case["config"])).unwrap()),
            }
        };
        let lrs: Vec<f64> = case["lr"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let vars = init_vars(case);
        let mut opt = build(vars.clone());
        for (k, &lr) in lrs.iter().enumerate().take(2) {
            opt.step(&grad_store(&vars, &case_grads(case, k)), lr).unwrap();
        }
        let saved_params = snapshot(&vars);
        let saved_state = through_files(&opt.state().unwrap(), name);
        for (k, &lr) in lrs.iter().enumerate().skip(2) {
            opt.step(&grad_store(&vars, &case_grads(case, k)), lr).unwrap();
        }

        let shapes: Vec<Vec<usize>> = vars.iter().map(|v| v.dims().to_vec()).collect();
        let vars2: Vec<Var> = saved_params
            .iter()
            .zip(&shapes)
            .map(|(p, s)| Var::from_tensor(&Tensor::from_vec(p.clone(), s.as_slice(), &Device::Cpu).unwrap()).unwrap())
            .collect();
        let mut opt2 = build(vars2.clone());
        opt2.load_state(&saved_state).unwrap();
        for (k, &lr) in lrs.iter().enumerate().skip(2) {
            opt2.step(&grad_store(&vars2, &case_grads(case, k)), lr).unwrap();
        }
        assert_eq!(
            snapshot(&vars),
            snapshot(&vars2),
            "{kind}/{name}: resumed params differ"
        );
        let (s1, s2) = (opt.state().unwrap(), opt2.state().unwrap());
        assert_eq!(s1.scalars, s2.scalars);
        let mut keys: Vec<&String> = s1.tensors.keys().collect();
        keys.sort();
        assert_eq!(keys.len(), s2.tensors.len());
        for key in keys {
            let a = s1.tensors[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = s2.tensor(key).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{kind}/{name}: state `{key}` differs");
        }
    }
}

#[test]
fn load_state_rejects_mismatches() {
    let dev = Device::Cpu;
    let var = || Var::from_tensor(&Tensor::ones((3, 4), DType::F32, &dev).unwrap()).unwrap();
    let ada = Adafactor::new(vec![var()], AdafactorConfig::default()).unwrap();
    let mut adam = AdamW::new(vec![var()], AdamWConfig::new(0.0)).unwrap();
    // Another optimizer's state.
    assert!(adam.load_state(&ada.state().unwrap()).is_err());
    // Other shapes.
    let other = AdamW::new(
        vec![Var::zeros((4, 3), DType::F32, &dev).unwrap()],
        AdamWConfig::new(0.0),
    )
    .unwrap();
    assert!(adam.load_state(&other.state().unwrap()).is_err());
    // More vars than this optimizer has.
    let two = AdamW::new(vec![var(), var()], AdamWConfig::new(0.0)).unwrap();
    assert!(adam.load_state(&two.state().unwrap()).is_err());
    // A fractional step count.
    let mut st = adam.state().unwrap();
    st.scalars.insert("adamw.0.step".into(), 1.5);
    assert!(adam.load_state(&st).is_err());
    // Its own state loads.
    adam.load_state(&adam.state().unwrap()).unwrap();
}

#[test]
fn clip_grad_norm_scales_to_max_norm() {
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[3.0f32, 4.0], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[[12.0f32]], &dev).unwrap()).unwrap();
    let c = Var::from_tensor(&Tensor::new(&[1.0f32], &dev).unwrap()).unwrap(); // no gradient
    let vars = [a.clone(), b.clone(), c.clone()];
    let grads = [
        Tensor::new(&[3.0f32, 4.0], &dev).unwrap(),
        Tensor::new(&[[12.0f32]], &dev).unwrap(),
    ];
    // |g| = sqrt(9 + 16 + 144) = 13: above 6.5, so every gradient is scaled by 6.5 / (13 + 1e-6).
    let mut store = grad_store(&vars[..2], &grads);
    let norm = clip_grad_norm(&mut store, &vars, 6.5).unwrap();
    assert!((norm - 13.0).abs() < 1e-9, "{norm}");
    let s = 6.5 / (13.0 + 1e-6);
    let ga = store.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    let gb = store.get(b.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    for (x, y) in ga.iter().zip([3.0 * s, 4.0 * s]) {
        assert!((*x as f64 - y).abs() < 1e-6, "{x} vs {y}");
    }
    assert!((gb[0][0] as f64 - 12.0 * s).abs() < 1e-6);
    assert!(store.get(c.as_tensor()).is_none());
    // Below the limit: untouched.
    let mut store = grad_store(&vars[..2], &grads);
    assert!((clip_grad_norm(&mut store, &vars, 20.0).unwrap() - 13.0).abs() < 1e-9);
    assert_eq!(
        store.get(a.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
        vec![3.0, 4.0]
    );
    assert!(clip_grad_norm(&mut store, &vars, 0.0).is_err());
}

#[track_caller]
fn assert_lr(s: &Schedule, step: usize, expected: f64) {
    let got = s.lr_at(step);
    assert!(
        (got - expected).abs() < 1e-12,
        "{:?} at step {step}: {got} != {expected}",
        s.decay
    );
}

#[test]
fn schedules_by_hand() {
    let c = Schedule::constant(0.3);
    c.validate().unwrap();
    for step in [0, 1, 1000] {
        assert_lr(&c, step, 0.3);
    }

    // Warmup over 4 steps: lr * (s + 1) / 4.
    let w = Schedule::warmup_constant(0.2, 4);
    w.validate().unwrap();
    for (step, lr) in [(0, 0.05), (1, 0.1), (2, 0.15), (3, 0.2), (4, 0.2), (100, 0.2)] {
        assert_lr(&w, step, lr);
    }

    // Linear: warmup 2, T = 10, decay over 8 steps: 1 - (s - 2) / 8.
    let l = Schedule::linear(1.0, 2, 10);
    l.validate().unwrap();
    for (step, lr) in [
        (0, 0.5),
        (1, 1.0),
        (2, 1.0),
        (3, 0.875),
        (6, 0.5),
        (9, 0.125),
        (10, 0.0),
        (50, 0.0),
    ] {
        assert_lr(&l, step, lr);
    }
    // Linear without warmup to lr_end = 0.1: 0.1 + 0.9 * (1 - s / 4).
    let l2 = Schedule {
        lr_end: 0.1,
        ..Schedule::linear(1.0, 0, 4)
    };
    for (step, lr) in [(0, 1.0), (1, 0.775), (2, 0.55), (4, 0.1)] {
        assert_lr(&l2, step, lr);
    }

    // Cosine: warmup 1, T = 5, q = (s - 1) / 4: (1 + cos(pi q)) / 2 * 2.0.
    let cos = Schedule::cosine(2.0, 1, 5);
    cos.validate().unwrap();
    let half_sqrt2 = std::f64::consts::FRAC_1_SQRT_2;
    for (step, lr) in [
        (0, 2.0),
        (1, 2.0),
        (2, 1.0 + half_sqrt2), // q = 1/4: (1 + sqrt(2)/2)
        (3, 1.0),              // q = 1/2
        (4, 1.0 - half_sqrt2), // q = 3/4
        (5, 0.0),
        (9, 0.0),
    ] {
        assert_lr(&cos, step, lr);
    }
    assert_eq!(cos.decay, Decay::Cosine);

    assert!(Schedule::linear(1.0, 10, 10).validate().is_err());
    assert!(Schedule::constant(f64::NAN).validate().is_err());
    assert!(Schedule::constant(-0.1).validate().is_err());
}
