"""Prefill of a LLaVA-1.5-shaped model (576 image tokens, random weights) with and without visual-token pruning.

One benchmark group, so pytest-benchmark prints the rows side by side: the unpruned prefill, MoB
(``apply_mob(budget=64, layer=2, mode="layer")``), D2Pruner (``budget=64, layer=2``) and BTP (the released LLaVA plan,
its layers scaled to the model's depth). The full table (more shapes, bfloat16, the selection's share, the methods'
ceilings) is ``python -m mob_kernels.integrations.prefill_bench --methods mob,d2pruner,btp``; this file is the same
measurement at one shape for ``make bench``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from mob_kernels.integrations import apply_pruning  # noqa: E402
from mob_kernels.integrations.prefill_bench import (  # noqa: E402
    IMAGE_SIZE,
    PATCH,
    build_model,
    layer_tokens,
    make_inputs,
    pruning_arguments,
)

HIDDEN, LAYERS = 1024, 8


@pytest.fixture(scope="module")
def llava_cpu():
    return build_model(HIDDEN, LAYERS), make_inputs()


@pytest.mark.parametrize("method", [None, "mob", "d2pruner", "btp"],
                         ids=["unpruned", "mob-budget64-layer2", "d2pruner-budget64-layer2", "btp-llava-plan"])
def bench_prefill(benchmark, llava_cpu, method):
    model, inputs = llava_cpu
    benchmark.group = f"prefill llava-shaped hidden={HIDDEN} layers={LAYERS} float32"
    handle = apply_pruning(model, method, record=False, **pruning_arguments(method, LAYERS)) if method else None
    try:
        with torch.inference_mode():
            out = benchmark.pedantic(lambda: model(**inputs), rounds=3, iterations=1, warmup_rounds=1)
        # The pruned run really ran on fewer tokens: each layer's KV cache holds what the method's plan says (MoB and
        # D2Pruner: 124 of the 636 positions from layer 2 on; BTP: fewer at each stage, none of the image at the end).
        tokens = inputs["input_ids"].shape[1]
        want = layer_tokens(method, LAYERS, tokens, (IMAGE_SIZE // PATCH) ** 2) if method else [tokens] * LAYERS
        assert [out.past_key_values.get_seq_length(i) for i in range(LAYERS)] == want
    finally:
        if handle:
            handle.remove()
