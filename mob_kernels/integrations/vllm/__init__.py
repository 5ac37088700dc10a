"""Image-token selection inside vLLM (input mode): a ``vllm.general_plugins`` plugin.

With the plugin installed (``pip install mob_kernels[vllm]``) and switched on for a model, vLLM keeps ``k`` of the
``N`` visual tokens of every image, chosen by this package, for LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL::

    from vllm import LLM
    llm = LLM("llava-hf/llava-1.5-7b-hf", hf_overrides={"mob_kernels": {"method": "divprune", "budget": 64}})
    out = llm.generate({"prompt": "USER: <image>\\nWhat is this? ASSISTANT:", "multi_modal_data": {"image": img}})

or, for any launcher (``vllm serve`` included), the same through the environment of the process that starts vLLM:
``MOB_VLLM_METHOD=divprune MOB_VLLM_BUDGET=64 vllm serve ...``. ``hf_overrides`` wins over the environment.

Settings (``hf_overrides["mob_kernels"]`` key / environment variable):

* ``method`` / ``MOB_VLLM_METHOD``: ``"fps"`` (farthest point sampling, ``mob_kernels.farthest_point_sample``),
  ``"divprune"`` (``mob_kernels.divprune``) or ``"mob"`` (``mob_kernels.select`` with the request's own text after its
  last image as the prompt).
* ``budget`` / ``MOB_VLLM_BUDGET``: tokens kept per image, an int (clipped to the image's token count) or a float
  keep-ratio in (0, 1].
* ``prompt_budget`` / ``MOB_VLLM_PROMPT_BUDGET`` (``mob`` only): int, float ratio of the budget, or unset for
  ``mob_kernels.prompt_budget(k)``. ``fold`` / ``MOB_VLLM_FOLD`` (``mob`` only): neighbours per prompt token.
* ``backend`` / ``MOB_VLLM_BACKEND``: passed to the selection op (default ``"auto"``).

How it hooks in (input mode only: vLLM's paged KV cache holds one length per sequence across layers):

* The multimodal processor allots exactly ``k`` placeholder tokens per image (``min(k, N)``), so the scheduler, the KV
  cache and the prompt length all see the pruned prompt.
* ``embed_multimodal`` runs the encoder as usual, then keeps ``k`` of its ``N`` output tokens per image (the projector
  output: the same features the transformers integration's input mode selects on).
* Qwen's M-RoPE: ``get_mrope_input_positions`` gives the text its original (unpruned) positions and every image's
  placeholders the position of the image's first grid cell; each kept token's (t, h, w) grid offset travels with its
  embedding (six extra channels, exact in any float dtype) and is added to the placeholder's position in ``forward``.
  Kept tokens therefore keep their original 3-D positions and decode continues from the unpruned numbering, exactly
  as ``apply_mob(..., mode="input", positions="keep")``.
* LLaVA / LLaVA-NeXT have 1-D positions, which vLLM counts per token of the (pruned) prompt: that is the transformers
  integration's ``positions="compact"``.

Caches: ``fps`` and ``divprune`` depend on the image alone, so an image's pruned encoder output is shared by every
request (encoder cache) and its KV blocks by every prompt that shares the prefix (prefix caching), as without the
plugin. ``mob`` depends on the request's text too: the text after the last image is folded into every image's
multimodal hash, so the encoder cache, the processor cache and prefix caching stay correct, and hit only for the same
image with the same text after it. Every mode folds its settings into the hash, so engines configured differently
never share cached outputs.

Not supported (refused when the engine starts): Qwen with pipeline parallelism > 1 or with full CUDA graphs for mixed
prefill batches (the grid offsets are applied to the positions in ``forward``, in Python, on the first stage), and
Qwen2.5-VL's video pruning (EVS) together with this plugin. Videos are never pruned by the plugin.

This module needs no vLLM: the configuration, the selection and the position arithmetic live here; the vLLM classes
are in ``mob_kernels.integrations.vllm.models`` and are imported by :func:`register`, which vLLM calls in every process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import mob_kernels

METHODS = ("fps", "divprune", "mob")
CONFIG_KEY = "mob_kernels"  # the hf_overrides key (an attribute of the model's hf_config)
ENV_PREFIX = "MOB_VLLM_"
ENV_VARS = {
    "method": "MOB_VLLM_METHOD",
    "budget": "MOB_VLLM_BUDGET",
    "prompt_budget": "MOB_VLLM_PROMPT_BUDGET",
    "fold": "MOB_VLLM_FOLD",
    "backend": "MOB_VLLM_BACKEND",
}
# When set to 1, every selection is recorded in RECORDS (in the process that runs the model): for tests and debugging.
ENV_RECORD = "MOB_VLLM_RECORD"
PROMPT_IDS_KEY = "mob_prompt_ids"  # the multimodal kwarg that carries the request's text after its last image (mob)
OFFSET_CHANNELS = 6  # (t, h, w) grid offsets, each as (high, low) base-256 digits: exact in bf16/fp16/fp32
SUPPORTED_ARCHITECTURES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)
SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

RECORDS: deque = deque(maxlen=256)


class PluginConfigError(ValueError):
    """The plugin's settings (hf_overrides or environment) are invalid, or ask for something unsupported."""


# ------------------------------------------------------------------------------------------------------ configuration


@dataclasses.dataclass(frozen=True)
class MobVllmConfig:
    """What to keep of every image. See the module docstring for the meaning of each field."""

    method: str
    budget: int | float
    prompt_budget: int | float | None = None
    fold: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        if self.method not in METHODS:
            raise PluginConfigError(f"mob_kernels vLLM plugin: method must be one of {METHODS}, got {self.method!r}")
        resolve_budget(self.budget, 1 << 30)
        resolve_prompt_budget(self.prompt_budget, 1 << 30)
        if self.fold is not None and (isinstance(self.fold, bool) or not isinstance(self.fold, int) or self.fold < 0):
            raise PluginConfigError(f"mob_kernels vLLM plugin: fold must be None or an int >= 0, got {self.fold!r}")
        if not isinstance(self.backend, str):
            raise PluginConfigError(f"mob_kernels vLLM plugin: backend must be a str, got {self.backend!r}")

    def keep_count(self, n: int) -> int:
        """Tokens kept of an image with ``n`` tokens."""
        return resolve_budget(self.budget, n)

    @property
    def uses_prompt(self) -> bool:
        return self.method == "mob"

    def fingerprint(self) -> str:
        """A stable string folded into every image's multimodal hash."""
        return f"mob_kernels:{self.method}:{self.budget!r}:{self.prompt_budget!r}:{self.fold!r}"


def resolve_budget(budget: int | float, n: int) -> int:
    """Tokens kept of ``n``: an int budget clipped to ``n``, or a float keep-ratio (at least 1). The rule of the
    transformers integration (``apply_mob``'s ``budget``)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise PluginConfigError(f"mob_kernels vLLM plugin: budget must be an int or a float keep-ratio, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise PluginConfigError(f"mob_kernels vLLM plugin: budget must be >= 1, got {budget}")
        return min(budget, n)
    if not 0.0 < budget <= 1.0:
        raise PluginConfigError(f"mob_kernels vLLM plugin: a float budget is a keep-ratio in (0, 1], got {budget}")
    return max(1, min(n, round(budget * n)))


def resolve_prompt_budget(prompt_budget: int | float | None, k: int) -> int:
    """MoB's prompt share ``k_p`` of ``k`` (``apply_mob``'s ``prompt_budget`` rule)."""
    if prompt_budget is None:
        return mob_kernels.prompt_budget(k)
    if isinstance(prompt_budget, bool) or not isinstance(prompt_budget, (int, float)):
        raise PluginConfigError(
            f"mob_kernels vLLM plugin: prompt_budget must be an int, a float ratio or None, got {prompt_budget!r}")
    if isinstance(prompt_budget, int):
        if prompt_budget < 0:
            raise PluginConfigError(f"mob_kernels vLLM plugin: prompt_budget must be >= 0, got {prompt_budget}")
        return min(prompt_budget, k)
    if not 0.0 <= prompt_budget <= 1.0:
        raise PluginConfigError(f"mob_kernels vLLM plugin: a float prompt_budget is in [0, 1], got {prompt_budget}")
    return min(k, round(prompt_budget * k))


def _number(name: str, text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise PluginConfigError(f"mob_kernels vLLM plugin: {name} must be a number, got {text!r}") from None


def config_from_mapping(raw: Mapping[str, Any]) -> MobVllmConfig:
    """A config from ``hf_overrides["mob_kernels"]`` (a dict; unknown keys raise)."""
    if not isinstance(raw, Mapping):
        raise PluginConfigError(f"mob_kernels vLLM plugin: hf_overrides[{CONFIG_KEY!r}] must be a dict, got {raw!r}")
    unknown = set(raw) - set(ENV_VARS)
    if unknown:
        raise PluginConfigError(
            f"mob_kernels vLLM plugin: unknown settings {sorted(unknown)}; known: {sorted(ENV_VARS)}")
    if "method" not in raw or "budget" not in raw:
        raise PluginConfigError(f"mob_kernels vLLM plugin: settings need 'method' and 'budget', got {dict(raw)}")
    return MobVllmConfig(**dict(raw))


def config_from_env(environ: Mapping[str, str] | None = None) -> MobVllmConfig | None:
    """A config from the ``MOB_VLLM_*`` environment variables, or None when ``MOB_VLLM_METHOD`` is unset."""
    env = os.environ if environ is None else environ
    if not env.get(ENV_VARS["method"]):
        if env.get(ENV_VARS["budget"]):
            raise PluginConfigError(f"mob_kernels vLLM plugin: {ENV_VARS['budget']} is set but {ENV_VARS['method']} "
                                    "is not; set both (or neither)")
        return None
    if not env.get(ENV_VARS["budget"]):
        raise PluginConfigError(f"mob_kernels vLLM plugin: {ENV_VARS['method']} is set but {ENV_VARS['budget']} is not")
    raw: dict[str, Any] = {"method": env[ENV_VARS["method"]].strip().lower(),
                           "budget": _number(ENV_VARS["budget"], env[ENV_VARS["budget"]])}
    if env.get(ENV_VARS["prompt_budget"]):
        raw["prompt_budget"] = _number(ENV_VARS["prompt_budget"], env[ENV_VARS["prompt_budget"]])
    if env.get(ENV_VARS["fold"]):
        fold = _number(ENV_VARS["fold"], env[ENV_VARS["fold"]])
        if not isinstance(fold, int):
            raise PluginConfigError(f"mob_kernels vLLM plugin: {ENV_VARS['fold']} must be an int, got {fold!r}")
        raw["fold"] = fold
    if env.get(ENV_VARS["backend"]):
        raw["backend"] = env[ENV_VARS["backend"]]
    return MobVllmConfig(**raw)


def config_for(hf_config: Any, environ: Mapping[str, str] | None = None) -> MobVllmConfig | None:
    """The plugin's settings for a model: ``hf_config.mob_kernels`` (set through ``hf_overrides``) if present, else the
    environment; None means off (the model runs exactly as stock vLLM). ``hf_overrides={"mob_kernels": None}`` turns
    the plugin off for one engine whatever the environment says."""
    if hasattr(hf_config, CONFIG_KEY):
        raw = getattr(hf_config, CONFIG_KEY)
        return None if raw is None else config_from_mapping(raw)
    return config_from_env(environ)


# ---------------------------------------------------------------------------------------------------------- selection


def select_image_tokens(cfg: MobVllmConfig, feats: Tensor, prompt: Tensor | None = None) -> Tensor:
    """The kept indices (int64 ``[k]``, sorted) of one image's encoder output ``feats`` ``[N, d]``.

    ``fps``: ``mob_kernels.farthest_point_sample`` (no seed); ``divprune``: ``mob_kernels.divprune``; ``mob``:
    ``mob_kernels.select`` with ``prompt`` ``[L, d]`` (the embedded text after the request's last image)."""
    n = feats.shape[0]
    k = cfg.keep_count(n)
    if cfg.method == "fps":
        return torch.sort(mob_kernels.farthest_point_sample(feats, k, backend=cfg.backend)).values
    if cfg.method == "divprune":
        return mob_kernels.divprune(feats, k, backend=cfg.backend)
    if prompt is None:
        prompt = feats.new_zeros(0, feats.shape[-1])
    k_p = resolve_prompt_budget(cfg.prompt_budget, k)
    return mob_kernels.select(feats, prompt.to(feats.dtype), k_p, k, fold=cfg.fold, backend=cfg.backend)


def record(**entry: Any) -> None:
    if os.environ.get(ENV_RECORD) == "1":
        RECORDS.append({key: (v.detach().cpu() if isinstance(v, Tensor) else v) for key, v in entry.items()})


# --------------------------------------------------------------------------------------------------- prompt and hashes


def prompt_tail(prompt_ids: Sequence[int], placeholder_ids: Sequence[int]) -> list[int]:
    """The token ids after the last image/video placeholder of a prompt (all of it when there is none): MoB's prompt,
    as the transformers integration takes it (the text after the row's last image run)."""
    ids = list(prompt_ids)
    marks = set(int(i) for i in placeholder_ids)
    for j in range(len(ids) - 1, -1, -1):
        if ids[j] in marks:
            return ids[j + 1:]
    return ids


def item_hash(base: str, cfg: MobVllmConfig, tail: Sequence[int] | None) -> str:
    """An image's multimodal hash with the plugin's settings (and, for ``mob``, the text it is selected for) folded in:
    the key of vLLM's processor cache, encoder cache and the image's share of prefix-cache block hashes."""
    h = hashlib.sha256()
    h.update(base.encode())
    h.update(b"\0" + cfg.fingerprint().encode())
    if tail is not None:
        h.update(b"\0" + ",".join(str(int(t)) for t in tail).encode())
    return h.hexdigest()


def placeholder_ids_of(hf_config: Any) -> list[int]:
    ids = [getattr(hf_config, name, None) for name in ("image_token_index", "image_token_id", "video_token_id")]
    return sorted({int(i) for i in ids if i is not None})


# ------------------------------------------------------------------------------------------------------------- M-RoPE


def grid_offsets(indices: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """The (t, h, w) grid offsets ``[k, 3]`` (int64) of token ``indices`` in a row-major ``t x h x w`` grid (the
    merged grid: one token per ``merge x merge`` patches)."""
    _, h, w = grid
    idx = indices.to(torch.int64)
    return torch.stack([idx // (h * w), (idx // w) % h, idx % w], dim=1)


def encode_offsets(offsets: Tensor, dtype: torch.dtype) -> Tensor:
    """``[k, 3]`` non-negative int offsets as ``[k, 6]`` channels of ``dtype``: base-256 (high, low) digits, each
    below 256 and so exact in bfloat16, float16 and float32 (offsets below 65,536)."""
    if offsets.numel() and int(offsets.max()) >= 1 << 16:
        raise ValueError(f"grid offsets must be < 65536, got {int(offsets.max())}")
    digits = torch.stack([offsets // 256, offsets % 256], dim=-1).flatten(1)  # [k, 6]: t_hi, t_lo, h_hi, ...
    return digits.to(dtype)


def decode_offsets(channels: Tensor) -> Tensor:
    """The inverse of :func:`encode_offsets`: ``[k, 6]`` -> int64 ``[k, 3]``."""
    digits = channels.float().round().to(torch.int64).view(-1, 3, 2)
    return digits[..., 0] * 256 + digits[..., 1]


@dataclasses.dataclass(frozen=True)
class MediaRun:
    """One image or video of a prompt, as the M-RoPE layout needs it: where its placeholders start, its merged grid
    ``(t, h, w)``, the temporal scale of its grid (videos) and how many placeholders it holds."""

    offset: int
    t: int
    h: int
    w: int
    t_factor: float = 1.0
    length: int | None = None  # None: t*h*w (unpruned)


def mrope_positions(num_tokens: int, runs: Sequence[MediaRun]) -> tuple[Tensor, int]:
    """Qwen2-VL / Qwen2.5-VL M-RoPE positions ``[3, num_tokens]`` of a prompt whose images may be pruned, and the
    decode delta (next position minus prompt length), with the transformers integration's ``positions="keep"``:

    * text tokens get the positions they have in the unpruned prompt (text after an image continues from the image's
      full grid, ``max(t, h, w)`` after its start);
    * an unpruned run gets its grid positions (vLLM's own rule, ``t`` scaled by ``t_factor`` for videos);
    * a pruned run's placeholders all get the position of the grid's first cell; the kept tokens' grid offsets are
      added at run time (they depend on the selection).
    """
    parts: list[Tensor] = []
    next_pos = 0  # the position the next text token gets
    st = 0  # tokens consumed
    for run in sorted(runs, key=lambda r: r.offset):
        text_len = run.offset - st
        if text_len < 0:
            raise ValueError(f"media runs overlap at offset {run.offset}")
        parts.append(torch.arange(text_len).expand(3, text_len) + next_pos)
        base = next_pos + text_len
        full = run.t * run.h * run.w
        length = full if run.length is None else run.length
        if length == full:
            t_idx = torch.arange(run.t).view(-1, 1, 1).expand(run.t, run.h, run.w)
            if run.t_factor != 1.0:
                t_idx = (t_idx * run.t_factor).to(torch.int64)
            h_idx = torch.arange(run.h).view(1, -1, 1).expand(run.t, run.h, run.w)
            w_idx = torch.arange(run.w).view(1, 1, -1).expand(run.t, run.h, run.w)
            grid = torch.stack([t_idx.flatten(), h_idx.flatten(), w_idx.flatten()]) + base
            parts.append(grid)
            next_pos = int(grid.max()) + 1 if full else base
        else:
            if not 0 <= length < full:
                raise ValueError(f"a pruned run holds {length} of {full} tokens")
            parts.append(torch.full((3, length), base, dtype=torch.int64))
            t_last = int((run.t - 1) * run.t_factor) if run.t_factor != 1.0 else run.t - 1
            next_pos = base + max(t_last, run.h - 1, run.w - 1) + 1
        st = run.offset + length
    if st > num_tokens:
        raise ValueError(f"media runs end at {st}, past the prompt's {num_tokens} tokens")
    parts.append(torch.arange(num_tokens - st).expand(3, num_tokens - st) + next_pos)
    positions = torch.cat(parts, dim=1).to(torch.int64)
    last = next_pos + (num_tokens - st)  # one past the largest position, image grids included
    return positions, int(last - num_tokens)


# ---------------------------------------------------------------------------------------------------------- the plugin


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the four architectures' plugin classes with vLLM's model
    registry (they run exactly as vLLM's own classes while the plugin is off for a model). Safe to call repeatedly."""
    from vllm import ModelRegistry

    for arch in SUPPORTED_ARCHITECTURES:
        ModelRegistry.register_model(arch, f"mob_kernels.integrations.vllm.models:Mob{arch}")


__all__ = [
    "MobVllmConfig",
    "PluginConfigError",
    "METHODS",
    "ENV_VARS",
    "RECORDS",
    "SUPPORTED_ARCHITECTURES",
    "config_for",
    "config_from_env",
    "config_from_mapping",
    "select_image_tokens",
    "prompt_tail",
    "item_hash",
    "grid_offsets",
    "encode_offsets",
    "decode_offsets",
    "MediaRun",
    "mrope_positions",
    "register",
]
