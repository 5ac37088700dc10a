"""The reference backend: every primitive of docs/contract.md §2 written out plainly in PyTorch.

Together with the method compositions in ``mob_kernels/methods`` this module *is* the executable contract: every other
backend (C++ CPU, Triton, CUDA) is tested against it, and the benchmarks time it as the eager PyTorch baseline, so it
is written as a careful PyTorch user would write it: batched, float32 arithmetic, a Python loop only over the
sequential greedy steps, no host synchronisation. It runs on any device torch runs on.

Choices the contract makes and this module implements (every backend follows them):

* ties: every "largest" is taken by a stable descending sort / ``argmax``, which pick the lower index;
* a NaN distance keeps propagating through ``min`` (``torch.minimum``): once a token's distance is NaN it stays NaN and
  ranks below every finite distance; NaN ranks below finite in the largest-norm first pick as well;
* ``farthest_point_sample`` makes ``min(num_picks, untaken valid tokens)`` picks and pads its row with ``-1``;
* ``dpp_greedy`` stops when the best remaining gain is at most ``DPP_STOP`` times the largest diagonal entry of the
  kernel, and pads its row with ``-1`` (gain 0) from there;
* ``independent_set`` walks the candidates in rank order and takes each one no earlier pick is adjacent to.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12

# A finite cosine distance lies in [0, 2] up to rounding (unit vectors), so -3 ranks a NaN distance below every finite
# one while keeping it above a taken token (-inf).
NAN_RANK = -3.0

# dpp_greedy's stopping rule: a gain (squared Schur-complement residual) at or below this fraction of the largest
# diagonal entry of the kernel is float32 rounding, not information; dividing by its square root would only amplify
# noise (and at zero give NaN). See docs/contract.md §3.3.
DPP_STOP = 1e-5


def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """float32 rows scaled to unit length (``x / max(|x|, eps)``) and the raw float32 norms."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=-1)
    return x / norm.clamp_min(EPS).unsqueeze(-1), norm


class ReferenceBackend:
    name = "reference"

    # ------------------------------------------------------------------------------------------------------ gram
    @staticmethod
    def gram(vis: Tensor) -> Tensor:
        v_hat, _ = unit_rows(vis)
        return v_hat @ v_hat.transpose(1, 2)

    # -------------------------------------------------------------------------------------------- prompt cover
    @staticmethod
    def prompt_cover(vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: Tensor) -> tuple[Tensor, Tensor]:
        B, N, _ = vis.shape
        L = prompt.shape[1]
        dev = vis.device
        picks = torch.full((B, k_p), -1, dtype=torch.int64, device=dev)
        count = torch.zeros(B, dtype=torch.int64, device=dev)
        if k_p == 0 or L == 0 or N == 0:
            return picks, count

        v_hat, _ = unit_rows(vis)
        p_hat, _ = unit_rows(prompt)
        sim = p_hat @ v_hat.transpose(1, 2)  # [B, L, N]
        finite = sim.isfinite()

        # T_j: the f best tokens of each prompt row. A stable descending sort gives ties to the lower index;
        # non-finite similarities sort last and are then dropped, so they never make a token a candidate.
        order = torch.sort(sim.masked_fill(~finite, float("-inf")), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=dev).expand_as(order))
        in_t = (rank < fold.view(B, 1, 1)) & finite & mask.unsqueeze(-1)

        # c(i) = max over the T_j holding i; tokens in no T_j score -inf and sort behind every candidate.
        cover = sim.masked_fill(~in_t, float("-inf")).amax(dim=1)  # [B, N]
        n_cand = in_t.any(dim=1).sum(1)
        best = torch.sort(cover, dim=-1, descending=True, stable=True).indices[:, :k_p]
        count = n_cand.clamp_max(k_p)
        keep = torch.arange(k_p, device=dev) < count.unsqueeze(1)
        return torch.where(keep, best, -1), count

    # -------------------------------------------------------------------------------- farthest point sampling
    @staticmethod
    def farthest_point_sample(
        vis: Tensor, seed: Tensor, num_picks: Tensor, k: int, valid: Tensor | None = None, sim: Tensor | None = None
    ) -> Tensor:
        B, N, _ = vis.shape
        dev = vis.device
        out = torch.full((B, k), -1, dtype=torch.int64, device=dev)
        if k == 0 or N == 0:
            return out
        v_hat, norm = unit_rows(vis)
        rows = torch.arange(B, device=dev)

        def distance_to(c: Tensor) -> Tensor:  # 1 - cos(v_i, v_c) for every i, one centre c per sample
            if sim is not None:
                return 1.0 - sim[rows, c]
            return 1.0 - (v_hat @ v_hat[rows, c].unsqueeze(-1)).squeeze(-1)

        # Seeds: mark taken (slot N swallows the -1 padding) and take the min cosine distance to any of them.
        has = seed >= 0
        taken = torch.zeros(B, N + 1, dtype=torch.bool, device=dev)
        taken.scatter_(1, torch.where(has, seed, N), True)
        taken = taken[:, :N]
        dist = torch.full((B, N), float("inf"), device=dev)
        if seed.shape[1]:
            s = seed.clamp_min(0)
            if sim is not None:
                d_seed = 1.0 - torch.gather(sim, 1, s.unsqueeze(-1).expand(-1, -1, N)).transpose(1, 2)
            else:
                d_seed = 1.0 - v_hat @ v_hat[rows.unsqueeze(1), s].transpose(1, 2)  # [B, N, m]
            dist = d_seed.masked_fill(~has.unsqueeze(1), float("inf")).amin(dim=-1)
        seeded = has.any(dim=1)
        # Invalid tokens count as taken for picking (never chosen) but were never centres.
        off = taken if valid is None else taken | ~valid
        n_picks = torch.minimum(num_picks.clamp(0, k), N - off.sum(1))

        # With no seed, the first pick is the largest raw norm (NaN ranks lowest).
        first_key = torch.nan_to_num(norm, nan=-1.0).masked_fill(off, float("-inf"))
        for t in range(k):
            active = t < n_picks
            key = torch.nan_to_num(dist, nan=NAN_RANK).masked_fill(off, float("-inf"))
            if t == 0:
                key = torch.where(seeded.unsqueeze(1), key, first_key)
            pick = key.argmax(dim=1)  # first maximum: ties to the lower index
            out[:, t] = torch.where(active, pick, -1)
            off[rows, pick] |= active
            dist = torch.where(active.unsqueeze(1), torch.minimum(dist, distance_to(pick)), dist)
        return out

    # ----------------------------------------------------------------------------------------- greedy DPP MAP
    @staticmethod
    def dpp_greedy(vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        B, N, _ = vis.shape
        dev = vis.device
        order = torch.full((B, k), -1, dtype=torch.int64, device=dev)
        gain = torch.zeros(B, k, dtype=torch.float32, device=dev)
        if k == 0 or N == 0:
            return order, gain
        r = torch.where(valid, relevance.float(), 0.0)
        kernel = r.unsqueeze(2) * ReferenceBackend.gram(vis) * r.unsqueeze(1)  # L = diag(r) S diag(r)
        # Unusable tokens take no part: their rows and columns are 0 (a NaN feature would otherwise reach every
        # token's gain through NaN * 0).
        kernel = kernel.masked_fill(~(valid.unsqueeze(2) & valid.unsqueeze(1)), 0.0)
        d2 = torch.diagonal(kernel, dim1=1, dim2=2).clone()
        stop = DPP_STOP * d2.masked_fill(~valid, 0.0).amax(dim=1)  # [B]
        d2 = d2.masked_fill(~valid, float("-inf"))
        rows = torch.arange(B, device=dev)
        cis = torch.zeros(k, B, N, dtype=torch.float32, device=dev)  # rows of the incremental Cholesky factor
        active = torch.ones(B, dtype=torch.bool, device=dev)
        for i in range(k):
            j = d2.argmax(dim=1)  # first maximum
            g = d2[rows, j]
            active &= g > stop
            safe = torch.where(active, g, 1.0)
            e = (kernel[rows, j] - torch.einsum("ib,ibn->bn", cis[:i, rows, j], cis[:i])) / safe.sqrt().unsqueeze(1)
            e = torch.where(active.unsqueeze(1), e, 0.0)
            cis[i] = e
            d2 = d2 - e * e
            d2[rows, j] = torch.where(active, float("-inf"), d2[rows, j])
            order[:, i] = torch.where(active, j, -1)
            gain[:, i] = torch.where(active, g, 0.0)
        return order, gain

    # ------------------------------------------------------------------------------ greedy maximal independent set
    @staticmethod
    def independent_set(
        vis: Tensor, rank: Tensor, num_picks: Tensor, k: int, near: float, far: float, grid: Tensor | None, radius: int
    ) -> Tensor:
        B, N, _ = vis.shape
        dev = vis.device
        out = torch.full((B, k), -1, dtype=torch.int64, device=dev)
        if k == 0 or N == 0:
            return out
        sim = ReferenceBackend.gram(vis)
        threshold = torch.full_like(sim, far)
        if grid is not None:
            tile, row, col = grid.unbind(-1)
            close = (tile.unsqueeze(2) == tile.unsqueeze(1)) & (
                torch.maximum((row.unsqueeze(2) - row.unsqueeze(1)).abs(), (col.unsqueeze(2) - col.unsqueeze(1)).abs())
                <= radius
            )
            threshold = torch.where(close, near, threshold)
        eye = torch.eye(N, dtype=torch.bool, device=dev)
        edge = (sim > threshold) & ~eye  # NaN similarities make no edge
        # Walk the candidates in rank order: one step per rank position, all samples at once.
        # Candidates by rank (ties to the lower index), then every non-candidate: two stable sorts, rank then group.
        by_rank = torch.sort(rank, dim=1, stable=True).indices
        order = by_rank.gather(1, torch.sort((rank < 0).long().gather(1, by_rank), dim=1, stable=True).indices)
        n_cand = (rank >= 0).sum(1)
        blocked = torch.zeros(B, N, dtype=torch.bool, device=dev)
        count = torch.zeros(B, dtype=torch.int64, device=dev)
        rows = torch.arange(B, device=dev)
        for t in range(N):
            v = order[:, t]
            take = (t < n_cand) & (count < num_picks.clamp_max(k)) & ~blocked[rows, v]
            out[rows, count.clamp_max(k - 1)] = torch.where(take, v, out[rows, count.clamp_max(k - 1)])
            blocked |= take.unsqueeze(1) & edge[rows, v]
            count += take.long()
        return out


BACKEND = ReferenceBackend()
