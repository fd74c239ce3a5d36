#!/usr/bin/env bash
# Every GPU check the open issues name, in one call of the device tool (lent GPUs get 15
# minutes a session, machine start included, so one prepared call, not many):
#
#   1. pytest -m gpu tests/kernels/test_gpu.py   (kernels compiled and checked on the device)
#   2. bench/attention.py   3. bench/merge.py   4. bench/generate.py   5. bench/lora.py
#
# Each step has its own time limit (seconds, after the name below; GPU_SCALE=2 doubles all),
# writes its whole output to $OUT/<step>.log, and a step that fails or runs out of time does
# not stop the next: what finished comes back even when the call as a whole runs long.
# $OUT/summary.md lists each step's exit code and seconds; the tables print last.
#
# Before the call, on the CPU machine (the GPU image lacks grain, ml_collections, tfds):
#   ../shared/device/wheels.sh
# then: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
# Copy what comes back into bench/RESULTS.md with the device line and the date.
#
# `bash bench/gpu.sh --smoke` runs the same steps on tiny shapes anywhere (CPU included) to
# check the script itself; its timings mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mm_jax_gpu}
mkdir -p "$OUT"
smoke=()
[[ "${1:-}" == "--smoke" ]] && smoke=(--smoke)
scale=${GPU_SCALE:-1}

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # peak-memory figures are the run's own

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
echo "| step | exit | seconds |" > "$OUT/summary.md"
echo "|---|---|---|" >> "$OUT/summary.md"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$(( $2 * scale )) start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$secs" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$([[ $rc == 124 || $rc == 137 ]] && echo " (limit ${secs} s)") |" \
    "$(( $(date +%s) - start )) |" >> "$OUT/summary.md"
}

if [[ ${#smoke[@]} -eq 0 ]]; then
  step test_gpu 120 python3 -m pytest -q -m gpu tests/kernels/test_gpu.py -p no:cacheprovider
else  # no GPU: the test file only skips; check that it is collected
  step test_gpu 120 python3 -m pytest -q -m gpu tests/kernels/test_gpu.py -p no:cacheprovider \
    --co
fi
step attention 150 python3 bench/attention.py "${smoke[@]}"
step merge 45 python3 bench/merge.py "${smoke[@]}"
step generate 90 python3 bench/generate.py "${smoke[@]}"
step lora 120 python3 bench/lora.py "${smoke[@]}"

for name in test_gpu attention merge generate lora; do
  echo; echo "## $name"; grep -E '^\||passed|failed|error' "$OUT/$name.log" | tail -40
done
echo; cat "$OUT/summary.md"
