"""Visual-token pruning inside Hugging Face transformers models (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL).

    from mob_kernels.integrations import apply_pruning, draw_kept_patches
    handle = apply_pruning(model, "mob", budget=64, layer=2)   # or "divprune", "cdpruner", "d2pruner", "btp"
    out = model.generate(**inputs, max_new_tokens=32)
    draw_kept_patches(image, handle.kept[0][0], size=336, path="kept.png")
    handle.remove()                                            # the model is exactly as before

``apply_mob(model, ...)`` is ``apply_pruning(model, "mob", ...)``. Needs ``transformers`` in
``SUPPORTED_TRANSFORMERS`` (checked when the hooks are applied) and Pillow for the drawing.
"""

from .draw import FPS_COLOUR, PROMPT_COLOUR, ROLE_COLOURS, draw_kept_patches
from .attention import last_token_attention
from .bias import calibrate_attention_bias, load_attention_bias, save_attention_bias
from .hf import (
    ANCHORS,
    METHODS,
    ROLES,
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_TRANSFORMERS,
    KeptImage,
    KeptStage,
    MobHandle,
    PruningHandle,
    UnsupportedModelError,
    apply_mob,
    apply_pruning,
    released_cover,
)
from .layout import resample_map

__all__ = [
    "apply_pruning",
    "apply_mob",
    "draw_kept_patches",
    "PruningHandle",
    "MobHandle",
    "KeptImage",
    "KeptStage",
    "UnsupportedModelError",
    "METHODS",
    "ANCHORS",
    "ROLES",
    "SUPPORTED_TRANSFORMERS",
    "SUPPORTED_MODEL_TYPES",
    "PROMPT_COLOUR",
    "FPS_COLOUR",
    "ROLE_COLOURS",
    "calibrate_attention_bias",
    "save_attention_bias",
    "load_attention_bias",
    "resample_map",
    "last_token_attention",
    "released_cover",
]
