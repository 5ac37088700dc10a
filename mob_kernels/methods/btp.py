"""BTP, Balanced Token Pruning (NeurIPS 2025, arXiv 2505.22038): contract §3.5.

BTP prunes in stages inside the language model: early stages favour diversity (their effect on later layers), later
ones attention (the consistency of local outputs). One stage (``btp_stage``) keeps ``k`` of the ``n`` image tokens
entering a layer, from two signals: the hidden states (for max-min diversity in cosine distance, as DivPrune) and the
last prompt token's attention to the image tokens at the layer before (for importance, optionally *rebalanced*: among
the top candidates, those in the first ``rebalance`` positions go first). A constant spatial seed (farthest point
sampling on the image grid in Manhattan distance) spreads the first stage over the image. ``SCHEDULES`` holds the
released stage plans.

Modes (released code: the fork of the authors' repository, files ``llava/modeling_llama.py`` and
``qwen-2.5-vl/modeling_qwen2_5_vl.py``):
* ``"union"`` (LLaVA stages 1-2): attention picks, the spatial seed and ``n_div`` diversity picks, deduplicated in that
  priority order, cut to ``k`` or topped up to ``k`` by diversity seeded with them;
* ``"attn_seeded"`` (Qwen stages 1-2): ``n_attn`` attention picks, then diversity seeded with them up to ``k``;
* ``"attn_only"`` (the third stage of both): ``k`` attention picks from the top ``n_extra``, rebalanced.

The released code has three bugs (contract §3.5, "Decisions"); this op fixes them and always keeps exactly ``k``;
``btp_stage_as_released`` reproduces them for one sample, for A/B comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks
from ..registry import OpSpec, Prepared, prepared, register
from .common import complete, usable
from .divprune import most_isolated

MODES = ("union", "attn_seeded", "attn_only")

# Released stage plans, 1-based "prune before decoder layer L" (each stage: layer, kept count rule, mode, params).
# LLaVA-1.5-7B: 576 -> 288 -> 144 -> 48 -> 0 before layers 4 / 7 / 15 / 23. Qwen2.5-VL-7B: N -> N/2 -> N/4 -> N/8 -> 0
# before layers 4 / 7 / 16 / 23.
SCHEDULES: dict[str, list[dict[str, object]]] = {
    "llava": [
        dict(layer=4, keep=288, mode="union", n_div=86, n_attn=86, n_extra=318, rebalance=288, spatial_seed=144),
        dict(layer=7, keep=144, mode="union", n_div=14, n_attn=129, n_extra=193, rebalance=144),
        dict(layer=15, keep=48, mode="attn_only", n_extra=57, rebalance=48),
        dict(layer=23, keep=0),
    ],
    "qwen2_5_vl": [
        dict(layer=4, keep="n//2", mode="attn_seeded", n_attn="int(int(0.1*k)*1.2)"),
        dict(layer=7, keep="n//2", mode="attn_seeded", n_attn="int(0.4*k)"),
        dict(layer=16, keep="n//2", mode="attn_only", n_extra="int(1.2*k)", rebalance="k"),
        dict(layer=23, keep=0),
    ],
}


def spatial_seed(height: int, width: int, k: int) -> Tensor:
    """BTP's spatial initialisation: ``k`` cells of a ``height x width`` grid (row-major indices) by farthest point
    sampling in Manhattan distance from cell 0, ties to the lower index; returned in selection order."""
    n = height * width
    k = checks.budget("k", k, n, "height * width")
    i = torch.arange(n)
    r, c = i // width, i % width
    dist = ((r.unsqueeze(1) - r.unsqueeze(0)).abs() + (c.unsqueeze(1) - c.unsqueeze(0)).abs()).float()
    out = torch.empty(k, dtype=torch.int64)
    if k == 0:
        return out
    taken = torch.zeros(n, dtype=torch.bool)
    cur = torch.full((n,), float("inf"))
    pick = 0
    for t in range(k):
        out[t] = pick
        taken[pick] = True
        cur = torch.minimum(cur, dist[pick])
        pick = int(cur.masked_fill(taken, -1.0).argmax())
    return out


def attention_picks(score: Tensor, select: int, extra: int, rebalance: int, ok: Tensor) -> Tensor:
    """The top ``extra`` usable tokens by ``score`` (stable: ties to the lower index); with ``rebalance >= 0`` those
    whose index is below ``rebalance`` move ahead of the rest (each group keeping its order); the first ``select``.
    ``[B, select]``, ``-1`` where a sample has fewer usable tokens."""
    B, N = score.shape
    key = torch.nan_to_num(score.float(), nan=float("-inf")).masked_fill(~ok, float("-inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, : min(extra, N)]
    order = torch.where(ok.gather(1, order), order, -1)
    if rebalance >= 0:
        late = ((order >= rebalance) | (order < 0)).long()
        order = order.gather(1, torch.sort(late, dim=1, stable=True).indices)
    out = torch.full((B, select), -1, dtype=torch.int64, device=score.device)
    m = min(select, order.shape[1])
    out[:, :m] = order[:, :m]
    return out


def diversity_picks(P, hidden: Tensor, sim: Tensor, add: Tensor, k: int, seed: Tensor, ok: Tensor) -> Tensor:
    """``add[b]`` max-min diversity picks in order (``[B, k + 1]``, ``-1`` padded) seeded by ``seed`` (``[B, m]``,
    ``-1`` padded); a sample without a seed starts from its most isolated token, which counts as a pick (DivPrune's
    rule)."""
    seeded = (seed >= 0).any(dim=1)
    lead = torch.where(~seeded & (add > 0), most_isolated(sim, ok), -1).unsqueeze(1)
    more = (add - (lead[:, 0] >= 0).long()).clamp_min(0)
    picks = P.farthest_point_sample(hidden, torch.cat([seed, lead], 1), more, k, ok, sim)
    return torch.cat([lead, picks], dim=1)


def first_occurrences(x: Tensor) -> Tensor:
    """Each row of ``x`` (``-1`` padded) with repeated values dropped, first occurrences kept in order, ``-1`` padded
    at the end. A stable sort puts equal values side by side in position order, so a value equal to its left
    neighbour in sorted order is a repeat: O(T log T) per row, not the O(T^2) of comparing every pair."""
    B, T = x.shape
    if T == 0:
        return x
    vals, pos = torch.sort(x, dim=1, stable=True)
    repeat = torch.zeros_like(vals, dtype=torch.bool)
    repeat[:, 1:] = vals[:, 1:] == vals[:, :-1]
    dup = torch.zeros_like(repeat).scatter_(1, pos, repeat)
    keep = (x >= 0) & ~dup
    order = torch.sort((~keep).long(), dim=1, stable=True).indices
    return torch.where(keep.gather(1, order), x.gather(1, order), -1)


def _compose(P, hidden, attention, k, mode, n_div, n_attn, n_extra, rebalance, seed, valid):
    B, N, _ = hidden.shape
    dev = hidden.device
    if k == 0 or N == 0:
        return torch.empty(B, 0, dtype=torch.int64, device=dev)
    score = attention if attention.dim() == 2 else attention.mean(dim=1)  # [B, H, n]: heads averaged
    ok = usable(hidden, valid)
    if mode == "attn_only":
        return complete(attention_picks(score, k, n_extra, rebalance, ok), k, N)
    sim = P.gram(hidden)
    if mode == "attn_seeded":
        att = attention_picks(score, min(n_attn, k), min(n_attn, k), -1, ok)
        add = k - (att >= 0).sum(1)
        more = diversity_picks(P, hidden, sim, add, k, att, ok)
        return complete(first_occurrences(torch.cat([att, more], 1))[:, :k], k, N)
    # union
    none = torch.full((B, 1), -1, dtype=torch.int64, device=dev)
    div = diversity_picks(P, hidden, sim, torch.full((B,), min(n_div, k), device=dev), max(n_div, 1), none, ok)
    att = attention_picks(score, n_attn, n_extra, rebalance, ok)
    const = (seed.expand(B, -1) if seed is not None else none[:, :0])
    const = torch.where((const < N) & (const >= 0), const, -1)
    union = first_occurrences(torch.cat([att, const, div], 1))
    union = union[:, :k] if union.shape[1] >= k else torch.cat([union, none.expand(B, k - union.shape[1])], 1)
    add = k - (union >= 0).sum(1)
    more = diversity_picks(P, hidden, sim, add, k, union, ok)
    return complete(first_occurrences(torch.cat([union, more], 1))[:, :k], k, N)


def _prepare(hidden, attention, k, *, mode, n_div=0, n_attn=0, n_extra=0, rebalance=-1, seed=None, valid=None,
             backend="auto", data=True) -> Prepared:
    h, unbatched = checks.batched("hidden", hidden)
    B, N = h.shape[:2]
    checks.tensor("attention", attention)
    if attention.dim() == (2 if unbatched else 3) and attention.shape[-1] == N:  # per head: [B, H, n] / [H, n]
        if not attention.is_floating_point():
            raise TypeError(f"attention must be a floating-point tensor, got attention.dtype={attention.dtype}")
        checks.same_device("attention", attention, h)
        att = attention.reshape(B, -1, N).float().contiguous()
    else:
        att = checks.scores("attention", attention, B, N, unbatched, h)
    k = checks.budget("k", k, N, "n (the number of image tokens)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    n_div, n_attn, n_extra = (checks.as_int(nm, x) for nm, x in (("n_div", n_div), ("n_attn", n_attn),
                                                                  ("n_extra", n_extra)))
    rebalance = checks.as_int("rebalance", rebalance, minimum=-1)
    s = None
    if seed is not None:
        checks.tensor("seed", seed)
        if seed.dtype != torch.int64 or seed.dim() != 1:
            raise TypeError(f"seed must be a 1-D int64 tensor of token indices, got {seed.dtype} {tuple(seed.shape)}")
        checks.same_device("seed", seed, h)
        s = seed.unsqueeze(0)
    ok = None if valid is None else checks.mask("valid", valid, B, N, unbatched, h)
    inputs = dict(hidden=h, attention=att, k=k, mode=mode, n_div=n_div, n_attn=n_attn, n_extra=n_extra,
                  rebalance=rebalance, seed=s, valid=ok)
    return prepared(inputs, h, checks.backend_name(backend), unbatched, data)


def _fake(hidden, attention, k, mode, n_div, n_attn, n_extra, rebalance, seed, valid):
    return hidden.new_empty(hidden.shape[0], k, dtype=torch.int64)


BTP_STAGE = register(OpSpec(
    name="btp_stage",
    schema="(Tensor hidden, Tensor attention, int k, *, str mode, int n_div=0, int n_attn=0, int n_extra=0, "
           "int rebalance=-1, Tensor? seed=None, Tensor? valid=None, str backend=\"auto\") -> Tensor",
    prepare=_prepare, compose=_compose, fake=_fake, budget=lambda k: {"k": k},
    doc="BTP: one stage of balanced multi-stage pruning (diversity + rebalanced attention + spatial seed)",
))


def btp_stage(
    hidden: Tensor,
    attention: Tensor,
    k: int,
    *,
    mode: str,
    n_div: int = 0,
    n_attn: int = 0,
    n_extra: int = 0,
    rebalance: int | None = None,
    seed: Tensor | None = None,
    valid: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """One BTP stage (contract §3.5): ``k`` sorted indices into the ``n`` current image tokens. ``hidden`` ``[B, n, d]``
    (hidden states entering the pruning layer), ``attention`` ``[B, n]`` or ``[B, H, n]`` (the last prompt token's
    attention at the layer before; heads are averaged), ``mode`` in ``MODES``, ``rebalance`` (None: off) the index
    below which attention candidates go first, ``seed`` a constant set of indices (the spatial seed) for ``union``."""
    checks.door(hidden=hidden, seed=seed, valid=valid)
    checks.tensor("attention", attention)
    out: Tensor = torch.ops.mob.btp_stage(
        hidden, attention, checks.as_int("k", k), mode=mode, n_div=checks.as_int("n_div", n_div),
        n_attn=checks.as_int("n_attn", n_attn), n_extra=checks.as_int("n_extra", n_extra),
        rebalance=-1 if rebalance is None else checks.as_int("rebalance", rebalance), seed=seed, valid=valid,
        backend=checks.backend_name(backend),
    )
    return out


def btp_stage_as_released(
    hidden: Tensor,
    attention: Tensor,
    k: int,
    *,
    mode: str,
    model: str = "llava",
    n_div: int = 0,
    n_attn: int = 0,
    n_extra: int = 0,
    rebalance: int | None = None,
    seed: Tensor | None = None,
) -> Tensor:
    """One BTP stage on one sample (``hidden`` ``[n, d]``, ``attention`` ``[n]`` or ``[H, n]``) as the released code
    computes it, bugs included, for A/B comparison with ``btp_stage``: the sorted kept indices, which may hold more
    than ``k`` entries or repeat one (plain torch, reference arithmetic; not an op).

    * ``union`` with a spatial ``seed`` (LLaVA stage 1): the union is deduplicated but never cut to ``k`` (it can reach
      ``n_attn + |seed| + n_div``);
    * ``union`` without one (LLaVA stage 2): the released code puts 0-d tensors and ints in one Python set, which does
      not deduplicate them, so a token chosen by both attention and diversity is kept twice and the top-up adds
      ``k - n_attn - n_div`` tokens;
    * ``attn_only`` with ``model="qwen2_5_vl"``: when more than ``k`` of the top ``n_extra`` candidates lie below the
      rebalancing index, all of them are kept."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got mode={mode!r}")
    if model not in ("llava", "qwen2_5_vl"):
        raise ValueError(f"model must be 'llava' or 'qwen2_5_vl', got model={model!r}")
    h = checks.features("hidden", hidden)
    if h.dim() != 2:
        raise ValueError(f"hidden must be one sample [n, d], got hidden.shape={tuple(h.shape)}")
    from ..backends.reference import ReferenceBackend as P

    n = h.shape[0]
    hb = h.unsqueeze(0)
    score = (attention if attention.dim() == 1 else attention.float().mean(0)).unsqueeze(0)
    ok = usable(hb, None)
    thr = -1 if rebalance is None else rebalance
    if mode == "attn_only":
        cand = attention_picks(score, n_extra, n_extra, thr, ok)[0]
        cand = cand[cand >= 0]
        if model == "qwen2_5_vl" and thr >= 0 and int((cand < thr).sum()) >= k:
            out = cand[cand < thr]  # every early candidate, however many
        else:
            out = cand[:k]
        return torch.sort(out).values
    sim = P.gram(hb)
    none = torch.full((1, 1), -1, dtype=torch.int64, device=h.device)

    def top_up(keep: Tensor, add: int) -> Tensor:
        more = diversity_picks(P, hb, sim, torch.tensor([add], device=h.device), max(add, 1), keep.unsqueeze(0), ok)
        return torch.cat([keep, more[0][more[0] >= 0]])

    if mode == "attn_seeded":
        top = torch.sort(torch.nan_to_num(score[0].float(), nan=float("-inf")), descending=True, stable=True)
        return torch.sort(top_up(top.indices[:n_attn], max(k - n_attn, 0))).values
    div = diversity_picks(P, hb, sim, torch.tensor([min(n_div, n)], device=h.device), max(n_div, 1), none, ok)[0]
    div = div[div >= 0]
    att = attention_picks(score, n_attn, n_extra, thr, ok)[0]
    att = att[att >= 0]
    if seed is not None:
        union = torch.unique(torch.cat([att, seed.to(h.device), div]))
    else:  # the set of ints and 0-d tensors: attention deduplicated, diversity appended as is
        union = torch.cat([torch.unique(att), div])
    if union.numel() < k:
        union = top_up(union, k - union.numel())
    return torch.sort(union).values
