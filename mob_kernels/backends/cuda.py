"""CUDA C++ backend: hands checked CUDA tensors to ``mob_kernels._C`` (csrc/cuda) as raw pointers and strides.

Every primitive of the backend protocol runs natively, plus a fused ``select``:

* ``gram``: the tensor-core Gram kernel (bf16/fp16 products exact with float32 accumulation, float32 by a 3xTF32
  split), written straight into the output;
* ``prompt_cover``, ``select``: the same kernel's prompt tiles, a membership launch and one block per sample for the
  picks (and, in select, FPS over the Gram rows and the sorted union): three launches;
* ``farthest_point_sample`` (``valid`` and a caller's ``sim`` included) and ``dpp_greedy``: Gram kernel, then one block
  per sample reading Gram rows;
* ``independent_set``: no native kernel yet, delegates to the reference (plain torch, host-sync free).

The extension does not link libtorch. This module allocates the outputs and one scratch workspace per call with torch
on the tensors' device (torch's caching allocator serves it, stream-ordered on the current stream) and passes
``data_ptr()``s, sizes, element strides, a dtype tag, the device index and ``torch.cuda.current_stream()``. The
kernels are enqueued on that stream; nothing here waits for them, so every call can be captured in a CUDA graph.

Available when the extension was built with nvcc (``_C.WITH_CUDA``); otherwise every call raises
``BackendUnavailableError`` with "built without CUDA".
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import BackendUnavailableError, extension_missing
from .reference import ReferenceBackend

try:
    from .. import _C
except ImportError as e:  # built without the extension at all
    _C = None
    _IMPORT_ERROR = extension_missing(e)

_DTYPE_TAG = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Keep per-sample arrays in global memory even where shared memory would fit (tests use it to run the fallback path
# for N too large for one block's shared memory on small inputs).
FORCE_GLOBAL_WORKSPACE = False
# Compute similarity rows from the features when needed instead of keeping a Gram matrix (the path for N beyond the
# Gram budget, 16,384 tokens per sample; tests use it on small inputs).
ROWS_ON_DEMAND = False


def _unavailable_reason() -> str | None:
    if _C is None:
        return f"built without CUDA: {_IMPORT_ERROR}"
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
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"the cuda backend needs CUDA tensors, got a tensor on {t.device}")
        if t.device != device:
            raise ValueError(f"the cuda backend needs every tensor on one device, got {device} and {t.device}")
    return device.index, torch.cuda.current_stream(device).cuda_stream


def _features(x: Tensor) -> tuple[int, int, int]:
    # [B, rows, d] with unit stride in d (the registry guarantees it); empty tensors may carry any strides.
    return x.data_ptr(), x.stride(0), x.stride(1)


def _options() -> int:
    return (_C.CUDA_FORCE_GLOBAL_WORKSPACE if FORCE_GLOBAL_WORKSPACE else 0) | (
        _C.CUDA_ROWS_ON_DEMAND if ROWS_ON_DEMAND else 0
    )


def _workspace(op: str, device: torch.device, B: int, N: int, L: int = 0, k_p: int = 0, k: int = 0,
               has_sim: bool = False) -> Tensor:
    """The call's one scratch allocation (at least one byte, so data_ptr() is never null)."""
    nbytes = _C.cuda_workspace_bytes(getattr(_C.CudaOp, op), B, N, L, k_p, k, has_sim, _options())
    if nbytes < 0:
        raise ValueError(f"workspace size overflows int64 for B={B}, N={N}, L={L}, k_p={k_p}, k={k}")
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)


class CudaBackend(ReferenceBackend):  # primitives without a native kernel run the reference's
    name = "cuda"

    @property
    def unavailable_reason(self) -> str | None:
        # Read on every dispatch, so that tests can flip _C.WITH_CUDA to check the "built without CUDA" path.
        return _unavailable_reason()

    @staticmethod
    def gram(vis: Tensor) -> Tensor:
        device, stream = _require(vis)
        B, N, d = vis.shape
        out = torch.empty(B, N, N, dtype=torch.float32, device=vis.device)
        _C.gram_cuda(device, stream, B, N, d, _DTYPE_TAG[vis.dtype], *_features(vis), out.data_ptr(), _options())
        return out

    @staticmethod
    def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: Tensor) -> tuple[Tensor, Tensor]:
        device, stream = _require(vis, prompt, mask, fold)
        B, N, d = vis.shape
        L = prompt.shape[1]
        picks = torch.empty(B, k_p, dtype=torch.int64, device=vis.device)
        count = torch.empty(B, dtype=torch.int64, device=vis.device)
        ws = _workspace("prompt_cover", vis.device, B, N, L, k_p)
        _C.prompt_cover_cuda(
            device, stream, B, N, L, d, _DTYPE_TAG[vis.dtype], *_features(vis), *_features(prompt), mask.data_ptr(),
            k_p, fold.data_ptr(), picks.data_ptr(), count.data_ptr(), ws.data_ptr(), ws.numel(), _options(),
        )
        return picks, count

    @staticmethod
    def farthest_point_sample(
        vis: Tensor, seed: Tensor, num_picks: Tensor, k: int, valid: Tensor | None = None, sim: Tensor | None = None
    ) -> Tensor:
        device, stream = _require(vis, seed, num_picks, valid, sim)
        B, N, d = vis.shape
        if sim is not None and (sim.dtype != torch.float32 or (N > 1 and sim.stride(2) != 1)):
            sim = sim.float().contiguous()
        out = torch.empty(B, k, dtype=torch.int64, device=vis.device)
        ws = _workspace("farthest_point_sample", vis.device, B, N, k=k, has_sim=sim is not None)
        _C.farthest_point_sample_cuda(
            device, stream, B, N, d, _DTYPE_TAG[vis.dtype], *_features(vis), seed.data_ptr(), seed.shape[1],
            num_picks.data_ptr(), k, 0 if valid is None else valid.data_ptr(),
            0 if sim is None else sim.data_ptr(), 0 if sim is None else sim.stride(0),
            0 if sim is None else (sim.stride(1) if N > 1 else N), out.data_ptr(), ws.data_ptr(), ws.numel(),
            _options(),
        )
        return out

    @staticmethod
    def dpp_greedy(vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        device, stream = _require(vis, relevance, valid)
        B, N, d = vis.shape
        relevance = relevance.float().contiguous()
        valid = valid.contiguous()
        order = torch.empty(B, k, dtype=torch.int64, device=vis.device)
        gain = torch.empty(B, k, dtype=torch.float32, device=vis.device)
        ws = _workspace("dpp_greedy", vis.device, B, N, k=k)
        _C.dpp_greedy_cuda(
            device, stream, B, N, d, _DTYPE_TAG[vis.dtype], *_features(vis), relevance.data_ptr(), valid.data_ptr(),
            k, order.data_ptr(), gain.data_ptr(), ws.data_ptr(), ws.numel(), _options(),
        )
        return order, gain

    @staticmethod
    def independent_set(
        vis: Tensor, rank: Tensor, num_picks: Tensor, k: int, near: float, far: float, grid: Tensor | None, radius: int
    ) -> Tensor:
        _require(vis, rank, num_picks, grid)
        return ReferenceBackend.independent_set(vis, rank, num_picks, k, near, far, grid, radius)

    @staticmethod
    def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: Tensor) -> Tensor:
        device, stream = _require(vis, prompt, mask, fold)
        B, N, d = vis.shape
        L = prompt.shape[1]
        out = torch.empty(B, k, dtype=torch.int64, device=vis.device)
        ws = _workspace("select", vis.device, B, N, L, k_p, k)
        _C.select_cuda(
            device, stream, B, N, L, d, _DTYPE_TAG[vis.dtype], *_features(vis), *_features(prompt), mask.data_ptr(),
            k_p, k, fold.data_ptr(), out.data_ptr(), ws.data_ptr(), ws.numel(), _options(),
        )
        return out


BACKEND = CudaBackend()
