"""The vLLM plugin (mob_kernels.integrations.vllm): input-mode image-token selection inside vLLM.

Two parts. The first needs no vLLM (it runs in the main test venv): settings, the budget rules against the
transformers integration's, the grid-offset channels, the prompt tail and hashes, and the M-RoPE layout against
transformers' own Qwen2-VL positions. The second starts vLLM offline on the CPU (scripts/test_vllm.sh builds the venv
for it) on tiny random LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL checkpoints written to a temporary folder, and
compares greedy generation with and without the plugin against the transformers integration's input mode on the same
weights. It is skipped when vLLM is not importable.
"""

from __future__ import annotations

import gc
import importlib.util
import os

import pytest
import torch

import mob_kernels
from mob_kernels.integrations import vllm as mv

HAS_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vllm is not installed (scripts/test_vllm.sh makes a venv with it)"
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason=NO_VLLM)


# ===================================================================================================== no vLLM needed


def test_config_from_mapping_and_env():
    cfg = mv.config_from_mapping({"method": "mob", "budget": 64, "prompt_budget": 0.5, "fold": 2})
    assert cfg == mv.MobVllmConfig("mob", 64, 0.5, 2)
    assert mv.config_from_env({}) is None
    env = {"MOB_VLLM_METHOD": "DivPrune", "MOB_VLLM_BUDGET": "0.25", "MOB_VLLM_BACKEND": "reference"}
    assert mv.config_from_env(env) == mv.MobVllmConfig("divprune", 0.25, backend="reference")

    class Cfg:
        pass

    hf = Cfg()
    assert mv.config_for(hf, env) == mv.config_from_env(env)  # no override: the environment
    hf.mob_kernels = None
    assert mv.config_for(hf, env) is None  # hf_overrides={"mob_kernels": None}: off whatever the environment
    hf.mob_kernels = {"method": "fps", "budget": 8}
    assert mv.config_for(hf, env) == mv.MobVllmConfig("fps", 8)  # hf_overrides wins


@pytest.mark.parametrize("bad", [
    {"method": "topk", "budget": 8},
    {"method": "fps", "budget": 0},
    {"method": "fps", "budget": 1.5},
    {"method": "fps", "budget": True},
    {"method": "mob", "budget": 8, "prompt_budget": -1},
    {"method": "mob", "budget": 8, "fold": -2},
    {"method": "fps"},
    {"method": "fps", "budget": 8, "budgte": 8},
])
def test_bad_settings_raise(bad):
    with pytest.raises(mv.PluginConfigError):
        mv.config_from_mapping(bad)


def test_bad_environment_raises():
    with pytest.raises(mv.PluginConfigError, match="MOB_VLLM_METHOD"):
        mv.config_from_env({"MOB_VLLM_BUDGET": "8"})
    with pytest.raises(mv.PluginConfigError, match="MOB_VLLM_BUDGET"):
        mv.config_from_env({"MOB_VLLM_METHOD": "fps"})
    with pytest.raises(mv.PluginConfigError, match="number"):
        mv.config_from_env({"MOB_VLLM_METHOD": "fps", "MOB_VLLM_BUDGET": "lots"})


def test_budget_rules_are_the_transformers_integrations():
    hf = pytest.importorskip("mob_kernels.integrations.hf")
    for budget in (1, 5, 16, 64, 1000, 0.1, 0.25, 0.5, 1.0):
        for n in (1, 7, 16, 576, 2880):
            assert mv.resolve_budget(budget, n) == hf._resolve_budget(budget, n), (budget, n)
    for pb in (None, 0, 3, 100, 0.0, 0.3, 1.0):
        for k in (1, 16, 64, 100, 320):
            assert mv.resolve_prompt_budget(pb, k) == hf._resolve_prompt_budget(pb, k), (pb, k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grid_offsets_survive_any_float_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 1 << 16, (500, 3), generator=g)
    offsets[:3] = torch.tensor([[0, 0, 0], [65535, 255, 256], [1, 2, 3]])
    assert torch.equal(mv.decode_offsets(mv.encode_offsets(offsets, dtype)), offsets)
    with pytest.raises(ValueError):
        mv.encode_offsets(torch.tensor([[1 << 16, 0, 0]]), dtype)


def test_grid_offsets_are_row_major():
    idx = torch.arange(2 * 3 * 4)
    off = mv.grid_offsets(idx, (2, 3, 4))
    assert torch.equal(off, torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), torch.arange(4),
                                                       indexing="ij"), dim=-1).reshape(-1, 3))


def test_prompt_tail_and_hashes():
    assert mv.prompt_tail([1, 2, 9, 9, 3, 9, 4, 5], [9]) == [4, 5]
    assert mv.prompt_tail([1, 2, 8, 3], [9, 8]) == [3]
    assert mv.prompt_tail([1, 2], [9]) == [1, 2]
    assert mv.prompt_tail([1, 9], [9]) == []
    fps, mob = mv.MobVllmConfig("fps", 8), mv.MobVllmConfig("mob", 8)
    assert mv.item_hash("abc", fps, None) == mv.item_hash("abc", fps, None)
    assert len({mv.item_hash("abc", fps, None), mv.item_hash("abd", fps, None), mv.item_hash("abc", mob, [1]),
                mv.item_hash("abc", mob, [2]), mv.item_hash("abc", mv.MobVllmConfig("fps", 9), None)}) == 5


def test_select_image_tokens_calls_the_ops():
    g = torch.Generator().manual_seed(0)
    feats, prompt = torch.randn(64, 32, generator=g), torch.randn(5, 32, generator=g)
    got = mv.select_image_tokens(mv.MobVllmConfig("fps", 16), feats)
    assert torch.equal(got, torch.sort(mob_kernels.farthest_point_sample(feats, 16)).values)
    got = mv.select_image_tokens(mv.MobVllmConfig("divprune", 0.25), feats)
    assert torch.equal(got, mob_kernels.divprune(feats, 16))
    got = mv.select_image_tokens(mv.MobVllmConfig("mob", 16, prompt_budget=6, fold=2), feats, prompt)
    assert torch.equal(got, mob_kernels.select(feats, prompt, 6, 16, fold=2))
    # MoB with no text after the image: the prompt cover has nothing to cover, FPS picks all k.
    got = mv.select_image_tokens(mv.MobVllmConfig("mob", 16), feats, prompt[:0])
    assert torch.equal(got, torch.sort(mob_kernels.farthest_point_sample(feats, 16)).values)


def _vllm_rule(num_tokens, runs):
    """vLLM 0.32's Qwen2-VL get_mrope_input_positions (every run unpruned), restated."""
    parts, st = [], 0
    for r in runs:
        text_len = r.offset - st
        st_idx = int(parts[-1].max()) + 1 if parts else 0
        parts.append(torch.arange(text_len).expand(3, text_len) + st_idx)
        t, h, w = torch.meshgrid(torch.arange(r.t), torch.arange(r.h), torch.arange(r.w), indexing="ij")
        if r.t_factor != 1.0:
            t = (t * r.t_factor).long()
        parts.append(torch.stack([t.flatten(), h.flatten(), w.flatten()]) + text_len + st_idx)
        st = r.offset + r.t * r.h * r.w
    st_idx = int(parts[-1].max()) + 1 if parts else 0
    parts.append(torch.arange(num_tokens - st).expand(3, num_tokens - st) + st_idx)
    pos = torch.cat(parts, dim=1)
    return pos, int(pos.max()) + 1 - num_tokens


def test_mrope_positions_unpruned_are_vllms():
    runs = [mv.MediaRun(3, 1, 4, 6), mv.MediaRun(30, 2, 3, 2, t_factor=2.0), mv.MediaRun(45, 1, 5, 3)]
    for n in (60, 45 + 15):
        got, delta = mv.mrope_positions(n, runs)
        want, want_delta = _vllm_rule(n, runs)
        assert torch.equal(got, want) and delta == want_delta


def test_mrope_keep_positions_are_transformers_positions_of_the_kept_tokens():
    """The pruned layout plus the kept tokens' grid offsets gives exactly transformers' Qwen2-VL positions of the
    unpruned prompt at the kept tokens (what apply_mob's positions="keep" feeds the decoder), and the same decode
    delta measured from the pruned prompt."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, spatial_merge_size=2),
        image_token_id=50, video_token_id=51, vision_start_token_id=52, vision_end_token_id=53)
    model = transformers.Qwen2VLModel(cfg)
    grids = [(1, 8, 12), (1, 10, 6)]  # patches; merged 4 x 6 and 5 x 3
    ids, runs_full = [1, 2, 52], []
    for j, (t, h, w) in enumerate(grids):
        n = t * h * w // 4
        runs_full.append((len(ids), n, (t, h // 2, w // 2)))
        ids += [50] * n + [53] + ([7, 8, 52] if j + 1 < len(grids) else [9, 10, 11, 12])
    input_ids = torch.tensor([ids])
    pos_hf, delta_hf = model.get_rope_index(input_ids, image_grid_thw=torch.tensor(grids),
                                            mm_token_type_ids=(input_ids == 50).int())
    pos_hf = pos_hf[:, 0]

    g = torch.Generator().manual_seed(0)
    keep_all, runs, kept_runs, shift = torch.ones(len(ids), dtype=torch.bool), [], [], 0
    for start, n, grid in runs_full:
        kept = torch.sort(torch.randperm(n, generator=g)[: n // 3]).values
        keep_all[start:start + n] = False
        keep_all[start + kept] = True
        runs.append(mv.MediaRun(start - shift, *grid, length=len(kept)))
        kept_runs.append((start - shift, kept, grid))
        shift += n - len(kept)
    pos, delta = mv.mrope_positions(int(keep_all.sum()), runs)
    for offset, kept, grid in kept_runs:  # what forward() adds from the embeddings' offset channels
        pos[:, offset:offset + len(kept)] += mv.grid_offsets(kept, grid).t()
    assert torch.equal(pos, pos_hf[:, keep_all])
    # decode: transformers continues at (unpruned length + t + its delta); vLLM at (pruned length + t + delta)
    assert len(ids) + int(delta_hf) == int(keep_all.sum()) + delta


# ======================================================================================================== with vLLM

VOCAB = 256
IMAGE_SIZE = {"llava": (112, 112), "llava_next": (112, 84), "qwen2_vl": (224, 168), "qwen2_5_vl": (224, 168)}
SECOND_SIZE = {"llava": (112, 112), "llava_next": (84, 112), "qwen2_vl": (168, 224), "qwen2_5_vl": (168, 224)}
BUDGET = {"llava": 16, "llava_next": 24, "qwen2_vl": 12, "qwen2_5_vl": 12}


def _tokenizer(specials, extra):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(specials)}
    while len(vocab) < VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **extra)


def _hub_layout(path):
    """transformers 5 saves LLaVA's CLIP tower as ``vision_tower.*``; vLLM (like the hub checkpoints) expects
    ``vision_tower.vision_model.*``. transformers loads either."""
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    out = {}
    for key, value in sd.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        out[key] = value.contiguous()
    save_file(out, f, metadata={"format": "pt"})


def build_checkpoint(model_type: str, path: str):
    """A tiny random model of ``model_type`` with its tokenizer and processor, saved to ``path``. Returns the
    placeholder string a prompt uses for one image."""
    import transformers as tf

    # A large initializer range makes attention sharp, so that positions (which tokens sit where) change the output.
    text = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.15)
    clip = dict(patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if model_type in ("llava", "llava_next"):
        tok = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                         dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                              extra_special_tokens={"image_token": "<image>"}))
        text.update(bos_token_id=1, eos_token_id=2, pad_token_id=3)
        torch.manual_seed(0 if model_type == "llava" else 1)
        if model_type == "llava":
            cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(image_size=112, **clip),
                                 text_config=tf.LlamaConfig(**text), image_token_index=4, image_seq_length=64,
                                 vision_feature_layer=-1, vision_feature_select_strategy="default",
                                 projector_hidden_act="gelu")
            model = tf.LlavaForConditionalGeneration(cfg)
            ip = tf.CLIPImageProcessor(size={"shortest_edge": 112}, crop_size={"height": 112, "width": 112})
            proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
        else:
            pinpoints = [[56, 112], [112, 56], [112, 112]]
            cfg = tf.LlavaNextConfig(vision_config=tf.CLIPVisionConfig(image_size=56, **clip),
                                     text_config=tf.LlamaConfig(**text), image_token_index=4,
                                     image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                     vision_feature_select_strategy="default", projector_hidden_act="gelu")
            model = tf.LlavaNextForConditionalGeneration(cfg)
            ip = tf.LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                            image_grid_pinpoints=pinpoints)
            proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                         vision_feature_select_strategy="default", num_additional_image_tokens=1)
        model.save_pretrained(path)
        _hub_layout(path)
        proc.save_pretrained(path)
        return "<image>"
    tok = _tokenizer(["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>"],
                     dict(eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                "vision_bos_token": "<|vision_start|>",
                                                "vision_eos_token": "<|vision_end|>"}))
    text.update(bos_token_id=None, eos_token_id=3, pad_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [16, 8, 8]})
    ids = dict(image_token_id=6, video_token_id=7, vision_start_token_id=4, vision_end_token_id=5)
    if model_type == "qwen2_vl":
        torch.manual_seed(2)
        vis = dict(depth=2, embed_dim=64, num_heads=4, hidden_size=128, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2)
        model = tf.Qwen2VLForConditionalGeneration(tf.Qwen2VLConfig(text_config=text, vision_config=vis, **ids))
        proc_cls = tf.Qwen2VLProcessor
    else:
        torch.manual_seed(3)
        vis = dict(depth=2, hidden_size=64, out_hidden_size=128, intermediate_size=128, num_heads=4, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)
        model = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vis, **ids))
        proc_cls = tf.Qwen2_5_VLProcessor
    model.save_pretrained(path)
    pixels = dict(min_pixels=56 * 56, max_pixels=224 * 224, patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = proc_cls(image_processor=tf.Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                    video_processor=tf.Qwen2VLVideoProcessor(**pixels))
    proc.save_pretrained(path)
    return "<|vision_start|><|image_pad|><|vision_end|>"


def photos():
    from PIL import Image
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]


def requests_for(model_type: str, placeholder: str):
    """Three requests run together: two single-image prompts (different photos, sizes and texts) and a two-image
    prompt (MoB's prompt is the text after the last image)."""
    china, flower = photos()
    a, b = china.resize(IMAGE_SIZE[model_type]), flower.resize(SECOND_SIZE[model_type])
    sep = "" if placeholder.startswith("<|") else " "
    return [
        (f"w10 w11{sep}{placeholder}{sep}w20 w21 w22 w23", [a]),
        (f"w12{sep}{placeholder}{sep}w30 w31 w32 w33 w34 w35", [b]),
        (f"w13 w14{sep}{placeholder}{sep}w40{sep}{placeholder}{sep}w41 w42", [b, a]),
    ]


# ------------------------------------------------------------------------------------------------- running both sides

MAX_TOKENS = 8
LOGPROB_TOL = 2e-3


def run_vllm(path: str, method: str | None, model_type: str, reqs, **llm_kw):
    """Greedy generation in vLLM (in this process, on the CPU) with the plugin set through hf_overrides (None: off).
    Returns the outputs and the selections the plugin recorded."""
    from vllm import LLM, SamplingParams

    mv.RECORDS.clear()
    overrides = {"mob_kernels": None if method is None else {"method": method, "budget": BUDGET[model_type]}}
    kw = dict(dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=4, seed=0,
              hf_overrides=overrides, limit_mm_per_prompt={"image": 2})
    kw.update(llm_kw)
    llm = LLM(path, **kw)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
        outs = llm.generate([{"prompt": p, "multi_modal_data": {"image": imgs if len(imgs) > 1 else imgs[0]}}
                             for p, imgs in reqs], params, use_tqdm=False)
        return outs, list(mv.RECORDS)
    finally:
        _shutdown(llm)


def _shutdown(llm) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


class HFRun:
    """The transformers integration's input mode on the same checkpoint, one request at a time."""

    def __init__(self, path: str):
        import transformers as tf

        self.proc = tf.AutoProcessor.from_pretrained(path)
        self.model = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # vLLM runs with ignore_eos: no stop, no masking
        self.mrope = self.model.config.model_type in ("qwen2_vl", "qwen2_5_vl")
        cfg = self.model.config
        self.image_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index

    def generate(self, prompt, images, method: str | None, budget: int, monkeypatch=None):
        from mob_kernels import integrations

        inputs = self.proc(text=prompt, images=images, return_tensors="pt")
        captured = {}

        def grab(module, args, kwargs):
            if "embeds" not in captured and kwargs.get("inputs_embeds") is not None:
                captured["embeds"] = kwargs["inputs_embeds"].detach().clone()

        hook = self.model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        handle = None
        positions = "keep" if self.mrope else "compact"
        if method == "divprune" and hasattr(integrations, "apply_pruning"):
            handle = integrations.apply_pruning(self.model, "divprune", budget=budget, mode="input", layer=0,
                                                positions=positions)
        elif method is not None:
            if method == "divprune":  # an integration without DivPrune: the hooks keep what mob_kernels.divprune keeps
                monkeypatch.setattr(mob_kernels, "select",
                                    lambda vis, prompt, k_p, k, **kw: mob_kernels.divprune(vis, k))
            handle = integrations.apply_mob(self.model, budget=budget, mode="input", layer=0,
                                            prompt_budget=0 if method == "fps" else None, positions=positions)
        try:
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                          return_dict_in_generate=True)
        finally:
            hook.remove()
            if handle is not None:
                handle.remove()
            if monkeypatch is not None:
                monkeypatch.undo()
        ids = inputs["input_ids"][0]
        is_img = ids == self.image_id
        zero = torch.zeros(1, dtype=torch.int)
        edges = torch.diff(is_img.int(), prepend=zero, append=zero)
        starts, ends = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
        feats = [captured["embeds"][0, s:e] for s, e in zip(starts, ends)]
        tokens = out.sequences[0, ids.shape[0]:].tolist()
        logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
        kept = [r.indices for r in handle.kept[0]] if handle is not None else None
        return dict(ids=ids.tolist(), runs=list(zip(starts, ends)), feats=feats, tokens=tokens, logprobs=logprobs,
                    kept=kept)


def _recompute(method: str, feats, prompt, k):
    if method == "fps":
        return torch.sort(mob_kernels.farthest_point_sample(feats, k)).values
    if method == "divprune":
        return mob_kernels.divprune(feats, k)
    return mob_kernels.select(feats, prompt, mob_kernels.prompt_budget(k), k)


def _match_record(records, feats, tail=None):
    """The selection vLLM made on this image's encoder output (for MoB, for this text after the last image)."""
    hits = [r for r in records if r["event"] == "select" and r["features"].shape == feats.shape
            and torch.allclose(r["features"].float(), feats.float(), atol=1e-4, rtol=1e-4)
            and (tail is None or r["prompt_ids"].tolist() == tail)]
    assert len(hits) >= 1, "no vLLM selection was made on this image's encoder output"
    return hits[0]


@pytest.fixture(scope="module")
def vllm_env():
    if not HAS_VLLM:
        pytest.skip(NO_VLLM)
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its selections are visible here
    mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    mp.setenv(mv.ENV_RECORD, "1")
    for var in mv.ENV_VARS.values():
        mp.delenv(var, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module", params=["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"])
def checkpoint(request, tmp_path_factory, vllm_env):
    model_type = request.param
    path = str(tmp_path_factory.mktemp(model_type))
    placeholder = build_checkpoint(model_type, path)
    return model_type, path, placeholder, HFRun(path)


METHODS_PER_MODEL = {
    "llava": ("fps", "divprune", "mob"),
    "llava_next": ("fps", "mob"),
    "qwen2_vl": ("fps", "divprune", "mob"),
    "qwen2_5_vl": ("fps", "mob"),
}


@needs_vllm
def test_vllm_matches_transformers(checkpoint, monkeypatch):
    """Plugin off: vLLM generates what transformers does. Plugin on, for each method: the prefill holds exactly k
    tokens per image (the prompt is transformers' with each image run cut to k); every kept set is what mob_kernels
    chooses on vLLM's encoder output of that image (and, for MoB, on the embedded text after the request's last
    image); vLLM's encoder output is transformers'; the kept sets, the greedy tokens and their log-probabilities equal
    the transformers integration's input mode on the same weights (positions="keep" for Qwen's M-RoPE, "compact" for
    LLaVA's 1-D positions)."""
    model_type, path, placeholder, hf = checkpoint
    reqs = requests_for(model_type, placeholder)
    k = BUDGET[model_type]
    embed = hf.model.get_input_embeddings()

    outs, records = run_vllm(path, None, model_type, reqs)
    assert records == []
    for (prompt, imgs), out in zip(reqs, outs):
        ref = hf.generate(prompt, imgs, None, k)
        assert out.prompt_token_ids == ref["ids"]
        assert list(out.outputs[0].token_ids) == ref["tokens"]

    for method in METHODS_PER_MODEL[model_type]:
        outs, records = run_vllm(path, method, model_type, reqs)
        # one selection per distinct image (FPS, DivPrune: the encoder cache serves a repeated image) or per
        # distinct (image, text after the last image) (MoB)
        assert 0 < len([r for r in records if r["event"] == "select"]) <= sum(len(imgs) for _, imgs in reqs)
        for (prompt, imgs), out in zip(reqs, outs):
            ref = hf.generate(prompt, imgs, method, k, monkeypatch=monkeypatch)
            # the prefill: transformers' prompt with every image run cut to k placeholders
            want, last = [], 0
            for s, e in ref["runs"]:
                want += ref["ids"][last:s] + ref["ids"][s:s + min(k, e - s)]
                last = e
            want += ref["ids"][last:]
            assert out.prompt_token_ids == want, method
            tail = ref["ids"][ref["runs"][-1][1]:]
            for j, feats in enumerate(ref["feats"]):
                rec = _match_record(records, feats, tail if method == "mob" else None)
                prompt_feats = None
                if method == "mob":
                    prompt_feats = rec["prompt"]
                    assert torch.allclose(prompt_feats, embed(torch.tensor(tail)).detach(), atol=1e-6)
                assert torch.equal(rec["kept"], _recompute(method, rec["features"], prompt_feats, k)), method
                assert torch.equal(rec["kept"], ref["kept"][j]), (method, j)
            assert list(out.outputs[0].token_ids) == ref["tokens"], method
            got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
            assert max(abs(a - b) for a, b in zip(got, ref["logprobs"])) < LOGPROB_TOL, (method, got, ref["logprobs"])


@needs_vllm
def test_plugin_entry_point_is_registered():
    """The installed package exposes the plugin under vLLM's general-plugins group (pyproject's entry point)."""
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.value.startswith("mob_kernels")]
    assert [ep.value for ep in eps] == ["mob_kernels.integrations.vllm:register"]


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory, vllm_env):
    path = str(tmp_path_factory.mktemp("llava_cache"))
    return path, build_checkpoint("llava", path)


@needs_vllm
@pytest.mark.parametrize("method", ["fps", "mob"])
def test_encoder_and_prefix_caches(llava_checkpoint, method):
    """FPS keys its selection by the image alone: a second request with the same text before the same image reuses
    the image's KV blocks from the prefix cache and runs no new selection, whatever text follows. MoB keys it by the
    image and the text after it: different text after the image re-selects and reuses only the blocks before the image;
    the same text again reuses the image's blocks too. (Block size 32: the 48 text tokens and the 16 image tokens
    fill two blocks.)"""
    from vllm import LLM, SamplingParams

    path, placeholder = llava_checkpoint
    china = photos()[0].resize(IMAGE_SIZE["llava"])
    prefix = " ".join(f"w{i}" for i in range(50, 98))  # 48 tokens: with the 16 image tokens, two blocks of 32
    k = BUDGET["llava"]
    llm = LLM(path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0, block_size=32,
              enable_prefix_caching=True, hf_overrides={"mob_kernels": {"method": method, "budget": k}})
    try:
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

        def run(tail):
            before = len(mv.RECORDS)
            out = llm.generate({"prompt": f"{prefix} {placeholder} {tail}", "multi_modal_data": {"image": china}},
                               params, use_tqdm=False)[0]
            return out.num_cached_tokens, len(mv.RECORDS) - before  # LLaVA records selections only

        mv.RECORDS.clear()
        assert run("w90 w91 w92")[1] == 1
        cached, selections = run("w93 w94")
        if method == "fps":
            assert (cached, selections) == (48 + k, 0)  # both blocks, the one holding the image included
        else:
            assert (cached, selections) == (32, 1)  # the first block only: the image's block hashes differ
        assert run("w90 w91 w92") == (48 + k, 0)
    finally:
        _shutdown(llm)


@needs_vllm
def test_chunked_prefill_keeps_qwen_positions(tmp_path_factory, vllm_env, monkeypatch):
    """Prefill in chunks of 8 tokens, so images (12 kept tokens) are split across steps: the grid offsets travel with
    each token's embedding, and generation still equals transformers' input mode."""
    path = str(tmp_path_factory.mktemp("qwen_chunked"))
    placeholder = build_checkpoint("qwen2_vl", path)
    reqs = requests_for("qwen2_vl", placeholder)
    hf = HFRun(path)
    outs, records = run_vllm(path, "mob", "qwen2_vl", reqs, enable_chunked_prefill=True, max_num_batched_tokens=8,
                             enable_prefix_caching=False)
    merged = [r["image_tokens"] for r in records if r["event"] == "merge"]
    assert merged and max(merged) <= 8 and sum(merged) == 4 * BUDGET["qwen2_vl"]  # images split across steps
    for (prompt, imgs), out in zip(reqs, outs):
        ref = hf.generate(prompt, imgs, "mob", BUDGET["qwen2_vl"], monkeypatch=monkeypatch)
        assert list(out.outputs[0].token_ids) == ref["tokens"]
        got = [lp[t].logprob for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
        assert max(abs(a - b) for a, b in zip(got, ref["logprobs"])) < LOGPROB_TOL


@needs_vllm
def test_environment_settings_in_a_separate_engine_process(llava_checkpoint, tmp_path):
    """vLLM's default: the engine core in its own process. The plugin is loaded there through the entry point and
    reads the MOB_VLLM_* environment; the prompt holds k tokens and generation equals the in-process run's."""
    import subprocess
    import sys

    path, placeholder = llava_checkpoint
    reqs = requests_for("llava", placeholder)[:2]
    script = tmp_path / "serve.py"
    script.write_text(
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "sys.path.insert(0, %r)\n"
        "from test_vllm import requests_for\n"
        "if __name__ == '__main__':\n"
        "    reqs = requests_for('llava', %r)[:2]\n"
        "    llm = LLM(%r, dtype='float32', enforce_eager=True, max_model_len=512, seed=0)\n"
        "    p = SamplingParams(temperature=0.0, max_tokens=%d, ignore_eos=True)\n"
        "    outs = llm.generate([{'prompt': q, 'multi_modal_data': {'image': i[0]}} for q, i in reqs], p,\n"
        "                        use_tqdm=False)\n"
        "    print('RESULT', json.dumps([[o.prompt_token_ids, list(o.outputs[0].token_ids)] for o in outs]))\n"
        % (os.path.dirname(__file__), placeholder, path, MAX_TOKENS))
    env = {key: v for key, v in os.environ.items() if key not in ("VLLM_ENABLE_V1_MULTIPROCESSING", mv.ENV_RECORD)}
    env.update(MOB_VLLM_METHOD="mob", MOB_VLLM_BUDGET=str(BUDGET["llava"]))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    import json

    got = json.loads(lines[0][len("RESULT "):])
    outs, _ = run_vllm(path, "mob", "llava", reqs)
    assert got == [[o.prompt_token_ids, list(o.outputs[0].token_ids)] for o in outs]
    assert all(ids.count(4) == BUDGET["llava"] for ids, _ in got)
