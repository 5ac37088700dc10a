#!/usr/bin/env bash
# The CPU tests against the C++ built with AddressSanitizer + UndefinedBehaviorSanitizer (`make test-asan`).
#
# The sanitized extension is built into its own directory (build/asan), next to a copy of the Python package, and
# that copy is put first on PYTHONPATH: the editable install and its optimised mob_kernels/_C*.so stay untouched.
# Python itself is not instrumented, so libasan must be loaded first (LD_PRELOAD) and leak checking is off (the
# interpreter "leaks" by design). Any ASan report or UBSan finding aborts the process and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-$(pwd)/.venv/bin/python}"
OUT=build/asan
rm -rf "$OUT/lib"
mkdir -p "$OUT/lib"

# A copy of the Python package without the optimised .so ...
cp -r mob_kernels "$OUT/lib/"
rm -f "$OUT"/lib/mob_kernels/_C*.so
find "$OUT/lib" -name __pycache__ -prune -exec rm -rf {} +
# ... and the sanitized _C built into it: setup.py maps MOB_SANITIZE=1 to -DMOB_SANITIZE=ON
# (-fsanitize=address,undefined -fno-sanitize-recover=undefined -O1); no CUDA.
MOB_EXTENSION=on MOB_SANITIZE=1 MOB_CUDA=off "$PY" setup.py -q build_ext --build-temp "$OUT/tmp" --build-lib "$OUT/lib"
test -n "$(ls "$OUT"/lib/mob_kernels/_C*.so)"

LIBASAN="$(${CXX:-g++} -print-file-name=libasan.so)"
LIBUBSAN="$(${CXX:-g++} -print-file-name=libubsan.so)"
export LD_PRELOAD="$LIBASAN:$LIBUBSAN"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export PYTHONPATH="$(pwd)/$OUT/lib${PYTHONPATH:+:$PYTHONPATH}"
# Never put the working directory on sys.path (`python -m`, `-c` and stdin would, and the checkout's mob_kernels would
# then shadow the copy); inherited by the subprocesses the tests start.
export PYTHONSAFEPATH=1
export MOB_FUZZ_PROFILE=asan  # 300 derandomised examples per fuzz test: the sanitized build is ~10x slower
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

# Prove the sanitized build is the one under test before trusting a green run.
"$PY" - <<'PY'
import mob_kernels, mob_kernels._C as C
assert "build/asan" in C.__file__, C.__file__
print("sanitized extension:", C.__file__)
PY

# The CPU tests: everything that runs the C++ on CPU tensors (ids "[cpu-...", "[...-cpu-cpu]", "[cpu]"; the ISA
# subprocess tests inherit LD_PRELOAD and PYTHONPATH), the large-input tests included (the 4.3 GB one where 8 GB are
# available). The RSS test is left out: ASan's quarantine keeps freed memory resident by design.
tests=(python_tests/test_select_exact.py python_tests/test_errors.py python_tests/test_op.py python_tests/test_fuzz.py
       python_tests/test_reliability.py python_tests/test_methods.py python_tests/test_model_methods.py)
[ -f python_tests/test_cpu_backend.py ] && tests+=(python_tests/test_cpu_backend.py)
exec "$PY" -m pytest -q -p no:cacheprovider "${tests[@]}" \
  -k "(cpu-cpu or [cpu- or [cpu] or cpu_backend or isa or extension or gil or large) and not rss" "$@"
