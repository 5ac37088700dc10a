"""Shared helpers for the test suite: input recipes, the validity check and the well-conditioning check of docs/contract.md §1.7.

Well-conditioned (contract §1.7) means every decision of the algorithm wins by a margin. ``decision_margin`` replays
MoB (contract §3.1) in float64 on the very tensors a backend was given (after their rounding to float16 / bfloat16) and returns
the smallest margin of any decision that can change the output:

* the boundary of each prompt row's top-f set ``T_j`` (f-th vs (f+1)-th similarity),
* the boundary of the prompt set ``S_p`` (k_p-th vs (k_p+1)-th covering score),
* the first pick by largest raw norm when ``S_p`` is empty (relative margin: norms have no natural scale),
* every farthest-point step (best vs second-best distance among the untaken tokens).

Similarities and cosine distances live on a fixed scale (|cos| <= 1, dist in [0, 2]) and a float32 computation of them
is off by an absolute amount (~1e-7 * sqrt(d)), so their margins are absolute. Inputs with a non-finite value have
margin 0 (the contract gives them only the validity guarantee).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import mob_kernels
from mob_kernels.backends import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WELL_CONDITIONED = 1e-4  # contract §1.7
INF = float("inf")


def backends() -> list[str]:
    """Every backend that can run on CPU tensors here (triton joins under TRITON_INTERPRET=1, see conftest.py)."""
    return mob_kernels.available_backends("cpu")


# Backends that are too slow for large shapes or many examples on this machine: Triton under its interpreter runs each
# program instance in Python. They get small shapes and few examples.
def is_slow(backend: str) -> bool:
    return backend == "triton" and not torch.cuda.is_available()


def gaussian(shape, dtype=torch.float32, seed=0) -> Tensor:
    """Random features drawn in float32 and then rounded to ``dtype`` (tests compare backends on the rounded tensor)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def problem(B, N, L, d, dtype=torch.float32, seed=0, ragged=False):
    """(vis [B, N, d], prompt [B, L, d], mask [B, L]) of Gaussian features; ``ragged`` gives each sample fewer valid
    prompt rows than the one before."""
    vis = gaussian((B, N, d), dtype, seed)
    prompt = gaussian((B, L, d), dtype, seed + 7919)
    mask = torch.ones(B, L, dtype=torch.bool)
    if ragged:  # sample b keeps its first L - b * L // B rows
        for b in range(B):
            mask[b, L - (b * L) // B :] = False
    return vis, prompt, mask


def assert_valid(out: Tensor, B: int | None, N: int, k: int) -> None:
    """Contract §1.6: int64, exactly k distinct in-range indices per sample, sorted ascending."""
    assert out.dtype == torch.int64, out.dtype
    assert tuple(out.shape) == ((B, k) if B is not None else (k,)), (tuple(out.shape), B, k)
    if k == 0 or out.numel() == 0:
        return
    rows = out.reshape(-1, k)
    assert bool((rows >= 0).all()) and bool((rows < N).all()), f"index out of [0, {N}): {rows}"
    assert bool((rows[:, 1:] > rows[:, :-1]).all()), f"not strictly increasing (duplicate or unsorted): {rows}"


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Equal bit patterns (NaN == NaN, -0.0 != +0.0): what "inputs never mutated" means."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.element_size() == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    if a.element_size() == 4:
        return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))
    return torch.equal(a, b)


def _gap(sorted_desc: Tensor, at: int) -> float:
    """sorted_desc[at - 1] - sorted_desc[at] (the boundary after the first ``at`` entries), inf when there is none."""
    if at <= 0 or at >= sorted_desc.numel():
        return INF
    return float(sorted_desc[at - 1] - sorted_desc[at])


def decision_margin(vis: Tensor, prompt: Tensor, mask: Tensor | None, k_p: int, k: int, fold: int | None = None) -> float:
    """Smallest decision margin (see the module docstring) of ``select`` over the samples of a batched or unbatched
    problem. ``k == N`` (and ``k == 0``) selects everything (nothing) whatever the decisions, so its margin is inf."""
    vis, prompt, mask = _batched(vis, prompt, mask)
    B, N, _ = vis.shape
    if k in (0, N):
        return INF
    if not _finite(vis, prompt, mask):
        return 0.0
    margin = INF
    for b in range(B):
        m, seeds = cover_margin(vis[b], prompt[b][mask[b]], k_p, fold or 0)
        margin = min(margin, m, fps_margin(vis[b], seeds, k - len(seeds)))
    return margin


def _batched(vis, prompt, mask):
    if vis.dim() == 2:
        vis, prompt = vis.unsqueeze(0), prompt.unsqueeze(0)
        mask = None if mask is None else mask.unsqueeze(0)
    if mask is None:
        mask = torch.ones(prompt.shape[:2], dtype=torch.bool)
    return vis, prompt, mask


def _finite(vis, prompt, mask) -> bool:
    """Finite, and every row's squared norm representable in float32 (the contract computes it in float32: beyond that range
    a row overflows to a zero direction or underflows to a non-unit one, which a float64 replay cannot model)."""
    if not (bool(torch.isfinite(vis).all()) and bool(torch.isfinite(prompt[mask]).all())):
        return False
    for x in (vis.reshape(-1, vis.shape[-1]), prompt[mask].reshape(-1, vis.shape[-1])):
        sq = x.double().square().sum(-1)
        if bool(((sq != 0) & ((sq < 1.2e-38) | (sq > 3.4e38))).any()):
            return False
    return True


def _unit64(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.double()
    norm = torch.linalg.vector_norm(x, dim=-1)
    return x / norm.clamp_min(reference.EPS).unsqueeze(-1), norm


def cover_margin(vis: Tensor, prompt: Tensor, k_p: int, fold: int, ordered: bool = False) -> tuple[float, list[int]]:
    """The prompt cover (contract §3.1.2) on one sample (``prompt`` holds only the valid rows) in float64: (margin, S_p by descending score).
    ``ordered`` also requires the order inside S_p to be decided by a margin (prompt_cover returns it ordered)."""
    N, Lv = vis.shape[0], prompt.shape[0]
    if k_p == 0 or Lv == 0 or N == 0:
        return INF, []
    v_hat, _ = _unit64(vis)
    p_hat, _ = _unit64(prompt)
    sim = p_hat @ v_hat.T  # [Lv, N]
    f = min(fold if fold else max(1, math.ceil(k_p / Lv)), N)
    srt = torch.sort(sim, dim=1, descending=True, stable=True)
    margin = float((srt.values[:, f - 1] - srt.values[:, f]).min()) if f < N else INF
    in_t = torch.zeros(Lv, N, dtype=torch.bool)
    in_t.scatter_(1, srt.indices[:, :f], True)
    cover = sim.masked_fill(~in_t, -INF).amax(0)
    n_cand = int(in_t.any(0).sum())
    cs = torch.sort(cover, descending=True, stable=True)
    taken = min(k_p, n_cand)
    if ordered:
        gaps = cs.values[: min(taken + 1, n_cand)].diff().neg()
        if gaps.numel():
            margin = min(margin, float(gaps.min()))
    elif k_p < n_cand:
        margin = min(margin, _gap(cs.values, k_p))
    return margin, cs.indices[:taken].tolist()


def fps_margin(vis: Tensor, seeds: list[int], num_picks: int) -> float:
    """Farthest point sampling (contract §2.3) on one sample in float64, seeded by ``seeds`` (distinct): the smallest margin of its picks."""
    N = vis.shape[0]
    num_picks = min(num_picks, N - len(seeds))
    if num_picks <= 0:
        return INF
    v_hat, norm = _unit64(vis)
    margin = INF
    taken = torch.zeros(N, dtype=torch.bool)
    if not seeds:
        ns = torch.sort(norm, descending=True, stable=True)
        if N > 1:
            margin = float((ns.values[0] - ns.values[1]) / ns.values[0].clamp_min(1e-300))
        seeds = [int(ns.indices[0])]
        num_picks -= 1
    taken[seeds] = True
    dist = (1.0 - v_hat @ v_hat[seeds].T).amin(1)
    for _ in range(num_picks):
        key = dist.masked_fill(taken, -INF)
        if N - int(taken.sum()) >= 2:
            top = torch.topk(key, 2)
            margin = min(margin, float(top.values[0] - top.values[1]))
        pick = int(key.argmax())
        taken[pick] = True
        dist = torch.minimum(dist, 1.0 - v_hat @ v_hat[pick])
    return margin


def well_conditioned(B, N, L, d, k_p, k, fold=None, dtype=torch.float32, ragged=False, tries=40):
    """The first seeded Gaussian problem whose select decisions all win by the contract's margin; fails the test if none of
    ``tries`` seeds gives one (then the case itself is badly chosen, not the backend)."""
    for seed in range(tries):
        vis, prompt, mask = problem(B, N, L, d, dtype, seed=seed, ragged=ragged)
        if decision_margin(vis, prompt, mask, k_p, k, fold) >= WELL_CONDITIONED:
            return vis, prompt, mask
    raise AssertionError(f"no well-conditioned seed in {tries} for B={B} N={N} L={L} d={d} k_p={k_p} k={k} {dtype}")


# ------------------------------------------------------------------------------------------------- other methods


def gpu_backends() -> list[str]:
    """Backends that run on CUDA tensors here (empty without a GPU)."""
    return mob_kernels.available_backends("cuda") if torch.cuda.is_available() else []


def targets() -> list[tuple[str, str]]:
    """(backend, device) for every backend and device that can run here: the CPU backends on CPU tensors, and on a
    GPU machine every CUDA backend on CUDA tensors too."""
    return [(b, "cpu") for b in backends()] + [(b, "cuda") for b in gpu_backends()]


def target_id(t: tuple[str, str]) -> str:
    return f"{t[0]}-{t[1]}"


def usable64(vis: Tensor, valid: Tensor | None) -> Tensor:
    ok = torch.isfinite(vis).all(-1)
    return ok if valid is None else ok & valid


def divprune_margin(vis: Tensor, k: int, valid: Tensor | None = None) -> float:
    """DivPrune (contract §3.2) on one sample ``[N, d]`` in float64: the smallest margin of any decision (the most
    isolated first pick, then every max-min step)."""
    N = vis.shape[0]
    ok = usable64(vis, valid)
    n = min(k, int(ok.sum()))
    if n <= 0 or n == int(ok.sum()):  # nothing, or every usable token: no decision
        return INF
    if not _finite_rows(vis[ok]):
        return 0.0
    v_hat, _ = _unit64(vis.masked_fill(~ok.unsqueeze(1), 0))
    dist = 1.0 - v_hat @ v_hat.T
    pair = ok.unsqueeze(0) & ok.unsqueeze(1) & ~torch.eye(N, dtype=torch.bool)
    nearest = dist.masked_fill(~pair, INF).amin(0).masked_fill(~ok, -INF)
    top = torch.topk(nearest, 2).values
    margin = float(top[0] - top[1]) if bool(torch.isfinite(top).all()) else INF
    first = int(nearest.argmax())
    taken = ~ok.clone()
    taken[first] = True
    cur = dist[first].clone()
    for _ in range(n - 1):
        key = cur.masked_fill(taken, -INF)
        if int((~taken).sum()) >= 2:
            t2 = torch.topk(key, 2).values
            margin = min(margin, float(t2[0] - t2[1]))
        pick = int(key.argmax())
        taken[pick] = True
        cur = torch.minimum(cur, dist[pick])
    return margin


def dpp_replay(vis: Tensor, relevance: Tensor, valid: Tensor, k: int, stop: float = 1e-5):
    """The greedy DPP (contract §2.4) on one sample in float64: (order, gains, per-step margins relative to the
    largest usable diagonal entry: best vs second best, and best vs the stopping threshold). Unusable tokens' rows and
    columns are 0."""
    r = torch.where(valid, relevance.double(), 0.0)
    v_hat, _ = _unit64(vis.masked_fill(~valid.unsqueeze(1), 0))
    kern = (r.unsqueeze(1) * (v_hat @ v_hat.T) * r.unsqueeze(0)).masked_fill(~(valid[:, None] & valid[None, :]), 0.0)
    d2 = torch.diagonal(kern).clone().masked_fill(~valid, -INF)
    scale = float(torch.diagonal(kern)[valid].max()) if bool(valid.any()) else 0.0
    cis: list[Tensor] = []
    order: list[int] = []
    gains: list[float] = []
    margins: list[float] = []
    for _ in range(min(k, int(valid.sum()))):
        top = torch.topk(d2, min(2, d2.numel())).values
        best = float(top[0])
        m = abs(best - stop * scale) / scale if scale > 0 else INF
        if not best > stop * scale:
            margins.append(m)
            break
        if top.numel() == 2 and math.isfinite(float(top[1])):
            m = min(m, float(top[0] - top[1]) / scale)
        margins.append(m)
        j = int(d2.argmax())
        e = kern[j].clone()
        for c in cis:
            e -= c[j] * c
        e /= math.sqrt(best)
        cis.append(e)
        d2 = d2 - e * e
        d2[j] = -INF
        order.append(j)
        gains.append(best)
    return order, gains, margins


def dpp_margin(vis: Tensor, relevance: Tensor, k: int, valid: Tensor | None = None, stop: float = 1e-5) -> float:
    """CDPruner's greedy DPP (contract §3.3) on one sample: the smallest margin of ``dpp_replay``."""
    ok = usable64(vis, valid) & torch.isfinite(relevance)
    if not _finite_rows(vis[ok]):
        return 0.0
    margins = dpp_replay(vis, relevance, ok, k, stop)[2]
    return min(margins, default=INF)


def token_grid(B: int, N: int, kind: str, seed: int = 0) -> Tensor | None:
    """A (tile, row, col) grid for the independent set: None, one square grid as D2Pruner assumes (a batch-stride-0
    view), or random tiles and coordinates with collisions."""
    from mob_kernels.methods.d2pruner import square_grid

    if kind == "none":
        return None
    if kind == "square":
        return square_grid(N, torch.device("cpu")).expand(B, N, 3)
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 2, (B, N), generator=g), torch.randint(0, 5, (B, N), generator=g),
                        torch.randint(0, 5, (B, N), generator=g)], dim=-1)


def random_ranks(B: int, N: int, seed: int, drop: float = 0.25, ties: bool = True) -> Tensor:
    """A random visiting order per sample with some non-candidates (-1) and, optionally, tied ranks."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    if ties:
        rank = rank // 2  # pairs of tokens share a rank: the lower index goes first
    rank[torch.rand(B, N, generator=g) < drop] = -1
    return rank


def _finite_rows(x: Tensor) -> bool:
    if not bool(torch.isfinite(x).all()):
        return False
    sq = x.double().square().sum(-1)
    return not bool(((sq != 0) & ((sq < 1.2e-38) | (sq > 3.4e38))).any())


def d2pruner_margin(vis: Tensor, importance: Tensor, k: int, valid: Tensor | None = None, threshold: float = 0.8,
                    bias: Tensor | None = None) -> float:
    """D2Pruner at alpha = 1 (contract §3.4) on one sample: every backend computes the pivots and the fill from the
    same importance with the same torch code, so the decisions a backend can break differently are the graph's edges:
    the smallest distance of a usable pair's cosine (float64) from the threshold."""
    score = importance if bias is None else importance / (bias + 1e-7)
    ok = usable64(vis, valid) & torch.isfinite(score)
    if int(ok.sum()) < 2 or min(k, int(ok.sum())) == 0:
        return INF
    if not _finite_rows(vis[ok]):
        return 0.0
    v_hat, _ = _unit64(vis[ok])
    cos = v_hat @ v_hat.T
    off = ~torch.eye(cos.shape[0], dtype=torch.bool)
    return float((cos[off] - threshold).abs().min())
