"""The two stages alone (prompt cover, FPS seeded by the cover) for every backend, next to the peers that do the same
job today: faiss-cpu inner-product k-NN for the cover, fpsample's vanilla FPS and the DivPrune-style eager loop for
FPS. Peers run on float32 inputs only (faiss and fpsample have no bfloat16), at the LLaVA-1.5 and small shapes (at
LLaVA-NeXT's one fpsample call takes seconds; the CLI measures it)."""

import pytest

import mob_kernels
from conftest import BACKENDS, DTYPES, case_id, cases, inputs, run_benchmark
from mob_kernels.bench import peers

CASES = cases("llava15", (64,)) + cases("llava_next") + cases("small")
PEER_CASES = cases("llava15", (64,)) + cases("small")


def _seeds(case, dtype):
    vis, prompt = inputs(case, dtype)
    cover, count = mob_kernels.prompt_cover(vis, prompt, case.k_p, backend="reference")
    return cover, case.k - int(count.min())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def bench_cover(benchmark, case, dtype, backend):
    vis, prompt = inputs(case, dtype)
    key = ("cover", case.preset, case.N, case.d, case.k, dtype, backend)
    picks = run_benchmark(benchmark, key, lambda: mob_kernels.prompt_cover(vis, prompt, case.k_p, backend=backend)[0])
    assert picks.equal(_seeds(case, dtype)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def bench_fps(benchmark, case, dtype, backend):
    vis, _ = inputs(case, dtype)
    seed, k_new = _seeds(case, dtype)
    key = ("fps", case.preset, case.N, case.d, case.k, dtype, backend)
    picks = run_benchmark(benchmark, key,
                          lambda: mob_kernels.farthest_point_sample(vis, k_new, seed=seed, backend=backend))
    assert picks.equal(mob_kernels.farthest_point_sample(vis, k_new, seed=seed, backend="reference"))


@pytest.mark.parametrize("peer", ["faiss", "fpsample", "greedy"])
@pytest.mark.parametrize("case", PEER_CASES, ids=case_id)
def bench_peer(benchmark, case, peer):
    if peer not in peers.available_peers():
        pytest.skip(f"{peer} is not installed (pip install mob_kernels[bench])")
    vis, prompt = inputs(case, "float32")
    seed, k_new = _seeds(case, "float32")
    seeds = [[int(i) for i in row if i >= 0] for row in seed.tolist()]
    stage = peers.STAGE_OF_PEER[peer]
    key = (stage, case.preset, case.N, case.d, case.k, "float32", peer)
    got = run_benchmark(benchmark, key, peers.peer_call(peer, vis, prompt, case.k_p, 0, seeds, [k_new] * case.B))
    if stage == "cover":
        assert got == seeds
    else:
        want = mob_kernels.farthest_point_sample(vis, k_new, seed=seed, backend="reference")
        assert got == want.tolist()
