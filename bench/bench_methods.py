"""DivPrune, CDPruner, D2Pruner and one BTP stage, whole method, for every backend and (DivPrune, CDPruner) for the
released algorithm's own eager loop (the peer), at the LLaVA-1.5 (N=576, d=4096, k=64; BTP's stage 576 -> 288) and
LLaVA-NeXT (N=2880, k=320; BTP 2880 -> 1440) shapes, float32 and bfloat16 (`make bench`). D2Pruner and BTP read the
importance ``make_importance`` gives (no released code to run: D2Pruner's is not public, BTP's is a model fork).

The keys are (method, preset, N, d, k, dtype, implementation); pytest-benchmark groups by everything but the
implementation, so the reference, each fast backend and the released loop sit next to each other in its table, and
the closing summary (conftest.py) gives each one's ratio to the reference and the target: at least 5x on the CPU at
LLaVA-1.5 in float32 and bfloat16.
"""

import functools

import pytest

import mob_kernels
from conftest import BACKENDS, DEVICE, case_id, cases, inputs, run_benchmark
from mob_kernels.bench import peers
from mob_kernels.bench.presets import btp_stage_args, make_importance, make_relevance

METHODS = ("divprune", "cdpruner", "d2pruner", "btp_stage")
RELEASED = ("divprune", "cdpruner")  # the methods with a released loop to run beside the backends
CASES = [c for m in METHODS for c in cases("llava15", methods=(m,)) + cases("llava_next", methods=(m,))]
IMPLS = list(BACKENDS) + ["released"]


@functools.lru_cache(maxsize=4)
def relevance(case, dtype):
    vis, prompt = inputs(case, dtype)
    return make_relevance(vis, prompt)


@functools.lru_cache(maxsize=4)
def importance(case, dtype):
    vis, prompt = inputs(case, dtype)
    return make_importance(vis, prompt)


def method_call(case, dtype, impl):
    vis, _ = inputs(case, dtype)
    k = case.k
    if case.method == "d2pruner":
        imp = importance(case, dtype)
        return lambda: mob_kernels.d2pruner(vis, imp, k, backend=impl)[0]
    if case.method == "btp_stage":
        imp, args = importance(case, dtype), btp_stage_args(case)
        return lambda: mob_kernels.btp_stage(vis, imp, k, backend=impl, **args)
    if case.method == "divprune":
        if impl == "released":
            return lambda: peers.divprune_released(vis, k)
        return lambda: mob_kernels.divprune(vis, k, backend=impl)
    r = relevance(case, dtype)
    if impl == "released":
        return lambda: peers.cdpruner_released(vis, r, k)
    return lambda: mob_kernels.cdpruner(vis, r, k, backend=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.method}-{case_id(c)}")
def bench_method(benchmark, case, dtype, impl):
    if impl == "released" and case.method not in RELEASED:
        pytest.skip(f"{case.method} has no released selection loop to run")
    key = (case.method, case.preset, case.N, case.d, case.k, dtype, impl)
    out = run_benchmark(benchmark, key, method_call(case, dtype, impl))
    # A benchmark of a wrong answer is worthless: every backend, and the released loop, must pick the reference's
    # tokens (the released DivPrune returns them in selection order).
    want = method_call(case, dtype, "reference")()
    assert out.sort(dim=1).values.equal(want), f"{impl} on {DEVICE} differs from the reference"
