"""The method axis: DivPrune and CDPruner on every backend (contract §3.2, §3.3), the registry, and the compositions.

Exactness: every backend returns the reference's indices wherever a float64 replay (mob_testing.divprune_margin,
dpp_margin) shows every decision winning by the contract's margin; validity (k distinct sorted in-range indices)
everywhere. The proof that the references equal the released algorithms (vbdi/divprune, Theia-4869/CDPruner) lives
beside the peers in test_bench_cli.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import mob_kernels
from mob_kernels import registry
from mob_kernels.backends import Backend
from mob_kernels.backends.reference import DPP_STOP, ReferenceBackend
from mob_kernels.methods.common import complete
from mob_testing import (
    DTYPES,
    WELL_CONDITIONED,
    assert_valid,
    divprune_margin,
    dpp_margin,
    gaussian,
    is_slow,
    target_id,
    targets,
)

TARGETS = targets()
CANDIDATES = [t for t in TARGETS if t[0] != "reference"]


def _small(t) -> bool:
    return is_slow(t[0]) and t[1] == "cpu"


def _well_conditioned(kind, B, N, d, k, dtype, valid=None, tries=40):
    """Seeded Gaussian inputs (rounded to dtype) on which every sample's decisions win by the contract's margin."""
    for seed in range(tries):
        vis = gaussian((B, N, d), dtype, seed)
        rel = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) + 0.05
        ok = True
        for b in range(B):
            v = valid[b] if valid is not None else None
            m = divprune_margin(vis[b], k, v) if kind == "divprune" else dpp_margin(vis[b], rel[b], k, v)
            ok &= m >= WELL_CONDITIONED
        if ok:
            return vis, rel
    raise AssertionError(f"no well-conditioned seed for {kind} B={B} N={N} d={d} k={k} {dtype}")


def _run(kind, vis, rel, k, valid, backend, device):
    vis = vis.to(device)
    valid = None if valid is None else valid.to(device)
    if kind == "divprune":
        return mob_kernels.divprune(vis, k, valid=valid, backend=backend).cpu()
    return mob_kernels.cdpruner(vis, rel.to(device), k, valid=valid, backend=backend).cpu()


CASES = [  # (B, N, d, k, valid kind)
    (2, 24, 16, 6, None),
    (3, 40, 32, 12, "ragged"),
    (1, 7, 8, 7, None),  # k = N
    (2, 30, 12, 0, None),
    (2, 50, 64, 20, "random"),
]


def _valid(kind, B, N):
    if kind is None:
        return None
    if kind == "ragged":  # sample b has N - 5b usable tokens
        return torch.arange(N).expand(B, N) < (N - 5 * torch.arange(B)).unsqueeze(1)
    return torch.rand(B, N, generator=torch.Generator().manual_seed(7)) < 0.7


@pytest.mark.parametrize("kind", ["divprune", "cdpruner"])
@pytest.mark.parametrize("target", CANDIDATES, ids=target_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"-{c[4]}")
def test_method_matches_reference(kind, target, dtype, case):
    B, N, d, k, vkind = case
    if _small(target) and N > 30:
        pytest.skip("interpreted Triton: small shapes only")
    valid = _valid(vkind, B, N)
    vis, rel = _well_conditioned(kind, B, N, d, k, dtype, valid)
    want = _run(kind, vis, rel, k, valid, "reference", "cpu")
    got = _run(kind, vis, rel, k, valid, *target)
    assert_valid(got, B, N, k)
    assert torch.equal(got, want), f"{target}:\n{got}\n{want}"


@pytest.mark.parametrize("kind", ["divprune", "cdpruner"])
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_unbatched_and_views(kind, target):
    vis, rel = _well_conditioned(kind, 2, 20, 16, 5, torch.float32)
    want = _run(kind, vis, rel, 5, None, "reference", "cpu")
    one = _run(kind, vis[1], rel[1], 5, None, *target)
    assert one.shape == (5,) and torch.equal(one, want[1])
    wide = torch.full((2, 40, 20), float("nan"))
    wide[:, ::2, 2:18] = vis  # a strided, offset view with poison around it
    view = wide[:, ::2, 2:18]
    assert torch.equal(_run(kind, view, rel, 5, None, *target), want)


ADVERSARIAL = ["nan_rows", "inf_value", "zero_rows", "duplicates", "all_invalid", "huge", "constant_relevance"]


def _adversarial(name, B=2, N=16, d=8):
    g = torch.Generator().manual_seed(3)
    vis = torch.randn(B, N, d, generator=g)
    rel = torch.rand(B, N, generator=g)
    valid = None
    if name == "nan_rows":
        vis[0, [1, 4, 9]] = float("nan")
        rel[1, 3] = float("nan")
    elif name == "inf_value":
        vis[1, 2, 3] = float("inf")
        vis[0, 0, 0] = float("-inf")
    elif name == "zero_rows":
        vis[:, ::3] = 0.0
    elif name == "duplicates":
        vis[:, 1:] = vis[:, :1]
    elif name == "all_invalid":
        valid = torch.zeros(B, N, dtype=torch.bool)
        valid[1, 5] = True
    elif name == "huge":
        vis[0, 2] *= 1e30
        vis[1] *= 1e-30
    elif name == "constant_relevance":
        rel[:] = 0.5
    return vis, rel, valid


@pytest.mark.parametrize("kind", ["divprune", "cdpruner"])
@pytest.mark.parametrize("target", TARGETS, ids=target_id)
@pytest.mark.parametrize("name", ADVERSARIAL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_valid_selection_on_any_input(kind, target, name, dtype):
    if _small(target) and dtype != torch.float32:
        pytest.skip("interpreted Triton: float32 only (each call runs its programs one by one in Python)")
    vis, rel, valid = _adversarial(name)
    vis = vis.to(dtype)
    before = vis.clone()
    for k in ((1, 16) if _small(target) else (0, 1, 5, 16)):
        out = _run(kind, vis, rel, k, valid, *target)
        assert_valid(out, 2, 16, k)
        if valid is not None and k >= 1:  # the one usable token of sample 1 is always kept
            assert 5 in out[1].tolist()
    assert torch.equal(vis.view(torch.int16) if vis.element_size() == 2 else vis.view(torch.int32),
                       before.view(torch.int16) if vis.element_size() == 2 else before.view(torch.int32))


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_unusable_tokens_come_last(target):
    """Tokens with valid=False or non-finite features are chosen only when the usable ones run out, lowest first."""
    vis = gaussian((1, 12, 8), torch.float32, 5)
    vis[0, 3, 0] = float("nan")
    valid = torch.ones(1, 12, dtype=torch.bool)
    valid[0, 7:] = False
    usable = [0, 1, 2, 4, 5, 6]
    for kind in ("divprune", "cdpruner"):
        out = _run(kind, vis, torch.rand(1, 12) + 0.1, 8, valid, *target)[0].tolist()
        assert sorted(out) == sorted(usable + [3, 7])  # all 6 usable, then the two lowest unusable (3 and 7)
        out = _run(kind, vis, torch.rand(1, 12) + 0.1, 4, valid, *target)[0].tolist()
        assert set(out) <= set(usable)


# ------------------------------------------------------------------------------------------------ certificates


def _kernel64(vis, rel):
    v = vis.double()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rel.double()[:, None] * (v @ v.T) * rel.double()[None, :]


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_dpp_greedy_certificates(target):
    """Each pick has the largest gain among the unpicked tokens at its step; gains never increase; in float64 the sum
    of log gains is the log-determinant of the kernel restricted to the picks."""
    name, device = target
    P = registry.get_backend(name)
    vis = gaussian((2, 30, 16), torch.float32, 11)
    rel = torch.rand(2, 30, generator=torch.Generator().manual_seed(1)) + 0.1
    valid = torch.ones(2, 30, dtype=torch.bool)
    order, gain = P.dpp_greedy(vis.to(device), rel.to(device), valid.to(device), 12)
    order, gain = order.cpu(), gain.cpu()
    for b in range(2):
        kern = _kernel64(vis[b], rel[b])
        picks = order[b].tolist()
        assert len(set(picks)) == 12 and min(picks) >= 0
        g = gain[b].double()
        assert bool((g[1:] <= g[:-1] * (1 + 1e-5)).all()), g
        sign, logdet = torch.linalg.slogdet(kern[picks][:, picks])
        assert sign > 0 and math.isclose(float(g.log().sum()), float(logdet), rel_tol=1e-4, abs_tol=1e-4)
        for i in range(12):  # the Schur complement of every unpicked token is at most the pick's
            prev = picks[:i]
            cand = [j for j in range(30) if j not in prev]
            sub = kern[prev][:, prev] if prev else None
            best = -1.0
            for j in cand:
                sc = float(kern[j, j]) if not prev else float(
                    kern[j, j] - kern[j, prev] @ torch.linalg.solve(sub, kern[prev, j]))
                best = max(best, sc)
            assert float(g[i]) >= best * (1 - 1e-4) - 1e-6


def test_dpp_stops_when_rank_runs_out():
    """Five distinct directions repeated: the DPP ranks five tokens, then stops (no NaN) and the rest come by
    relevance."""
    base = gaussian((5, 16), torch.float32, 2)
    vis = base.repeat(4, 1).unsqueeze(0)  # 20 tokens, rank 5
    rel = torch.linspace(0.1, 1.0, 20).unsqueeze(0)
    order, gain = ReferenceBackend.dpp_greedy(vis, rel, torch.ones(1, 20, dtype=torch.bool), 10)
    assert (order[0, :5] >= 0).all() and (order[0, 5:] == -1).all()
    assert torch.isfinite(gain).all() and (gain[0, 5:] == 0).all()
    out = mob_kernels.cdpruner(vis, rel, 10, backend="reference")[0].tolist()
    ranked = set(order[0, :5].tolist())
    rest = [i for i in sorted(range(20), key=lambda i: -float(rel[0, i])) if i not in ranked][:5]
    assert sorted(out) == sorted(ranked | set(rest))


@pytest.mark.parametrize("target", TARGETS, ids=target_id)
def test_divprune_certificates(target):
    """The first pick is the most isolated usable token; every later pick is farthest from the picks before it."""
    vis = gaussian((1, 40, 16), torch.float32, 9)
    out_sorted = _run("divprune", vis, None, 10, None, *target)[0]
    v = vis[0].double()
    v = v / v.norm(dim=-1, keepdim=True)
    dist = 1 - v @ v.T
    nearest = dist.masked_fill(torch.eye(40, dtype=torch.bool), math.inf).amin(0)
    chosen = set(out_sorted.tolist())
    first = int(nearest.argmax())
    assert first in chosen
    picked = [first]
    while len(picked) < 10:  # replay greedily: each next greedy pick must be in the output
        cur = dist[picked].amin(0)
        cur[picked] = -math.inf
        nxt = int(cur.argmax())
        assert nxt in chosen
        picked.append(nxt)


# ------------------------------------------------------------------------------------------------ relevance


def test_cdpruner_relevance_formula():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 10, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[True, True, False, True], [True, False, False, False]])
    r = mob_kernels.cdpruner_relevance(img, txt, mask)
    for b in range(2):
        e = img[b] / img[b].norm(dim=-1, keepdim=True)
        t = txt[b][mask[b]] / txt[b][mask[b]].norm(dim=-1, keepdim=True)
        rho = -(e @ t.T).mean(1)
        want = (rho - rho.min() + 1e-6) / (rho.max() - rho.min())
        torch.testing.assert_close(r[b], want, rtol=1e-5, atol=1e-6)
    assert torch.equal(mob_kernels.cdpruner_relevance(img[0], txt[0], mask[0]), r[0])
    # no valid text, or constant relevance: r = 1
    assert torch.equal(mob_kernels.cdpruner_relevance(img, txt, torch.zeros(2, 4, dtype=torch.bool)),
                       torch.ones(2, 10))
    assert torch.equal(mob_kernels.cdpruner_relevance(img[:, :1].expand(2, 10, 6), txt), torch.ones(2, 10))


def test_cdpruner_relevance_errors():
    img, txt = torch.randn(2, 10, 6), torch.randn(2, 4, 6)
    for args, exc, word in [
        ((img, txt[:, :, :5]), ValueError, "text_embeds"),
        ((img, txt[:1]), ValueError, "text_embeds"),
        ((img, txt.long()), TypeError, "text_embeds"),
        ((img, txt, torch.ones(2, 3, dtype=torch.bool)), ValueError, "text_mask"),
        ((img.double(), txt), TypeError, "image_embeds"),
    ]:
        with pytest.raises(exc, match=word):
            mob_kernels.cdpruner_relevance(*args)


# ------------------------------------------------------------------------------------------ registry and ops


def test_registry_lists_methods_and_budget_rules():
    assert mob_kernels.method_names() == ["select", "divprune", "cdpruner", "d2pruner", "btp_stage"]
    assert mob_kernels.budget_arguments("select", 64) == {"k": 64, "k_p": 32}
    assert mob_kernels.budget_arguments("select", 128) == {"k": 128, "k_p": 48}
    assert mob_kernels.budget_arguments("select", 192) == {"k": 192, "k_p": 64}
    assert mob_kernels.budget_arguments("select", 320) == {"k": 320, "k_p": 106}
    assert mob_kernels.budget_arguments("divprune", 56) == {"k": 56}
    with pytest.raises(ValueError, match="method"):
        mob_kernels.budget_arguments("fastv", 64)


def test_every_backend_satisfies_the_protocol():
    for spec in registry.BACKENDS:
        got = registry._load(spec.name)
        if isinstance(got, str):
            continue
        assert isinstance(got, Backend), spec.name
        assert got.name == spec.name


def test_fused_implementation_is_preferred_and_composition_is_the_fallback(monkeypatch):
    """A backend without a fused method runs the method's composition over its primitives."""
    calls = []

    class Probe(ReferenceBackend):
        name = "reference"

        def gram(self, vis):
            calls.append("gram")
            return super().gram(vis)

    monkeypatch.setitem(registry._loaded, "reference", Probe())
    vis = gaussian((1, 12, 8), torch.float32, 1)
    mob_kernels.divprune(vis, 4, backend="reference")
    assert calls == ["gram"]

    def fused(vis, k, valid):
        calls.append("fused")
        return torch.arange(k).expand(vis.shape[0], k).clone()

    monkeypatch.setattr(Probe, "divprune", staticmethod(fused), raising=False)
    assert mob_kernels.divprune(vis, 4, backend="reference").tolist() == [[0, 1, 2, 3]]
    assert calls == ["gram", "fused"]


@pytest.mark.parametrize("op", ["divprune", "cdpruner", "farthest_point_sample"])
def test_opcheck(op):
    vis = gaussian((2, 20, 8), torch.float32, 4)
    valid = torch.rand(2, 20, generator=torch.Generator().manual_seed(0)) < 0.8
    rel = torch.rand(2, 20)
    samples = {
        "divprune": [((vis, 5), dict(valid=valid)), ((vis[0], 3), dict(valid=None)), ((vis.bfloat16(), 0), {})],
        "cdpruner": [((vis, rel, 5), dict(valid=valid)), ((vis[1], rel[1], 20), {})],
        "farthest_point_sample": [((vis, 6), dict(seed=torch.tensor([[1], [-1]]), valid=valid))],
    }[op]
    for args, kwargs in samples:
        torch.library.opcheck(getattr(torch.ops.mob, op).default, args, kwargs)


def test_methods_compile_fullgraph():
    vis = gaussian((2, 24, 8), torch.float32, 6)
    rel = torch.rand(2, 24) + 0.1

    def prune(v, r):
        return mob_kernels.divprune(v, 6), mob_kernels.cdpruner(v, r, 6)

    torch._dynamo.reset()
    got = torch.compile(prune, fullgraph=True, backend="aot_eager")(vis, rel)
    want = prune(vis, rel)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_complete_fills_by_score_then_index():
    chosen = torch.tensor([[4, -1, 1], [-1, -1, -1]])
    score = torch.tensor([[0.1, 0.9, 0.5, float("-inf"), 0.2, 0.9], [0.0] * 6])
    assert complete(chosen, 4, 6, score).tolist() == [[1, 2, 4, 5], [0, 1, 2, 3]]
    assert complete(chosen, 3, 6).tolist() == [[0, 1, 4], [0, 1, 2]]


def test_dpp_stop_constant_documented():
    assert DPP_STOP == 1e-5  # docs/contract.md §3.3 states this value
