"""CUDA C++ backend (csrc/cuda, mob_kernels/backends/cuda.py).

Without a GPU (this project's CI machines) the build, layout and dispatch tests run: the extension reports WITH_CUDA
when it was built with nvcc, the workspace query's op codes and regions are what the kernels assume, every entry point
rejects bad arguments before a kernel could touch memory and reports a missing device as an exception instead of
crashing, and backend="cuda" on CPU tensors or a build without CUDA raise clear errors. (csrc/cuda/check.sh compiles
every kernel and runs the host-only layout test, tests/layout_test.cpp.)

The GPU tests (skipped without one) require exactly the reference's indices on well-conditioned inputs (every decision
wins by the contract's margin in a float64 replay, mob_testing) for every primitive (gram to float32 rounding) and for
select, in float32, float16 and bfloat16; valid output on any input; run-to-run determinism; both homes of the
per-sample arrays (shared memory, the global workspace) and both sources of similarity rows (the Gram matrix, rows
computed on demand); the caller's stream; CUDA-graph capture; and agreement with the Triton backend.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

import mob_kernels as mk
from mob_kernels import registry
from mob_kernels.backends import cuda as cuda_backend
from mob_kernels.backends.reference import EPS, ReferenceBackend
from mob_testing import (
    DTYPES,
    WELL_CONDITIONED,
    assert_valid,
    cover_margin,
    decision_margin,
    dpp_margin,
    fps_margin,
    gaussian,
    problem,
    well_conditioned,
)

try:
    from mob_kernels import _C
except ImportError:  # the CPU tests elsewhere fail loudly in that case; here only the GPU tests need it
    _C = None

GPU = torch.cuda.is_available()
WITH_CUDA = bool(getattr(_C, "WITH_CUDA", False))
gpu_only = pytest.mark.skipif(not (GPU and WITH_CUDA), reason="needs a CUDA GPU and a CUDA build of mob_kernels._C")
needs_cuda_build = pytest.mark.skipif(not WITH_CUDA, reason="mob_kernels._C built without CUDA")
REF = ReferenceBackend()
CUDA = cuda_backend.BACKEND

# ------------------------------------------------------------------------------------------- build and dispatch


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("MOB_CUDA", "auto").lower() == "off",
    reason="WITH_CUDA is expected only from a build with nvcc on PATH (and MOB_CUDA not off)",
)
def test_extension_reports_with_cuda_when_built_with_nvcc():
    assert _C is not None
    assert _C.WITH_CUDA is True, "nvcc is on PATH but mob_kernels._C was built without CUDA: rebuild with pip install -e ."
    assert _C.CUDA_RUNTIME_VERSION >= 11000
    assert CUDA.unavailable_reason is None
    assert mk.resolve_backend("cuda", torch.device("cuda")) == "cuda"


ENTRY_POINTS = {"select_cuda", "prompt_cover_cuda", "farthest_point_sample_cuda", "dpp_greedy_cuda", "gram_cuda",
                "cuda_workspace_bytes", "cuda_workspace_layout", "CudaOp"}


def test_cuda_entry_points_exist_exactly_when_built_with_cuda():
    names = set(dir(_C)) if _C is not None else set()
    assert ENTRY_POINTS <= names if WITH_CUDA else not ENTRY_POINTS & names
    assert (CUDA.unavailable_reason is None) == WITH_CUDA


def test_backend_implements_every_primitive():
    from mob_kernels.backends import Backend

    assert isinstance(CUDA, Backend)
    for name in ("gram", "prompt_cover", "farthest_point_sample", "dpp_greedy", "independent_set", "select"):
        assert callable(getattr(CUDA, name))


@pytest.fixture
def without_cuda_build(monkeypatch):
    """The extension as a MOB_CUDA=off build leaves it (WITH_CUDA False), with the registry's backend cache emptied."""
    if _C is None:
        pytest.skip("mob_kernels._C is not built")
    monkeypatch.setattr(_C, "WITH_CUDA", False)
    monkeypatch.setattr(registry, "_loaded", {})


def test_built_without_cuda_raises_clear_error(without_cuda_build):
    assert "built without CUDA" in CUDA.unavailable_reason
    # torch.device("cuda") needs no GPU: this is the dispatch a CUDA tensor would get.
    with pytest.raises(mk.BackendUnavailableError, match="backend='cuda' is unavailable: built without CUDA"):
        mk.resolve_backend("cuda", torch.device("cuda"))
    assert "cuda" not in mk.available_backends("cuda")
    assert mk.resolve_backend("auto", torch.device("cuda")) in ("triton", "reference")
    vis, prompt, mask = problem(1, 16, 2, 8)
    fold = torch.ones(1, dtype=torch.int64)
    with pytest.raises(mk.BackendUnavailableError, match="built without CUDA"):
        CUDA.select(vis, prompt, mask, 2, 4, fold)
    with pytest.raises(mk.BackendUnavailableError, match="built without CUDA"):
        CUDA.gram(vis)


def test_mob_backend_env_forces_cuda(monkeypatch):
    monkeypatch.setenv("MOB_BACKEND", "cuda")
    if WITH_CUDA:
        assert mk.resolve_backend("auto", torch.device("cuda")) == "cuda"
    else:
        with pytest.raises(mk.BackendUnavailableError, match="built without CUDA"):
            mk.resolve_backend("auto", torch.device("cuda"))


def test_cuda_backend_on_cpu_tensors_raises():
    vis, prompt, mask = problem(1, 16, 2, 8)
    with pytest.raises(mk.BackendUnavailableError, match="backend='cuda' cannot run on cpu tensors"):
        mk.select(vis, prompt, 2, 4, backend="cuda")
    with pytest.raises(mk.BackendUnavailableError, match="cannot run on cpu tensors"):
        mk.farthest_point_sample(vis, 4, backend="cuda")
    with pytest.raises(mk.BackendUnavailableError, match="cannot run on cpu tensors"):
        mk.divprune(vis, 4, backend="cuda")
    # The adapter itself refuses host pointers too (it would hand them to kernels otherwise).
    expected = (ValueError, "needs CUDA tensors") if WITH_CUDA else (mk.BackendUnavailableError, "built without CUDA")
    fold = torch.ones(1, dtype=torch.int64)
    calls = [
        lambda: CUDA.select(vis, prompt, mask, 2, 4, fold),
        lambda: CUDA.gram(vis),
        lambda: CUDA.prompt_cover(vis, prompt, mask, 2, fold),
        lambda: CUDA.farthest_point_sample(vis, torch.empty(1, 0, dtype=torch.int64), fold, 4),
        lambda: CUDA.dpp_greedy(vis, torch.ones(1, 16), torch.ones(1, 16, dtype=torch.bool), 4),
    ]
    for call in calls:
        with pytest.raises(expected[0], match=expected[1]):
            call()


# ------------------------------------------------------------------ the extension's own checks (no kernel runs)


@needs_cuda_build
def test_workspace_op_codes_are_an_enum():
    ops = _C.CudaOp
    assert {name: int(getattr(ops, name)) for name in ("gram", "prompt_cover", "farthest_point_sample", "select",
                                                         "dpp_greedy")} == {
        "gram": 0, "prompt_cover": 1, "farthest_point_sample": 2, "select": 3, "dpp_greedy": 4}
    with pytest.raises(TypeError):
        _C.cuda_workspace_bytes(3, 1, 10)  # a plain int is not an op code


def _regions(op, B, N, L=0, k_p=0, k=0, has_sim=False, options=0):
    lay = _C.cuda_workspace_layout(getattr(_C.CudaOp, op), B, N, L, k_p, k, has_sim, options)
    assert lay["total"] == _C.cuda_workspace_bytes(getattr(_C.CudaOp, op), B, N, L, k_p, k, has_sim, options)
    return lay


@needs_cuda_build
def test_workspace_layout():
    Op = _C.CudaOp
    B, N, L, k_p, k = 3, 577, 65, 33, 70
    lay = _regions("select", B, N, L, k_p, k)
    c = lay["chunk"]
    assert c == B and lay["gram"] and not lay["rows_on_demand"]
    sizes = {"norm": 4 * N, "scale": 4 * N, "sim": 4 * L * N, "cover": 4 * N, "gram": 4 * N * N, "picks": 8 * k_p,
             "count": 8, "keys": 4 * N, "index": 4 * N, "off": N}
    assert set(lay["regions"]) == set(sizes)
    spans = sorted((at, at + c * sizes[name]) for name, at in lay["regions"].items())
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        assert a0 % 256 == 0 and a1 <= b0  # aligned and disjoint
    assert spans[-1][1] <= lay["total"] and lay["total"] % 256 == 0

    assert _C.cuda_workspace_bytes(Op.select, 2 * B, N, L, k_p, k) > lay["total"]  # grows with B
    assert _C.cuda_workspace_bytes(Op.gram, B, N) == 0  # gram writes into its output
    # FPS needs no prompt-sized scratch; with the caller's Gram matrix no Gram matrix of its own.
    fps = _regions("farthest_point_sample", B, N, k=k)
    assert fps["gram"] and "sim" not in fps["regions"] and "index" not in fps["regions"]
    with_sim = _regions("farthest_point_sample", B, N, k=k, has_sim=True)
    assert not with_sim["gram"] and not with_sim["rows_on_demand"] and "gram" not in with_sim["regions"]
    assert with_sim["total"] < fps["total"]
    # rows on demand (the option, or one sample's Gram matrix beyond the 1 GiB budget): a row buffer instead.
    od = _regions("select", B, N, L, k_p, k, options=_C.CUDA_ROWS_ON_DEMAND)
    assert od["rows_on_demand"] and "row" in od["regions"] and "gram" not in od["regions"]
    big = _regions("farthest_point_sample", 2, 16385, k=4)
    assert big["rows_on_demand"] and big["chunk"] == 2
    chunked = _regions("dpp_greedy", 64, 8192, k=8)
    assert chunked["gram"] and chunked["chunk"] * 8192 * 8192 * 4 <= _C.CUDA_GRAM_BUDGET_BYTES < 64 * 8192**2 * 4
    assert "chol" in chunked["regions"]


@needs_cuda_build
def test_workspace_query_refuses_bad_sizes():
    Op = _C.CudaOp
    for op in (Op.prompt_cover, Op.farthest_point_sample, Op.select, Op.dpp_greedy):
        assert _C.cuda_workspace_bytes(op, -1, 100, 8, 4, 8) == -1
        assert _C.cuda_workspace_bytes(op, 1 << 40, 1 << 40, 1 << 40, 4, 8) == -1  # int64 overflow is refused
        assert _C.cuda_workspace_bytes(op, 1, 100, 8, 4, 8, False, 1 << 5) == -1  # unknown option bit
        assert _C.cuda_workspace_bytes(op, 0, 100, 8, 4, 8) == 0


def _select_args(**over):
    # device, stream, B, N, L, d, dtype, vis, vis_bs, vis_rs, prompt, pr_bs, pr_rs, mask, k_p, k, fold, out, ws, ws_bytes,
    # options. Fake non-null pointers: every call below must fail before a kernel could dereference them.
    a = dict(device=0, stream=0, B=1, N=10, L=2, d=8, dtype=0, vis=64, vis_bs=80, vis_rs=8, prompt=64, pr_bs=16,
             pr_rs=8, mask=64, k_p=2, k=4, fold=64, out=64, ws=64, ws_bytes=1 << 30, options=0)
    a.update(over)
    return list(a.values())


@needs_cuda_build
@pytest.mark.parametrize(
    "over, words",
    [
        ({"k": 11}, "k must be in [0, N]"),
        ({"k_p": 5}, "k_p must be in [0, k]"),
        ({"N": -1}, "sizes must be >= 0"),
        ({"N": 1 << 31, "k": 0, "k_p": 0}, "N must be < 2^31"),
        ({"ws_bytes": 100}, "workspace too small"),
        ({"ws": 0}, "workspace must not be a null pointer"),
        ({"vis": 0}, "vis must not be a null pointer"),
        ({"fold": 0}, "fold must not be a null pointer"),
        ({"mask": 0}, "mask must not be a null pointer"),
        ({"out": 0}, "out must not be a null pointer"),
        ({"options": 8}, "options has unknown bits"),
        ({"dtype": 7}, "dtype tag"),
    ],
)
def test_select_cuda_rejects_bad_arguments_before_touching_memory(over, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        _C.select_cuda(*_select_args(**over))


@needs_cuda_build
def test_other_entry_points_reject_bad_arguments():
    P = 64  # a fake non-null pointer
    # farthest_point_sample_cuda(device, stream, B, N, d, dtype, vis, vis_bs, vis_rs, seed, m, num_picks, k, valid,
    #                            sim, sim_bs, sim_rs, out, ws, ws_bytes, options)
    fps = [0, 0, 1, 10, 8, 0, P, 80, 8, P, 2, P, 4, 0, 0, 0, 0, P, P, 1 << 30, 0]

    def fps_with(**kw):
        names = ["device", "stream", "B", "N", "d", "dtype", "vis", "vis_bs", "vis_rs", "seed", "m", "num_picks", "k",
                 "valid", "sim", "sim_bs", "sim_rs", "out", "ws", "ws_bytes", "options"]
        args = dict(zip(names, fps))
        args.update(kw)
        return list(args.values())

    for kw, words in [
        (dict(k=11), "k must be in"),
        (dict(num_picks=0), "num_picks must not be a null pointer"),
        (dict(seed=0), "seed must not be a null pointer"),
        (dict(m=-1), "m (seeds per sample) must be >= 0"),
        (dict(sim=P, sim_bs=100, sim_rs=9), "sim strides"),
        (dict(ws_bytes=10), "workspace too small"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            _C.farthest_point_sample_cuda(*fps_with(**kw))
    with pytest.raises(ValueError, match="k_p must be in"):
        _C.prompt_cover_cuda(0, 0, 1, 10, 2, 8, 0, P, 80, 8, P, 16, 8, P, 11, P, P, P, P, 1 << 30, 0)
    with pytest.raises(ValueError, match="relevance must not be a null pointer"):
        _C.dpp_greedy_cuda(0, 0, 1, 10, 8, 0, P, 80, 8, 0, P, 4, P, P, P, 1 << 30, 0)
    with pytest.raises(ValueError, match="gain must not be a null pointer"):
        _C.dpp_greedy_cuda(0, 0, 1, 10, 8, 0, P, 80, 8, P, P, 4, P, 0, P, 1 << 30, 0)
    with pytest.raises(ValueError, match="out must not be a null pointer"):
        _C.gram_cuda(0, 0, 1, 10, 8, 0, P, 80, 8, 0, 0)


@needs_cuda_build
@pytest.mark.skipif(GPU, reason="checks the no-device path; with a GPU the call would launch on fake pointers")
def test_missing_device_is_an_exception_not_a_crash():
    with pytest.raises(RuntimeError, match="mob_kernels CUDA backend: cudaSetDevice failed"):
        _C.select_cuda(*_select_args())
    with pytest.raises(RuntimeError, match="cudaSetDevice failed"):
        _C.gram_cuda(0, 0, 1, 10, 8, 0, 64, 80, 8, 64, 0)


def test_eps_mirrors_the_kernels():
    assert EPS == 1e-12  # csrc/cuda/common.cuh kEps (and kNanRank, kDppStop) mirror reference.py


# ------------------------------------------------------------------------------------------------------ GPU tests

DEV = "cuda"


def _to(dev, *tensors):
    return [None if t is None else t.to(dev) for t in tensors]


@pytest.fixture(params=["shared", "global-workspace", "rows-on-demand"])
def path(request, monkeypatch):
    """The homes of the per-sample arrays (shared memory, the global workspace: the path for N too large for shared
    memory) and the two sources of similarity rows (the Gram matrix; rows computed on demand: the path for N beyond
    the Gram budget)."""
    monkeypatch.setattr(cuda_backend, "FORCE_GLOBAL_WORKSPACE", request.param == "global-workspace")
    monkeypatch.setattr(cuda_backend, "ROWS_ON_DEMAND", request.param == "rows-on-demand")
    return request.param


# (B, N, L, d, k_p, k, fold, ragged): shapes test_select_exact.py also uses (well-conditioned seeds exist for them).
SELECT_CASES = {
    "llava-like": (1, 576, 32, 64, 16, 32, None, False),
    "ragged-L64": (2, 1000, 64, 8, 16, 32, None, True),
    "ragged-L200": (3, 200, 200, 32, 16, 32, None, True),
    "fold-set": (1, 300, 4, 16, 12, 24, 5, False),
    "kp=k": (2, 500, 8, 8, 32, 32, None, False),
    "kp=0": (1, 40, 3, 7, 0, 5, None, False),
    "d=2": (1, 30, 3, 2, 2, 4, None, False),
    "d=4096": (1, 32, 2, 4096, 4, 8, None, False),
    "N=3000": (1, 3000, 16, 8, 8, 16, None, False),
    "k=N=3000": (1, 3000, 8, 8, 8, 3000, 2, False),
}


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_matches_reference(case, dtype, path):
    B, N, L, d, k_p, k, fold, ragged = SELECT_CASES[case]
    vis, prompt, mask = well_conditioned(B, N, L, d, k_p, k, fold, dtype, ragged)
    want = mk.select(vis, prompt, k_p, k, fold=fold, prompt_mask=mask, backend="reference")
    v, p, m = _to(DEV, vis, prompt, mask)
    got = mk.select(v, p, k_p, k, fold=fold, prompt_mask=m, backend="cuda")
    assert_valid(got.cpu(), B, N, k)
    assert torch.equal(got.cpu(), want)


@gpu_only
def test_select_unbatched_strided_and_padding_rows():
    N, L, d, k_p, k = 160, 8, 64, 12, 30
    for seed in range(40):  # padding rows 5.. of the prompt; well-conditioned with them left out
        vis, prompt, _ = problem(1, N, L, d, torch.float16, seed=seed)
        mask = torch.arange(L) < 5
        if decision_margin(vis[0], prompt[0], mask, k_p, k) >= WELL_CONDITIONED:
            break
    want = mk.select(vis[0], prompt[0], k_p, k, prompt_mask=mask, backend="reference")
    # Row and batch strides are free: a padded feature buffer viewed down to d columns, rows two apart (16-byte
    # aligned rows: the cp.async path), and the same rows one element off (unaligned: the plain-load path).
    big = torch.zeros(2 * N + 1, d + 16, dtype=torch.float16, device=DEV)
    for lead in (0, 1):
        flat = big.view(-1)[lead:lead + 2 * N * (d + 16)].view(2 * N, d + 16)
        flat[::2, :d] = vis[0].to(DEV)
        v = flat[::2, :d]
        assert v.stride() == (2 * (d + 16), 1)
        got = mk.select(v, prompt[0].to(DEV), k_p, k, prompt_mask=mask.to(DEV), backend="cuda")
        assert got.shape == (k,)
        assert torch.equal(got.cpu(), want)


def _cover_case(B, N, L, d, k_p, fold, dtype, tries=40):
    for seed in range(tries):
        vis, prompt, mask = problem(B, N, L, d, dtype, seed=seed)
        if all(cover_margin(vis[b], prompt[b], k_p, fold, ordered=True)[0] >= WELL_CONDITIONED for b in range(B)):
            return vis, prompt, mask
    raise AssertionError("no well-conditioned seed for prompt_cover")


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_p, fold", [(12, 0), (30, 7), (100, 2)])  # (100, 2): <= 10 candidates, -1 padding
def test_prompt_cover_matches_reference(dtype, k_p, fold, path):
    vis, prompt, mask = _cover_case(2, 150, 5, 48, k_p, fold, dtype)
    want_picks, want_count = mk.prompt_cover(vis, prompt, k_p, fold=fold, backend="reference")
    picks, count = mk.prompt_cover(vis.to(DEV), prompt.to(DEV), k_p, fold=fold, backend="cuda")
    assert torch.equal(count.cpu(), want_count)
    assert torch.equal(picks.cpu(), want_picks)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 150, 48), (1, 577, 4096), (3, 64, 8), (1, 5, 3), (2, 130, 1000)], ids=str)
def test_gram_matches_reference(dtype, shape):
    vis = gaussian(shape, dtype, seed=sum(shape))
    vis[0, 1] = 0.0  # a zero row: cosine 0 with everything
    want = REF.gram(vis)
    got = CUDA.gram(vis.to(DEV)).cpu()
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, got.transpose(1, 2))  # exactly symmetric: one accumulator per pair
    # float32-level error (3xTF32 for float32; exact 16-bit products, float32 accumulation otherwise)
    tol = 2e-6 * max(1.0, shape[2] ** 0.5)
    assert torch.allclose(got, want, atol=tol, rtol=0), float((got - want).abs().max())


@gpu_only
def test_gram_special_rows_follow_the_reference():
    vis = gaussian((1, 70, 16), torch.float32, seed=3)
    vis[0, 2, 5] = float("nan")  # NaN row: every similarity with it NaN
    vis[0, 3, 1] = float("inf")  # inf row: its unit row holds NaN, so NaN too
    vis[0, 4] = 1e30  # finite, but its squared norm overflows float32: unit row 0, similarities 0
    want, got = REF.gram(vis), CUDA.gram(vis.to(DEV)).cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert (got[0, 4][~torch.isnan(got[0, 4])] == 0).all()
    ok = ~torch.isnan(want)
    assert torch.allclose(got[ok], want[ok], atol=1e-5)


def _fps_case(N, d, seeds, k, dtype, valid=None, tries=40):
    for s in range(tries):
        vis = gaussian((N, d), dtype, seed=100 + s)
        distinct = list(dict.fromkeys(x for x in seeds if x >= 0))
        if valid is None:
            margin = fps_margin(vis, distinct, k)
        else:  # FPS over the valid tokens only (seeds are valid here)
            keep = valid.nonzero().flatten().tolist()
            margin = fps_margin(vis[valid], [keep.index(x) for x in distinct], k)
        if margin >= WELL_CONDITIONED:
            return vis
    raise AssertionError("no well-conditioned seed for farthest_point_sample")


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seeds", [[], [-1, -1], [7, -1, 3, 7], [0, 1, 2, 3, 4]], ids=str)
def test_farthest_point_sample_matches_reference(dtype, seeds, path):
    N, d, k = 300, 32, 24
    vis = _fps_case(N, d, seeds, k, dtype)
    seed = torch.tensor(seeds, dtype=torch.int64) if seeds else None
    want = mk.farthest_point_sample(vis, k, seed, backend="reference")
    got = mk.farthest_point_sample(vis.to(DEV), k, None if seed is None else seed.to(DEV), backend="cuda")
    assert torch.equal(got.cpu(), want)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_sim", [False, True], ids=["own-gram", "callers-sim"])
def test_farthest_point_sample_valid_and_sim_match_reference(dtype, with_sim, path):
    N, d, k = 200, 24, 30
    valid = torch.rand(N, generator=torch.Generator().manual_seed(1)) < 0.7
    seeds = [int(valid.nonzero()[3]), -1]
    vis = _fps_case(N, d, seeds, k, dtype, valid)
    v, s, ok = vis.unsqueeze(0), torch.tensor([seeds]), valid.unsqueeze(0)
    num = torch.tensor([k])
    sim = REF.gram(v) if with_sim else None
    want = REF.farthest_point_sample(v, s, num, k, ok, sim)
    got = CUDA.farthest_point_sample(*_to(DEV, v, s, num), k, ok.to(DEV), None if sim is None else sim.to(DEV))
    assert torch.equal(got.cpu(), want)
    assert not set(got[0].tolist()) - {-1} & set((~valid).nonzero().flatten().tolist())  # never an invalid token


@gpu_only
def test_farthest_point_sample_pads_past_the_untaken_tokens():
    vis = gaussian((2, 12, 8), torch.float32, seed=5)
    seed = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [-1] * 10])
    got = mk.farthest_point_sample(vis.to(DEV), 5, seed.to(DEV), backend="cuda").cpu()
    assert (got[0, 2:] == -1).all() and set(got[0, :2].tolist()) == {10, 11}
    assert torch.equal(got[1], mk.farthest_point_sample(vis[1], 5, backend="reference"))


def _dpp_case(B, N, d, k, dtype, tries=40):
    for s in range(tries):
        g = torch.Generator().manual_seed(s)
        vis = gaussian((B, N, d), dtype, seed=200 + s)
        rel = torch.rand(B, N, generator=g) + 0.1
        valid = torch.rand(B, N, generator=g) < 0.8
        if all(dpp_margin(vis[b], rel[b], k, valid[b]) >= WELL_CONDITIONED for b in range(B)):
            return vis, rel, valid
    raise AssertionError("no well-conditioned seed for dpp_greedy")


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, d, k", [(120, 32, 20), (64, 16, 12), (300, 48, 40)])
def test_dpp_greedy_matches_reference(dtype, N, d, k, path):
    vis, rel, valid = _dpp_case(2, N, d, k, dtype)
    want_order, want_gain = REF.dpp_greedy(vis, rel, valid, k)
    order, gain = CUDA.dpp_greedy(*_to(DEV, vis, rel, valid), k)
    assert torch.equal(order.cpu(), want_order)
    assert torch.allclose(gain.cpu(), want_gain, rtol=1e-4, atol=1e-6)
    assert (gain.cpu()[want_order == -1] == 0).all()


@gpu_only
@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
def test_methods_run_on_the_native_primitives(method):
    vis = gaussian((2, 200, 32), torch.float32, seed=9)
    rel = torch.rand(2, 200, generator=torch.Generator().manual_seed(9))
    run = (lambda v, r, b: mk.divprune(v, 40, backend=b)) if method == "divprune" else (
        lambda v, r, b: mk.cdpruner(v, r, 40, backend=b))
    got = run(vis.to(DEV), rel.to(DEV), "cuda").cpu()
    assert_valid(got, 2, 200, 40)
    assert torch.equal(got, run(vis.to(DEV), rel.to(DEV), "cuda").cpu())  # deterministic


@gpu_only
def test_large_n_takes_the_global_workspace_path():
    # 60000 tokens: the per-sample arrays (~540 KB) exceed any GPU's shared memory per block, and the Gram matrix
    # (14 GB) the budget: rows are computed on demand.
    B, N, L, d, k_p, k = 1, 60000, 4, 64, 4, 10
    vis, prompt, mask = well_conditioned(B, N, L, d, k_p, k, tries=10)
    assert _C.cuda_workspace_layout(_C.CudaOp.select, B, N, L, k_p, k, False, 0)["rows_on_demand"]
    want = mk.select(vis, prompt, k_p, k, backend="reference")
    assert torch.equal(mk.select(vis.to(DEV), prompt.to(DEV), k_p, k, backend="cuda").cpu(), want)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_input_gives_a_valid_deterministic_selection(dtype):
    B, N, L, d, k_p, k = 3, 64, 5, 16, 10, 40
    vis, prompt, _ = problem(B, N, L, d, dtype, seed=3)
    vis[0, 10:30] = vis[0, 5]  # exact duplicates: ties everywhere
    vis[1, 3] = float("nan")
    vis[1, 4] = 0.0
    vis[1, 5, 0] = float("inf")
    vis[2] = 1.0  # every token identical
    prompt[1, 0, 2] = float("nan")
    v, p = _to(DEV, vis, prompt)
    first = mk.select(v, p, k_p, k, backend="cuda")
    assert_valid(first.cpu(), B, N, k)
    assert torch.equal(first, mk.select(v, p, k_p, k, backend="cuda"))
    assert torch.equal(first[2].cpu(), torch.arange(k))  # identical tokens: ties go to the lower index
    all_nan = torch.full((1, 20, 8), float("nan"), dtype=dtype, device=DEV)
    assert_valid(mk.select(all_nan, all_nan[:, :3], 2, 20, backend="cuda").cpu(), 1, 20, 20)
    for fn in (lambda x: mk.divprune(x, 30, backend="cuda"),
               lambda x: mk.cdpruner(x, torch.rand(B, N, device=DEV), 30, backend="cuda")):
        assert_valid(fn(v).cpu(), B, N, 30)


@gpu_only
def test_empty_budgets_and_batches():
    vis, prompt, _ = _to(DEV, *problem(2, 30, 3, 8))
    assert mk.select(vis, prompt, 0, 0, backend="cuda").shape == (2, 0)
    assert torch.equal(mk.select(vis, prompt, 0, 30, backend="cuda").cpu(), torch.arange(30).expand(2, 30))
    assert mk.select(vis[:0], prompt[:0], 2, 4, backend="cuda").shape == (0, 4)
    picks, count = mk.prompt_cover(vis, prompt[:, :0], 3, backend="cuda")  # no prompt rows: no cover
    assert (picks == -1).all() and (count == 0).all()
    picks, count = mk.prompt_cover(vis, prompt, 0, backend="cuda")
    assert picks.shape == (2, 0) and (count == 0).all()
    assert CUDA.gram(vis[:, :0]).shape == (2, 0, 0)
    order, gain = CUDA.dpp_greedy(vis, torch.ones(2, 30, device=DEV), torch.zeros(2, 30, dtype=torch.bool,
                                                                                    device=DEV), 5)
    assert (order == -1).all() and (gain == 0).all()  # nothing valid: stops at once


def _conditioned_select(B, N, L, d, k_p, k, dtype, first_seed):
    for seed in range(first_seed, first_seed + 40):
        vis, prompt, mask = problem(B, N, L, d, dtype, seed=seed)
        if decision_margin(vis, prompt, mask, k_p, k) >= WELL_CONDITIONED:
            return vis, prompt
    raise AssertionError("no well-conditioned seed")


@gpu_only
def test_runs_on_the_callers_stream_and_graph_capture():
    B, N, L, d, k_p, k = 1, 576, 32, 64, 16, 32
    vis, prompt = _conditioned_select(B, N, L, d, k_p, k, torch.bfloat16, 0)
    want = mk.select(vis, prompt, k_p, k, backend="reference")
    v, p = _to(DEV, vis, prompt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = mk.select(v, p, k_p, k, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got.cpu(), want)

    # No host sync inside select: it can be captured in a CUDA graph and replayed on new inputs.
    static_v, static_p = v.clone(), p.clone()
    mk.select(static_v, static_p, k_p, k, backend="cuda")  # warm-up outside the capture
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        static_out = mk.select(static_v, static_p, k_p, k, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    vis2, prompt2 = _conditioned_select(B, N, L, d, k_p, k, torch.bfloat16, 100)
    for new_v, new_p in ((vis2, prompt2), (vis, prompt)):
        static_v.copy_(new_v.to(DEV))
        static_p.copy_(new_p.to(DEV))
        graph.replay()
        assert torch.equal(static_out.cpu(), mk.select(new_v, new_p, k_p, k, backend="reference"))


@gpu_only
def test_every_primitive_can_be_graph_captured():
    vis = gaussian((2, 256, 64), torch.float16, seed=4).to(DEV)
    rel = torch.rand(2, 256, device=DEV)
    ok = torch.ones(2, 256, dtype=torch.bool, device=DEV)
    calls = [
        lambda: CUDA.gram(vis),
        lambda: CUDA.dpp_greedy(vis, rel, ok, 16)[0],
        lambda: mk.divprune(vis, 16, backend="cuda"),
        lambda: mk.farthest_point_sample(vis, 16, backend="cuda"),
    ]
    for call in calls:
        want = call()  # warm-up (and the eager result)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_triton(dtype):
    if "triton" not in mk.available_backends(DEV):
        pytest.skip("triton backend unavailable on this GPU")
    for case in ("llava-like", "ragged-L64", "fold-set", "kp=0"):
        B, N, L, d, k_p, k, fold, ragged = SELECT_CASES[case]
        vis, prompt, mask = _to(DEV, *well_conditioned(B, N, L, d, k_p, k, fold, dtype, ragged))
        assert torch.equal(
            mk.select(vis, prompt, k_p, k, fold=fold, prompt_mask=mask, backend="cuda"),
            mk.select(vis, prompt, k_p, k, fold=fold, prompt_mask=mask, backend="triton"),
        )


@gpu_only
def test_auto_dispatch_prefers_triton_then_cuda(monkeypatch):
    want = "triton" if "triton" in mk.available_backends(DEV) else "cuda"
    assert mk.resolve_backend("auto", torch.device(DEV)) == want
    monkeypatch.setattr(registry, "_loaded", {**registry._loaded, "triton": "not installed"})
    assert mk.resolve_backend("auto", torch.device(DEV)) == "cuda"
