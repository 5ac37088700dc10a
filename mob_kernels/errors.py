"""Exceptions of mob_kernels. A leaf module: it imports nothing from the package, so every other module can use it."""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, not installed, or wrong device)."""


def extension_missing(error: ImportError) -> str:
    """Why mob_kernels._C cannot be imported, for BackendUnavailableError messages: the import error and, when the
    install's C++ build failed (setup.py with MOB_EXTENSION=auto), the reason it wrote beside the package."""
    from importlib import resources

    note = resources.files(__package__) / "_C_build_failure.txt"
    why = f"; its build failed: {note.read_text().strip()}" if note.is_file() else ""
    return (
        f"the C++ extension mob_kernels._C is not built ({error}){why}; reinstall with "
        "`MOB_EXTENSION=on pip install -v mob_kernels` (`make install` in a checkout) to see the build's errors"
    )
