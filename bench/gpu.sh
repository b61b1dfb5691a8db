#!/usr/bin/env bash
# The train-step benchmark (crates/softprompt/benches/train_step.rs) on an NVIDIA GPU: builds
# the bench with `--features cuda` and runs the same models and shapes with BENCH_DEVICE=cuda,
# first in f32 (all models, the frozen matmul against candle's plain matmul), then in bf16
# (the T5 models: GPT-2 and Llama run in f32 only), printing the markdown tables. With
# PEFT=1 it also runs bench/peft_baseline.py on the GPU (--device cuda, f32).
#
#   bench/gpu.sh                                  # cuda:0, 3 steps per variant
#   GPU=1 ITERS=5 MODELS=gpt2,smollm2 bench/gpu.sh
#   PEFT=1 PEFT_VENV=/path/to/venv bench/gpu.sh   # a venv with torch (CUDA), transformers, peft
#
# nvcc: the one on PATH (or $NVCC, $CUDA_HOME); without one, scripts/cuda_toolchain.sh
# fetches CUDA 13.0 from PyPI into .cache/cuda (needs a driver for CUDA 13, 580 or newer).
# CUDA_COMPUTE_CAP is read from nvidia-smi when unset. BF16=0 skips the bf16 run.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU=${GPU:-0}
ITERS=${ITERS:-3}
MODELS=${MODELS:-t5-small,flan-t5-small,gpt2,smollm2}
VARIANTS=${VARIANTS:-composite,fused}
GEN=${GEN:-1}
BF16=${BF16:-1}
PEFT=${PEFT:-0}
PROFILE=${PROFILE:-bench}

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader >&2 2>/dev/null \
  || echo "gpu.sh: nvidia-smi failed; the run needs an NVIDIA GPU and driver" >&2
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  cap=$( (nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null || true) | sed -n "$((GPU + 1))p" | tr -d '. ')
  [ -z "$cap" ] || export CUDA_COMPUTE_CAP=$cap
fi
# cudarc's build script runs the `nvcc` on PATH to learn the CUDA version.
if ! command -v nvcc >/dev/null; then
  if [ -n "${NVCC:-}" ] && [ -x "$NVCC" ]; then
    PATH=$(dirname "$NVCC"):$PATH
  elif [ -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
    PATH=$CUDA_HOME/bin:$PATH
  else
    eval "$(scripts/cuda_toolchain.sh)"
  fi
fi
nvcc --version | tail -2 >&2 || true

BIN=$(cargo bench -p softprompt --features cuda --bench train_step --profile "$PROFILE" --no-run \
  --message-format=json-render-diagnostics | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "train_step":
        print(m["executable"])' | tail -1)
[ -n "$BIN" ] || { echo "gpu.sh: the bench did not build" >&2; exit 1; }
echo "softprompt bench: $BIN ($PROFILE profile, --features cuda)" >&2

run() { # dtype models
  BENCH_DEVICE=cuda:$GPU BENCH_DTYPE=$1 BENCH_MODELS=$2 BENCH_VARIANTS=$VARIANTS \
    BENCH_ITERS=$ITERS BENCH_GEN=$GEN "$BIN"
}
run f32 "$MODELS"
if [ "$BF16" = 1 ]; then
  t5=$(echo "$MODELS" | tr ',' '\n' | grep -x -e t5-small -e flan-t5-small | paste -sd, || true)
  [ -z "$t5" ] || run bf16 "$t5"
fi

if [ "$PEFT" = 1 ]; then
  PY=${PEFT_VENV:+$PEFT_VENV/bin/}python3
  [ -z "${PEFT_VENV:-}" ] && [ -x .cache/peft-venv/bin/python ] && PY=.cache/peft-venv/bin/python
  gen_flag=""; [ "$GEN" = 1 ] || gen_flag="--no-gen"
  echo -e "\n| model | implementation | step ms | input tokens/s | peak GPU MiB | gen tokens/s |\n|---|---|---:|---:|---:|---:|"
  "$PY" bench/peft_baseline.py --device "cuda:$GPU" --models "$MODELS" --iters "$ITERS" $gen_flag
fi
