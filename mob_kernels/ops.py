"""The public ops: argument checking, backend dispatch and the ``torch.ops.mob`` registrations, in one place.

Every backend module exposes the same three functions on batched, checked inputs (see ``mob_kernels/reference.py``):

    prompt_cover(vis, prompt, mask, k_p, fold)             -> (picks [B, k_p] int64, -1 padded; count [B] int64)
    farthest_point_sample(vis, seed, num_picks, k)         -> picks [B, k] int64 in selection order, -1 padded
    select(vis, prompt, mask, k_p, k, fold)                -> [B, k] int64 sorted

What a backend may assume: ``vis`` ``[B, N, d]`` and ``prompt`` ``[B, L, d]`` share a dtype in {float32, float16,
bfloat16} and a device, have unit stride in ``d`` (batch and row strides are free); ``mask`` is a contiguous ``[B, L]``
bool; ``seed`` a contiguous ``[B, m]`` int64 of ``-1`` or in-range indices; ``num_picks`` a contiguous ``[B]`` int64;
``0 <= k_p <= k <= N``; ``fold >= 0`` (0 = automatic per sample).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch
from torch import Tensor

from . import reference

__all__ = [
    "select",
    "prompt_cover",
    "farthest_point_sample",
    "available_backends",
    "resolve_backend",
    "BackendUnavailableError",
]

BACKENDS = ("reference", "cpu", "triton", "cuda")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, not installed, or wrong device)."""


# --------------------------------------------------------------------------------------------------- argument checks


def _check_int(name: str, value, *, allow_none: bool = False) -> int:
    if value is None and allow_none:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value}")
    return value


def _check_features(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {name}.dtype={x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, d] or [B, N, d], got {name}.shape={tuple(x.shape)}")


def _rowwise(x: Tensor) -> Tensor:
    # Backends read rows with unit stride in d; batch and row strides may be anything (views stay views).
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _check_vis(vis) -> tuple[Tensor, bool]:
    _check_features("vis", vis)
    unbatched = vis.dim() == 2
    return _rowwise(vis.unsqueeze(0) if unbatched else vis), unbatched


def _check_prompt(vis: Tensor, unbatched: bool, prompt, prompt_mask) -> tuple[Tensor, Tensor]:
    _check_features("prompt", prompt)
    if prompt.dim() != (2 if unbatched else 3):
        raise ValueError(
            f"prompt must have the same rank as vis ({2 if unbatched else 3}), got prompt.shape={tuple(prompt.shape)}"
        )
    if prompt.dtype != vis.dtype:
        raise TypeError(f"prompt must have vis's dtype {vis.dtype}, got prompt.dtype={prompt.dtype}")
    if prompt.device != vis.device:
        raise ValueError(f"prompt must be on vis's device {vis.device}, got prompt.device={prompt.device}")
    p = prompt.unsqueeze(0) if unbatched else prompt
    if p.shape[0] != vis.shape[0]:
        raise ValueError(f"prompt batch size {p.shape[0]} != vis batch size {vis.shape[0]} (prompt.shape={tuple(prompt.shape)})")
    if p.shape[2] != vis.shape[2]:
        raise ValueError(f"prompt feature size d={p.shape[2]} != vis feature size d={vis.shape[2]}")
    B, L = p.shape[:2]
    if prompt_mask is None:
        mask = torch.ones(B, L, dtype=torch.bool, device=vis.device)
    else:
        if not isinstance(prompt_mask, Tensor):
            raise TypeError(f"prompt_mask must be a bool torch.Tensor or None, got {type(prompt_mask).__name__}")
        if prompt_mask.dtype != torch.bool:
            raise TypeError(f"prompt_mask must be bool, got prompt_mask.dtype={prompt_mask.dtype}")
        if prompt_mask.device != vis.device:
            raise ValueError(f"prompt_mask must be on vis's device {vis.device}, got prompt_mask.device={prompt_mask.device}")
        want = (L,) if unbatched else (B, L)
        if tuple(prompt_mask.shape) != want:
            raise ValueError(f"prompt_mask must have shape {want}, got prompt_mask.shape={tuple(prompt_mask.shape)}")
        mask = prompt_mask.reshape(B, L).contiguous()
    return _rowwise(p), mask


def _check_budgets(N: int, k_p, k) -> tuple[int, int]:
    k = _check_int("k", k)
    k_p = _check_int("k_p", k_p)
    if k > N:
        raise ValueError(f"k must be <= N (the number of visual tokens, {N}), got k={k}")
    if k_p > k:
        raise ValueError(f"k_p must be <= k ({k}), got k_p={k_p}")
    return k_p, k


def _check_finite(**tensors: Tensor) -> None:
    for name, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} has non-finite values (NaN or inf) and check_finite=True")


# ---------------------------------------------------------------------------------------------------------- dispatch

_loaded: dict[str, ModuleType | None] = {}
_MODULES = {
    "reference": "mob_kernels.reference",
    "cpu": "mob_kernels.cpu",
    "triton": "mob_kernels.triton_backend",
    "cuda": "mob_kernels.cuda",
}


def _module(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            mod = importlib.import_module(_MODULES[name])
            _loaded[name] = mod if getattr(mod, "AVAILABLE", True) else None
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def _why_unavailable(name: str) -> str:
    try:
        mod = importlib.import_module(_MODULES[name])
        return getattr(mod, "UNAVAILABLE_REASON", "not available")
    except ImportError as e:
        return f"import failed: {e}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    return device.type == "cuda" or (device.type == "cpu" and _interpreting())  # triton


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on tensors of ``device`` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if _runs_on(b, device) and _module(b) is not None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that ``backend`` ("auto" or a name) means for tensors on ``device``; raises if it cannot run."""
    if backend == "auto":
        forced = os.environ.get("MOB_BACKEND", "").strip()
        if forced:
            backend = forced
    if backend == "auto":
        order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
        for name in order:
            if _module(name) is not None:
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got backend={backend!r}")
    if not _runs_on(backend, device):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU tensors)" if backend == "triton" else ""
        raise BackendUnavailableError(f"backend={backend!r} cannot run on {device.type} tensors{hint}")
    if _module(backend) is None:
        raise BackendUnavailableError(f"backend={backend!r} is unavailable: {_why_unavailable(backend)}")
    return backend


def _impl(backend: str, device: torch.device) -> ModuleType:
    return _module(resolve_backend(backend, device))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------- public API


def select(
    vis: Tensor,
    prompt: Tensor,
    k_p: int,
    k: int,
    *,
    fold: int | None = None,
    prompt_mask: Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = False,
) -> Tensor:
    """MoB selection (SPEC.md): ``k`` sorted distinct indices per sample, ``k_p`` of the budget covering the prompt.

    ``vis`` ``[B, N, d]`` or ``[N, d]``; ``prompt`` ``[B, L, d]`` or ``[L, d]``; returns int64 ``[B, k]`` or ``[k]``.
    """
    if torch.compiler.is_compiling() and backend == "auto" and not check_finite:
        return torch.ops.mob.select(vis, prompt, k_p, k, fold=fold or 0, prompt_mask=prompt_mask)
    v, unbatched = _check_vis(vis)
    p, mask = _check_prompt(v, unbatched, prompt, prompt_mask)
    k_p, k = _check_budgets(v.shape[1], k_p, k)
    fold = _check_int("fold", fold, allow_none=True)
    if check_finite:
        _check_finite(vis=vis, prompt=prompt)
    out = _impl(backend, v.device).select(v, p, mask, k_p, k, fold)
    return out[0] if unbatched else out


def prompt_cover(
    vis: Tensor,
    prompt: Tensor,
    k_p: int,
    *,
    fold: int | None = None,
    prompt_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """SPEC step 2 alone: (picks ``[B, k_p]`` by descending covering score, ``-1`` padded; count ``[B]``)."""
    v, unbatched = _check_vis(vis)
    p, mask = _check_prompt(v, unbatched, prompt, prompt_mask)
    k_p = _check_int("k_p", k_p)
    if k_p > v.shape[1]:
        raise ValueError(f"k_p must be <= N (the number of visual tokens, {v.shape[1]}), got k_p={k_p}")
    fold = _check_int("fold", fold, allow_none=True)
    picks, count = _impl(backend, v.device).prompt_cover(v, p, mask, k_p, fold)
    return (picks[0], count[0]) if unbatched else (picks, count)


def farthest_point_sample(vis: Tensor, k: int, seed: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """SPEC step 3 alone: ``k`` new picks in selection order. ``seed`` ``[B, m]`` (or ``[m]``) are already-taken
    indices, ``-1`` padded; they seed the distances and are never returned. Picks past the untaken tokens are ``-1``."""
    v, unbatched = _check_vis(vis)
    B, N = v.shape[:2]
    k = _check_int("k", k)
    if k > N:
        raise ValueError(f"k must be <= N (the number of visual tokens, {N}), got k={k}")
    if seed is None:
        s = torch.empty(B, 0, dtype=torch.int64, device=v.device)
    else:
        if not isinstance(seed, Tensor) or seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int64 torch.Tensor, got {getattr(seed, 'dtype', type(seed).__name__)}")
        if seed.device != v.device:
            raise ValueError(f"seed must be on vis's device {v.device}, got seed.device={seed.device}")
        if seed.dim() != (1 if unbatched else 2) or (not unbatched and seed.shape[0] != B):
            want = "[m]" if unbatched else f"[{B}, m]"
            raise ValueError(f"seed must have shape {want}, got seed.shape={tuple(seed.shape)}")
        s = seed.reshape(B, -1).contiguous()
        if s.numel() and bool(((s < -1) | (s >= N)).any()):
            raise ValueError(f"seed values must be -1 or in [0, {N}), got min {int(s.min())}, max {int(s.max())}")
    num_picks = torch.full((B,), k, dtype=torch.int64, device=v.device)
    out = _impl(backend, v.device).farthest_point_sample(v, s, num_picks, k)
    return out[0] if unbatched else out


# ------------------------------------------------------------------------------------------ torch.ops.mob registrations

_LIB = torch.library.Library("mob", "DEF")
_LIB.define("select(Tensor vis, Tensor prompt, int k_p, int k, *, int fold=0, Tensor? prompt_mask=None) -> Tensor")
_LIB.define(
    "prompt_cover(Tensor vis, Tensor prompt, int k_p, *, int fold=0, Tensor? prompt_mask=None) -> (Tensor, Tensor)"
)
_LIB.define("farthest_point_sample(Tensor vis, int k, *, Tensor? seed=None) -> Tensor")


def _op_select(vis, prompt, k_p, k, *, fold=0, prompt_mask=None):
    return select(vis, prompt, k_p, k, fold=fold, prompt_mask=prompt_mask)


def _op_prompt_cover(vis, prompt, k_p, *, fold=0, prompt_mask=None):
    return prompt_cover(vis, prompt, k_p, fold=fold, prompt_mask=prompt_mask)


def _op_fps(vis, k, *, seed=None):
    return farthest_point_sample(vis, k, seed)


for _key in ("CPU", "CUDA"):
    _LIB.impl("select", _op_select, _key)
    _LIB.impl("prompt_cover", _op_prompt_cover, _key)
    _LIB.impl("farthest_point_sample", _op_fps, _key)


def _batch_shape(vis: Tensor) -> tuple[int, ...]:
    return tuple(vis.shape[:-2])


@torch.library.register_fake("mob::select")
def _fake_select(vis, prompt, k_p, k, *, fold=0, prompt_mask=None):
    v, unbatched = _check_vis(vis)
    _check_prompt(v, unbatched, prompt, prompt_mask)
    _check_budgets(v.shape[1], k_p, k)
    _check_int("fold", fold)
    return vis.new_empty(_batch_shape(vis) + (k,), dtype=torch.int64)


@torch.library.register_fake("mob::prompt_cover")
def _fake_prompt_cover(vis, prompt, k_p, *, fold=0, prompt_mask=None):
    v, unbatched = _check_vis(vis)
    _check_prompt(v, unbatched, prompt, prompt_mask)
    b = _batch_shape(vis)
    return vis.new_empty(b + (k_p,), dtype=torch.int64), vis.new_empty(b, dtype=torch.int64)


@torch.library.register_fake("mob::farthest_point_sample")
def _fake_fps(vis, k, *, seed=None):
    _check_vis(vis)
    return vis.new_empty(_batch_shape(vis) + (k,), dtype=torch.int64)
