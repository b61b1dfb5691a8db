#!/usr/bin/env bash
# Side-by-side CPU benchmark: softprompt (benches/train_step.rs, fused kernels) against
# PyTorch + PEFT prompt tuning (bench/peft_baseline.py), same shapes, same thread count,
# each model in its own process, the two implementations alternating round by round so that
# drifting machine load hits both. Prints a markdown table of means and the ratios.
#
#   bench/run_side_by_side.sh                      # all models, 2 rounds, 2 threads
#   MODELS=smollm2 ROUNDS=3 THREADS=2 ITERS=2 bench/run_side_by_side.sh
#
# softprompt is built with Cargo's `bench` profile (optimised like `--release`, which is how the
# CLI is run); PROFILE=dev uses the faster-to-build dev profile the tests share (the crate's own
# code at opt-level 1). The PEFT side uses the venv in $PEFT_VENV, else .cache/peft-venv, else
# /work/peft-venv; if none has torch, transformers and peft, the first run creates
# .cache/peft-venv (gitignored) with pinned versions from PyPI (about 5.6 GB: the PyPI torch
# wheel pulls the CUDA libraries too).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=${MODELS:-t5-small,flan-t5-small,gpt2,smollm2}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-2}
ITERS=${ITERS:-2}
GEN=${GEN:-1}
PROFILE=${PROFILE:-bench}
TORCH=torch==2.15.0
TRANSFORMERS=transformers==5.23.0
PEFT=peft==0.21.2

has_peft() { [ -x "$1/bin/python" ] && "$1/bin/python" -c "import torch, transformers, peft" 2>/dev/null; }
VENV=""
for v in ${PEFT_VENV:-} .cache/peft-venv /work/peft-venv; do
  if has_peft "$v"; then VENV=$v; break; fi
done
if [ -z "$VENV" ]; then
  VENV=.cache/peft-venv
  df -h . | tail -1
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH" "$TRANSFORMERS" "$PEFT"
fi
echo "PEFT venv: $VENV" >&2

case "$PROFILE" in
  dev) DIR=debug ;;
  bench|release) DIR=release ;;
  *) echo "PROFILE must be bench or dev" >&2; exit 2 ;;
esac
cargo bench -p softprompt --bench train_step --profile "$PROFILE" --no-run 2>/dev/null
BIN=$(ls -t target/$DIR/deps/train_step-* | grep -v '\.d$' | head -1)
echo "softprompt bench: $BIN ($PROFILE profile)" >&2

OUT=$(mktemp -d)
gen_flag=""; [ "$GEN" = 1 ] || gen_flag="--no-gen"
for round in $(seq 1 "$ROUNDS"); do
  for model in ${MODELS//,/ }; do
    echo "round $round: $model softprompt" >&2
    RAYON_NUM_THREADS=$THREADS BENCH_MODELS=$model BENCH_VARIANTS=fused BENCH_ITERS=$ITERS \
      BENCH_GEN=$GEN "$BIN" 2>/dev/null | grep '^BENCH_JSON' | sed 's/^BENCH_JSON //' >> "$OUT/rust.jsonl"
    echo "round $round: $model peft" >&2
    OMP_NUM_THREADS=$THREADS "$VENV/bin/python" bench/peft_baseline.py --models "$model" \
      --iters "$ITERS" --threads "$THREADS" $gen_flag 2>/dev/null \
      | grep '^BENCH_JSON' | sed 's/^BENCH_JSON //' >> "$OUT/peft.jsonl"
  done
done

"$VENV/bin/python" - "$OUT" "$MODELS" "$THREADS" <<'PY'
import json, sys
out, models, threads = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
def load(p):
    return [json.loads(l) for l in open(p) if l.strip()]
rust, peft = load(f"{out}/rust.jsonl"), load(f"{out}/peft.jsonl")
sgemm = [r["gflops"] for r in rust if r["kind"] == "sgemm"]
def mean(rows, model, key):
    v = [r[key] for r in rows if r.get("model") == model and r.get(key) is not None]
    return sum(v) / len(v) if v else None
f = lambda x, p=0: "-" if x is None else f"{x:.{p}f}"
print(f"\n{threads} threads; sgemm peak (candle, 2048^3) {f(max(sgemm) if sgemm else None, 1)} GFLOP/s\n")
print("| model | softprompt step ms | PEFT step ms | speed-up | softprompt tokens/s | PEFT tokens/s "
      "| softprompt peak RSS MiB | PEFT peak RSS MiB | RSS ratio | softprompt GFLOP/s (% of sgemm) "
      "| softprompt gen tok/s | PEFT gen tok/s | gen speed-up |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
peak = max(sgemm) if sgemm else None
for m in models:
    rs, ps = mean(rust, m, "step_ms"), mean(peft, m, "step_ms")
    rg, pg = mean(rust, m, "gen_tokens_per_s"), mean(peft, m, "gen_tokens_per_s")
    rr, pr = mean(rust, m, "peak_rss_mib"), mean(peft, m, "peak_rss_mib")
    gf = mean(rust, m, "gflops")
    print(f"| {m} | {f(rs)} | {f(ps)} | {f(ps / rs if rs and ps else None, 2)}x "
          f"| {f(mean(rust, m, 'input_tokens_per_s'))} | {f(mean(peft, m, 'input_tokens_per_s'))} "
          f"| {f(rr)} | {f(pr)} | {f(rr / pr if rr and pr else None, 2)} "
          f"| {f(gf, 1)} ({f(100 * gf / peak if gf and peak else None)}%) | {f(rg, 1)} | {f(pg, 1)} "
          f"| {f(rg / pg if rg and pg else None, 2)}x |")
PY
rm -rf "$OUT"
