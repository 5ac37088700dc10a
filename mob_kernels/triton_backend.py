"""Triton backend adapter: the backend protocol of ``mob_kernels.ops`` on top of the two vendorable kernel files.

``select`` is prompt cover (one launch) -> FPS seeded by the cover picks with num_picks = k - count computed on the
device (fill_to_k) and the sorted union written by the FPS kernel itself (sorted_union): no ``.item()``, no
data-dependent shape, so the whole call can be captured in a CUDA graph. Runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (ops.py decides which).
"""

from __future__ import annotations

from torch import Tensor

try:
    from .triton_farthest_point_sample import farthest_point_sample as _fps
    from .triton_prompt_cover import prompt_cover as _prompt_cover

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except ImportError as e:  # triton not installed (e.g. CPU-only wheels on macOS / Windows)
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton does not import ({e}); pip install triton"


def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: int) -> tuple[Tensor, Tensor]:
    return _prompt_cover(vis, prompt, mask, k_p, fold)


def farthest_point_sample(vis: Tensor, seed: Tensor, num_picks: Tensor, k: int) -> Tensor:
    return _fps(vis, k, seed, num_picks)


def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: int) -> Tensor:
    cover, _count = _prompt_cover(vis, prompt, mask, k_p, fold)
    return _fps(vis, k, cover, fill_to_k=True, sorted_union=True)
