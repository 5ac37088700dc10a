"""The methods that read the model: D2Pruner (contract §3.4) and one BTP stage (contract §3.5), on every backend.

Their greedy certificates are checked as properties; every backend must return the reference's result wherever the
decisions have margins (distinct importance values, every candidate pair's cosine at least 1e-4 away from the edge
thresholds); the released BTP behaviour (``btp_stage_as_released``) is reproduced where it differs.
"""

from __future__ import annotations

import math

import pytest
import torch

import mob_kernels
from mob_kernels.methods.btp import SCHEDULES, btp_stage_as_released, first_occurrences, spatial_seed
from mob_kernels.methods.d2pruner import ROLE_FILL, ROLE_MIS, ROLE_PAD, ROLE_PIVOT, edge_thresholds, square_grid
from mob_testing import WELL_CONDITIONED, assert_valid, gaussian, target_id, targets

TARGETS = targets()

# ------------------------------------------------------------------------------------------------------ D2Pruner


def _cos64(vis):
    v = vis.double()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return v @ v.transpose(-1, -2)


def _d2_inputs(B=2, N=36, d=6, seed=0):
    """Low-dimensional features (so similar pairs exist and the graph has edges) with distinct importance values
    whose pairwise cosines all keep a margin from the thresholds used below."""
    for s in range(seed, seed + 60):
        vis = gaussian((B, N, d), torch.float32, s)
        imp = torch.randperm(B * N, generator=torch.Generator().manual_seed(s)).view(B, N).float() / (B * N) + 0.01
        cos = _cos64(vis)
        ok = all((cos - t).abs().min() >= WELL_CONDITIONED for t in (0.8, 0.6, 0.5))
        if ok:
            return vis, imp
    raise AssertionError("no well-conditioned D2Pruner input")


def _adjacent(cos, grid, i, j, near, far, radius=1):
    close = grid is not None and int(grid[i, 0]) == int(grid[j, 0]) and max(
        abs(int(grid[i, 1]) - int(grid[j, 1])), abs(int(grid[i, 2]) - int(grid[j, 2]))) <= radius
    return float(cos[i, j]) > (near if close else far)


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("k", [1, 8, 20, 36])
def test_d2pruner_certificates(target, alpha, k):
    vis, imp = _d2_inputs()
    bias = torch.linspace(0.5, 1.5, 36)
    keep, role = mob_kernels.d2pruner(vis.to(target[1]), imp.to(target[1]), k, bias=bias.to(target[1]),
                                      alpha=alpha, backend=target[0])
    keep, role = keep.cpu(), role.cpu()
    assert_valid(keep, 2, 36, k)
    score = imp / (bias + 1e-7)
    near, far = edge_thresholds(0.8, alpha)
    grid = square_grid(36, torch.device("cpu")) if alpha < 1 else None
    for b in range(2):
        cos = _cos64(vis[b])
        got = dict(zip(keep[b].tolist(), role[b].tolist()))
        order = torch.sort(score[b], descending=True, stable=True).indices.tolist()
        n_p = math.floor(0.7 * k + 1e-6)
        assert {i for i, r in got.items() if r == ROLE_PIVOT} == set(order[:n_p])  # (1) pivots: top n_p
        rest = order[n_p:]
        mis = [i for i in rest if got.get(i) == ROLE_MIS]
        for x in range(len(mis)):  # (2) no two MIS picks adjacent
            for y in range(x):
                assert not _adjacent(cos, grid, mis[x], mis[y], near, far)
        if mis:  # (3) every candidate ranked above the last MIS pick is picked or adjacent to an earlier pick
            for i in rest[: rest.index(mis[-1])]:
                earlier = [m for m in mis if rest.index(m) < rest.index(i)]
                assert i in mis or any(_adjacent(cos, grid, i, m, near, far) for m in earlier)
        fill = [i for i, r in got.items() if r == ROLE_FILL]
        left = [i for i in rest if i not in mis]
        assert sorted(fill) == sorted(left[: len(fill)])  # (4) fill: the most important leftovers
        assert ROLE_PAD not in got.values()


@pytest.mark.parametrize("target", [t for t in TARGETS if t[0] != "reference"], ids=target_id)
@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_d2pruner_matches_reference(target, alpha):
    vis, imp = _d2_inputs(seed=5)
    valid = torch.ones(2, 36, dtype=torch.bool)
    valid[1, ::5] = False
    want = mob_kernels.d2pruner(vis, imp, 12, alpha=alpha, valid=valid, backend="reference")
    got = mob_kernels.d2pruner(vis.to(target[1]), imp.to(target[1]), 12, alpha=alpha, valid=valid.to(target[1]),
                               backend=target[0])
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


def test_d2pruner_edge_rule():
    """alpha * cos + (1 - alpha) * [neighbour] > tau: at alpha = 1 the graph is cos > 0.8; at 0.5 only spatial
    neighbours with cos > 0.6 are joined; at 0 only neighbours, whatever the cosine."""
    assert edge_thresholds(0.8, 1.0) == (pytest.approx(0.8), pytest.approx(0.8))
    assert edge_thresholds(0.8, 0.5) == (pytest.approx(0.6), pytest.approx(1.6))
    assert edge_thresholds(0.8, 0.0) == (-math.inf, math.inf)
    # Two identical tokens far apart on the grid: adjacent at alpha = 1, not at alpha = 0.5.
    vis = gaussian((1, 16, 4), torch.float32, 1)
    vis[0, 15] = vis[0, 0]
    imp = torch.linspace(1.0, 0.1, 16).unsqueeze(0)
    imp[0, 15] = 0.95  # token 15 ranks right after token 0
    keep1, role1 = mob_kernels.d2pruner(vis, imp, 4, pivot_ratio=0.0, alpha=1.0, backend="reference")
    keep5, role5 = mob_kernels.d2pruner(vis, imp, 4, pivot_ratio=0.0, alpha=0.5, backend="reference")
    assert 15 not in keep1[0].tolist()
    assert 15 in keep5[0].tolist()


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_d2pruner_degenerate_inputs(target):
    vis, imp = _d2_inputs()
    vis[0, :10] = float("nan")
    imp[1, 3] = float("nan")
    for k in (0, 1, 30, 36):
        keep, role = mob_kernels.d2pruner(vis.to(target[1]), imp.to(target[1]), k, backend=target[0])
        assert_valid(keep.cpu(), 2, 36, k)
        if k == 36:  # the 10 unusable tokens of sample 0 are the padding
            assert int((role[0] == ROLE_PAD).sum()) == 10
    # one image, all importance equal: index order decides
    keep, role = mob_kernels.d2pruner(vis[1].to(target[1]), torch.ones(36).to(target[1]), 5, backend=target[0])
    assert keep.shape == (5,) and role.shape == (5,)


def test_d2pruner_bias_and_grid_shapes():
    vis, imp = _d2_inputs()
    a = mob_kernels.d2pruner(vis, imp, 8, bias=torch.full((36,), 2.0), backend="reference")
    b = mob_kernels.d2pruner(vis, imp, 8, backend="reference")  # a constant bias changes no ranking
    assert torch.equal(a[0], b[0])
    grid = square_grid(36, torch.device("cpu"))
    c = mob_kernels.d2pruner(vis, imp, 8, grid=grid, alpha=0.5, backend="reference")
    d = mob_kernels.d2pruner(vis, imp, 8, alpha=0.5, backend="reference")  # the default square grid is the same
    assert torch.equal(c[0], d[0])
    with pytest.raises(ValueError, match="grid"):
        mob_kernels.d2pruner(vis[:, :35], imp[:, :35], 8, alpha=0.5)
    with pytest.raises(ValueError, match="grid"):
        mob_kernels.d2pruner(vis, imp, 8, grid=grid[:30], alpha=0.5)
    with pytest.raises(TypeError, match="grid"):
        mob_kernels.d2pruner(vis, imp, 8, grid=grid.int(), alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        mob_kernels.d2pruner(vis, imp, 8, alpha=1.5)
    with pytest.raises(ValueError, match="bias"):
        mob_kernels.d2pruner(vis, imp, 8, bias=torch.ones(35))
    with pytest.raises(TypeError, match="importance"):
        mob_kernels.d2pruner(vis, [1.0] * 36, 8)


# ----------------------------------------------------------------------------------------------------------- BTP

# The released code's spatial seed for LLaVA-1.5 (24 x 24 grid, 144 cells), sorted.
SPATIAL_144 = [
    0, 2, 4, 6, 9, 11, 14, 17, 20, 23, 25, 29, 32, 36, 39, 42, 45, 48, 51, 55, 58, 62, 64, 67, 70, 73, 77, 80, 83, 85,
    89, 92, 95, 98, 100, 102, 105, 108, 111, 114, 118, 120, 123, 127, 131, 133, 136, 139, 141, 145, 149, 152, 154,
    158, 161, 164, 167, 168, 171, 175, 177, 180, 183, 186, 189, 194, 196, 198, 202, 205, 208, 211, 214, 216, 219, 221,
    224, 227, 230, 233, 237, 239, 241, 244, 247, 250, 252, 255, 259, 262, 266, 270, 273, 277, 280, 284, 288, 291, 295,
    299, 302, 306, 311, 314, 317, 320, 324, 328, 331, 333, 337, 339, 346, 350, 364, 368, 372, 380, 383, 386, 399, 419,
    425, 432, 438, 451, 454, 470, 483, 489, 492, 496, 501, 505, 510, 523, 536, 543, 552, 557, 564, 569, 572, 575,
]


def test_spatial_seed_is_the_released_constant():
    seed = spatial_seed(24, 24, 144)
    assert sorted(seed.tolist()) == SPATIAL_144
    assert seed[:6].tolist() == [0, 575, 23, 299, 552, 36]
    # Manhattan covering radius 2: every cell within distance 2 of a seed
    r, c = torch.arange(576) // 24, torch.arange(576) % 24
    d = ((r[:, None] - r[seed][None]).abs() + (c[:, None] - c[seed][None]).abs()).amin(1)
    assert int(d.max()) == 2


def _btp_inputs(B=2, n=64, d=12, heads=4, seed=0):
    hidden = gaussian((B, n, d), torch.float32, seed)
    att = torch.rand(B, heads, n, generator=torch.Generator().manual_seed(seed))
    return hidden, att


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_btp_stage_modes(target):
    hidden, att = _btp_inputs()
    run = lambda **kw: mob_kernels.btp_stage(hidden.to(target[1]), att.to(target[1]), backend=target[0], **kw).cpu()  # noqa: E731
    mean = att.mean(1)
    # attn_only: the top n_extra by head-mean attention, those below the rebalancing index first, cut to k
    got = run(k=6, mode="attn_only", n_extra=10, rebalance=20)
    for b in range(2):
        cand = torch.sort(mean[b], descending=True, stable=True).indices[:10].tolist()
        ordered = [i for i in cand if i < 20] + [i for i in cand if i >= 20]
        assert got[b].tolist() == sorted(ordered[:6])
    # attn_seeded: the top n_attn, then diversity up to k
    got = run(k=16, mode="attn_seeded", n_attn=5)
    assert_valid(got, 2, 64, 16)
    for b in range(2):
        assert set(torch.sort(mean[b], descending=True, stable=True).indices[:5].tolist()) <= set(got[b].tolist())
    # union: attention picks and the seed always kept when they fit
    seed = spatial_seed(8, 8, 16)
    got = run(k=32, mode="union", n_div=9, n_attn=9, n_extra=35, rebalance=32, seed=seed)
    assert_valid(got, 2, 64, 32)
    for b in range(2):
        assert set(seed.tolist()) <= set(got[b].tolist())


@pytest.mark.parametrize("target", [t for t in TARGETS if t[0] != "reference"], ids=target_id)
@pytest.mark.parametrize("mode", ["union", "attn_seeded", "attn_only"])
def test_btp_stage_matches_reference(target, mode):
    hidden, att = _btp_inputs(d=32, seed=3)
    kw = dict(k=24, mode=mode, n_div=6, n_attn=8, n_extra=30, rebalance=24, seed=spatial_seed(8, 8, 8))
    want = mob_kernels.btp_stage(hidden, att, backend="reference", **kw)
    got = mob_kernels.btp_stage(hidden.to(target[1]), att.to(target[1]), backend=target[0],
                                **{**kw, "seed": kw["seed"].to(target[1])})
    assert torch.equal(got.cpu(), want)


def test_btp_union_is_cut_to_k_where_the_released_code_keeps_all():
    """Attention picks, seed and diversity picks that are disjoint and more than k together: the op keeps the first k
    in priority order, the released code keeps all of them."""
    hidden, att = _btp_inputs(B=1, n=64, d=16, heads=1, seed=1)
    att = torch.zeros(1, 1, 64)
    att[0, 0, 56:64] = torch.linspace(1.0, 0.5, 8)  # attention: 56..63
    seed = torch.arange(16, 24)  # a constant seed: 16..23
    kw = dict(mode="union", n_div=8, n_attn=8, n_extra=8)
    released = btp_stage_as_released(hidden[0], att[0], 20, seed=seed, **kw)
    fixed = mob_kernels.btp_stage(hidden, att, 20, seed=seed, backend="reference", **kw)[0]
    assert released.numel() > 20 and released.unique().numel() == released.numel()
    assert fixed.numel() == 20 and set(range(56, 64)) | set(range(16, 24)) <= set(fixed.tolist())


def test_btp_union_deduplicates_where_the_released_code_repeats():
    hidden, att = _btp_inputs(B=1, n=64, d=16, heads=1, seed=2)
    kw = dict(mode="union", n_div=10, n_attn=30, n_extra=40)
    released = btp_stage_as_released(hidden[0], att[0], 44, **kw)
    fixed = mob_kernels.btp_stage(hidden, att, 44, backend="reference", **kw)[0]
    assert released.numel() == 44 and released.unique().numel() < 44  # a token chosen twice
    assert fixed.unique().numel() == 44


def test_btp_qwen_third_stage_keeps_exactly_k():
    hidden, _ = _btp_inputs(B=1, n=40, d=8, heads=1)
    att = torch.linspace(1.0, 0.0, 40).view(1, 1, 40)  # the early tokens are the most attended
    released = btp_stage_as_released(hidden[0], att[0], 10, mode="attn_only", model="qwen2_5_vl", n_extra=12,
                                     rebalance=10)
    fixed = mob_kernels.btp_stage(hidden, att, 10, mode="attn_only", n_extra=12, rebalance=10, backend="reference")
    assert released.numel() == 10  # top 12 are 0..11: only 10 lie below 10, so no overflow here
    att2 = torch.zeros(1, 1, 40)
    att2[0, 0, :12] = torch.linspace(1.0, 0.5, 12)
    released = btp_stage_as_released(hidden[0], att2[0], 10, mode="attn_only", model="qwen2_5_vl", n_extra=12,
                                      rebalance=11)
    assert released.numel() == 11  # all 11 early candidates kept
    assert fixed.shape == (1, 10)


def test_btp_schedules_are_the_released_plans():
    llava = SCHEDULES["llava"]
    assert [s["layer"] for s in llava] == [4, 7, 15, 23] and [s["keep"] for s in llava] == [288, 144, 48, 0]
    assert [s["layer"] for s in SCHEDULES["qwen2_5_vl"]] == [4, 7, 16, 23]


def test_first_occurrences():
    x = torch.tensor([[3, 1, 3, -1, 2, 1], [-1, -1, 5, 5, 5, 0]])
    assert first_occurrences(x).tolist() == [[3, 1, 2, -1, -1, -1], [5, 0, -1, -1, -1, -1]]


def test_btp_errors():
    hidden, att = _btp_inputs()
    with pytest.raises(ValueError, match="mode"):
        mob_kernels.btp_stage(hidden, att, 8, mode="fastv")
    with pytest.raises(ValueError, match="k"):
        mob_kernels.btp_stage(hidden, att, 65, mode="attn_only")
    with pytest.raises(ValueError, match="attention"):
        mob_kernels.btp_stage(hidden, att[:, :, :60], 8, mode="attn_only")
    with pytest.raises(TypeError, match="seed"):
        mob_kernels.btp_stage(hidden, att, 8, mode="union", seed=torch.arange(4).int())
    with pytest.raises(ValueError, match="rebalance"):
        mob_kernels.btp_stage(hidden, att, 8, mode="attn_only", rebalance=-3)


@pytest.mark.parametrize("op", ["d2pruner", "btp_stage"])
def test_opcheck_and_compile(op):
    vis, imp = _d2_inputs()
    hidden, att = _btp_inputs()
    if op == "d2pruner":  # 16 tokens: the reference's independent set walks every candidate in a Python loop
        vis, imp = vis[:, :16].contiguous(), imp[:, :16].contiguous()
        samples = [((vis, imp, 6), dict(alpha=0.5)), ((vis[0], imp[0], 3), dict(bias=torch.ones(16)))]
    else:
        samples = [((hidden, att, 16), dict(mode="union", n_div=4, n_attn=4, n_extra=8, seed=torch.arange(4))),
                   ((hidden[0], att[0].mean(0), 6), dict(mode="attn_only", n_extra=9, rebalance=6))]
    for args, kwargs in samples:
        torch.library.opcheck(getattr(torch.ops.mob, op).default, args, kwargs)
    fn = (lambda v, a: mob_kernels.d2pruner(v, a, 8)[0]) if op == "d2pruner" else \
        (lambda v, a: mob_kernels.btp_stage(v, a, 16, mode="attn_seeded", n_attn=4))
    x, y = (vis, imp) if op == "d2pruner" else (hidden, att)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, y), fn(x, y))
