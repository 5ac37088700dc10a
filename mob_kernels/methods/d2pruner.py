"""D2Pruner (AAAI 2026, arXiv 2512.19443): contract §3.4.

Debiased importance plus structural diversity. The most important tokens by *debiased* attention (the last prompt
token's attention divided by the model's mean attention map, which removes its positional bias) are kept as pivots;
the rest of the budget is a greedy maximal independent set over the remaining tokens, in importance order, on a graph
whose edges join tokens that are semantically similar (cosine above a threshold) or, weighted by ``alpha``, spatially
adjacent; if the independent set runs out, the most important leftovers fill the budget.

The official code was not public when this was written; the contract follows the paper's abstract and its stated
parameters (pivot ratio 0.7, similarity threshold 0.8, fusion weight alpha 1.0 for understanding and 0.5 for
grounding) and decides the rest (contract §3.4, "Decisions").

Composition: plain torch for the debiasing, pivots and fill; the backend's ``independent_set`` primitive for the MIS.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import checks
from ..registry import OpSpec, Prepared, prepared, register
from .common import usable

BIAS_EPS = 1e-7  # importance / (bias + eps): the stated epsilon of the debiasing
ROLE_PIVOT, ROLE_MIS, ROLE_FILL, ROLE_PAD = 0, 1, 2, 3


def edge_thresholds(threshold: float, alpha: float) -> tuple[float, float]:
    """The fused rule ``alpha * cos + (1 - alpha) * [spatial neighbour] > threshold`` as two cosine thresholds:
    (for spatial neighbours, for everyone else)."""
    if alpha == 0.0:  # spatial adjacency alone decides
        return (-math.inf if threshold < 1.0 else math.inf), math.inf
    return (threshold - (1.0 - alpha)) / alpha, threshold / alpha


def square_grid(n: int, device: torch.device) -> Tensor:
    """(tile, row, col) ``[n, 3]`` of a single row-major square grid (LLaVA-1.5's 24 x 24)."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"grid is required when alpha < 1 and N={n} is not a square number")
    i = torch.arange(n, device=device)
    return torch.stack([torch.zeros_like(i), i // side, i % side], dim=-1)


def _compose(P, vis, importance, k, bias, grid, pivot_ratio, threshold, alpha, radius, valid):
    B, N, _ = vis.shape
    dev = vis.device
    if k == 0 or N == 0:
        e = torch.empty(B, 0, dtype=torch.int64, device=dev)
        return e, e.to(torch.int8)
    score = importance if bias is None else importance / (bias + BIAS_EPS)
    ok = usable(vis, valid) & torch.isfinite(score)
    score = score.masked_fill(~ok, float("-inf"))
    n_eff = ok.sum(1).clamp_max(k)
    n_pivot = torch.floor(pivot_ratio * n_eff.double() + 1e-6).long()
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # ties to the lower index
    pos = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=dev).expand(B, N))  # rank of each token
    pivot = (pos < n_pivot.unsqueeze(1)) & ok
    rank = torch.where(ok & ~pivot, pos, -1)
    near, far = edge_thresholds(threshold, alpha)
    if alpha < 1.0 and grid is None:
        grid = square_grid(N, dev).expand(B, N, 3)
    mis = P.independent_set(vis, rank, n_eff - n_pivot, k, near, far, grid if alpha < 1.0 else None, radius)

    role = torch.full((B, N + 1), ROLE_PAD, dtype=torch.int64, device=dev)  # slot N swallows the -1 padding
    role[:, :N] = torch.where(pivot, ROLE_PIVOT, ROLE_PAD)
    role.scatter_(1, torch.where(mis >= 0, mis, N), ROLE_MIS)
    role = role[:, :N]
    # Fill: the most important usable leftovers, then (only if the usable tokens run out) the lowest-index others.
    n_fill = n_eff - n_pivot - (mis >= 0).sum(1)
    left = ok & (role == ROLE_PAD)
    fill_pos = torch.cumsum(left.gather(1, order).long(), dim=1)  # how many leftovers up to each rank position
    fill = torch.zeros(B, N, dtype=torch.bool, device=dev).scatter_(
        1, order, left.gather(1, order) & (fill_pos <= n_fill.unsqueeze(1)))
    role = torch.where(fill, ROLE_FILL, role)
    chosen = role != ROLE_PAD
    n_pad = k - chosen.sum(1)
    pad_pos = torch.cumsum((~chosen).long(), dim=1)
    chosen |= ~chosen & (pad_pos <= n_pad.unsqueeze(1))
    keep = torch.sort(torch.where(chosen, torch.arange(N, device=dev), N), dim=1).values[:, :k]
    return keep, role.gather(1, keep).to(torch.int8)


def _prepare(vis, importance, k, *, bias=None, grid=None, pivot_ratio=0.7, threshold=0.8, alpha=1.0, radius=1,
             valid=None, backend="auto", data=True) -> Prepared:
    v, unbatched = checks.batched("vis", vis)
    B, N = v.shape[:2]
    imp = checks.scores("importance", importance, B, N, unbatched, v)
    k = checks.budget("k", k, N, "N (the number of visual tokens)")
    b = None
    if bias is not None:
        checks.tensor("bias", bias)
        if bias.dim() == 1 and not unbatched:  # one map for the whole batch
            bias = bias.unsqueeze(0).expand(B, N) if bias.shape == (N,) else bias
        b = checks.scores("bias", bias, B, N, unbatched, v)
    g = None
    if grid is not None:
        checks.tensor("grid", grid)
        if grid.dtype != torch.int64:
            raise TypeError(f"grid must be an int64 tensor of (tile, row, col), got grid.dtype={grid.dtype}")
        checks.same_device("grid", grid, v)
        if grid.dim() == 2 and not unbatched:
            grid = grid.unsqueeze(0).expand(B, *grid.shape) if grid.shape == (N, 3) else grid
        want = (N, 3) if unbatched else (B, N, 3)
        if tuple(grid.shape) != want:
            raise ValueError(f"grid must have shape {want} (tile, row, col), got grid.shape={tuple(grid.shape)}")
        g = grid.reshape(B, N, 3).contiguous()
    pivot_ratio = checks.as_float("pivot_ratio", pivot_ratio, low=0.0, high=1.0)
    threshold = checks.as_float("threshold", threshold, low=-1.0, high=2.0)
    alpha = checks.as_float("alpha", alpha, low=0.0, high=1.0)
    radius = checks.as_int("radius", radius)
    ok = None if valid is None else checks.mask("valid", valid, B, N, unbatched, v)
    if alpha < 1.0 and g is None and math.isqrt(N) ** 2 != N:
        raise ValueError(f"grid is required when alpha < 1 and N={N} is not a square number")
    inputs = dict(vis=v, importance=imp, k=k, bias=b, grid=g, pivot_ratio=pivot_ratio, threshold=threshold,
                  alpha=alpha, radius=radius, valid=ok)
    return prepared(inputs, v, checks.backend_name(backend), unbatched, data)


def _fake(vis, importance, k, bias, grid, pivot_ratio, threshold, alpha, radius, valid):
    B = vis.shape[0]
    return vis.new_empty(B, k, dtype=torch.int64), vis.new_empty(B, k, dtype=torch.int8)


D2PRUNER = register(OpSpec(
    name="d2pruner",
    schema="(Tensor vis, Tensor importance, int k, *, Tensor? bias=None, Tensor? grid=None, float pivot_ratio=0.7, "
           "float threshold=0.8, float alpha=1.0, int radius=1, Tensor? valid=None, str backend=\"auto\") "
           "-> (Tensor, Tensor)",
    prepare=_prepare, compose=_compose, fake=_fake, budget=lambda k: {"k": k},
    doc="D2Pruner: debiased-importance pivots, then a greedy maximal independent set on a similarity graph",
))


def d2pruner(
    vis: Tensor,
    importance: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    grid: Tensor | None = None,
    pivot_ratio: float = 0.7,
    threshold: float = 0.8,
    alpha: float = 1.0,
    radius: int = 1,
    valid: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """D2Pruner selection (contract §3.4). ``vis`` ``[B, N, d]`` (hidden states of the image tokens entering the
    pruning layer), ``importance`` ``[B, N]`` (the last prompt token's attention to them, heads averaged), ``bias``
    ``[N]`` or ``[B, N]`` (the mean attention map the importance is divided by; None: used as is), ``grid``
    ``[B, N, 3]`` or ``[N, 3]`` int64 (tile, row, col; needed when ``alpha < 1`` unless N is a square). Returns
    (keep ``[B, k]`` sorted, role ``[B, k]`` int8: 0 pivot, 1 independent set, 2 importance fill, 3 padding with
    unusable tokens)."""
    checks.door(vis=vis, bias=bias, grid=grid, valid=valid)
    checks.tensor("importance", importance)
    out: tuple[Tensor, Tensor] = torch.ops.mob.d2pruner(
        vis, importance, checks.as_int("k", k), bias=bias, grid=grid,
        pivot_ratio=checks.as_float("pivot_ratio", pivot_ratio), threshold=checks.as_float("threshold", threshold),
        alpha=checks.as_float("alpha", alpha), radius=checks.as_int("radius", radius), valid=valid,
        backend=checks.backend_name(backend),
    )
    return out
