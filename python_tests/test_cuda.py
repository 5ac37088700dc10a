"""CUDA C++ backend (csrc/cuda, mob_kernels/cuda.py).

Without a GPU (this project's CI machines) the build and dispatch tests run: the extension reports WITH_CUDA when it
was built with nvcc, the CUDA entry points reject bad arguments and report a missing device as an exception instead of
crashing, backend="cuda" on CPU tensors and a build without CUDA raise clear errors. The GPU tests (skipped without
one) require exactly the reference's indices on well-conditioned inputs (mob_testing.well_conditioned: every decision
wins by SPEC.md §4's margin in a float64 replay), valid output on any input, run-to-run determinism, the
global-workspace path for N too large for shared memory, the caller's stream, CUDA-graph capture, and agreement with
the Triton backend.
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

import mob_kernels as mk
from mob_kernels import cuda as cuda_backend
from mob_kernels import ops, reference

from mob_testing import (
    DTYPES,
    WELL_CONDITIONED,
    assert_valid,
    cover_margin,
    decision_margin,
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


# ------------------------------------------------------------------------------------------- build and dispatch


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("MOB_CUDA", "auto").lower() == "off",
    reason="WITH_CUDA is expected only from a build with nvcc on PATH (and MOB_CUDA not off)",
)
def test_extension_reports_with_cuda_when_built_with_nvcc():
    assert _C is not None
    assert _C.WITH_CUDA is True, "nvcc is on PATH but mob_kernels._C was built without CUDA: rebuild with pip install -e ."
    assert _C.CUDA_RUNTIME_VERSION >= 11000
    assert cuda_backend.AVAILABLE and cuda_backend.UNAVAILABLE_REASON == ""
    assert mk.resolve_backend("cuda", torch.device("cuda")) == "cuda"


def test_cuda_entry_points_exist_exactly_when_built_with_cuda():
    names = {"select_cuda", "prompt_cover_cuda", "farthest_point_sample_cuda", "cuda_workspace_bytes"}
    assert names <= set(dir(_C)) if WITH_CUDA else not names & set(dir(_C))
    assert cuda_backend.AVAILABLE == WITH_CUDA


@pytest.fixture
def without_cuda_build(monkeypatch):
    """The extension as a MOB_CUDA=off build leaves it (WITH_CUDA False), with ops.py's backend cache emptied."""
    if _C is None:
        pytest.skip("mob_kernels._C is not built")
    monkeypatch.setattr(_C, "WITH_CUDA", False)
    monkeypatch.setattr(ops, "_loaded", {})


def test_built_without_cuda_raises_clear_error(without_cuda_build):
    assert not cuda_backend.AVAILABLE
    assert "built without CUDA" in cuda_backend.UNAVAILABLE_REASON
    # torch.device("cuda") needs no GPU: this is the dispatch a CUDA tensor would get.
    with pytest.raises(mk.BackendUnavailableError, match="backend='cuda' is unavailable: built without CUDA"):
        mk.resolve_backend("cuda", torch.device("cuda"))
    assert "cuda" not in mk.available_backends("cuda")
    assert mk.resolve_backend("auto", torch.device("cuda")) in ("triton", "reference")
    vis, prompt, mask = problem(1, 16, 2, 8)
    with pytest.raises(mk.BackendUnavailableError, match="built without CUDA"):
        cuda_backend.select(vis, prompt, mask, 2, 4, 0)


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
    # The adapter itself refuses host pointers too (it would hand them to kernels otherwise).
    expected = (ValueError, "needs CUDA tensors") if WITH_CUDA else (mk.BackendUnavailableError, "built without CUDA")
    with pytest.raises(expected[0], match=expected[1]):
        cuda_backend.select(vis, prompt, mask, 2, 4, 0)


# ------------------------------------------------------------------ the extension's own checks (no kernel runs)

needs_cuda_build = pytest.mark.skipif(not WITH_CUDA, reason="mob_kernels._C built without CUDA")


@needs_cuda_build
def test_workspace_bytes_layout():
    for op in (0, 1, 2):
        small = _C.cuda_workspace_bytes(op, 1, 100, 8, 4)
        assert small > 0 and small % 256 == 0
        assert _C.cuda_workspace_bytes(op, 2, 100, 8, 4) > small  # grows with B
        assert _C.cuda_workspace_bytes(op, -1, 100, 8, 4) == -1
        assert _C.cuda_workspace_bytes(op, 1 << 40, 1 << 40, 1 << 40, 4) == -1  # int64 overflow is refused
    assert _C.cuda_workspace_bytes(3, 1, 1, 1, 1) == -1
    # FPS needs no prompt-sized scratch; select needs at least what either stage needs.
    assert _C.cuda_workspace_bytes(1, 1, 100, 10**6, 4) == _C.cuda_workspace_bytes(1, 1, 100, 1, 4)
    assert _C.cuda_workspace_bytes(2, 3, 500, 20, 9) >= max(_C.cuda_workspace_bytes(op, 3, 500, 20, 9) for op in (0, 1))


def _select_args(**over):
    # device, stream, B, N, L, d, dtype, vis, vis_bs, vis_rs, prompt, pr_bs, pr_rs, mask, k_p, k, fold, out, ws, ws_bytes,
    # options. Null pointers: every call below must fail before a kernel could dereference them.
    a = dict(device=0, stream=0, B=1, N=10, L=2, d=8, dtype=0, vis=0, vis_bs=80, vis_rs=8, prompt=0, pr_bs=16,
             pr_rs=8, mask=0, k_p=2, k=4, fold=0, out=0, ws=0, ws_bytes=1 << 30, options=0)
    a.update(over)
    return list(a.values())


@needs_cuda_build
@pytest.mark.parametrize(
    "over, words",
    [
        ({"k": 11}, "k must be in [0, N]"),
        ({"k_p": 5}, "k_p must be in [0, k]"),
        ({"fold": -1}, "fold must be >= 0"),
        ({"N": -1}, "sizes must be >= 0"),
        ({"ws_bytes": 100}, "workspace too small"),
        ({"dtype": 7}, "dtype tag"),
    ],
)
def test_select_cuda_rejects_bad_arguments_before_touching_memory(over, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        _C.select_cuda(*_select_args(**over))


@needs_cuda_build
def test_fps_and_cover_entry_points_reject_bad_arguments():
    with pytest.raises(ValueError, match="k must be in"):
        _C.farthest_point_sample_cuda(0, 0, 1, 10, 8, 0, 0, 80, 8, 0, 0, 0, 11, 0, 0, 1 << 30, 0)
    with pytest.raises(ValueError, match="num_picks must not be null"):
        _C.farthest_point_sample_cuda(0, 0, 1, 10, 8, 0, 0, 80, 8, 0, 0, 0, 4, 0, 0, 1 << 30, 0)
    with pytest.raises(ValueError, match="k_p must be in"):
        _C.prompt_cover_cuda(0, 0, 1, 10, 2, 8, 0, 0, 80, 8, 0, 16, 8, 0, 11, 0, 0, 0, 0, 1 << 30, 0)


@needs_cuda_build
@pytest.mark.skipif(GPU, reason="checks the no-device path; with a GPU the call would launch on null pointers")
def test_missing_device_is_an_exception_not_a_crash():
    with pytest.raises(RuntimeError, match="mob_kernels CUDA backend: cudaSetDevice failed"):
        _C.select_cuda(*_select_args())


# ------------------------------------------------------------------------------------------------------ GPU tests

DEV = "cuda"


def _to(dev, *tensors):
    return [None if t is None else t.to(dev) for t in tensors]


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


@pytest.fixture(params=[False, True], ids=["shared", "global-workspace"])
def workspace_path(request, monkeypatch):
    """Both homes of the per-sample arrays: shared memory and the global workspace (the path for N too large)."""
    monkeypatch.setattr(cuda_backend, "FORCE_GLOBAL_WORKSPACE", request.param)
    return request.param


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_matches_reference(case, dtype, workspace_path):
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
    # Row and batch strides are free: a padded feature buffer viewed down to d columns, rows two apart.
    big = torch.zeros(2 * N, d + 16, dtype=torch.float16, device=DEV)
    big[::2, :d] = vis[0].to(DEV)
    v = big[::2, :d]
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
def test_prompt_cover_matches_reference(dtype, k_p, fold, workspace_path):
    vis, prompt, mask = _cover_case(2, 150, 5, 48, k_p, fold, dtype)
    want_picks, want_count = mk.prompt_cover(vis, prompt, k_p, fold=fold, backend="reference")
    picks, count = mk.prompt_cover(vis.to(DEV), prompt.to(DEV), k_p, fold=fold, backend="cuda")
    assert torch.equal(count.cpu(), want_count)
    assert torch.equal(picks.cpu(), want_picks)


def _fps_case(N, d, seeds, k, dtype, tries=40):
    for s in range(tries):
        vis = gaussian((N, d), dtype, seed=100 + s)
        distinct = list(dict.fromkeys(x for x in seeds if x >= 0))
        if fps_margin(vis, distinct, k) >= WELL_CONDITIONED:
            return vis
    raise AssertionError("no well-conditioned seed for farthest_point_sample")


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seeds", [[], [-1, -1], [7, -1, 3, 7], [0, 1, 2, 3, 4]], ids=str)
def test_farthest_point_sample_matches_reference(dtype, seeds, workspace_path):
    N, d, k = 300, 32, 24
    vis = _fps_case(N, d, seeds, k, dtype)
    seed = torch.tensor(seeds, dtype=torch.int64) if seeds else None
    want = mk.farthest_point_sample(vis, k, seed, backend="reference")
    got = mk.farthest_point_sample(vis.to(DEV), k, None if seed is None else seed.to(DEV), backend="cuda")
    assert torch.equal(got.cpu(), want)


@gpu_only
def test_farthest_point_sample_pads_past_the_untaken_tokens():
    vis = gaussian((2, 12, 8), torch.float32, seed=5)
    seed = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [-1] * 10])
    got = mk.farthest_point_sample(vis.to(DEV), 5, seed.to(DEV), backend="cuda").cpu()
    assert (got[0, 2:] == -1).all() and set(got[0, :2].tolist()) == {10, 11}
    assert torch.equal(got[1], mk.farthest_point_sample(vis[1], 5, backend="reference"))


@gpu_only
def test_large_n_takes_the_global_workspace_path():
    # 60000 tokens need ~300 KB of per-sample arrays: more than any GPU's shared memory per block.
    B, N, L, d, k_p, k = 1, 60000, 4, 64, 4, 10
    vis, prompt, mask = well_conditioned(B, N, L, d, k_p, k, tries=10)
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


@gpu_only
def test_empty_budgets_and_batches():
    vis, prompt, _ = _to(DEV, *problem(2, 30, 3, 8))
    assert mk.select(vis, prompt, 0, 0, backend="cuda").shape == (2, 0)
    assert torch.equal(mk.select(vis, prompt, 0, 30, backend="cuda").cpu(), torch.arange(30).expand(2, 30))
    assert mk.select(vis[:0], prompt[:0], 2, 4, backend="cuda").shape == (0, 4)
    picks, count = mk.prompt_cover(vis, prompt[:, :0], 3, backend="cuda")  # no prompt rows: no cover
    assert (picks == -1).all() and (count == 0).all()


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
    want = "triton" if ops._module("triton") is not None else "cuda"
    assert mk.resolve_backend("auto", torch.device(DEV)) == want
    monkeypatch.setattr(ops, "_loaded", {**ops._loaded, "triton": None})  # as if triton were not installed
    assert mk.resolve_backend("auto", torch.device(DEV)) == "cuda"
    assert reference.EPS == 1e-12  # the kernels' eps (csrc/cuda/common.cuh kEps) mirrors the reference's
