#!/usr/bin/env bash
# Build statescan with AddressSanitizer + UndefinedBehaviorSanitizer (OpenMP kept) in a copy
# of the tree and run the test suite (and the fuzz suite with more examples) under it.
#
#   tools/asan.sh                 # whole suite
#   tools/asan.sh tests/test_fuzz.py --fuzz-examples 2000
#   STATESCAN_ASAN_DIR=/tmp/ss-asan tools/asan.sh tests/test_scan.py   # keep the build there:
#       the next run recompiles only the extensions whose sources changed (a full sanitizer
#       build takes minutes), so the suite can be run in parts
#
# Any ASan/UBSan report fails the run (halt_on_error); leak checking is off because CPython
# itself does not free everything at exit.  GCC only (libasan from the same compiler).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "${STATESCAN_ASAN_DIR:-}" ]; then
    work="$STATESCAN_ASAN_DIR"; mkdir -p "$work"
else
    work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
fi
# (-p: unchanged sources keep their times, so a kept build is not redone)
git -C "$here" ls-files -z | (cd "$here" && xargs -0 cp -p --parents -t "$work")
cd "$work"
# Cython copies the headers a kept build includes next to its generated C, and recopies one only
# when the copy is older: with the times kept by cp -p, a header edited within the same second
# as the last build stayed stale there (and was included instead of ext/'s).  They are cheap.
rm -f build/cython/*/ext/*.h
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
# Portable build only: one set is enough to find memory errors, and builds twice as fast.
CFLAGS="$san" LDFLAGS="$san" STATESCAN_PORTABLE=1 \
    python setup.py build_ext --inplace -j 2 >build.log 2>&1 || { tail -40 build.log; exit 1; }
# (made before the sanitizer runtime is preloaded into every command that follows)
logs="${STATESCAN_ASAN_LOGS:-$(mktemp -d /tmp/statescan-asan.XXXX)}"
mkdir -p "$logs"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# Reports go to files (pytest captures stderr, and a halted process never shows it).
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1:log_path=$logs/asan"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$logs/ubsan"
python - <<'PY'
import sys; sys.path.insert(0, "src")
import statescan
info = statescan.build_info()
assert info["openmp"], f"sanitizer build lost OpenMP: {info}"
print("sanitizer build:", info["variant"], "openmp:", info["openmp"])
PY
export PYTHONPATH="$work/src"
if [ "$#" -eq 0 ]; then set -- tests; fi
status=0
python -m pytest -q -p no:cacheprovider "$@" || status=$?
if compgen -G "$logs/*" >/dev/null; then
    echo "sanitizer reports in $logs:"; cat "$logs"/*; status=1
else
    echo "no sanitizer reports"
fi
exit "$status"
