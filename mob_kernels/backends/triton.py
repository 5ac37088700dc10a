"""Triton backend: the backend protocol on top of the vendorable kernel files in ``triton_kernels/``.

``select`` is prompt cover (one launch) -> FPS seeded by the cover picks with num_picks = k - count computed on the
device (fill_to_k) and the sorted union written by the FPS kernel itself (sorted_union): no ``.item()``, no
data-dependent shape, so the whole call can be captured in a CUDA graph. Runs on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (the registry decides which).
"""

from __future__ import annotations

from torch import Tensor

from .reference import ReferenceBackend

try:
    from .triton_kernels.farthest_point_sample import farthest_point_sample as _fps
    from .triton_kernels.prompt_cover import prompt_cover as _prompt_cover
except ImportError as e:  # triton not installed (e.g. CPU-only wheels on macOS / Windows)
    _fps = _prompt_cover = None
    UNAVAILABLE_REASON = f"triton does not import ({e}); pip install triton"


class TritonBackend:
    name = "triton"

    @staticmethod
    def gram(vis: Tensor) -> Tensor:
        return ReferenceBackend.gram(vis)  # no native kernel exposed yet

    @staticmethod
    def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: Tensor) -> tuple[Tensor, Tensor]:
        return _prompt_cover(vis, prompt, mask, k_p, fold)

    @staticmethod
    def farthest_point_sample(
        vis: Tensor, seed: Tensor, num_picks: Tensor, k: int, valid: Tensor | None = None, sim: Tensor | None = None
    ) -> Tensor:
        if valid is not None:  # no native kernel for the valid mask yet
            return ReferenceBackend.farthest_point_sample(vis, seed, num_picks, k, valid, sim)
        return _fps(vis, k, seed, num_picks)

    @staticmethod
    def dpp_greedy(vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return ReferenceBackend.dpp_greedy(vis, relevance, valid, k)  # no native kernel yet

    @staticmethod
    def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: Tensor) -> Tensor:
        cover, _count = _prompt_cover(vis, prompt, mask, k_p, fold)
        return _fps(vis, k, cover, fill_to_k=True, sorted_union=True)


BACKEND = TritonBackend() if _fps is not None else None
