#!/usr/bin/env bash
# The test suite on the oldest torch pyproject.toml admits (`make test-torch-floor`; not run by CI, see below).
#
# torch 2.4 is the floor because the package needs torch.library.register_fake and torch.library.opcheck, which first
# appear in 2.4. The extension does not link libtorch, so the tree's own build (`make install`) is used as it is: the
# checkout goes first on PYTHONPATH of a second virtualenv that holds the old torch and the test dependencies.
#
# Why not in CI: the package index has no CPU-only Linux wheel of torch 2.4.1, so pip brings its CUDA libraries too
# (about 2.7 GB of wheels, 5 GB installed; they load without a GPU). The virtualenv is kept in build/ and reused.
# torch 2.4.1 also brings triton 3.0.0, whose interpreter cannot run this package's Triton kernels (3.8.0 is the
# oldest that does): it is removed, and the Triton tests skip themselves.
# Environment: PY (a Python >= 3.10 to create the virtualenv with), TORCH_FLOOR (default torch==2.4.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_FLOOR=${TORCH_FLOOR:-torch==2.4.1}
VENV=build/torch-floor
VPY="$VENV/bin/python"
# numpy<2: what torch 2.4's wheels were built against; the rest as in the Makefile's TEST_DEPS.
DEPS=("numpy<2" pytest==9.2.0 hypothesis==6.170.15 pytest-benchmark==5.3.1 expecttest scikit-learn==1.9.1)
stamp="$VENV/.deps-$(printf '%s ' "$TORCH_FLOOR" "${DEPS[@]}" | cksum | cut -d' ' -f1)"

if [ ! -f "$stamp" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VPY" -m pip install -q "$TORCH_FLOOR"
  "$VPY" -m pip install -q "${DEPS[@]}" "$TORCH_FLOOR"
  "$VPY" -m pip uninstall -q -y triton
  touch "$stamp"
fi

export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
"$VPY" - <<'EOF'
import torch, mob_kernels
print(f"torch {torch.__version__}; mob_kernels {mob_kernels.__version__} from {mob_kernels.__file__}; "
      f"backends {mob_kernels.available_backends()}")
assert "cpu" in mob_kernels.available_backends(), "build the extension first (make install)"
EOF
exec "$VPY" -m pytest -q -p no:cacheprovider python_tests "$@"
