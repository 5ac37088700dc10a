"""Build driver: setuptools hands the extension mob_kernels._C to CMake (with ninja).

Environment: MOB_CUDA=auto|on|off (CUDA backend; auto = when nvcc is found), MOB_CUDA_ARCHS (default "80;90"),
MOB_SANITIZE=1 (ASan + UBSan build), MOB_BUILD_JOBS (parallel compile jobs).
"""

import os
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
        if subprocess.run(["ninja", "--version"], capture_output=True).returncode == 0:
            args.append("-GNinja")
        jobs = os.environ.get("MOB_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("mob_kernels._C")], cmdclass={"build_ext": CMakeBuild})
