#!/usr/bin/env bash
# SmolLM2 prompt-tuning steps, one process x 2 threads against 2 MPI ranks x 1 thread, same
# global batch (docs/distributed.md, "Measured here"). Needs a binary built with
# `--features mpi` and Open MPI (scripts/install_mpi.sh).
#
#   bench/distributed_step.sh [REPS]      # alternates mpi, single, mpi, single, ...
#
# Each run: 10 steps, batch 8, 20 prompt tokens, no checkpoint or dev evaluation, under
# /usr/bin/time -v; prints the wall time, max RSS, the load, and the median step time,
# tokens/s and seconds in collectives (`comm_s`) of steps 2-10 from metrics.jsonl.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${SOFTPROMPT_BIN:-$root/target/debug/softprompt}
work=${WORK:-/tmp/softprompt-distributed-bench}
reps=${1:-2}
mkdir -p "$work"
# 200 synthetic review lines of 12-40 words (seeded).
python3 - "$work/train.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = ("the a movie film story actor plot scene music was is very quite rather not too so "
         "really good bad great boring fun dull charming clever slow fast funny sad dark bright "
         "long short with and but of in on about for").split()
with open(sys.argv[1], "w") as f:
    for _ in range(200):
        text = " ".join(random.choice(words) for _ in range(random.randint(12, 40)))
        f.write(json.dumps({"input": f"Review: {text}\nSentiment:",
                            "target": random.choice([" positive", " negative"])}) + "\n")
PY
one() {
  local kind=$1 rep=$2 out="$work/out-$1-$2"
  rm -rf "$out"
  local args=(train --model smollm2 --data "$work/train.jsonl" --output "$out" --steps 10
    --batch-size 8 --n-tokens 20 --checkpoint-every 0 --eval-every 0 --seed 1 --quiet)
  if [ "$kind" = single ]; then
    RAYON_NUM_THREADS=2 /usr/bin/time -v "$bin" "${args[@]}" --parallel none >"$out.log" 2>&1
  else
    RAYON_NUM_THREADS=1 /usr/bin/time -v mpirun -np 2 --bind-to none --allow-run-as-root \
      -x RAYON_NUM_THREADS "$bin" "${args[@]}" >"$out.log" 2>&1
  fi
  echo "$kind $rep: wall $(grep 'Elapsed (wall' "$out.log" | awk '{print $NF}')" \
    "max RSS $(grep 'Maximum resident' "$out.log" | awk '{print $NF}') kB" \
    "load $(cut -d' ' -f1 /proc/loadavg)"
  python3 - "$out/metrics.jsonl" <<'PY'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1])][1:]
step = [r["step_s"] for r in rows]
line = (f"  step s median {st.median(step):.3f} (min {min(step):.3f}, max {max(step):.3f}); "
        f"tokens/s median {st.median(r['tokens_per_s'] for r in rows):.0f}")
comm = [r["comm_s"] for r in rows if "comm_s" in r]
if comm:
    line += f"; comm_s median {1e3 * st.median(comm):.1f} ms (min {1e3 * min(comm):.1f} ms)"
print(line)
PY
}
for rep in $(seq 1 "$reps"); do
  one mpi "$rep"
  one single "$rep"
done
