#!/usr/bin/env bash
# `make gpu-check`: everything that needs a CUDA GPU, in one command, on any machine with one.
#
#   1. build   the extension with the CUDA backend into the venv (MOB_CUDA=on, for this GPU's architecture);
#   2. test    the whole pytest suite (the fuzz tests run in step 3);
#   3. fuzz    the property tests on the GPU backends (>= 2,000 select examples per backend);
#   4. sanitize compute-sanitizer memcheck, racecheck, synccheck and initcheck over scripts/sanitize_driver.py (every
#              op of the triton and cuda backends on the GPU test shapes); any finding fails the check;
#   5. bench   python -m mob_kernels.bench --preset gpu, written to bench/results/<gpu-name>.{md,json,csv,png}.
# Every step runs even when an earlier one failed (one GPU session should report everything), except that nothing runs
# without a build; the exit status is non-zero if any step failed. Each step's time is printed.
#
# The environment: a venv ($VENV, default .venv) whose torch sees the GPU. Where the venv has no torch yet and $PY
# (default python3) already has a CUDA torch, that torch (and every package beside it) is reused, not downloaded;
# otherwise $TORCH_SPEC is installed from $TORCH_INDEX (defaults: the Makefile's pin, CUDA 13.0 wheels). Missing
# build/test packages are installed at the Makefile's pins ($DEPS) when an index can be reached; a machine without
# one (the usual GPU box) must have them already.
#
# Environment: PY, VENV, TORCH_SPEC, TORCH_INDEX, DEPS, MOB_CUDA_ARCHS (default: this GPU's), GPU_CHECK_STEPS (default
# "build test fuzz sanitize bench"), GPU_CHECK_JOBS (pytest-xdist workers when installed; default min(8, cores); 0 =
# none), GPU_CHECK_OUT (default bench/results), GPU_CHECK_NAME (default: the GPU's name), SANITIZER (default
# compute-sanitizer), GPU_CHECK_SANITIZE_ARGS (scripts/sanitize_driver.py options for every tool), FUZZ_PROFILE
# (default gpu when python_tests/test_fuzz.py defines it, else ci).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:---index-url https://download.pytorch.org/whl/cu130}
DEPS=${DEPS:-}
DEPS=${DEPS//\"/}  # the Makefile's lists quote some specifiers
STEPS=${GPU_CHECK_STEPS:-build test fuzz sanitize bench}
OUT_DIR=${GPU_CHECK_OUT:-bench/results}
SANITIZER=${SANITIZER:-compute-sanitizer}
export PYTHONUNBUFFERED=1

start_all=$(date +%s)
failed=()
summary=()

step_on() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME COMMAND...: runs it, times it, records the outcome.
run_step() {
  local name=$1
  shift
  local t0 rc
  t0=$(date +%s)
  echo
  echo "=== gpu-check: $name"
  "$@"
  rc=$?
  local dt=$(($(date +%s) - t0))
  if [[ $rc -eq 0 ]]; then
    summary+=("ok    $name (${dt} s)")
  else
    summary+=("FAIL  $name (${dt} s, exit $rc)")
    failed+=("$name")
  fi
  return $rc
}

finish() {
  local total=$(($(date +%s) - start_all))
  echo
  echo "=== gpu-check summary (${total} s in all)"
  printf '  %s\n' "${summary[@]}"
  if [[ ${#failed[@]} -gt 0 ]]; then
    echo "gpu-check: FAILED: ${failed[*]}"
    exit 1
  fi
  echo "gpu-check: passed"
  exit 0
}

has_cuda_torch() {  # python: torch imports, was built with CUDA and sees a GPU
  "$1" - <<'EOF' >/dev/null 2>&1
import sys, torch
sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)
EOF
}

has_torch() { "$1" -c 'import torch' >/dev/null 2>&1; }

# pip without waiting on a package index that cannot be reached (a GPU machine may have none).
pip_install() { "$PYBIN" -m pip install -q --retries 0 --timeout 15 "$@"; }

# --------------------------------------------------------------------------------------------------- environment
setup_env() {
  PYBIN="$VENV/bin/python"
  if [[ -x "$PYBIN" ]] && has_cuda_torch "$PYBIN"; then
    echo "using $VENV (its torch sees the GPU)"
  else
    if [[ ! -x "$PYBIN" ]]; then
      if has_cuda_torch "$PY"; then
        # Bare: pip, setuptools and the rest come from $PY's packages (linked below), so none of an older bundled
        # copy shadows them.
        "$PY" -m venv --without-pip "$VENV" || return 1
      else
        "$PY" -m venv "$VENV" || return 1
      fi
    fi
    if ! has_torch "$PYBIN" && has_cuda_torch "$PY"; then
      # Reuse $PY's CUDA torch (and everything beside it) rather than downloading it: its package directories go on
      # the venv's path after the venv's own. (venv --system-site-packages would reach only the base interpreter's,
      # not those of a venv that $PY may itself be.)
      local site
      site=$("$PYBIN" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
      "$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
        >"$site/_mob_gpu_check_parent.pth" || return 1
      echo "reusing $PY's CUDA torch in $VENV (linked by $site/_mob_gpu_check_parent.pth)"
    fi
    if ! has_cuda_torch "$PYBIN"; then
      has_torch "$PYBIN" && echo "$VENV's torch cannot use the GPU (VENV=.venv-gpu would make a fresh venv instead)"
      echo "installing $TORCH_SPEC ($TORCH_INDEX)"
      # shellcheck disable=SC2086  # TORCH_INDEX is a list of pip options
      pip_install $TORCH_INDEX "$TORCH_SPEC" || return 1
      has_cuda_torch "$PYBIN" || { echo "torch in $VENV does not see a GPU"; return 1; }
    fi
  fi
  "$PYBIN" -c 'import torch; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")'

  # Build and test packages: only what is missing is installed (a machine without a package index may have them all),
  # at the Makefile's pins ($DEPS) where it names them. Required ones must be there; the others are best effort (the
  # suite skips what needs an absent optional package).
  local required optional
  required=$(missing_dists "pybind11>=2.12 setuptools>=77 wheel pytest hypothesis numpy")
  optional=$(missing_dists "$DEPS")
  if [[ -n "$required" ]]; then
    echo "installing missing packages: $required"
    # shellcheck disable=SC2086
    pip_install $required || { echo "could not install: $required"; return 1; }
  fi
  if [[ -n "$optional" ]]; then
    # shellcheck disable=SC2086
    pip_install $optional >/dev/null 2>&1 || echo "note: optional packages not installed: $optional"
  fi
  # cmake and ninja from their Python packages when they are not on PATH (setup.py runs them by name).
  local tool dir
  for tool in cmake ninja; do
    command -v "$tool" >/dev/null 2>&1 && continue
    dir=$("$PYBIN" -c "import $tool; print(getattr($tool, 'CMAKE_BIN_DIR', None) or getattr($tool, 'BIN_DIR', ''))" \
      2>/dev/null) && [[ -n "$dir" ]] && PATH="$dir:$PATH"
  done
  command -v cmake >/dev/null 2>&1 || { echo "cmake not found"; return 1; }
}

# The requirement specifiers (of a space-separated list) whose distributions are not installed; a pin from $DEPS
# replaces a bare or looser one of the same name.
missing_dists() {
  "$PYBIN" - "$1" "$DEPS" <<'EOF'
import importlib.metadata as md, re, sys
want, pins = sys.argv[1].split(), sys.argv[2].split()
name = lambda spec: re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-")
try:  # a version bound ("setuptools>=77") is checked where packaging can parse it; else presence alone counts
    from packaging.requirements import Requirement
except ImportError:
    Requirement = None
pinned = {name(p): p for p in pins}
out = []
for spec in want:
    try:
        have = md.version(name(spec))
    except md.PackageNotFoundError:
        out.append(pinned.get(name(spec), spec))
        continue
    if Requirement is not None and ("<" in spec or ">" in spec) and not Requirement(spec).specifier.contains(have):
        out.append(spec)
print(" ".join(dict.fromkeys(out)))
EOF
}

# -------------------------------------------------------------------------------------------------------- build
build() {
  local archs=${MOB_CUDA_ARCHS:-}
  if [[ -z "$archs" ]]; then
    archs=$("$PYBIN" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')
  fi
  echo "building mob_kernels._C with the CUDA backend for sm_$archs"
  MOB_CUDA=on MOB_EXTENSION=on MOB_CUDA_ARCHS="$archs" \
    "$PYBIN" -m pip install -q --no-build-isolation --no-deps --no-index -e . || return 1
  "$PYBIN" - <<'EOF'
import mob_kernels, mob_kernels._C as C
assert C.WITH_CUDA, "mob_kernels._C was built without the CUDA backend"
print("mob_kernels._C: CUDA runtime", C.CUDA_RUNTIME_VERSION, "; backends on cuda:", mob_kernels.available_backends("cuda"))
EOF
}

xdist_args() {  # pytest-xdist workers, when installed and wanted
  local jobs=${GPU_CHECK_JOBS:-}
  if [[ -z "$jobs" ]]; then
    jobs=$(nproc 2>/dev/null || echo 1)
    ((jobs > 8)) && jobs=8
  fi
  if [[ "$jobs" -gt 1 ]] && "$PYBIN" -c 'import xdist' >/dev/null 2>&1; then
    echo "-n $jobs"
  fi
}

# --------------------------------------------------------------------------------------------------- test, fuzz
test_suite() {
  # shellcheck disable=SC2046  # xdist_args is a list of options
  "$PYBIN" -m pytest -q -p no:cacheprovider $(xdist_args) python_tests --ignore=python_tests/test_fuzz.py
}

fuzz() {
  local profile=${FUZZ_PROFILE:-}
  if [[ -z "$profile" ]]; then
    profile=ci  # an older test_fuzz.py without the gpu profile: its ci profile
    grep -q '"mob-gpu"' python_tests/test_fuzz.py && profile=gpu
  fi
  echo "fuzz profile: $profile (GPU targets only)"
  # Test ids name the target <backend>-<device>: "cuda" selects every backend on CUDA tensors (and no CPU target).
  # shellcheck disable=SC2046
  MOB_FUZZ_PROFILE=$profile HYPOTHESIS_PROFILE=$profile \
    "$PYBIN" -m pytest -q -p no:cacheprovider $(xdist_args) python_tests/test_fuzz.py -k "cuda"
}

# ----------------------------------------------------------------------------------------------------- sanitize
sanitize() {
  if ! command -v "$SANITIZER" >/dev/null 2>&1; then
    echo "$SANITIZER not found (set SANITIZER=/path/to/compute-sanitizer)"
    return 1
  fi
  local tool rc=0 extra driver
  for tool in memcheck racecheck synccheck initcheck; do
    extra=()
    # memcheck sees every shape and dtype; the slower tools two shapes (racecheck: one dtype per element size).
    driver=(--quick)
    case $tool in
      memcheck) driver=() ;;
      racecheck) extra=(--racecheck-report all) driver=(--quick --dtypes float32 bfloat16) ;;
    esac
    # shellcheck disable=SC2206  # GPU_CHECK_SANITIZE_ARGS is a list of driver options
    [[ -n "${GPU_CHECK_SANITIZE_ARGS:-}" ]] && driver=($GPU_CHECK_SANITIZE_ARGS)
    echo "--- $tool"
    # No caching allocator: every tensor its own allocation, so an access past its end is an error, not a neighbour.
    if ! PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 ${extra[@]+"${extra[@]}"} \
        "$PYBIN" scripts/sanitize_driver.py --backends triton cuda ${driver[@]+"${driver[@]}"}; then
      echo "$tool: FAILED"
      rc=1
    fi
  done
  return $rc
}

# -------------------------------------------------------------------------------------------------------- bench
bench() {
  local name=${GPU_CHECK_NAME:-}
  if [[ -z "$name" ]]; then
    name=$("$PYBIN" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_"))')
  fi
  if ! "$PYBIN" -m mob_kernels.bench --help 2>/dev/null | grep -q '\bgpu\b'; then
    echo "this mob_kernels.bench has no gpu preset yet: bench step skipped"
    return 0
  fi
  mkdir -p "$OUT_DIR"
  echo "writing $OUT_DIR/$name.{md,json,csv,png}"
  "$PYBIN" -m mob_kernels.bench --preset gpu --out "$OUT_DIR" --name "$name" --budget-s 0.25 --quiet
}

# ------------------------------------------------------------------------------------------------------- main
PYBIN=""
if ! run_step environment setup_env; then
  finish
fi
if step_on build && ! run_step build build; then
  finish  # nothing else can run without the extension
fi
step_on test && run_step test test_suite
step_on fuzz && run_step fuzz fuzz
step_on sanitize && run_step sanitize sanitize
step_on bench && run_step bench bench
finish
