"""Prefill of a LLaVA-1.5-shaped model (576 image tokens, random weights) with and without MoB pruning.

Two benchmarks in one group, so pytest-benchmark prints them side by side: the unpruned prefill and the prefill with
``apply_mob(budget=64, layer=2, mode="layer")``. The full table (more shapes, bfloat16, the selection's share) is
``python -m mob_kernels.integrations.prefill_bench``; this file is the same measurement at one shape for ``make bench``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from mob_kernels.integrations import apply_mob  # noqa: E402
from mob_kernels.integrations.prefill_bench import build_model, make_inputs  # noqa: E402

HIDDEN, LAYERS = 1024, 8


@pytest.fixture(scope="module")
def llava_cpu():
    return build_model(HIDDEN, LAYERS), make_inputs()


@pytest.mark.parametrize("pruned", [False, True], ids=["unpruned", "mob-budget64-layer2"])
def bench_prefill(benchmark, llava_cpu, pruned):
    model, inputs = llava_cpu
    benchmark.group = f"prefill llava-shaped hidden={HIDDEN} layers={LAYERS} float32"
    handle = apply_mob(model, budget=64, layer=2, record=False) if pruned else None
    try:
        with torch.inference_mode():
            out = benchmark.pedantic(lambda: model(**inputs), rounds=3, iterations=1, warmup_rounds=1)
        # The pruned run really ran on fewer tokens: layers >= 2 hold 124 of the 636 positions in the KV cache.
        assert out.past_key_values.get_seq_length(LAYERS - 1) == (124 if pruned else inputs["input_ids"].shape[1])
    finally:
        if handle:
            handle.remove()
