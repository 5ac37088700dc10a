"""Argument rules shared by every public op (docs/contract.md §1.3): one function per kind of argument.

Each check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong value, shape or device) with a message
that names the argument and its value, before any kernel runs. The front doors (``mob_kernels.select`` ...), the
``torch.ops.mob`` implementations and their fake (meta) implementations all call these, so an argument means the same
thing on every path.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Devices an op can run on. "meta" (and FakeTensors on any of these) go to the fake implementations: shapes only.
DEVICE_TYPES = ("cpu", "cuda", "meta")


def as_int(name: str, value: object, *, minimum: int = 0) -> int:
    """An integer argument: a Python int or a NumPy integer (anything ``operator.index`` takes), never a bool."""
    if isinstance(value, bool) or (isinstance(value, Tensor)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]  # object: whatever the caller passed
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={out}")
    return out


def as_float(name: str, value: object, *, low: float | None = None, high: float | None = None) -> float:
    """A real-valued argument (int or float, not bool), finite and within [low, high] where given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out) or (low is not None and out < low) or (high is not None and out > high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}], got {name}={value!r}")
    return out


def features(name: str, x: object) -> Tensor:
    """A feature tensor ``[N, d]`` or ``[B, N, d]`` of float32 / float16 / bfloat16 on a supported device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {name}.dtype={x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, d] or [B, N, d], got {name}.shape={tuple(x.shape)}")
    if x.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {name}.device={x.device}")
    return x


def batched(name: str, x: object) -> tuple[Tensor, bool]:
    """``x`` checked as features and viewed as ``[B, N, d]`` with unit stride in d; whether it was unbatched."""
    x = features(name, x)
    unbatched = x.dim() == 2
    return rowwise(x.unsqueeze(0) if unbatched else x), unbatched


def rowwise(x: Tensor) -> Tensor:
    """Backends read rows with unit stride in the last dim; batch and row strides may be anything (views stay views)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def companion(name: str, x: object, vis: Tensor, unbatched: bool) -> Tensor:
    """A second feature tensor (the prompt) that must match ``vis`` (batched ``[B, N, d]``) in rank, batch, d, dtype
    and device; returned batched and row-wise."""
    x = features(name, x)
    rank = 2 if unbatched else 3
    if x.dim() != rank:
        raise ValueError(f"{name} must have the same rank as vis ({rank}), got {name}.shape={tuple(x.shape)}")
    if x.dtype != vis.dtype:
        raise TypeError(f"{name} must have vis's dtype {vis.dtype}, got {name}.dtype={x.dtype}")
    same_device(name, x, vis)
    x3 = x.unsqueeze(0) if unbatched else x
    if x3.shape[0] != vis.shape[0]:
        raise ValueError(
            f"{name} batch size {x3.shape[0]} != vis batch size {vis.shape[0]} ({name}.shape={tuple(x.shape)})"
        )
    if x3.shape[2] != vis.shape[2]:
        raise ValueError(f"{name} feature size d={x3.shape[2]} != vis feature size d={vis.shape[2]}")
    return rowwise(x3)


def same_device(name: str, x: Tensor, vis: Tensor) -> None:
    if x.device != vis.device:
        raise ValueError(f"{name} must be on vis's device {vis.device}, got {name}.device={x.device}")


_FILLED: dict[tuple[object, ...], Tensor] = {}


def filled(shape: tuple[int, ...], value: bool | int, dtype: torch.dtype, device: torch.device, reuse: bool) -> Tensor:
    """A tensor of ``value`` that no kernel ever writes (a default mask, a constant per-sample count). On CUDA, with
    ``reuse`` (real tensors, outside graph capture), one is kept per shape and value and handed out again: an eager
    call then launches no fill kernel for it."""
    if reuse and device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        key = (shape, value, dtype, device)
        got = _FILLED.get(key)
        if got is None:
            if len(_FILLED) >= 256:  # many distinct shapes: start over rather than grow without bound
                _FILLED.clear()
            got = _FILLED[key] = torch.full(shape, value, dtype=dtype, device=device)
        return got
    return torch.full(shape, value, dtype=dtype, device=device)


def mask(name: str, m: object, B: int, L: int, unbatched: bool, vis: Tensor, reuse: bool = False) -> Tensor:
    """A bool mask ``[B, L]`` (or ``[L]`` when unbatched); None means all True. Returned ``[B, L]`` contiguous."""
    if m is None:
        return filled((B, L), True, torch.bool, vis.device, reuse)
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must be bool, got {name}.dtype={m.dtype}")
    same_device(name, m, vis)
    want = (L,) if unbatched else (B, L)
    if tuple(m.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {name}.shape={tuple(m.shape)}")
    return m.reshape(B, L).contiguous()


def scores(name: str, s: object, B: int, N: int, unbatched: bool, vis: Tensor) -> Tensor:
    """Per-token scores ``[B, N]`` (or ``[N]``) of any floating dtype, returned ``[B, N]`` float32 contiguous."""
    if not isinstance(s, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {name}.dtype={s.dtype}")
    same_device(name, s, vis)
    want = (N,) if unbatched else (B, N)
    if tuple(s.shape) != want:
        raise ValueError(f"{name} must have shape {want}, got {name}.shape={tuple(s.shape)}")
    return s.reshape(B, N).float().contiguous()


def budget(name: str, k: object, upper: int, what: str) -> int:
    """An integer budget in ``[0, upper]``; ``what`` names the bound in the message."""
    k = as_int(name, k)
    if k > upper:
        raise ValueError(f"{name} must be <= {what} ({upper}), got {name}={k}")
    return k


def finite(name: str, x: Tensor, rows: Tensor | None = None) -> None:
    """``check_finite=True``: raise if ``x`` (only the rows where ``rows`` is True, when given) holds NaN or inf."""
    if x.device.type == "meta":
        return
    part = x if rows is None else x[rows]
    if not bool(torch.isfinite(part).all()):
        raise ValueError(f"{name} has non-finite values (NaN or inf) and check_finite=True")


_FEATURE_ARGS = ("vis", "prompt")


def door(**tensors: object) -> None:
    """The checks a front door makes before calling its ``torch.ops.mob`` op, so that what torch's schema parser would
    reject (with a RuntimeError) is a TypeError naming the argument instead. The op itself checks everything else."""
    for name, x in tensors.items():
        if name in _FEATURE_ARGS:
            features(name, x)
        elif x is not None and not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")


def tensor(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def backend_name(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__} {backend!r}")
    return backend
