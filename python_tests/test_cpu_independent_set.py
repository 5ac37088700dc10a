"""The C++ CPU backend's ``independent_set`` (contract §3.4.1) on every instruction-set path this CPU runs.

* Against the reference: the same picks wherever every candidate pair's cosine (float64, on the rounded tensor) is at
  least ``WELL_CONDITIONED`` away from ``near`` and ``far``, for float32, float16 and bfloat16, with and without a grid,
  several radii, D2Pruner's thresholds for alpha 1.0, 0.5 and 0.0, pick budgets of 0, a few and more than the graph
  allows, samples without candidates, NaN rows; and ``mob_kernels.d2pruner`` on ``backend="cpu"`` against
  ``"reference"``.
* On any input, well-conditioned or not: the same picks as the reference's walk run over ``gram_cpu``'s matrix. The
  kernel never builds that matrix but computes every similarity it uses the same way (and decides some pairs without
  one only where that is exact), so this holds bit for bit, NaN, infinite, zero, tiny and huge rows included, in the
  batched dense walk, the sparse one and with threads inside one sample or across samples.
* The extension's entry point rejects null buffers and impossible sizes with ValueError before touching memory.
"""

from __future__ import annotations

import math

import pytest
import torch

import mob_kernels
from mob_kernels.backends.reference import ReferenceBackend as R
from mob_kernels.methods.d2pruner import edge_thresholds, square_grid
from mob_testing import DTYPES, WELL_CONDITIONED, backends, gaussian, random_ranks, token_grid

pytestmark = pytest.mark.skipif("cpu" not in backends(), reason="the C++ extension is not built")

if "cpu" in backends():
    from mob_kernels import _C
    from mob_kernels.backends.cpu import CpuBackend as C

    ISAS = _C.supported_dot_isas()
else:  # collected but skipped
    ISAS = ["portable"]

INF = float("inf")
ALPHAS = (1.0, 0.5, 0.0)


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test on one dot-product path, restoring the process's choice afterwards."""
    before = _C.dot_isa()
    assert _C.set_dot_isa(request.param) == request.param
    yield request.param
    _C.set_dot_isa(before)


@pytest.fixture
def gram_walk(monkeypatch):
    """The reference's walk reading ``gram_cpu``'s similarities: what the kernel must return on any input."""
    monkeypatch.setattr(R, "gram", staticmethod(C.gram))
    return R.independent_set


# ----------------------------------------------------------------------------------------------------------- inputs


def _cos64(vis):
    v = vis.double()
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)
    return v @ v.transpose(-1, -2)


def _margin(vis, thresholds):
    """The smallest |cos - t| over pairs i != j of finite rows and the finite thresholds t."""
    cos = _cos64(vis)
    N = vis.shape[-2]
    keep = ~torch.eye(N, dtype=torch.bool) & cos.isfinite()
    gaps = [(cos - t).abs()[keep.expand_as(cos)] for t in thresholds if math.isfinite(t)]
    return min((float(g.min()) for g in gaps if g.numel()), default=INF)


def _well_conditioned(B, N, d, dtype, near, far, seed=0):
    for s in range(seed, seed + 80):
        vis = gaussian((B, N, d), dtype, s)
        if _margin(vis, (near, far)) >= WELL_CONDITIONED:
            return vis
    raise AssertionError("no well-conditioned independent-set input")


# ------------------------------------------------------------------------------------------- against the reference

CASES = [  # (alpha or (near, far), grid kind, radius)
    (1.0, "none", 1),
    (0.5, "square", 1),
    (0.5, "square", 2),
    (0.0, "square", 1),
    (0.5, "tiles", 0),
    (0.0, "tiles", 2),
    ((0.3, 0.7), "square", 1),  # dense walk with a grid: both thresholds need the cosine
    ((0.7, 0.3), "tiles", 1),
]


def _thresholds(spec):
    return edge_thresholds(0.8, spec) if isinstance(spec, float) else spec


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spec,kind,radius", CASES, ids=lambda x: str(x))
def test_matches_reference(isa, dtype, spec, kind, radius):
    near, far = _thresholds(spec)
    B, N, d = 6, 49, 6  # low dimension: similar pairs exist, so the graph has edges
    vis = _well_conditioned(B, N, d, dtype, near, far, seed=B * N + radius)
    grid = token_grid(B, N, kind, seed=radius)
    rank = random_ranks(B, N, seed=d)
    rank[4] = -1  # a sample without candidates
    rank[5, 10:] = -1  # a few candidates only
    for k, num_picks in [(N, [0, 3, N, N, 5, N]), (12, [12, 40, 1, 7, 12, 12]), (0, [0, 1, 2, 3, 4, 5])]:
        num_picks = torch.tensor(num_picks)
        want = R.independent_set(vis, rank, num_picks, k, near, far, grid, radius)
        got = C.independent_set(vis, rank, num_picks, k, near, far, grid, radius)
        assert torch.equal(got, want), (k, num_picks, got, want)
    assert int((want[0] >= 0).sum()) == 0  # num_picks 0


@pytest.mark.parametrize("alpha", ALPHAS)
def test_nan_rows_make_no_edges(isa, alpha):
    near, far = edge_thresholds(0.8, alpha)
    B, N, d = 2, 36, 5
    vis = _well_conditioned(B, N, d, torch.float32, near, far, seed=3)
    vis[0, ::4] = float("nan")
    vis[1, 1::5, 2] = float("nan")
    vis[1, 2::7, 0] = INF
    grid = token_grid(B, N, "square")
    rank = random_ranks(B, N, seed=1, drop=0.1)
    num_picks = torch.tensor([N, N])
    want = R.independent_set(vis, rank, num_picks, N, near, far, grid, 1)
    got = C.independent_set(vis, rank, num_picks, N, near, far, grid, 1)
    assert torch.equal(got, want)
    bad = ~vis.isfinite().all(-1)
    for b in range(B):  # every non-finite candidate is picked: nothing is adjacent to it
        picked = set(got[b][got[b] >= 0].tolist())
        assert {i for i in range(N) if bad[b, i] and rank[b, i] >= 0} <= picked


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_d2pruner_cpu_equals_reference(isa, dtype, alpha):
    near, far = edge_thresholds(0.8, alpha)
    B, N, d = 3, 64, 8
    vis = _well_conditioned(B, N, d, dtype, near, far, seed=11)
    g = torch.Generator().manual_seed(5)
    imp = torch.randperm(B * N, generator=g).view(B, N).float() / (B * N) + 0.01  # distinct importance values
    valid = torch.rand(B, N, generator=g) > 0.1
    for k in (1, 9, 24, N):
        for pivot_ratio in (0.7, 0.0):
            want = mob_kernels.d2pruner(vis, imp, k, alpha=alpha, valid=valid, pivot_ratio=pivot_ratio,
                                        backend="reference")
            got = mob_kernels.d2pruner(vis, imp, k, alpha=alpha, valid=valid, pivot_ratio=pivot_ratio, backend="cpu")
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (k, pivot_ratio)


# --------------------------------------------------------------------------------- against gram_cpu, on any input


def _adversarial(B, N, d, seed):
    """Low-dimensional features with duplicated, negated, zero, tiny, huge, NaN and infinite rows."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.randn(B, N, d, generator=g)
    vis[:, 1] = vis[:, 0]
    vis[:, 2] = -vis[:, 0]
    vis[:, 3] = 0.0
    vis[:, 4] *= 1e-30  # norm below eps: the cosine is scaled down, not normalised
    vis[:, 5] *= 1e-13
    vis[:, 6] *= 1e18  # norm above 2^60: never decided without its product
    vis[:, 7] *= 1e30  # squared norm overflows: NaN similarities
    vis[:, 8, 0] = float("nan")
    vis[:, 9, -1] = -INF
    vis[:, 10] = vis[:, 6] * 0.5
    return vis


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 2, 3, 17])
def test_matches_gram_walk_on_any_input(isa, gram_walk, dtype, d):
    B, N = 3, 36
    vis = _adversarial(B, N, d, seed=d).to(dtype)
    bound = 1 + 4 * (d + 8) * 2.0**-24  # where the kernel starts deciding pairs of safe rows without a product
    thresholds = [edge_thresholds(0.8, a) for a in ALPHAS] + [
        (1.0, 1.0), (-1.0, 0.0), (0.0, -INF), (bound, bound), (-bound, 1.1), (-1.1, bound * 1.0000001), (INF, -INF),
        (float("nan"), 0.5), (0.5, float("nan")),
    ]
    for kind, radius in [("none", 1), ("tiles", 1), ("tiles", 3), ("square", 0)]:
        grid = token_grid(B, N, kind, seed=radius)
        for t, (near, far) in enumerate(thresholds):
            rank = random_ranks(B, N, seed=t, drop=0.1)
            num_picks = torch.tensor([N, 4, N // 2])
            want = gram_walk(vis, rank, num_picks, N, near, far, grid, radius)
            got = C.independent_set(vis, rank, num_picks, N, near, far, grid, radius)
            assert torch.equal(got, want), (kind, radius, near, far, got, want)


def _clustered(B, N, d, dtype, seed):
    """Tokens around a few centres: many edges at cosine thresholds around 0.5, so batches lose members."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(B, 12, d, generator=g)
    which = torch.randint(0, 12, (B, N), generator=g)
    vis = centres.gather(1, which.unsqueeze(-1).expand(B, N, d)) + 0.9 * torch.randn(B, N, d, generator=g)
    return vis.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])  # threads inside the one sample; threads across samples
def test_large_walks_match_gram_walk(isa, gram_walk, dtype, B):
    N, d = 700, 160
    vis = _clustered(B, N, d, dtype, seed=B)
    rank = random_ranks(B, N, seed=2, drop=0.05, ties=False)
    grid = token_grid(B, N, "tiles", seed=4)
    for near, far, limit in [(0.5, 0.5, N), (0.45, 0.6, 200), (0.5, 1.6, N), (-INF, INF, N), (0.7, 0.4, 30)]:
        num_picks = torch.full((B,), limit)
        want = gram_walk(vis, rank, num_picks, N, near, far, grid, 2)
        got = C.independent_set(vis, rank, num_picks, N, near, far, grid, 2)
        assert torch.equal(got, want), (near, far, limit)
        assert int((got >= 0).sum(1).min()) > 0


def test_grid_views_and_dtypes_are_read_in_place_or_converted():
    B, N, d = 2, 25, 4
    vis = gaussian((B, N, d), torch.float32, 9)
    rank = random_ranks(B, N, seed=3, drop=0.0)
    num_picks = torch.tensor([N, N])
    near, far = edge_thresholds(0.8, 0.5)
    shared = square_grid(N, torch.device("cpu"))
    want = C.independent_set(vis, rank, num_picks, N, near, far, shared.expand(B, N, 3).contiguous(), 1)
    assert torch.equal(C.independent_set(vis, rank, num_picks, N, near, far, shared.expand(B, N, 3), 1), want)
    assert torch.equal(C.independent_set(vis, rank, num_picks, N, near, far, shared.int().expand(B, N, 3), 1), want)
    strided = torch.zeros(B, N, 6, dtype=torch.int64)
    strided[..., ::2] = shared  # unit stride lost along the last axis
    assert torch.equal(C.independent_set(vis, rank, num_picks, N, near, far, strided[..., ::2], 1), want)
    # strided features (a view of every other token) are read in place
    wide = gaussian((B, 2 * N, d), torch.float32, 9)
    assert torch.equal(C.independent_set(wide[:, ::2], rank, num_picks, N, near, far, None, 1),
                       R.independent_set(wide[:, ::2].contiguous(), rank, num_picks, N, near, far, None, 1))


# ------------------------------------------------------------------------------- the extension's entry point


def _call(ptr, B=1, N=6, d=4, k=3, dtype=0, grid=0):
    return _C.independent_set_cpu(B, N, d, dtype, ptr("vis"), N * d, d, ptr("rank"), ptr("num_picks"), k, 0.5, 0.5,
                                  grid, N * 3, 3, 1, ptr("out"))


def test_entry_point_rejects_each_null_buffer():
    store = {
        "vis": torch.randn(64),
        "rank": torch.arange(64),
        "num_picks": torch.full((64,), 3),
        "out": torch.zeros(64, dtype=torch.int64),
        "grid": torch.zeros(64, dtype=torch.int64),
    }
    _call(lambda name: store[name].data_ptr())  # every buffer present, no grid: runs
    assert store["out"][0] == 0 and ((store["out"][:3] >= -1) & (store["out"][:3] < 6)).all()
    _call(lambda name: store[name].data_ptr(), grid=store["grid"].data_ptr())
    for missing in ("vis", "rank", "num_picks", "out"):
        store["out"].fill_(-7)
        with pytest.raises(ValueError, match=f"{missing} must not be a null pointer"):
            _call(lambda name, m=missing: 0 if name == m else store[name].data_ptr())
        assert bool((store["out"] == -7).all())  # raised before anything was written
    _call(lambda name: 0, B=0)  # nothing to read or write: null buffers are fine


@pytest.mark.parametrize(
    "args,words",
    [
        (dict(k=7), "k must be in"),
        (dict(k=-1), "k must be in"),
        (dict(B=-1), "sizes"),
        (dict(B=1 << 20, N=1 << 30, d=1 << 20), "overflow"),
        (dict(dtype=3), "dtype"),
    ],
)
def test_entry_point_rejects_impossible_sizes_before_touching_memory(args, words):
    with pytest.raises(ValueError, match=words):
        _call(lambda name: 0, **args)
