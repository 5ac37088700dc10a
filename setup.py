"""Build driver: setuptools hands the extension mob_kernels._C to CMake (with ninja).

Environment: MOB_CUDA=auto|on|off (CUDA backend; auto = when nvcc is found), MOB_CUDA_ARCHS (default "80;90"),
MOB_SANITIZE=1 (ASan + UBSan build), MOB_BUILD_JOBS (parallel compile jobs), MOB_EXTENSION=auto|on|off (the whole
extension: auto = build it, and when the build fails (no C++ compiler, say) install the Python package without it;
on = a failed build fails the install; off = do not build it).

Without the extension the package still imports and the ``reference`` and ``triton`` backends run; the ``cpu`` and
``cuda`` backends raise ``BackendUnavailableError``. Why the build failed is written to
``mob_kernels/_C_build_failure.txt`` in the installed package (pip shows a build's output only with ``-v`` or when the
install fails).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
FAILURE_NOTE = "_C_build_failure.txt"  # in the package directory, only when the extension could not be built


def _extension_mode() -> str:
    mode = os.environ.get("MOB_EXTENSION", "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise SystemExit(f"MOB_EXTENSION must be auto, on or off, got MOB_EXTENSION={mode!r}")
    return mode


class CMakeExtension(Extension):
    def __init__(self, name: str, optional: bool):
        # optional: setuptools turns a CompileError from build_extension into a warning and installs without it.
        super().__init__(name, sources=[], optional=optional)


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        notes = self._failure_notes(ext)
        try:
            self._cmake_build(ext)
        except (ImportError, OSError, subprocess.CalledProcessError) as e:
            why = _describe(e)
            # No stale library may stand in for the one that failed (it would be installed, or imported in place).
            for path in self._library_paths(ext):
                path.unlink(missing_ok=True)
            for note in notes if ext.optional else []:
                note.parent.mkdir(parents=True, exist_ok=True)
                note.write_text(why + "\n")
            banner = "=" * 100
            print(f"\n{banner}\nmob_kernels: building the C++ extension {ext.name} failed: {why}\n"
                  + ("The package is installed without it: the 'cpu' and 'cuda' backends will raise "
                     "BackendUnavailableError,\nthe 'reference' (and, with triton, 'triton') backends still run. "
                     "MOB_EXTENSION=on makes this failure fatal.\n" if ext.optional else "")
                  + banner, file=sys.stderr, flush=True)
            raise CompileError(f"{ext.name}: {why}") from e
        for note in notes:
            note.unlink(missing_ok=True)

    def _library_paths(self, ext: Extension) -> list[Path]:
        paths = [Path(self.get_ext_fullpath(ext.name))]  # in build_lib (setuptools builds there, then copies)
        if self.editable_mode:
            paths.append(ROOT / "mob_kernels" / Path(self.get_ext_filename(ext.name)).name)
        return paths

    def _failure_notes(self, ext: Extension) -> list[Path]:
        return [p.with_name(FAILURE_NOTE) for p in self._library_paths(ext)]

    def _cmake_build(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        sanitize = os.environ.get("MOB_SANITIZE", "0") not in ("", "0", "off", "OFF")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMOB_CUDA={os.environ.get('MOB_CUDA', 'auto')}",
            f"-DMOB_CUDA_ARCHS={os.environ.get('MOB_CUDA_ARCHS', '80;90')}",
            f"-DMOB_SANITIZE={'ON' if sanitize else 'OFF'}",
            f"-DCMAKE_BUILD_TYPE={'RelWithDebInfo' if sanitize else 'Release'}",
        ]
        ninja = shutil.which("ninja")
        if ninja:
            # Named explicitly: a cache from an earlier isolated build may point at a ninja that no longer exists.
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _drop_stale_cache(build_dir, "Ninja" if ninja else None)
        jobs = os.environ.get("MOB_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


def _describe(e: BaseException) -> str:
    if isinstance(e, subprocess.CalledProcessError):
        step = "configure" if "-S" in e.cmd else "compile"
        hint = "no working C++ compiler?" if step == "configure" else "a compile error"
        return (f"the CMake {step} step exited with status {e.returncode} ({hint} To see CMake's output, reinstall "
                "with MOB_EXTENSION=on and pip's -v)")
    return f"{type(e).__name__}: {e}"


def _drop_stale_cache(build_dir: Path, generator: str | None) -> None:
    """Forget a CMake cache written by another cmake/ninja (e.g. a deleted pip build environment) or generator."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.exists():
        return
    text = cache.read_text(errors="replace")
    tools = re.findall(r"^CMAKE_(?:COMMAND|MAKE_PROGRAM):\w+=(.+)$", text, re.M)
    cached_gen = re.search(r"^CMAKE_GENERATOR:\w+=(.+)$", text, re.M)
    stale = any(not Path(t.strip()).exists() for t in tools)
    stale |= generator is not None and cached_gen is not None and cached_gen.group(1).strip() != generator
    if stale:
        cache.unlink()
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)


_MODE = _extension_mode()
setup(
    ext_modules=[] if _MODE == "off" else [CMakeExtension("mob_kernels._C", optional=_MODE == "auto")],
    cmdclass={"build_ext": CMakeBuild},
)
