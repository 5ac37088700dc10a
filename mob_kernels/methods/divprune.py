"""DivPrune (CVPR 2025, arXiv 2503.02175, released code vbdi/divprune): contract §3.2.

Max-min diversity on cosine distance, prompt-agnostic. The first pick is the token whose nearest neighbour is
farthest (the most isolated one); then, repeatedly, the token whose distance to everything picked so far is largest,
which is farthest point sampling seeded by the first pick. Composition: ``gram`` for the nearest-neighbour distances,
then ``farthest_point_sample`` reading the same Gram matrix.

Where this deviates from the released ``DivPrune`` function, and why: picked tokens are masked out (the released loop
relies on ``1 - cos(x, x) ~ 0`` and can pick a token twice in float16); a zero vector has cosine 0 with everything
(the released normalisation divides by zero); tokens with non-finite features or ``valid = False`` are never picked
while a usable token remains; and every sample of a batch gets its own selection (the released code applies row 0's
to the whole batch). On well-conditioned float32 inputs the picks are the released function's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ..registry import OpSpec, Prepared, prepared, register
from .common import complete, usable


def most_isolated(sim: Tensor, ok: Tensor) -> Tensor:
    """Per sample, the usable token whose nearest usable neighbour is farthest in cosine distance (first maximum;
    a token with no usable neighbour is infinitely isolated; a NaN distance ranks lowest). ``-1`` when no token is
    usable. ``sim`` ``[B, N, N]``, ``ok`` ``[B, N]``."""
    N = sim.shape[1]
    pair = ok.unsqueeze(1) & ok.unsqueeze(2) & ~torch.eye(N, dtype=torch.bool, device=sim.device)
    nearest = (1.0 - sim).masked_fill(~pair, float("inf")).amin(dim=1)  # sim is symmetric: column j = row j
    key = torch.nan_to_num(nearest, nan=-3.0, posinf=float("inf")).masked_fill(~ok, float("-inf"))
    return torch.where(ok.any(dim=1), key.argmax(dim=1), -1)


def _compose(P, vis: Tensor, k: int, valid: Tensor | None) -> Tensor:
    B, N, _ = vis.shape
    if k == 0 or N == 0:
        return torch.empty(B, 0, dtype=torch.int64, device=vis.device)
    ok = usable(vis, valid)
    sim = P.gram(vis)
    first = most_isolated(sim, ok)
    more = (ok.sum(dim=1).clamp_max(k) - 1).clamp_min(0)
    picks = P.farthest_point_sample(vis, first.unsqueeze(1), more, k, ok, sim)
    return complete(torch.cat([first.unsqueeze(1), picks], dim=1), k, N)


def _prepare(vis, k, *, valid=None, backend="auto", data=True) -> Prepared:
    v, unbatched = checks.batched("vis", vis)
    B, N = v.shape[:2]
    k = checks.budget("k", k, N, "N (the number of visual tokens)")
    ok = None if valid is None else checks.mask("valid", valid, B, N, unbatched, v)
    return prepared(dict(vis=v, k=k, valid=ok), v, checks.backend_name(backend), unbatched, data)


def _fake(vis, k, valid):
    return vis.new_empty(vis.shape[0], k, dtype=torch.int64)


DIVPRUNE = register(OpSpec(
    name="divprune",
    schema="(Tensor vis, int k, *, Tensor? valid=None, str backend=\"auto\") -> Tensor",
    prepare=_prepare, compose=_compose, fake=_fake, budget=lambda k: {"k": k},
    doc="DivPrune: max-min diversity on cosine distance, most isolated token first (arXiv 2503.02175)",
))


def divprune(vis: Tensor, k: int, *, valid: Tensor | None = None, backend: str = "auto") -> Tensor:
    """DivPrune selection (contract §3.2): ``k`` sorted distinct indices per sample of ``vis`` ``[B, N, d]`` (or
    ``[N, d]``), chosen for diversity alone. ``valid`` ``[B, N]`` bool marks the tokens that may be chosen; when fewer
    than ``k`` are, the rest are the lowest-index other tokens, so the output always holds exactly ``k``."""
    checks.door(vis=vis, valid=valid)
    out: Tensor = torch.ops.mob.divprune(vis, checks.as_int("k", k), valid=valid, backend=checks.backend_name(backend))
    return out
