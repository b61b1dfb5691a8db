#!/usr/bin/env python3
"""Reference numbers for the optimisers in crates/softprompt/src/train/optim.

Writes crates/softprompt/tests/data/optim_reference.json, which tests/optim.rs checks against.

* Adafactor: the numbers come from optax's own `optax.adafactor` (the algorithm of T5X's / flax's
  Adafactor that the prompt-tuning paper's code uses), run in float32 on the CPU.
* AdamW: from `optax.adamw`, which computes the same update as `torch.optim.AdamW`
  (decoupled weight decay scaled by the learning rate, eps added after the bias correction of `v`),
  run in float64 (jax x64 mode) on the float32 inputs: in float32 optax computes the bias corrections
  in float32 (1 - 0.999 is then off by 1.3e-5 relative), where torch uses Python floats; the float64
  run is the exact torch update, which a float32 implementation approximates to a few ulps.

Each number is cross-checked against a float64 numpy transcription of the reference formula
(T5X's `Adafactor.apply_param_gradient`, torch's `_single_tensor_adamw`), so a mistake in how optax is
called (for example, weight decay scaled by the learning rate or not) would fail here.

Usage: python3 scripts/optim_reference.py
It creates a virtual environment in .cache/optim-ref-venv (pinned versions below, from PyPI), re-runs
itself there, and writes the JSON. Python 3.11 is required (jax 0.10.2 has wheels for 3.11+). Two runs
give byte-identical output.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".cache" / "optim-ref-venv"
OUT = ROOT / "crates" / "softprompt" / "tests" / "data" / "optim_reference.json"
PINNED = [
    "jax[cpu]==0.10.2",
    "jaxlib==0.10.2",
    "optax==0.2.8",
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "ml_dtypes==0.6.0",
    "opt_einsum==3.4.0",
    "scipy==1.17.1",
]


def ensure_venv():
    """Re-executes this script inside the pinned virtual environment."""
    if os.environ.get("OPTIM_REF_IN_VENV") == "1":
        return
    py = VENV / "bin" / "python"
    if not py.exists():
        subprocess.check_call([sys.executable, "-m", "venv", str(VENV)])
        subprocess.check_call([str(py), "-m", "pip", "install", "--quiet", *PINNED])
    env = dict(os.environ, OPTIM_REF_IN_VENV="1", JAX_PLATFORMS="cpu")
    sys.exit(subprocess.call([str(py), __file__, *sys.argv[1:]], env=env))


ensure_venv()

import importlib.metadata as md  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

assert not jax.config.jax_enable_x64, "Adafactor's references are float32 computations"

N_STEPS = 4
# Gradient scale per step: the jumps make Adafactor's update clipping (RMS > 1) fire on some steps.
GRAD_SCALE = [1.0, 3.0, 0.5, 5.0]


def make_param(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def make_grads(rng, shape):
    """N_STEPS gradients with uneven row/column magnitudes (so the factored estimate is not trivial)."""
    if len(shape) == 2:
        row = np.exp(rng.uniform(-1.5, 1.5, size=(shape[0], 1)))
        col = np.exp(rng.uniform(-1.5, 1.5, size=(1, shape[1])))
        spread = row * col
    else:
        spread = np.exp(rng.uniform(-1.5, 1.5, size=shape))
    return [(rng.standard_normal(shape) * spread * s * 0.1).astype(np.float32) for s in GRAD_SCALE]


def flat(a):
    return [float(x) for x in np.asarray(a, dtype=np.float32).reshape(-1)]


# ------------------------------------------------------------------------------------------------
# Float64 transcriptions of the reference formulas (cross-checks only).
# ------------------------------------------------------------------------------------------------
def t5x_factored_dims(shape, min_dim):
    """T5X / optax heuristic: the two largest axes, if the smaller of them is >= min_dim."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    if shape[order[-2]] < min_dim:
        return None
    return int(order[-2]), int(order[-1])


def t5x_adafactor(params, grads_seq, lrs, cfg):
    """T5X Adafactor.apply_param_gradient with multiply_by_parameter_scale=False, in float64."""
    params = [p.astype(np.float64) for p in params]
    state = [dict(v_row=0.0, v_col=0.0, v=0.0, m=0.0) for _ in params]
    out, clip_active = [], []
    for step, (grads, lr) in enumerate(zip(grads_seq, lrs)):
        decay = 1.0 - (step + 1.0) ** (-cfg["decay_rate"])
        mixing = 1.0 - decay
        new_params, active = [], []
        for p, g, s in zip(params, grads, state):
            g = g.astype(np.float64)
            g2 = g * g + cfg["eps"]
            dims = t5x_factored_dims(p.shape, cfg["min_dim_size_to_factor"])
            if dims is not None:
                d1, d0 = dims  # d1: the smaller axis, d0: the larger one
                s["v_row"] = decay * s["v_row"] + mixing * g2.mean(axis=d0, keepdims=True)
                s["v_col"] = decay * s["v_col"] + mixing * g2.mean(axis=d1, keepdims=True)
                row_factor = (s["v_row"] / s["v_row"].mean(axis=d1, keepdims=True)) ** -0.5
                y = g * row_factor * s["v_col"] ** -0.5
            else:
                s["v"] = decay * s["v"] + mixing * g2
                y = g * s["v"] ** -0.5
            rms = np.sqrt(np.mean(y * y))
            active.append(bool(rms > cfg["clipping_threshold"]))
            y = y / max(1.0, rms / cfg["clipping_threshold"])
            sub = lr * y
            if cfg["momentum"] is not None:
                s["m"] = cfg["momentum"] * s["m"] + (1.0 - cfg["momentum"]) * sub
                sub = s["m"]
            new_params.append((1.0 - cfg["weight_decay"]) * p - sub)
        params = new_params
        out.append(params)
        clip_active.append(active)
    return out, clip_active


def torch_adamw(params, grads_seq, lrs, cfg):
    """torch.optim.AdamW (_single_tensor_adamw, amsgrad=False, maximize=False) in float64."""
    b1, b2, eps, wd = cfg["b1"], cfg["b2"], cfg["eps"], cfg["weight_decay"]
    params = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    out = []
    for step, (grads, lr) in enumerate(zip(grads_seq, lrs)):
        t = step + 1
        new_params = []
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.astype(np.float64)
            p = p * (1.0 - lr * wd)
            m[i] = b1 * m[i] + (1.0 - b1) * g
            v[i] = b2 * v[i] + (1.0 - b2) * g * g
            bc1 = 1.0 - b1**t
            bc2 = 1.0 - b2**t
            denom = np.sqrt(v[i]) / np.sqrt(bc2) + eps
            new_params.append(p - (lr / bc1) * m[i] / denom)
        params = new_params
        out.append(params)
    return out


# ------------------------------------------------------------------------------------------------
# optax runs
# ------------------------------------------------------------------------------------------------
def run_optax(tx, params, grads_seq):
    params = tuple(jnp.asarray(p) for p in params)
    state = tx.init(params)
    out = []
    for grads in grads_seq:
        updates, state = tx.update(tuple(jnp.asarray(g) for g in grads), state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(p) for p in params])
    return out


def flat64(a):
    return [float(x) for x in np.asarray(a, dtype=np.float64).reshape(-1)]


def check_close(what, optax_seq, ref_seq, rtol):
    for step, (a_list, b_list) in enumerate(zip(optax_seq, ref_seq)):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            err = np.max(np.abs(a.astype(np.float64) - b)) / max(1e-3, np.max(np.abs(b)))
            assert err < rtol, f"{what}: step {step + 1}, param {i}: optax vs transcription rel err {err:.2e}"


def adafactor_case(name, seed, shapes, cfg, lr=0.3):
    rng = np.random.default_rng(seed)
    params = [make_param(rng, s) for s in shapes]
    per_param = [make_grads(rng, s) for s in shapes]
    grads_seq = [[per_param[i][k] for i in range(len(shapes))] for k in range(N_STEPS)]
    lrs = [lr] * N_STEPS
    tx = optax.adafactor(
        learning_rate=lr,
        min_dim_size_to_factor=cfg["min_dim_size_to_factor"],
        decay_rate=cfg["decay_rate"],
        decay_offset=0,
        multiply_by_parameter_scale=False,
        clipping_threshold=cfg["clipping_threshold"],
        momentum=cfg["momentum"],
        weight_decay_rate=cfg["weight_decay"],
        eps=cfg["eps"],
        factored=True,
    )
    got = run_optax(tx, params, grads_seq)
    ref, clip_active = t5x_adafactor(params, grads_seq, lrs, cfg)
    check_close(f"adafactor/{name}", got, ref, 1e-5)
    factored = [t5x_factored_dims(s, cfg["min_dim_size_to_factor"]) is not None for s in shapes]
    return {
        "name": name,
        "config": {**cfg, "multiply_by_parameter_scale": False},
        "lr": lrs,
        "params": [{"shape": list(s), "factored": f, "init": flat(p)} for s, f, p in zip(shapes, factored, params)],
        "grads": [[flat(g) for g in grads] for grads in grads_seq],
        "expected": [[flat(p) for p in ps] for ps in got],
        "clip_active": clip_active,
    }


def adamw_case(name, seed, shapes, cfg, lrs):
    rng = np.random.default_rng(seed)
    params = [make_param(rng, s) for s in shapes]
    per_param = [make_grads(rng, s) for s in shapes]
    grads_seq = [[per_param[i][k] for i in range(len(shapes))] for k in range(N_STEPS)]
    with jax.enable_x64(True):
        tx = optax.adamw(
            learning_rate=lambda count: jnp.asarray(lrs, jnp.float64)[count],
            b1=cfg["b1"],
            b2=cfg["b2"],
            eps=cfg["eps"],
            eps_root=0.0,
            weight_decay=cfg["weight_decay"],
            nesterov=False,
        )
        got = run_optax(tx, [p.astype(np.float64) for p in params],
                        [[g.astype(np.float64) for g in grads] for grads in grads_seq])
    assert all(p.dtype == np.float64 for ps in got for p in ps)
    ref = torch_adamw(params, grads_seq, lrs, cfg)
    check_close(f"adamw/{name}", got, ref, 1e-12)
    return {
        "name": name,
        "config": cfg,
        "lr": lrs,
        "params": [{"shape": list(s), "init": flat(p)} for s, p in zip(shapes, params)],
        "grads": [[flat(g) for g in grads] for grads in grads_seq],
        "expected": [[flat64(p) for p in ps] for ps in got],
    }


def main():
    recipe = dict(min_dim_size_to_factor=128, decay_rate=0.8, eps=1e-30, clipping_threshold=1.0,
                  momentum=None, weight_decay=1e-5)
    adafactor = [
        # min_dim_size_to_factor lowered to 4 so that small parameters are factored; [8, 6] has its
        # larger axis first (the "row" statistics then run over axis 1); [7] and [5, 3] stay unfactored.
        adafactor_case("factored", 11, [(6, 8), (8, 6), (7,), (5, 3)], {**recipe, "min_dim_size_to_factor": 4}),
        # The recipe as is: [5, 8] is below 128 on both axes, so its second moment is not factored.
        adafactor_case("unfactored", 12, [(5, 8)], recipe),
        adafactor_case("momentum", 13, [(6, 8), (5, 8)], {**recipe, "min_dim_size_to_factor": 4, "momentum": 0.9}),
    ]
    for case in adafactor:
        flags = [a for step in case["clip_active"] for a in step]
        assert any(flags) and not all(flags), f"{case['name']}: clipping should fire on some steps only"
    adam = dict(b1=0.9, b2=0.999, eps=1e-8)
    adamw = [
        # The fixture's settings (tests/fixtures/*/expected.json -> results.adamw).
        adamw_case("fixture_settings", 21, [(5, 32)], {**adam, "weight_decay": 0.0}, [0.1] * N_STEPS),
        # Decoupled weight decay, a learning rate that changes every step, two parameters.
        adamw_case("weight_decay_schedule", 22, [(6, 8), (7,)], {**adam, "weight_decay": 0.01},
                   [0.1, 0.05, 0.2, 0.02]),
    ]
    versions = {k: md.version(k) for k in ["jax", "jaxlib", "optax", "numpy"]}
    doc = {
        "generator": "scripts/optim_reference.py",
        "python": sys.version.split()[0],
        "versions": versions,
        "description": (
            "Inputs and expected parameters (float32, row-major flat lists) after each optimizer step. "
            "adafactor: optax.adafactor(learning_rate=lr, multiply_by_parameter_scale=False, ...config); "
            "adamw: optax.adamw(...config, eps_root=0, nesterov=False) with a per-step learning rate, computed "
            "in float64 from the float32 inputs (see the script). "
            "expected[k][i] is parameter i after step k+1 (grads[k][i] applied with lr[k]); "
            "clip_active[k][i] says whether Adafactor's update clipping (RMS > threshold) fired."
        ),
        "adafactor": adafactor,
        "adamw": adamw,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes), versions {versions}")


if __name__ == "__main__":
    main()
