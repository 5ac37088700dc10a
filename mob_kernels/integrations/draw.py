"""Draw what a pruning method kept: the kept patches of one image over the image itself, as a PIL image (and
optionally a PNG).

A :class:`~mob_kernels.integrations.hf.KeptImage` holds token indices in row-major order over the projector's patch
grid (LLaVA-1.5: 24 x 24 over the 336 x 336 input; Qwen2-VL: ``(h / merge) x (w / merge)``). The picture is the image
resized to the model's input view, dropped patches dimmed, each kept patch outlined in its role's colour: for MoB
prompt-cover picks in one colour and farthest-point-sampling picks in another, so both halves of the budget can be told
apart; DivPrune's first (most isolated) pick, CDPruner's DPP and relevance picks, D2Pruner's pivots, independent set
and fill, and each BTP stage's attention, spatial-seed and diversity picks have theirs (``stage=s`` draws BTP's stage
``s``: what that stage kept of the image).
"""

from __future__ import annotations

import math
import os

import torch

PROMPT_COLOUR = (255, 140, 0)  # orange: chosen by the prompt cover
FPS_COLOUR = (0, 200, 255)  # cyan: chosen by farthest point sampling
ROLE_COLOURS = {
    "prompt": PROMPT_COLOUR,
    "fps": FPS_COLOUR,
    "isolated": (255, 0, 200),  # magenta: DivPrune's first pick
    "diverse": FPS_COLOUR,
    "dpp": (120, 220, 0),  # green: CDPruner's greedy DPP picks
    "relevance": PROMPT_COLOUR,  # CDPruner's completion by relevance
    "pivot": (255, 40, 40),  # red: D2Pruner's pivots (top debiased importance)
    "mis": FPS_COLOUR,  # D2Pruner's independent set (structural diversity)
    "fill": PROMPT_COLOUR,  # D2Pruner's importance fill
    "pad": (128, 128, 128),  # grey: D2Pruner's padding with unusable tokens
    "attention": (255, 40, 40),  # red: BTP's attention picks
    "spatial": (255, 230, 0),  # yellow: BTP's spatial seed
    "diversity": FPS_COLOUR,  # BTP's diversity picks
}


def draw_kept_patches(image, kept, *, grid: tuple[int, int] | None = None, size: int | tuple[int, int] | None = None,
                      dim: float = 0.3, path: str | os.PathLike | None = None, stage: int | None = None):
    """Return (and save to ``path`` as PNG when given) ``image`` with the patches not in ``kept`` dimmed.

    ``image``: a PIL image or an ``[H, W, 3]`` uint8 array / tensor. ``kept``: a ``KeptImage`` (or anything with
    ``indices``, ``from_prompt`` and ``num_tokens``; its ``roles``, when present, pick the ``ROLE_COLOURS``).
    ``grid``: (rows, cols) of the patch grid; default the record's one tile (``kept.tiles``, e.g. Qwen's merged
    ``h x w``), else a square grid of ``num_tokens``. ``size``: the model's input view to resize to first (LLaVA-1.5:
    336); default: no resize. ``dim``: brightness left to dropped patches (0 = black). ``stage``: draw
    ``kept.stages[stage]`` (BTP) instead of ``kept``."""
    from PIL import Image, ImageDraw

    if not isinstance(image, Image.Image):
        image = Image.fromarray(torch.as_tensor(image).to(torch.uint8).cpu().numpy())
    image = image.convert("RGB")
    if size is not None:
        image = image.resize((size, size) if isinstance(size, int) else tuple(size), Image.BICUBIC)
    if stage is not None:
        stages = getattr(kept, "stages", None) or []
        if not -len(stages) <= stage < len(stages):
            raise ValueError(f"stage={stage} but the record has {len(stages)} stages")
        kept = stages[stage]
    n = int(kept.num_tokens)
    tiles = getattr(kept, "tiles", ()) or ()
    if grid is None and len(tiles) == 1:
        grid = tuple(tiles[0])
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens are not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    rows, cols = grid
    if rows * cols != n:
        raise ValueError(f"grid {grid} has {rows * cols} cells but the image has {n} tokens")
    if not 0.0 <= dim <= 1.0:
        raise ValueError(f"dim must be in [0, 1], got {dim}")

    W, H = image.size
    # Cell edges by rounding, so the cells tile the image exactly whatever its size.
    xs = [round(c * W / cols) for c in range(cols + 1)]
    ys = [round(r * H / rows) for r in range(rows + 1)]
    kept_set = {int(i) for i in kept.indices}
    from_prompt = {int(i) for i, p in zip(kept.indices, getattr(kept, "from_prompt", ())) if bool(p)}
    roles = dict(zip((int(i) for i in kept.indices), getattr(kept, "roles", ()) or ()))

    out = image.copy()
    dark = Image.eval(image, lambda v: int(v * dim))
    for cell in range(n):
        if cell not in kept_set:
            r, c = divmod(cell, cols)
            box = (xs[c], ys[r], xs[c + 1], ys[r + 1])
            out.paste(dark.crop(box), box)
    pen = ImageDraw.Draw(out)
    width = max(1, min(W // cols, H // rows) // 12)
    for cell in sorted(kept_set):
        r, c = divmod(cell, cols)
        colour = ROLE_COLOURS[roles[cell]] if cell in roles else PROMPT_COLOUR if cell in from_prompt else FPS_COLOUR
        pen.rectangle((xs[c], ys[r], xs[c + 1] - 1, ys[r + 1] - 1), outline=colour, width=width)
    if path is not None:
        out.save(path, format="PNG")
    return out
