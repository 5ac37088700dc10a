"""select, whole op, for every backend at the bench presets (regression tracking; `make bench`).

The keys are (stage, preset, N, d, k, dtype, backend); pytest-benchmark groups by everything but the backend, so the
reference and each fast backend sit next to each other in its table.
"""

import pytest

import mob_kernels
from conftest import BACKENDS, DTYPES, case_id, cases, inputs, run_benchmark

# Every budget at the LLaVA-1.5 shape; one budget per shape elsewhere keeps `make bench` to a few minutes (the CLI,
# python -m mob_kernels.bench, sweeps all of them).
CASES = cases("llava15") + cases("llava_next") + cases("qwen2vl", (64,)) + cases("video", (128,)) + cases("small")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def bench_select(benchmark, case, dtype, backend):
    vis, prompt = inputs(case, dtype)
    key = ("select", case.preset, case.N, case.d, case.k, dtype, backend)
    out = run_benchmark(benchmark, key, lambda: mobkernels_select(vis, prompt, case, backend))
    # A benchmark of a wrong answer is worthless: every backend must return the reference's indices.
    assert mob_kernels.select(vis, prompt, case.k_p, case.k, backend="reference").equal(out)


def mobkernels_select(vis, prompt, case, backend):
    return mob_kernels.select(vis, prompt, case.k_p, case.k, backend=backend)
