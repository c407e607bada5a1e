#!/usr/bin/env bash
# Verifies pysparse's CUDA side on a machine with an NVIDIA GPU, in one go: builds the CUDA kernels for the
# visible GPU, runs the CUDA tests, one small case of every kernel under compute-sanitizer memcheck, and the
# GPU benchmarks, then prints a summary. Installs nothing: uses $PYTHON (default .venv/bin/python if present,
# else python3) with the torch, pytest, pytest-benchmark and hypothesis it already has.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT_DIR=${OUT:-benchmarks/out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
results=()
step() { echo; echo "=== $*"; }
record() { if [ "$2" = 0 ]; then results+=("PASS  $1"); else results+=("FAIL  $1"); fi; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

step "build (FORCE_CUDA=1)"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace 2>&1 | grep -vE "^\s*$|warn" | tail -5
"$PY" -c "import pysparse, torch; assert pysparse.cuda_usable(), 'CUDA kernels not usable'; \
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || { echo "build failed"; exit 1; }

step "CUDA tests"
"$PY" -m pytest tests -q -m cuda -p no:cacheprovider 2>&1 | tail -15
record "CUDA tests" "${PIPESTATUS[0]}"

step "compute-sanitizer memcheck (one small case of every kernel)"
compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitizer_case.py > "$OUT_DIR/sanitizer.log" 2>&1
rc=$?
tail -15 "$OUT_DIR/sanitizer.log"
if [ "$rc" != 0 ] && grep -q "Device not supported" "$OUT_DIR/sanitizer.log"; then
  # some sandboxed runtimes (gVisor) refuse the sanitizer itself: say so rather than blame the kernels
  results+=("SKIP  compute-sanitizer memcheck (the sanitizer does not support this device/runtime)")
else
  record "compute-sanitizer memcheck" "$rc"
fi

step "GPU benchmarks"
"$PY" -m pytest benchmarks -q -k cuda -p no:cacheprovider --benchmark-json="$OUT_DIR/gpu.json" 2>&1 | tail -5
record "GPU benchmarks" "${PIPESTATUS[0]}"
"$PY" benchmarks/summarize.py "$OUT_DIR/gpu.json" | tee "$OUT_DIR/gpu_summary.md"

step "summary"
printf '%s\n' "${results[@]}"
! printf '%s\n' "${results[@]}" | grep -q FAIL
