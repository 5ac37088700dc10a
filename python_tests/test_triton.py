"""Triton backend vs the reference (SPEC.md §4). Without a GPU the kernels run on CPU tensors through Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1), so shapes stay small; the CUDA-only tests at the bottom cover the
model shapes, CUDA-graph capture and torch.compile.

Inputs are fixed-seed Gaussians rounded through the test dtype (so every backend sees the same exactly-representable
values); exact index equality with the reference is required, never a tolerance.
"""

import pytest
import torch

import mob_kernels as mk
from mob_kernels import reference
from mob_kernels.triton_farthest_point_sample import farthest_point_sample as triton_fps
from mob_kernels.triton_prompt_cover import prompt_cover as triton_cover

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def features(shape, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


def assert_valid(sel, N, k):
    sel = sel.reshape(-1, k).cpu()
    assert sel.shape[1] == k
    assert ((sel >= 0) & (sel < N)).all(), sel
    assert (sel[:, 1:] > sel[:, :-1]).all(), f"not sorted and distinct: {sel}"


# (B, N, L, d, k_p, k, fold, mask kind)
SELECT_CASES = {
    "masked-autofold": (2, 300, 24, 64, 16, 40, None, "random"),
    "kp=k-fold-set": (3, 96, 8, 32, 24, 24, 5, "random"),
    "kp=0-d256": (1, 200, 12, 256, 0, 30, None, "all"),
    "empty-mask-and-few-candidates": (2, 120, 4, 48, 12, 20, 1, "first-empty-second-two"),
}


def make_mask(kind, B, L, seed):
    if kind == "all":
        return None
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        m = torch.rand(B, L, generator=g) > 0.3
        m[:, 0] = True
        return m.to(DEV)
    m = torch.zeros(B, L, dtype=torch.bool)
    m[1, 1:3] = True  # sample 0: no valid prompt row (pure FPS); sample 1: fold 1 x 2 rows = 2 candidates < k_p
    return m.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_select_matches_reference(dtype, case):
    B, N, L, d, k_p, k, fold, mask_kind = SELECT_CASES[case]
    seed = 10 * list(SELECT_CASES).index(case) + DTYPES.index(dtype)
    vis, prompt = features((B, N, d), dtype, seed), features((B, L, d), dtype, seed + 7)
    mask = make_mask(mask_kind, B, L, seed)
    got = mk.select(vis, prompt, k_p, k, fold=fold, prompt_mask=mask, backend="triton")
    want = mk.select(vis.cpu(), prompt.cpu(), k_p, k, fold=fold, prompt_mask=None if mask is None else mask.cpu(),
                     backend="reference")
    assert_valid(got, N, k)
    assert torch.equal(got.cpu(), want)


def test_select_unbatched_matches_reference():
    vis, prompt = features((150, 40), torch.bfloat16, 11), features((6, 40), torch.bfloat16, 12)
    got = mk.select(vis, prompt, 8, 16, backend="triton")
    assert got.shape == (16,)
    assert torch.equal(got.cpu(), mk.select(vis.cpu(), prompt.cpu(), 8, 16, backend="reference"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prompt_cover_tiled_paths(dtype):
    # block_n=32 -> 5 similarity programs per sample finishing through the ticket; fin_block_n=64 -> the multi-tile
    # top-f passes (fold 3) and the multi-tile top-k_p passes.
    B, N, L, d, k_p = 2, 150, 10, 48, 20
    vis, prompt = features((B, N, d), dtype, 21), features((B, L, d), dtype, 22)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
    mask[1, 5:] = False
    for fold in (0, 3):
        picks, count = triton_cover(vis, prompt, mask, k_p, fold, block_n=32, block_d=16, fin_block_n=64)
        want_picks, want_count = reference.prompt_cover(vis.cpu(), prompt.cpu(), mask.cpu(), k_p, fold)
        assert torch.equal(count.cpu(), want_count)
        assert torch.equal(picks.cpu(), want_picks)


def test_prompt_cover_sorted_top_path_and_front_door():
    B, N, L, d, k_p = 2, 64, 9, 32, 30  # k_p > candidates with fold 2 x 9 rows: -1 padding
    vis, prompt = features((B, N, d), torch.float32, 31), features((B, L, d), torch.float32, 32)
    mask = torch.ones(B, L, dtype=torch.bool, device=DEV)
    got = triton_cover(vis, prompt, mask, k_p, 2, sort_top=True)
    want = reference.prompt_cover(vis.cpu(), prompt.cpu(), mask.cpu(), k_p, 2)
    assert (want[1] < k_p).all()  # the padding case is really exercised
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    picks, count = mk.prompt_cover(vis[0], prompt[0], 12, backend="triton")
    want_picks, want_count = mk.prompt_cover(vis[0].cpu(), prompt[0].cpu(), 12, backend="reference")
    assert picks.shape == (12,) and torch.equal(picks.cpu(), want_picks) and int(count) == int(want_count)


# (use_gram, block_n): Gram on chip, per-step on chip, Gram tiled, per-step tiled.
FPS_PATHS = {"gram-onchip": (True, None), "perstep-onchip": (False, None), "gram-tiled": (True, 64),
             "perstep-tiled": (False, 64)}


@pytest.mark.parametrize("path", list(FPS_PATHS))
def test_farthest_point_sample_paths(path):
    use_gram, block_n = FPS_PATHS[path]
    dtype = DTYPES[list(FPS_PATHS).index(path) % 3]
    B, N, d, k = 3, 100, 40, 16
    vis = features((B, N, d), dtype, 41)
    # seeds with -1 padding and a duplicate; sample 2 unseeded (largest-norm first pick); num_picks below and at k.
    seed = torch.tensor([[5, -1, 77, 5], [-1, -1, -1, 99], [-1, -1, -1, -1]], device=DEV)
    num_picks = torch.tensor([k, 7, k], device=DEV)  # block_n=64 gives 2 tiles of N=100
    got = triton_fps(vis, k, seed, num_picks, use_gram=use_gram, block_n=block_n, gram_block=32)
    want = reference.farthest_point_sample(vis.cpu(), seed.cpu(), num_picks.cpu(), k)
    assert (got[1, 7:] == -1).all()
    assert torch.equal(got.cpu(), want)
    # select's mode: k - #distinct seeds picks, sorted union written by the kernel.
    union = triton_fps(vis, k, seed, fill_to_k=True, sorted_union=True, use_gram=use_gram, block_n=block_n)
    assert_valid(union, N, k)
    for b in range(B):
        seeds = set(seed[b][seed[b] >= 0].tolist())
        n_new = k - len(seeds)
        picks = reference.farthest_point_sample(vis[b : b + 1].cpu(), seed[b : b + 1].cpu(), torch.tensor([n_new]), k)
        expect = sorted(seeds | set(picks[0, :n_new].tolist()))
        assert union[b].tolist() == expect


def test_farthest_point_sample_front_door_all_tokens():
    # k = N: every token exactly once, whatever the order.
    vis = features((2, 40, 16), torch.float16, 51)
    got = mk.farthest_point_sample(vis, 40, backend="triton")
    want = mk.farthest_point_sample(vis.cpu(), 40, backend="reference")
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.sort(1).values.cpu(), torch.arange(40).expand(2, 40))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy under the interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_zero_duplicate_rows_stay_valid_and_match_reference(dtype):
    B, N, L, d = 2, 48, 6, 24
    vis = features((B, N, d), dtype, 61)
    prompt = features((B, L, d), dtype, 62)
    vis[0, 3] = float("nan")
    vis[0, 10, 5] = float("nan")
    vis[0, 20:26] = 0.0  # zero rows: unit vector 0, distance 1 to everything
    vis[1, 24:48] = vis[1, 0:24]  # every token duplicated: half the distances become exactly 0
    vis[1, 7] = float("inf")
    prompt[0, 2] = float("nan")
    prompt[1, 1] = 0.0
    for k_p, k in ((10, 30), (0, N), (20, N)):
        got = mk.select(vis, prompt, k_p, k, backend="triton")
        assert_valid(got, N, k)
        assert torch.equal(got, mk.select(vis, prompt, k_p, k, backend="triton"))  # deterministic
        want = mk.select(vis.cpu(), prompt.cpu(), k_p, k, backend="reference")
        # Sample 0 (NaN and zero rows) decides nothing by a near-tie: exact. In sample 1 a duplicate of a taken token
        # has distance 0 up to rounding, so once every distinct row is covered the order among duplicates is a genuine
        # tie (SPEC §4 promises validity there, not equality); what FPS must do is cover all 24 distinct rows first.
        assert torch.equal(got[0].cpu(), want[0])
        assert set((got[1] % 24).tolist()) == set(range(24))
    # FPS alone until every token is taken, NaN rows included (picked last, never twice).
    picks = mk.farthest_point_sample(vis, N, backend="triton")
    assert torch.equal(picks.sort(1).values.cpu(), torch.arange(N).expand(B, N))
    assert torch.equal(picks[0].cpu(), mk.farthest_point_sample(vis[0].cpu(), N, backend="reference"))
    assert set((picks[1, :24] % 24).tolist()) == set(range(24))


def test_all_nan_sample_still_returns_k_distinct():
    vis = torch.full((1, 50, 16), float("nan"), device=DEV)
    prompt = features((1, 4, 16), torch.float32, 71)
    got = mk.select(vis, prompt, 5, 12, backend="triton")
    assert_valid(got, 50, 12)
    assert torch.equal(got.cpu(), mk.select(vis.cpu(), prompt.cpu(), 5, 12, backend="reference"))


# ------------------------------------------------------------------------------------------------------ CUDA only

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
    vis, prompt = features((B, N, d), dtype, 81), features((B, L, d), dtype, 82)
    got = mk.select(vis, prompt, k_p, k, backend="triton")
    assert_valid(got, N, k)
    assert torch.equal(got, mk.select(vis, prompt, k_p, k, backend="reference"))


@cuda_only
def test_cuda_large_shape_tiled_paths():
    # N beyond the on-chip limit and the Gram budget: the tiled per-step FPS path and the multi-tile cover.
    vis, prompt = features((1, 16400, 256), torch.bfloat16, 91), features((1, 8, 256), torch.bfloat16, 92)
    got = mk.select(vis, prompt, 8, 24, backend="triton")
    assert_valid(got, 16400, 24)
    assert torch.equal(got, mk.select(vis, prompt, 8, 24, backend="reference"))


@cuda_only
def test_cuda_graph_capture_and_replay():
    B, N, d, L, k_p, k = MODEL_SHAPES["llava-1.5"]
    vis, prompt = features((B, N, d), torch.bfloat16, 101), features((B, L, d), torch.bfloat16, 102)
    static_vis, static_prompt = vis.clone(), prompt.clone()
    mk.select(static_vis, static_prompt, k_p, k, backend="triton")  # warm up (compile) outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        static_out = mk.select(static_vis, static_prompt, k_p, k, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    for s in (103, 104):
        static_vis.copy_(features((B, N, d), torch.bfloat16, s))
        static_prompt.copy_(features((B, L, d), torch.bfloat16, s + 50))
        graph.replay()
        want = mk.select(static_vis, static_prompt, k_p, k, backend="reference")
        assert torch.equal(static_out, want)


@cuda_only
def test_cuda_torch_compile_fullgraph():
    B, N, d, L, k_p, k = MODEL_SHAPES["llava-1.5"]
    vis, prompt = features((B, N, d), torch.bfloat16, 111), features((B, L, d), torch.bfloat16, 112)

    @torch.compile(fullgraph=True)
    def prune(v, p):
        return torch.ops.mob.select(v, p, k_p, k)

    assert mk.resolve_backend("auto", vis.device) == "triton"
    assert torch.equal(prune(vis, prompt), mk.select(vis, prompt, k_p, k, backend="reference"))


# ------------------------------------------------------------------------------- ahead-of-time compile for sm_90
# The interpreter does not apply the compiler's rules (it accepted a non-constexpr global that real compilation
# rejects), so every kernel variant is also compiled for an H100 target. That needs no GPU, only triton's bundled
# ptxas, but it needs real @triton.jit functions: a subprocess with the interpreter off.

_AOT_SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mob_kernels.triton_farthest_point_sample import _fps_kernel, _gram_kernel
from mob_kernels.triton_prompt_cover import _prompt_cover_kernel

def compile_(fn, sig, const):
    sig = dict(sig, **{name: "constexpr" for name in const})
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
    assert ".entry" in k.asm["ptx"]

for dt in ("*bf16", "*fp32"):
    cover = dict(vis_ptr=dt, prompt_ptr=dt, mask_ptr="*u8", sim_ptr="*fp32", cover_ptr="*fp32", ticket_ptr="*i32",
                 picks_ptr="*i64", count_ptr="*i64", N="i32", L="i32", d="i32", k_p="i32", fold="i32",
                 stride_vb="i64", stride_vn="i64", stride_pb="i64", stride_pl="i64")
    for sort_top in (True, False):
        compile_(_prompt_cover_kernel, cover, dict(IS_FP32=dt == "*fp32", DOT_IN_FP32=False, BLOCK_N=32, BLOCK_L=64,
                 BLOCK_D=64, FIN_BLOCK_N=1024, FIN_BLOCK_L=16, SORT_TOP=sort_top))
    compile_(_gram_kernel, dict(vis_ptr=dt, gram_ptr="*fp32", N="i32", d="i32", stride_vb="i64", stride_vn="i64"),
             dict(IS_FP32=dt == "*fp32", DOT_IN_FP32=False, BLOCK_M=64, BLOCK_D=64))
    fps = dict(vis_ptr=dt, gram_ptr="*fp32", seed_ptr="*i64", num_picks_ptr="*i64", dist_ptr="*fp32",
               norm_ptr="*fp32", taken_ptr="*i8", out_ptr="*i64", N="i32", d="i32", m="i32", k="i32",
               stride_vb="i64", stride_vn="i64")
    for gram, onchip in ((True, True), (False, False)):
        compile_(_fps_kernel, fps, dict(USE_GRAM=gram, ONCHIP=onchip, FILL_TO_K=True, SORTED_UNION=False,
                 BLOCK_N=1024, BLOCK_D=64 if gram else 32))
print("compiled")
"""


def test_kernels_compile_for_sm90():
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
