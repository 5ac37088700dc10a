"""mob_kernels: fast, exact MoB visual-token selection (prompt cover + farthest point sampling).

    import mob_kernels
    keep = mob_kernels.select(vis, prompt, k_p=32, k=64)        # or torch.ops.mob.select(vis, prompt, 32, 64)

See SPEC.md (shipped as the docstrings of ``mob_kernels.reference``) for the exact contract.
"""

from .ops import (
    BackendUnavailableError,
    available_backends,
    farthest_point_sample,
    prompt_cover,
    resolve_backend,
    select,
)

__version__ = "0.1.0"

__all__ = [
    "select",
    "prompt_cover",
    "farthest_point_sample",
    "available_backends",
    "resolve_backend",
    "BackendUnavailableError",
    "__version__",
]
