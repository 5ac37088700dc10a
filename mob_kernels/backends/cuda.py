"""CUDA C++ backend: hands checked CUDA tensors to ``mob_kernels._C`` (csrc/cuda) as raw pointers and strides.

The extension does not link libtorch. This module allocates the outputs and one scratch workspace with torch on the
tensors' device (so torch's caching allocator serves them, stream-ordered on the current stream) and passes
``data_ptr()``s, sizes, element strides, a dtype tag, the device index and ``torch.cuda.current_stream()``. The
kernels are enqueued on that stream; nothing here waits for them.

Available when the extension was built with nvcc (``_C.WITH_CUDA``); otherwise every call raises
``BackendUnavailableError`` with "built without CUDA".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BackendUnavailableError
from .reference import ReferenceBackend

try:
    from .. import _C
except ImportError as e:  # built without the extension at all
    _C = None
    _IMPORT_ERROR = str(e)

_DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_OP_PROMPT_COVER, _OP_FPS, _OP_SELECT = 0, 1, 2

# Keep per-sample arrays in global memory even where shared memory would fit (tests use it to run the fallback path
# for N too large for one block's shared memory on small inputs).
FORCE_GLOBAL_WORKSPACE = False


def _unavailable_reason() -> str | None:
    if _C is None:
        return f"built without CUDA: the C++ extension mob_kernels._C is not built ({_IMPORT_ERROR})"
    if not getattr(_C, "WITH_CUDA", False):
        return (
            "built without CUDA: mob_kernels._C was compiled without nvcc (MOB_CUDA=off, or no CUDA toolkit found); "
            "reinstall with a CUDA toolkit on PATH and MOB_CUDA=on to build the CUDA backend"
        )
    return None


def _require(*tensors: Tensor) -> tuple[int, int]:
    """(device index, current stream handle) for CUDA tensors on one device; raises otherwise."""
    reason = _unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(f"backend='cuda' is unavailable: {reason}")
    device = tensors[0].device
    for t in tensors:
        if t.device.type != "cuda":
            raise ValueError(f"the cuda backend needs CUDA tensors, got a tensor on {t.device}")
        if t.device != device:
            raise ValueError(f"the cuda backend needs every tensor on one device, got {device} and {t.device}")
    return device.index, torch.cuda.current_stream(device).cuda_stream


def _features(x: Tensor) -> tuple[int, int, int]:
    # [B, rows, d] with unit stride in d (the registry guarantees it); empty tensors may carry any strides.
    return x.data_ptr(), x.stride(0), x.stride(1)


def _workspace(op: int, B: int, N: int, L: int, k_p: int, device: torch.device) -> Tensor:
    nbytes = _C.cuda_workspace_bytes(op, B, N, L, k_p)
    if nbytes < 0:
        raise ValueError(f"workspace size overflows for B={B}, N={N}, L={L}, k_p={k_p}")
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)


def _options() -> int:
    return _C.CUDA_FORCE_GLOBAL_WORKSPACE if FORCE_GLOBAL_WORKSPACE else 0


class CudaBackend:
    name = "cuda"

    @property
    def unavailable_reason(self) -> str | None:
        # Read on every dispatch, so that tests can flip _C.WITH_CUDA to check the "built without CUDA" path.
        return _unavailable_reason()

    @staticmethod
    def gram(vis: Tensor) -> Tensor:
        return ReferenceBackend.gram(vis)  # no native kernel yet

    @staticmethod
    def dpp_greedy(vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return ReferenceBackend.dpp_greedy(vis, relevance, valid, k)  # no native kernel yet

    @staticmethod
    def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: Tensor) -> tuple[Tensor, Tensor]:
        device, stream = _require(vis, prompt, mask)
        B, N, d = vis.shape
        L = prompt.shape[1]
        picks = torch.empty(B, k_p, dtype=torch.int64, device=vis.device)
        count = torch.empty(B, dtype=torch.int64, device=vis.device)
        ws = _workspace(_OP_PROMPT_COVER, B, N, L, k_p, vis.device)
        _C.prompt_cover_cuda(
            device, stream, B, N, L, d, _DTYPE_TAG[vis.dtype], *_features(vis), *_features(prompt), mask.data_ptr(),
            k_p, fold.data_ptr(), picks.data_ptr(), count.data_ptr(), ws.data_ptr(), ws.numel(), _options(),
        )
        return picks, count

    @staticmethod
    def farthest_point_sample(
        vis: Tensor, seed: Tensor, num_picks: Tensor, k: int, valid: Tensor | None = None, sim: Tensor | None = None
    ) -> Tensor:
        if valid is not None:  # no native kernel for the valid mask yet
            return ReferenceBackend.farthest_point_sample(vis, seed, num_picks, k, valid, sim)
        device, stream = _require(vis, seed, num_picks)
        B, N, d = vis.shape
        out = torch.empty(B, k, dtype=torch.int64, device=vis.device)
        ws = _workspace(_OP_FPS, B, N, 0, 0, vis.device)
        _C.farthest_point_sample_cuda(
            device, stream, B, N, d, _DTYPE_TAG[vis.dtype], *_features(vis), seed.data_ptr(), seed.shape[1],
            num_picks.data_ptr(), k, out.data_ptr(), ws.data_ptr(), ws.numel(), _options(),
        )
        return out

    @staticmethod
    def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: Tensor) -> Tensor:
        device, stream = _require(vis, prompt, mask)
        B, N, d = vis.shape
        L = prompt.shape[1]
        out = torch.empty(B, k, dtype=torch.int64, device=vis.device)
        ws = _workspace(_OP_SELECT, B, N, L, k_p, vis.device)
        _C.select_cuda(
            device, stream, B, N, L, d, _DTYPE_TAG[vis.dtype], *_features(vis), *_features(prompt), mask.data_ptr(),
            k_p, k, fold.data_ptr(), out.data_ptr(), ws.data_ptr(), ws.numel(), _options(),
        )
        return out


BACKEND = CudaBackend()
