"""MoB inside transformers models: tiny random models built from configs (nothing downloaded).

The no-cache reference below re-implements "the pruned sequence" independently of the hooks: it runs the language
model's own decoder layers by hand (layers < l on the whole sequence, layers >= l on the kept tokens plus the generated
ones) and compares greedy tokens with the hooked ``generate()`` that runs on the KV cache.
"""

from __future__ import annotations

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
        if method in ("divprune", "cdpruner"):  # input mode: the methods' own ops on the projector output, the prompt after the image
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


def test_left_padded_batch_equals_rows_alone(llava):
    rows = [llava_inputs([1, 5, 6], [7, 8, 9, 10, 11, 12, 13], seed=11), llava_inputs([1], [20, 21, 22], seed=12)]
    width = max(r[0].shape[1] for r in rows)
    pad = 0
    ids = torch.stack([torch.nn.functional.pad(r[0][0], (width - r[0].shape[1], 0), value=pad) for r in rows])
    mask = torch.stack([torch.nn.functional.pad(torch.ones(r[0].shape[1], dtype=torch.long),
                                                (width - r[0].shape[1], 0)) for r in rows])
    px = torch.cat([r[1] for r in rows])
    with apply_mob(llava, budget=6, mode="layer") as h, torch.no_grad():
        batch_out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=5,
                                   do_sample=False)
        batch_keep = h.keep_index.clone()
        batch_logits = llava(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, -1]
        for b, (row_ids, row_px) in enumerate(rows):
            offset = width - row_ids.shape[1]
            alone = llava.generate(input_ids=row_ids, pixel_values=row_px, max_new_tokens=5, do_sample=False)
            assert torch.equal(batch_out[b, width:], alone[0, row_ids.shape[1]:])
            # The row's kept positions are the lone run's, shifted by its padding (padding itself is kept).
            real = batch_keep[b][batch_keep[b] >= offset] - offset
            assert torch.equal(real, h.keep_index[0])
            alone_logits = llava(input_ids=row_ids, pixel_values=row_px).logits[:, -1]
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
