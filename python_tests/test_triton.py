"""Triton backend vs the reference backend: every primitive (gram, prompt_cover, farthest_point_sample, dpp_greedy) and
the one-launch MoB select, every code path forced with small blocks, the 3xTF32 split, adversarial inputs, and an
ahead-of-time compile of every kernel variant for sm_90.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so
shapes stay small; the CUDA-only tests at the bottom cover the model shapes, CUDA-graph capture and torch.compile.

Exactness: indices must equal the reference's wherever a float64 replay of the very (rounded) inputs shows every
decision winning by the contract's margin (mob_testing.decision_margin / cover_margin for MoB, the replays below for
FPS with a valid mask and for the DPP); validity (k distinct sorted in-range indices) everywhere else.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mob_kernels as mk
from mob_kernels import registry
from mob_kernels.backends.reference import ReferenceBackend as R
from mob_testing import (
    DTYPES,
    WELL_CONDITIONED,
    assert_valid,
    cover_margin,
    decision_margin,
    dpp_replay,
    gaussian,
    problem,
    well_conditioned,
)

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from mob_kernels.backends.triton_kernels import dpp_greedy as tdpp  # noqa: E402
from mob_kernels.backends.triton_kernels import mob_select as tms  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
INF = float("inf")
pytestmark = pytest.mark.skipif(
    not CUDA and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or TRITON_INTERPRET=1"
)


def dev(*xs):
    out = tuple(None if x is None else x.to(DEV) for x in xs)
    return out if len(out) > 1 else out[0]


def fold_of(k_p, fold, mask, N):
    from mob_kernels.methods.mob import resolve_fold

    return resolve_fold(k_p, fold or 0, mask, N)


# ------------------------------------------------------------------------------------------------ float64 replays


def _unit64(x):
    x = x.double()
    n = torch.linalg.vector_norm(x, dim=-1)
    return x / n.clamp_min(1e-12).unsqueeze(-1), n


def fps_replay(vis, seed, num_picks, k, valid=None):
    """The reference FPS on one sample [N, d] in float64: (picks, smallest decision margin)."""
    N = vis.shape[0]
    v_hat, norm = _unit64(vis)
    seeds = [int(s) for s in seed if s >= 0]
    taken = torch.zeros(N, dtype=torch.bool)
    taken[seeds] = True
    dist = torch.full((N,), INF, dtype=torch.float64)
    for s in seeds:
        dist = torch.minimum(dist, 1.0 - v_hat @ v_hat[s])
    off = taken | (torch.zeros(N, dtype=torch.bool) if valid is None else ~valid)
    n = min(max(int(num_picks), 0), k, int((~off).sum()))
    picks, margin = [], INF
    for t in range(n):
        by_norm = t == 0 and not seeds
        key = (norm if by_norm else dist).masked_fill(off, -INF)
        if int((~off).sum()) >= 2:
            top = torch.topk(key, 2).values
            gap = float(top[0] - top[1])
            margin = min(margin, gap / float(top[0]) if by_norm else gap)
        pick = int(key.argmax())
        picks.append(pick)
        off[pick] = True
        dist = torch.minimum(dist, 1.0 - v_hat @ v_hat[pick])
    return picks + [-1] * (k - len(picks)), margin


def conditioned_prefix(margins):
    """How many leading greedy steps are decided by the contract's margin."""
    n = 0
    while n < len(margins) and margins[n] >= WELL_CONDITIONED:
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------- gram


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_matches_reference_and_is_symmetric(dtype):
    # block_m=32 over N=70: 3 x 3 tiles, 6 of them computed (diagonal, off-diagonal, mirrored, ragged); d=40 is not a
    # multiple of the d block (the masked-d path).
    vis = gaussian((2, 70, 40), dtype, 1)
    vis[0, 5] = 0.0  # zero row: cosine 0 with everything, itself included
    vis[1, 9, 3] = float("nan")  # NaN row: NaN row and column
    vis = dev(vis)
    got = tms.gram(vis, block_m=32).cpu()
    want = R.gram(vis.cpu())
    assert got.dtype == torch.float32 and got.shape == (2, 70, 70)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.allclose(got.nan_to_num(), want.nan_to_num(), atol=2e-6, rtol=0)
    ok = ~got.isnan()
    assert torch.equal(got[ok], got.transpose(1, 2)[ok])  # bit for bit
    assert (got[0, 5] == 0).all()
    default = registry.get_backend("triton").gram(vis).cpu()  # one tile: another summation order, same values
    assert torch.allclose(default.nan_to_num(), got.nan_to_num(), atol=1e-6, rtol=0)


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n)
    hi = tms._round_tf32(x)
    tl.store(hi_ptr + i, hi, mask=i < n)
    tl.store(lo_ptr + i, tms._round_tf32(x - hi), mask=i < n)


def test_tf32x3_split_is_tensor_core_exact_and_accurate():
    # The float32 path hands the tensor cores hi and lo parts that are exactly tf32 (low 13 mantissa bits zero), so
    # the GPU's products are exactly the interpreter's float32 products; hi + lo keeps ~22 bits of x.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=g) * torch.logspace(-20, 20, 1000)
    x[:4] = torch.tensor([INF, -INF, float("nan"), 0.0])
    x = dev(x)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, x.numel(), BLOCK=1024)
    hi, lo, x = hi.cpu(), lo.cpu(), x.cpu()
    fin = x.isfinite()
    assert ((hi[fin].view(torch.int32) & 0x1FFF) == 0).all() and ((lo[fin].view(torch.int32) & 0x1FFF) == 0).all()
    err = (hi[fin].double() + lo[fin].double() - x[fin].double()).abs()
    assert (err <= 2.0**-21 * x[fin].double().abs()).all()
    assert torch.equal(hi[:2], x[:2]) and hi[2].isnan()
    # The Gram by 3xTF32 against float64 truth: float32-level error (d=256, unit rows).
    vis = gaussian((1, 64, 256), torch.float32, 4)
    got = tms.gram(dev(vis)).cpu().double()
    v_hat, _ = _unit64(vis[0])
    assert (got[0] - v_hat @ v_hat.T).abs().max() < 2e-6


# --------------------------------------------------------------------------------------------------- prompt cover


def _cover_case(dtype, N, L, d, k_p, fold, mask, seed0):
    """A seeded problem whose cover decisions (top-f boundaries, S_p boundary and order) all have the margin."""
    for seed in range(seed0, seed0 + 40):
        vis, prompt, _ = problem(mask.shape[0], N, L, d, dtype, seed=seed)
        if all(cover_margin(vis[b], prompt[b][mask[b]], k_p, fold, ordered=True)[0] >= WELL_CONDITIONED
               for b in range(mask.shape[0])):
            return vis, prompt
    raise AssertionError("no well-conditioned cover case")


# (N, L, d, k_p, fold, knobs): the partial-key path over several tiles; f > FT (the finisher's full passes, several
# row groups and chunks); L beyond one prompt block; the rank pass in several blocks.
COVER_PATHS = {
    "partials-multitile": (150, 10, 48, 20, 3, dict(block_m=32, rank_block=16)),
    "full-passes": (150, 10, 48, 20, 3, dict(block_m=32, cover_ft=1, fin_block_n=64)),
    "two-prompt-blocks": (90, 70, 32, 12, 1, dict(block_m=64, fin_block_n=32)),
}


@pytest.mark.parametrize("path", list(COVER_PATHS))
def test_prompt_cover_paths(path):
    N, L, d, k_p, fold, knobs = COVER_PATHS[path]
    dtype = DTYPES[list(COVER_PATHS).index(path)]
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, L // 2 :] = False
    vis, prompt = _cover_case(dtype, N, L, d, k_p, fold, mask, 20)
    f = fold_of(k_p, fold, mask, N)
    picks, count = tms.prompt_cover(*dev(vis, prompt, mask), k_p, dev(f), **knobs)
    want_picks, want_count = R.prompt_cover(vis, prompt, mask, k_p, f)
    assert torch.equal(count.cpu(), want_count) and torch.equal(picks.cpu(), want_picks)


def test_prompt_cover_padding_empty_mask_and_front_door():
    # fold 1 x 3 valid rows < k_p: -1 padding; sample 1 has no valid prompt row (f = 0): nothing.
    N, L, d, k_p = 64, 5, 32, 8
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, :3] = True
    vis, prompt = _cover_case(torch.float32, N, L, d, k_p, 1, mask, 60)
    f = fold_of(k_p, 1, mask, N)
    picks, count = tms.prompt_cover(*dev(vis, prompt, mask), k_p, dev(f))
    want_picks, want_count = R.prompt_cover(vis, prompt, mask, k_p, f)
    assert 0 < int(want_count[0]) < k_p and int(want_count[1]) == 0
    assert torch.equal(picks.cpu(), want_picks) and torch.equal(count.cpu(), want_count)
    got = mk.prompt_cover(*dev(vis[0], prompt[0]), 3, backend="triton")
    want = mk.prompt_cover(vis[0], prompt[0], 3, backend="reference")
    assert torch.equal(got[0].cpu(), want[0]) and int(got[1]) == int(want[1])


# ---------------------------------------------------------------------------------------------------------- FPS


def _fps_case(dtype, B, N, d, seed, num_picks, k, valid, seed0):
    for s in range(seed0, seed0 + 60):
        vis = gaussian((B, N, d), dtype, s)
        if all(fps_replay(vis[b], seed[b], num_picks[b], k, None if valid is None else valid[b])[1] >= WELL_CONDITIONED
               for b in range(B)):
            return vis
    raise AssertionError("no well-conditioned FPS case")


# (knobs, with a given sim, with a valid mask): on chip from this launch's Gram (several seed tiles), on chip reading a
# given sim, tiled from the Gram, tiled computing rows from V (the no-Gram path for very large N).
FPS_PATHS = {
    "onchip-gram": (dict(seed_rows=2, block_m=32), False, False),
    "onchip-sim-valid": (dict(), True, True),
    "tiled-gram-valid": (dict(onchip=False, chunk=32), False, True),
    "tiled-rows-from-v": (dict(rows_from_v=True, chunk=32), False, False),
}


@pytest.mark.parametrize("path", list(FPS_PATHS))
def test_farthest_point_sample_paths(path):
    knobs, with_sim, with_valid = FPS_PATHS[path]
    dtype = DTYPES[list(FPS_PATHS).index(path) % 3]
    B, N, d, k = 3, 72, 32, 12
    # seeds with -1 padding, a duplicate and (sample 1) an invalid seed; sample 2 unseeded (largest-norm first pick);
    # num_picks below, at and above k.
    seed = torch.tensor([[5, -1, 67, 5], [-1, 30, -1, 71], [-1, -1, -1, -1]])
    num_picks = torch.tensor([k, 7, 40])
    valid = None
    if with_valid:
        valid = torch.ones(B, N, dtype=torch.bool)
        valid[:, 40:50] = False
        valid[1, 30] = False  # a seed that is not valid still seeds (as in the reference)
    vis = _fps_case(dtype, B, N, d, seed, num_picks, k, valid, 41)
    sim = R.gram(vis) if with_sim else None
    got = tms.farthest_point_sample(*dev(vis, seed, num_picks), k, dev(valid), dev(sim), **knobs).cpu()
    want = R.farthest_point_sample(vis, seed, num_picks, k, valid, sim)
    assert (got[1, 7:] == -1).all()
    assert torch.equal(got, want)
    if with_valid:
        assert not ((got >= 40) & (got < 50)).any()


def test_farthest_point_sample_front_door_all_tokens_and_exhaustion():
    # k = N: every token exactly once; with a valid mask, picks stop at the untaken valid tokens (-1 after).
    vis = gaussian((2, 40, 16), torch.float16, 51)
    got = mk.farthest_point_sample(dev(vis), 40, backend="triton").cpu()
    assert torch.equal(got.sort(1).values, torch.arange(40).expand(2, 40))
    assert torch.equal(got, mk.farthest_point_sample(vis, 40, backend="reference"))
    valid = torch.zeros(2, 40, dtype=torch.bool)
    valid[0, ::3] = True  # 14 valid tokens; sample 1: none
    seed = torch.tensor([[0, 3], [-1, -1]])
    got = tms.farthest_point_sample(*dev(vis, seed, torch.tensor([40, 40])), 20, dev(valid)).cpu()
    want = R.farthest_point_sample(vis, seed, torch.tensor([40, 40]), 20, valid)
    assert torch.equal(got, want)
    assert (got[0, :12] >= 0).all() and (got[0, 12:] == -1).all() and (got[1] == -1).all()


# ------------------------------------------------------------------------------------------------------- select

# (B, N, L, d, k_p, k, fold, ragged)
SELECT_CASES = {
    "ragged-autofold": (2, 96, 12, 32, 16, 40, None, True),  # per-sample f = 2 and 3
    "kp=k-fold-5": (2, 80, 8, 48, 24, 24, 5, False),  # f > FT: the finisher's full passes; no FPS pick
    "kp=0": (1, 100, 6, 32, 0, 30, None, False),  # pure FPS, largest-norm first pick
}


# every dtype on the main case, one dtype each for the edge cases (keeps the interpreter run short)
@pytest.mark.parametrize("case,dtype", [("ragged-autofold", t) for t in DTYPES]
                         + [(c, torch.bfloat16) for c in list(SELECT_CASES)[1:]], ids=str)
def test_select_matches_reference(case, dtype):
    B, N, L, d, k_p, k, fold, ragged = SELECT_CASES[case]
    vis, prompt, mask = well_conditioned(B, N, L, d, k_p, k, fold, dtype, ragged)
    got = mk.select(*dev(vis, prompt), k_p, k, fold=fold, prompt_mask=dev(mask), backend="triton").cpu()
    want = mk.select(vis, prompt, k_p, k, fold=fold, prompt_mask=mask, backend="reference")
    assert_valid(got, B, N, k)
    assert torch.equal(got, want)


def test_select_per_sample_folds_and_composition():
    # One batch: f = 2 (partial keys), f = 6 > FT (full passes), f = 0 (no valid prompt row: pure FPS). The fused
    # one-launch select and the composition over the Triton primitives both equal the reference.
    B, N, L, d, k_p, k = 3, 90, 12, 32, 24, 40
    for s in range(40):
        vis, prompt, _ = problem(B, N, L, d, torch.float32, seed=100 + s)
        mask = torch.zeros(B, L, dtype=torch.bool)
        mask[0, :12] = True
        mask[1, :4] = True
        if decision_margin(vis, prompt, mask, k_p, k) >= WELL_CONDITIONED:
            break
    else:
        raise AssertionError("no well-conditioned case")
    f = fold_of(k_p, 0, mask, N)
    assert f.tolist() == [2, 6, 0]
    want = mk.select(vis, prompt, k_p, k, prompt_mask=mask, backend="reference")
    got = tms.select(*dev(vis, prompt, mask), k_p, k, dev(f)).cpu()
    assert torch.equal(got, want)
    spec = registry.OPS["select"]
    comp = spec.compose(registry.get_backend("triton"), vis=dev(vis), prompt=dev(prompt), mask=dev(mask), k_p=k_p,
                        k=k, fold=dev(f))
    assert torch.equal(comp.cpu(), want)


def test_batch_chunks_share_one_workspace(monkeypatch):
    # A Gram budget of one sample: three launches reuse the one workspace and the self-resetting tickets.
    B, N, L, d, k_p, k = 3, 48, 6, 16, 6, 12
    vis, prompt, mask = problem(B, N, L, d, torch.float32, seed=7)
    want = mk.select(vis, prompt, k_p, k, prompt_mask=mask, backend="reference")
    monkeypatch.setattr(tms, "GRAM_BYTES", N * N * 4)
    monkeypatch.setattr(tdpp, "GRAM_BYTES", N * N * 4)
    got = mk.select(*dev(vis, prompt), k_p, k, prompt_mask=dev(mask), backend="triton").cpu()
    assert torch.equal(got, want)
    rel = torch.rand(B, N, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(B, N, dtype=torch.bool)
    o, g = tdpp.dpp_greedy(*dev(vis, rel, valid), 8)
    wo, wg = R.dpp_greedy(vis, rel, valid, 8)
    assert torch.equal(o.cpu(), wo) and torch.allclose(g.cpu(), wg, atol=1e-5)


def test_select_unbatched_and_strided_views():
    vis, prompt, _ = well_conditioned(1, 150, 6, 40, 8, 16, dtype=torch.bfloat16)
    got = mk.select(*dev(vis[0], prompt[0]), 8, 16, backend="triton")
    assert got.shape == (16,)
    assert torch.equal(got.cpu(), mk.select(vis[0], prompt[0], 8, 16, backend="reference"))
    wide = dev(torch.cat([vis, vis], 2))[:, :, :40]  # row stride 80, unit stride in d
    assert torch.equal(mk.select(wide, dev(prompt), 8, 16, backend="triton").cpu(),
                       mk.select(vis, prompt, 8, 16, backend="reference"))


# ---------------------------------------------------------------------------------------------------------- DPP


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dpp_greedy_matches_replay(dtype):
    # d=12 < k: the kernel runs out of rank and the stop rule ends the run. Indices must equal the reference's over
    # every step a float64 replay decides by the margin; gains agree to float32 accuracy there; padding after a stop.
    B, N, d, k = 2, 40, 10, 14
    g = torch.Generator().manual_seed(5)
    vis = gaussian((B, N, d), dtype, 5)
    rel = torch.rand(B, N, generator=g) + 0.1
    valid = torch.rand(B, N, generator=g) > 0.2
    got_o, got_g = tdpp.dpp_greedy(*dev(vis, rel, valid), k, chunk=16, t_block=4, block_m=32)
    want_o, want_g = R.dpp_greedy(vis, rel, valid, k)
    got_o, got_g = got_o.cpu(), got_g.cpu()
    for b in range(B):
        order, gains, margins = dpp_replay(vis[b], rel[b], valid[b], k)
        n = conditioned_prefix(margins)
        assert n >= 6, (b, margins)
        assert got_o[b, :n].tolist() == want_o[b, :n].tolist() == order[:n]
        assert torch.allclose(got_g[b, :n], want_g[b, :n], rtol=1e-4, atol=1e-6)
        stop = int((got_o[b] >= 0).sum())
        assert (got_o[b, stop:] == -1).all() and (got_g[b, stop:] == 0).all() and stop <= d
        if n == len(margins):  # the stop itself is decided too
            assert torch.equal(got_o[b], want_o[b])


def test_dpp_greedy_adversarial():
    B, N, d, k = 3, 32, 12, 16
    vis = gaussian((B, N, d), torch.float32, 9)
    rel = torch.rand(B, N, generator=torch.Generator().manual_seed(9)) + 0.1
    valid = torch.ones(B, N, dtype=torch.bool)
    vis[0, 7] = float("nan")  # a NaN token, invalid: its kernel row and column are 0, it changes nothing
    valid[0, 7] = False
    valid[1] = False  # nothing valid: no pick
    vis[2, 16:] = vis[2, :16]  # duplicates: rank 12 at most, the stop rule ends it
    got_o, got_g = tdpp.dpp_greedy(*dev(vis, rel, valid), k)
    want_o, want_g = R.dpp_greedy(vis, rel, valid, k)
    got_o, got_g = got_o.cpu(), got_g.cpu()
    order, _, margins = dpp_replay(vis[0], rel[0], valid[0], k)
    n = conditioned_prefix(margins)
    assert n >= 8 and got_o[0, :n].tolist() == want_o[0, :n].tolist() == order[:n]
    assert 7 not in got_o[0].tolist() and (got_g[0, :n] > 0).all()
    assert (got_o[1] == -1).all() and (got_g[1] == 0).all()
    picked = got_o[2][got_o[2] >= 0]
    assert len(set((picked % 16).tolist())) == len(picked)  # never a duplicate of a picked token


# ------------------------------------------------------------------------------------------ adversarial inputs


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_zero_duplicate_rows_stay_valid(dtype):
    B, N, L, d = 2, 40, 6, 24
    vis = gaussian((B, N, d), dtype, 61)
    prompt = gaussian((B, L, d), dtype, 62)
    vis[0, 3] = float("nan")
    vis[0, 10, 5] = float("nan")
    vis[0, 20:26] = 0.0  # zero rows: unit vector 0, distance 1 to everything
    vis[1, 20:40] = vis[1, 0:20]  # every token duplicated: half the distances are exactly 0
    vis[1, 7] = float("inf")
    prompt[0, 2] = float("nan")
    prompt[1, 1] = 0.0
    v, p = dev(vis, prompt)
    for k_p, k in ((10, 24), (20, N)):
        got = mk.select(v, p, k_p, k, backend="triton")
        assert_valid(got.cpu(), B, N, k)
        assert torch.equal(got, mk.select(v, p, k_p, k, backend="triton"))  # deterministic
        want = mk.select(vis, prompt, k_p, k, backend="reference")
        # Sample 0 (NaN and zero rows) decides nothing by a near-tie: exact. In sample 1 a duplicate of a taken token
        # is a genuine tie once every distinct row is covered: FPS must cover all 20 distinct rows first.
        assert torch.equal(got[0].cpu(), want[0])
        assert set((got[1].cpu() % 20).tolist()) == set(range(20))
    if dtype == torch.float32:  # FPS alone until every token is taken: NaN rows last, never twice
        picks = mk.farthest_point_sample(v, N, backend="triton").cpu()
        assert torch.equal(picks.sort(1).values, torch.arange(N).expand(B, N))
        assert torch.equal(picks[0], mk.farthest_point_sample(vis[0], N, backend="reference"))


def test_all_nan_sample_and_all_invalid():
    vis = torch.full((1, 50, 16), float("nan"))
    prompt = gaussian((1, 4, 16), torch.float32, 71)
    got = mk.select(*dev(vis, prompt), 5, 12, backend="triton").cpu()
    assert_valid(got, 1, 50, 12)
    assert torch.equal(got, mk.select(vis, prompt, 5, 12, backend="reference"))
    vis = gaussian((1, 30, 8), torch.float32, 72)
    none = torch.zeros(1, 30, dtype=torch.bool)
    out = tms.farthest_point_sample(*dev(vis, torch.tensor([[4]]), torch.tensor([10])), 10, dev(none)).cpu()
    assert (out == -1).all()
    assert_valid(mk.divprune(dev(vis), 10, valid=dev(none), backend="triton").cpu(), 1, 30, 10)


# ----------------------------------------------------------------------------------------------------- CUDA only

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter tests above cover the logic)")

# name: (B, N, d, L, k_p, k)
MODEL_SHAPES = {
    "llava-1.5": (1, 576, 4096, 64, 32, 64),
    "llava-1.5-b32": (32, 576, 4096, 64, 32, 64),
    "llava-next": (1, 2880, 4096, 64, 160, 320),
    "qwen2-vl": (2, 1296, 3584, 48, 96, 256),
}


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
def test_cuda_model_shapes_match_reference(shape, dtype):
    B, N, d, L, k_p, k = MODEL_SHAPES[shape]
    vis, prompt = dev(gaussian((B, N, d), dtype, 81), gaussian((B, L, d), dtype, 82))
    got = mk.select(vis, prompt, k_p, k, backend="triton")
    assert_valid(got.cpu(), B, N, k)
    assert torch.equal(got, mk.select(vis, prompt, k_p, k, backend="reference"))
    assert torch.equal(mk.divprune(vis, k, backend="triton"), mk.divprune(vis, k, backend="reference"))


@cuda_only
def test_cuda_large_shape_tiled_paths():
    # N beyond the on-chip limit and the Gram budget: the tiled FPS computing rows from V.
    vis, prompt = dev(gaussian((1, 16400, 256), torch.bfloat16, 91), gaussian((1, 8, 256), torch.bfloat16, 92))
    got = mk.select(vis, prompt, 8, 24, backend="triton")
    assert_valid(got.cpu(), 1, 16400, 24)
    assert torch.equal(got, mk.select(vis, prompt, 8, 24, backend="reference"))


@cuda_only
def test_cuda_tickets_reset_and_graph_capture_replay():
    B, N, d, L, k_p, k = MODEL_SHAPES["llava-1.5"]
    vis, prompt = dev(gaussian((B, N, d), torch.bfloat16, 101), gaussian((B, L, d), torch.bfloat16, 102))
    static_vis, static_prompt = vis.clone(), prompt.clone()
    mk.select(static_vis, static_prompt, k_p, k, backend="triton")  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    assert all(int(t.abs().sum()) == 0 for t in tms._TICKETS.values())  # every launch leaves its tickets at 0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        static_out = mk.select(static_vis, static_prompt, k_p, k, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    for s in (103, 104):
        static_vis.copy_(dev(gaussian((B, N, d), torch.bfloat16, s)))
        static_prompt.copy_(dev(gaussian((B, L, d), torch.bfloat16, s + 50)))
        graph.replay()
        eager = mk.select(static_vis, static_prompt, k_p, k, backend="triton")  # interleaved eager calls
        assert torch.equal(static_out, mk.select(static_vis, static_prompt, k_p, k, backend="reference"))
        assert torch.equal(eager, static_out)


@cuda_only
def test_cuda_torch_compile_fullgraph():
    B, N, d, L, k_p, k = MODEL_SHAPES["llava-1.5"]
    vis, prompt = dev(gaussian((B, N, d), torch.bfloat16, 111), gaussian((B, L, d), torch.bfloat16, 112))

    @torch.compile(fullgraph=True)
    def prune(v, p):
        return torch.ops.mob.select(v, p, k_p, k)

    assert mk.resolve_backend("auto", vis.device) == "triton"
    assert torch.equal(prune(vis, prompt), mk.select(vis, prompt, k_p, k, backend="reference"))


# ------------------------------------------------------------------------------- ahead-of-time compile for sm_90
# The interpreter does not apply the compiler's rules (it accepted a non-constexpr global that real compilation
# rejects), so every kernel variant is also compiled for an H100 target: triton's bundled ptxas, no GPU needed, real
# @triton.jit functions (a subprocess with the interpreter off). Pointers and the d / stride arguments carry the
# 16-divisibility the launcher specialises on for model shapes, so the tile loops must come out software-pipelined
# (cp.async) as they will on the GPU. Two worker processes; triton's cache makes reruns fast.

_AOT_SCRIPT = r"""
import os, sys
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"

DIVISIBLE = ("d", "N", "ws_off", "stride_vb", "stride_vn", "stride_pb", "stride_pl", "stride_gb", "stride_gn")


def build(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mob_kernels.backends.triton_kernels import dpp_greedy, mob_select

    name, kernel, sig, const, warps, stages = job
    fn = {"mob": mob_select._mob_kernel, "dpp": dpp_greedy._dpp_kernel}[kernel]
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n][0] == "*" or n in DIVISIBLE}
    src = ASTSource(fn, dict(sig, **{c: "constexpr" for c in const}), const, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    assert ".entry" in ptx, name
    if kernel == "dpp" or const.get("COVER") or const.get("GRAM"):  # variants with dot tiles
        assert "cp.async" in ptx, f"{name}: the tile loop was not pipelined"
    assert k.metadata.shared <= 227 * 1024, name
    return name


def jobs():
    out = []
    for dt, prec, bd in (("*bf16", 0, 64), ("*fp16", 0, 64), ("*fp32", 2, 32)):
        stages = 2 if dt == "*fp32" else 3
        mob = dict(vis_ptr=dt, prompt_ptr=dt, mask_ptr="*i1", fold_ptr="*i64", seed_ptr="*i64", num_picks_ptr="*i64",
                   valid_ptr="*i1", gram_ptr="*fp32", ws_ptr="*fp32", ticket_ptr="*i32", out_ptr="*i64",
                   count_ptr="*i64", N="i32", L="i32", d="i32", k_p="i32", m="i32", k="i32", ws_off="i32",
                   stride_vb="i64", stride_vn="i64", stride_pb="i64", stride_pl="i64", stride_gb="i64",
                   stride_gn="i64")
        base = dict(COVER=False, COVER_OUT=False, GRAM=False, NORMS=False, FPS=0, ROWS_FROM_V=False, HAS_VALID=False,
                    FILL_TO_K=False, SORTED_UNION=False, PREC=prec, EVEN_D=True, BM=64, BL=64, BD=bd, NB=16, FT=4,
                    RG=32, P_PAD=64, FIN_BN=1024, RG2=2, RANK_B=64, BLOCK_N=1024, SEED_ROWS=8, CH=1024,
                    BDV=32)
        variants = {  # name: (constexprs, warps); every launcher mode and every constexpr branch at least once
            "select": (dict(COVER=True, GRAM=True, FPS=1, FILL_TO_K=True, SORTED_UNION=True), 4),
            "select-nextsize-8warps": (dict(COVER=True, GRAM=True, FPS=1, FILL_TO_K=True, SORTED_UNION=True, BM=128,
                                            BLOCK_N=4096, SEED_ROWS=4), 8),
            "gram": (dict(GRAM=True), 4),
            "fps-sim-valid": (dict(NORMS=True, FPS=1, HAS_VALID=True), 4),
            "fps-gram-tiled": (dict(GRAM=True, FPS=2, HAS_VALID=True), 4),
            "cover": (dict(COVER=True, COVER_OUT=True, EVEN_D=False), 4),
            "select-rows-from-v": (dict(COVER=True, NORMS=True, FPS=2, ROWS_FROM_V=True, FILL_TO_K=True,
                                        SORTED_UNION=True, FT=0, CH=256), 4),
        }
        if dt == "*fp16":  # float16 runs bfloat16's code: its main variant is enough
            variants = {"select": variants["select"]}
        elif dt == "*fp32":  # the dtype only changes the tiles (3xTF32) and the loads of V: the variants using them
            variants = {n: variants[n] for n in ("select", "select-rows-from-v")}
        for name, (over, warps) in variants.items():
            out.append((f"{name}-{dt}", "mob", mob, dict(base, **over), warps, stages))
        if dt != "*fp16":
            dpp = dict(vis_ptr=dt, rel_ptr="*fp32", valid_ptr="*i1", ws_ptr="*fp32", ticket_ptr="*i32",
                       order_ptr="*i64", gain_ptr="*fp32", N="i32", d="i32", k="i32", stride_vb="i64",
                       stride_vn="i64")
            out.append((f"dpp-{dt}", "dpp", dpp, dict(PREC=prec, EVEN_D=True, BM=64, BD=bd, CH=1024, TB=8), 4, stages))
    return out


if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        for name in pool.map(build, jobs()):
            print("compiled", name, flush=True)
    print("all compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    script = tmp_path / "aot.py"
    script.write_text(_AOT_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and "all compiled" in run.stdout, (run.stdout[-2000:], run.stderr[-4000:])
