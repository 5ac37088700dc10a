"""Triton backend: the backend protocol on top of the vendorable kernel files in ``triton_kernels/``.

Every primitive is native and host-sync free with fixed output shapes (so calls can be captured in a CUDA graph):

* ``gram``, ``prompt_cover``, ``farthest_point_sample`` -- ``triton_kernels/mob_select.py``, one launch each (the FPS
  computes its Gram tiles and runs its per-sample loop in the same launch, or reads the given ``sim``);
* ``select`` (MoB, fused) -- the same file: cover tiles, Gram tiles, the cover's finish and the seeded FPS writing the
  sorted union, all in ONE launch;
* ``dpp_greedy`` -- ``triton_kernels/dpp_greedy.py``: Gram tiles and the per-sample greedy loop in one launch;
* ``independent_set`` -- ``triton_kernels/independent_set.py``: Gram tiles thresholded into bit-packed adjacency and
  the per-sample greedy walk in one launch.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the registry decides which).
"""

from __future__ import annotations

from torch import Tensor


try:
    from .triton_kernels import dpp_greedy as _dpp
    from .triton_kernels import independent_set as _mis
    from .triton_kernels import mob_select as _mob
except ImportError as e:  # triton not installed (e.g. CPU-only wheels on macOS / Windows)
    _dpp = _mis = _mob = None
    UNAVAILABLE_REASON = f"triton does not import ({e}); pip install triton"


class TritonBackend:
    name = "triton"

    @staticmethod
    def gram(vis: Tensor) -> Tensor:
        return _mob.gram(vis)

    @staticmethod
    def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: Tensor) -> tuple[Tensor, Tensor]:
        return _mob.prompt_cover(vis, prompt, mask, k_p, fold)

    @staticmethod
    def farthest_point_sample(
        vis: Tensor, seed: Tensor, num_picks: Tensor, k: int, valid: Tensor | None = None, sim: Tensor | None = None
    ) -> Tensor:
        return _mob.farthest_point_sample(vis, seed, num_picks, k, valid, sim)

    @staticmethod
    def dpp_greedy(vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return _dpp.dpp_greedy(vis, relevance, valid, k)

    @staticmethod
    def independent_set(
        vis: Tensor, rank: Tensor, num_picks: Tensor, k: int, near: float, far: float, grid: Tensor | None, radius: int
    ) -> Tensor:
        return _mis.independent_set(vis, rank, num_picks, k, near, far, grid, radius)

    @staticmethod
    def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: Tensor) -> Tensor:
        return _mob.select(vis, prompt, mask, k_p, k, fold)


BACKEND = TritonBackend() if _mob is not None else None
