"""Exceptions of mob_kernels. A leaf module: it imports nothing from the package, so every other module can use it."""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, not installed, or wrong device)."""
