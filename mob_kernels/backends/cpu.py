"""C++ CPU backend: hands checked tensors to ``mob_kernels._C`` (csrc/cpu) as raw pointers and strides.

The extension does not link libtorch; this module allocates the outputs, passes ``data_ptr()``s, sizes, element
strides and a dtype tag (0 for an absent optional tensor), and the C++ releases the GIL while it runs (OpenMP across
samples, or inside one sample). gram, prompt_cover, farthest_point_sample (valid and sim included), dpp_greedy and
independent_set are native; MoB's select, DivPrune and CDPruner have fused implementations (the whole method per
sample in C++, the usable-token scan included). Primitives without a native kernel are inherited from the reference
backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import extension_missing
from .reference import ReferenceBackend

try:
    from .. import _C
except ImportError as e:  # built without the extension (e.g. an install whose C++ build failed)
    _C = None
    UNAVAILABLE_REASON = extension_missing(e)

DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _features(x: Tensor) -> tuple[int, int, int]:
    # [B, rows, d] with unit stride in d (the registry guarantees it); empty tensors may carry any strides.
    return x.data_ptr(), x.stride(0), x.stride(1)


def _optional(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


class CpuBackend(ReferenceBackend):  # primitives without a native kernel run the reference's
    name = "cpu"

    @staticmethod
    def gram(vis: Tensor) -> Tensor:
        B, N, d = vis.shape
        out = torch.empty(B, N, N, dtype=torch.float32)
        _C.gram_cpu(B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), out.data_ptr())
        return out

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
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64)
        if sim is not None:
            sim = sim if sim.dtype == torch.float32 and (sim.stride(-1) == 1 or N <= 1) else sim.float().contiguous()
        _C.farthest_point_sample_cpu(
            B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), seed.data_ptr(), seed.shape[1], num_picks.data_ptr(), k,
            _optional(valid), *((sim.data_ptr(), sim.stride(0), sim.stride(1)) if sim is not None else (0, 0, 0)),
            out.data_ptr(),
        )
        return out

    @staticmethod
    def dpp_greedy(vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        B, N, d = vis.shape
        order = torch.empty(B, k, dtype=torch.int64)
        gain = torch.empty(B, k, dtype=torch.float32)
        r = relevance.float().contiguous()
        _C.dpp_greedy_cpu(
            B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), r.data_ptr(), valid.data_ptr(), k, order.data_ptr(),
            gain.data_ptr(),
        )
        return order, gain

    @staticmethod
    def independent_set(
        vis: Tensor, rank: Tensor, num_picks: Tensor, k: int, near: float, far: float, grid: Tensor | None, radius: int
    ) -> Tensor:
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64)
        r, n = rank.contiguous(), num_picks.contiguous()  # held: the C++ reads them through raw pointers
        g = (0, 0, 0)
        if grid is not None:  # any batch and row strides (an expanded shared grid stays a view)
            if grid.dtype != torch.int64 or grid.stride(-1) != 1:
                grid = grid.to(torch.int64).contiguous()
            g = (grid.data_ptr(), grid.stride(0), grid.stride(1))
        _C.independent_set_cpu(B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), r.data_ptr(), n.data_ptr(), k,
                               float(near), float(far), *g, int(radius), out.data_ptr())
        return out

    @staticmethod
    def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: Tensor) -> Tensor:
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64)
        _C.select_cpu(
            B, N, prompt.shape[1], d, DTYPE_TAG[vis.dtype], *_features(vis), *_features(prompt), mask.data_ptr(),
            k_p, k, fold.data_ptr(), out.data_ptr(),
        )
        return out

    @staticmethod
    def cdpruner(vis: Tensor, relevance: Tensor, k: int, valid: Tensor | None) -> Tensor:
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64)
        r = relevance.float().contiguous()
        _C.cdpruner_cpu(B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), r.data_ptr(), _optional(valid), k,
                        out.data_ptr())
        return out

    @staticmethod
    def divprune(vis: Tensor, k: int, valid: Tensor | None) -> Tensor:
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64)
        _C.divprune_cpu(B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), _optional(valid), k, out.data_ptr())
        return out


BACKEND = CpuBackend() if _C is not None else None
