"""The torch.ops.mob registrations (opcheck, torch.compile with fullgraph) and the calling conventions every backend
shares: unbatched inputs, non-contiguous and offset views, determinism across calls."""

from __future__ import annotations

import pytest
import torch

import mob_kernels
from mob_testing import DTYPES, assert_valid, backends, bitwise_equal, gaussian, is_slow, problem, well_conditioned


def _opcheck_samples():
    vis, prompt, mask = problem(2, 40, 5, 16, seed=3, ragged=True)
    return [
        ((vis, prompt, 4, 8), dict(fold=0, prompt_mask=mask)),
        ((vis, prompt, 0, 8), dict(fold=3, prompt_mask=None)),
        ((vis[0], prompt[0], 2, 5), dict(fold=0, prompt_mask=mask[0])),
        ((vis.bfloat16(), prompt.bfloat16(), 8, 8), dict(fold=0, prompt_mask=None)),
        ((vis, prompt, 0, 0), dict(fold=0, prompt_mask=None)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck_select(i):
    args, kwargs = _opcheck_samples()[i]
    torch.library.opcheck(torch.ops.mob.select.default, args, kwargs)


def test_opcheck_primitives():
    vis, prompt, mask = problem(2, 40, 5, 16, seed=4, ragged=True)
    torch.library.opcheck(torch.ops.mob.prompt_cover.default, (vis, prompt, 6), dict(fold=2, prompt_mask=mask))
    torch.library.opcheck(torch.ops.mob.prompt_cover.default, (vis[1], prompt[1], 3), dict(fold=0, prompt_mask=None))
    seed = torch.tensor([[3, -1], [-1, -1]])
    torch.library.opcheck(torch.ops.mob.farthest_point_sample.default, (vis, 7), dict(seed=seed))
    torch.library.opcheck(torch.ops.mob.farthest_point_sample.default, (vis[0], 7), dict(seed=None))


def test_op_matches_front_door():
    vis, prompt, mask = problem(2, 40, 5, 16, seed=5, ragged=True)
    want = mob_kernels.select(vis, prompt, 4, 8, prompt_mask=mask)
    assert torch.equal(torch.ops.mob.select(vis, prompt, 4, 8, prompt_mask=mask), want)


def test_torch_compile_fullgraph():
    """The selection and the gather that uses it trace into one graph: no graph break, no host sync."""
    vis, prompt, mask = well_conditioned(2, 64, 6, 16, 4, 12, None, ragged=True)

    def prune(v, p, m):
        keep = mob_kernels.select(v, p, 4, 12, prompt_mask=m)
        return torch.gather(v, 1, keep.unsqueeze(-1).expand(-1, -1, v.shape[-1])), keep

    # aot_eager traces exactly what inductor would (fake tensors, functionalisation, fullgraph) without spending
    # tens of seconds compiling C++ for a gather on this 2-core machine.
    torch._dynamo.reset()
    compiled = torch.compile(prune, fullgraph=True, backend="aot_eager")
    got_v, got_keep = compiled(vis, prompt, mask)
    want_v, want_keep = prune(vis, prompt, mask)
    assert torch.equal(got_keep, want_keep)
    assert torch.equal(got_v, want_v)


# ---------------------------------------------------------------------------------------- calling conventions


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unbatched_returns_k(backend, dtype):
    vis, prompt, mask = well_conditioned(1, 50, 4, 16, 4, 10, None, dtype)
    got = mob_kernels.select(vis[0], prompt[0], 4, 10, prompt_mask=mask[0], backend=backend)
    assert_valid(got, None, 50, 10)
    assert torch.equal(got, mob_kernels.select(vis, prompt, 4, 10, prompt_mask=mask, backend=backend)[0])
    picks, count = mob_kernels.prompt_cover(vis[0], prompt[0], 4, backend=backend)
    assert picks.shape == (4,) and count.shape == ()
    fps = mob_kernels.farthest_point_sample(vis[0], 6, picks[: int(count)], backend=backend)
    assert fps.shape == (6,)


def _views(vis: torch.Tensor, prompt: torch.Tensor):
    """(name, vis view, prompt view) holding the same values as vis / prompt, laid out differently in memory."""
    B, N, d = vis.shape
    L = prompt.shape[1]
    wide = torch.full((B, 2 * N + 3, d + 5), float("nan"), dtype=vis.dtype)
    wide[:, 3::2, 2 : 2 + d] = vis  # rows every other one, offset by 3 rows and 2 features
    pw = torch.full((L + 1, B, d + 1), float("nan"), dtype=vis.dtype)
    pw[1:, :, 1:] = prompt.transpose(0, 1)
    yield "strided rows and offset", wide[:, 3::2, 2 : 2 + d], pw[1:, :, 1:].transpose(0, 1)
    yield "features not unit stride", vis.transpose(1, 2).contiguous().transpose(1, 2), prompt.mT.contiguous().mT
    flipped = vis.flip(1).contiguous().flip(1)  # negative row stride is not expressible; a flipped copy flipped back
    yield "batch sliced", torch.cat([vis, vis])[B:], torch.cat([prompt, prompt])[B:]
    yield "flip view", flipped, prompt
    if B == 1:
        yield "expanded batch (stride 0)", vis[0].expand(1, N, d), prompt[0].expand(1, L, d)


@pytest.mark.parametrize(
    "backend,dtype,B",
    # Triton under its interpreter: every layout still, but one batch size and fewer dtypes.
    [(b, t, B) for b in backends() for t in DTYPES for B in (1, 3) if not is_slow(b) or (B == 1 and t != torch.float16)],
    ids=str,
)
def test_views_and_non_contiguous_inputs(backend, dtype, B):
    vis, prompt, mask = well_conditioned(B, 60, 5, 24, 4, 12, None, dtype, ragged=True)
    want = mob_kernels.select(vis, prompt, 4, 12, prompt_mask=mask, backend=backend)
    for name, v, p in _views(vis, prompt):
        v_before, p_before = v.clone(), p.clone()
        got = mob_kernels.select(v, p, 4, 12, prompt_mask=mask, backend=backend)
        assert torch.equal(got, want), name
        assert bitwise_equal(v, v_before) and bitwise_equal(p, p_before), f"{name}: input changed"
    # Expanded batch: every sample of a stride-0 batch equals the single sample.
    e = mob_kernels.select(vis[:1].expand(4, -1, -1), prompt[:1].expand(4, -1, -1), 4, 12, backend=backend)
    assert bool((e == mob_kernels.select(vis[0], prompt[0], 4, 12, backend=backend)).all())


@pytest.mark.parametrize("backend", backends())
def test_non_contiguous_mask_and_seed(backend):
    vis, prompt, mask = well_conditioned(3, 60, 5, 24, 4, 12, None, ragged=True)
    mask_t = mask.T.contiguous().T  # column-major [B, L]
    assert not mask_t.is_contiguous()
    want = mob_kernels.select(vis, prompt, 4, 12, prompt_mask=mask, backend=backend)
    assert torch.equal(mob_kernels.select(vis, prompt, 4, 12, prompt_mask=mask_t, backend=backend), want)
    seed = torch.tensor([[1, 7], [2, -1], [-1, -1]])
    seed_t = seed.T.contiguous().T
    want = mob_kernels.farthest_point_sample(vis, 9, seed, backend=backend)
    assert torch.equal(mob_kernels.farthest_point_sample(vis, 9, seed_t, backend=backend), want)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("B", [1, 4])  # one sample (threads inside it) and several (threads across samples)
def test_repeated_calls_identical(backend, B):
    # Near-ties on purpose (duplicated rows, small d): determinism must not depend on well-conditioning.
    N, k_p, k = (64, 6, 12) if is_slow(backend) else (200, 16, 40) if backend == "reference" else (700, 40, 96)
    vis = gaussian((B, N, 6), torch.bfloat16, seed=9)
    vis[:, N // 2 :] = vis[:, : N // 2]
    prompt = gaussian((B, 20, 6), torch.bfloat16, seed=10)
    runs = [mob_kernels.select(vis, prompt, k_p, k, backend=backend) for _ in range(5 if not is_slow(backend) else 3)]
    for r in runs[1:]:
        assert torch.equal(r, runs[0])
    assert_valid(runs[0], B, N, k)
