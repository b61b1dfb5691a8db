#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a bounded time with cargo-fuzz (libFuzzer).
#
#   scripts/fuzz.sh                 # every target, 60 s each
#   scripts/fuzz.sh 300 gguf        # only `gguf`, 300 s
#   FUZZ_RUNS=1000000 scripts/fuzz.sh 0 dataset   # a fixed number of executions instead
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a C++ compiler (libFuzzer is built from
# source). cargo-fuzz passes nightly-only rustc flags (-Z...); on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets it use them. The sanitizer is off (pure Rust: overflow and bounds
# checks are on through debug assertions, which cargo-fuzz enables); set FUZZ_SANITIZER=address
# for ASan on a nightly toolchain.
#
# New interesting inputs go to fuzz/corpus/<target>/ (git-ignored); the committed seeds are in
# fuzz/seeds/<target>/. Crashes are written to fuzz/artifacts/<target>/: copy each into
# fuzz/regressions/<target>/ once fixed (crates/softprompt/tests/fuzz_regressions.rs checks it;
# crates/softprompt-serve/tests/fuzz_regressions.rs for server_request).
# A summary line per target (executions, crashes, peak RSS) is printed at the end.
#
# Memory: each run may use FUZZ_RSS_LIMIT_MB (default 2048) before libFuzzer reports an
# out-of-memory crash (`oom-*`). The targets' own work is small (tiny models, inputs of at most
# -max_len bytes), so the limit sits well above what any honest input needs but far below what
# a field multiplying memory reaches (one `num_transformer_submodules` of 1000 wrote ~2 GB per
# upload, under the former 4096 MB limit); the targets also check the bytes they write.
set -uo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(gguf peft_adapter dataset bigbench checkpoint server_request)
fi
sanitizer=${FUZZ_SANITIZER:-none}
rss_limit=${FUZZ_RSS_LIMIT_MB:-2048}
limits=(-max_total_time="$seconds")
if [ -n "${FUZZ_RUNS:-}" ]; then
  limits=(-runs="$FUZZ_RUNS")
fi

export RUSTC_BOOTSTRAP=1
# The targets write each input to a file here (in memory where /dev/shm exists).
scratch_base=/dev/shm
[ -d "$scratch_base" ] || scratch_base=${TMPDIR:-/tmp}
SOFTPROMPT_FUZZ_SCRATCH=$(mktemp -d "$scratch_base/softprompt-fuzz.XXXXXX") || exit 1
export SOFTPROMPT_FUZZ_SCRATCH
trap 'rm -rf "$SOFTPROMPT_FUZZ_SCRATCH"' EXIT
cargo fuzz build --sanitizer "$sanitizer" || exit 1

summary=()
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log="artifacts/$t/last-run.log"
  echo "== fuzzing $t (${limits[*]})"
  cargo fuzz run --sanitizer "$sanitizer" "$t" "corpus/$t" "seeds/$t" -- \
    "${limits[@]}" -rss_limit_mb="$rss_limit" -malloc_limit_mb="$rss_limit" -timeout=20 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1)
  peak=$(grep -E '^stat::peak_rss_mb' "$log" | awk '{print $2}' | tail -1)
  crashes=$(find "artifacts/$t" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) | wc -l)
  if [ "$rc" -ne 0 ]; then
    status=1
    tail -30 "$log"
  fi
  summary+=("$t: ${execs:-?} executions, peak RSS ${peak:-?} MB, exit $rc, $crashes crash/oom/timeout files in fuzz/artifacts/$t")
done
echo
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit "$status"
