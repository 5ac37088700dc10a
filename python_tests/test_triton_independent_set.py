"""The Triton ``independent_set`` (contract §3.4.1; mob_kernels/backends/triton_kernels/independent_set.py) against
the reference backend, and an ahead-of-time compile of every kernel variant for sm_90.

* Exact against ``ReferenceBackend.independent_set`` wherever every candidate pair's cosine (float64, on the rounded
  tensor) is at least ``WELL_CONDITIONED`` away from ``near`` and ``far``: float32, float16 and bfloat16, with and
  without a grid, several radii, D2Pruner's thresholds for alpha 1.0, 0.5 and 0.0 (near = -inf), pick budgets of 0, a
  few and more than the graph allows, samples without candidates, tied and huge ranks, NaN / infinite rows; and
  ``mob_kernels.d2pruner`` on ``backend="triton"`` against ``"reference"``.
* Bit for bit on any input: the reference's walk run over the Triton ``gram`` primitive's matrix (same tile size), since
  the kernel thresholds the very similarities that primitive computes (zero, tiny, huge, NaN, infinite, duplicated
  rows; thresholds equal to similarities; int64 grid coordinates far beyond 32 bits).
* Every path: several 32-bit words per adjacency row (N > 32, not a multiple of 32), small forced tiles (several
  tiles per sample, diagonal and off-diagonal, ragged), the on-chip walk and the workspace walk in small chunks.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so
shapes stay small; the CUDA-only tests at the bottom cover model shapes and CUDA-graph capture.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import mob_kernels
from mob_kernels import registry
from mob_kernels.backends.reference import ReferenceBackend as R
from mob_kernels.methods.d2pruner import edge_thresholds, square_grid
from mob_testing import DTYPES, WELL_CONDITIONED, gaussian, random_ranks, token_grid

triton = pytest.importorskip("triton")

from mob_kernels.backends.triton_kernels import independent_set as tis  # noqa: E402
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


def run(vis, rank, num_picks, k, near, far, grid, radius, **knobs):
    """The Triton kernel on the device, the result back on the CPU."""
    return tis.independent_set(*dev(vis, rank, num_picks), k, near, far, dev(grid), radius, **knobs).cpu()


# ----------------------------------------------------------------------------------------------------------- inputs


def _cos64(vis):
    v = vis.double()
    v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-12)
    return v @ v.transpose(-1, -2)


def _margin(vis, thresholds):
    """The smallest |cos - t| over pairs i != j of finite rows and the finite thresholds t."""
    cos = _cos64(vis)
    keep = ~torch.eye(vis.shape[-2], dtype=torch.bool) & cos.isfinite()
    gaps = [(cos - t).abs()[keep.expand_as(cos)] for t in thresholds if math.isfinite(t)]
    return min((float(g.min()) for g in gaps if g.numel()), default=INF)


def _well_conditioned(B, N, d, dtype, near, far, seed=0):
    for s in range(seed, seed + 80):
        vis = gaussian((B, N, d), dtype, s)
        if _margin(vis, (near, far)) >= WELL_CONDITIONED:
            return vis
    raise AssertionError("no well-conditioned independent-set input")


def _thresholds(spec):
    return edge_thresholds(0.8, spec) if isinstance(spec, float) else spec


# ------------------------------------------------------------------------------------------- against the reference

# (alpha or (near, far), grid kind, radius, k): alpha 1 (one threshold, no grid), alpha 0.5 on D2Pruner's square grid
# at radii 1 and 2, alpha 0 (near = -inf, far = inf: the spatial graph alone) on random tiles, two thresholds that
# both need the cosine, radius 0.
CASES = [
    (1.0, "none", 1, 36),
    (0.5, "square", 1, 12),
    (0.5, "square", 2, 36),
    (0.0, "tiles", 2, 12),
    ((0.3, 0.7), "tiles", 0, 36),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype):
    B, N, d = 5, 36, 6  # low dimension: similar pairs exist, so the graph has edges; N: two adjacency words per row
    for c, (spec, kind, radius, k) in enumerate(CASES):
        near, far = _thresholds(spec)
        vis = _well_conditioned(B, N, d, dtype, near, far, seed=10 * c)
        grid = token_grid(B, N, kind, seed=radius)
        rank = random_ranks(B, N, seed=c)
        rank[3] = -1  # a sample without candidates
        rank[4, 10:] = -1  # a few candidates only
        num_picks = torch.tensor([0, 3, 2 * N, 7, N])  # no pick; a few; more than the graph (and k) allows
        want = R.independent_set(vis, rank, num_picks, k, near, far, grid, radius)
        got = run(vis, rank, num_picks, k, near, far, grid, radius)
        assert torch.equal(got, want), (spec, kind, radius, k, got, want)
        assert (got[0] == -1).all() and (got[3] == -1).all()
        assert int((got[2] >= 0).sum()) > 3  # the graph leaves room for several picks


# (N, knobs): several tiles per sample (diagonal, off-diagonal, ragged) with 3 words per row; the same through the
# workspace walk in chunks smaller than N; a tile holding 2 words per row and one ragged word.
PATHS = {
    "tiles32-onchip": (70, dict(block_m=32)),
    "tiles32-workspace-walk": (70, dict(block_m=32, onchip=False, chunk=32)),
    "tiles64-workspace-walk": (100, dict(block_m=64, onchip=False, chunk=64)),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_paths(path):
    N, knobs = PATHS[path]
    B, d = 2, 5
    dtype = DTYPES[list(PATHS).index(path)]
    near, far = 0.35, 0.6
    vis = _well_conditioned(B, N, d, dtype, near, far, seed=3)
    grid = token_grid(B, N, "tiles", seed=1)
    rank = random_ranks(B, N, seed=2, drop=0.1)
    num_picks = torch.tensor([N, 9])
    for g, radius in ((grid, 1), (None, 1)):
        want = R.independent_set(vis, rank, num_picks, N, near, far, g, radius)
        got = run(vis, rank, num_picks, N, near, far, g, radius, **knobs)
        assert torch.equal(got, want), (g is None, got, want)
        assert int((got[0] >= 0).sum()) > 5 and int((got[1] >= 0).sum()) == 9


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_nan_and_infinite_rows_make_no_edges(alpha):
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
    got = run(vis, rank, num_picks, N, near, far, grid, 1)
    assert torch.equal(got, want)
    bad = ~vis.isfinite().all(-1)
    for b in range(B):  # every non-finite candidate is picked: nothing is adjacent to it
        picked = set(got[b][got[b] >= 0].tolist())
        assert {i for i in range(N) if bad[b, i] and rank[b, i] >= 0} <= picked


def test_rank_order_ties_huge_ranks_and_budgets():
    # Ranks far beyond N and tied (the lower index first), non-candidates everywhere else; negative and huge pick
    # budgets; k = 1.
    B, N, d = 4, 40, 4
    near, far = 0.2, 0.5
    vis = _well_conditioned(B, N, d, torch.float16, near, far, seed=7)
    g = torch.Generator().manual_seed(4)
    rank = torch.randint(0, 6, (B, N), generator=g) * (2**60)  # six distinct huge ranks, many ties
    rank[0, ::3] = -1
    rank[1, -1] = 2**63 - 2
    rank[2, :] = -1  # no candidates at all
    rank[3] = torch.arange(N).flip(0)  # visited from the last index down
    for k, num_picks in ((N, [N, -5, N, 2**40]), (1, [N, 1, 0, 3])):
        num_picks = torch.tensor(num_picks)
        want = R.independent_set(vis, rank, num_picks, k, near, far, None, 1)
        got = run(vis, rank, num_picks, k, near, far, None, 1)
        assert torch.equal(got, want), (k, got, want)
    assert got[3, 0] == N - 1 and (got[2] == -1).all()


def test_empty_shapes_and_zero_budget():
    vis = gaussian((2, 10, 4), torch.float32, 1)
    rank = torch.arange(10).expand(2, 10).contiguous()
    picks = torch.tensor([5, 5])
    assert run(vis, rank, picks, 0, 0.5, 0.5, None, 1).shape == (2, 0)
    assert run(vis[:0], rank[:0], picks[:0], 3, 0.5, 0.5, None, 1).shape == (0, 3)
    out = run(vis[:, :0], rank[:, :0], picks, 0, 0.5, 0.5, None, 1)
    assert out.shape == (2, 0)
    with pytest.raises(ValueError, match="block_m"):
        run(vis, rank, picks, 3, 0.5, 0.5, None, 1, block_m=48)


# ------------------------------------------------------------------------- against the Gram primitive, on any input


def _adversarial(B, N, d, seed):
    """Duplicated, negated, zero, tiny, huge, NaN and infinite rows among Gaussian ones."""
    g = torch.Generator().manual_seed(seed)
    vis = torch.randn(B, N, d, generator=g)
    vis[:, 1] = vis[:, 0]
    vis[:, 2] = -vis[:, 0]
    vis[:, 3] = 0.0
    vis[:, 4] *= 1e-30  # norm below eps: the cosine is scaled down, not normalised
    vis[:, 6] *= 1e18
    vis[:, 7] *= 1e30  # squared norm overflows: NaN similarities
    vis[:, 8, 0] = float("nan")
    vis[:, 9, -1] = -INF
    vis[:, 10] = vis[:, 6] * 0.5
    return vis


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bit_for_bit_with_the_gram_primitive(monkeypatch, dtype):
    # The reference's walk over tms.gram's matrix (same tile size, so the same summation order): equal on any input,
    # the thresholds set to similarities that occur (the comparison is strict, in float32) included.
    B, N, d, bm = 2, 40, 9, 32
    vis = _adversarial(B, N, d, seed=5).to(dtype)
    monkeypatch.setattr(R, "gram", staticmethod(lambda v: tms.gram(dev(v), block_m=bm).cpu()))
    sim = R.gram(vis)
    s0 = float(sim[0, 0, 1])  # = near for a pair that must then have no edge
    s1 = float(sim[1, 11, 12])
    wide = token_grid(B, N, "tiles", seed=6)
    wide[:, ::2, 1] += 2**32  # rows 2^32 apart: not neighbours, though equal in their low 32 bits
    wide[:, :, 2] += 2**40
    rank = random_ranks(B, N, seed=8, drop=0.1)
    num_picks = torch.tensor([N, N])
    for near, far, grid, radius in ((s0, s1, wide, 1), (s1, s0 + 1e-9, None, 1), (-INF, INF, wide, 2**33)):
        want = R.independent_set(vis, rank, num_picks, N, near, far, grid, radius)
        got = run(vis, rank, num_picks, N, near, far, grid, radius, block_m=bm)
        assert torch.equal(got, want), (near, far, radius, got, want)


def test_grid_views_are_read_in_place_and_batch_chunks(monkeypatch):
    # Expanded (batch stride 0) and strided grids read in place; a workspace budget of one sample per launch runs the
    # batch in chunks (views of every per-sample argument).
    monkeypatch.setattr(tis, "ADJ_BYTES", 1)
    B, N, d = 2, 36, 4
    near, far = edge_thresholds(0.8, 0.5)
    vis = _well_conditioned(B, N, d, torch.float32, near, far, seed=9)
    rank = random_ranks(B, N, seed=3, drop=0.0)
    num_picks = torch.tensor([N, N])
    shared = square_grid(N, torch.device("cpu"))
    want = R.independent_set(vis, rank, num_picks, N, near, far, shared.expand(B, N, 3).contiguous(), 1)
    strided = torch.zeros(B, N, 6, dtype=torch.int64)
    strided[..., ::2] = shared  # unit stride lost along the last axis
    for grid in (shared.expand(B, N, 3), strided[..., ::2]):
        assert torch.equal(run(vis, rank, num_picks, N, near, far, grid, 1), want)


# ------------------------------------------------------------------------------------------------------- D2Pruner


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0])
def test_d2pruner_triton_equals_reference(alpha):
    near, far = edge_thresholds(0.8, alpha)
    dtype = DTYPES[[1.0, 0.5, 0.0].index(alpha)]
    B, N, d = 3, 64, 8
    vis = _well_conditioned(B, N, d, dtype, near, far, seed=11)
    g = torch.Generator().manual_seed(5)
    imp = torch.randperm(B * N, generator=g).view(B, N).float() / (B * N) + 0.01  # distinct importance values
    valid = torch.rand(B, N, generator=g) > 0.1
    for k, pivot_ratio in ((24, 0.7), (N, 0.0)):
        want = mob_kernels.d2pruner(vis, imp, k, alpha=alpha, valid=valid, pivot_ratio=pivot_ratio,
                                    backend="reference")
        got = mob_kernels.d2pruner(*dev(vis, imp), k, alpha=alpha, valid=dev(valid), pivot_ratio=pivot_ratio,
                                   backend="triton")
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), (k, pivot_ratio)
        assert int((want[1] == 1).sum()) > 0  # the independent set took part


def test_triton_backend_runs_the_kernel(monkeypatch):
    # The backend's primitive is the kernel, not a delegation to the reference.
    def boom(*a, **kw):
        raise AssertionError("the reference's walk was called")

    monkeypatch.setattr(R, "independent_set", staticmethod(boom))
    vis = gaussian((1, 20, 4), torch.bfloat16, 2)
    out = registry.get_backend("triton").independent_set(
        *dev(vis, torch.arange(20).unsqueeze(0), torch.tensor([20])), 20, 0.5, 0.5, None, 1)
    assert out.shape == (1, 20) and out.device.type == DEV and int(out[0, 0]) == 0


# ----------------------------------------------------------------------------------------------------- CUDA only

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the interpreter tests above cover the logic)")

# name: (B, N, d, k)
MODEL_SHAPES = {
    "llava-1.5": (1, 576, 4096, 64),
    "llava-1.5-b32": (32, 576, 4096, 64),  # 128-tiles
    "llava-next": (1, 2880, 4096, 320),  # BLOCK_N 4096, 8 warps
}


def _lattice(B, N, d, seed):
    """Rows of 0/1 features whose cosines are exactly 0, 0.3, 0.7 or 1 (7 ones marking one of 64 clusters, 3 ones
    marking one of 64 sub-clusters): exact in every dtype and at least 0.05 away from the thresholds used (0.8; 0.6
    and 1.6 at alpha 0.5; 0.25; -0.5), so every backend must agree at model shapes."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.randint(0, 64, (B, N), generator=g)
    sub = torch.randint(0, 64, (B, N), generator=g)
    vis = torch.zeros(B, N, d)
    cols = torch.arange(d)
    vis[(cols // 7 == cluster.unsqueeze(-1)) & (cols < 448)] = 1.0
    vis[((cols - 448) // 3 == sub.unsqueeze(-1)) & (cols >= 448) & (cols < 640)] = 1.0
    return vis


@cuda_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MODEL_SHAPES))
def test_cuda_model_shapes(shape, dtype):
    B, N, d, k = MODEL_SHAPES[shape]
    vis = dev(_lattice(B, N, d, 81).to(dtype))
    imp = dev(torch.rand(B, N, generator=torch.Generator().manual_seed(82)))
    grid = None
    if math.isqrt(N) ** 2 != N:  # LLaVA-NeXT: five 24 x 24 tiles
        i = torch.arange(N)
        grid = dev(torch.stack([i // 576, (i % 576) // 24, i % 24], -1))
    # 0.25: a denser graph; -0.5: every pair adjacent, one pick and then the importance fill
    for alpha, threshold in ((1.0, 0.8), (0.5, 0.8), (1.0, 0.25), (1.0, -0.5)):
        want = mob_kernels.d2pruner(vis, imp, k, alpha=alpha, threshold=threshold, grid=grid, backend="reference")
        got = mob_kernels.d2pruner(vis, imp, k, alpha=alpha, threshold=threshold, grid=grid, backend="triton")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (alpha, threshold)
        n_mis = (want[1] == 1).sum(1)
        assert bool((n_mis > 0).all()) and (threshold >= 0 or bool((n_mis == 1).all()))


@cuda_only
def test_cuda_workspace_walk_and_gram_bits(monkeypatch):
    # Beyond one 128-tile per sample on the GPU, adversarial rows, the on-chip and the workspace walk: bit for bit
    # the reference's walk over the Gram primitive's matrix.
    B, N, d = 2, 3000, 256
    vis = dev(_adversarial(B, N, d, seed=3).to(torch.bfloat16))
    rank = dev(random_ranks(B, N, seed=4, drop=0.05))
    num_picks = dev(torch.tensor([N, 100]))
    grid = dev(token_grid(B, N, "tiles", seed=5))
    sim = tms.gram(vis)
    monkeypatch.setattr(R, "gram", staticmethod(lambda v: sim))
    for near, far, g in ((0.05, 0.1, None), (float(sim[0, 20, 21]), 0.0, grid)):
        want = R.independent_set(vis, rank, num_picks, N, near, far, g, 1)
        for knobs in (dict(), dict(onchip=False)):
            got = tis.independent_set(vis, rank, num_picks, N, near, far, g, 1, **knobs)
            assert torch.equal(got, want), knobs


@cuda_only
def test_cuda_tickets_reset_and_graph_capture_replay():
    B, N, d, k = MODEL_SHAPES["llava-1.5"]
    rank = dev(torch.randperm(N, generator=torch.Generator().manual_seed(1)).unsqueeze(0))
    num_picks = dev(torch.tensor([k]))
    static_vis = dev(_lattice(B, N, d, 101).to(torch.bfloat16))
    args = (rank, num_picks, k, 0.5, 0.5, None, 1)
    tis.independent_set(static_vis, *args)  # warm up (compile) outside the capture
    torch.cuda.synchronize()
    assert all(int(t.abs().sum()) == 0 for t in tis._TICKETS.values())  # every launch leaves its tickets at 0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        static_out = tis.independent_set(static_vis, *args)
    torch.cuda.current_stream().wait_stream(stream)
    for s in (103, 104):
        static_vis.copy_(dev(_lattice(B, N, d, s).to(torch.bfloat16)))
        graph.replay()
        eager = tis.independent_set(static_vis, *args)  # interleaved eager calls
        assert torch.equal(static_out, R.independent_set(static_vis, *args))
        assert torch.equal(eager, static_out)
        assert int((static_out >= 0).sum()) > 10


# ------------------------------------------------------------------------------- ahead-of-time compile for sm_90
# The interpreter does not apply the compiler's rules, so every kernel variant is also compiled for an H100 target
# (triton's bundled ptxas, no GPU needed; a subprocess with the interpreter off). Pointers, d, N and the strides
# carry the 16-divisibility the launcher specialises on for model shapes, so the tile loop must come out software-
# pipelined (cp.async). Where triton ships cuobjdump, the cubins' register and stack use is checked too: no spills
# except the float32 128-tile grid variant, whose 3xTF32 loop is at the register limit (as the MoB Gram's is).

_AOT_SCRIPT = r"""
import os, re, subprocess, sys
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"

DIVISIBLE = ("d", "N", "stride_vb", "stride_vn", "stride_gb", "stride_gn")


def build(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mob_kernels.backends.triton_kernels import independent_set as tis

    name, dt, const, warps, stages = job
    sig = dict(vis_ptr=dt, rank_ptr="*i64", num_picks_ptr="*i64", grid_ptr="*i64", ws_ptr="*i32",
               ticket_ptr="*i32", out_ptr="*i64", N="i32", d="i32", k="i32", near="fp32", far="fp32", radius="i32",
               stride_vb="i64", stride_vn="i64", stride_gb="i64", stride_gn="i64", stride_gc="i64")
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n][0] == "*" or n in DIVISIBLE}
    src = ASTSource(tis._mis_kernel, dict(sig, **{c: "constexpr" for c in const}), const, attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    assert ".entry" in ptx and "cp.async" in ptx, f"{name}: the tile loop was not pipelined"
    assert k.metadata.shared <= 227 * 1024, name
    usage = ""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(tool):
        path = os.path.join(sys.argv[1], name + ".cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        usage = re.search(r"REG:\d+ STACK:\d+", out).group(0)
    return name, usage


def jobs():
    out = []
    for dt, prec, bd, stages in (("*bf16", 0, 64, 3), ("*fp16", 0, 64, 3), ("*fp32", 2, 32, 2)):
        base = dict(HAS_GRID=True, WALK=1, PREC=prec, EVEN_D=True, BM=64, BD=bd, BLOCK_N=1024, CH=1024)
        variants = {  # name: (constexprs, warps); every launcher choice and constexpr branch at least once
            "grid-bm64": (dict(), 4),
            "bm128-n4096": (dict(HAS_GRID=False, BM=128, BLOCK_N=4096), 8),
            "grid-bm128-n8192": (dict(BM=128, BLOCK_N=8192), 8),
            "grid-bm128-workspace-walk": (dict(BM=128, WALK=2, BLOCK_N=32), 8),
            "bm64-ragged-d": (dict(HAS_GRID=False, EVEN_D=False), 4),
        }
        if dt == "*fp16":  # float16 runs bfloat16's code: its main variant is enough
            variants = {"grid-bm64": variants["grid-bm64"]}
        elif dt == "*fp32":  # the dtype only changes the tiles (3xTF32): each tile shape, with the grid's pre-pass
            variants = {n: variants[n] for n in ("grid-bm64", "grid-bm128-n8192")}
        for name, (over, warps) in variants.items():
            out.append((f"{name}-{dt[1:]}", dt, dict(base, **over), warps, stages))
    return out


if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        for name, usage in pool.map(build, jobs()):
            print("compiled", name, usage, flush=True)
    print("all compiled")
"""


def test_kernels_compile_for_sm90(tmp_path):
    script = tmp_path / "aot.py"
    script.write_text(_AOT_SCRIPT)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "all compiled" in done.stdout, (done.stdout[-2000:], done.stderr[-4000:])
    for name, regs, stack in re.findall(r"compiled (\S+) REG:(\d+) STACK:(\d+)", done.stdout):
        assert int(regs) <= 255, name
        assert int(stack) == 0 or (name == "grid-bm128-n8192-fp32" and int(stack) <= 128), (name, stack)
