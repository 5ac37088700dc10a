"""MoB pruning inside Hugging Face transformers models (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).

    from mob_kernels.integrations import apply_mob, draw_kept_patches
    handle = apply_mob(model, budget=64, layer=2)        # hooks only; handle.remove() undoes it
    out = model.generate(**inputs, max_new_tokens=32)
    draw_kept_patches(image, handle.kept[0][0], size=336, path="kept.png")

Needs ``transformers`` in ``SUPPORTED_TRANSFORMERS`` (checked when ``apply_mob`` runs) and Pillow for the drawing.
"""

from .draw import FPS_COLOUR, PROMPT_COLOUR, draw_kept_patches
from .hf import (
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_TRANSFORMERS,
    KeptImage,
    MobHandle,
    UnsupportedModelError,
    apply_mob,
)

__all__ = [
    "apply_mob",
    "draw_kept_patches",
    "MobHandle",
    "KeptImage",
    "UnsupportedModelError",
    "SUPPORTED_TRANSFORMERS",
    "SUPPORTED_MODEL_TYPES",
    "PROMPT_COLOUR",
    "FPS_COLOUR",
]
