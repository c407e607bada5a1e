#!/usr/bin/env bash
# The CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer: builds pysparse._C (CPU only, the usual
# -O3 -march=native, so the machine's widest vector paths are the ones checked) with -fsanitize=address,undefined
# in a copy of the tree, then runs the tests against that build with the sanitizer runtimes preloaded into Python.
# Any out-of-bounds read or write of a tensor's memory in a kernel stops the run (ASan); undefined behaviour is
# reported and the run goes on (UBSan). The reports go to files, printed at the end; the script fails on any.
#
#   bash benchmarks/asan_check.sh                       # the kernels' tests (spmm, layers, convolution, masks, ...)
#   bash benchmarks/asan_check.sh tests                 # the whole suite (pytest arguments pass through)
#
# Environment: PYTHON (default .venv/bin/python), ASAN_TREE (the copy, default build/asan-tree; kept between runs
# so that ninja rebuilds only what changed: the first build takes 10-15 minutes on 2 cores).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TREE=${ASAN_TREE:-$ROOT/build/asan-tree}
REPORTS=$(mktemp -d)  # the sanitizers write their reports here (pytest captures the tests' stderr: a report
trap 'rm -rf "$REPORTS"' EXIT  # printed there would be lost when ASan ends the process)

mkdir -p "$TREE"
# the sources, the tests and what they read, modification times kept (ninja compares them); the build writes its
# .so into the copy
for path in setup.py pyproject.toml Makefile README.md .ci csrc pysparse tests benchmarks; do
  rm -rf "${TREE:?}/$path.new"
  cp -a "$ROOT/$path" "$TREE/$path.new"
  find "$TREE/$path.new" -name '*.so' -delete
  # a file whose content differs from the last copy's gets the current time: its own may be older than the last
  # build's objects (an edit made while that build ran), and ninja would keep the stale object
  if [ -d "$TREE/$path.new" ]; then
    (cd "$TREE/$path.new" && find . -type f -print0) | while IFS= read -r -d '' f; do
      cmp -s "$TREE/$path.new/$f" "$TREE/$path/$f" || touch "$TREE/$path.new/$f"
    done
  elif ! cmp -s "$TREE/$path.new" "$TREE/$path"; then
    touch "$TREE/$path.new"
  fi
  if [ -d "$TREE/$path" ]; then
    # keep the copy's built extension: move it into the fresh copy of pysparse/
    find "$TREE/$path" -maxdepth 1 -name '_C*.so' -exec mv {} "$TREE/$path.new/" \;
  fi
  rm -rf "${TREE:?}/$path"
  mv "$TREE/$path.new" "$TREE/$path"
done

echo "asan_check: building the CPU kernels with -fsanitize=address,undefined in $TREE"
(cd "$TREE" && FORCE_CPU=1 \
  CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize=vptr" \
  LDFLAGS="-fsanitize=address,undefined" \
  "$PY" setup.py -q build_ext --inplace)
so=$(ls "$TREE"/pysparse/_C*.so)
# (grep reads all of nm's output: with -q it would stop at the first match, nm would die of SIGPIPE, and under
# pipefail an instrumented build would read as not instrumented)
if [ "$(nm -D "$so" | grep -c __asan_report)" = 0 ]; then
  echo "asan_check: $so is not instrumented" >&2
  exit 1
fi

if [ $# -eq 0 ]; then
  set -- tests/test_spmm.py tests/test_sparse_linear.py tests/test_sparse_conv.py tests/test_out_cache.py \
    tests/test_masks.py tests/test_saliency.py tests/test_apply_mask.py tests/test_func.py \
    tests/test_higher_order.py tests/test_dense_path.py tests/test_densify.py tests/test_kernel_fuzz.py
fi
preload="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
run() {
  (cd "$TREE" && PYTHONPATH="$TREE" LD_PRELOAD="$preload" \
    ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:verify_asan_link_order=0:log_path="$REPORTS/asan" \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=0:log_path="$REPORTS/ubsan" "$PY" "$@")
}
where=$(run -c 'import pysparse; print(pysparse.__file__)')
case "$where" in
  "$TREE"/*) ;;
  *) echo "asan_check: Python imported pysparse from $where, not from $TREE" >&2; exit 1 ;;
esac
echo "asan_check: pytest $* (sanitizers preloaded)"
set +e
run -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if compgen -G "$REPORTS/*" > /dev/null; then
  cat "$REPORTS"/* >&2
  echo "asan_check: sanitizer report(s) above (pytest exit $status)" >&2
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "asan_check: the tests failed (pytest exit $status)" >&2
  exit 1
fi
echo "asan_check: no sanitizer reports"
