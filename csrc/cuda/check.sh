#!/usr/bin/env bash
# Compiles every CUDA source of the backend for the target architectures, with warnings and register spills as errors,
# and builds and runs the host-only layout test (csrc/cuda/tests): a CUDA source that does not compile, or index
# arithmetic that does not hold, fails CI even on machines without a GPU. Needs nvcc, a host C++ compiler and pybind11's
# headers (for csrc/cuda/bindings.cpp); neither a GPU nor torch.
#   NVCC (default nvcc), CXX (default g++), PYTHON (default .venv/bin/python if present, else python3; must import
#   pybind11),
#   MOB_CUDA_ARCHS (default "80;90", as CMakeLists.txt)
set -euo pipefail
cd "$(dirname "$0")/../.."

NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
ARCHS=${MOB_CUDA_ARCHS:-80;90}

gencode=()
for arch in ${ARCHS//;/ }; do
  gencode+=("-gencode=arch=compute_${arch},code=sm_${arch}")
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "cuda-check: $("$NVCC" --version | tail -n 2 | head -n 1); archs ${ARCHS}"
status=0
for src in csrc/cuda/*.cu; do
  # -Xptxas -warn-spills with -Werror: a register spill in a kernel (a silent slowdown) fails the check too.
  if "$NVCC" -std=c++17 -O3 -Icsrc "${gencode[@]}" -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
      -Xptxas -warn-spills -c "$src" -o "$tmp/$(basename "$src").o"; then
    echo "  ok   $src"
  else
    echo "  FAIL $src"
    status=1
  fi
done

py_includes=$("$PYTHON" -m pybind11 --includes)
for src in csrc/cuda/*.cpp; do
  # shellcheck disable=SC2086  # py_includes is a list of -I flags
  if "$CXX" -std=c++17 -fsyntax-only -Wall -Wextra -Werror -DMOB_WITH_CUDA -Icsrc $py_includes "$src"; then
    echo "  ok   $src"
  else
    echo "  FAIL $src"
    status=1
  fi
done
for src in csrc/cuda/tests/*.cpp; do
  bin="$tmp/$(basename "$src" .cpp)"
  if "$CXX" -std=c++17 -O1 -Wall -Wextra -Werror -Icsrc "$src" -o "$bin" && "$bin"; then
    echo "  ok   $src (built and run)"
  else
    echo "  FAIL $src"
    status=1
  fi
done
exit $status
