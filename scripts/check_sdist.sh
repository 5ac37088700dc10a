#!/usr/bin/env bash
# The package as a user without a wheel gets it: build the sdist (`python -m build --sdist`, isolated), check what it
# holds, then install it with build isolation into a clean virtualenv that has only a pinned torch:
#   1. with a C++ compiler that does not exist: the install still succeeds, the package imports, the 'cpu' backend
#      raises BackendUnavailableError and the reference backend selects;
#   2. as it should build (MOB_EXTENSION=on: a failed build fails here): the 'cpu' backend selects what the reference
#      does, the installed version is mob_kernels.__version__, py.typed and LICENSE are installed, and mypy --strict
#      reads the installed package's types (python_tests/test_packaging.py against that interpreter).
# Environment: PY (a Python with this repository's test dependencies: build, pytest, mypy; default python3),
# TORCH_SPEC / TORCH_INDEX (the torch to install first, as in the Makefile), MOB_CUDA (default off: CUDA sources are
# compiled by `make cuda-check`), KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}
export MOB_CUDA=${MOB_CUDA:-off}
work=$(mktemp -d "${TMPDIR:-/tmp}/mob_sdist.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "work directory: $work"; else trap 'rm -rf "$work"' EXIT; fi
step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "build the sdist"
"$PY" -m build --sdist --outdir "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
sdist=$(ls "$work"/dist/mob_kernels-*.tar.gz)
echo "$sdist"

step "check its contents"
"$PY" - "$sdist" <<'EOF'
import subprocess, sys, tarfile
from pathlib import Path

with tarfile.open(sys.argv[1]) as tar:
    names = sorted(m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile())
print("\n".join(names))
try:  # every tracked file the build reads; fall back to the file system outside a git checkout
    tracked = subprocess.run(["git", "ls-files", "csrc", "mob_kernels"], capture_output=True, text=True,
                             check=True).stdout.split()
except (OSError, subprocess.CalledProcessError):
    tracked = [p.as_posix() for d in ("csrc", "mob_kernels") for p in Path(d).rglob("*") if p.is_file()]
required = {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "LICENSE", "mob_kernels/py.typed",
            "mob_kernels/_version.py"}
required |= {p for p in tracked if p.startswith("csrc/") or p.endswith(".py")}
missing = sorted(required - set(names))
top = {"PKG-INFO", "setup.cfg", "MANIFEST.in"}
unexpected = [n for n in names if n not in required | top and not n.startswith("mob_kernels.egg-info/")
              and not (n.startswith("mob_kernels/") and n.endswith(".py"))]
print(f"{len(names)} files; missing: {missing or 'none'}; unexpected: {unexpected or 'none'}")
sys.exit(1 if missing or unexpected else 0)
EOF

step "clean virtualenv with $TORCH_SPEC"
"$PY" -m venv "$work/venv"
VPY="$work/venv/bin/python"
# torch first and pinned (as the Makefile does), so that nothing installed after it can pull another torch; numpy is
# the other dependency (the first install below takes none).
# shellcheck disable=SC2086
"$VPY" -m pip install -q $TORCH_INDEX "$TORCH_SPEC"
"$VPY" -m pip install -q numpy "$TORCH_SPEC"

step "install the sdist with no working C++ compiler"
CXX=/nonexistent/c++ "$VPY" -m pip install -q --no-cache-dir --no-deps "$sdist"
(cd "$work" && "$VPY" - <<'EOF'
import torch, mob_kernels
from importlib.resources import files

assert "cpu" not in mob_kernels.available_backends(), mob_kernels.available_backends()
note = files("mob_kernels") / "_C_build_failure.txt"
print("build failure note:", note.read_text().strip())
vis, prompt = torch.randn(2, 64, 32), torch.randn(2, 8, 32)
try:
    mob_kernels.select(vis, prompt, 4, 8, backend="cpu")
except mob_kernels.BackendUnavailableError as e:
    print("select(backend='cpu') raises BackendUnavailableError:", e)
else:
    raise SystemExit("backend='cpu' ran without the extension")
print("select(backend='auto') runs on", mob_kernels.resolve_backend("auto", "cpu"), mob_kernels.select(vis, prompt, 4, 8).shape)
EOF
)
"$VPY" -m pip uninstall -q -y mob_kernels

step "install the sdist (MOB_EXTENSION=on)"
MOB_EXTENSION=on "$VPY" -m pip install -q --no-cache-dir "$sdist" "$TORCH_SPEC"
(cd "$work" && "$VPY" - <<'EOF'
import importlib.metadata as md
import torch, mob_kernels
from importlib.resources import files

print("mob_kernels", mob_kernels.__version__, "from", mob_kernels.__file__, "backends", mob_kernels.available_backends())
assert md.version("mob_kernels") == mob_kernels.__version__, (md.version("mob_kernels"), mob_kernels.__version__)
assert (files("mob_kernels") / "py.typed").is_file() and not (files("mob_kernels") / "_C_build_failure.txt").is_file()
assert any(f.name == "LICENSE" for f in md.files("mob_kernels")), "LICENSE is not in the installed metadata"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    vis, prompt = torch.randn(3, 576, 256, dtype=dtype), torch.randn(3, 40, 256, dtype=dtype)
    got = mob_kernels.select(vis, prompt, k_p=32, k=64, backend="cpu")
    want = mob_kernels.select(vis, prompt, k_p=32, k=64, backend="reference")
    assert got.shape == (3, 64) and torch.equal(got, want), dtype
print("select(backend='cpu') equals the reference on float32 and bfloat16")
EOF
)

step "mypy --strict against the installed package"
MOB_TYPECHECK_PYTHON="$VPY" "$PY" -m pytest -q python_tests/test_packaging.py -k mypy

step "done"
