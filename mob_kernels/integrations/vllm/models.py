"""The vLLM side of the plugin: the four architectures' classes, each vLLM's own class with the selection added.

Imported by vLLM's model registry (``mob_kernels.integrations.vllm.register`` registers these classes by name), so
it imports vLLM at the top. While the plugin is off for a model (no ``hf_overrides["mob_kernels"]`` and no
``MOB_VLLM_METHOD``), every method here hands straight to vLLM's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFieldElem, MultiModalKwargsItem
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from . import (
    OFFSET_CHANNELS,
    PROMPT_IDS_KEY,
    SUPPORTED_MODEL_TYPES,
    MediaRun,
    MobVllmConfig,
    PluginConfigError,
    config_for,
    decode_offsets,
    encode_offsets,
    grid_offsets,
    item_hash,
    mrope_positions,
    placeholder_ids_of,
    prompt_tail,
    record,
    select_image_tokens,
)

_IMAGE_KWARGS = ("pixel_values", "image_embeds")
_VIDEO_KWARGS = ("pixel_values_videos", "video_embeds")


def _check_model_type(hf_config) -> None:
    model_type = getattr(hf_config, "model_type", None)
    vision = getattr(getattr(hf_config, "vision_config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES or vision == "pixtral":
        raise PluginConfigError(
            f"mob_kernels vLLM plugin supports model_type in {SUPPORTED_MODEL_TYPES} (not Pixtral); got "
            f"model_type={model_type!r} (vision {vision!r}); turn the plugin off for this model "
            "(hf_overrides={'mob_kernels': None})")


# ------------------------------------------------------------------------------------------------------ the processor


def _shrink(content, cfg: MobVllmConfig):
    """An image's placeholder tokens cut to the kept count: ``N`` copies of the image token become ``k``."""
    if isinstance(content, PromptUpdateDetails):
        if content.is_embed is not None:
            raise PluginConfigError("mob_kernels vLLM plugin: images whose placeholders mix embedded and plain "
                                    "tokens are not supported")
        tokens = list(content.full)
    else:
        tokens = list(content)
    if not tokens or len(set(tokens)) != 1:
        raise PluginConfigError("mob_kernels vLLM plugin: expected an image's placeholders to be one repeated token, "
                                f"got {len(tokens)} tokens of {len(set(tokens))} kinds")
    return tokens[: cfg.keep_count(len(tokens))]


class _MobProcessorMixin:
    """Mixed into the model's own multimodal processor: the processor vLLM built is copied into a subclass of its class
    with this first and the settings as class attributes."""

    _mob_cfg: MobVllmConfig
    _mob_placeholders: tuple[int, ...]

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        out = []
        for update in updates:
            if update.modality == "image":
                if not isinstance(update, PromptReplacement):
                    raise PluginConfigError(f"mob_kernels vLLM plugin: unsupported image prompt update {update!r}")
                out.append(dataclasses.replace(update, replacement=self._mob_replacement(update.replacement)))
            else:
                out.append(update)
        return out

    def _mob_replacement(self, original):
        cfg = self._mob_cfg

        def replacement(item_idx: int):
            content = original(item_idx) if callable(original) else original
            return _shrink(content, cfg)

        return replacement

    def _mob_tail(self, prompt: Sequence[int]) -> list[int] | None:
        return prompt_tail(prompt, self._mob_placeholders) if self._mob_cfg.uses_prompt else None

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        tail = self._mob_tail(inputs.prompt)
        return {modality: ([item_hash(h, self._mob_cfg, tail) for h in hs] if modality == "image" else hs)
                for modality, hs in hashes.items()}

    def apply(self, inputs, *args, **kwargs):
        out = super().apply(inputs, *args, **kwargs)
        tail = self._mob_tail(inputs.prompt)
        items = out["mm_kwargs"].get("image") if tail is not None else None
        if items:
            elem = MultiModalFieldElem(data=torch.tensor(tail, dtype=torch.int64), field=MultiModalBatchedField())
            out["mm_kwargs"]["image"] = [
                None if item is None else MultiModalKwargsItem({**item, PROMPT_IDS_KEY: elem}) for item in items
            ]
        return out


_PROCESSOR_CLASSES: dict[tuple, type] = {}


def _mob_processor_class(base: type, cfg: MobVllmConfig, placeholders: tuple[int, ...]) -> type:
    key = (base, cfg, placeholders)
    cls = _PROCESSOR_CLASSES.get(key)
    if cls is None:
        cls = type(f"Mob{base.__name__}", (_MobProcessorMixin, base),
                   {"_mob_cfg": cfg, "_mob_placeholders": placeholders})
        _PROCESSOR_CLASSES[key] = cls
    return cls


def _wrap_processor_factory(make_processor):
    def factory(info, dummy_inputs):
        processor = make_processor(info, dummy_inputs)
        hf_config = info.ctx.model_config.hf_config
        cfg = config_for(hf_config)
        if cfg is None:
            return processor
        _check_model_type(hf_config)
        mob = object.__new__(_mob_processor_class(type(processor), cfg, tuple(placeholder_ids_of(hf_config))))
        mob.__dict__.update(processor.__dict__)
        return mob

    return factory


def _register_processor(model_cls: type, parent: type) -> type:
    factories = parent._processor_factory
    return MULTIMODAL_REGISTRY.register_processor(
        _wrap_processor_factory(factories.processor), info=factories.info, dummy_inputs=factories.dummy_inputs,
    )(model_cls)


# ---------------------------------------------------------------------------------------------------------- the model


class _MobModelMixin:
    """Keeps ``k`` of each image's encoder tokens in ``embed_multimodal``. Mixed in before vLLM's model class."""

    _mob_mrope = False

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf_config = vllm_config.model_config.hf_config
        self._mob_cfg = config_for(hf_config)
        self._mob_pending: tuple[Tensor, Tensor] | None = None
        self._mob_hidden = int(hf_config.get_text_config().hidden_size)
        if self._mob_cfg is not None:
            _check_model_type(hf_config)
            self._mob_check_engine(vllm_config)

    def _mob_check_engine(self, vllm_config) -> None:
        pass

    def _mob_grids(self, kwargs: dict, count: int) -> list[tuple[int, int, int]] | None:
        return None

    def _mob_prompts(self, prompt_ids, count: int, device) -> list[Tensor | None]:
        if not self._mob_cfg.uses_prompt or prompt_ids is None:
            return [None] * count
        rows = list(prompt_ids) if not isinstance(prompt_ids, Tensor) or prompt_ids.dim() == 2 else [prompt_ids]
        if len(rows) != count:
            raise RuntimeError(f"mob_kernels vLLM plugin: {len(rows)} prompts for {count} images")
        embed = self.get_language_model().embed_input_ids
        return [embed(r.to(device=device, dtype=torch.int64).flatten()) for r in rows]

    def embed_multimodal(self, **kwargs):
        prompt_ids = kwargs.pop(PROMPT_IDS_KEY, None)
        out = super().embed_multimodal(**kwargs)
        cfg = self._mob_cfg
        is_image = any(kwargs.get(key) is not None for key in _IMAGE_KWARGS)
        if cfg is None or not is_image or len(out) == 0:
            return out
        if any(kwargs.get(key) is not None for key in _VIDEO_KWARGS):
            raise RuntimeError("mob_kernels vLLM plugin: images and videos in one encoder call")
        items = list(out)
        prompts = self._mob_prompts(prompt_ids, len(items), items[0].device)
        grids = self._mob_grids(kwargs, len(items))
        result = []
        for j, feats in enumerate(items):
            keep = select_image_tokens(cfg, feats, prompts[j])
            kept = feats.index_select(0, keep.to(feats.device))
            if grids is not None:
                offsets = grid_offsets(keep, grids[j])
                kept = torch.cat([kept, encode_offsets(offsets, kept.dtype).to(kept.device)], dim=1)
            record(event="select", model_type=self.config.model_type, method=cfg.method, features=feats, kept=keep,
                   prompt=prompts[j], prompt_ids=None if prompt_ids is None else (
                       prompt_ids[j] if isinstance(prompt_ids, (list, tuple)) or prompt_ids.dim() == 2
                       else prompt_ids),
                   grid=None if grids is None else grids[j])
            result.append(kept)
        return result


class _MobMRopeMixin(_MobModelMixin):
    """Qwen2-VL / Qwen2.5-VL: kept tokens keep their original M-RoPE positions (see the package docstring)."""

    _mob_mrope = True

    def _mob_check_engine(self, vllm_config) -> None:
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise PluginConfigError("mob_kernels vLLM plugin: Qwen with pipeline_parallel_size > 1 is not supported "
                                    "(the kept tokens' positions are set on the first stage only)")
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.is_multimodal_pruning_enabled():
            raise PluginConfigError("mob_kernels vLLM plugin: video_pruning_rate (EVS) and the plugin cannot be "
                                    "combined; turn one off")
        mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
        mixed = getattr(mode, "mixed_mode", None)
        if mixed is not None and mixed().name == "FULL":
            raise PluginConfigError("mob_kernels vLLM plugin: Qwen with full CUDA graphs for mixed (prefill) "
                                    "batches is not supported; use cudagraph_mode FULL_AND_PIECEWISE or PIECEWISE")

    def _mob_grids(self, kwargs: dict, count: int) -> list[tuple[int, int, int]]:
        thw = kwargs.get("image_grid_thw")
        rows = thw.tolist() if isinstance(thw, Tensor) else [list(map(int, r)) for r in thw]
        rows = [r for r in rows] if rows and isinstance(rows[0], list) else [rows]
        merge = int(self.config.vision_config.spatial_merge_size)
        grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in rows]
        if len(grids) != count:
            raise RuntimeError(f"mob_kernels vLLM plugin: {len(grids)} image grids for {count} images")
        return grids

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self._mob_cfg is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        runs = []
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features)):
            runs.append(MediaRun(offset=int(offset), t=int(t), h=int(h), w=int(w), t_factor=float(t_factor),
                                 length=int(feature.mm_position.length)))
        return mrope_positions(len(input_tokens), runs)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        self._mob_pending = None
        if self._mob_cfg is not None and multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            multimodal_embeddings = self._mob_split(multimodal_embeddings, is_multimodal)
        if multimodal_embeddings is None:
            return super().embed_input_ids(input_ids, is_multimodal=is_multimodal)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def _mob_split(self, embeddings, is_multimodal) -> list[Tensor]:
        """Strip the grid-offset channels; remember each multimodal position's offset for ``forward``."""
        from vllm.multimodal.utils import copy_mm_embedding_modality

        d = self._mob_hidden
        cleaned, offsets, pruned = [], [], 0
        for e in embeddings:
            if e.shape[-1] == d + OFFSET_CHANNELS:
                offsets.append(decode_offsets(e[:, d:]))
                cleaned.append(copy_mm_embedding_modality(e, e[:, :d]))
                pruned += e.shape[0]
            else:  # a video (never pruned): its placeholders already hold their grid positions
                offsets.append(torch.zeros(e.shape[0], 3, dtype=torch.int64, device=e.device))
                cleaned.append(e)
        if pruned:
            off = torch.cat([o.to(offsets[0].device) for o in offsets])
            idx = is_multimodal.nonzero().flatten()
            if idx.numel() != off.shape[0]:
                raise RuntimeError(f"mob_kernels vLLM plugin: {off.shape[0]} multimodal embeddings for "
                                   f"{idx.numel()} multimodal positions")
            self._mob_pending = (idx, off)
            record(event="merge", image_tokens=pruned)
        return cleaned

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        pending, self._mob_pending = self._mob_pending, None
        if pending is not None and positions.dim() == 2:
            idx, off = pending
            if int(idx[-1]) >= positions.shape[1]:
                raise RuntimeError("mob_kernels vLLM plugin: image offsets from an embedding call that this forward "
                                   "pass does not belong to")
            idx = idx.to(positions.device)
            # In place: the runner's position buffer (its address is what CUDA graphs captured).
            positions[:, idx] += off.t().to(device=positions.device, dtype=positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        if self._mob_cfg is None:
            return config
        # The encoder CUDA graph returns the encoder output without calling embed_multimodal: images stay eager.
        return dataclasses.replace(config, modalities=[m for m in config.modalities if m != "image"])


class MobLlavaForConditionalGeneration(_MobModelMixin, LlavaForConditionalGeneration):
    pass


class MobLlavaNextForConditionalGeneration(_MobModelMixin, LlavaNextForConditionalGeneration):
    pass


class MobQwen2VLForConditionalGeneration(_MobMRopeMixin, Qwen2VLForConditionalGeneration):
    pass


class MobQwen2_5_VLForConditionalGeneration(_MobMRopeMixin, Qwen2_5_VLForConditionalGeneration):
    pass


for _cls, _parent in (
    (MobLlavaForConditionalGeneration, LlavaForConditionalGeneration),
    (MobLlavaNextForConditionalGeneration, LlavaNextForConditionalGeneration),
    (MobQwen2VLForConditionalGeneration, Qwen2VLForConditionalGeneration),
    (MobQwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration),
):
    _register_processor(_cls, _parent)
