"""Packaging: one version source, the sdist's contents, and the public API as a type checker sees it.

The slow end-to-end check (build the sdist, install it in a clean virtualenv with build isolation, call the C++
backend, type-check against the installed wheel) is scripts/check_sdist.sh, run by CI. It re-runs the type-checking
test here against its install by setting MOB_TYPECHECK_PYTHON to that virtualenv's interpreter.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

import mob_kernels

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(mob_kernels.__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------- version


def test_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|(a|b|rc)\d+)?", mob_kernels.__version__)


def test_installed_metadata_version_is_the_package_version():
    try:
        installed = importlib.metadata.version("mob_kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mob_kernels is imported from the source tree without being installed")
    assert installed == mob_kernels.__version__, (
        f"installed metadata says {installed}, mob_kernels.__version__ is {mob_kernels.__version__}: reinstall "
        "(`make install`) after changing mob_kernels/_version.py"
    )


def test_ships_py_typed():
    assert (PACKAGE / "py.typed").is_file()


# ------------------------------------------------------------------------------------------------------------- sdist

# Allowed in the sdist beyond the package's Python files: the build's inputs and the metadata setuptools writes.
_SDIST_TOP = {"PKG-INFO", "README.md", "LICENSE", "pyproject.toml", "setup.py", "setup.cfg", "CMakeLists.txt",
              "MANIFEST.in"}


def test_sdist_holds_the_build_inputs_and_no_build_output(tmp_path):
    """The sdist of the tree (plus planted build junk) holds every file CMake and setup.py read, and nothing built."""
    # Built in this interpreter without isolation, so it needs pyproject's build requirement (PEP 639 license fields).
    pytest.importorskip("setuptools", minversion="77", reason="building the sdist needs setuptools>=77")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             ".pytest_cache", ".hypothesis", ".benchmarks"))
    junk = ["build/lib/mob_kernels/_C.so", ".venv/lib/site.py", "mob_kernels/_C.cpython-311-x86_64-linux-gnu.so",
            "csrc/cpu/dot.o", "csrc/__pycache__/x.pyc", "mob_kernels/__pycache__/ops.cpython-311.pyc"]
    for name in junk:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"junk")
    out = tmp_path / "dist"
    # setuptools' own PEP 517 hook, in the tree's Python: no isolated build environment, no network.
    hook = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", hook, str(out)], cwd=src, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    archive = out / run.stdout.split()[-1]
    assert archive.name == f"mob_kernels-{mob_kernels.__version__}.tar.gz"
    with tarfile.open(archive) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}

    def wanted(p: Path) -> bool:
        return p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".so", ".o", ".pyc")

    required = {"CMakeLists.txt", "setup.py", "pyproject.toml", "README.md", "LICENSE", "mob_kernels/py.typed"}
    required |= {p.relative_to(src).as_posix() for p in (src / "csrc").rglob("*") if wanted(p)}
    required |= {p.relative_to(src).as_posix() for p in (src / "mob_kernels").rglob("*.py") if wanted(p)}
    assert not required - names, f"missing from the sdist: {sorted(required - names)}"
    unexpected = {n for n in names if not (n in _SDIST_TOP or n in required or n.startswith("mob_kernels.egg-info/"))}
    assert not unexpected, f"unexpected files in the sdist: {sorted(unexpected)}"


# ------------------------------------------------------------------------------------------------------------ typing

# A user's program. Every public function is called as documented and its static type pinned with assert_type: a
# function that type checkers saw as Any (or as anything else) fails here. It also runs, so it stays a real program.
USER_PROGRAM = '''
from __future__ import annotations

import torch
from typing_extensions import assert_type

import mob_kernels
from mob_kernels import BackendUnavailableError

torch.manual_seed(0)
vis = torch.randn(2, 32, 16)
prompt = torch.randn(2, 5, 16)
mask = torch.ones(2, 5, dtype=torch.bool)

keep: torch.Tensor = mob_kernels.select(vis, prompt, k_p=4, k=8, prompt_mask=mask, fold=None, backend="auto")
assert_type(mob_kernels.select(vis, prompt, 4, 8, check_finite=True), torch.Tensor)
picks, count = mob_kernels.prompt_cover(vis, prompt, 4, prompt_mask=mask)
assert_type(mob_kernels.prompt_cover(vis, prompt, 4), tuple[torch.Tensor, torch.Tensor])
assert_type(picks, torch.Tensor)
assert_type(mob_kernels.farthest_point_sample(vis, 8), torch.Tensor)
assert_type(mob_kernels.farthest_point_sample(vis, 4, seed=picks, valid=None), torch.Tensor)
assert_type(mob_kernels.divprune(vis, 8, valid=None), torch.Tensor)
relevance = mob_kernels.cdpruner_relevance(vis, prompt, text_mask=mask)
assert_type(relevance, torch.Tensor)
assert_type(mob_kernels.cdpruner(vis, relevance, 8), torch.Tensor)
importance = torch.rand(2, 32)
kept, role = mob_kernels.d2pruner(vis, importance, 8)
assert_type(mob_kernels.d2pruner(vis, importance, 8, pivot_ratio=0.5), tuple[torch.Tensor, torch.Tensor])
assert_type(role, torch.Tensor)
assert_type(mob_kernels.btp_stage(vis, importance, 8, mode="union", n_attn=4, n_div=4), torch.Tensor)
assert_type(mob_kernels.available_backends(), list[str])
assert_type(mob_kernels.available_backends(torch.device("cpu")), list[str])
assert_type(mob_kernels.resolve_backend("auto", "cpu"), str)
assert_type(mob_kernels.method_names(), list[str])
assert_type(mob_kernels.budget_arguments("select", 64), dict[str, int])
assert_type(mob_kernels.prompt_budget(64), int)
assert_type(mob_kernels.__version__, str)
try:
    mob_kernels.resolve_backend("cuda", "cpu")
except BackendUnavailableError as e:
    assert_type(e, BackendUnavailableError)
    message: str = str(e)

pruned = vis.gather(1, keep.unsqueeze(-1).expand(-1, -1, vis.shape[-1]))
# The cover holds at most k_p tokens: fewer when prompt rows share their nearest tokens (contract: count <= k_p).
assert tuple(pruned.shape) == (2, 8, 16) and keep.dtype == torch.int64 and 1 <= int(count.min()) <= 4
'''

# Wrong uses: each line marked "# error" must be flagged, and nothing else.
USER_MISTAKES = '''
from __future__ import annotations

import torch

import mob_kernels

vis = torch.randn(2, 32, 16)
prompt = torch.randn(2, 5, 16)
as_text: str = mob_kernels.select(vis, prompt, 4, 8)  # error
mob_kernels.select(vis, prompt, k_p="4", k=8)  # error
mob_kernels.select(vis, prompt, 4, 8, prompt_mask=[True])  # error
picks, count, extra = mob_kernels.prompt_cover(vis, prompt, 4)  # error
mob_kernels.farthest_point_sample(vis, 8, seed=[0])  # error
mob_kernels.divprune(vis, 8, backend=1)  # error
mob_kernels.cdpruner(vis, 8)  # error
n: int = mob_kernels.available_backends()  # error
budget: dict[str, str] = mob_kernels.budget_arguments("select", 64)  # error
half: str = mob_kernels.prompt_budget(64)  # error
only_keep: torch.Tensor = mob_kernels.d2pruner(vis, torch.rand(2, 32), 8)  # error
mob_kernels.btp_stage(vis, torch.rand(2, 32), 8)  # error
fine: torch.Tensor = mob_kernels.divprune(vis, 8)
'''

MYPY_CONFIG = """
[mypy]
strict = True
# What a user sees: like any installed package, mob_kernels is read for its types but its own errors are not reported.
[mypy-mob_kernels.*]
ignore_errors = True
"""


def test_public_api_type_checks_with_mypy_strict(tmp_path, request):
    """mypy --strict accepts a typical user program (with each result's type pinned) and flags wrong uses.

    By default mypy reads the package from this source tree; with MOB_TYPECHECK_PYTHON set (scripts/check_sdist.sh) it
    reads the package installed in that interpreter's environment, where only py.typed makes its annotations count."""
    pytest.importorskip("mypy", reason="mypy is a test dependency (the Makefile's TEST_DEPS)")
    python = os.environ.get("MOB_TYPECHECK_PYTHON")
    good, bad = tmp_path / "user_program.py", tmp_path / "user_mistakes.py"
    good.write_text(USER_PROGRAM)
    bad.write_text(USER_MISTAKES)
    (tmp_path / "mypy.ini").write_text(MYPY_CONFIG)
    cache_name = "mypy-installed" if python else "mypy-tree"
    pytest_cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = pytest_cache.mkdir(cache_name) if pytest_cache is not None else tmp_path / cache_name
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    args = [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(cache),
            "--no-error-summary", "--show-error-codes", good.name, bad.name]
    if python:
        args[3:3] = ["--python-executable", python]
    else:
        env["MYPYPATH"] = str(ROOT)
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
    errors = [line for line in run.stdout.splitlines() if ": error:" in line]
    assert run.returncode in (0, 1) and not run.stderr.strip(), run.stdout + run.stderr
    in_good = [e for e in errors if e.startswith(good.name)]
    assert not in_good, "\n".join(in_good)
    flagged = {int(e.split(":")[1]) for e in errors if e.startswith(bad.name)}
    marked = {i for i, line in enumerate(USER_MISTAKES.splitlines(), 1) if line.endswith("# error")}
    assert flagged == marked, (
        f"lines marked # error: {sorted(marked)}, lines mypy flagged: {sorted(flagged)}\n" + "\n".join(errors)
    )
    # The program mypy accepted runs as written (on the reference backend: this checks the program, not a backend).
    runner = python or sys.executable
    env = {**env, "MOB_BACKEND": "reference"}
    ran = subprocess.run([runner, good.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr


# Fails fast (and says so) when the string above drifts from the public API.
def test_user_program_covers_the_public_api():
    called = set(re.findall(r"mob_kernels\.(\w+)", USER_PROGRAM))
    public = set(mob_kernels.__all__) - {"BackendUnavailableError"}
    assert public <= called, f"not exercised by USER_PROGRAM: {sorted(public - called)}"
    assert textwrap.dedent(USER_PROGRAM) == USER_PROGRAM
