"""D2Pruner's debiasing map: the model's mean attention to each place of an image tile, to divide importance by.

D2Pruner (docs/contract.md §3.4) divides the last prompt token's attention to each image token by the model's *mean*
attention to that place, measured on calibration images with one generic prompt: what remains is the attention the
image's content earns beyond the model's positional habit (LLaVA's language model, for one, favours the last rows of
the image whatever they show).

* :func:`calibrate_attention_bias` runs the model over the images with the prompt and averages the importance map
  (the last prompt token's attention at decoder layer ``layer - 1``, heads averaged: exactly what D2Pruner pruning
  before ``layer`` reads) over every complete tile of every image, each resampled to one reference grid. It returns
  that grid's map, ``[H_ref, W_ref]`` float32: one map per tile, shared by all tiles (LLaVA-NeXT's base image and
  crops, Qwen's temporal slices) and all image sizes.
* :func:`save_attention_bias` / :func:`load_attention_bias`: a ``torch.save`` file of ``{"map": [H, W] float32,
  "grid": [H, W], "layer": int or None}``, loaded with ``weights_only=True``.
* ``apply_pruning(model, "d2pruner", bias=map_or_path)`` resamples the map to each image's tiles (bilinear,
  ``align_corners=False``; ``mob_kernels.integrations.layout.resample_map``). Without a bias the importance is used
  as is.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch
from torch import Tensor

BIAS_FORMAT = 1


def calibrate_attention_bias(
    model,
    images: Iterable[Any],
    prompt: str | None = None,
    *,
    layer: int = 2,
    processor=None,
    size: tuple[int, int] | None = None,
) -> Tensor:
    """The mean importance map ``[H_ref, W_ref]`` (float32, on the CPU) of ``model`` at decoder layer ``layer - 1``.

    ``images``: with a ``processor`` (a transformers processor for ``model``), images it accepts, each run as
    ``processor(images=image, text=prompt, return_tensors="pt")``; ``prompt`` is then the fixed generic prompt,
    formatted with the model's chat template and its image placeholder (e.g. LLaVA-1.5's
    ``"USER: <image>\\nDescribe the image. ASSISTANT:"``). Without a processor, each item is one forward call's
    keyword arguments (``input_ids`` with the image placeholders, ``pixel_values``, ...), already built with the one
    generic prompt; ``prompt`` must be None.

    Each row's every image contributes each of its complete tiles (tiles whose every cell holds a token: all of them
    except LLaVA-NeXT crops cut by unpadding), resampled to ``size`` (default: the first tile's grid) bilinearly with
    ``align_corners=False``; the result is their mean. ``layer``: the D2Pruner pruning layer the map is for (>= 1)."""
    import torch.nn.functional as F

    from .hf import apply_pruning

    if processor is None and prompt is not None:
        raise ValueError("without a processor each item of images is a forward call's inputs (its input_ids hold the "
                         "prompt): pass prompt=None, or pass a processor")
    if processor is not None and not isinstance(prompt, str):
        raise ValueError("with a processor, prompt must be the generic calibration prompt (a str with the image "
                         "placeholder)")
    total: Tensor | None = None
    count = 0
    with apply_pruning(model, "d2pruner", budget=1.0, layer=layer, record=True) as handle, torch.no_grad():
        for item in images:
            inputs = processor(images=item, text=prompt, return_tensors="pt") if processor is not None else dict(item)
            device = next(model.parameters()).device
            inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in inputs.items()}
            inputs["use_cache"] = False
            inputs.setdefault("logits_to_keep", 1)
            model(**inputs)
            for row in handle.kept:
                for rec in row:
                    if rec.grid is None or rec.importance is None or len(rec.indices) != rec.num_tokens:
                        raise ValueError(f"mob_kernels: the layout of an image with {rec.num_tokens} tokens is not "
                                         "known, so its attention cannot be mapped to a grid")
                    imp = torch.zeros(rec.num_tokens)
                    imp[rec.indices] = rec.importance.float()
                    for t, (h, w) in enumerate(rec.tiles):
                        sel = rec.grid[:, 0] == t
                        if int(sel.sum()) != h * w:
                            continue  # a crop cut by unpadding
                        tile = torch.zeros(h, w)
                        tile[rec.grid[sel, 1], rec.grid[sel, 2]] = imp[sel]
                        if size is None:
                            size = (h, w)
                        if (h, w) != tuple(size):
                            tile = F.interpolate(tile[None, None], size=tuple(size), mode="bilinear",
                                                 align_corners=False)[0, 0]
                        total = tile if total is None else total + tile
                        count += 1
    if total is None:
        raise ValueError("calibrate_attention_bias saw no image tile (no images, or none with a known layout)")
    return total / count


def save_attention_bias(path: str | os.PathLike, bias: Tensor, *, layer: int | None = None) -> None:
    """Write ``bias`` ``[H, W]`` (as float32) to ``path`` with ``torch.save``, with its grid and, optionally, the
    D2Pruner layer it was calibrated for."""
    if not isinstance(bias, Tensor) or bias.dim() != 2:
        raise ValueError(f"bias must be a 2-D map [H, W], got {bias!r}")
    m = bias.detach().float().cpu().contiguous()
    torch.save({"format": BIAS_FORMAT, "map": m, "grid": list(m.shape), "layer": layer}, os.fspath(path))


def load_attention_bias(path: str | os.PathLike) -> Tensor:
    """The ``[H, W]`` float32 map saved by :func:`save_attention_bias` (checked against its recorded grid)."""
    data = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or "map" not in data or "grid" not in data:
        raise ValueError(f"{os.fspath(path)!r} is not an attention bias file (save_attention_bias writes one)")
    m = data["map"]
    if not isinstance(m, Tensor) or m.dim() != 2 or list(m.shape) != list(data["grid"]):
        raise ValueError(f"{os.fspath(path)!r}: its map does not match its grid {data['grid']}")
    return m.float()
