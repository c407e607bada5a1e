#!/usr/bin/env bash
# Builds pysparse's extension, CUDA kernels included, for another machine's Python and torch (a lent GPU machine
# whose image holds its own torch), on this machine, GPU or not, so that the GPU machine's short lease is spent
# on gpu_check.sh (SKIP_BUILD=1) rather than on compiling. Leaves pysparse/_C.cpython-<py>-*.so in the repo,
# stripped of its debug information (56 -> 12 MB: it must travel with the working tree), beside the local build.
#
# The build happens in a copy of setup.py, pyproject.toml, csrc/ and pysparse/ under $WORK, so the local build's
# objects (build/, made for the local Python) are left alone; the venv is made once and reused.
#
# Environment (defaults: the H200 image's Python 3.12 and torch 2.11.0+cu130, compute capability 9.0):
#   PYTHON_NEW     the interpreter to make the venv with (default python3.12; pyenv: PYENV_VERSION=3.12.1)
#   TORCH_SPEC     the torch to build against (default torch==2.11.0, the index's CUDA 13.0 build)
#   ARCH           TORCH_CUDA_ARCH_LIST (default 9.0)
#   VENV           the venv (default /tmp/pysparse-gpu-venv), WORK the build copy (default /tmp/pysparse-gpu-build)
#
#   bash benchmarks/gpu_prepare.sh        # ~1 min for the venv, ~5 min to build on 2 cores
# then, on the GPU machine (carry the .so it names):
#   SKIP_BUILD=1 PYTHON=python3 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
PYTHON_NEW=${PYTHON_NEW:-python3.12}
TORCH_SPEC=${TORCH_SPEC:-torch==2.11.0}
VENV=${VENV:-/tmp/pysparse-gpu-venv}
WORK=${WORK:-/tmp/pysparse-gpu-build}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON_NEW" -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_SPEC" numpy pybind11 ninja setuptools wheel
fi
"$VENV/bin/python" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda)"
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'this torch is a CPU-only build')"

# The copy is kept between runs and updated file by file: a file whose content changed is copied (a fresh time,
# so ninja rebuilds what depends on it, ~2 min for one kernel file instead of ~6 for all), the others are left
# as they are, and files gone from the repo go from the copy.
mkdir -p "$WORK"
(find setup.py pyproject.toml csrc pysparse -type f ! -name '*.so' ! -path '*/__pycache__/*') | while read -r f; do
  mkdir -p "$WORK/$(dirname "$f")"
  cmp -s "$f" "$WORK/$f" || cp "$f" "$WORK/$f"
done
(cd "$WORK" && find csrc pysparse -type f ! -name '*.so' ! -path '*/__pycache__/*') | while read -r f; do
  [ -e "$f" ] || rm -f "$WORK/$f"
done
rm -f "$WORK"/pysparse/_C*.so
(cd "$WORK" && TORCH_CUDA_ARCH_LIST=${ARCH:-9.0} FORCE_CUDA=1 PYSPARSE_PORTABLE=1 \
  "$VENV/bin/python" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1) \
  || { grep -E " error|Error" "$WORK/build.log" | head -20; echo "build failed: $WORK/build.log"; exit 1; }
so=$(cd "$WORK" && ls pysparse/_C*.so)
strip --strip-debug -o "$repo/$so" "$WORK/$so"
"$VENV/bin/python" -c "import sys; sys.path.insert(0, '$repo'); import pysparse; print('built', pysparse._C.__file__)"
ls -l "$repo/$so"
echo "carry: $so"
