#!/usr/bin/env bash
# Every GPU check the open issues name, in one call of the device tool (lent GPUs get 15
# minutes a session, machine start included, so one prepared call, not many):
#
#   1. pytest -m gpu tests/kernels/test_gpu.py   (kernels compiled and checked on the device)
#   2. bench/attention.py   3. bench/merge.py   4. bench/generate.py   5. bench/lora.py
#   6. bench/step.py   (the whole 1b train step beside transformers + torch.compile)
#
# Each step has its own time limit (seconds, after its name below: 540 s in all, so the
# call's 560 s leaves 20 s for the set-up; none has been measured on a GPU yet), writes
# its whole output to $OUT/<step>.log, and a step that fails or runs out of time does not
# stop the next: what finished comes back even when the call as a whole runs long.
# $OUT/summary.md lists each step's exit code and seconds; the tables print last; the
# script exits 1 if any step failed. GPU_SCALE (default 1) multiplies every limit; one
# device call is at most 600 s.
#
# Before the call, on the CPU machine (the GPU image lacks grain, ml_collections, tfds):
#   ../shared/device/wheels.sh
# then: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=560)
# Copy what comes back into bench/RESULTS.md with the device line and the date.
#
# `bash bench/gpu.sh --smoke` runs the same steps on tiny shapes with the installed
# packages, anywhere (CI runs it on CPU, limits x4) to check the script; its timings mean
# nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mm_jax_gpu}
mkdir -p "$OUT"
case "${1:-}" in
  "") smoke=""; scale=${GPU_SCALE:-1} ;;
  --smoke) smoke="--smoke"; scale=${GPU_SCALE:-4} ;;
  *) echo "usage: bash bench/gpu.sh [--smoke]" >&2; exit 2 ;;
esac

if [[ -z "$smoke" ]] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # peak-memory figures are the run's own

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  timeout 60 python3 -c \
    "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
echo "| step | exit | seconds |" > "$OUT/summary.md"
echo "|---|---|---|" >> "$OUT/summary.md"
failed=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$(( $2 * scale )) start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=5 "$secs" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [[ $rc == 0 ]] || failed=1
  echo "| $name | $rc$([[ $rc == 124 || $rc == 137 ]] && echo " (limit ${secs} s)") |" \
    "$(( $(date +%s) - start )) |" >> "$OUT/summary.md"
}

pytest_gpu=(python3 -m pytest -q -rs -m gpu tests/kernels/test_gpu.py -p no:cacheprovider)
if [[ -z "$smoke" ]]; then
  # tests/conftest.py defaults JAX_PLATFORMS to cpu (fake devices): the GPU tests need cuda.
  step test_gpu 100 env JAX_PLATFORMS=cuda "${pytest_gpu[@]}"
else  # no GPU: the tests would only skip; check that they are collected
  step test_gpu 100 "${pytest_gpu[@]}" --co
fi
step attention 120 python3 bench/attention.py $smoke
step merge 30 python3 bench/merge.py $smoke
step generate 70 python3 bench/generate.py $smoke
step lora 90 python3 bench/lora.py $smoke
# Last and longest: two 1b compiles (torch.compile's, then XLA's) before any timing.
step step 130 python3 bench/step.py $smoke

for name in test_gpu attention merge generate lora step; do
  echo; echo "## $name"
  grep -E '^\||passed|failed|skipped|SKIPPED|error' "$OUT/$name.log" | tail -40
done
echo; cat "$OUT/summary.md"
exit $failed
