"""Peers: what people use today for each stage, doing the same job from the same input.

* ``faiss``    (cover stage)  faiss-cpu exact inner-product k-NN (``faiss.knn``, METRIC_INNER_PRODUCT) gives each prompt
  row its ``fold`` nearest tokens; NumPy does the scatter-max and the top-``k_p`` of SPEC.md §2 step 2.
* ``fpsample`` (FPS stage)    fpsample's vanilla FPS (``fps_sampling``, C++) on the unit rows, started from the seeds.
  Euclidean FPS on unit vectors is SPEC.md's cosine FPS (‖a − b‖² = 2 − 2a·b).
* ``greedy``   (FPS stage)    the eager greedy max-min loop as DivPrune users write it: an N x N cosine-distance matrix,
  then one ``argmax(...).item()`` host sync per pick. Runs on the input's device.

The timings include what the peer needs to start from our input (float32 conversion, normalisation, NumPy hand-off),
because our ops start from the same tensors. faiss and fpsample work in float32 only and on the CPU only.
Each peer returns the same thing as the stage it stands in for, so the bench can check agreement with the reference.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import numpy as np
import torch
from torch import Tensor

EPS = 1e-12

STAGE_OF_PEER = {"faiss": "cover", "fpsample": "fps", "greedy": "fps"}


def available_peers() -> list[str]:
    """Peers whose packages are importable here (install them with ``pip install mob_kernels[bench]``)."""
    found = []
    if importlib.util.find_spec("faiss") is not None:
        found.append("faiss")
    if importlib.util.find_spec("fpsample") is not None:
        found.append("fpsample")
    found.append("greedy")  # plain torch
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
    """SPEC step 2 per sample with faiss doing the k-NN: picks by descending covering score (ties to lower index)."""
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
    """SPEC step 3 per sample with fpsample: ``picks[b]`` new indices after ``seeds[b]``, in selection order."""
    import fpsample

    out = []
    for b in range(vis.shape[0]):
        v = _unit_rows_np(vis[b])
        start = seeds[b]
        if not start:  # SPEC: unseeded FPS starts from the largest raw norm
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


def peer_call(name: str, vis: Tensor, prompt: Tensor, k_p: int, fold: int, seeds: list[list[int]],
              picks: list[int]) -> Callable[[], list[list[int]]]:
    """A zero-argument callable running peer ``name`` on these inputs (CPU peers get CPU copies, made here, once)."""
    if name == "faiss":
        v, p = vis.cpu(), prompt.cpu()
        return lambda: faiss_cover(v, p, k_p, fold)
    if name == "fpsample":
        v = vis.cpu()
        return lambda: fpsample_fps(v, seeds, picks)
    if name == "greedy":
        return lambda: greedy_fps(vis, seeds, picks)
    raise ValueError(f"unknown peer {name!r}")


def peer_device(name: str, device: str) -> str:
    return device if name == "greedy" else "cpu"
