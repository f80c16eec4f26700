#!/usr/bin/env bash
# On the GPU machine, in one call: build loraforge for sm_90 with its CUDA kernels, run the GPU
# tests and the benchmarks, and leave logs and result CSVs under $OUT. Extra arguments go to pytest.
#   ../shared/tools/device-kit.sh anchors   # once, here: bitsandbytes/TRL/gguf (+ Unsloth, Liger) -> .devkit/
#   device run: bash benchmarks/run_gpu.sh [pytest args...]     (carry .devkit)
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
LOGS="$OUT/logs"  # packed into $OUT/logs.tgz at the end: the device tool returns at most 8 files
mkdir -p "$LOGS"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/.devkit/site${PYTHONPATH:+:$PYTHONPATH}"
export LORAFORGE_COMMIT="${LORAFORGE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/gpu.txt"
echo "== build (sm_90)"
python3 -m pip install --no-build-isolation --no-deps -e . \
  -C cmake.define.LORAFORGE_CUDA=ON -C cmake.define.LORAFORGE_CUDA_ARCHITECTURES=90 >"$LOGS/build.log" 2>&1 \
  || { tail -40 "$LOGS/build.log"; exit 1; }
python3 -c "import loraforge; print('cuda kernels built:', loraforge.cuda_kernels_built(), loraforge.cuda_architectures())"

tests_rc=0
if [ "${LORAFORGE_GPU_TESTS:-1}" = 1 ]; then
  echo "== GPU tests"
  python3 -m pytest -q -rf -m gpu tests -p no:cacheprovider "$@" 2>&1 | tee "$LOGS/gpu_tests.log" | tail -15
  tests_rc=${PIPESTATUS[0]}
fi

echo "== benchmarks"
# Kernel benchmarks by default; LORAFORGE_BENCH="nf4 rope" picks some, "train_step" the 8B step;
# "name:--a,1,--b" passes arguments (commas for spaces). LORAFORGE_GPU_TESTS=0 skips the tests.
for item in ${LORAFORGE_BENCH:-nf4 rmsnorm rope swiglu cross_entropy}; do
  name=${item%%:*}; extra=""; [ "$item" != "$name" ] && extra=${item#*:}
  echo "-- bench_$name ${extra//,/ }"
  # shellcheck disable=SC2086
  PYTHONPATH="$ROOT/.devkit/anchors:$PYTHONPATH" timeout 900 python3 "benchmarks/bench_$name.py" --out "$OUT" \
    ${extra//,/ } 2>&1 | tee "$LOGS/bench_$name.log" | grep -v "Warning\|warn" | tail -${LORAFORGE_TAIL:-30}
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
exit "$tests_rc"
