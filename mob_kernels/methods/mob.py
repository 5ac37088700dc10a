"""MoB, Multi-Objective Balanced Covering (arXiv 2505.10118): docs/contract.md §3.1.

``select`` spends ``k_p`` of a budget ``k`` on the tokens that best cover the prompt (``prompt_cover``: each valid
prompt row nominates its ``f`` most similar tokens, the best-scoring nominees win) and the rest on farthest point
sampling seeded by them (``farthest_point_sample``), and returns the sorted union. The two stages are public ops too.

This module declares the three ops (schema, checks, composition, fake, budget rule) and their front doors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ..registry import OpSpec, Prepared, prepared, register

# ------------------------------------------------------------------------------------------------------ budget rule


def prompt_budget(k: int) -> int:
    """The prompt share ``K_p`` of a keep budget ``K`` (contract §3.1.4, the paper's table without the coupling prior).

    The table is ``64 -> 32``, ``128 -> 48``, ``192 -> 64``; between and beyond its rows the nearest row's ratio is
    used: ``K/2`` up to 64, ``3K/8`` up to 128, ``K/3`` above (LLaVA-NeXT's ``K = 320`` gives 106)."""
    k = checks.as_int("k", k)
    if k <= 64:
        return k // 2
    if k <= 128:
        return (3 * k) // 8
    return k // 3


def resolve_fold(k_p: int, fold: int, mask: Tensor, n: int, all_valid: bool = False, reuse: bool = False) -> Tensor:
    """Each sample's neighbour count ``f`` (contract §3.1.2), as int64 ``[B]`` on the mask's device: ``min(fold, N)``,
    or with ``fold = 0`` ``min(max(1, ceil(k_p / L_valid)), N)`` (0 for a sample with no valid prompt row, which has
    no candidates anyway). The one place the automatic fold is resolved: every backend reads ``f`` from here. When
    every prompt row is valid (``all_valid``) or the fold is given, ``f`` is one number, and no kernel computes it."""
    B, L = mask.shape
    if fold > 0 or all_valid:
        f = min(fold, n) if fold > 0 else (min(max(1, -(-k_p // L)), n) if L > 0 else 0)
        return checks.filled((B,), f, torch.int64, mask.device, reuse)
    n_valid = mask.sum(1)
    per_sample = torch.div(k_p + n_valid - 1, n_valid.clamp_min(1), rounding_mode="floor").clamp(1, max(n, 1))
    return torch.where(n_valid > 0, per_sample, 0)


# ----------------------------------------------------------------------------------------------------- compositions


def _compose_select(P, vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, k: int, fold: Tensor) -> Tensor:
    cover, count = P.prompt_cover(vis, prompt, mask, k_p, fold)
    picks = P.farthest_point_sample(vis, cover, k - count, k, None, None)
    # count cover picks + (k - count) FPS picks are valid; the k_p paddings (-1) sort first.
    return torch.sort(torch.cat([cover, picks], dim=1), dim=1).values[:, k_p:]


def _compose_prompt_cover(P, vis, prompt, mask, k_p, fold):
    return P.prompt_cover(vis, prompt, mask, k_p, fold)


def _compose_fps(P, vis, seed, num_picks, k, valid, sim):
    return P.farthest_point_sample(vis, seed, num_picks, k, valid, sim)


# ----------------------------------------------------------------------------------------------------------- checks


def _prepare_cover_inputs(vis, prompt, prompt_mask, data):
    v, unbatched = checks.batched("vis", vis)
    p = checks.companion("prompt", prompt, v, unbatched)
    mask = checks.mask("prompt_mask", prompt_mask, v.shape[0], p.shape[1], unbatched, v, reuse=data)
    return v, p, mask, unbatched


def _fold(k_p, fold, mask, n, prompt_mask, data):
    return resolve_fold(k_p, checks.as_int("fold", fold), mask, n, all_valid=prompt_mask is None, reuse=data)


def _prepare_select(vis, prompt, k_p, k, *, fold=0, prompt_mask=None, backend="auto", data=True) -> Prepared:
    v, p, mask, unbatched = _prepare_cover_inputs(vis, prompt, prompt_mask, data)
    k = checks.budget("k", k, v.shape[1], "N (the number of visual tokens)")
    k_p = checks.budget("k_p", k_p, k, "k")
    f = _fold(k_p, fold, mask, v.shape[1], prompt_mask, data)
    inputs = dict(vis=v, prompt=p, mask=mask, k_p=k_p, k=k, fold=f)
    return prepared(inputs, v, checks.backend_name(backend), unbatched, data)


def _prepare_prompt_cover(vis, prompt, k_p, *, fold=0, prompt_mask=None, backend="auto", data=True) -> Prepared:
    v, p, mask, unbatched = _prepare_cover_inputs(vis, prompt, prompt_mask, data)
    k_p = checks.budget("k_p", k_p, v.shape[1], "N (the number of visual tokens)")
    f = _fold(k_p, fold, mask, v.shape[1], prompt_mask, data)
    inputs = dict(vis=v, prompt=p, mask=mask, k_p=k_p, fold=f)
    return prepared(inputs, v, checks.backend_name(backend), unbatched, data)


def _prepare_fps(vis, k, *, seed=None, valid=None, backend="auto", data=True) -> Prepared:
    v, unbatched = checks.batched("vis", vis)
    B, N = v.shape[:2]
    k = checks.budget("k", k, N, "N (the number of visual tokens)")
    if seed is None:
        s = torch.empty(B, 0, dtype=torch.int64, device=v.device)
    else:
        if not isinstance(seed, Tensor) or seed.dtype != torch.int64:
            raise TypeError(f"seed must be an int64 torch.Tensor, got {getattr(seed, 'dtype', type(seed).__name__)}")
        checks.same_device("seed", seed, v)
        if seed.dim() != (1 if unbatched else 2) or (not unbatched and seed.shape[0] != B):
            want = "[m]" if unbatched else f"[{B}, m]"
            raise ValueError(f"seed must have shape {want}, got seed.shape={tuple(seed.shape)}")
        s = seed.reshape(B, -1).contiguous()
        # The one host sync of this package, in this primitive only (select never checks its own seeds).
        if data and s.numel() and bool(((s < -1) | (s >= N)).any()):
            raise ValueError(f"seed values must be -1 or in [0, {N}), got min {int(s.min())}, max {int(s.max())}")
    ok = None if valid is None else checks.mask("valid", valid, B, N, unbatched, v)
    num_picks = torch.full((B,), k, dtype=torch.int64, device=v.device)
    inputs = dict(vis=v, seed=s, num_picks=num_picks, k=k, valid=ok, sim=None)
    return prepared(inputs, v, checks.backend_name(backend), unbatched, data)


# ------------------------------------------------------------------------------------------------------------ fakes


def _fake_select(vis, prompt, mask, k_p, k, fold):
    return vis.new_empty(vis.shape[0], k, dtype=torch.int64)


def _fake_prompt_cover(vis, prompt, mask, k_p, fold):
    return vis.new_empty(vis.shape[0], k_p, dtype=torch.int64), vis.new_empty(vis.shape[0], dtype=torch.int64)


def _fake_fps(vis, seed, num_picks, k, valid, sim):
    return vis.new_empty(vis.shape[0], k, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------- registration

SELECT = register(OpSpec(
    name="select",
    schema="(Tensor vis, Tensor prompt, int k_p, int k, *, int fold=0, Tensor? prompt_mask=None, "
           "str backend=\"auto\") -> Tensor",
    prepare=_prepare_select, compose=_compose_select, fake=_fake_select,
    budget=lambda k: {"k": k, "k_p": prompt_budget(k)},
    doc="MoB: prompt cover for k_p tokens, FPS seeded by them for the rest (arXiv 2505.10118)",
))
PROMPT_COVER = register(OpSpec(
    name="prompt_cover",
    schema="(Tensor vis, Tensor prompt, int k_p, *, int fold=0, Tensor? prompt_mask=None, str backend=\"auto\") "
           "-> (Tensor, Tensor)",
    prepare=_prepare_prompt_cover, compose=_compose_prompt_cover, fake=_fake_prompt_cover,
))
FARTHEST_POINT_SAMPLE = register(OpSpec(
    name="farthest_point_sample",
    schema="(Tensor vis, int k, *, Tensor? seed=None, Tensor? valid=None, str backend=\"auto\") -> Tensor",
    prepare=_prepare_fps, compose=_compose_fps, fake=_fake_fps,
))

# ------------------------------------------------------------------------------------------------------ front doors


def _clamp_fold(fold: int | None, vis: object) -> int:
    # Any int is a valid fold (f = min(fold, N)); clamping here keeps it inside the schema's int64.
    f = 0 if fold is None else checks.as_int("fold", fold)
    n = vis.shape[-2] if isinstance(vis, Tensor) and vis.dim() >= 2 else 1 << 62
    return min(f, n)


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
    """MoB selection (contract §3.1): ``k`` sorted distinct indices per sample, ``k_p`` of them covering the prompt.

    ``vis`` ``[B, N, d]`` or ``[N, d]``; ``prompt`` ``[B, L, d]`` or ``[L, d]``; ``prompt_mask`` ``[B, L]`` bool
    (False: padding). ``fold``: neighbours per prompt row (None: ``ceil(k_p / L_valid)``). Returns int64 ``[B, k]`` or
    ``[k]``. ``check_finite=True`` raises on NaN/inf in ``vis`` or in a valid prompt row instead of selecting around
    them (it reads the data: a host sync)."""
    checks.door(vis=vis, prompt=prompt, prompt_mask=prompt_mask)
    fold = _clamp_fold(fold, vis)
    if check_finite:
        call = _prepare_select(vis, prompt, k_p, k, fold=fold, prompt_mask=prompt_mask, backend=backend)
        checks.finite("vis", call.inputs["vis"])
        checks.finite("prompt", call.inputs["prompt"], call.inputs["mask"])
    out: Tensor = torch.ops.mob.select(vis, prompt, checks.as_int("k_p", k_p), checks.as_int("k", k), fold=fold,
                                prompt_mask=prompt_mask, backend=checks.backend_name(backend))
    return out


def prompt_cover(
    vis: Tensor,
    prompt: Tensor,
    k_p: int,
    *,
    fold: int | None = None,
    prompt_mask: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """MoB's prompt cover alone (contract §3.1.2): (picks ``[B, k_p]`` by descending covering score, ``-1`` padded;
    count ``[B]``)."""
    checks.door(vis=vis, prompt=prompt, prompt_mask=prompt_mask)
    out: tuple[Tensor, Tensor] = torch.ops.mob.prompt_cover(
        vis, prompt, checks.as_int("k_p", k_p), fold=_clamp_fold(fold, vis), prompt_mask=prompt_mask,
        backend=checks.backend_name(backend),
    )
    return out


def farthest_point_sample(
    vis: Tensor,
    k: int,
    seed: Tensor | None = None,
    *,
    valid: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Farthest point sampling on cosine distance (contract §2.3): ``k`` new picks in selection order. ``seed``
    ``[B, m]`` (or ``[m]``) are already-taken indices, ``-1`` padded; they seed the distances and are never returned.
    Tokens where ``valid`` is False are never picked. Picks past the untaken valid tokens are ``-1``."""
    checks.door(vis=vis, seed=seed, valid=valid)
    out: Tensor = torch.ops.mob.farthest_point_sample(vis, checks.as_int("k", k), seed=seed, valid=valid,
                                               backend=checks.backend_name(backend))
    return out
