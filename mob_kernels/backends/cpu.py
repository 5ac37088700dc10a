"""C++ CPU backend: hands checked tensors to ``mob_kernels._C`` (csrc/cpu) as raw pointers and strides.

The extension does not link libtorch; this module allocates the outputs, passes ``data_ptr()``s, sizes, element
strides and a dtype tag, and the C++ releases the GIL while it runs (OpenMP across samples, or inside one sample).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import ReferenceBackend

try:
    from .. import _C
except ImportError as e:  # built without the extension (e.g. an sdist that failed to compile)
    _C = None
    UNAVAILABLE_REASON = f"the C++ extension mob_kernels._C is not built ({e}); reinstall with `pip install -e .`"

DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _features(x: Tensor) -> tuple[int, int, int]:
    # [B, rows, d] with unit stride in d (the registry guarantees it); empty tensors may carry any strides.
    return x.data_ptr(), x.stride(0), x.stride(1)


class CpuBackend:
    name = "cpu"

    @staticmethod
    def gram(vis: Tensor) -> Tensor:
        return ReferenceBackend.gram(vis)  # no native kernel yet

    @staticmethod
    def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: Tensor) -> tuple[Tensor, Tensor]:
        B, N, d = vis.shape
        picks = torch.empty(B, k_p, dtype=torch.int64)
        count = torch.empty(B, dtype=torch.int64)
        _C.prompt_cover_cpu(
            B, N, prompt.shape[1], d, DTYPE_TAG[vis.dtype], *_features(vis), *_features(prompt), mask.data_ptr(),
            k_p, fold.data_ptr(), picks.data_ptr(), count.data_ptr(),
        )
        return picks, count

    @staticmethod
    def farthest_point_sample(
        vis: Tensor, seed: Tensor, num_picks: Tensor, k: int, valid: Tensor | None = None, sim: Tensor | None = None
    ) -> Tensor:
        if valid is not None:  # no native kernel for the valid mask yet
            return ReferenceBackend.farthest_point_sample(vis, seed, num_picks, k, valid, sim)
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64)
        _C.farthest_point_sample_cpu(
            B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), seed.data_ptr(), seed.shape[1], num_picks.data_ptr(), k,
            out.data_ptr(),
        )
        return out

    @staticmethod
    def dpp_greedy(vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return ReferenceBackend.dpp_greedy(vis, relevance, valid, k)  # no native kernel yet

    @staticmethod
    def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: Tensor) -> Tensor:
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64)
        _C.select_cpu(
            B, N, prompt.shape[1], d, DTYPE_TAG[vis.dtype], *_features(vis), *_features(prompt), mask.data_ptr(),
            k_p, k, fold.data_ptr(), out.data_ptr(),
        )
        return out


BACKEND = CpuBackend() if _C is not None else None
