#!/usr/bin/env bash
# Prompt initialisation ablation (Lester et al. 2021, section 3.2): a class-label-initialised
# and a random-uniform-initialised soft prompt, trained with identical settings on the
# movie-sentiment task of `softprompt run movie-sentiment` (SmolLM2-135M-Instruct, the same
# seeded split, template and verbalizer), and the dev accuracy of each every EVAL_EVERY steps.
#
#   scripts/init_ablation.sh [OUT]          (default OUT: runs/init-ablation)
#
# Environment: SOFTPROMPT (the binary, default: softprompt on PATH), STEPS (100), SEED (1),
# LR (Adafactor learning rate, 0.3: the paper's), EVAL_EVERY (10), DEV (200 dev examples), THRESHOLDS ("0.70 0.80 0.85"), THREADS (1 per run:
# the two runs go side by side, so each gets the same share of the machine).
#
# Writes OUT/data/{train,dev,test}.jsonl (the task's splits), OUT/<init>/ (adapter,
# metrics.jsonl, loss plot, task.json; the exported prompt is the most accurate on dev),
# OUT/<init>.log, and prints a table: step vs dev accuracy of each init, then the first step
# at which each reaches each threshold. Rerunning resumes unfinished runs from their checkpoints.
set -euo pipefail

OUT=${1:-runs/init-ablation}
BIN=${SOFTPROMPT:-softprompt}
STEPS=${STEPS:-100}
SEED=${SEED:-1}
LR=${LR:-0.3}
EVAL_EVERY=${EVAL_EVERY:-10}
DEV=${DEV:-200}
THRESHOLDS=${THRESHOLDS:-0.70 0.80 0.85}
THREADS=${THREADS:-1}
INITS=(class-labels random-uniform)

mkdir -p "$OUT"
common=(train --model smollm2 --data movie-sentiment --dev movie-sentiment --dev-limit "$DEV"
    --n-tokens 20 --optimizer adafactor --lr "$LR" --schedule constant --batch-size 8
    --steps "$STEPS" --eval-every "$EVAL_EVERY" --checkpoint-every "$EVAL_EVERY"
    --select-by accuracy --seed "$SEED" --resume --quiet)

echo "$(date -u +%FT%TZ) start: $BIN ${common[*]} --init {${INITS[*]}}" | tee "$OUT/command.txt"
pids=()
for init in "${INITS[@]}"; do
    extra=()
    if [ "$init" = class-labels ]; then
        extra=(--write-splits "$OUT/data")
    fi
    RAYON_NUM_THREADS=$THREADS "$BIN" "${common[@]}" --init "$init" "${extra[@]}" \
        --output "$OUT/$init" >"$OUT/$init.log" 2>&1 &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do
    wait "$p" || status=1
done
echo "$(date -u +%FT%TZ) done (exit status $status)" | tee -a "$OUT/command.txt"
for init in "${INITS[@]}"; do
    tail -n 2 "$OUT/$init.log"
done
[ "$status" = 0 ] || exit 1

python3 - "$OUT" "$THRESHOLDS" "${INITS[@]}" <<'EOF'
import json, sys
out, thresholds, inits = sys.argv[1], [float(t) for t in sys.argv[2].split()], sys.argv[3:]
acc = {}
for init in inits:
    with open(f"{out}/{init}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    acc[init] = {r["step"]: r["dev_accuracy"] for r in rows if "dev_accuracy" in r}
steps = sorted(set().union(*(a.keys() for a in acc.values())))
print("| step | " + " | ".join(f"{i} dev acc" for i in inits) + " |")
print("|---|" + "---|" * len(inits))
for s in steps:
    cells = [f"{100 * acc[i][s]:.1f} %" if s in acc[i] else "" for i in inits]
    print(f"| {s} | " + " | ".join(cells) + " |")
print()
print("| first step with dev acc >= | " + " | ".join(inits) + " |")
print("|---|" + "---|" * len(inits))
for t in thresholds:
    cells = []
    for i in inits:
        hit = [s for s in sorted(acc[i]) if acc[i][s] >= t - 1e-12]
        cells.append(str(hit[0]) if hit else f"not within {steps[-1]}")
    print(f"| {100 * t:.0f} % | " + " | ".join(cells) + " |")
EOF
