"""CDPruner (NeurIPS 2025, arXiv 2506.10967, released code Theia-4869/CDPruner): contract §3.3.

A conditional determinantal point process: the kernel ``L = diag(r) S diag(r)`` weighs the cosine similarity ``S`` of
the visual tokens by each token's relevance ``r`` to the instruction, and the greedy MAP of that DPP (fast greedy MAP
with an incremental Cholesky factor, Chen et al. 2018) picks tokens that are relevant and unlike each other.
Composition: the backend's ``dpp_greedy``, then the tokens it could not rank (it stops when the kernel runs out of
rank) completed by relevance.

``cdpruner_relevance`` computes the released code's relevance from CLIP-space image and text embeddings: the negative
mean cosine similarity to the instruction's text embeddings, min-max normalised per sample.

Where this deviates from the released code, and why: the greedy loop stops when the best gain falls to
``DPP_STOP`` (1e-5) of the kernel's largest diagonal entry and fills the rest by relevance, instead of taking the
square root of a rounding residue (NaN, or noise-driven picks); relevance is normalised per sample (the released code
normalises over the whole call, which for LLaVA-NeXT is the five crops of one image: pass them as one row to
``cdpruner_relevance`` and reshape to reproduce it); constant relevance or no text gives ``r = 1`` (the released code
divides by zero); zero vectors have cosine 0 (the released normalisation divides by zero). On well-conditioned
float32 inputs the picks are the released fast-MAP loop's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ..registry import OpSpec, Prepared, prepared, register
from .common import complete, usable

RELEVANCE_SHIFT = 1e-6  # the released code's +1e-6 in (rho - min + 1e-6) / (max - min)


def cdpruner_relevance(image_embeds: Tensor, text_embeds: Tensor, text_mask: Tensor | None = None) -> Tensor:
    """CDPruner's relevance ``r`` ``[B, N]`` float32 (contract §3.3.1) from ``image_embeds`` ``[B, N, C]`` and
    ``text_embeds`` ``[B, M, C]`` in one joint space (CLIP's projections in the released code); ``text_mask``
    ``[B, M]`` bool marks real text rows. ``rho = -mean_m cos(e_n, t_m)``, then ``(rho - min + 1e-6) / (max - min)``
    per sample; ``r = 1`` where ``rho`` is constant or the sample has no text. Unbatched ``[N, C]`` / ``[M, C]`` give
    ``[N]``. Plain torch on any device, differentiable."""
    e, unbatched = checks.batched("image_embeds", image_embeds)
    for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if text_embeds.dim() != e.dim() - (1 if unbatched else 0):
        raise ValueError(f"text_embeds must have the rank of image_embeds, got text_embeds.shape={tuple(text_embeds.shape)}")
    t = text_embeds.unsqueeze(0) if unbatched else text_embeds
    checks.same_device("text_embeds", t, e)
    if t.shape[0] != e.shape[0] or t.shape[2] != e.shape[2]:
        raise ValueError(
            f"text_embeds must be [B, M, C] with image_embeds' B={e.shape[0]} and C={e.shape[2]}, got {tuple(t.shape)}"
        )
    B, M = t.shape[:2]
    m = checks.mask("text_mask", text_mask, B, M, unbatched, e).float()
    e_hat = torch.nn.functional.normalize(e.float(), dim=-1, eps=1e-12)
    t_hat = torch.nn.functional.normalize(t.float(), dim=-1, eps=1e-12)
    rho = -(e_hat @ t_hat.transpose(1, 2) * m.unsqueeze(1)).sum(-1) / m.sum(1, keepdim=True).clamp_min(1.0)
    lo, hi = rho.amin(dim=1, keepdim=True), rho.amax(dim=1, keepdim=True)
    spread = hi - lo
    r = (rho - lo + RELEVANCE_SHIFT) / torch.where(spread > 1e-12, spread, 1.0)
    r = torch.where((spread > 1e-12) & (m.sum(1, keepdim=True) > 0), r, torch.ones_like(r))
    return r[0] if unbatched else r


def _compose(P, vis: Tensor, relevance: Tensor, k: int, valid: Tensor | None) -> Tensor:
    B, N, _ = vis.shape
    if k == 0 or N == 0:
        return torch.empty(B, 0, dtype=torch.int64, device=vis.device)
    ok = usable(vis, valid) & torch.isfinite(relevance)
    order, _gain = P.dpp_greedy(vis, relevance, ok, k)
    return complete(order, k, N, relevance.masked_fill(~ok, float("-inf")))


def _prepare(vis, relevance, k, *, valid=None, backend="auto", data=True) -> Prepared:
    v, unbatched = checks.batched("vis", vis)
    B, N = v.shape[:2]
    r = checks.scores("relevance", relevance, B, N, unbatched, v)
    k = checks.budget("k", k, N, "N (the number of visual tokens)")
    ok = None if valid is None else checks.mask("valid", valid, B, N, unbatched, v)
    return prepared(dict(vis=v, relevance=r, k=k, valid=ok), v, checks.backend_name(backend), unbatched, data)


def _fake(vis, relevance, k, valid):
    return vis.new_empty(vis.shape[0], k, dtype=torch.int64)


CDPRUNER = register(OpSpec(
    name="cdpruner",
    schema="(Tensor vis, Tensor relevance, int k, *, Tensor? valid=None, str backend=\"auto\") -> Tensor",
    prepare=_prepare, compose=_compose, fake=_fake, budget=lambda k: {"k": k},
    doc="CDPruner: greedy MAP of a relevance-conditioned DPP over cosine similarity (arXiv 2506.10967)",
))


def cdpruner(
    vis: Tensor, relevance: Tensor, k: int, *, valid: Tensor | None = None, backend: str = "auto"
) -> Tensor:
    """CDPruner selection (contract §3.3): ``k`` sorted distinct indices per sample of ``vis`` ``[B, N, d]`` (or
    ``[N, d]``), the greedy MAP of the DPP with kernel ``r_i cos(v_i, v_j) r_j``. ``relevance`` ``[B, N]`` (any float
    dtype) is used as given (``cdpruner_relevance`` computes the released code's). Tokens the DPP cannot rank (it
    stops when the kernel runs out of rank) are completed by relevance; ``valid`` as in ``divprune``."""
    checks.door(vis=vis, valid=valid)
    checks.tensor("relevance", relevance)
    out: Tensor = torch.ops.mob.cdpruner(vis, relevance, checks.as_int("k", k), valid=valid,
                                  backend=checks.backend_name(backend))
    return out
