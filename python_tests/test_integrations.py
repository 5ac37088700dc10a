"""MoB inside transformers models: tiny random models built from configs (nothing downloaded).

The no-cache reference below re-implements "the pruned sequence" independently of the hooks: it runs the language
model's own decoder layers by hand (layers < l on the whole sequence, layers >= l on the kept tokens plus the generated
ones) and compares greedy tokens with the hooked ``generate()`` that runs on the KV cache.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

import mob_kernels  # noqa: E402
from mob_kernels.integrations import (  # noqa: E402
    FPS_COLOUR,
    METHODS,
    PROMPT_COLOUR,
    ROLE_COLOURS,
    ROLES,
    SUPPORTED_TRANSFORMERS,
    UnsupportedModelError,
    apply_mob,
    apply_pruning,
    draw_kept_patches,
)
from mob_kernels.integrations import layout as _layout  # noqa: E402

IMG = 127  # LLaVA image token
N_LLAVA = 16  # image tokens per 56 x 56 image
Q_IMG, Q_VID, Q_START, Q_END = 150, 151, 152, 153

_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=14)
_QTEXT = dict(_TEXT, vocab_size=160,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]})


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(image_size=56, **_CLIP), text_config=LlamaConfig(**_TEXT),
                      image_token_index=IMG, image_seq_length=N_LLAVA, vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def llava_next():
    torch.manual_seed(1)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=28, **_CLIP), text_config=LlamaConfig(**_TEXT),
                          image_token_index=IMG, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
                          vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaNextForConditionalGeneration(cfg).eval()


def _qwen(cls, cfg_cls, seed, **vision):
    torch.manual_seed(seed)
    vis = dict(depth=2, num_heads=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision)
    cfg = cfg_cls(text_config=_QTEXT, vision_config=vis, image_token_id=Q_IMG, video_token_id=Q_VID,
                  vision_start_token_id=Q_START, vision_end_token_id=Q_END)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def qwen2():
    return _qwen(Qwen2VLForConditionalGeneration, Qwen2VLConfig, 2, embed_dim=32, hidden_size=64)


@pytest.fixture(scope="module")
def qwen25():
    return _qwen(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig, 3, hidden_size=32, out_hidden_size=64,
                 intermediate_size=64, fullatt_block_indexes=[1], window_size=56)


def llava_inputs(texts_before, texts_after, n_images=1, seed=0):
    """One row: text, n_images images (each a run of 16 image tokens, separated by a text token), text."""
    g = torch.Generator().manual_seed(seed)
    ids = list(texts_before)
    for i in range(n_images):
        ids += [IMG] * N_LLAVA + ([40 + i] if i + 1 < n_images else [])
    ids += list(texts_after)
    return torch.tensor([ids]), torch.randn(n_images, 3, 56, 56, generator=g)


def qwen_inputs(after=(7, 8, 9, 10, 11), grid=(1, 8, 8), video=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n = t * h * w // 4
    tok = Q_VID if video else Q_IMG
    ids = torch.tensor([[1, 2, Q_START] + [tok] * n + [Q_END, *after]])
    px = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=g)
    grid_t = torch.tensor([list(grid)])
    if video:
        kw = dict(pixel_values_videos=px, video_grid_thw=grid_t)
    else:
        kw = dict(pixel_values=px, image_grid_thw=grid_t)
    # 5.x needs the token types whenever a grid is given (1 = image, 2 = video).
    return dict(input_ids=ids, mm_token_type_ids=(ids == tok).int() * (2 if video else 1), **kw), n


def logits(model, **kw):
    with torch.no_grad():
        return model(**kw).logits


# --------------------------------------------------------------------------------------------- exactness and remove


@pytest.mark.parametrize("mode", ["layer", "input"])
def test_keep_all_is_exact_and_remove_restores_llava(llava, mode):
    ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10, 11], n_images=2)
    ref = logits(llava, input_ids=ids, pixel_values=px)
    with apply_mob(llava, budget=N_LLAVA, mode=mode) as h:
        assert torch.equal(logits(llava, input_ids=ids, pixel_values=px), ref)
        assert h.keep_index.shape == (1, ids.shape[1])
    h = apply_mob(llava, budget=4, mode=mode)
    pruned = logits(llava, input_ids=ids, pixel_values=px)
    assert pruned.shape[1] == ids.shape[1] - 2 * (N_LLAVA - 4)
    assert not torch.allclose(pruned[:, -1], ref[:, -1])
    h.remove()
    assert torch.equal(logits(llava, input_ids=ids, pixel_values=px), ref)
    assert not llava.model._forward_pre_hooks and not llava.model.language_model._forward_pre_hooks
    assert all(not layer._forward_pre_hooks for layer in llava.model.language_model.layers)


def test_keep_all_is_exact_llava_next(llava_next):
    ids = torch.tensor([[1, 5] + [IMG] * 14 + [7, 8, 9]])  # base 2x2 + 1x2 tiles of 2x2 + 2 newline tokens = 14
    kw = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 3, 28, 28), image_sizes=torch.tensor([[50, 100]]))
    ref = logits(llava_next, **kw)
    with apply_mob(llava_next, budget=14):
        assert torch.equal(logits(llava_next, **kw), ref)
    with apply_mob(llava_next, budget=5) as h:
        assert logits(llava_next, **kw).shape[1] == ids.shape[1] - 9
        assert h.kept[0][0].num_tokens == 14 and len(h.kept[0][0].indices) == 5
    assert torch.equal(logits(llava_next, **kw), ref)


@pytest.mark.parametrize("which", ["qwen2", "qwen25"])
@pytest.mark.parametrize("mode", ["layer", "input"])
def test_keep_all_is_exact_and_remove_restores_qwen(request, which, mode):
    model = request.getfixturevalue(which)
    kw, n = qwen_inputs()
    ref = logits(model, **kw)
    with apply_mob(model, budget=n, mode=mode):
        assert torch.equal(logits(model, **kw), ref)
    with apply_mob(model, budget=4, mode=mode):
        assert logits(model, **kw).shape[1] == kw["input_ids"].shape[1] - (n - 4)
    assert torch.equal(logits(model, **kw), ref)


# ------------------------------------------------------------------------------------- generate == no-cache reference


def _capture_lm_inputs(model, **kw):
    """The language model's inputs (merged embeddings, position ids) of an unhooked forward."""
    seen = {}

    def grab(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], pos=kwargs.get("position_ids"))

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits(model, **kw)
    finally:
        hook.remove()
    return seen["embeds"], seen["pos"]


def _reference_logits(model, embeds, pos, keep, gen, *, layer, mode, compact):
    """Last-token logits of the pruned sequence, without any cache and without the hooks."""
    lm = model.model.language_model
    L = embeds.shape[1]
    x = torch.cat([embeds, lm.embed_tokens(gen)], dim=1) if gen.numel() else embeds
    T = x.shape[1]
    mrope = pos.dim() == 3
    idx = torch.cat([keep[0], torch.arange(L, T)])
    if compact:
        kept_pos = torch.arange(idx.numel()).unsqueeze(0)
    else:
        kept_pos = pos[..., idx]

    def run(h, layers, p):
        cs = lm.rotary_emb(h, p)
        for blk in layers:
            # No mask: sdpa's is_causal is exact for a single unpadded row in order.
            h = blk(h, attention_mask=None, position_embeddings=cs, position_ids=None if mrope else p)
        return h

    first = layer if mode == "layer" else 0
    if first:
        x = run(x, lm.layers[:first], pos)
    x = run(x[:, idx], lm.layers[first:], kept_pos)
    return model.lm_head(lm.norm(x[:, -1]))


def _extend_positions(pos, steps):
    """Decode positions continue from the original prompt: last + 1 per new token (all three M-RoPE rows alike)."""
    last = pos[..., -1:]
    return torch.cat([pos, last + torch.arange(1, steps + 1)], dim=-1)


@pytest.mark.parametrize(
    "mode, positions",
    [("layer", "keep"), ("layer", "compact"), ("input", "keep"), ("input", "compact")],
)
def test_generate_with_cache_equals_no_cache_loop_llava(llava, mode, positions):
    ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10, 11], n_images=2, seed=3)
    embeds, _ = _capture_lm_inputs(llava, input_ids=ids, pixel_values=px)
    steps = 6
    with apply_mob(llava, budget=5, mode=mode, positions=positions) as h, torch.no_grad():
        out = llava.generate(input_ids=ids, pixel_values=px, max_new_tokens=steps, do_sample=False)
        keep = h.keep_index
    gen = out[:, ids.shape[1]:]
    assert gen.shape[1] == steps
    pos = _extend_positions(torch.arange(ids.shape[1]).unsqueeze(0), steps)
    with torch.no_grad():
        for t in range(steps):
            ref = _reference_logits(llava, embeds, pos[:, : ids.shape[1] + t], keep, gen[:, :t], layer=2,
                                    mode=mode, compact=positions == "compact")
            assert int(ref.argmax(-1)) == int(gen[0, t]), f"step {t}"


@pytest.mark.parametrize("which, mode", [("qwen2", "layer"), ("qwen25", "input")])
def test_generate_with_cache_equals_no_cache_loop_qwen(request, which, mode):
    model = request.getfixturevalue(which)
    kw, n = qwen_inputs(seed=5)
    L = kw["input_ids"].shape[1]
    embeds, pos = _capture_lm_inputs(model, **kw)
    assert pos.shape == (3, 1, L)
    steps = 5
    with apply_mob(model, budget=6, layer=1, mode=mode) as h, torch.no_grad():
        out = model.generate(**kw, max_new_tokens=steps, do_sample=False)
        keep = h.keep_index
    gen = out[:, L:]
    pos = _extend_positions(pos, steps)
    with torch.no_grad():
        for t in range(steps):
            ref = _reference_logits(model, embeds, pos[..., : L + t], keep, gen[:, :t], layer=1, mode=mode,
                                    compact=False)
            assert int(ref.argmax(-1)) == int(gen[0, t]), f"step {t}"


class _ForceToken(transformers.LogitsProcessor):
    """Greedy decoding that emits ``token`` at the given generation steps (as sampling might)."""

    def __init__(self, token, steps, prompt_length):
        self.token, self.steps, self.prompt_length = token, set(steps), prompt_length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length in self.steps:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.token] = 0.0
            return forced
        return scores


def _generate_forcing(model, token, steps, n_steps, **kw):
    L = kw["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=n_steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, logits_processor=[_ForceToken(token, steps, L)])
    return out.sequences[:, L:], torch.cat(out.logits)  # raw logits, before the forcing


@pytest.mark.parametrize("which, mode", [("llava", "layer"), ("llava", "input"), ("qwen2", "layer"),
                                         ("qwen25", "input")])
def test_decode_step_emitting_the_image_token_is_an_ordinary_token(request, which, mode):
    """A decode step whose new token is the image placeholder id (here forced at steps 0 and 2) extends the pruned
    cache like any token: nothing aborts, keep-all equals the unhooked model step for step, and a pruned generate
    equals the no-cache loop that embeds that token as the unhooked model does."""
    model = request.getfixturevalue(which)
    if which == "llava":
        ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10, 11], n_images=2, seed=17)
        kw, n, token, layer = dict(input_ids=ids, pixel_values=px), N_LLAVA, IMG, 2
    else:
        kw, n = qwen_inputs(seed=19)
        token, layer = Q_IMG, 1
    L = kw["input_ids"].shape[1]
    steps, forced = 5, (0, 2)
    plain_gen, plain_logits = _generate_forcing(model, token, forced, steps, **kw)
    assert [int(plain_gen[0, t]) == token for t in forced] == [True, True]
    with apply_mob(model, budget=n, layer=layer, mode=mode):
        gen, out_logits = _generate_forcing(model, token, forced, steps, **kw)
    assert torch.equal(gen, plain_gen)
    torch.testing.assert_close(out_logits, plain_logits, atol=1e-5, rtol=1e-5)

    embeds, pos = _capture_lm_inputs(model, **kw)
    if pos is None:
        pos = torch.arange(L).unsqueeze(0)
    with apply_mob(model, budget=5, layer=layer, mode=mode) as h:
        gen, out_logits = _generate_forcing(model, token, forced, steps, **kw)
        keep = h.keep_index
    assert keep.shape[1] == L - (kw["input_ids"] == token).sum() + 5 * (2 if which == "llava" else 1)
    assert [int(gen[0, t]) for t in forced] == [token, token]
    pos = _extend_positions(pos, steps)
    with torch.no_grad():
        for t in range(steps):
            ref = _reference_logits(model, embeds, pos[..., : L + t], keep, gen[:, :t], layer=layer, mode=mode,
                                    compact=False)
            torch.testing.assert_close(out_logits[t], ref[0], atol=1e-4, rtol=1e-4, msg=f"step {t}")


def test_images_after_cached_tokens_raise(llava):
    ids, px = llava_inputs([1, 5], [7, 8], seed=23)
    with apply_mob(llava, budget=4), torch.no_grad():
        cache = llava(input_ids=ids, pixel_values=px, use_cache=True).past_key_values
        with pytest.raises(NotImplementedError, match="after cached tokens"):
            llava(input_ids=ids, pixel_values=px, past_key_values=cache)


def test_generate_sampling_and_qwen2_video(qwen2):
    kw, n = qwen_inputs(grid=(2, 8, 8), video=True, seed=7)  # 2 temporal patches -> 32 video tokens
    assert n == 32
    with apply_mob(qwen2, budget=0.25) as h, torch.no_grad():
        torch.manual_seed(0)
        out = qwen2.generate(**kw, max_new_tokens=4, do_sample=True, top_k=5)
        assert h.kept[0][0].num_tokens == 32 and len(h.kept[0][0].indices) == 8
        assert h.keep_index.shape[1] == kw["input_ids"].shape[1] - 24
    assert out.shape == (1, kw["input_ids"].shape[1] + 4)


# ------------------------------------------------------------------------------------- every method: apply_pruning


def _method_case(which, seed):
    """Inputs, image tokens per image, placeholder id and number of images for one model."""
    if which == "llava":
        ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10, 11], n_images=2, seed=seed)
        return dict(input_ids=ids, pixel_values=px), N_LLAVA, IMG, 2
    kw, n = qwen_inputs(seed=seed)
    return kw, n, Q_IMG, 1


@pytest.mark.parametrize("which", ["llava", "qwen2"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "btp"])  # BTP's counts come from a schedule: below
def test_every_method_keep_all_exact_budget_per_image_and_cached_generate(request, method, which):
    model = request.getfixturevalue(which)
    kw, n, token, n_images = _method_case(which, seed=31)
    ids = kw["input_ids"]
    L = ids.shape[1]
    ref = logits(model, **kw)
    with apply_pruning(model, method, budget=n) as h:
        assert torch.equal(logits(model, **kw), ref)
        assert h.keep_index.shape == (1, L)

    embeds, pos = _capture_lm_inputs(model, **kw)
    pos = torch.arange(L).unsqueeze(0) if pos is None else pos
    budget, steps = 5, 5
    with apply_pruning(model, method, budget=budget) as h, torch.no_grad():
        # The papers' settings: MoB and D2Pruner before layer 2 with the original positions; DivPrune and CDPruner on
        # the projector output, numbered contiguously where positions are 1-D.
        assert (h.mode, h.positions) == (("layer", "keep") if method in ("mob", "d2pruner") else
                                         ("input", "keep" if which == "qwen2" else "compact"))
        assert logits(model, **kw).shape[1] == L - n_images * (n - budget)
        kept_ids = ids[0, h.keep_index[0]]
        assert int((kept_ids == token).sum()) == n_images * budget and torch.equal(kept_ids[kept_ids != token],
                                                                                   ids[0][ids[0] != token])
        assert [len(r.indices) for r in h.kept[0]] == [budget] * n_images
        for r in h.kept[0]:
            assert r.method == method and len(r.roles) == budget and set(r.roles) <= set(ROLES[method])
            for role in ROLES[method]:
                assert torch.equal(r.role_indices(role), r.indices[[x == role for x in r.roles]])
            if method == "mob":
                assert r.roles.count("prompt") <= mob_kernels.prompt_budget(budget)
                assert r.from_prompt.tolist() == [x == "prompt" for x in r.roles]
            elif method == "divprune":
                assert r.roles.count("isolated") == 1 and not r.from_prompt.any()
            elif method == "cdpruner":
                assert r.relevance is not None and r.relevance.shape == (budget,)
            else:  # 5 tokens: floor(0.7 * 5) = 3 pivots, then the independent set (and its fill)
                assert r.roles.count("pivot") == 3 and r.importance.shape == (budget,) and not r.from_prompt.any()
        records = h.kept
        if method in ("divprune", "cdpruner"):  # input mode: the ops on the projector output, prompt after the image
            starts = [r.start for r in records[0]]
            prompt = embeds[:, starts[-1] + n:]
            for r in records[0]:
                vis = embeds[:, r.start:r.start + n]
                if method == "divprune":
                    expect = mob_kernels.divprune(vis, budget)
                else:
                    rel = mob_kernels.cdpruner_relevance(vis, prompt)
                    expect = mob_kernels.cdpruner(vis, rel, budget)
                    torch.testing.assert_close(r.relevance, rel[0, r.indices])
                assert torch.equal(r.indices, expect[0])
        out = model.generate(**kw, max_new_tokens=steps, do_sample=False)
        keep, mode, layer, compact = h.keep_index, h.mode, h.layer, h.positions == "compact"
    gen = out[:, L:]
    assert gen.shape[1] == steps
    pos = _extend_positions(pos, steps)
    with torch.no_grad():
        for t in range(steps):
            r = _reference_logits(model, embeds, pos[..., : L + t], keep, gen[:, :t], layer=layer, mode=mode,
                                  compact=compact)
            assert int(r.argmax(-1)) == int(gen[0, t]), f"step {t}"


def test_apply_pruning_arguments(llava, qwen2):
    with pytest.raises(ValueError, match="method must be one of"):
        apply_pruning(llava, "fastv")
    with pytest.raises(ValueError, match="prompt_budget and fold are MoB's"):
        apply_pruning(llava, "divprune", prompt_budget=3)
    with pytest.raises(ValueError, match="compact"):
        apply_pruning(qwen2, "cdpruner", positions="compact")
    with apply_pruning(llava, "divprune", mode="layer", positions="keep", layer=1) as h:
        assert (h.method, h.mode, h.positions, h.layer) == ("divprune", "layer", "keep", 1)
    with apply_mob(llava) as h:
        assert (h.method, h.mode, h.positions) == ("mob", "layer", "keep")
    assert not llava.model._forward_pre_hooks and not qwen2.model._forward_pre_hooks


# ---------------------------------------------------------------------------------------------- batches and lengths


def _left_padded(which, seeds=(11, 12)):
    """Two rows of different lengths, left-padded into one batch: (batch kwargs, [each row's own kwargs], width)."""
    if which == "llava":
        rows = [llava_inputs([1, 5, 6], [7, 8, 9, 10, 11, 12, 13], seed=seeds[0]),
                llava_inputs([1], [20, 21, 22], seed=seeds[1])]
        rows = [dict(input_ids=i, pixel_values=p) for i, p in rows]
    else:
        rows = [qwen_inputs(after=(7, 8, 9, 10, 11, 12), seed=seeds[0])[0],
                qwen_inputs(after=(20, 21), seed=seeds[1])[0]]
    width = max(r["input_ids"].shape[1] for r in rows)

    def pad(x, value=0):
        return torch.nn.functional.pad(x[0], (width - x.shape[1], 0), value=value)

    batch = dict(input_ids=torch.stack([pad(r["input_ids"]) for r in rows]),
                 attention_mask=torch.stack([pad(torch.ones_like(r["input_ids"])) for r in rows]))
    for key in rows[0]:
        if key == "mm_token_type_ids":
            batch[key] = torch.stack([pad(r[key]) for r in rows])
        elif key != "input_ids":
            batch[key] = torch.cat([r[key] for r in rows])
    return batch, rows, width


# A 3-stage BTP plan for the 4-layer test models (1-based "prune before layer"): 16 -> 8 -> 4 -> 0 tokens per image.
TINY_BTP = [
    dict(layer=2, keep=8, mode="union", n_div=3, n_attn=3, n_extra=10, rebalance=8, spatial_seed=4),
    dict(layer=3, keep="n//2", mode="attn_seeded", n_attn="int(0.4*k)"),
    dict(layer=4, keep=0),
]
_PADDED_CASES = {"mob": dict(budget=6), "d2pruner": dict(budget=6), "btp": dict(schedule=TINY_BTP)}


@pytest.mark.parametrize("which, method", [("llava", "mob"), ("llava", "d2pruner"), ("llava", "btp"),
                                           ("qwen2", "d2pruner"), ("qwen2", "btp")])
def test_left_padded_batch_equals_rows_alone(request, which, method):
    model = request.getfixturevalue(which)
    batch, rows, width = _left_padded(which)
    with apply_pruning(model, method, **_PADDED_CASES[method]) as h, torch.no_grad():
        batch_out = model.generate(**batch, max_new_tokens=5, do_sample=False)
        batch_stages = [keep.clone() for _, keep in h.stage_index]
        assert len(batch_stages) == (3 if method == "btp" else 1)
        batch_logits = model(**batch).logits[:, -1]
        for b, row in enumerate(rows):
            n = row["input_ids"].shape[1]
            offset = width - n
            alone = model.generate(**row, max_new_tokens=5, do_sample=False)
            assert torch.equal(batch_out[b, width:], alone[0, n:])
            # Each stage's kept positions are the lone run's, shifted by the row's padding (padding itself is kept).
            for keep, (_, alone_keep) in zip(batch_stages, h.stage_index):
                real = keep[b][keep[b] >= offset] - offset
                assert torch.equal(real, alone_keep[0])
            alone_logits = model(**row).logits[:, -1]
            torch.testing.assert_close(batch_logits[b], alone_logits[0], atol=1e-5, rtol=1e-5)


def _record_lengths(model):
    seen, hooks = {}, []
    for i, blk in enumerate(model.model.language_model.layers):
        hooks.append(blk.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__(i, (a[0] if a else k["hidden_states"]).shape[1]),
            with_kwargs=True))
    return seen, hooks


@pytest.mark.parametrize("budget, per_image", [(5, 5), (0.25, 4)])
def test_layers_from_l_see_text_plus_budget_per_image(llava, budget, per_image):
    ids, px = llava_inputs([1, 5, 6], [7, 8, 9], n_images=3)
    n_text = int((ids != IMG).sum())
    with apply_mob(llava, budget=budget, layer=2) as h:
        seen, hooks = _record_lengths(llava)  # registered after apply_mob: they see what the layers get
        try:
            logits(llava, input_ids=ids, pixel_values=px)
        finally:
            for hk in hooks:
                hk.remove()
        assert seen == {0: ids.shape[1], 1: ids.shape[1], 2: n_text + 3 * per_image, 3: n_text + 3 * per_image}
        with torch.no_grad():
            cache = llava(input_ids=ids, pixel_values=px, use_cache=True).past_key_values
        assert [cache.get_seq_length(i) for i in range(4)] == [ids.shape[1]] * 2 + [n_text + 3 * per_image] * 2
        assert [len(r.indices) for r in h.kept[0]] == [per_image] * 3
        # The record and the kept positions agree: each image's kept tokens sit at start + indices.
        kept = torch.cat([r.start + r.indices for r in h.kept[0]])
        img_keep = h.keep_index[0][ids[0, h.keep_index[0]] == IMG]
        assert torch.equal(kept, img_keep)


def test_record_splits_prompt_cover_and_fps(llava):
    ids, px = llava_inputs([1, 5], [7, 8, 9, 10], seed=4)
    # fold=16 (every prompt token nominates every image token): the cover fills its share whatever the random weights.
    with apply_mob(llava, budget=8, prompt_budget=3, fold=16) as h:
        logits(llava, input_ids=ids, pixel_values=px)
        rec = h.kept[0][0]
    assert len(rec.indices) == 8 and int(rec.from_prompt.sum()) == 3
    assert torch.equal(torch.sort(torch.cat([rec.prompt_indices, rec.fps_indices])).values, rec.indices)
    # prompt_budget=None: the package's one budget rule, mob_kernels.prompt_budget (64 -> 32, 128 -> 48, 192 -> 64).
    with apply_mob(llava, budget=8, fold=16) as h:
        logits(llava, input_ids=ids, pixel_values=px)
        assert int(h.kept[0][0].from_prompt.sum()) == mob_kernels.prompt_budget(8) == 4


def test_rows_with_different_image_layouts_raise(llava):
    a, pa = llava_inputs([1, 5, 6], [7, 8], n_images=2)
    b, pb = llava_inputs(list(range(1, 21)), [7, 8], n_images=1)
    assert a.shape == b.shape
    with apply_mob(llava, budget=4), pytest.raises(ValueError, match="same images"):
        logits(llava, input_ids=torch.cat([a, b]), pixel_values=torch.cat([pa, pb]))


# ----------------------------------------------------------------------------------------------------- Qwen M-RoPE


@pytest.mark.parametrize("which", ["qwen2", "qwen25"])
@pytest.mark.parametrize("mode", ["layer", "input"])
def test_qwen_kept_tokens_keep_their_mrope_positions(request, which, mode):
    model = request.getfixturevalue(which)
    kw, n = qwen_inputs(seed=9)
    _, pos = _capture_lm_inputs(model, **kw)
    assert not torch.equal(pos[1], pos[2])  # a real 2-D grid, so a wrong gather would show
    lm = model.model.language_model
    seen = {}
    with apply_mob(model, budget=5, layer=2, mode=mode) as h:
        if mode == "input":
            hook = lm.register_forward_pre_hook(lambda m, a, k: seen.update(pos=k["position_ids"]), with_kwargs=True)
        else:
            hook = lm.layers[3].register_forward_pre_hook(
                lambda m, a, k: seen.update(cs=k["position_embeddings"]), with_kwargs=True)
        try:
            logits(model, **kw)
        finally:
            hook.remove()
        keep = h.keep_index
    assert keep.shape[1] == kw["input_ids"].shape[1] - (n - 5)
    if mode == "input":
        assert torch.equal(seen["pos"], pos[..., keep[0]])
    else:
        x = torch.zeros(1, keep.shape[1], 64)
        cos, sin = lm.rotary_emb(x, pos[..., keep[0]])
        assert torch.equal(seen["cs"][0], cos) and torch.equal(seen["cs"][1], sin)


def test_qwen_compact_positions_refused(qwen2):
    with pytest.raises(ValueError, match="compact"):
        apply_mob(qwen2, positions="compact")


# ----------------------------------------------------------------------------------------------------------- errors


def test_unsupported_model_and_version_fail_loudly(llava, monkeypatch):
    lm = transformers.LlamaForCausalLM(LlamaConfig(**_TEXT))
    with pytest.raises(UnsupportedModelError, match="model_type='llama'"):
        apply_mob(lm)
    with pytest.raises(ValueError, match="layer"):
        apply_mob(llava, layer=4)
    with pytest.raises(ValueError, match="budget"):
        apply_mob(llava, budget=1.5)
    from mob_kernels.integrations import hf

    for version in ("4.57.1", "5.3.0", "6.0.0.dev0"):
        monkeypatch.setattr(hf, "installed_transformers_version", lambda v=version: v)
        message = rf"{re.escape(SUPPORTED_TRANSFORMERS)}.*{re.escape(version)}"
        with pytest.raises(UnsupportedModelError, match=message):
            apply_mob(llava)
    assert not llava.model._forward_pre_hooks  # nothing was left applied
    for version in ("5.4.0", "5.19.0", "5.23.0", "5.99.1rc1"):
        monkeypatch.setattr(hf, "installed_transformers_version", lambda v=version: v)
        apply_mob(llava).remove()


def test_supported_range_is_stated_once():
    """pyproject's integrations extra says SUPPORTED_TRANSFORMERS; the Makefile tests its lowest and highest ends."""
    from mob_kernels.integrations import hf

    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists() or not (root / "Makefile").exists():
        pytest.skip("not a source checkout")
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"transformers{SUPPORTED_TRANSFORMERS}" in extras["integrations"]
    makefile = (root / "Makefile").read_text()
    lowest = re.search(r"^TRANSFORMERS_LOWEST\s*:?=\s*(\d+)\.(\d+)\.\d+\s*$", makefile, re.M)
    highest = re.search(r"\btransformers==(\d+)\.(\d+)\.\d+", makefile)
    assert lowest and highest
    assert tuple(map(int, lowest.groups())) == hf.MIN_TRANSFORMERS
    assert hf.MIN_TRANSFORMERS <= tuple(map(int, highest.groups())) < hf.MAX_TRANSFORMERS_EXCLUSIVE


def test_backends_agree_inside_the_model(llava):
    ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10, 11], seed=13)
    kept = {}
    for backend in mob_kernels.available_backends("cpu"):
        if backend == "triton":
            continue  # the interpreter is covered by the kernel tests; too slow to add here
        with apply_mob(llava, budget=6, backend=backend) as h:
            logits(llava, input_ids=ids, pixel_values=px)
            kept[backend] = h.keep_index
    assert "reference" in kept and len(kept) >= 2
    for k in kept.values():
        assert torch.equal(k, kept["reference"])


# ------------------------------------------------------------------------------------------------------------ draw


def test_draw_kept_patches_png_over_a_real_photo(llava, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0])  # china.jpg, 427 x 640
    ids, px = llava_inputs([1, 5], [7, 8, 9, 10], seed=21)
    with apply_mob(llava, budget=5, prompt_budget=2) as h:
        logits(llava, input_ids=ids, pixel_values=px)
        rec = h.kept[0][0]
    path = tmp_path / "kept.png"
    out = draw_kept_patches(photo, rec, size=224, path=path)
    saved = Image.open(path)
    assert saved.format == "PNG" and saved.size == (224, 224)
    orig = photo.convert("RGB").resize((224, 224), Image.BICUBIC)
    cell = 224 // 4
    kept = set(rec.indices.tolist())
    for i in range(16):
        r, c = divmod(i, 4)
        centre = (c * cell + cell // 2, r * cell + cell // 2)
        if i in kept:
            assert out.getpixel(centre) == orig.getpixel(centre)
            colour = PROMPT_COLOUR if bool(rec.from_prompt[rec.indices == i]) else FPS_COLOUR
            assert out.getpixel((c * cell, r * cell + cell // 2)) == colour  # outline on the cell's left edge
        else:
            o = orig.getpixel(centre)
            assert out.getpixel(centre) == tuple(int(v * 0.3) for v in o)
    with pytest.raises(ValueError, match="grid"):
        draw_kept_patches(photo, rec, grid=(3, 4))


def test_draw_colours_each_role(llava):
    ids, px = llava_inputs([1, 5], [7, 8, 9, 10], seed=25)
    with apply_pruning(llava, "divprune", budget=5) as h:
        logits(llava, input_ids=ids, pixel_values=px)
        rec = h.kept[0][0]
    out = draw_kept_patches(torch.full((112, 112, 3), 200, dtype=torch.uint8), rec)
    cell = 112 // 4
    for i, role in zip(rec.indices.tolist(), rec.roles):
        r, c = divmod(i, 4)
        assert out.getpixel((c * cell, r * cell + cell // 2)) == ROLE_COLOURS[role]
    assert rec.roles.count("isolated") == 1 and ROLE_COLOURS["isolated"] not in (PROMPT_COLOUR, FPS_COLOUR)


# --------------------------------------------------------------- the methods that read the model: D2Pruner and BTP


def _keep_all_btp(n_layers=4):
    """A BTP plan that reads the attention before every layer from 1 on and keeps every token."""
    return [dict(layer=i, keep="n", mode="attn_only", n_extra="n") for i in range(2, n_layers + 1)]


def _eager_copy(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def _layer_inputs(model, indices):
    """Hooks recording what decoder layers ``indices`` return (= what enters the next layer) on the next forward."""
    seen, hooks = {}, []
    for i in indices:
        hooks.append(model.model.language_model.layers[i].register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out)))
    return seen, hooks


@pytest.mark.parametrize("which", ["llava", "qwen2"])
def test_last_token_attention_equals_eager_weights(request, which):
    """The last prompt token's attention the hooks compute from each layer's own projections (one query row, the
    model left on sdpa) equals transformers' eager attention weights of the same layer, head by head, in float32,
    on a left-padded batch (padding keys get exactly 0)."""
    model = request.getfixturevalue(which)
    batch, _, _ = _left_padded(which, seeds=(41, 42))
    eager = _eager_copy(model)
    with torch.no_grad():
        out = eager(**batch, output_attentions=True)
    with apply_pruning(model, "btp", schedule=_keep_all_btp()) as h:
        # Keeps everything (padding queries excluded: sdpa and eager fill fully masked rows differently).
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(logits(model, **batch)[real], out.logits[real], atol=1e-5, rtol=1e-5)
        assert model.config._attn_implementation == "sdpa"
        assert sorted(h.attention) == [0, 1, 2]
        for i, att in h.attention.items():
            want = out.attentions[i][:, :, -1, :]
            assert att.shape == want.shape == (2, 4, batch["input_ids"].shape[1])
            torch.testing.assert_close(att, want, atol=1e-6, rtol=0)
            assert (att.transpose(1, 2)[batch["attention_mask"] == 0] == 0).all()  # padding keys: exactly 0
            torch.testing.assert_close(torch.softmax(h.attention_logits[i], -1), att, atol=1e-7, rtol=0)


def _image_positions(ids, token):
    return (ids[0] == token).nonzero().flatten()


@pytest.mark.parametrize("which", ["llava", "qwen2", "llava_next"])
def test_d2pruner_keeps_the_ops_picks_on_the_models_tensors(request, which):
    """D2Pruner before layer 2: the kept tokens are mob_kernels.d2pruner's on the hidden states entering layer 2, the
    last-token attention at layer 1 (heads averaged) and the image's grid; layers 0-1 cache every token, layers 2-3
    the text plus the budget per image."""
    model = request.getfixturevalue(which)
    if which == "llava":
        ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10], n_images=2, seed=43)
        kw, token = dict(input_ids=ids, pixel_values=px), IMG
    elif which == "qwen2":
        kw, _ = qwen_inputs(grid=(1, 8, 12), seed=43)  # a 4 x 6 merged grid
        token = Q_IMG
    else:
        ids = torch.tensor([[1, 5] + [IMG] * 14 + [7, 8, 9]])
        kw = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 3, 28, 28, generator=torch.Generator().manual_seed(43)),
                  image_sizes=torch.tensor([[50, 100]]))
        token = IMG
    ids = kw["input_ids"]
    L, budget = ids.shape[1], 5
    pos = _image_positions(ids, token)
    with apply_pruning(model, "d2pruner", budget=budget, alpha=0.5, threshold=0.7) as h, torch.no_grad():
        seen, hooks = _layer_inputs(model, [1])
        try:
            cache = model(**kw, use_cache=True).past_key_values
        finally:
            for hk in hooks:
                hk.remove()
        records = h.kept[0]
        importance = h.attention[1].mean(dim=1)
    n_images = len(records)
    n = records[0].num_tokens
    after = L - n_images * (n - budget)
    assert [cache.get_seq_length(i) for i in range(4)] == [L, L, after, after]
    kept_image_tokens = h.keep_index[0][ids[0, h.keep_index[0]] == token]
    assert torch.equal(kept_image_tokens, torch.cat([r.start + r.indices for r in records]))
    for j, r in enumerate(records):
        idx = pos[j * n:(j + 1) * n]
        grid = _layout.ImageLayout(r.grid, r.tiles).op_grid()
        keep, role = mob_kernels.d2pruner(seen[2][:, idx], importance[:, idx], budget, grid=grid, alpha=0.5,
                                          threshold=0.7)
        assert torch.equal(r.indices, keep[0])
        assert r.roles == tuple(ROLES["d2pruner"][int(x)] for x in role[0])
        torch.testing.assert_close(r.importance, importance[0, idx][keep[0]])
    if which == "llava":
        assert records[0].tiles == ((4, 4),) and torch.equal(records[0].grid[:, 1:], torch.stack(
            [torch.arange(16) // 4, torch.arange(16) % 4], -1))
    elif which == "qwen2":
        assert records[0].tiles == ((4, 6),) and records[0].grid[:, 2].max() == 5
    else:
        # LLaVA-NeXT: the 2 x 2 base image (tile 0), two 2 x 2 crops side by side, a newline token after each row of
        # crops; the newline tokens are candidates without a cell.
        assert records[0].tiles == ((2, 2),) * 3
        assert records[0].grid.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1],
                                            [2, 0, 0], [2, 0, 1], [-1, -1, -1], [1, 1, 0], [1, 1, 1], [2, 1, 0],
                                            [2, 1, 1], [-1, -1, -1]]


def _btp_case(which, seed):
    if which in ("llava", "llava_next"):
        if which == "llava":
            ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10, 11], n_images=2, seed=seed)
            return dict(input_ids=ids, pixel_values=px), IMG
        ids = torch.tensor([[1, 5] + [IMG] * 14 + [7, 8, 9]])
        g = torch.Generator().manual_seed(seed)
        return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 3, 28, 28, generator=g),
                    image_sizes=torch.tensor([[50, 100]])), IMG
    return qwen_inputs(seed=seed)[0], Q_IMG


@pytest.mark.parametrize("which", ["llava", "qwen2", "llava_next", "qwen25"])
def test_btp_stages_cache_lengths_records_and_the_ops_picks(request, which):
    """Three BTP stages in one forward: each layer's KV cache holds the text plus that stage's count per image, and each
    stage keeps mob_kernels.btp_stage's picks on the current image tokens' hidden states and the last-token attention
    at the layer before (pre-softmax logits on LLaVA, probabilities on Qwen, heads averaged), mapped back to the
    original tokens."""
    from mob_kernels.integrations.layout import spatial_seed_in_first_tile

    model = request.getfixturevalue(which)
    kw, token = _btp_case(which, seed=47)
    ids = kw["input_ids"]
    L = ids.shape[1]
    with apply_pruning(model, "btp", schedule=TINY_BTP) as h, torch.no_grad():
        seen, hooks = _layer_inputs(model, [0, 1])
        try:
            cache = model(**kw, use_cache=True).past_key_values
        finally:
            for hk in hooks:
                hk.remove()
        assert h.attention_scores == ("softmax" if which.startswith("qwen") else "logits")
        scores = h.attention if which.startswith("qwen") else h.attention_logits
        records, stages = h.kept[0], h.stage_index
    n = records[0].num_tokens
    n_text = L - len(records) * n
    assert [cache.get_seq_length(i) for i in range(4)] == [L] + [n_text + len(records) * c for c in (8, 4, 0)]
    assert [layer for layer, _ in stages] == [1, 2, 3]
    for j, r in enumerate(records):
        assert [(s.layer, s.num_in, s.k, len(s.indices)) for s in r.stages] == [(1, n, 8, 8), (2, 8, 4, 4),
                                                                                 (3, 4, 0, 0)]
        assert torch.equal(r.indices, r.stages[0].indices) and r.roles == r.stages[0].roles
        current = torch.arange(L)  # positions of the tokens entering the stage's layer
        for s, (layer, keep) in enumerate(stages[:2]):
            local = r.stages[s - 1].indices if s else torch.arange(n)  # the image's tokens entering the stage
            at = torch.searchsorted(current, r.start + local)
            stage = TINY_BTP[s]
            extra = dict(n_div=3, n_attn=3, n_extra=10, rebalance=8,
                         seed=spatial_seed_in_first_tile(_layout.ImageLayout(r.grid, r.tiles) if r.grid is not None
                                                         else None, n, 4)) if s == 0 else dict(n_attn=int(0.4 * 4))
            picks = mob_kernels.btp_stage(seen[layer][:, at], scores[layer - 1][:, :, at], stage["keep"] if s == 0
                                          else 4, mode=stage["mode"], **extra)
            assert torch.equal(r.stages[s].indices, local[picks[0]]), f"image {j} stage {s}"
            current = keep[0]
        roles = r.stages[0].roles
        assert set(roles) <= {"attention", "spatial", "diversity"} and "attention" in roles
        assert r.stages[1].roles.count("attention") == int(0.4 * 4)
    kept_images = [stages[s][1][0][ids[0, stages[s][1][0]] == token] for s in range(3)]
    assert [len(k) for k in kept_images] == [8 * len(records), 4 * len(records), 0]


def _staged_reference_logits(model, embeds, pos, stages, gen):
    """Last-token logits of the sequence pruned stage by stage (``stages``: (first layer, kept positions of the
    prompt)), without any cache and without the hooks."""
    lm = model.model.language_model
    L = embeds.shape[1]
    x = torch.cat([embeds, lm.embed_tokens(gen)], dim=1) if gen.numel() else embeds
    T = x.shape[1]
    mrope = pos.dim() == 3
    current = torch.arange(T)

    def run(h, layers, p):
        cs = lm.rotary_emb(h, p)
        for blk in layers:
            h = blk(h, attention_mask=None, position_embeddings=cs, position_ids=None if mrope else p)
        return h

    bounds = [layer for layer, _ in stages] + [len(lm.layers)]
    x = run(x, lm.layers[:bounds[0]], pos)
    for s, (layer, keep) in enumerate(stages):
        idx = torch.cat([keep, torch.arange(L, T)])
        x = x[:, torch.searchsorted(current, idx)]
        current = idx
        x = run(x, lm.layers[layer:bounds[s + 1]], pos[..., idx])
    return model.lm_head(lm.norm(x[:, -1]))


@pytest.mark.parametrize("which", ["llava", "qwen2"])
def test_btp_keep_all_is_exact_and_generate_equals_no_cache_loop(request, which):
    model = request.getfixturevalue(which)
    kw, token = _btp_case(which, seed=53)
    ref = logits(model, **kw)
    with apply_pruning(model, "btp", schedule=_keep_all_btp()):
        assert torch.equal(logits(model, **kw), ref)
    L = kw["input_ids"].shape[1]
    embeds, pos = _capture_lm_inputs(model, **kw)
    pos = torch.arange(L).unsqueeze(0) if pos is None else pos
    steps = 5
    with apply_pruning(model, "btp", schedule=TINY_BTP) as h, torch.no_grad():
        out = model.generate(**kw, max_new_tokens=steps, do_sample=False)
        stages = [(layer, keep[0]) for layer, keep in h.stage_index]
    gen = out[:, L:]
    pos = _extend_positions(pos, steps)
    with torch.no_grad():
        for t in range(steps):
            r = _staged_reference_logits(model, embeds, pos[..., : L + t], stages, gen[:, :t])
            assert int(r.argmax(-1)) == int(gen[0, t]), f"step {t}"


def test_btp_released_reproduces_the_released_stages_and_their_cache_lengths(llava):
    """released=True: each stage is btp_stage_as_released on the same tensors; its LLaVA first stage keeps the whole
    union (here up to 3 + 4 + 3 > 6 tokens), and the layers after it cache everything it kept. Batch size 1 only."""
    from mob_kernels.methods.btp import btp_stage_as_released

    ids, px = llava_inputs([1, 5, 6], [7, 8, 9, 10, 11], seed=59)
    plan = [dict(layer=2, keep=6, mode="union", n_div=3, n_attn=3, n_extra=10, rebalance=8, spatial_seed=4),
            dict(layer=4, keep=0)]
    L = ids.shape[1]
    with apply_pruning(llava, "btp", schedule=plan, released=True) as h, torch.no_grad():
        seen, hooks = _layer_inputs(llava, [0])
        try:
            cache = llava(input_ids=ids, pixel_values=px, use_cache=True).past_key_values
        finally:
            for hk in hooks:
                hk.remove()
        rec = h.kept[0][0]
        at = _image_positions(ids, IMG)
        want = btp_stage_as_released(seen[1][0, at], h.attention_logits[0][0][:, at], 6, mode="union", n_div=3,
                                     n_attn=3, n_extra=10, rebalance=8, seed=mob_kernels.methods.spatial_seed(4, 4, 4))
        assert torch.equal(rec.stages[0].indices, want) and len(want) > 6
        n_text = L - N_LLAVA
        assert [cache.get_seq_length(i) for i in range(4)] == [L, n_text + len(want), n_text + len(want), n_text]
        out = llava.generate(input_ids=ids, pixel_values=px, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == L + 3
        with pytest.raises(ValueError, match="batch size 1"):
            llava(input_ids=torch.cat([ids, ids]), pixel_values=torch.cat([px, px]))
    with apply_pruning(llava, "btp", schedule=plan) as h:  # the op keeps exactly k
        logits(llava, input_ids=ids, pixel_values=px)
        assert len(h.kept[0][0].stages[0].indices) == 6


def test_btp_default_plans_resolve_to_the_released_numbers(llava, qwen2):
    from mob_kernels.integrations.schedule import normalise, stage_arguments

    plan = normalise(None, "llava", 32)
    assert [s["index"] for s in plan] == [3, 6, 14, 22]
    first = stage_arguments(plan[0], 576, 576, 576)
    assert first == dict(k=288, mode="union", n_div=86, n_attn=86, n_extra=318, rebalance=288, spatial_seed=144)
    assert stage_arguments(plan[1], 288, 576, 576)["k"] == 144 and stage_arguments(plan[2], 144, 576, 576) == dict(
        k=48, mode="attn_only", n_extra=57, rebalance=48)
    # LLaVA-NeXT (no released plan): the LLaVA counts scaled to the image, the seed to its 24 x 24 base image.
    assert stage_arguments(plan[0], 2304, 2304, 576)["k"] == 1152 and stage_arguments(
        plan[0], 2304, 2304, 576)["spatial_seed"] == 144
    qplan = normalise(None, "qwen2_vl", 28)
    assert [s["index"] for s in qplan] == [3, 6, 15, 22]
    assert stage_arguments(qplan[0], 1024, 1024, 1024) == dict(k=512, mode="attn_seeded", n_attn=61)
    assert stage_arguments(qplan[2], 256, 1024, 1024) == dict(k=128, mode="attn_only", n_extra=153, rebalance=128)
    with pytest.raises(ValueError, match="layer"):
        apply_pruning(llava, "btp")  # the released plan prunes before layer 23 of 32; the test model has 4
    with pytest.raises(ValueError, match="budget and layer"):
        apply_pruning(llava, "btp", schedule=TINY_BTP, budget=8)
    with pytest.raises(ValueError, match="only numbers"):
        apply_pruning(qwen2, "btp", schedule=[dict(layer=2, keep="__import__('os')", mode="attn_only")])


# ------------------------------------------------------------------------------------------ D2Pruner's debiasing


def _photo_inputs(size=56, crops=2):
    """LLaVA inputs from real photos (scikit-learn's two sample images, a few crops of each, resized to the tiny
    model's input and normalised with CLIP's statistics), all with one fixed generic prompt around the image."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    prompt_before, prompt_after = [1, 5], [7, 8, 9, 10]
    for photo in load_sample_images().images:
        h, w = photo.shape[:2]
        for c in range(crops):
            box = (c * w // (2 * crops), 0, c * w // (2 * crops) + w // 2, h)
            img = Image.fromarray(photo).crop(box).resize((size, size), Image.BICUBIC)
            px = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 255
            ids = torch.tensor([prompt_before + [IMG] * N_LLAVA + prompt_after])
            yield dict(input_ids=ids, pixel_values=((px - mean) / std).unsqueeze(0))


def test_calibrated_bias_is_the_mean_attention_map_and_debiases_d2pruner(llava, tmp_path):
    from mob_kernels.integrations import calibrate_attention_bias, load_attention_bias, save_attention_bias

    inputs = list(_photo_inputs())
    bias = calibrate_attention_bias(llava, inputs, layer=2)
    assert bias.shape == (4, 4) and bias.dtype == torch.float32
    # The mean over the photos of the eager model's last-token attention at layer 1 to the image, heads averaged.
    eager = _eager_copy(llava)
    maps = []
    with torch.no_grad():
        for kw in inputs:
            att = eager(**kw, output_attentions=True).attentions[1][0, :, -1]
            maps.append(att.mean(0)[_image_positions(kw["input_ids"], IMG)].view(4, 4))
    torch.testing.assert_close(bias, torch.stack(maps).mean(0), atol=1e-6, rtol=0)
    path = tmp_path / "bias.pt"
    save_attention_bias(path, bias, layer=2)
    assert torch.equal(load_attention_bias(path), bias)
    # Pruning with the saved map divides the importance by it; without, the importance is used as is.
    kw = inputs[1]
    at = _image_positions(kw["input_ids"], IMG)
    with apply_pruning(llava, "d2pruner", budget=5, bias=str(path)) as h:
        seen, hooks = _layer_inputs(llava, [1])
        try:
            logits(llava, **kw)
        finally:
            for hk in hooks:
                hk.remove()
        imp = h.attention[1].mean(1)[:, at]
        debiased = h.kept[0][0].indices
    assert torch.equal(debiased, mob_kernels.d2pruner(seen[2][:, at], imp, 5, bias=bias.flatten())[0][0])
    with apply_pruning(llava, "d2pruner", budget=5) as h:
        logits(llava, **kw)
        assert torch.equal(h.kept[0][0].indices, mob_kernels.d2pruner(seen[2][:, at], imp, 5)[0][0])
    with pytest.raises(ValueError, match="2-D"):
        apply_pruning(llava, "d2pruner", bias=bias.flatten())


def test_bias_map_resampled_per_tile():
    import torch.nn.functional as F

    from mob_kernels.integrations import resample_map

    bias = torch.arange(16, dtype=torch.float32).view(4, 4)
    qwen = _layout.qwen_layout(torch.tensor([2, 8, 12]), 2, 48)  # two temporal tiles of 4 x 6
    want = F.interpolate(bias[None, None], size=(4, 6), mode="bilinear", align_corners=False)[0, 0].flatten()
    assert torch.equal(resample_map(bias, qwen), torch.cat([want, want]))
    assert torch.equal(resample_map(bias, _layout.square_layout(16)), bias.flatten())
    grid = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [-1, -1, -1]])
    small = resample_map(bias, _layout.ImageLayout(grid, ((2, 2),)))
    two = F.interpolate(bias[None, None], size=(2, 2), mode="bilinear", align_corners=False)[0, 0].flatten()
    assert torch.equal(small[:4], two) and small[4] == bias.mean()  # LLaVA-NeXT's newline: the map's mean


# ------------------------------------------------------------------------------------------- MoB's released anchors


def test_released_cover_folds_follow_the_key_norms():
    from mob_kernels.integrations import released_cover

    g = torch.Generator().manual_seed(61)
    vis, prompt = torch.randn(1, 200, 16, generator=g), torch.randn(1, 12, 16, generator=g)
    mask = torch.ones(1, 12, dtype=torch.bool)
    for k_p, fold in ((32, 4), (48, 6), (64, 8)):  # equal norms: the paper's folds
        _, _, rows, folds = released_cover(vis, prompt, mask, torch.ones(1, 12), k_p)
        assert rows.tolist() == [list(range(8))] and folds.tolist() == [[fold] * 8]
    norms = torch.tensor([[1.0, 9, 1, 1, 1, 1, 1, 1, 1, 0, 5, 1]])
    mask[0, 1] = False  # a padding row never anchors, however large its norm
    picks, count, rows, folds = released_cover(vis, prompt, mask, norms, 20)
    assert rows.tolist() == [[10, 0, 2, 3, 4, 5, 6, 7]]
    assert folds.tolist() == [[round(20 * 5 / 12)] + [round(20 / 12)] * 7] == [[8] + [2] * 7]
    # Per-anchor top-f nominees, max-merged, best k_p (loops, float64).
    sim = torch.nn.functional.normalize(prompt[0].double(), dim=-1) @ torch.nn.functional.normalize(
        vis[0].double(), dim=-1).T
    score = {}
    for a, f in zip(rows[0].tolist(), folds[0].tolist()):
        for i in torch.argsort(sim[a], descending=True, stable=True)[:f].tolist():
            score[i] = max(score.get(i, -2.0), float(sim[a, i]))
    best = sorted(score, key=lambda i: (-score[i], i))[:20]
    assert picks[0][: int(count[0])].tolist() == best and int(count[0]) == min(20, len(score))


def test_mob_released_anchors_in_the_model(llava):
    """anchors="released": the 8 prompt rows with the largest L1 norm of layer 2's post-rotary keys anchor the cover
    (each with a fold by its norm share), FPS seeded by the cover fills the budget exactly."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from mob_kernels.integrations import released_cover

    ids, px = llava_inputs([1, 5, 6], list(range(20, 32)), seed=67)
    lm = llava.model.language_model
    seen = {}
    hook = lm.layers[2].register_forward_pre_hook(
        lambda m, a, k: seen.update(h=a[0] if a else k["hidden_states"], pe=k["position_embeddings"]),
        with_kwargs=True)
    try:
        logits_plain = logits(llava, input_ids=ids, pixel_values=px)
    finally:
        hook.remove()
    blk = lm.layers[2]
    with torch.no_grad():
        k = blk.self_attn.k_proj(blk.input_layernorm(seen["h"])).view(1, -1, 2, 16).transpose(1, 2)
        k = apply_rotary_pos_emb(k, k, *seen["pe"])[1]
    prompt_at = torch.arange(ids.shape[1] - 12, ids.shape[1])
    norms = k[0].abs().sum(dim=(0, 2))[prompt_at]  # L1 over the concatenated heads
    budget, k_p = 8, mob_kernels.prompt_budget(8)
    with apply_mob(llava, budget=budget, anchors="released") as h:
        logits(llava, input_ids=ids, pixel_values=px)
        rec = h.kept[0][0]
    top = torch.sort(norms, descending=True, stable=True).indices[:8]
    assert torch.equal(rec.anchors, prompt_at[top])
    feats = lm.norm(seen["h"]).detach()
    vis = feats[:, _image_positions(ids, IMG)]
    cover, count, _, folds = released_cover(vis, feats[:, prompt_at], torch.ones(1, 12, dtype=torch.bool),
                                            norms.unsqueeze(0), k_p)
    assert torch.equal(rec.folds, folds[0])
    more = mob_kernels.farthest_point_sample(vis, budget - int(count[0]), seed=cover)
    assert len(rec.indices) == budget
    assert torch.equal(rec.indices, torch.sort(torch.cat([cover[0][cover[0] >= 0], more[0]])).values)
    assert torch.equal(rec.prompt_indices, torch.sort(cover[0][cover[0] >= 0]).values)
    with apply_mob(llava, budget=N_LLAVA, anchors="released"):  # keeping every token changes nothing
        assert torch.equal(logits(llava, input_ids=ids, pixel_values=px), logits_plain)
    with pytest.raises(ValueError, match="released"):
        apply_mob(llava, anchors="released", mode="input")


# ----------------------------------------------------------------------------------- arguments of the new methods


def test_d2pruner_and_btp_arguments(llava):
    with pytest.raises(ValueError, match="layer must be an int in \\[1, 4\\)"):
        apply_pruning(llava, "d2pruner", layer=0)
    with pytest.raises(ValueError, match="mode='layer', positions='keep'"):
        apply_pruning(llava, "d2pruner", mode="input")
    with pytest.raises(ValueError, match="mode='layer', positions='keep'"):
        apply_pruning(llava, "btp", schedule=TINY_BTP, positions="compact")
    with pytest.raises(ValueError, match="D2Pruner's"):
        apply_pruning(llava, "mob", alpha=0.5)
    with pytest.raises(ValueError, match="BTP's"):
        apply_pruning(llava, "d2pruner", schedule=TINY_BTP)
    with pytest.raises(ValueError, match="pivot_ratio"):
        apply_pruning(llava, "d2pruner", pivot_ratio=1.5)
    with pytest.raises(ValueError, match="increasing"):
        apply_pruning(llava, "btp", schedule=[dict(layer=3, keep=8, mode="attn_only"), dict(layer=3, keep=0)])
    with pytest.raises(ValueError, match="mode"):
        apply_pruning(llava, "btp", schedule=[dict(layer=2, keep=8)])
    with apply_pruning(llava, "btp", schedule=TINY_BTP) as h:
        assert (h.mode, h.positions, h.layer) == ("layer", "keep", 1)
    assert not llava.model._forward_pre_hooks
    assert all(not blk._forward_pre_hooks and not blk.self_attn.k_proj._forward_hooks
               for blk in llava.model.language_model.layers)


def test_draw_d2pruner_roles_and_each_btp_stage(llava, qwen2):
    ids, px = llava_inputs([1, 5], [7, 8, 9, 10], seed=71)
    image = torch.full((112, 112, 3), 200, dtype=torch.uint8)
    cell = 112 // 4

    def outline(out, i):
        r, c = divmod(i, 4)
        return out.getpixel((c * cell, r * cell + cell // 2))

    with apply_pruning(llava, "d2pruner", budget=6) as h:
        logits(llava, input_ids=ids, pixel_values=px)
        rec = h.kept[0][0]
    out = draw_kept_patches(image, rec)
    assert [outline(out, i) for i in rec.indices.tolist()] == [ROLE_COLOURS[role] for role in rec.roles]
    assert rec.roles.count("pivot") == 4 and len({ROLE_COLOURS[r] for r in ROLES["d2pruner"]}) == 4
    with apply_pruning(llava, "btp", schedule=TINY_BTP) as h:
        logits(llava, input_ids=ids, pixel_values=px)
        rec = h.kept[0][0]
    assert len({ROLE_COLOURS[r] for r in ROLES["btp"]}) == 3
    for s in (0, 1):
        st = rec.stages[s]
        out = draw_kept_patches(image, rec, stage=s)
        assert [outline(out, i) for i in st.indices.tolist()] == [ROLE_COLOURS[role] for role in st.roles]
        dropped = sorted(set(range(16)) - set(st.indices.tolist()))
        r, c = divmod(dropped[0], 4)
        assert out.getpixel((c * cell + cell // 2, r * cell + cell // 2)) == (60, 60, 60)  # dimmed to 0.3
    with pytest.raises(ValueError, match="stages"):
        draw_kept_patches(image, rec, stage=3)
    # Qwen: the record's merged grid (4 x 6 here) is the default drawing grid.
    kw, _ = qwen_inputs(grid=(1, 8, 12), seed=73)
    with apply_pruning(qwen2, "d2pruner", budget=5) as h:
        logits(qwen2, **kw)
        rec = h.kept[0][0]
    out = draw_kept_patches(torch.full((80, 120, 3), 200, dtype=torch.uint8), rec)
    i = int(rec.indices[0])
    r, c = divmod(i, 6)
    assert out.getpixel((c * 20, r * 20 + 10)) == ROLE_COLOURS[rec.roles[0]]


def test_prefill_bench_methods_rows_and_generated_report(tmp_path):
    """``prefill_bench --methods`` measures one row per method on a (here tiny) LLaVA-shaped model and writes a report
    whose numbers all come from the rows; BTP's plan is the released one with its layers scaled to the depth."""
    import json

    from mob_kernels.integrations import prefill_bench as pb

    assert [s["layer"] for s in pb.btp_plan(32)] == [4, 7, 15, 23]
    assert [(s["layer"], s["keep"]) for s in pb.btp_plan(4)] == [(2, 288), (3, 144), (4, 48)]
    argv = ["--configs", "64x4", "--dtypes", "float32", "--repeats", "1", "--methods", "mob,d2pruner,btp",
            "--out", str(tmp_path / "p")]
    rows = pb.main(argv)
    assert [r["method"] for r in rows] == ["mob", "d2pruner", "btp"]
    assert rows[2]["layer_tokens"] == [636, 348, 204, 108] and rows[1]["layer_tokens"] == [636, 636, 124, 124]
    md = (tmp_path / "p.md").read_text()
    for r in rows:
        bound = 4 * 636 / sum(r["layer_tokens"])
        assert (f"| {r['method']} | 64 | 4 | float32 | {r['threads']} | {r['unpruned_ms']:.1f} | {r['pruned_ms']:.1f} "
                f"| {r['speedup']:.2f}x | {r['selection_ms']:.2f} | {100 * r['selection_share']:.2f}% | "
                f"{r['cpu_speedup']:.2f}x | {bound:.2f}x |") in md
        assert 0 < r["selection_ms"] < r["pruned_ms"]
    assert '`apply_pruning(model, "d2pruner", budget=64, layer=2, mode="layer")`' in md
    assert "stages before layers 2 / 3 / 4: 288 -> 144 -> 48 image tokens" in md
    assert f"Reproduce: `python -m mob_kernels.integrations.prefill_bench {' '.join(argv)}`" in md
    assert json.loads((tmp_path / "p.json").read_text())["rows"] == json.loads(json.dumps(rows))
    with pytest.raises(SystemExit):
        pb.main(["--methods", "fastv", "--out", str(tmp_path / "q")])
