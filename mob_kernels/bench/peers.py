"""Peers: what people use today for each stage or method, doing the same job from the same input.

MoB's stages (float32 inputs only):

* ``faiss``    (cover stage)  faiss-cpu exact inner-product k-NN (``faiss.knn``, METRIC_INNER_PRODUCT) gives each prompt
  row its ``fold`` nearest tokens; NumPy does the scatter-max and the top-``k_p`` of the prompt cover.
* ``fpsample`` (FPS stage)    fpsample's vanilla FPS (``fps_sampling``, C++) on the unit rows, started from the seeds.
  Euclidean FPS on unit vectors is cosine FPS (‖a − b‖² = 2 − 2a·b).
* ``greedy``   (FPS stage)    the eager greedy max-min loop as DivPrune users write it: an N x N cosine-distance matrix,
  then one ``argmax(...).item()`` host sync per pick. Runs on the input's device.

The released algorithms of the other methods, each its authors' eager loop re-written here from the published code's
semantics (every dtype; float32 arithmetic, as the reference; on the input's device):

* ``divprune_released`` (DivPrune) the released ``DivPrune`` function (vbdi/divprune, LLaVA/llava/model/llava_arch.py):
  rows normalised without an epsilon, D = 1 - cos as an N x N matrix; the first pick is the column whose second-smallest
  entry is largest (``topk(D, 2, dim=0, largest=False)``), then each step recomputes, over the rows of D already
  selected, the column minima and takes their argmax, without masking the selected tokens. One image at a time.
  Returns the picks in selection order.
* ``cdpruner_released`` (CDPruner) the released fast MAP inference (Theia-4869/CDPruner, llava/model/llava_arch.py):
  unit rows without an epsilon, S = x̂x̂ᵀ in float32, kernel L = r_i S_ij r_j; the incremental Cholesky rows ``cis``
  [T, B, N] start at zero and the gains ``di2s`` at diag(L); each step takes j = argmax of the gains, forms
  e = (L[b, j, :] − Σ_{t<i} cis[t, b, j] cis[t, b, :]) / sqrt(di2s[b, j]), stores it, subtracts e² from the gains and
  sets the gain of j to −inf. Returns the picks sorted, as the released code does.

``python_tests/test_bench_cli.py`` checks that ``mob_kernels.divprune`` and ``mob_kernels.cdpruner`` (reference
backend) return exactly these peers' picks on well-conditioned float32 inputs: that is how the package shows it
computes the released algorithms.

The timings include what the peer needs to start from our input (float32 conversion, normalisation, NumPy hand-off),
because our ops start from the same tensors. faiss and fpsample work in float32 only and on the CPU only.
Each peer returns the same thing as the stage or method it stands in for, so the bench can check agreement with the
reference.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import numpy as np
import torch
from torch import Tensor

EPS = 1e-12

STAGE_OF_PEER = {"faiss": "cover", "fpsample": "fps", "greedy": "fps", "divprune_released": "divprune",
                 "cdpruner_released": "cdpruner"}
# Peers that run on every dtype (the others take float32 inputs only).
ANY_DTYPE = ("divprune_released", "cdpruner_released")
# The stages ``decision_margin`` can replay (D2Pruner's and BTP's mixed decisions have no single margin here).
MARGIN_STAGES = ("select", "cover", "fps", "divprune", "cdpruner")
PEERS = tuple(STAGE_OF_PEER)


def available_peers() -> list[str]:
    """Peers whose packages are importable here (install them with ``pip install mob_kernels[bench]``)."""
    found = []
    if importlib.util.find_spec("faiss") is not None:
        found.append("faiss")
    if importlib.util.find_spec("fpsample") is not None:
        found.append("fpsample")
    found += ["greedy", "divprune_released", "cdpruner_released"]  # plain torch
    return found


def peer_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"faiss": "faiss-cpu", "fpsample": "fpsample"}.get(name)
    if dist is None:
        return torch.__version__
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _unit_rows_np(x: Tensor) -> np.ndarray:
    x = x.float()
    return (x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(EPS)).cpu().numpy()


def faiss_cover(vis: Tensor, prompt: Tensor, k_p: int, fold: int) -> list[list[int]]:
    """The prompt cover per sample with faiss doing the k-NN: picks by descending covering score (ties to the lower
    index)."""
    import faiss

    out = []
    for b in range(vis.shape[0]):
        v = _unit_rows_np(vis[b])
        p = _unit_rows_np(prompt[b])
        N = v.shape[0]
        f = min(fold or max(1, -(-k_p // max(p.shape[0], 1))), N)
        sims, idx = faiss.knn(p, v, f, metric=faiss.METRIC_INNER_PRODUCT)
        score = np.full(N, -np.inf, dtype=np.float32)
        np.maximum.at(score, idx.ravel(), sims.ravel())
        n_cand = int(np.isfinite(score).sum())
        order = np.argsort(-score, kind="stable")[: min(k_p, n_cand)]
        out.append(order.tolist())
    return out


def fpsample_fps(vis: Tensor, seeds: list[list[int]], picks: list[int]) -> list[list[int]]:
    """Seeded FPS per sample with fpsample: ``picks[b]`` new indices after ``seeds[b]``, in selection order."""
    import fpsample

    out = []
    for b in range(vis.shape[0]):
        v = _unit_rows_np(vis[b])
        start = seeds[b]
        if not start:  # unseeded FPS starts from the largest raw norm
            start = [int(torch.linalg.vector_norm(vis[b].float(), dim=-1).argmax())]
            got = fpsample.fps_sampling(v, picks[b], start_idx=start)
            out.append([int(i) for i in got])
        else:
            got = fpsample.fps_sampling(v, len(start) + picks[b], start_idx=start)
            out.append([int(i) for i in got[len(start):]])
    return out


def greedy_fps(vis: Tensor, seeds: list[list[int]], picks: list[int]) -> list[list[int]]:
    """The DivPrune-style eager loop: pairwise distance matrix, then argmax + ``.item()`` per pick."""
    out = []
    for b in range(vis.shape[0]):
        v = torch.nn.functional.normalize(vis[b].float(), dim=-1, eps=EPS)
        dist_matrix = 1.0 - v @ v.T
        selected = list(seeds[b])
        if selected:
            min_dist = dist_matrix[selected].amin(dim=0)
        else:
            first = int(torch.linalg.vector_norm(vis[b].float(), dim=-1).argmax().item())
            selected.append(first)
            min_dist = dist_matrix[first].clone()
        min_dist[selected] = float("-inf")
        while len(selected) < len(seeds[b]) + picks[b]:
            i = int(torch.argmax(min_dist).item())
            selected.append(i)
            min_dist = torch.minimum(min_dist, dist_matrix[i])
            min_dist[i] = float("-inf")
        out.append(selected[len(seeds[b]):])
    return out


def divprune_released(vis: Tensor, k: int) -> Tensor:
    """DivPrune's released selection loop per image (module docstring): ``[B, k]`` int64 picks in selection order,
    on ``vis``'s device (no host synchronisation inside the loop, as released)."""
    rows = []
    for b in range(vis.shape[0]):
        x = vis[b].float()
        unit = x / x.norm(dim=1, keepdim=True)  # no epsilon: a zero row gives NaN, as released
        dist = 1.0 - unit @ unit.T  # [N, N] cosine distance
        chosen = torch.empty(k, dtype=torch.int64, device=vis.device)
        for i in range(k):
            if i == 0:  # each column's second-smallest distance: its nearest other token (D[j, j] ~ 0 is the smallest)
                score = torch.topk(dist, 2, dim=0, largest=False).values[1]
            else:  # distance of every token to the nearest selected one, recomputed from all selected rows
                score = dist.index_select(0, chosen[:i]).min(dim=0).values
            chosen[i] = score.argmax()
        rows.append(chosen)
    return torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64, device=vis.device)


def cdpruner_released(vis: Tensor, relevance: Tensor, k: int) -> Tensor:
    """CDPruner's released fast MAP loop (module docstring): ``[B, k]`` int64 picks, sorted, on ``vis``'s device."""
    x = vis.float()
    unit = x / x.norm(dim=-1, keepdim=True)  # no epsilon, as released
    sim = unit @ unit.transpose(1, 2)  # [B, N, N] float32
    r = relevance.float()
    kernel = r.unsqueeze(2) * sim * r.unsqueeze(1)
    B, N = r.shape
    batch = torch.arange(B, device=vis.device)
    cis = torch.zeros(k, B, N, dtype=torch.float32, device=vis.device)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    chosen = torch.empty(k, B, dtype=torch.int64, device=vis.device)
    for i in range(k):
        j = di2s.argmax(dim=-1)
        chosen[i] = j
        done = torch.einsum("tb,tbn->bn", cis[:i, batch, j], cis[:i])  # sum over earlier rows of the factor
        e = (kernel[batch, j] - done) / di2s[batch, j].sqrt().unsqueeze(-1)
        cis[i] = e
        di2s = di2s - e * e
        di2s[batch, j] = float("-inf")
    return torch.sort(chosen.T, dim=1).values


# ------------------------------------------------------------------------------------------------ decision margins


def _gap(key: Tensor) -> float:
    """Relative gap between the largest and the second-largest finite entry of ``key`` (inf when fewer than two)."""
    v = key[torch.isfinite(key)]
    if v.numel() < 2:
        return float("inf")
    top = torch.topk(v, 2).values
    return float((top[0] - top[1]) / top[0].abs().clamp_min(1e-30))


def _fps_gaps(unit: Tensor, seeds: list[int], n: int) -> float:
    dist = torch.full((unit.shape[0],), float("inf"))
    taken = torch.zeros(unit.shape[0], dtype=torch.bool)
    for s in seeds:
        dist = torch.minimum(dist, 1.0 - unit @ unit[s])
        taken[s] = True
    gap = float("inf")
    for _ in range(n):
        key = dist.masked_fill(taken, float("-inf"))
        gap = min(gap, _gap(key))
        j = int(key.argmax())
        taken[j] = True
        dist = torch.minimum(dist, 1.0 - unit @ unit[j])
    return gap


def decision_margin(stage: str, vis: Tensor, *, prompt: Tensor | None = None, k_p: int = 0, k: int = 0,
                    relevance: Tensor | None = None, seeds: list[list[int]] | None = None) -> float:
    """The closest call the reference's greedy made on this input: the smallest relative gap between the winner and
    the runner-up over every decision of ``stage`` (select / cover / fps / divprune / cdpruner), in float32 on the
    CPU. When outputs differ, a margin near float32 rounding (~1e-6) says the input has a near-tie that backends may
    break differently (the contract allows it); a large margin says one of them is wrong."""
    v = vis.detach().float().cpu()
    gap = float("inf")
    for b in range(v.shape[0]):
        x = v[b]
        unit = x / x.norm(dim=1, keepdim=True).clamp_min(EPS)
        if stage in ("select", "cover", "fps"):
            cover = list(seeds[b]) if seeds is not None else []
            if stage in ("select", "cover") and prompt is not None and k_p:
                p = prompt[b].detach().float().cpu()
                sim = (p / p.norm(dim=1, keepdim=True).clamp_min(EPS)) @ unit.T  # [L, N]
                f = min(max(1, -(-k_p // max(p.shape[0], 1))), x.shape[0])
                top = torch.topk(sim, min(f + 1, x.shape[0]), dim=1).values
                if top.shape[1] > f:  # each row's f-th against its (f+1)-th neighbour
                    gap = min(gap, float(((top[:, f - 1] - top[:, f]) / top[:, f - 1].abs().clamp_min(1e-30)).min()))
                score = torch.full((x.shape[0],), float("-inf"))
                idx = torch.topk(sim, f, dim=1).indices
                score.scatter_reduce_(0, idx.flatten(), sim.gather(1, idx).flatten(), "amax")
                order = torch.sort(score, descending=True, stable=True)
                if k_p < x.shape[0] and torch.isfinite(order.values[k_p]):
                    a, c = order.values[k_p - 1], order.values[k_p]
                    gap = min(gap, float((a - c) / a.abs().clamp_min(1e-30)))
                cover = [int(i) for i, s in zip(order.indices[:k_p], order.values[:k_p]) if torch.isfinite(s)]
            if stage in ("select", "fps"):
                start = cover or [int(x.norm(dim=1).argmax())]
                gap = min(gap, _fps_gaps(unit, start, k - len(cover) - (0 if cover else 1)))
        elif stage == "divprune":
            dist = 1.0 - unit @ unit.T
            near = dist.masked_fill(torch.eye(x.shape[0], dtype=torch.bool), float("inf")).amin(dim=0)
            gap = min(gap, _gap(near))
            gap = min(gap, _fps_gaps(unit, [int(near.argmax())], k - 1))
        elif stage == "cdpruner":
            r = relevance[b].detach().float().cpu()
            kern = r.unsqueeze(1) * (unit @ unit.T) * r.unsqueeze(0)
            d2 = kern.diagonal().clone()
            rows: list[Tensor] = []
            for _ in range(k):
                gap = min(gap, _gap(d2))
                j = int(d2.argmax())
                e = kern[j] - sum((c[j] * c for c in rows), torch.zeros_like(d2))
                e = e / d2[j].clamp_min(1e-30).sqrt()
                rows.append(e)
                d2 = d2 - e * e
                d2[j] = float("-inf")
        else:
            raise ValueError(f"unknown stage {stage!r}")
    return gap


def peer_call(name: str, vis: Tensor, prompt: Tensor | None = None, k_p: int = 0, fold: int = 0,
              seeds: list[list[int]] | None = None, picks: list[int] | None = None, *, k: int = 0,
              relevance: Tensor | None = None) -> Callable[[], object]:
    """A zero-argument callable running peer ``name`` on these inputs (CPU peers get CPU copies, made here, once).
    MoB's stage peers take (prompt, k_p, fold) or (seeds, picks); ``divprune_released`` takes ``k``,
    ``cdpruner_released`` ``relevance`` and ``k``."""
    if name == "faiss":
        v, p = vis.cpu(), prompt.cpu()
        return lambda: faiss_cover(v, p, k_p, fold)
    if name == "fpsample":
        v = vis.cpu()
        return lambda: fpsample_fps(v, seeds, picks)
    if name == "greedy":
        return lambda: greedy_fps(vis, seeds, picks)
    if name == "divprune_released":
        return lambda: divprune_released(vis, k)
    if name == "cdpruner_released":
        return lambda: cdpruner_released(vis, relevance, k)
    raise ValueError(f"unknown peer {name!r}")


def peer_device(name: str, device: str) -> str:
    return device if name in ("greedy", *ANY_DTYPE) else "cpu"
