"""Pure-torch reference: SPEC.md written out in vectorised PyTorch.

This module *is* the executable contract. Every other backend (C++ CPU, Triton, CUDA) is tested against it, and the
benchmarks time it as "the eager PyTorch baseline", so it is written the way a careful PyTorch user would write it:
batched, float32 arithmetic, a Python loop only over the farthest-point-sampling steps.

All functions here take already-validated, batched inputs (``mob_kernels.ops`` does the checking and the unbatching):

* ``vis``    ``[B, N, d]`` float32 / float16 / bfloat16
* ``prompt`` ``[B, L, d]`` same dtype
* ``mask``   ``[B, L]`` bool (``True`` = a real prompt row)

Choices SPEC.md leaves to the implementation, made here and followed by every backend:

* ties: every "largest" is taken by a stable descending sort / ``argmax``, which pick the lower index;
* a NaN distance keeps propagating through ``min`` (``torch.minimum``): once a token's distance is NaN it stays NaN and
  ranks below every finite distance; NaN ranks below finite in the largest-norm first pick as well;
* ``farthest_point_sample`` makes ``min(num_picks, untaken tokens)`` picks and pads the rest of its row with ``-1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12

# A finite cosine distance lies in [0, 2] up to rounding (unit vectors), so -3 ranks a NaN distance below every finite
# one while keeping it above a taken token (-inf).
_NAN_RANK = -3.0


def _unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """float32 rows scaled to unit length (SPEC step 0) and the raw float32 norms."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1)
    return x / norm.clamp_min(EPS).unsqueeze(-1), norm


def auto_fold(k_p: int, n_valid: Tensor) -> Tensor:
    """``max(1, ceil(k_p / L_valid))`` per sample (SPEC §1, ``fold=0``)."""
    return torch.div(k_p + n_valid - 1, n_valid.clamp_min(1), rounding_mode="floor").clamp_min(1)


def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: int = 0) -> tuple[Tensor, Tensor]:
    """SPEC §2 steps 0-2. Returns (picks ``[B, k_p]`` by descending score, ``-1`` padded; count ``[B]``)."""
    B, N, _ = vis.shape
    L = prompt.shape[1]
    dev = vis.device
    picks = torch.full((B, k_p), -1, dtype=torch.int64, device=dev)
    count = torch.zeros(B, dtype=torch.int64, device=dev)
    if k_p == 0 or L == 0 or N == 0:
        return picks, count

    f = torch.full((B,), min(fold, N), device=dev) if fold else auto_fold(k_p, mask.sum(1)).clamp_max(N)
    v_hat, _ = _unit_rows(vis)
    p_hat, _ = _unit_rows(prompt)
    sim = p_hat @ v_hat.transpose(1, 2)  # [B, L, N]
    finite = sim.isfinite()

    # T_j: the f best tokens of each prompt row. A stable descending sort gives ties to the lower index; non-finite
    # similarities sort last and are then dropped, so they never make a token a candidate.
    order = torch.sort(sim.masked_fill(~finite, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=dev).expand_as(order))
    in_t = (rank < f.view(B, 1, 1)) & finite & mask.unsqueeze(-1)

    # c(i) = max over the T_j holding i; tokens in no T_j score -inf and sort behind every candidate.
    cover = sim.masked_fill(~in_t, float("-inf")).amax(dim=1)  # [B, N]
    n_cand = in_t.any(dim=1).sum(1)
    best = torch.sort(cover, dim=-1, descending=True, stable=True).indices[:, :k_p]
    count = n_cand.clamp_max(k_p)
    keep = torch.arange(k_p, device=dev) < count.unsqueeze(1)
    return torch.where(keep, best, -1), count


def farthest_point_sample(vis: Tensor, seed: Tensor, num_picks: Tensor, k: int) -> Tensor:
    """SPEC §2 step 3. ``seed`` ``[B, m]`` (``-1`` = none) are taken and seed the distances; sample ``b`` then makes
    ``min(num_picks[b], k, untaken)`` picks. Returns ``[B, k]`` in selection order, ``-1`` padded."""
    B, N, _ = vis.shape
    dev = vis.device
    out = torch.full((B, k), -1, dtype=torch.int64, device=dev)
    if k == 0 or N == 0:
        return out
    v_hat, norm = _unit_rows(vis)
    rows = torch.arange(B, device=dev)

    # Seeds: mark taken (slot N swallows the -1 padding) and take the min cosine distance to any of them.
    valid = seed >= 0
    taken = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
    taken.scatter_(1, torch.where(valid, seed, N), True)
    taken = taken[:, :N]
    dist = torch.full((B, N), float("inf"), device=dev)
    if seed.shape[1]:
        centres = v_hat[rows.unsqueeze(1), seed.clamp_min(0)]  # [B, m, d]
        d_seed = 1.0 - v_hat @ centres.transpose(1, 2)  # [B, N, m]
        dist = d_seed.masked_fill(~valid.unsqueeze(1), float("inf")).amin(dim=-1)
    seeded = valid.any(dim=1)
    n_picks = torch.minimum(num_picks.clamp(0, k), N - taken.sum(1))

    # With no seed, the first pick is the largest raw norm (NaN ranks lowest).
    first_key = torch.nan_to_num(norm, nan=-1.0)
    for t in range(k):
        active = t < n_picks
        key = torch.nan_to_num(dist, nan=_NAN_RANK).masked_fill(taken, float("-inf"))
        if t == 0:
            key = torch.where(seeded.unsqueeze(1), key, first_key)
        pick = key.argmax(dim=1)  # first maximum: ties to the lower index
        out[:, t] = torch.where(active, pick, -1)
        taken[rows, pick] |= active
        d_new = 1.0 - (v_hat @ v_hat[rows, pick].unsqueeze(-1)).squeeze(-1)
        dist = torch.where(active.unsqueeze(1), torch.minimum(dist, d_new), dist)
    return out


def select(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: int = 0) -> Tensor:
    """SPEC §2: cover, FPS seeded by the cover for ``k - count`` picks, sorted union ``[B, k]``."""
    cover, count = prompt_cover(vis, prompt, mask, k_p, fold)
    fps = farthest_point_sample(vis, cover, k - count, k)
    # count valid cover picks + (k - count) FPS picks = k valid; the k_p paddings (-1) sort first.
    return torch.sort(torch.cat([cover, fps], dim=1), dim=1).values[:, k_p:]
