"""Property tests (hypothesis) over every available backend: random shapes, budgets at their edges, masks all-false /
all-true / ragged / random, NaN, +-inf, zero rows, exact duplicates, huge and tiny magnitudes, non-contiguous, offset
and expanded views, all three dtypes.

Invariants, on every example: a valid selection (k distinct sorted in-range indices); inputs bitwise unchanged; the
reference's exact indices unless the float64 replay (mob_testing.decision_margin) finds a decision closer than the contract's
1e-4 margin.

Every backend that can run here is fuzzed: the CPU backends on CPU tensors and, on a GPU machine, every CUDA backend
(triton, cuda, reference) on CUDA tensors, compared with the reference on CPU.

Profiles (env MOB_FUZZ_PROFILE): "ci" (default) derandomised, 1,000 examples per backend for select and 250 for the
primitives and for each of DivPrune and CDPruner (validity-only properties and the reference: 1/20); "gpu"
(`make gpu-check`) the same at 2,000 / 500; "long" (scripts/fuzz.sh, `make fuzz`) random, 100,000 per backend; "asan"
derandomised, 300 (the sanitizer build is ~10x slower). Triton under its interpreter gets tiny shapes and 1/40 of the
examples (25 in ci).
Most examples are small (the reference loops in Python per FPS step); one in a hundred goes up to N = 4096, d = 4096,
L = 256, B = 8 under a cap on B * N * d.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mob_kernels
from mob_testing import (
    DTYPES,
    WELL_CONDITIONED,
    assert_valid,
    backends,
    bitwise_equal,
    decision_margin,
    d2pruner_margin,
    divprune_margin,
    dpp_margin,
    gpu_backends,
    is_slow,
    target_id,
)

_COMMON = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
# ci keeps the whole suite under five minutes on a 2-core machine; the GPU check affords twice as many.
settings.register_profile("mob-ci", max_examples=1000, derandomize=True, database=None, **_COMMON)
settings.register_profile("mob-gpu", max_examples=2000, derandomize=True, database=None, **_COMMON)
settings.register_profile("mob-long", max_examples=100_000, derandomize=False, **_COMMON)
settings.register_profile("mob-asan", max_examples=300, derandomize=True, database=None, **_COMMON)
PROFILE = os.environ.get("MOB_FUZZ_PROFILE", "ci")
FUZZ = settings.get_profile(f"mob-{PROFILE}")
PRIMITIVES = settings(FUZZ, max_examples=max(FUZZ.max_examples // 4, 50))
INTERPRETED = settings(FUZZ, max_examples=max(FUZZ.max_examples // 40, 20))
VALIDITY = settings(FUZZ, max_examples=max(FUZZ.max_examples // 20, 20))  # validity-only properties

# (backend, device): the CPU backends on CPU tensors and, on a GPU machine, every CUDA backend on CUDA tensors.
FAST = [(b, "cpu") for b in backends() if not is_slow(b)] + [(b, "cuda") for b in gpu_backends()]
SLOW = [(b, "cpu") for b in backends() if is_slow(b)]
# The reference on CPU tensors is the oracle the others are compared with: fuzzing it checks validity only, which
# needs fewer examples than a comparison does (the kernels keep the full count).
KERNELS = [t for t in FAST if t != ("reference", "cpu")]
REFERENCE = [t for t in FAST if t == ("reference", "cpu")]

SPECIALS = ("nan", "inf", "-inf", "zero_row", "dup_row", "huge", "tiny", "neg_zero")
LAYOUTS = ("contiguous", "strided", "transposed", "offset", "expanded")
MASKS = ("none", "all_true", "all_false", "ragged", "random")
_HUGE = {torch.float32: 1e30, torch.float16: 6.0e4, torch.bfloat16: 1e30}
_TINY = {torch.float32: 1e-30, torch.float16: 1e-7, torch.bfloat16: 1e-30}


@st.composite
def problems(draw, tiny_only: bool = False):
    """A select problem description: shapes, budgets, mask, dtype, value specials and memory layout."""
    size = 0 if tiny_only else draw(st.integers(0, 99))
    if size < 95:  # tiny: most examples
        B, N, L, d, kmax = draw(st.integers(1, 3)), draw(st.integers(1, 20)), draw(st.integers(0, 6)), None, 20
        d = draw(st.integers(1, 16))
    elif size < 99:  # medium
        B, N, L, d, kmax = draw(st.integers(1, 4)), draw(st.integers(1, 256)), draw(st.integers(0, 32)), None, 32
        d = draw(st.integers(1, 256))
    else:  # large, under a cap on the bytes the reference must touch
        B, N, L = draw(st.integers(1, 8)), draw(st.integers(1, 4096)), draw(st.integers(0, 256))
        d, kmax = draw(st.integers(1, 4096)), 32
        d = max(1, min(d, (1 << 20) // (B * N)))
        L = max(0, min(L, (1 << 20) // (B * d)))
    k = draw(st.one_of(st.just(0), st.just(N), st.just(min(N, 1)), st.integers(0, min(N, kmax))))
    k_p = draw(st.one_of(st.just(0), st.just(k), st.integers(0, k)))
    fold = draw(st.one_of(st.none(), st.integers(1, N + 2)))
    return dict(
        B=B, N=N, L=L, d=d, k=k, k_p=k_p, fold=fold,
        dtype=draw(st.sampled_from(DTYPES)),
        mask=draw(st.sampled_from(MASKS)),
        specials=draw(st.lists(st.sampled_from(SPECIALS), max_size=4)),
        layout=draw(st.sampled_from(LAYOUTS)),
        unbatched=B == 1 and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _layout(x: torch.Tensor, layout: str, g: torch.Generator) -> torch.Tensor:
    """The same values as x ([B, R, d]) in another memory layout; padding around views is NaN, so a kernel that reads
    outside the view sees poison."""
    B, R, d = x.shape
    if layout == "strided":
        wide = torch.full((B, 2 * R, d), float("nan"), dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    if layout == "transposed":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "offset":
        off = int(torch.randint(1, 5, (), generator=g))
        wide = torch.full((B + 1, R + off, d + off), float("nan"), dtype=x.dtype, device=x.device)
        wide[1:, off:, off:] = x
        return wide[1:, off:, off:]
    if layout == "expanded":  # stride-0 batch: every sample the same memory
        return x[:1].expand(B, R, d)
    return x


def build(p: dict, device: str = "cpu"):
    """Tensors for a problem description on ``device``: (vis, prompt, mask or None), batched or unbatched."""
    g = torch.Generator().manual_seed(p["seed"])
    B, N, L, d, dtype = p["B"], p["N"], p["L"], p["d"], p["dtype"]
    vis = torch.randn(B, N, d, generator=g)
    prompt = torch.randn(B, L, d, generator=g)
    for kind in p["specials"]:
        x = vis if L == 0 or bool(torch.randint(0, 3, (), generator=g)) else prompt
        b, r, c = (int(torch.randint(0, n, (), generator=g)) for n in x.shape)
        if kind == "nan":
            x[b, r, c] = float("nan")
        elif kind == "inf":
            x[b, r, c] = float("inf")
        elif kind == "-inf":
            x[b, r, c] = float("-inf")
        elif kind == "zero_row":
            x[b, r] = 0.0
        elif kind == "neg_zero":
            x[b, r] = -0.0
        elif kind == "dup_row":  # exact duplicates of one row across the sample (ties everywhere)
            x[b, torch.randint(0, x.shape[1], (max(1, x.shape[1] // 2),), generator=g)] = x[b, r].clone()
        elif kind == "huge":
            x[b, r] *= _HUGE[dtype]
        elif kind == "tiny":
            x[b, r] *= _TINY[dtype]
    vis, prompt = vis.to(device=device, dtype=dtype), prompt.to(device=device, dtype=dtype)
    vis, prompt = _layout(vis, p["layout"], g), _layout(prompt, p["layout"], g)
    kind = p["mask"]
    mask = None
    if kind != "none":
        mask = torch.ones(B, L, dtype=torch.bool)
        if kind == "all_false":
            mask[:] = False
        elif kind == "ragged":
            for b in range(B):
                mask[b, int(torch.randint(0, L + 1, (), generator=g)) :] = False
        elif kind == "random":
            mask = torch.rand(B, L, generator=g) < 0.5
    mask = None if mask is None else mask.to(device)
    if p["unbatched"]:
        return vis[0], prompt[0], None if mask is None else mask[0]
    return vis, prompt, mask


def _snapshot(*xs):
    return [None if x is None else x.clone() for x in xs]


def _cpu(*xs):
    return [None if x is None else x.cpu() for x in xs]


def _check_select(backend: str, device: str, p: dict) -> None:
    vis, prompt, mask = build(p, device)
    before = _snapshot(vis, prompt, mask)
    out = mob_kernels.select(vis, prompt, p["k_p"], p["k"], fold=p["fold"], prompt_mask=mask, backend=backend).cpu()
    assert_valid(out, None if p["unbatched"] else p["B"], p["N"], p["k"])
    for x, x0 in zip((vis, prompt, mask), before):
        assert x is None or bitwise_equal(x, x0), "an input was modified"
    vis, prompt, mask = _cpu(vis, prompt, mask)
    if backend != "reference" or device != "cpu":
        want = mob_kernels.select(vis, prompt, p["k_p"], p["k"], fold=p["fold"], prompt_mask=mask, backend="reference")
        if not torch.equal(out, want):
            margin = decision_margin(vis, prompt, mask, p["k_p"], p["k"], p["fold"])
            assert margin < WELL_CONDITIONED, f"{backend} != reference on a well-conditioned input " \
                                              f"(margin {margin:.2e}):\n{out}\n{want}"


@pytest.mark.parametrize("target", KERNELS, ids=target_id)
@FUZZ
@given(p=problems())
def test_fuzz_select(target, p):
    _check_select(*target, p=p)


@pytest.mark.parametrize("target", REFERENCE, ids=target_id)
@VALIDITY
@given(p=problems())
def test_fuzz_select_reference(target, p):
    _check_select(*target, p=p)


@pytest.mark.parametrize("target", SLOW, ids=target_id)
@INTERPRETED
@given(p=problems(tiny_only=True))
def test_fuzz_select_interpreted(target, p):
    _check_select(*target, p=p)


def _check_primitives(backend: str, device: str, p: dict, seed_frac: int) -> None:
    vis, prompt, mask = build(p, device)
    before = _snapshot(vis, prompt, mask)
    N, k_p, k = p["N"], p["k_p"], p["k"]
    picks, count = mob_kernels.prompt_cover(vis, prompt, k_p, fold=p["fold"], prompt_mask=mask, backend=backend)
    B = 1 if p["unbatched"] else p["B"]
    picks2, count2 = picks.reshape(B, k_p).cpu(), count.reshape(B).cpu()
    for row, c in zip(picks2.tolist(), count2.tolist()):
        assert 0 <= c <= k_p and len(set(row[:c])) == c and all(0 <= i < N for i in row[:c])
        assert all(i == -1 for i in row[c:])
    # FPS seeded by part of the cover (-1 padded): new picks are distinct, never seeds, -1 once the tokens run out.
    seed = torch.where(torch.arange(k_p) < seed_frac * count2.unsqueeze(1) // 4, picks2, -1)
    seed = (seed[0] if p["unbatched"] else seed).to(device)
    fps = mob_kernels.farthest_point_sample(vis, k, seed, backend=backend)
    for row, srow in zip(fps.reshape(B, k).tolist(), seed.reshape(B, k_p).tolist()):
        seeds = {i for i in srow if i >= 0}
        n = min(k, N - len(seeds))
        assert len(set(row[:n])) == n and not seeds & set(row[:n]) and all(0 <= i < N for i in row[:n])
        assert all(i == -1 for i in row[n:])
    for x, x0 in zip((vis, prompt, mask), before):
        assert x is None or bitwise_equal(x, x0), "an input was modified"


@pytest.mark.parametrize("target", KERNELS, ids=target_id)
@PRIMITIVES
@given(p=problems(), seed_frac=st.integers(0, 4))
def test_fuzz_primitives(target, p, seed_frac):
    _check_primitives(*target, p=p, seed_frac=seed_frac)


@pytest.mark.parametrize("target", REFERENCE, ids=target_id)
@VALIDITY
@given(p=problems(), seed_frac=st.integers(0, 4))
def test_fuzz_primitives_reference(target, p, seed_frac):
    _check_primitives(*target, p=p, seed_frac=seed_frac)


@pytest.mark.parametrize("target", SLOW, ids=target_id)
@INTERPRETED
@given(p=problems(tiny_only=True), seed_frac=st.integers(0, 4))
def test_fuzz_primitives_interpreted(target, p, seed_frac):
    _check_primitives(*target, p=p, seed_frac=seed_frac)


# ------------------------------------------------------------------------------- DivPrune, CDPruner, D2Pruner, BTP

VALIDS = ("none", "all_true", "all_false", "random", "one")


def _check_method(method: str, backend: str, device: str, p: dict, valid_kind: str) -> None:
    vis, _, _ = build(p, device)
    B = 1 if p["unbatched"] else p["B"]
    N, k = p["N"], p["k"]
    g = torch.Generator().manual_seed(p["seed"] + 1)
    rel = torch.rand(B, N, generator=g) * 2 - 0.5  # negative relevance is allowed (used as given)
    if "nan" in p["specials"]:
        rel[0, 0] = float("nan")
    valid = None
    if valid_kind != "none":
        valid = torch.ones(B, N, dtype=torch.bool)
        if valid_kind == "all_false":
            valid[:] = False
        elif valid_kind == "random":
            valid = torch.rand(B, N, generator=g) < 0.6
        elif valid_kind == "one":
            valid[:] = False
            valid[:, N // 2] = True
    if p["unbatched"]:
        rel, valid = rel[0], None if valid is None else valid[0]
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    before = vis.clone()

    def run(b, v, r, ok):
        if method == "divprune":
            return mob_kernels.divprune(v, k, valid=ok, backend=b).cpu()
        if method == "d2pruner":  # keep and role both compared
            keep, role = mob_kernels.d2pruner(v, r, k, valid=ok, backend=b)
            return torch.cat([keep, role.long()], dim=-1).cpu()
        return mob_kernels.cdpruner(v, r, k, valid=ok, backend=b).cpu()

    out = run(backend, vis, dev(rel), dev(valid))
    assert_valid(out[..., :k], None if p["unbatched"] else p["B"], N, k)
    assert bitwise_equal(vis, before), "vis was modified"
    if backend != "reference" or device != "cpu":
        want = run("reference", vis.cpu(), rel, valid)
        if not torch.equal(out, want):
            v3, r2 = vis.cpu().reshape(B, N, -1), rel.reshape(B, N)
            ok2 = None if valid is None else valid.reshape(B, N)
            margin = min(
                {"divprune": lambda b: divprune_margin(v3[b], k, None if ok2 is None else ok2[b]),
                 "cdpruner": lambda b: dpp_margin(v3[b], r2[b], k, None if ok2 is None else ok2[b]),
                 "d2pruner": lambda b: d2pruner_margin(v3[b], r2[b], k, None if ok2 is None else ok2[b]),
                 }[method](b)
                for b in range(B)
            )
            assert margin < WELL_CONDITIONED, f"{backend} != reference (margin {margin:.2e}):\n{out}\n{want}"


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
@pytest.mark.parametrize("target", KERNELS, ids=target_id)
@PRIMITIVES
@given(p=problems(), valid_kind=st.sampled_from(VALIDS))
def test_fuzz_methods(method, target, p, valid_kind):
    _check_method(method, *target, p=p, valid_kind=valid_kind)


@pytest.mark.parametrize("method", ["divprune", "cdpruner"])
@pytest.mark.parametrize("target", REFERENCE, ids=target_id)
@VALIDITY
@given(p=problems(), valid_kind=st.sampled_from(VALIDS))
def test_fuzz_methods_reference(method, target, p, valid_kind):
    _check_method(method, *target, p=p, valid_kind=valid_kind)


# The reference's independent set walks every token in a Python loop (N steps): fewer examples.
@pytest.mark.parametrize("target", FAST, ids=target_id)
@VALIDITY
@given(p=problems(), valid_kind=st.sampled_from(VALIDS))
def test_fuzz_d2pruner(target, p, valid_kind):
    _check_method("d2pruner", *target, p=p, valid_kind=valid_kind)


@pytest.mark.parametrize("method", ["divprune", "cdpruner", "d2pruner"])
@pytest.mark.parametrize("target", SLOW, ids=target_id)
@INTERPRETED
@given(p=problems(tiny_only=True), valid_kind=st.sampled_from(VALIDS))
def test_fuzz_methods_interpreted(method, target, p, valid_kind):
    _check_method(method, *target, p=p, valid_kind=valid_kind)


def _check_btp(backend: str, device: str, p: dict, mode: str) -> None:
    """One BTP stage: a valid selection of exactly k on any input (its exact agreement on well-conditioned inputs is
    a composition of primitives the other fuzz tests hold to the reference)."""
    vis, _, _ = build(p, device)
    N, k = p["N"], p["k"]
    B = 1 if p["unbatched"] else p["B"]
    g = torch.Generator().manual_seed(p["seed"] + 2)
    att = torch.rand(B, 3, N, generator=g)
    if "nan" in p["specials"]:
        att[0, 0, 0] = float("nan")
    att = (att[0] if p["unbatched"] else att).to(device)
    seed = torch.randint(0, max(N, 1), (min(N, 4),), generator=g).to(device)
    kw = dict(mode=mode, n_div=k // 3, n_attn=k // 2, n_extra=min(N, k + 3), rebalance=k, seed=seed)
    out = mob_kernels.btp_stage(vis, att, k, backend=backend, **kw).cpu()
    assert_valid(out, None if p["unbatched"] else p["B"], N, k)


@pytest.mark.parametrize("mode", ["union", "attn_seeded", "attn_only"])
@pytest.mark.parametrize("target", FAST, ids=target_id)
@VALIDITY
@given(p=problems())
def test_fuzz_btp_stage(mode, target, p):
    _check_btp(*target, p=p, mode=mode)
