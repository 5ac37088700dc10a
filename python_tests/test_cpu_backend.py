"""The C++ CPU backend's primitives against the reference backend, on every instruction-set path this CPU runs.

* Exactness where it is fair: ``gram`` within float32 rounding and exactly symmetric; ``farthest_point_sample`` reading
  a given Gram matrix is the reference's bit for bit on any input (both read the same similarities); computing
  distances, and ``dpp_greedy``, give the reference's indices wherever a float64 replay shows every decision winning
  by ``WELL_CONDITIONED`` (1e-4).
* Self-consistency that holds bit for bit on any input: the lazy DPP loop and the eager one; the fused ``divprune``
  and its composition over this backend's primitives; FPS reading ``gram_cpu``'s matrix and computing distances.
* Validity on adversarial inputs (NaN, zero and duplicated rows, nothing valid); the extension's entry points reject
  null buffers and impossible sizes with ValueError before touching memory.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys

import pytest
import torch

from mob_kernels.backends.reference import DPP_STOP, ReferenceBackend as R
from mob_testing import DTYPES, WELL_CONDITIONED, backends, dpp_replay

pytestmark = pytest.mark.skipif("cpu" not in backends(), reason="the C++ extension is not built")

if "cpu" in backends():
    from mob_kernels import _C
    from mob_kernels.backends.cpu import DTYPE_TAG, CpuBackend as C, _features

    ISAS = _C.supported_dot_isas()
else:  # collected but skipped
    ISAS = ["portable"]

INF = float("inf")


@pytest.fixture(params=ISAS)
def isa(request):
    """Runs the test on one dot-product path, restoring the process's choice afterwards."""
    before = _C.dot_isa()
    assert _C.set_dot_isa(request.param) == request.param
    yield request.param
    _C.set_dot_isa(before)


def _features_of(B, N, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, d, generator=g).to(dtype)


def _unit64(x):
    x = x.double()
    n = torch.linalg.vector_norm(x, dim=-1)
    return x / n.clamp_min(1e-12).unsqueeze(-1), n


# ------------------------------------------------------------------------------------------------- float64 replays


def _fps_replay(vis, seeds, num_picks, k, valid):
    """The reference FPS on one sample in float64: (picks, smallest margin of any decision)."""
    N = vis.shape[0]
    v_hat, norm = _unit64(vis)
    dist = 1.0 - v_hat @ v_hat.T
    taken = torch.zeros(N, dtype=torch.bool)
    seeds = [s for s in dict.fromkeys(seeds) if s >= 0]
    taken[seeds] = True
    off = taken | ~valid
    n = min(max(num_picks, 0), k, N - int(off.sum()))
    margin, picks = INF, []
    cur = dist[seeds].amin(0) if seeds else torch.full((N,), INF, dtype=torch.float64)
    for t in range(n):
        key = (norm if (t == 0 and not seeds) else cur).masked_fill(off, -INF)
        if int((~off).sum()) >= 2:
            top = torch.topk(key, 2).values
            gap = float(top[0] - top[1])
            margin = min(margin, gap / float(top[0]) if (t == 0 and not seeds) else gap)
        p = int(key.argmax())
        picks.append(p)
        off[p] = True
        cur = torch.minimum(cur, dist[p])
    return picks, margin


def _dpp_replay(vis, rel, valid, k):
    """(order, smallest margin) of the float64 replay of the greedy DPP."""
    order, _, margins = dpp_replay(vis, rel, valid, k, DPP_STOP)
    return order, min(margins, default=INF)


# ------------------------------------------------------------------------------------------------------------ gram

GRAM_SHAPES = [(1, 1, 1), (1, 5, 3), (2, 37, 67), (3, 50, 8), (1, 97, 1031), (2, 130, 16), (1, 200, 300)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GRAM_SHAPES, ids=str)
def test_gram_matches_reference(isa, shape, dtype):
    B, N, d = shape
    vis = _features_of(B, N, d, dtype, seed=N + d)
    got = C.gram(vis)
    assert got.dtype == torch.float32 and got.shape == (B, N, N)
    assert torch.equal(got, got.transpose(1, 2)), "not exactly symmetric"
    torch.testing.assert_close(got, R.gram(vis), rtol=0, atol=2e-6 * math.sqrt(d) + 1e-6)


def test_gram_strided_views_and_adversarial_rows(isa):
    base = _features_of(2, 40, 64, torch.float32, seed=3)
    base[0, 3] = 0.0  # zero row: cosine 0 with everything, itself included
    base[0, 5] = float("nan")
    base[1, 7] = base[1, 8]  # duplicate
    view = base[:, ::2, :33]  # row stride 128, d = 33 (not contiguous)
    for x in (base, view):
        got, want = C.gram(x), R.gram(x)
        assert torch.equal(got.isnan(), want.isnan())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, equal_nan=True)
    got = C.gram(base)
    assert bool((got[0, 3, torch.arange(40) != 5] == 0).all()) and bool(got[0, 3, 5].isnan())
    assert float(got[1, 7, 8]) == pytest.approx(1.0, abs=1e-6)


# -------------------------------------------------------------------------------------------- farthest point sampling

FPS_CASES = [  # (B, N, d, k, m seeds, with valid)
    (1, 30, 16, 10, 0, False),
    (2, 60, 33, 20, 2, True),
    (3, 97, 67, 30, 3, True),
    (1, 150, 8, 40, 0, True),
    (2, 200, 129, 64, 5, True),
]


def _fps_inputs(B, N, d, k, m, with_valid, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    vis = torch.randn(B, N, d, generator=g).to(dtype)
    valid = (torch.rand(B, N, generator=g) > 0.25) if with_valid else None
    seed_idx = torch.randint(-1, N, (B, m), generator=g)  # -1 pads, duplicates allowed, invalid seeds allowed
    num_picks = torch.randint(0, k + 3, (B,), generator=g)
    return vis, seed_idx, num_picks, valid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FPS_CASES, ids=str)
def test_fps_matches_reference_where_well_conditioned(isa, case, dtype):
    B, N, d, k, m, with_valid = case
    for seed in range(40):
        vis, seeds, num_picks, valid = _fps_inputs(B, N, d, k, m, with_valid, dtype, seed)
        ok = torch.ones(B, N, dtype=torch.bool) if valid is None else valid
        margins = [_fps_replay(vis[b], seeds[b].tolist(), int(num_picks[b]), k, ok[b])[1] for b in range(B)]
        if min(margins) >= WELL_CONDITIONED:
            break
    else:
        pytest.fail("no well-conditioned seed")
    want = R.farthest_point_sample(vis, seeds, num_picks, k, valid, None)
    assert torch.equal(C.farthest_point_sample(vis, seeds, num_picks, k, valid, None), want)


@pytest.mark.parametrize("adversarial", [False, True])
@pytest.mark.parametrize("case", FPS_CASES, ids=str)
def test_fps_reading_a_gram_matrix_is_the_reference_bit_for_bit(isa, case, adversarial):
    # Both read the same similarities and rank with the same rules, so they agree on any input, ties included.
    B, N, d, k, m, with_valid = case
    vis, seeds, num_picks, valid = _fps_inputs(B, N, d, k, max(m, 1), with_valid, torch.float32, seed=7)
    if adversarial:
        vis = vis[:, (torch.arange(N) // 2) * 2].clone()  # every row twice: exact ties
        vis[:, 2] = float("nan")
        vis[:, 3] = 0.0
    seeds[:, 0] = torch.arange(B) % N  # at least one seed per sample: the first pick is read, not a norm
    sim = R.gram(vis)
    want = R.farthest_point_sample(vis, seeds, num_picks, k, valid, sim)
    assert torch.equal(C.farthest_point_sample(vis, seeds, num_picks, k, valid, sim), want)
    other = sim.transpose(1, 2).contiguous()  # any float32 matrix is read as given
    assert torch.equal(C.farthest_point_sample(vis, seeds, num_picks, k, valid, other),
                       R.farthest_point_sample(vis, seeds, num_picks, k, valid, other))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fps_reading_its_own_gram_matrix_equals_computing_it(isa, dtype):
    vis, seeds, num_picks, valid = _fps_inputs(2, 120, 40, 50, 2, True, dtype, seed=11)
    vis = vis[:, (torch.arange(120) // 3) * 3].contiguous()  # ties: decided by the same bits on both paths
    computed = C.farthest_point_sample(vis, seeds, num_picks, 50, valid, None)
    assert torch.equal(C.farthest_point_sample(vis, seeds, num_picks, 50, valid, C.gram(vis)), computed)


def test_fps_valid_semantics():
    vis = _features_of(1, 10, 4, torch.float32, seed=0)
    valid = torch.zeros(1, 10, dtype=torch.bool)
    valid[0, [2, 5, 7]] = True
    seed = torch.tensor([[3]])  # an invalid seed is still a centre, as in the reference
    got = C.farthest_point_sample(vis, seed, torch.tensor([10]), 6, valid, None)
    assert sorted(got[0, :3].tolist()) == [2, 5, 7] and got[0, 3:].tolist() == [-1, -1, -1]
    assert torch.equal(got, R.farthest_point_sample(vis, seed, torch.tensor([10]), 6, valid, None))
    none = C.farthest_point_sample(vis, torch.empty(1, 0, dtype=torch.int64), torch.tensor([4]), 4,
                                   torch.zeros(1, 10, dtype=torch.bool), None)
    assert none.tolist() == [[-1, -1, -1, -1]]


# --------------------------------------------------------------------------------------------------------- the DPP


def _dpp(vis, rel, valid, k, lazy):
    B, N, d = vis.shape
    order = torch.empty(B, k, dtype=torch.int64)
    gain = torch.empty(B, k, dtype=torch.float32)
    r = rel.float().contiguous()
    _C.dpp_greedy_cpu(B, N, d, DTYPE_TAG[vis.dtype], *_features(vis), r.data_ptr(), valid.data_ptr(), k,
                      order.data_ptr(), gain.data_ptr(), lazy)
    return order, gain


DPP_CASES = [(1, 20, 32, 10), (2, 60, 64, 25), (3, 97, 131, 40), (1, 150, 200, 60), (2, 64, 80, 40)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DPP_CASES, ids=str)
def test_dpp_matches_reference_where_well_conditioned(isa, case, dtype):
    B, N, d, k = case
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        vis = torch.randn(B, N, d, generator=g).to(dtype)
        rel = torch.rand(B, N, generator=g) + 0.05
        valid = torch.rand(B, N, generator=g) > 0.15
        if min(_dpp_replay(vis[b], rel[b], valid[b], k)[1] for b in range(B)) >= WELL_CONDITIONED:
            break
    else:
        pytest.fail("no well-conditioned seed")
    want_order, want_gain = R.dpp_greedy(vis, rel, valid, k)
    order, gain = C.dpp_greedy(vis, rel, valid, k)
    assert torch.equal(order, want_order)
    torch.testing.assert_close(gain, want_gain, rtol=1e-3, atol=2e-5)
    assert torch.equal(order, _dpp(vis, rel, valid, k, lazy=False)[0])


def test_dpp_stops_when_the_rank_runs_out(isa):
    # d = 8 < N: at most 8 gains are above the threshold; the rest are -1 / 0, as in the reference.
    g = torch.Generator().manual_seed(0)
    vis = torch.randn(1, 40, 8, generator=g)
    rel = torch.rand(1, 40, generator=g) + 0.5
    valid = torch.ones(1, 40, dtype=torch.bool)
    order, gain = C.dpp_greedy(vis, rel, valid, 20)
    n = int((order >= 0).sum())
    assert n <= 8 and bool((order[0, n:] == -1).all()) and bool((gain[0, n:] == 0).all())
    assert torch.equal(order, R.dpp_greedy(vis, rel, valid, 20)[0])


def _adversarial_dpp(kind, dtype):
    g = torch.Generator().manual_seed(5)
    B, N, d = 2, 24, 12
    vis = torch.randn(B, N, d, generator=g)
    rel = torch.rand(B, N, generator=g) + 0.1
    valid = torch.rand(B, N, generator=g) > 0.2
    if kind == "nan_invalid":  # a NaN row the mask excludes: the reference's NaN residual stops after one pick
        vis[:, 4] = float("nan")
        valid[:, 4] = False
    elif kind == "nan_valid":
        vis[0, 6] = float("nan")
        valid[0, 6] = True
    elif kind == "zero_rows":
        vis[:, ::3] = 0.0
    elif kind == "duplicates":
        vis[:, 1::2] = vis[:, ::2]
    elif kind == "none_valid":
        valid[:] = False
    elif kind == "nan_relevance":
        rel[0, 2] = float("nan")
        rel[1, 3] = float("inf")
    elif kind == "constant":
        rel[:] = 1.0
    return vis.to(dtype), rel, valid


ADVERSARIAL = ["nan_invalid", "nan_valid", "zero_rows", "duplicates", "none_valid", "nan_relevance", "constant"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ADVERSARIAL)
def test_dpp_adversarial_is_valid_and_lazy_equals_eager(isa, kind, dtype):
    vis, rel, valid = _adversarial_dpp(kind, dtype)
    k = 16
    order, gain = C.dpp_greedy(vis, rel, valid, k)
    eager = _dpp(vis, rel, valid, k, lazy=False)
    assert torch.equal(order, eager[0]) and torch.equal(gain.view(torch.int32), eager[1].view(torch.int32))
    for b in range(vis.shape[0]):
        picks = order[b][order[b] >= 0].tolist()
        n = len(picks)
        assert order[b, :n].tolist() == picks and bool((order[b, n:] == -1).all()), "-1 only after the stop"
        assert len(set(picks)) == n and all(bool(valid[b, p]) for p in picks)
        assert bool((gain[b, n:] == 0).all()) and bool((gain[b, :n] > 0).all())
    if kind in ("nan_invalid", "nan_valid", "none_valid", "nan_relevance"):  # NaN propagation as the reference has it
        assert torch.equal(order, R.dpp_greedy(vis, rel, valid, k)[0])


# ------------------------------------------------------------------------------------------------------- DivPrune

_divprune = importlib.import_module("mob_kernels.methods.divprune")
_cdpruner = importlib.import_module("mob_kernels.methods.cdpruner")


def _divprune_inputs(kind, B, N, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        vis = torch.randn(B, N, d, generator=g)
    elif kind == "clustered":
        centres = torch.randn(B, 6, d, generator=g)
        vis = centres[:, torch.randint(0, 6, (N,), generator=g)] + 0.05 * torch.randn(B, N, d, generator=g)
    elif kind == "integer":  # exact duplicates and ties everywhere
        vis = torch.randint(-1, 2, (B, N, d), generator=g).float()
    else:  # non-finite and zero rows
        vis = torch.randn(B, N, d, generator=g)
        vis[:, ::7] = float("nan")
        vis[:, 1::11] = float("inf")
        vis[:, 2::9] = 0.0
    valid = torch.rand(B, N, generator=g) > 0.2
    return vis.to(dtype), valid


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "clustered", "integer", "nonfinite"])
def test_fused_divprune_is_its_composition_bit_for_bit(isa, kind, dtype):
    for B, N, d, k in [(1, 1, 4, 1), (2, 37, 9, 5), (2, 90, 40, 30), (1, 130, 70, 130), (3, 64, 16, 0)]:
        vis, valid = _divprune_inputs(kind, B, N, d, dtype, seed=N)
        for v in (valid, None, torch.zeros_like(valid)):
            assert torch.equal(C.divprune(vis, k, v), _divprune._compose(C, vis, k, v)), (B, N, d, k)


def test_fused_divprune_reads_kept_similarities_bit_for_bit(isa):
    """The fused DivPrune keeps the similarity rows its first pick computed (up to 32 MiB) and its FPS reads them.

    Points evenly spread on a circle have nearest neighbours all about as far, so the first pick computes about a
    third of the rows: at N = 5500 that passes the cap, and the FPS reads some pairs from kept rows and computes the
    rest (the rows computed after the cap, and pairs no kept row holds). Either way the picks are the composition's.
    """
    N = 5500
    angle = torch.arange(N, dtype=torch.float64) * (2 * math.pi / N)
    vis = torch.stack([angle.cos(), angle.sin()], -1).float().unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(1, N, generator=g) > 0.1
    for v in (None, valid):
        assert torch.equal(C.divprune(vis, 200, v), _divprune._compose(C, vis, 200, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "clustered", "integer", "nonfinite"])
def test_fused_cdpruner_is_its_composition_bit_for_bit(isa, kind, dtype):
    for B, N, d, k in [(1, 1, 4, 1), (2, 37, 9, 5), (2, 90, 40, 30), (1, 130, 70, 130), (3, 64, 16, 0)]:
        vis, valid = _divprune_inputs(kind, B, N, d, dtype, seed=N)
        g = torch.Generator().manual_seed(N)
        rel = torch.rand(B, N, generator=g)
        rel[:, ::13] = 0.5  # relevance ties: completed in index order
        if kind == "nonfinite":
            rel[:, 3::17] = float("nan")
            rel[:, 5::19] = float("inf")
        for v in (valid, None, torch.zeros_like(valid)):
            for r in (rel, rel.double(), rel.bfloat16()):
                assert torch.equal(C.cdpruner(vis, r, k, v), _cdpruner._compose(C, vis, r, k, v)), (B, N, d, k)


def _divprune_margin(vis, k):
    """DivPrune on one sample (all tokens usable) in float64: the smallest margin of the first pick (the most isolated
    token) and of every FPS step after it."""
    N = vis.shape[0]
    v_hat, _ = _unit64(vis)
    dist = (1.0 - v_hat @ v_hat.T).fill_diagonal_(INF)
    nearest = dist.amin(1)
    top = torch.topk(nearest, 2).values
    first = int(nearest.argmax())
    _, fps = _fps_replay(vis, [first], k - 1, k, torch.ones(N, dtype=torch.bool))
    return min(float(top[0] - top[1]), fps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(1, 40, 24, 8), (2, 90, 64, 20), (1, 120, 72, 30)], ids=str)
def test_divprune_and_cdpruner_match_reference_where_well_conditioned(isa, case, dtype):
    B, N, d, k = case
    for seed in range(40):
        vis = _features_of(B, N, d, dtype, seed)
        if min(_divprune_margin(vis[b], k) for b in range(B)) >= WELL_CONDITIONED:
            break
    else:
        pytest.fail("no well-conditioned seed for DivPrune")
    assert torch.equal(C.divprune(vis, k, None), _divprune._compose(R, vis, k, None))
    valid = torch.ones(B, N, dtype=torch.bool)
    for seed in range(40):
        rel = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) + 0.05
        if min(_dpp_replay(vis[b], rel[b], valid[b], k)[1] for b in range(B)) >= WELL_CONDITIONED:
            break
    else:
        pytest.fail("no well-conditioned relevance for the DPP")
    assert torch.equal(_cdpruner._compose(C, vis, rel, k, None), _cdpruner._compose(R, vis, rel, k, None))


# ------------------------------------------------------------------------------------------ instruction-set choice


def test_isa_choice():
    before = _C.dot_isa()
    try:
        assert ISAS[0] == "portable" and before in ISAS
        with pytest.raises(ValueError, match="isa"):
            _C.set_dot_isa("sse9")
        assert _C.set_dot_isa("portable") == "portable" == _C.dot_isa()
        assert _C.set_dot_isa("avx512-bf16") == ISAS[-1]  # narrows to the best this CPU has
        assert _C.set_dot_isa("auto") == ISAS[-1]
    finally:
        _C.set_dot_isa(before)


def test_isa_environment_variable_is_read_at_first_use():
    code = "from mob_kernels import _C; print(_C.dot_isa())"
    env = {**os.environ, "MOB_CPU_ISA": "portable"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "portable"


# ------------------------------------------------------------------------------- the extension's entry points


def _entry_calls(ptr):
    """Every CPU entry point with sizes that are sound and each buffer from ``ptr(name)`` (0 = null)."""
    B, N, L, d, k, k_p = 1, 6, 2, 4, 3, 2
    return {
        "gram_cpu": (["vis", "out"], lambda: _C.gram_cpu(B, N, d, 0, ptr("vis"), N * d, d, ptr("out"))),
        "farthest_point_sample_cpu": (
            ["vis", "seed", "num_picks", "out"],
            lambda: _C.farthest_point_sample_cpu(B, N, d, 0, ptr("vis"), N * d, d, ptr("seed"), 1, ptr("num_picks"),
                                                 k, 0, 0, 0, 0, ptr("out")),
        ),
        "dpp_greedy_cpu": (
            ["vis", "relevance", "valid", "order", "gain"],
            lambda: _C.dpp_greedy_cpu(B, N, d, 0, ptr("vis"), N * d, d, ptr("relevance"), ptr("valid"), k,
                                      ptr("order"), ptr("gain")),
        ),
        "divprune_cpu": (["vis", "out"], lambda: _C.divprune_cpu(B, N, d, 0, ptr("vis"), N * d, d, 0, k, ptr("out"))),
        "prompt_cover_cpu": (
            ["vis", "prompt", "prompt_mask", "fold", "picks", "count"],
            lambda: _C.prompt_cover_cpu(B, N, L, d, 0, ptr("vis"), N * d, d, ptr("prompt"), L * d, d,
                                        ptr("prompt_mask"), k_p, ptr("fold"), ptr("picks"), ptr("count")),
        ),
        "select_cpu": (
            ["vis", "prompt", "prompt_mask", "fold", "out"],
            lambda: _C.select_cpu(B, N, L, d, 0, ptr("vis"), N * d, d, ptr("prompt"), L * d, d, ptr("prompt_mask"),
                                  k_p, k, ptr("fold"), ptr("out")),
        ),
    }


def test_entry_points_reject_each_null_buffer_and_run_with_none():
    # Real buffers, large enough for every role (float32 data, int64 indices, bool masks all fit in 64 elements).
    store = {}

    def real(name):
        if name not in store:
            t = torch.zeros(64, dtype=torch.int64)
            if name == "vis" or name == "prompt":
                t = torch.randn(64).float()
            elif name in ("relevance",):
                t = torch.ones(64)
            elif name in ("valid", "prompt_mask"):
                t = torch.ones(64, dtype=torch.bool)
            elif name == "fold":
                t = torch.ones(64, dtype=torch.int64)
            elif name == "num_picks":
                t = torch.full((64,), 3, dtype=torch.int64)
            elif name == "gain":
                t = torch.zeros(64)
            elif name == "out" or name == "picks" or name == "order" or name == "count" or name == "seed":
                t = torch.zeros(64, dtype=torch.int64)
            store[name] = t
        return store[name].data_ptr()

    for entry, (buffers, _) in _entry_calls(real).items():
        _entry_calls(real)[entry][1]()  # every buffer present: runs
        for missing in buffers:
            call = _entry_calls(lambda name, m=missing: 0 if name == m else real(name))[entry][1]
            with pytest.raises(ValueError, match=f"{missing} must not be a null pointer"):
                call()


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda: _C.gram_cpu(1, 1 << 32, 1, 0, 0, 0, 0, 0), "overflow"),
        (lambda: _C.gram_cpu(-1, 4, 4, 0, 0, 0, 0, 0), "sizes"),
        (lambda: _C.divprune_cpu(1, 4, 4, 0, 0, 0, 0, 0, 5, 0), "k must be in"),
        (lambda: _C.dpp_greedy_cpu(1, 4, 4, 0, 0, 0, 0, 0, 0, -1, 0, 0), "k must be in"),
        (lambda: _C.farthest_point_sample_cpu(1, 4, 4, 0, 0, 0, 0, 0, -2, 0, 1, 0, 0, 0, 0, 0), "seed width"),
        (lambda: _C.farthest_point_sample_cpu(1, 1 << 40, 1 << 30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), "overflow"),
        (lambda: _C.select_cpu(1, 4, 2, 4, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0), "k_p must be in"),
        (lambda: _C.gram_cpu(1, 4, 4, 3, 0, 0, 0, 0), "dtype"),
    ],
)
def test_entry_points_reject_impossible_sizes_before_touching_memory(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_fold_is_checked_before_any_sample_runs():
    vis = torch.randn(2, 6, 4)
    mask = torch.ones(2, 2, dtype=torch.bool)
    fold = torch.tensor([1, 7])  # sample 1: fold > N
    picks, count = torch.empty(2, 2, dtype=torch.int64), torch.empty(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="fold"):
        _C.prompt_cover_cpu(2, 6, 2, 4, 0, *_features(vis), *_features(vis[:, :2]), mask.data_ptr(), 2,
                            fold.data_ptr(), picks.data_ptr(), count.data_ptr())
