"""Shape presets and the synthetic features the benchmarks run on.

A preset is a list of ``Case``s: one input shape (B, N, d, L) and one budget (k, k_p). Budgets follow SPEC.md §6: without
the coupling prior K = 64 / 128 / 192 takes K_p = 32 / 48 / 64; LLaVA-NeXT uses K = 320 with K_p = K / 2.

No model weights are involved: the features are synthetic but shaped like a vision tower's output (tokens on a square
grid, in clusters of neighbouring patches, with varying norms) and the prompt rows are noisy copies of the tokens of
one image region, so the prompt cover has something real to find and the kept-token map in the demo is readable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

# SPEC.md §6, no coupling prior.
PAPER_BUDGETS = {64: 32, 128: 48, 192: 64}


@dataclass(frozen=True)
class Case:
    preset: str
    B: int
    N: int
    d: int
    L: int
    k: int
    k_p: int

    def label(self) -> str:
        return f"{self.preset} N={self.N} d={self.d} L={self.L} k={self.k} k_p={self.k_p}" + (
            f" B={self.B}" if self.B != 1 else ""
        )

    def as_dict(self) -> dict:
        return asdict(self)


def _budget_cases(preset: str, N: int, d: int, L: int, budgets, B: int = 1) -> list[Case]:
    return [Case(preset, B, N, d, L, k, PAPER_BUDGETS.get(k, k // 2)) for k in budgets if k <= N]


def build_preset(name: str, budgets=(64, 128, 192)) -> list[Case]:
    """The cases of preset ``name``; ``budgets`` (K values) apply to the presets whose budget is not fixed."""
    if name == "llava15":  # LLaVA-1.5: 24 x 24 patches of CLIP ViT-L/336, Vicuna-7B width
        return _budget_cases(name, 576, 4096, 64, budgets)
    if name == "llava_next":  # LLaVA-NeXT any-res: 5 x 576 tokens, K = 320 (SPEC.md §6)
        return [Case(name, 1, 2880, 4096, 64, 320, 160)]
    if name == "qwen2vl":  # Qwen2-VL-7B width, dynamic resolution: N from 1024 to 4096
        # A sweep over N at the smallest budget and over the budgets at N = 2048: the full grid would triple the
        # reference's share of a run (its FPS costs k x N x d) without adding a trend the two sweeps do not show.
        small = min(budgets)
        return [c for N in (1024, 2048, 4096) for c in _budget_cases(name, N, 3584, 64, budgets if N == 2048 else
                                                                      (small,))]
    if name == "video":  # 8 frames x 256 tokens, selected across the whole clip
        return _budget_cases(name, 8 * 256, 4096, 64, budgets)
    if name == "small":  # the foundation issue's small shape: 12 x 12 patches, d = 1024
        return [Case(name, 1, 144, 1024, 16, 16, 8)]
    if name == "demo":  # the main job: one LLaVA-1.5 image, K = 64
        return [Case(name, 1, 576, 4096, 64, 64, 32)]
    if name == "tiny":  # for the CLI's own test: seconds, not minutes
        return [Case(name, 1, 64, 32, 4, 8, 4), Case(name, 2, 100, 48, 6, 12, 6)]
    raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")


PRESETS = ("llava15", "llava_next", "qwen2vl", "video", "small", "demo", "tiny")
DEFAULT_PRESETS = ("llava15", "llava_next", "qwen2vl", "video", "small")


# The region the synthetic prompt talks about (an "object" in the image).
OBJECT_REGION = 5


def grid_side(N: int) -> int:
    """Tokens are laid out row-major on a grid this many tokens wide (24 for LLaVA-1.5's 576)."""
    return max(1, math.isqrt(N))


def token_regions(N: int) -> torch.Tensor:
    """Region id in [0, 16) of every token: the grid cut into 4 x 4 blocks."""
    side = grid_side(N)
    rows = torch.arange(N) // side
    cols = torch.arange(N) % side
    cell = max(1, side // 4)
    return (rows // cell).clamp_max(3) * 4 + (cols // cell).clamp_max(3)


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic ``vis [B, N, d]`` and ``prompt [B, L, d]`` for ``case`` (deterministic in ``seed``).

    Tokens lie on a near-square grid; each belongs to one of ~16 spatial regions (a shared direction per region plus
    per-token noise) and has a norm that varies smoothly, as vision-tower outputs do. Prompt rows are noisy copies of
    tokens from one region, plus some unrelated rows (function words)."""
    g = torch.Generator().manual_seed(seed)
    B, N, d, L = case.B, case.N, case.d, case.L
    region = token_regions(N)
    centres = torch.randn(B, 16, d, generator=g)
    noise = torch.randn(B, N, d, generator=g)
    vis = centres[:, region] + 1.5 * noise
    vis = vis * (1.0 + 0.5 * torch.rand(B, N, 1, generator=g))

    # About three quarters of the prompt rows talk about OBJECT_REGION (an "object" in the image), the rest about nothing.
    L_obj = (3 * L) // 4
    obj = (region == OBJECT_REGION).nonzero().flatten()
    if obj.numel() == 0:
        obj = torch.arange(N)
    pick = obj[torch.randint(obj.numel(), (B, L_obj), generator=g)]
    about = torch.gather(vis, 1, pick.unsqueeze(-1).expand(B, L_obj, d)) + 2.0 * torch.randn(B, L_obj, d, generator=g)
    unrelated = torch.randn(B, L - L_obj, d, generator=g)
    prompt = torch.cat([about, unrelated], dim=1)
    return vis.to(device=device, dtype=dtype), prompt.to(device=device, dtype=dtype)
