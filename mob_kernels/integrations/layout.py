"""Where each image token sits: the (tile, row, col) grid of one image's run of placeholder tokens, per model.

* LLaVA-1.5: one square tile (24 x 24 for 576 tokens), row-major.
* LLaVA-NeXT: tile 0 is the base image (``image_size / patch_size`` square), tiles ``1 ..`` are the high-resolution
  crops in the model's crop order, each token at its row and column *within its crop* (before unpadding; an unpadded
  crop keeps the tokens that survive, at their places). The layout is obtained by running the model's own
  ``pack_image_features`` on coordinates instead of features, so it is the model's token order whatever the
  transformers version. ``image_newline`` tokens are layout markers, not grid cells: they get tile ``-1`` and row/col
  ``-1`` here (the pruning methods treat them as candidates without spatial neighbours).
* Qwen2-VL / Qwen2.5-VL: the merged grid ``(t, h / merge, w / merge)`` from ``image_grid_thw`` (or
  ``video_grid_thw``) with tile = ``t``.

Every layout's tile 0 holds the image's first ``H_0 * W_0`` tokens, row-major (LLaVA-1.5's image, LLaVA-NeXT's base
image, Qwen's first temporal slice): BTP's spatial seed lives there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys

import torch
from torch import Tensor

NEWLINE_TILE = -1


@dataclasses.dataclass
class ImageLayout:
    """``grid`` ``[N, 3]`` int64 (tile, row, col), ``-1`` rows for layout tokens (LLaVA-NeXT's newline);
    ``tiles[t]`` = (rows, cols) of tile ``t``."""

    grid: Tensor
    tiles: tuple[tuple[int, int], ...]

    def op_grid(self) -> Tensor:
        """The grid for ``mob_kernels.d2pruner``: layout tokens each get a tile of their own (no spatial
        neighbours)."""
        g = self.grid.clone()
        marker = g[:, 0] == NEWLINE_TILE
        g[marker, 0] = len(self.tiles) + torch.arange(int(marker.sum()))
        g[marker, 1:] = 0
        return g


def square_layout(n: int) -> ImageLayout | None:
    side = math.isqrt(n)
    if side * side != n or n == 0:
        return None
    i = torch.arange(n)
    return ImageLayout(torch.stack([torch.zeros_like(i), i // side, i % side], dim=-1), ((side, side),))


def llava_next_layout(base, image_size: Tensor, n: int) -> ImageLayout | None:
    """The layout of one LLaVA-NeXT image of ``image_size`` (H, W) whose run has ``n`` tokens, from the model's own
    packing (``base``: the ``LlavaNextModel``). None when it does not produce ``n`` tokens."""
    cfg = base.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    module = sys.modules[type(base).__module__]
    nph, npw = module.get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    nph, npw = int(nph), int(npw)
    cells = torch.arange(side * side)
    per_tile = [torch.stack([torch.full_like(cells, t), cells // side, cells % side], dim=-1)
                for t in range(1 + nph * npw)]
    fake = torch.stack(per_tile).double()  # [1 + crops, side * side, 3]: coordinates instead of features
    newline = None
    if getattr(base, "image_newline", None) is not None:
        newline = torch.full((3,), float(NEWLINE_TILE), dtype=torch.float64)
    packed, _ = base.pack_image_features([fake], image_size.view(1, 2), cfg.vision_feature_select_strategy, newline)
    grid = packed[0].round().long()
    if grid.shape != (n, 3):
        return None
    return ImageLayout(grid, tuple((side, side) for _ in range(1 + nph * npw)))


def qwen_layout(thw: Tensor, merge: int, n: int) -> ImageLayout | None:
    t, h, w = (int(x) for x in thw)
    hh, ww = h // merge, w // merge
    if t * hh * ww != n:
        return None
    i = torch.arange(n)
    return ImageLayout(torch.stack([i // (hh * ww), (i // ww) % hh, i % ww], dim=-1), tuple((hh, ww) for _ in range(t)))


def spatial_seed_in_first_tile(layout: ImageLayout | None, n: int, m: int) -> Tensor:
    """BTP's spatial seed (``mob_kernels.methods.btp.spatial_seed``) of ``m`` cells on the image's first tile
    (indices into the image's tokens; ``m`` clipped to the tile's cells). Without a layout, a square image."""
    if layout is None:
        layout = square_layout(n)
        if layout is None:
            raise ValueError(f"BTP's spatial seed needs the image's grid; {n} tokens are not a square and the model "
                             "gave no layout")
    rows, cols = layout.tiles[0]
    return _spatial_seed(rows, cols, min(m, rows * cols))


@functools.lru_cache(maxsize=64)
def _spatial_seed(rows: int, cols: int, m: int) -> Tensor:
    # A constant of the grid (a Python loop of m steps over a rows*cols square distance table): computed once.
    from mob_kernels.methods.btp import spatial_seed

    return spatial_seed(rows, cols, m)


def resample_map(bias: Tensor, layout: ImageLayout) -> Tensor:
    """A per-tile 2-D map ``bias`` ``[H, W]`` as one value per token ``[N]`` (float32): resampled to each tile's
    (rows, cols) bilinearly (``align_corners=False``) and read at each token's (row, col). Layout tokens (LLaVA-NeXT's
    newline) get the map's mean."""
    import torch.nn.functional as F

    if bias.dim() != 2:
        raise ValueError(f"an attention bias is a 2-D map [H, W], got shape {tuple(bias.shape)}")
    m = bias.detach().float().cpu()
    grid = layout.grid
    out = torch.full((grid.shape[0],), float(m.mean()))
    by_shape: dict[tuple[int, int], Tensor] = {}
    for t, shape in enumerate(layout.tiles):
        sel = grid[:, 0] == t
        if not bool(sel.any()):
            continue
        if shape not in by_shape:
            by_shape[shape] = m if tuple(m.shape) == shape else F.interpolate(
                m[None, None], size=shape, mode="bilinear", align_corners=False)[0, 0]
        r = by_shape[shape]
        out[sel] = r[grid[sel, 1], grid[sel, 2]]
    return out
