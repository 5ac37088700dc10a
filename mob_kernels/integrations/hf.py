"""Visual-token pruning (MoB, DivPrune, CDPruner, D2Pruner, BTP) inside Hugging Face transformers 5.x
vision-language models, through module hooks only.

What it computes (docs/contract.md §3 applied to a real model): at prefill, every image's (or video's) run of
placeholder tokens is cut by the method's op (``mob_kernels.select``, ``mob_kernels.divprune``,
``mob_kernels.cdpruner``, ``mob_kernels.d2pruner``, ``mob_kernels.btp_stage``):

* layer mode (MoB's, D2Pruner's, BTP's): the tokens are chosen on the hidden states entering a decoder layer and the
  layers from there on run on the kept tokens only: hidden states, position ids, cos/sin (Qwen's M-RoPE included),
  the attention mask and their KV cache follow the kept tokens; earlier layers see the whole sequence. MoB's features
  are those hidden states passed through the language model's final norm, its prompt the text after the row's last
  image (padding excluded). D2Pruner and BTP also read the last prompt token's attention at the layer before
  (``mob_kernels.integrations.attention``: that layer's own projections and rotary, one query row, no eager
  attention). BTP prunes in several stages of one forward: each stage's layers hold fewer tokens in their KV cache
  than the layers before it, and every decode step gathers each layer's own key columns.
* input mode (DivPrune's and CDPruner's): the same selection on the merged input embeddings (projector output),
  before the first layer.

How it maps onto the models: forward pre-hooks with kwargs on ``model.model`` (to see ``input_ids``, the 2-D mask and
the image layout arguments), on ``model.model.language_model`` (input mode, and to find the KV cache), on
``language_model.layers[i]`` from the first pruning layer (or the attention layer before it) on, and forward hooks on
the ``k_proj`` of the layers whose attention a method reads (to reuse the keys the model computed). No modelling file
is forked and no weight is touched, so ``handle.remove()`` restores the model exactly.

Prefill and decode: a forward call prunes when its ``input_ids`` hold image/video placeholder ids and its KV cache is
empty (a prefill). A call that extends a cache is a decode step: placeholder ids among its new tokens are ordinary
tokens there (a sampled token may equal the image id; the unhooked model embeds it like any other token), and only
images given with pixels after cached tokens (a multi-turn image prompt) raise ``NotImplementedError``.

Batches: rows must hold the same image layout (the same number of images with the same token counts, anywhere in
the row; left padding is fine) so that every row prunes to the same length; otherwise a ``ValueError`` says so and
the rows have to be run separately. We raise rather than re-pad because re-padding would change the keys every
later layer attends to and the decode positions, which the KV-cache equivalence guarantees rely on.

Positions: ``positions="keep"`` (MoB's, D2Pruner's and BTP's) keeps each kept token's original position, so positions
have gaps and decode steps continue from the original prompt length. ``positions="compact"`` (DivPrune's and
CDPruner's default, as their papers run the language model on the shorter sequence) re-indexes the kept tokens
contiguously (1-D positions only, i.e. LLaVA / LLaVA-NeXT, and single-stage methods; Qwen's M-RoPE grid positions
have no contiguous equivalent, so asking for it raises there and DivPrune and CDPruner keep the original positions
on Qwen).

Versions: ``SUPPORTED_TRANSFORMERS`` is the range the test suite runs on (``make test`` runs the integration tests on
its lowest and highest ends). One adapter spans it: before 5.17 the Qwen rotary embedding returns cos/sin per M-RoPE
axis, ``[3, B, n, d]``, from 5.17 on already recomposed, ``[B, n, d]``; both are gathered along the token axis
(``-2``), and the last-token attention rotates with whichever function the layer's modeling module has for that
shape, so the hooks never look at the version.
"""

from __future__ import annotations

import dataclasses
import os
import time
import weakref
from typing import Any

import torch
from torch import Tensor

import mob_kernels
from mob_kernels.methods import most_isolated

from . import layout as _layout
from .attention import last_token_attention, layer_keys
from .schedule import normalise as _normalise_schedule
from .schedule import stage_arguments as _stage_arguments

# The range the hooks are tested on: ``make test`` runs python_tests/test_integrations.py with the lowest supported
# release (the Makefile's TRANSFORMERS_LOWEST) and the highest (its TEST_DEPS pin). The hook points (no
# ``cache_position``, masks sized from the layer-0 cache, decoder layers called with ``position_embeddings``) are 5.x
# behaviour from 5.4 on; on 5.3 decode masks and Qwen's position ids take other shapes and generate fails. pyproject's
# ``integrations`` extra states this same range (a test checks it against this constant).
MIN_TRANSFORMERS = (5, 4)
MAX_TRANSFORMERS_EXCLUSIVE = (6, 0)
SUPPORTED_TRANSFORMERS = f">={MIN_TRANSFORMERS[0]}.{MIN_TRANSFORMERS[1]},<{MAX_TRANSFORMERS_EXCLUSIVE[0]}"

SUPPORTED_MODEL_TYPES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")
# The forward arguments that carry the images' pixels (or features): placeholder ids with one of these are images.
_PIXEL_KWARGS = ("pixel_values", "pixel_values_videos", "image_embeds", "video_embeds")


class UnsupportedModelError(ValueError):
    """``apply_mob`` was given a model (or transformers version) it has no hooks for."""


def installed_transformers_version() -> str:
    import transformers

    return transformers.__version__


def _check_transformers_version() -> str:
    version = installed_transformers_version()
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    key = tuple(parts)
    if not (MIN_TRANSFORMERS <= key < MAX_TRANSFORMERS_EXCLUSIVE):
        raise UnsupportedModelError(
            f"mob_kernels.integrations supports transformers {SUPPORTED_TRANSFORMERS}, found transformers=={version}; "
            f"install a supported version (pip install 'transformers{SUPPORTED_TRANSFORMERS}')"
        )
    return version


# ------------------------------------------------------------------------------------------------------------ budgets


def _resolve_budget(budget: int | float, n: int) -> int:
    if isinstance(budget, bool):
        raise TypeError(f"budget must be an int or a float keep-ratio, got {budget!r}")
    if isinstance(budget, int):
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got budget={budget}")
        return min(budget, n)
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is a keep-ratio in (0, 1], got budget={budget}")
        return max(1, min(n, round(budget * n)))
    raise TypeError(f"budget must be an int or a float keep-ratio, got {type(budget).__name__} {budget!r}")


def _resolve_prompt_budget(prompt_budget: int | float | None, k: int) -> int:
    if prompt_budget is None:
        return mob_kernels.prompt_budget(k)
    if isinstance(prompt_budget, bool):
        raise TypeError(f"prompt_budget must be an int, a float ratio of the budget, or None, got {prompt_budget!r}")
    if isinstance(prompt_budget, int):
        if prompt_budget < 0:
            raise ValueError(f"prompt_budget must be >= 0, got prompt_budget={prompt_budget}")
        return min(prompt_budget, k)
    if isinstance(prompt_budget, float):
        if not 0.0 <= prompt_budget <= 1.0:
            raise ValueError(f"a float prompt_budget is a ratio of the budget in [0, 1], got {prompt_budget}")
        return min(k, round(prompt_budget * k))
    raise TypeError(f"prompt_budget must be an int, a float or None, got {type(prompt_budget).__name__}")


# ------------------------------------------------------------------------------------------------------- the records


# Why a token was kept, per method (``KeptImage.roles``): MoB's prompt cover and farthest point sampling; DivPrune's
# most isolated first pick and the farthest point picks after it; CDPruner's greedy DPP picks and, when the DPP ran out
# of rank before the budget, the most relevant remaining tokens; D2Pruner's pivots (top debiased importance), its
# greedy maximal independent set, the importance fill when the set ran out, and padding with unusable tokens
# (contract §3.4, role codes 0-3); BTP's attention picks, spatial seed and diversity picks (each stage's, contract §3.5:
# a token the attention chose is "attention" even when the seed or diversity chose it too, as the union's priority
# order has it).
ROLES = {
    "mob": ("prompt", "fps"),
    "divprune": ("isolated", "diverse"),
    "cdpruner": ("dpp", "relevance"),
    "d2pruner": ("pivot", "mis", "fill", "pad"),
    "btp": ("attention", "spatial", "diversity"),
}
METHODS = tuple(ROLES)
# The selection op of each method in mob_kernels (and its name for mob_kernels.budget_arguments).
_OPS = {"mob": "select", "divprune": "divprune", "cdpruner": "cdpruner", "d2pruner": "d2pruner", "btp": "btp_stage"}
# Methods that read the model's attention: layer mode only, original positions only.
_ATTENTION_METHODS = ("d2pruner", "btp")
ANCHORS = ("all", "released")
RELEASED_ANCHORS = 8  # MoB's released code: the 8 prompt rows with the largest key norms


@dataclasses.dataclass
class KeptStage:
    """What one BTP stage kept of one image: ``indices`` (sorted, into the image's own ``num_tokens`` tokens; with
    ``released=True`` they may repeat a token the released code keeps twice), ``roles`` aligned with them, the
    0-based decoder ``layer`` the stage prunes before, ``num_in`` tokens entering it and its scheduled ``k``."""

    layer: int
    num_in: int
    k: int
    indices: Tensor
    roles: tuple[str, ...]
    num_tokens: int
    method: str = "btp"
    tiles: tuple[tuple[int, int], ...] = ()

    @property
    def from_prompt(self) -> Tensor:
        return torch.zeros(len(self.indices), dtype=torch.bool)

    def role_indices(self, role: str) -> Tensor:
        if role not in ROLES[self.method]:
            raise ValueError(f"{self.method} records roles {ROLES[self.method]}, got role={role!r}")
        return self.indices[torch.tensor([r == role for r in self.roles], dtype=torch.bool)]


@dataclasses.dataclass
class KeptImage:
    """What was kept of one image (or video) run in one batch row, and why.

    ``indices`` are sorted positions within the image's own tokens (``0 .. num_tokens - 1``, in the model's token
    order over the image's grid); ``roles[i]`` says why ``indices[i]`` was kept (one of ``ROLES[method]``);
    ``from_prompt`` marks MoB's prompt-cover picks (all False for the other methods). ``relevance`` (CDPruner) is each
    kept token's relevance to the prompt; ``importance`` (D2Pruner) each kept token's attention importance before
    debiasing. ``grid`` ``[num_tokens, 3]`` (tile, row, col; ``-1`` for LLaVA-NeXT's newline tokens) and ``tiles``
    (rows, cols per tile) describe the image's layout where the method used it (D2Pruner, BTP). ``anchors`` and
    ``folds`` (MoB with ``anchors="released"``): the prompt anchors' positions in the row and each one's fold.
    ``stages`` (BTP): one :class:`KeptStage` per stage; ``indices`` / ``roles`` are then the first stage's.
    ``start`` is where the run begins in the row's unpruned sequence."""

    row: int
    image: int
    start: int
    num_tokens: int
    indices: Tensor
    from_prompt: Tensor
    method: str = "mob"
    roles: tuple[str, ...] = ()
    relevance: Tensor | None = None
    importance: Tensor | None = None
    grid: Tensor | None = None
    tiles: tuple[tuple[int, int], ...] = ()
    anchors: Tensor | None = None
    folds: Tensor | None = None
    stages: list[KeptStage] = dataclasses.field(default_factory=list)

    def role_indices(self, role: str) -> Tensor:
        """The kept indices whose role is ``role``."""
        if role not in ROLES[self.method]:
            raise ValueError(f"{self.method} records roles {ROLES[self.method]}, got role={role!r}")
        return self.indices[torch.tensor([r == role for r in self.roles], dtype=torch.bool)]

    @property
    def prompt_indices(self) -> Tensor:
        return self.indices[self.from_prompt]

    @property
    def fps_indices(self) -> Tensor:
        return self.indices[~self.from_prompt]


@dataclasses.dataclass
class _Prefill:
    """What a pruned prefill left behind for the decode steps that extend its KV cache."""

    length: int  # L, the unpruned prompt length
    keep: Tensor  # [B, L'] sorted positions kept by the first stage
    dropped: Tensor  # [B] L - L'
    cache: Any  # weakref to the KV cache that holds the pruned prefix (None: not yet known)
    # (first decoder layer, kept positions [B, L_s]) per stage, in layer order: layers from that one on (up to the
    # next stage) hold L_s prefill entries in their KV cache.
    stages: list[tuple[int, Tensor]] = dataclasses.field(default_factory=list)

    def keep_at(self, index: int) -> tuple[Tensor | None, int]:
        """The kept positions layer ``index`` holds, and the stage's number (None, -1: every position)."""
        found: tuple[Tensor | None, int] = (None, -1)
        for s, (layer, keep) in enumerate(self.stages):
            if layer <= index:
                found = (keep, s)
        return found


@dataclasses.dataclass
class _Capture:
    """A layer's inputs in a pruned prefill, kept for the last-token attention read at the next stage."""

    hidden: Tensor  # [B, L_cur, d] entering the layer
    position_embeddings: Any  # the (cos, sin) the layer received
    keep: Tensor | None  # positions of the unpruned prefill the L_cur tokens are (None: all)
    keys: Tensor | None = None  # the layer's k_proj output, [B, L_cur, H_kv * hd]


@dataclasses.dataclass
class _Call:
    """The current forward call, as seen by the model-level pre-hook."""

    input_ids: Tensor | None = None
    mask2d: Tensor | None = None
    prune: bool = False
    keep: Tensor | None = None  # positions kept by the stages run so far in this call (set by the first one)
    layout: dict = dataclasses.field(default_factory=dict)  # image_sizes / image_grid_thw / video_grid_thw
    done: set = dataclasses.field(default_factory=set)  # stage layers run in this call
    capture: dict = dataclasses.field(default_factory=dict)  # layer index -> _Capture
    memo: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------------- hooks


def _index_last(x: Tensor, idx: Tensor) -> Tensor:
    """Gather ``x[..., b, idx[b]]`` along the last dim for ``x`` of shape ``[..., B or 1, L]``."""
    B = idx.shape[0]
    lead = x.shape[:-2]
    x = x.expand(*lead, B, x.shape[-1])
    return torch.gather(x, -1, idx.expand(*lead, *idx.shape))


def _index_seq(x: Tensor, idx: Tensor) -> Tensor:
    """Gather rows ``x[b, idx[b], :]`` for ``x`` of shape ``[B or 1, L, ...]``."""
    B = idx.shape[0]
    x = x.expand(B, *x.shape[1:])
    rows = torch.arange(B, device=x.device).unsqueeze(1)
    return x[rows, idx.to(x.device)]


def _isin_rows(x: Tensor, y: Tensor) -> Tensor:
    """``x[b, i] in y[b]`` for ``x`` ``[B, k]`` and ``y`` ``[B, m]`` (``-1`` padding in ``y`` matches nothing)."""
    return (x.unsqueeze(2) == y.unsqueeze(1)).any(dim=2) if y.numel() else torch.zeros_like(x, dtype=torch.bool)


def _index_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Gather ``x[..., b, idx[b], :]`` for ``x`` of shape ``[..., B or 1, L, d]``: the rotary cos/sin, ``[B, L, d]``,
    or ``[3, B, L, d]`` (one per M-RoPE axis) from Qwen before transformers 5.17."""
    B, K = idx.shape
    lead = x.shape[:-3]
    x = x.expand(*lead, B, *x.shape[-2:])
    index = idx.to(x.device).view(*(1,) * len(lead), B, K, 1).expand(*lead, B, K, x.shape[-1])
    return torch.gather(x, -2, index)


def released_cover(vis: Tensor, prompt: Tensor, p_mask: Tensor, key_norms: Tensor, k_p: int,
                   n_anchors: int = RELEASED_ANCHORS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MoB's prompt cover with the released code's anchors, batched, in plain torch.

    Anchors: the ``n_anchors`` valid prompt rows with the largest ``key_norms`` (L1 norms of the layer's post-rotary
    keys; ties to the lower row). Anchor ``i``'s fold is ``f_i = min(N, max(1, round(k_p * w_i)))`` with ``w_i`` its
    share of the anchors' summed norms (equal shares if they sum to 0; ``round`` half to even), so equal norms give
    ``k_p / 8`` each, the paper's fold 4 / 6 / 8 at ``k_p`` 32 / 48 / 64. Then contract §3.1.2 with per-anchor folds:
    each anchor nominates its ``f_i`` most similar tokens (cosine, finite only, ties to the lower index), a nominee's
    score is its best similarity to an anchor that nominated it, and the ``min(k_p, #nominees)`` best nominees win.

    Returns (picks ``[B, k_p]`` by descending score, ``-1`` padded; count ``[B]``; anchor rows ``[B, A]`` into the
    prompt, ``-1`` where a sample has fewer valid rows; folds ``[B, A]``, 0 there)."""
    B, N, _ = vis.shape
    Lp = prompt.shape[1]
    A = min(n_anchors, Lp)
    dev = vis.device
    if A == 0 or k_p == 0 or N == 0:
        e = torch.full((B, k_p), -1, dtype=torch.int64, device=dev)
        return e, torch.zeros(B, dtype=torch.int64, device=dev), e[:, :0], e[:, :0]
    norms = key_norms.float().masked_fill(~p_mask, float("-inf"))
    rows = torch.sort(norms, dim=1, descending=True, stable=True).indices[:, :A]
    ok = p_mask.gather(1, rows)
    w = torch.where(ok, key_norms.float().gather(1, rows), 0.0)
    total = w.sum(1, keepdim=True)
    share = torch.where(total > 0, w / total.clamp_min(torch.finfo(torch.float32).tiny),
                        ok.float() / ok.sum(1, keepdim=True).clamp_min(1))
    folds = torch.where(ok, torch.round(k_p * share).long().clamp(1, N), 0)
    anchors = _index_seq(prompt, rows).float()
    v = vis.float()
    eps = 1e-12
    a_hat = anchors / anchors.norm(dim=-1, keepdim=True).clamp_min(eps)
    v_hat = v / v.norm(dim=-1, keepdim=True).clamp_min(eps)
    sim = torch.einsum("bad,bnd->ban", a_hat, v_hat)  # [B, A, N]
    finite = torch.isfinite(sim)
    order = torch.sort(sim.masked_fill(~finite, float("-inf")), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(N, device=dev).expand_as(order))
    member = (rank < folds.unsqueeze(-1)) & finite & ok.unsqueeze(-1)
    score = sim.masked_fill(~member, float("-inf")).amax(dim=1)  # [B, N]
    cand = member.any(dim=1)
    top = torch.sort(score.masked_fill(~cand, float("-inf")), dim=1, descending=True, stable=True).indices
    top = top[:, :k_p]
    if top.shape[1] < k_p:
        top = torch.cat([top, top.new_full((B, k_p - top.shape[1]), -1)], 1)
    real = (top >= 0) & cand.gather(1, top.clamp_min(0))
    picks = torch.where(real, top, -1)
    return picks, real.sum(1), torch.where(ok, rows, -1), folds


def _last_valid(valid: Tensor | None, B: int, L: int, device) -> Tensor:
    """The index of each row's last valid (non-padding) token ``[B]``."""
    if valid is None:
        return torch.full((B,), L - 1, dtype=torch.int64, device=device)
    pos = torch.arange(1, L + 1, device=valid.device).unsqueeze(0) * valid.long()
    return (pos.argmax(dim=1)).to(device)


class PruningHandle:
    """Returned by :func:`apply_pruning` and :func:`apply_mob`. ``remove()`` takes every hook off; ``kept`` is the
    last prefill's record."""

    def __init__(self, model, *, method="mob", budget, prompt_budget, fold, layer, mode, positions, backend, record,
                 anchors="all", bias=None, d2pruner=None, schedule=None, released=False, attention_scores=None):
        self.model = model
        self.method = method
        self.budget = budget
        self.prompt_budget = prompt_budget
        self.fold = fold
        self.layer = layer
        self.mode = mode
        self.positions = positions
        self.backend = backend
        self.record = record
        self.anchors = anchors
        self.bias = bias  # D2Pruner: the [H, W] per-tile attention bias map (None: importance used as is)
        self.d2pruner_options = dict(d2pruner or {})
        self.schedule = schedule  # BTP: the normalised stage plan
        self.released = released
        self.attention_scores = attention_scores
        self.model_type = model.config.model_type
        self.kept: list[list[KeptImage]] = []  # [row][image] of the last pruned prefill
        self.keep_index: Tensor | None = None  # [B, L'] positions kept by the last pruned prefill (its first stage)
        # The last pruned prefill's last-token attention probabilities [B, H, L_current] per decoder layer read
        # (D2Pruner, BTP; with record=True).
        self.attention: dict[int, Tensor] = {}
        self.attention_logits: dict[int, Tensor] = {}  # the same rows before the softmax (masked keys -inf)
        self.selection_seconds = 0.0  # wall time spent in selection (cumulative; reset it freely)
        self._hooks: list = []
        self._call = _Call()
        self._prefill: _Prefill | None = None
        self._layouts: dict = {}
        self._biases: dict = {}

        base = model.model
        self._base = base
        self._lm = base.language_model
        cfg = model.config
        ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "image_token_index", None)]
        ids += [getattr(cfg, "video_token_id", None)]
        self._placeholder_ids = sorted({int(i) for i in ids if i is not None})
        self._video_id = getattr(cfg, "video_token_id", None)
        self._chunk = int(getattr(cfg, "image_seq_length", 0) or 0) if self.model_type == "llava" else 0
        self._mrope = self.model_type in ("qwen2_vl", "qwen2_5_vl")

        # Decoder layers before which a stage prunes (0-based), and the layers whose last-token attention is read.
        if method == "btp":
            self._stage_layers = [s["index"] for s in schedule]
            self._attention_layers = sorted({s["index"] - 1 for s in schedule if s["keep"] != 0})
        else:
            self._stage_layers = [layer] if mode == "layer" else []
            self._attention_layers = [layer - 1] if method == "d2pruner" else []
        self._stage_number = {index: s for s, index in enumerate(self._stage_layers)}

        self._hooks.append(base.register_forward_pre_hook(self._on_base, with_kwargs=True))
        self._hooks.append(self._lm.register_forward_pre_hook(self._on_lm, with_kwargs=True))
        self._hooks.append(self._lm.register_forward_hook(self._after_lm, with_kwargs=True))
        if mode == "layer":
            first = min(self._stage_layers + self._attention_layers)
            for i in range(first, len(self._lm.layers)):
                hook = self._lm.layers[i].register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True)
                self._hooks.append(hook)
            for i in self._attention_layers:
                self._hooks.append(self._lm.layers[i].self_attn.k_proj.register_forward_hook(self._make_key_hook(i)))

    # ----------------------------------------------------------------------------------------------- public
    def remove(self) -> None:
        """Take every hook off. The model is then exactly what it was before ``apply_pruning``."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._prefill = None
        self._call = _Call()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    @property
    def stage_index(self) -> list[tuple[int, Tensor]]:
        """Per stage of the last pruned prefill: (the 0-based decoder layer it prunes before, the positions ``[B, L_s]``
        of the unpruned sequence that layer and the layers after it, up to the next stage, hold)."""
        return list(self._prefill.stages) if self._prefill is not None else []

    # --------------------------------------------------------------------------------------- model level
    def _on_base(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        call = _Call(input_ids=input_ids, mask2d=mask if isinstance(mask, Tensor) and mask.dim() == 2 else None)
        if input_ids is not None and input_ids.shape[1] > 0:
            call.prune = bool(torch.isin(input_ids, self._ph_tensor(input_ids.device)).any())
        if call.prune:
            cache = kwargs.get("past_key_values")
            if cache is not None and cache.get_seq_length() > 0:
                # A call that extends a KV cache is a decode step: a placeholder id among its new tokens is an ordinary
                # token (e.g. sampled), embedded as the unhooked model does. Only pixels for it make it an image.
                if any(kwargs.get(name) is not None for name in _PIXEL_KWARGS):
                    raise NotImplementedError(
                        "mob_kernels: images after cached tokens (multi-turn prefill on a non-empty KV cache) are "
                        "not supported; start a new cache for a prompt with images"
                    )
                call.prune = False
            call.layout = {name: kwargs.get(name) for name in ("image_sizes", "image_grid_thw", "video_grid_thw")}
        self._call = call
        return None

    def _ph_tensor(self, device) -> Tensor:
        return torch.tensor(self._placeholder_ids, device=device)

    def _after_lm(self, module, args, kwargs, output):
        if self._call.keep is not None and self._prefill is not None:
            cache = getattr(output, "past_key_values", None)
            self._prefill.cache = weakref.ref(cache) if cache is not None else None
        return None

    def _decoding(self, cache) -> _Prefill | None:
        """The pruned prefill whose KV cache this call extends, if any."""
        p = self._prefill
        if self._call.prune or p is None or p.cache is None or cache is None:
            return None
        return p if p.cache() is cache else None

    # ------------------------------------------------------------------------------------------- selection
    def _image_runs(self, input_ids: Tensor) -> list[list[tuple[int, int]]]:
        """Per row, the (start, length) of every image/video run of placeholder tokens; rows must agree."""
        is_ph = torch.isin(input_ids, self._ph_tensor(input_ids.device)).cpu()
        runs_per_row = []
        for b in range(is_ph.shape[0]):
            row = is_ph[b].to(torch.int8)
            edges = torch.diff(row, prepend=row.new_zeros(1), append=row.new_zeros(1))
            starts = (edges == 1).nonzero().flatten().tolist()
            ends = (edges == -1).nonzero().flatten().tolist()
            runs = []
            for s, e in zip(starts, ends):
                n = e - s
                # LLaVA-1.5 images placed back to back form one run; its images all have image_seq_length tokens.
                if self._chunk and n > self._chunk and n % self._chunk == 0:
                    runs += [(s + c, self._chunk) for c in range(0, n, self._chunk)]
                else:
                    runs.append((s, n))
            runs_per_row.append(runs)
        layout = [n for _, n in runs_per_row[0]]
        for b, runs in enumerate(runs_per_row[1:], start=1):
            if [n for _, n in runs] != layout:
                raise ValueError(
                    "mob_kernels: every row of a batch must hold the same images (same count and token counts) so "
                    f"that rows prune to the same length; row 0 has image runs {layout}, row {b} has "
                    f"{[n for _, n in runs]}. Run such rows in separate batches."
                )
        return runs_per_row

    def _prompt(self, feats: Tensor, runs, valid: Tensor):
        """The prompt: the text after the row's last image, padding excluded, right-aligned in a ``[B, Lp]`` block:
        (positions ``[B, Lp]`` or None, rows ``[B, Lp, d]``, mask ``[B, Lp]``)."""
        B, L, _ = feats.shape
        dev = feats.device
        ends = [runs[b][-1][0] + runs[b][-1][1] if runs[b] else 0 for b in range(B)]
        lp = max(L - e for e in ends) if ends else 0
        if not lp:
            return None, feats.new_zeros(B, 0, feats.shape[-1]), torch.zeros(B, 0, dtype=torch.bool, device=dev)
        p_idx = torch.arange(L - lp, L, device=dev).expand(B, lp)
        after = torch.stack([torch.arange(L - lp, L, device=dev) >= ends[b] for b in range(B)])
        return p_idx, _index_seq(feats, p_idx), after & torch.gather(valid, 1, p_idx)

    def _select(self, feats: Tensor, input_ids: Tensor, mask2d: Tensor | None, hidden: Tensor | None = None,
                position_embeddings=None) -> Tensor:
        """Choose the kept positions ``[B, L']`` of a prefill from ``feats`` ``[B, L, d]`` (MoB, DivPrune, CDPruner);
        records what was kept. ``hidden``/``position_embeddings``: the pruning layer's inputs (MoB's released
        anchors read that layer's keys)."""
        t0 = time.perf_counter()
        B, L, _ = feats.shape
        dev = feats.device
        runs = self._image_runs(input_ids)
        keep_mask = ~torch.isin(input_ids, self._ph_tensor(input_ids.device)).to(dev)
        valid = mask2d.to(dev).bool() if mask2d is not None else torch.ones(B, L, dtype=torch.bool, device=dev)
        p_idx, prompt, p_mask = self._prompt(feats, runs, valid)
        key_norms = None
        if self.anchors == "released" and p_idx is not None and hidden is not None:
            cos, sin = position_embeddings
            pe = (_index_tokens(cos, p_idx), _index_tokens(sin, p_idx))
            keys = layer_keys(self._lm.layers[self.layer], _index_seq(hidden, p_idx), pe)  # [B, H_kv, Lp, hd]
            key_norms = keys.float().abs().sum(dim=(1, 3))  # L1 over the heads' concatenation

        records: list[list[KeptImage]] = [[] for _ in range(B)]
        for j, (_, n) in enumerate(runs[0] if runs else []):
            k = _resolve_budget(self.budget, n)
            starts = torch.tensor([runs[b][j][0] for b in range(B)], device=dev)
            v_idx = starts.unsqueeze(1) + torch.arange(n, device=dev)
            vis = _index_seq(feats, v_idx)
            picks, roles, relevance, extra = self._choose(vis, prompt, p_mask, k, key_norms)
            keep_mask.scatter_(1, torch.gather(v_idx, 1, picks), True)
            if self.record:
                names = ROLES[self.method]
                for b in range(B):
                    role = tuple(names[int(r)] for r in roles[b])
                    rec = KeptImage(
                        row=b, image=j, start=int(starts[b]), num_tokens=n, indices=picks[b].cpu(),
                        from_prompt=torch.tensor([r == "prompt" for r in role], dtype=torch.bool),
                        method=self.method, roles=role,
                        relevance=None if relevance is None else relevance[b].gather(0, picks[b]).cpu(),
                    )
                    if extra is not None:  # released anchors: their positions in the row and folds
                        rows, folds = extra
                        ok = rows[b] >= 0
                        rec.anchors = p_idx[b].gather(0, rows[b][ok]).cpu()
                        rec.folds = folds[b][ok].cpu()
                    records[b].append(rec)
        keep = keep_mask.nonzero()[:, 1].view(B, -1)
        self.kept = records
        self._begin_prefill(L, keep, self.layer if self.mode == "layer" else 0)
        self.selection_seconds += time.perf_counter() - t0
        return keep

    def _begin_prefill(self, length: int, keep: Tensor, layer: int) -> None:
        self.keep_index = keep
        dropped = (length - keep.shape[1]) * torch.ones(keep.shape[0], dtype=torch.long, device=keep.device)
        self._prefill = _Prefill(length=length, keep=keep, dropped=dropped, cache=None, stages=[(layer, keep)])
        self._call.keep = keep

    def _choose(self, vis: Tensor, prompt: Tensor, p_mask: Tensor, k: int, key_norms: Tensor | None = None):
        """One image's kept indices ``[B, k]`` (sorted) by the handle's method; with ``record``, also each pick's role
        (``[B, k]``, an index into ``ROLES[method]``), for CDPruner the relevance ``[B, N]``, and for MoB's released
        anchors (anchor rows, folds)."""
        args = mob_kernels.budget_arguments(_OPS[self.method], k)
        relevance = roles = extra = None
        if self.method == "mob":
            k_p = args["k_p"] if self.prompt_budget is None else _resolve_prompt_budget(self.prompt_budget, k)
            if self.anchors == "released":
                B = vis.shape[0]
                if key_norms is None:
                    key_norms = torch.zeros(B, prompt.shape[1], device=vis.device)
                cover, count, rows, folds = released_cover(vis, prompt, p_mask, key_norms, k_p)
                extra = (rows, folds)
                n_fps = k - count  # every sample keeps exactly k (the released code keeps |S_p| + k - k_p)
                more = mob_kernels.farthest_point_sample(vis, int(n_fps.max()) if B else 0, seed=cover,
                                                         backend=self.backend)
                more = torch.where(torch.arange(more.shape[1], device=vis.device) < n_fps.unsqueeze(1), more, -1)
                chosen = torch.zeros(B, vis.shape[1] + 1, dtype=torch.bool, device=vis.device)
                for part in (cover, more):
                    chosen.scatter_(1, torch.where(part >= 0, part, vis.shape[1]), True)
                picks = chosen[:, :-1].nonzero()[:, 1].view(B, k)
                roles = (~_isin_rows(picks, cover)).long()
            else:
                picks = mob_kernels.select(vis, prompt, k_p, args["k"], fold=self.fold, prompt_mask=p_mask,
                                           backend=self.backend)
                if self.record:
                    cover, _ = mob_kernels.prompt_cover(vis, prompt, k_p, fold=self.fold, prompt_mask=p_mask,
                                                        backend=self.backend)
                    roles = (~_isin_rows(picks, cover)).long()
        elif self.method == "divprune":
            picks = mob_kernels.divprune(vis, args["k"], backend=self.backend)
            if self.record:
                P = self._primitives(vis)
                first = most_isolated(P.gram(vis), torch.isfinite(vis).all(dim=-1))
                roles = (picks != first.unsqueeze(1)).long()
        else:
            relevance = mob_kernels.cdpruner_relevance(vis, prompt, p_mask)
            picks = mob_kernels.cdpruner(vis, relevance, args["k"], backend=self.backend)
            if self.record:
                ok = torch.isfinite(vis).all(dim=-1) & torch.isfinite(relevance)
                order, _ = self._primitives(vis).dpp_greedy(vis, relevance, ok, args["k"])
                roles = (~_isin_rows(picks, order)).long()
        return picks, roles, relevance, extra

    def _primitives(self, vis: Tensor):
        """The backend object behind ``self.backend`` for ``vis``'s device (for the records' roles)."""
        from mob_kernels.registry import get_backend

        return get_backend(mob_kernels.resolve_backend(self.backend, vis.device))

    def _compact_positions(self, pos: Tensor, keep: Tensor, length: int) -> Tensor:
        """Original 1-D positions ``[B, L]`` of the kept tokens, minus the tokens dropped before each of them."""
        B = keep.shape[0]
        kept = torch.zeros(B, length, dtype=torch.long, device=keep.device).scatter_(1, keep, 1)
        dropped_before = torch.cumsum(1 - kept, dim=1)
        return _index_last(pos, keep) - torch.gather(dropped_before, 1, keep).to(pos.device)

    # ------------------------------------------------------------------------------- layouts and attention
    def _image_layout(self, runs, b: int, j: int, n: int) -> tuple[Any, _layout.ImageLayout | None]:
        """(cache key, layout) of image ``j`` of row ``b`` (``n`` tokens); the layout is None when the model's
        arguments do not describe it."""
        call = self._call
        if self.model_type == "llava":
            key: Any = ("square", n)
            if key not in self._layouts:
                self._layouts[key] = _layout.square_layout(n)
            return key, self._layouts[key]
        start = runs[b][j][0]
        if self.model_type == "llava_next":
            sizes = call.layout.get("image_sizes")
            if sizes is None:
                return ("none", n), None
            size = sizes[b * len(runs[b]) + j].cpu()
            key = ("next", n, tuple(int(x) for x in size))
            if key not in self._layouts:
                self._layouts[key] = _layout.llava_next_layout(self._base, size, n)
            return key, self._layouts[key]
        video = self._video_id is not None and int(call.input_ids[b, start]) == int(self._video_id)
        grids = call.layout.get("video_grid_thw" if video else "image_grid_thw")
        if grids is None:
            return ("none", n), None
        same = [int(call.input_ids[b, s]) == int(call.input_ids[b, start]) for s, _ in runs[b]]
        thw = grids[b * sum(same) + sum(same[:j])].cpu()
        key = ("qwen", n, tuple(int(x) for x in thw))
        if key not in self._layouts:
            merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 2))
            self._layouts[key] = _layout.qwen_layout(thw, merge, n)
        return key, self._layouts[key]

    def _make_key_hook(self, index: int):
        def hook(module, args, output):
            cap = self._call.capture.get(index)
            if cap is not None and cap.keys is None and output.shape[1] == cap.hidden.shape[1]:
                cap.keys = output

        return hook

    def _last_attention(self, index: int) -> tuple[Tensor, Tensor]:
        """The last prompt token's attention (probabilities, logits ``[B, H, L_cur]``) at layer ``index - 1`` in this
        prefill, over the tokens entering it."""
        call = self._call
        cap = call.capture.pop(index - 1, None)
        if cap is None or cap.keys is None or cap.position_embeddings is None:
            raise RuntimeError(f"mob_kernels: decoder layer {index - 1}'s inputs or keys were not seen in this prefill "
                               "(the last-token attention needs the layer to receive position_embeddings and to call "
                               "its k_proj)")
        B, L_cur, _ = cap.hidden.shape
        valid = None
        if call.mask2d is not None:
            valid = call.mask2d.to(cap.hidden.device).bool()
            if cap.keep is not None:
                valid = torch.gather(valid, 1, cap.keep.to(valid.device))
        q_idx = _last_valid(valid, B, L_cur, cap.hidden.device)
        probs, logits = last_token_attention(self._lm.layers[index - 1], cap.hidden, cap.keys,
                                             cap.position_embeddings, q_idx, valid)
        if self.record:
            self.attention[index - 1] = probs
            self.attention_logits[index - 1] = logits
        return probs, logits

    # ------------------------------------------------------------------------------------------- D2Pruner
    def _select_d2pruner(self, index: int, hidden: Tensor) -> Tensor:
        """D2Pruner before layer ``index``: the kept positions ``[B, L']`` (the first and only stage)."""
        t0 = time.perf_counter()
        call = self._call
        input_ids = call.input_ids
        B, L, _ = hidden.shape
        dev = hidden.device
        runs = self._image_runs(input_ids)
        probs, _ = self._last_attention(index)
        importance = probs.mean(dim=1)  # heads averaged, contract §3.4
        keep_mask = ~torch.isin(input_ids, self._ph_tensor(input_ids.device)).to(dev)
        opts = self.d2pruner_options
        records: list[list[KeptImage]] = [[] for _ in range(B)]
        for j, (_, n) in enumerate(runs[0] if runs else []):
            k = _resolve_budget(self.budget, n)
            starts = torch.tensor([runs[b][j][0] for b in range(B)], device=dev)
            v_idx = starts.unsqueeze(1) + torch.arange(n, device=dev)
            vis = _index_seq(hidden, v_idx)
            imp = torch.gather(importance, 1, v_idx)
            keys, layouts = zip(*(self._image_layout(runs, b, j, n) for b in range(B)))
            grid = torch.stack([lay.op_grid() if lay is not None else
                                torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long),
                                             torch.zeros(n, dtype=torch.long)], -1) for lay in layouts]).to(dev)
            bias = None
            if self.bias is not None:
                bias = torch.stack([self._bias_for(key, lay, n) for key, lay in zip(keys, layouts)]).to(dev)
            keep_j, role = mob_kernels.d2pruner(vis, imp, k, bias=bias, grid=grid, backend=self.backend, **opts)
            keep_mask.scatter_(1, torch.gather(v_idx, 1, keep_j), True)
            if self.record:
                names = ROLES["d2pruner"]
                for b in range(B):
                    lay = layouts[b]
                    records[b].append(KeptImage(
                        row=b, image=j, start=int(starts[b]), num_tokens=n, indices=keep_j[b].cpu(),
                        from_prompt=torch.zeros(k, dtype=torch.bool), method="d2pruner",
                        roles=tuple(names[int(r)] for r in role[b]), importance=imp[b].gather(0, keep_j[b]).cpu(),
                        grid=None if lay is None else lay.grid, tiles=() if lay is None else lay.tiles,
                    ))
        keep = keep_mask.nonzero()[:, 1].view(B, -1)
        self.kept = records
        self._begin_prefill(L, keep, index)
        self.selection_seconds += time.perf_counter() - t0
        return keep

    def _bias_for(self, key, lay: _layout.ImageLayout | None, n: int) -> Tensor:
        if lay is None:
            raise ValueError(f"mob_kernels: a D2Pruner bias map needs the image's grid, but the model's arguments do "
                             f"not describe the layout of an image with {n} tokens")
        if key not in self._biases:
            self._biases[key] = _layout.resample_map(self.bias, lay)
        return self._biases[key]

    # ------------------------------------------------------------------------------------------------ BTP
    def _select_btp(self, index: int, hidden: Tensor) -> Tensor:
        """The BTP stage before layer ``index``: indices ``[B, L_new]`` into the current sequence (sorted; with
        ``released=True`` a token may appear twice)."""
        from mob_kernels.methods.btp import attention_picks, btp_stage_as_released
        from mob_kernels.methods.common import usable

        t0 = time.perf_counter()
        s = self._stage_number[index]
        stage = self.schedule[s]
        call = self._call
        input_ids = call.input_ids
        B, L_cur, _ = hidden.shape
        L = input_ids.shape[1]
        dev = hidden.device
        runs = self._image_runs(input_ids)
        cur = call.keep.to(dev) if call.keep is not None else torch.arange(L, device=dev).expand(B, L)
        scores = None
        if stage["keep"] != 0:
            probs, logits = self._last_attention(index)
            scores = logits if self.attention_scores == "logits" else probs
        in_any = torch.zeros(B, L_cur, dtype=torch.bool, device=dev)
        parts = []
        stage_records = []
        for j, (_, n0) in enumerate(runs[0] if runs else []):
            starts = torch.tensor([runs[b][j][0] for b in range(B)], device=dev).unsqueeze(1)
            in_img = (cur >= starts) & (cur < starts + n0)
            in_any |= in_img
            n = int(in_img[0].sum())
            pos = in_img.nonzero()[:, 1].view(B, n)  # where the image's current tokens sit in the current sequence
            local = cur.gather(1, pos) - starts  # their indices among the image's own tokens
            _, lay = self._image_layout(runs, 0, j, n0)
            first_tile = lay.tiles[0][0] * lay.tiles[0][1] if lay is not None else n0
            a = _stage_arguments(stage, n, n0, first_tile)
            k = a["k"]
            if k == 0 or scores is None:
                picks = torch.empty(B, 0, dtype=torch.int64, device=dev)
            else:
                h_img = _index_seq(hidden, pos)
                a_img = torch.gather(scores, 2, pos.unsqueeze(1).expand(-1, scores.shape[1], -1))  # [B, H, n]
                seed = None
                if a.get("spatial_seed", 0) > 0:
                    if not torch.equal(local, local[:1].expand_as(local)):
                        raise NotImplementedError("mob_kernels: a BTP spatial seed after rows have kept different "
                                                  "tokens (the op takes one seed for the batch); seed the first stage")
                    cells = _layout.spatial_seed_in_first_tile(lay, n0, a["spatial_seed"]).to(dev)
                    hit = local[0].unsqueeze(0) == cells.unsqueeze(1)  # seed cells still present, in seed order
                    seed = hit.float().argmax(1)[hit.any(1)]
                kwargs = dict(mode=a["mode"], n_div=a.get("n_div", 0), n_attn=a.get("n_attn", 0),
                              n_extra=a.get("n_extra", 0), rebalance=a.get("rebalance"), seed=seed)
                if self.released:
                    if B != 1:
                        raise ValueError(f"mob_kernels: BTP with released=True runs batch size 1 (the released code's);"
                                         f" got a batch of {B}")
                    model = "qwen2_5_vl" if self._mrope else "llava"
                    picks = btp_stage_as_released(h_img[0], a_img[0], k, model=model, **kwargs).unsqueeze(0)
                else:
                    picks = mob_kernels.btp_stage(h_img, a_img, k, backend=self.backend, **kwargs)
            parts.append(pos.gather(1, picks))
            if self.record:
                names = ROLES["btp"]
                role = torch.full_like(picks, 2)
                if k:
                    if a["mode"] == "attn_only":
                        role[:] = 0
                    else:
                        ok = usable(h_img, None)
                        score = a_img.float().mean(dim=1)
                        if a["mode"] == "union":
                            rebalance = a.get("rebalance")
                            att = attention_picks(score, a.get("n_attn", 0), a.get("n_extra", 0),
                                                  -1 if rebalance is None else rebalance, ok)
                        else:
                            m = min(a.get("n_attn", 0), k)
                            att = attention_picks(score, m, m, -1, ok)
                        if seed is not None:
                            role = torch.where(_isin_rows(picks, seed.unsqueeze(0).expand(B, -1)), 1, role)
                        role = torch.where(_isin_rows(picks, att), 0, role)
                for b in range(B):
                    stage_records.append((b, j, KeptStage(
                        layer=index, num_in=n, k=k, indices=local[b].gather(0, picks[b]).cpu(),
                        roles=tuple(names[int(r)] for r in role[b]), num_tokens=n0,
                        tiles=() if lay is None else lay.tiles)))
        parts.insert(0, (~in_any).nonzero()[:, 1].view(B, -1))  # the text: always kept
        new_local = torch.sort(torch.cat(parts, dim=1), dim=1).values
        keep = cur.gather(1, new_local)
        if s == 0 or self._prefill is None or call.keep is None:
            self._begin_prefill(L, keep, index)
            self.kept = [[] for _ in range(B)]
            if self.record:
                for b, j, st in stage_records:
                    grid_lay = self._image_layout(runs, b, j, st.num_tokens)[1]
                    self.kept[b].append(KeptImage(
                        row=b, image=j, start=runs[b][j][0], num_tokens=st.num_tokens, indices=st.indices,
                        from_prompt=torch.zeros(len(st.indices), dtype=torch.bool), method="btp", roles=st.roles,
                        grid=None if grid_lay is None else grid_lay.grid,
                        tiles=() if grid_lay is None else grid_lay.tiles, stages=[st]))
        else:
            self._prefill.stages.append((index, keep))
            call.keep = keep
            for b, j, st in stage_records:
                self.kept[b][j].stages.append(st)
        self.selection_seconds += time.perf_counter() - t0
        return new_local

    # ------------------------------------------------------------------------------------------- input mode
    def _on_lm(self, module, args, kwargs):
        if self.mode != "input":
            return None
        embeds = kwargs.get("inputs_embeds")
        call = self._call
        if embeds is None:
            return None
        pos = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, Tensor) and mask.dim() == 2):
            raise NotImplementedError("mob_kernels input mode needs a 2-D attention_mask (or None)")
        B, q = embeds.shape[:2]
        if call.prune and call.input_ids is not None and call.input_ids.shape[1] == q:
            keep = self._select(embeds, call.input_ids, mask)
            if pos is None:
                pos = torch.arange(q, device=embeds.device).unsqueeze(0).expand(B, q)
                if self._mrope:
                    pos = pos.unsqueeze(0).expand(3, B, q)
            new_pos = (self._compact_positions(pos, keep, q) if self.positions == "compact"
                       else _index_last(pos, keep))
            # An explicit mask of ones: with gaps in the positions and no mask, 5.x would read the batch as packed.
            new_mask = (torch.gather(mask, 1, keep.to(mask.device)) if mask is not None
                        else torch.ones(keep.shape, dtype=torch.long, device=embeds.device))
            kwargs.update(inputs_embeds=_index_seq(embeds, keep), position_ids=new_pos, attention_mask=new_mask)
            return args, kwargs
        p = self._decoding(kwargs.get("past_key_values"))
        if p is None:
            return None
        cached = kwargs["past_key_values"].get_seq_length()  # L' + t
        if mask is not None:
            new_mask = torch.cat([torch.gather(mask, 1, p.keep.to(mask.device)), mask[:, p.length:]], dim=1)
        else:
            new_mask = torch.ones(B, cached + q, dtype=torch.long, device=embeds.device)
        if pos is None:
            # The model would count from the cache (L' + t); the original numbering continues from L + t.
            pos = (cached + torch.arange(q, device=embeds.device)).unsqueeze(0).expand(B, q)
            if self.positions == "keep":
                pos = pos + p.dropped.to(pos.device).unsqueeze(1)
            if self._mrope:
                pos = pos.unsqueeze(0).expand(3, B, q)
        elif self.positions == "compact":
            pos = pos - p.dropped.to(pos.device).unsqueeze(1)
        kwargs.update(position_ids=pos, attention_mask=new_mask)
        return args, kwargs

    # ------------------------------------------------------------------------------------------- layer mode
    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            return self._on_layer(index, args, kwargs)

        return hook

    def _prune_at(self, index: int, hidden: Tensor, kwargs) -> Tensor:
        """Run the stage before layer ``index`` on the current sequence: indices ``[B, L_new]`` into it."""
        call = self._call
        if self.method == "d2pruner":
            return self._select_d2pruner(index, hidden)
        if self.method == "btp":
            return self._select_btp(index, hidden)
        return self._select(self._lm.norm(hidden), call.input_ids, call.mask2d, hidden,
                            kwargs.get("position_embeddings"))

    def _on_layer(self, index: int, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        call = self._call
        memo = call.memo
        prefill = False
        if call.prune and call.input_ids is not None:
            current = call.input_ids.shape[1] if call.keep is None else call.keep.shape[1]
            prefill = hidden.shape[1] == current
        replaced = False
        if prefill and index in self._stage_number and index not in call.done:
            call.done.add(index)
            hidden = _index_seq(hidden, self._prune_at(index, hidden, kwargs))
            replaced = True
            memo.clear()
        if prefill and call.keep is not None:
            self._remap_prefill(kwargs, call.keep, memo, hidden)
            replaced = True
        elif not call.prune:
            p = self._decoding(kwargs.get("past_key_values"))
            if p is not None:
                keep, stage = p.keep_at(index)
                if keep is not None:
                    self._remap_decode(kwargs, p, keep, stage, memo, hidden)
                    replaced = True
        if prefill and index in self._attention_layers:
            call.capture[index] = _Capture(hidden, kwargs.get("position_embeddings"), call.keep)
        if not replaced:
            return None
        if args:
            args = (hidden,) + tuple(args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    def _memo(self, memo: dict, key: str, x, fn):
        """Every layer of a stage gets the same mask / cos / sin objects: gather each once per forward call."""
        if x is None:
            return None
        hit = memo.get(key)
        if hit is not None and hit[0] is x:
            return hit[1]
        out = fn(x)
        memo[key] = (x, out)
        return out

    def _remap_prefill(self, kwargs, keep: Tensor, memo: dict, hidden: Tensor) -> None:
        L = self._prefill.length

        def mask_fn(m):
            if m.dim() == 4:  # [B, 1, q, kv]: rows and key columns follow the kept tokens
                m = m.expand(keep.shape[0], *m.shape[1:])
                idx = keep.to(m.device)
                rows = idx.view(idx.shape[0], 1, -1, 1).expand(-1, m.shape[1], -1, m.shape[3])
                m = torch.gather(m, 2, rows)
                cols = idx.view(idx.shape[0], 1, 1, -1).expand(-1, m.shape[1], m.shape[2], -1)
                return torch.gather(m, 3, cols)
            if m.dim() == 2:
                return torch.gather(m, 1, keep.to(m.device))
            raise NotImplementedError(f"mob_kernels: unexpected attention mask of shape {tuple(m.shape)}")

        kwargs["attention_mask"] = self._memo(memo, "mask", kwargs.get("attention_mask"), mask_fn)
        pos = kwargs.get("position_ids")
        if self.positions == "compact":
            new_pos = self._memo(memo, "pos", pos, lambda x: self._compact_positions(x, keep, L))
            kwargs["position_ids"] = new_pos
            kwargs["position_embeddings"] = self._memo(
                memo, "rope", new_pos, lambda x: self._lm.rotary_emb(hidden, x))
        else:
            kwargs["position_ids"] = self._memo(memo, "pos", pos, lambda x: _index_last(x, keep.to(x.device)))
            cs = kwargs.get("position_embeddings")
            if cs is not None:
                kwargs["position_embeddings"] = self._memo(
                    memo, "rope", cs, lambda t: tuple(_index_tokens(c, keep) for c in t))

    def _remap_decode(self, kwargs, p: _Prefill, keep: Tensor, stage: int, memo: dict, hidden: Tensor) -> None:
        def mask_fn(m):
            # Masks are sized from layer 0's cache (L + t + q keys); this layer holds L_s + t + q of them.
            idx = torch.cat([keep.to(m.device), torch.arange(p.length, m.shape[-1], device=m.device)
                             .unsqueeze(0).expand(keep.shape[0], -1)], dim=1)
            if m.dim() == 4:
                m = m.expand(idx.shape[0], *m.shape[1:])
                cols = idx.view(idx.shape[0], 1, 1, -1).expand(-1, m.shape[1], m.shape[2], -1)
                return torch.gather(m, 3, cols)
            if m.dim() == 2:
                return torch.gather(m, 1, idx)
            raise NotImplementedError(f"mob_kernels: unexpected attention mask of shape {tuple(m.shape)}")

        kwargs["attention_mask"] = self._memo(memo, f"mask{stage}", kwargs.get("attention_mask"), mask_fn)
        if self.positions == "compact":
            pos = kwargs.get("position_ids")
            if pos is None:
                raise NotImplementedError("mob_kernels: positions='compact' needs position_ids at decode")
            new_pos = self._memo(memo, "pos", pos, lambda x: x - p.dropped.to(x.device).unsqueeze(1))
            kwargs["position_ids"] = new_pos
            kwargs["position_embeddings"] = self._memo(
                memo, "rope", new_pos, lambda x: self._lm.rotary_emb(hidden, x))


# --------------------------------------------------------------------------------------------------------- front door


def _check_d2pruner_options(pivot_ratio, threshold, alpha, radius) -> dict:
    opts = {}
    for name, value, low, high in (("pivot_ratio", pivot_ratio, 0.0, 1.0), ("threshold", threshold, -1.0, 2.0),
                                   ("alpha", alpha, 0.0, 1.0)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
            raise ValueError(f"{name} must be a number in [{low}, {high}], got {name}={value!r}")
        opts[name] = float(value)
    if radius is not None:
        if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
            raise ValueError(f"radius must be an int >= 0, got radius={radius!r}")
        opts["radius"] = radius
    return opts


def apply_pruning(
    model,
    method: str = "mob",
    *,
    budget: int | float | None = None,
    prompt_budget: int | float | None = None,
    fold: int | None = None,
    layer: int | None = None,
    mode: str | None = None,
    positions: str | None = None,
    backend: str = "auto",
    record: bool = True,
    anchors: str = "all",
    bias: Tensor | str | os.PathLike | None = None,
    pivot_ratio: float | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    radius: int | None = None,
    schedule=None,
    released: bool = False,
    attention_scores: str | None = None,
) -> PruningHandle:
    """Prune each image's visual tokens inside ``model`` (a transformers 5.x LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or
    Qwen2.5-VL ``...ForConditionalGeneration``) with ``method``. Returns a :class:`PruningHandle`;
    ``handle.remove()`` undoes it.

    ``method``: ``"mob"`` (``mob_kernels.select``), ``"divprune"`` (``mob_kernels.divprune``), ``"cdpruner"``
    (``mob_kernels.cdpruner`` with ``mob_kernels.cdpruner_relevance``), ``"d2pruner"`` (``mob_kernels.d2pruner``) or
    ``"btp"`` (``mob_kernels.btp_stage``, one call per stage). Defaults follow each paper: MoB prunes before decoder
    layer ``layer`` and keeps the original positions; DivPrune and CDPruner prune the projector output before the first
    layer (``mode="input"``) and number the kept tokens contiguously (``positions="compact"``; on Qwen's M-RoPE, which
    has no contiguous equivalent, they keep the original grid positions). ``mode`` and ``positions`` override these for
    those three. D2Pruner and BTP read the model's attention: layer mode and original positions only.

    CDPruner's relevance is approximated with the model's own tensors: the released code takes the negative mean
    cosine between CLIP's projected image embeddings and CLIP's text embeddings of the instruction; these models carry
    no CLIP text tower, so here the image side is the features the selection runs on (the projector output in input
    mode, the normed hidden states entering ``layer`` in layer mode) and the text side is the same features of the
    prompt's tokens (the text after the row's last image), i.e. the language model's space instead of CLIP's. The DPP's
    similarity is taken on the same image features (the released code uses the vision tower's).

    ``budget``: tokens kept per image (an int, clipped to the image's token count, or a float keep-ratio; default 64;
    not BTP's, whose counts come from ``schedule``). ``prompt_budget`` (MoB only): how many of them cover the prompt
    (int, float ratio of ``budget``, or None: the package's rule). ``fold`` (MoB only): neighbours per prompt token
    (None: ``ceil(K_p / prompt length)``). ``layer``: the 0-based decoder layer before which layer-mode pruning happens
    (default 2: layers 0 and 1 see every token). ``mode``: ``"layer"`` or ``"input"``. ``positions``: ``"keep"`` or
    ``"compact"``. ``backend``: passed to the selection op. ``record``: keep per-image records of what was kept and why
    (``handle.kept``; costs one extra pass of the method's first stage per image, and keeps the last-token attention
    in ``handle.attention``).

    ``anchors`` (MoB): ``"all"`` (the paper: every prompt row nominates ``fold`` tokens) or ``"released"`` (the released
    code's: the 8 prompt rows with the largest L1 norm of layer ``layer``'s post-rotary keys, each nominating a share
    of ``K_p`` proportional to its norm; :func:`released_cover`; layer mode only; ``fold`` is then derived). Either
    way exactly ``budget`` tokens are kept (the released code keeps ``|S_p| + K - K_p``).

    D2Pruner (contract §3.4): features = the image tokens' hidden states entering ``layer`` (>= 1), importance = the
    last prompt token's attention at ``layer - 1`` (heads averaged), ``grid`` from the model's image layout
    (``mob_kernels.integrations.layout``; LLaVA-NeXT's newline tokens are candidates without spatial neighbours).
    ``bias``: a 2-D per-tile attention map (``calibrate_attention_bias``) or a file saved by ``save_attention_bias``,
    resampled to each image's tiles; None divides by nothing (the importance is used as is). ``pivot_ratio``,
    ``threshold``, ``alpha``, ``radius``: the op's (None: its defaults 0.7, 0.8, 1.0, 1).

    BTP (contract §3.5): ``schedule`` = None (the model's default plan, ``mob_kernels.integrations.schedule``), a key
    of ``mob_kernels.methods.btp.SCHEDULES`` or a list of stage dicts (1-based ``layer`` = prune before that decoder
    layer, ``keep``, ``mode``, counts; ints or expressions in ``n``, ``k``, ``N``, ``T``). ``attention_scores``:
    ``"logits"`` (pre-softmax, heads averaged) or ``"softmax"``; None follows the released code (logits for LLaVA
    models, softmax for Qwen). ``released=True`` runs ``btp_stage_as_released`` instead of the op (batch size 1): it
    may keep more than ``keep`` tokens, or a token twice (the released code's bugs), and the layers after such a stage
    then hold that many prefill entries in their KV cache (text + everything it kept, duplicates included).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got method={method!r}")
    _check_transformers_version()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"apply_pruning supports model_type in {SUPPORTED_MODEL_TYPES} (LlavaForConditionalGeneration, "
            f"LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration); "
            f"got {type(model).__name__} with model_type={model_type!r}"
        )
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise UnsupportedModelError(
            "apply_pruning needs the ...ForConditionalGeneration class (model.model.language_model), "
            f"got {type(model).__name__}"
        )
    mrope = model_type in ("qwen2_vl", "qwen2_5_vl")
    reads_attention = method in _ATTENTION_METHODS
    if mode is None:
        mode = "layer" if method == "mob" or reads_attention else "input"
    if positions is None:
        positions = "keep" if method == "mob" or reads_attention or mrope else "compact"
    if mode not in ("layer", "input"):
        raise ValueError(f"mode must be 'layer' or 'input', got mode={mode!r}")
    if positions not in ("keep", "compact"):
        raise ValueError(f"positions must be 'keep' or 'compact', got positions={positions!r}")
    if reads_attention and (mode, positions) != ("layer", "keep"):
        raise ValueError(f"{method} reads the model's attention inside the language model and keeps the original "
                         f"position ids (as its paper does): mode='layer', positions='keep' only, got mode={mode!r}, "
                         f"positions={positions!r}")
    if positions == "compact" and mrope:
        raise ValueError(
            "positions='compact' is defined for 1-D positions only; Qwen's M-RoPE grid positions have no contiguous "
            "equivalent, use positions='keep'"
        )
    n_layers = len(model.model.language_model.layers)
    if method == "btp":
        if budget is not None or layer is not None:
            raise ValueError("btp's kept counts and layers come from schedule (budget and layer are not its)")
        plan = _normalise_schedule(schedule, model_type, n_layers)
        if attention_scores is None:
            attention_scores = "softmax" if mrope else "logits"
        if attention_scores not in ("softmax", "logits"):
            raise ValueError(f"attention_scores must be 'softmax', 'logits' or None, got {attention_scores!r}")
        if not isinstance(released, bool):
            raise TypeError(f"released must be a bool, got {released!r}")
        layer = plan[0]["index"]
    else:
        plan = None
        if schedule is not None or released or attention_scores is not None:
            raise ValueError(f"schedule, released and attention_scores are BTP's; method={method!r} takes none")
        layer = 2 if layer is None else layer
        low = 1 if method == "d2pruner" else 0
        if isinstance(layer, bool) or not isinstance(layer, int) or not low <= layer < n_layers:
            why = " (D2Pruner reads the attention at the layer before)" if low else ""
            raise ValueError(f"layer must be an int in [{low}, {n_layers}){why}, got layer={layer!r}")
        budget = 64 if budget is None else budget
        _resolve_budget(budget, 1 << 30)  # argument checks only
    if method != "mob" and (prompt_budget is not None or fold is not None or anchors != "all"):
        raise ValueError(f"prompt_budget and fold are MoB's, as is anchors; method={method!r} takes none of them")
    if anchors not in ANCHORS:
        raise ValueError(f"anchors must be one of {ANCHORS}, got anchors={anchors!r}")
    if anchors == "released" and (mode != "layer" or fold is not None):
        raise ValueError("anchors='released' reads the pruning layer's keys (mode='layer') and derives each anchor's "
                         "fold (fold=None)")
    _resolve_prompt_budget(prompt_budget, 1 << 30)
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or fold < 0):
        raise ValueError(f"fold must be None or an int >= 0, got fold={fold!r}")
    d2_opts = _check_d2pruner_options(pivot_ratio, threshold, alpha, radius)
    if method != "d2pruner" and (d2_opts or bias is not None):
        raise ValueError(f"bias, pivot_ratio, threshold, alpha and radius are D2Pruner's; method={method!r} takes none")
    if isinstance(bias, (str, os.PathLike)):
        from .bias import load_attention_bias

        bias = load_attention_bias(bias)
    if bias is not None and (not isinstance(bias, Tensor) or bias.dim() != 2 or not bias.is_floating_point()):
        raise ValueError(f"bias must be a 2-D float map [H, W] (calibrate_attention_bias) or a path to one, got "
                         f"{bias if not isinstance(bias, Tensor) else (bias.dtype, tuple(bias.shape))!r}")
    mob_kernels.resolve_backend(backend, next(model.parameters()).device)
    return PruningHandle(model, method=method, budget=budget, prompt_budget=prompt_budget, fold=fold, layer=layer,
                         mode=mode, positions=positions, backend=backend, record=record, anchors=anchors, bias=bias,
                         d2pruner=d2_opts, schedule=plan, released=released, attention_scores=attention_scores)


def apply_mob(
    model,
    *,
    budget: int | float = 64,
    prompt_budget: int | float | None = None,
    fold: int | None = None,
    layer: int = 2,
    mode: str = "layer",
    positions: str = "keep",
    backend: str = "auto",
    record: bool = True,
    anchors: str = "all",
) -> PruningHandle:
    """``apply_pruning(model, "mob", ...)``: MoB inside ``model``, before decoder layer ``layer`` by default, original
    positions kept. The arguments are :func:`apply_pruning`'s."""
    return apply_pruning(model, "mob", budget=budget, prompt_budget=prompt_budget, fold=fold, layer=layer, mode=mode,
                         positions=positions, backend=backend, record=record, anchors=anchors)


MobHandle = PruningHandle  # the name apply_mob's handle had first
