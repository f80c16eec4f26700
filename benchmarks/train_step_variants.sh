#!/usr/bin/env bash
# On the GPU machine, in one call: build loraforge (benchmarks/run_gpu.sh, no benchmarks), run the GPU
# tests of LORAFORGE_GPU_TEST_FILES (default: the checkpointing ones), then the 8B train step
# (bench_train_step.py) beside Unsloth with the defaults, and once more per argument with that argument's
# environment settings, each configuration in its own process. The random 8B checkpoint is written while
# the build runs. Rows go to $OUT/train_step.csv, the LORAFORGE_* settings in their notes; the full log
# to $OUT/bench.log. LORAFORGE_PROFILE=1 adds a profiled run of the defaults, LORAFORGE_PHASES=1 their
# memory_phases.py run (host against GPU time per phase), LORAFORGE_ANCHOR_LAST=1 a second Unsloth run at the
# end. An empty argument repeats the defaults in a process of their own.
#   device run (carry .devkit):
#     bash benchmarks/train_step_variants.sh "LORAFORGE_OFFLOAD_IN_FLIGHT=8" \
#          "LORAFORGE_OFFLOAD_IN_FLIGHT=12" "LORAFORGE_NORM_INTO_WIDE=1"
# Each row's note names the host CPU and the allocator's calls to the driver over the timed steps.
set -uo pipefail
export OUT="${OUT:-$(mktemp -d)}"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
CHECKPOINT=/tmp/loraforge_8b_checkpoint
python3 benchmarks/bench_train_step.py --weights-only --checkpoint "$CHECKPOINT" >"$OUT/checkpoint.log" 2>&1 &
WRITER=$!
LORAFORGE_GPU_TESTS=0 LORAFORGE_BENCH=" " bash benchmarks/run_gpu.sh >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
export PYTHONPATH="$PWD/.devkit/anchors:$PWD/.devkit/site${PYTHONPATH:+:$PYTHONPATH}"
export LORAFORGE_COMMIT="${LORAFORGE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
TESTS=${LORAFORGE_GPU_TEST_FILES:-"tests/models/test_kept_attention.py tests/models/test_layer_split.py tests/models/test_fast_language_model.py tests/train/test_offloaded_checkpointing.py"}
echo "== GPU tests ($SECONDS s)"
# shellcheck disable=SC2086
timeout "${LORAFORGE_GPU_TEST_TIMEOUT:-240}" python3 -m pytest -q -rf -m gpu -p no:cacheprovider $TESTS 2>&1 | grep -E "^E  |passed|failed|FAILED" | head -40
wait "$WRITER" || { echo "writing the checkpoint failed:"; tail -20 "$OUT/checkpoint.log"; exit 1; }

bench() {  # bench <settings> <timeout> <bench_train_step arguments...>
  local settings=$1 limit=$2; shift 2
  echo "== ${settings:-defaults}: $* ($SECONDS s)"
  # shellcheck disable=SC2086
  env $settings timeout "$limit" python3 benchmarks/bench_train_step.py --checkpoint "$CHECKPOINT" --out "$OUT" "$@" 2>&1 \
    | tee -a "$OUT/bench.log" | grep -v -i "warn" | grep "tok/s\|failed\|Error\|error" \
    | grep -v "^loraforge {\|^unsloth {" | cut -c1-330 | tail -6
}
bench "" 300 --impls "${LORAFORGE_DEFAULT_IMPLS:-unsloth,loraforge}"  # (unsloth alone: the anchor, when time is short)
for settings in "$@"; do
  bench "$settings" 120 --impls loraforge
done
if [ "${LORAFORGE_ANCHOR_LAST:-0}" = 1 ]; then  # Unsloth once more: how far the machine drifted over the call
  bench "" 200 --impls unsloth
fi
if [ "${LORAFORGE_PROFILE:-0}" = 1 ]; then
  bench "" 150 --impls loraforge --profile
fi
if [ "${LORAFORGE_PHASES:-0}" = 1 ]; then  # host against GPU time and memory per phase of the defaults' step
  echo "== memory_phases ($SECONDS s)"
  timeout 120 python3 benchmarks/memory_phases.py --impls loraforge --checkpoint "$CHECKPOINT" --out "$OUT" \
    >"$OUT/phases.log" 2>&1
  grep -A16 "per kind" "$OUT/phases.log" | head -20
fi
echo "done at $SECONDS s"
