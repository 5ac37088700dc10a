"""Build driver: setuptools hands the extension mob_kernels._C to CMake (with ninja).

Environment: MOB_CUDA=auto|on|off (CUDA backend; auto = when nvcc is found), MOB_CUDA_ARCHS (default "80;90"),
MOB_SANITIZE=1 (ASan + UBSan build), MOB_BUILD_JOBS (parallel compile jobs).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
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


setup(ext_modules=[CMakeExtension("mob_kernels._C")], cmdclass={"build_ext": CMakeBuild})
