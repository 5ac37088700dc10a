"""Shape presets, ``--shape`` parsing and the synthetic inputs the benchmarks run on.

A preset is a list of ``Case``s: one selection method, one input shape (B, N, d, L) and one budget (k, and for MoB's
``select`` its prompt share k_p). MoB's k_p follows ``mob_kernels.prompt_budget(k)``, the package's one budget rule
(K = 64 / 128 / 192 -> K_p = 32 / 48 / 64; LLaVA-NeXT's K = 320 -> K_p = 106). The one exception is the ``gpu``
preset's LLaVA-NeXT case, which keeps the explicit K_p = 160 of an earlier H100 table so the two stay comparable.

Which presets apply to which method: ``llava15`` (N = 576, d = 4096) and ``llava_next`` (N = 2880, d = 4096) have a
case for every method (DivPrune, CDPruner and D2Pruner at k = 64 and k = 320; BTP's first stage halves the tokens,
k = N / 2, with the released LLaVA plan's shares, see ``btp_stage_args``); ``qwen2vl``, ``video``, ``small`` and
``demo`` are MoB only; ``tiny`` (the CLI's own test) and ``gpu`` cover every method. The other methods take no prompt
share (k_p = 0). CDPruner's relevance and the importance D2Pruner and BTP read (the last prompt token's attention) are
computed from the same synthetic prompt (``make_relevance``, ``make_importance``), once, outside the timings.

No model weights are involved: the features are synthetic but shaped like a vision tower's output (tokens on a square
grid, in clusters of neighbouring patches, with varying norms) and the prompt rows are noisy copies of the tokens of
one image region, so the prompt cover has something real to find and the kept-token map in the demo is readable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

import mob_kernels as mk
from mob_kernels.methods.btp import SCHEDULES, spatial_seed

# The methods the bench knows how to feed, in the order tables and plots list them.
BENCH_METHODS = ("select", "divprune", "cdpruner", "d2pruner", "btp_stage")
# Methods that run at a headline budget (not the --budget sweep), and BTP, whose stage keeps half the tokens.
FIXED_BUDGET = ("divprune", "cdpruner", "d2pruner")


@dataclass(frozen=True)
class Case:
    preset: str
    B: int
    N: int
    d: int
    L: int
    k: int
    k_p: int
    method: str = "select"
    dtypes: tuple[str, ...] | None = None  # pinned dtypes (the gpu preset); None: the run's --dtype list
    note: str = ""  # said in the report (e.g. why a budget departs from the rule)

    def label(self) -> str:
        kp = f" k_p={self.k_p}" if self.method == "select" else ""
        return f"{self.method} {self.preset} N={self.N} d={self.d} L={self.L} k={self.k}{kp}" + (
            f" B={self.B}" if self.B != 1 else ""
        )

    def shape(self) -> str:
        """The case as ``--shape`` takes it."""
        return f"{self.B},{self.N},{self.d},{self.L},{self.k},{self.k_p}"

    def as_dict(self) -> dict:
        d = asdict(self)
        del d["dtypes"], d["note"]
        return d


def _cases(preset: str, B: int, N: int, d: int, L: int, budgets, methods, **kw) -> list[Case]:
    out = []
    for m in methods:
        for k in ((N // 2,) if m == "btp_stage" else budgets):
            if k <= N:
                out.append(Case(preset, B, N, d, L, k, mk.prompt_budget(k) if m == "select" else 0, m, **kw))
    return out


def _for(methods, allowed) -> tuple[str, ...]:
    return tuple(m for m in methods if m in allowed)


def build_preset(name: str, budgets=(64, 128, 192), methods=("select",)) -> list[Case]:
    """The cases of preset ``name`` for each of ``methods`` that it applies to. ``budgets`` (K values) apply to MoB's
    presets whose budget is not fixed; DivPrune, CDPruner and D2Pruner run at the methods' headline budgets (k = 64 at
    LLaVA-1.5, k = 320 at LLaVA-NeXT), BTP's stage at k = N / 2."""
    sel = _for(methods, ("select",))
    others = _for(methods, (*FIXED_BUDGET, "btp_stage"))
    if name == "llava15":  # LLaVA-1.5: 24 x 24 patches of CLIP ViT-L/336, Vicuna-7B width
        return _cases(name, 1, 576, 4096, 64, budgets, sel) + _cases(name, 1, 576, 4096, 64, (64,), others)
    if name == "llava_next":  # LLaVA-NeXT any-res: 5 x 576 tokens, K = 320 (K_p = prompt_budget(320) = 106)
        return _cases(name, 1, 2880, 4096, 64, (320,), sel + others)
    if name == "qwen2vl":  # Qwen2-VL-7B width, dynamic resolution: N from 1024 to 4096
        # A sweep over N at the smallest budget and over the budgets at N = 2048: the full grid would triple the
        # reference's share of a run (its FPS costs k x N x d) without adding a trend the two sweeps do not show.
        small = min(budgets)
        return [c for N in (1024, 2048, 4096)
                for c in _cases(name, 1, N, 3584, 64, budgets if N == 2048 else (small,), sel)]
    if name == "video":  # 8 frames x 256 tokens, selected across the whole clip
        return _cases(name, 1, 8 * 256, 4096, 64, budgets, sel)
    if name == "small":  # 12 x 12 patches, d = 1024
        return _cases(name, 1, 144, 1024, 16, (16,), sel)
    if name == "demo":  # the main job: one LLaVA-1.5 image, K = 64
        return _cases(name, 1, 576, 4096, 64, (64,), sel)
    if name == "tiny":  # for the CLI's own test: seconds, not minutes
        return _cases(name, 1, 64, 32, 4, (8,), sel + others) + _cases(name, 2, 100, 48, 6, (12,), sel + others)
    if name == "gpu":
        return gpu_cases(methods)
    raise ValueError(f"unknown preset {name!r}; choose from {PRESETS}")


def gpu_cases(methods=BENCH_METHODS) -> list[Case]:
    """The GPU check: LLaVA-1.5 (B = 1 and B = 32) in bfloat16 and float32, LLaVA-NeXT in bfloat16 with the explicit
    K_p = 160 of the earlier H100 table (not the rule's 106, so the two tables stay comparable), the other methods at
    LLaVA-1.5 (BTP's stage at k = 288)."""
    both = ("bfloat16", "float32")
    out = []
    if "select" in methods:
        out += [Case("gpu", 1, 576, 4096, 64, 64, 32, "select", both),
                Case("gpu", 32, 576, 4096, 64, 64, 32, "select", both),
                Case("gpu", 1, 2880, 4096, 64, 320, 160, "select", ("bfloat16",),
                     note="LLaVA-NeXT keeps k_p=160 (not prompt_budget(320)=106) to compare with an earlier H100 "
                          "table")]
    out += [Case("gpu", 1, 576, 4096, 64, 288 if m == "btp_stage" else 64, 0, m, both)
            for m in _for(methods, (*FIXED_BUDGET, "btp_stage"))]
    return out


PRESETS = ("llava15", "llava_next", "qwen2vl", "video", "small", "demo", "tiny", "gpu")
DEFAULT_PRESETS = ("llava15", "llava_next", "qwen2vl", "video", "small")
# Presets that need a CUDA device.
GPU_PRESETS = ("gpu",)


def parse_shape(text: str, methods=("select",)) -> list[Case]:
    """``--shape B,N,d,L,k[,k_p]`` as one case per method (preset "custom"). k_p defaults to
    ``mob_kernels.prompt_budget(k)`` and is MoB's only (the other methods ignore it)."""
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) not in (5, 6):
        raise ValueError(f"--shape takes B,N,d,L,k[,k_p] as integers, got {text!r}")
    B, N, d, L, k = vals[:5]
    k_p = vals[5] if len(vals) == 6 else mk.prompt_budget(k)
    if min(B, N, d, L) < 1 or not 0 <= k <= N or not 0 <= k_p <= k:
        raise ValueError(f"--shape {text!r}: need B, N, d, L >= 1, 0 <= k <= N and 0 <= k_p <= k")
    return [Case("custom", B, N, d, L, k, k_p if m == "select" else 0, m) for m in methods]


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


def make_relevance(vis: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """CDPruner's relevance ``[B, N]`` float32 for the synthetic inputs: ``mob_kernels.cdpruner_relevance`` with the
    visual tokens as image embeddings and the prompt rows as text embeddings (computed once, outside the timings)."""
    return mk.cdpruner_relevance(vis, prompt)


def make_importance(vis: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """The importance ``[B, N]`` float32 that D2Pruner and BTP read, for the synthetic inputs: the last prompt row's
    softmax attention over the visual tokens (scaled dot product, one head), as a model's last prompt token gives."""
    v, q = vis.float(), prompt[:, -1].float()
    return torch.softmax(torch.einsum("bnd,bd->bn", v, q) / math.sqrt(vis.shape[-1]), dim=-1)


def btp_stage_args(case: Case) -> dict:
    """Keyword arguments of the BTP stage the bench times: the released LLaVA-1.5 first stage (576 -> 288, ``union``
    of 86 attention picks, 86 diversity picks and a spatial seed of 144 cells, 318 attention candidates rebalanced
    below index 288; ``SCHEDULES["llava"][0]``) with every count scaled by ``case.k / 288``."""
    first = SCHEDULES["llava"][0]
    keep = int(first["keep"])  # type: ignore[call-overload]

    def scaled(key: str, most: int) -> int:
        return min(most, round(int(first[key]) * case.k / keep))  # type: ignore[call-overload]

    side = grid_side(case.N)
    return dict(mode=first["mode"], n_div=scaled("n_div", case.k), n_attn=scaled("n_attn", case.k),
                n_extra=scaled("n_extra", case.N), rebalance=scaled("rebalance", case.N),
                seed=spatial_seed(side, side, scaled("spatial_seed", min(case.k, side * side))))
