#!/usr/bin/env bash
# Verifies pysparse's CUDA side on a machine with an NVIDIA GPU, in one go: builds the CUDA kernels for the
# visible GPU, runs the CUDA tests, one small case of every kernel under compute-sanitizer memcheck and racecheck,
# and the GPU benchmarks, then prints a summary. Installs nothing: uses $PYTHON (default .venv/bin/python if
# present, else python3) with the torch, pytest, pytest-benchmark and hypothesis it already has.
#
# Environment:
#   OUT            where the logs, gpu.json and gpu_summary.md go (default benchmarks/out)
#   SKIP_BUILD=1   use the pysparse/_C already built (say, one built elsewhere against this torch) when it loads
#                  with its CUDA kernels; build otherwise
#   DEADLINE_S     the whole check's time budget in seconds (default 3600): each step gets at most what is left,
#                  so the script ends, with what it measured, before a lease does; a step cut short counts FAIL
#   T_TESTS, T_SANITIZER  caps in seconds for the CUDA tests (default 900) and the sanitizer run (default 600)
#   BENCH_K        extra pytest -k expression ANDed to "cuda" for the benchmarks (default: all of them)
#   BENCH_ARGS     extra pytest arguments for the benchmarks (say --benchmark-max-time=0.2 to fit a short lease)
#   T_WORKERS      run the CUDA tests in this many processes sharing the GPU (pytest-xdist's -n, where it is
#                  installed; default 1: one process)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT_DIR=${OUT:-benchmarks/out}
DEADLINE_S=${DEADLINE_S:-3600}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # scripts under benchmarks/ import the pysparse built here
results=()
step() { echo; echo "=== $* (at ${SECONDS} s)"; }
record() { if [ "$2" = 0 ]; then results+=("PASS  $1"); else results+=("FAIL  $1 (exit $2)"); fi; }
left() { local l=$((DEADLINE_S - SECONDS)); echo $((l > 1 ? l : 1)); }
# at most $1 seconds, and no more than what is left of the budget
limit() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda)"

usable() {
  "$PY" -c "import pysparse, torch; assert pysparse.cuda_usable(), 'CUDA kernels not usable'; \
print('pysparse CUDA kernels usable; torch', torch.__version__, 'on', torch.cuda.get_device_name())"
}
if [ "${SKIP_BUILD:-0}" = 1 ] && usable; then
  step "build skipped (SKIP_BUILD=1 and the built extension loads)"
else
  step "build (FORCE_CUDA=1)"
  FORCE_CUDA=1 timeout "$(limit 1200)" "$PY" setup.py -q build_ext --inplace > "$OUT_DIR/build.log" 2>&1
  rc=$?
  grep -vE "^\s*$|warn" "$OUT_DIR/build.log" | tail -5
  [ "$rc" = 0 ] && usable || { echo "build failed (exit $rc): $OUT_DIR/build.log"; exit 1; }
fi

step "CUDA tests"
per_test=()  # a hung kernel fails its test rather than eating the budget, where pytest-timeout is installed
"$PY" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
[ "${T_WORKERS:-1}" -gt 1 ] && "$PY" -c "import xdist" 2>/dev/null && per_test+=(-n "$T_WORKERS")
timeout "$(limit "${T_TESTS:-900}")" "$PY" -m pytest tests -q -m cuda -p no:cacheprovider "${per_test[@]}" \
  > "$OUT_DIR/tests.log" 2>&1
rc=$?
tail -15 "$OUT_DIR/tests.log"
record "CUDA tests" "$rc"

sanitizer=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
# sanitize TOOL LOG LINES ARGS...: sanitizer_case.py ARGS under compute-sanitizer's TOOL, its log in LOG, the last
# LINES lines shown
sanitize() {
  local tool=$1 log=$2 lines=$3
  shift 3
  timeout "$(limit "${T_SANITIZER:-600}")" "$sanitizer" --tool "$tool" --error-exitcode 1 \
    "$PY" benchmarks/sanitizer_case.py "$@" > "$log" 2>&1
  local rc=$?
  tail -"$lines" "$log"
  if [ "$rc" != 0 ] && grep -q "Device not supported" "$log"; then
    # some sandboxed runtimes (gVisor) refuse the sanitizer itself: say so rather than blame the kernels
    results+=("SKIP  compute-sanitizer $tool (the sanitizer does not support this device/runtime)")
  else
    record "compute-sanitizer $tool" "$rc"
  fi
}

step "compute-sanitizer memcheck (one small case of every kernel)"
sanitize memcheck "$OUT_DIR/sanitizer.log" 15

step "compute-sanitizer racecheck (the same case; shared memory: the mask kernels' histograms and CUB reductions)"
sanitize racecheck "$OUT_DIR/racecheck.log" 5

# The benchmarks in parts, most wanted first, each with its own JSON: a part cut short by the deadline loses
# only its own figures. Merged into gpu.json at the end.
parts=("test_bench_linear.py|not model" "test_bench_gan.py|" "test_bench_conv.py|gan" "test_bench_ops.py|"
       "test_bench_conv.py|forward_backward and not gan" "test_bench_conv.py|forward and not backward"
       "test_bench_linear.py|model")
tmp=$(mktemp -d)
i=0
for part in "${parts[@]}"; do
  i=$((i + 1))
  file=${part%%|*}
  sel=${part#*|}
  k=cuda
  [ -n "$sel" ] && k="cuda and ($sel)"
  [ -n "${BENCH_K:-}" ] && k="$k and ($BENCH_K)"
  step "GPU benchmarks: $file -k '$k'"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
  timeout "$(limit 1800)" "$PY" -m pytest "benchmarks/$file" -q -k "$k" -p no:cacheprovider ${BENCH_ARGS:-} \
    --benchmark-json="$tmp/part$i.json" 2>&1 | tail -3
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 5 ]; then  # pytest: nothing selected (BENCH_K left this part out)
    results+=("SKIP  GPU benchmarks $file -k '$k' (none selected)")
  else
    record "GPU benchmarks $file -k '$k'" "$rc"
  fi
done
"$PY" benchmarks/summarize.py --merge "$OUT_DIR/gpu.json" "$tmp"/part*.json \
  && "$PY" benchmarks/summarize.py "$OUT_DIR/gpu.json" | tee "$OUT_DIR/gpu_summary.md"
rm -rf "$tmp"

step "summary"
printf '%s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q FAIL
