"""Steps several selection methods share, written once in plain torch (they run on any device, inside any backend's
composition): which tokens may be chosen, and completing a greedy selection to exactly ``k`` sorted indices."""

from __future__ import annotations

import torch
from torch import Tensor


def usable(vis: Tensor, valid: Tensor | None) -> Tensor:
    """``valid`` (all True when None) and every feature of the token finite: contract §1.4 (a token with a NaN or
    infinite feature is never chosen while a usable one remains)."""
    # amax propagates NaN and keeps inf, so one reduction answers "every feature finite" (isfinite().all() is a
    # mask of the whole input first: ~10x slower at LLaVA's 576 x 4096).
    ok = vis.abs().amax(dim=-1) < float("inf") if vis.shape[-1] else torch.ones(vis.shape[:-1], dtype=torch.bool,
                                                                               device=vis.device)
    return ok if valid is None else ok & valid


def complete(chosen: Tensor, k: int, n: int, score: Tensor | None = None) -> Tensor:
    """``[B, k]`` sorted indices into ``[0, n)``: every index of ``chosen`` (``[B, m]``, distinct per row, ``-1``
    padded, at most ``k`` per row), then the best unchosen tokens by ``score`` (``[B, n]``, descending, ties to the
    lower index; ``-inf`` or NaN puts a token last, in index order) or, without a score, by ascending index."""
    B = chosen.shape[0]
    dev = chosen.device
    taken = torch.zeros(B, n + 1, dtype=torch.bool, device=dev)
    taken.scatter_(1, torch.where(chosen >= 0, chosen, n), True)
    if score is None:
        key = -torch.arange(n, device=dev, dtype=torch.float32).expand(B, n)
    else:  # +inf is reserved for the chosen tokens
        key = torch.nan_to_num(score.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    key = key.masked_fill(taken[:, :n], float("inf"))
    keep = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.sort(keep, dim=1).values
