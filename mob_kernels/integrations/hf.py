"""Visual-token pruning (MoB, DivPrune, CDPruner) inside Hugging Face transformers 5.x vision-language models, through
module hooks only.

What it computes (docs/contract.md §3 applied to a real model): at prefill, every image's (or video's) run of
placeholder tokens is cut to ``budget`` tokens chosen by the method's op (``mob_kernels.select``,
``mob_kernels.divprune``, ``mob_kernels.cdpruner``), with the method's budget rule (``mob_kernels.budget_arguments``):

* layer mode (the MoB paper's): the features are the hidden states entering decoder layer ``layer`` passed through the
  language model's final norm; the prompt is the text after the last image of the row, padding excluded. Layers
  ``>= layer`` then run on the kept tokens only: hidden states, position ids, cos/sin (Qwen's M-RoPE included), the
  attention mask and their KV cache follow the kept tokens; layers ``< layer`` see the whole sequence.
* input mode (DivPrune's and CDPruner's): the same selection on the merged input embeddings (projector output),
  before the first layer.

How it maps onto the models: forward pre-hooks with kwargs on ``model.model`` (to see ``input_ids`` and the 2-D
mask), on ``model.model.language_model`` (input mode, and to find the KV cache) and on ``language_model.layers[i]``
for ``i >= layer`` (layer mode). No modelling file is forked and no weight is touched, so ``handle.remove()``
restores the model exactly.

Prefill and decode: a forward call prunes when its ``input_ids`` hold image/video placeholder ids and its KV cache is
empty (a prefill). A call that extends a cache is a decode step: placeholder ids among its new tokens are ordinary
tokens there (a sampled token may equal the image id; the unhooked model embeds it like any other token), and only
images given with pixels after cached tokens (a multi-turn image prompt) raise ``NotImplementedError``.

Batches: rows must hold the same image layout (the same number of images with the same token counts, anywhere in
the row; left padding is fine) so that every row prunes to the same length; otherwise a ``ValueError`` says so and
the rows have to be run separately. We raise rather than re-pad because re-padding would change the keys every
later layer attends to and the decode positions, which the KV-cache equivalence guarantees rely on.

Positions: ``positions="keep"`` (MoB's default) keeps each kept token's original position, so positions have gaps
and decode steps continue from the original prompt length. ``positions="compact"`` (DivPrune's and CDPruner's
default, as their papers run the language model on the shorter sequence) re-indexes the kept tokens contiguously
(1-D positions only, i.e. LLaVA / LLaVA-NeXT; Qwen's M-RoPE grid positions have no contiguous equivalent, so asking
for it raises there and DivPrune and CDPruner keep the original positions on Qwen).

Versions: ``SUPPORTED_TRANSFORMERS`` is the range the test suite runs on (``make test`` runs the integration tests on
its lowest and highest ends). One adapter spans it: before 5.17 the Qwen rotary embedding returns cos/sin per M-RoPE
axis, ``[3, B, n, d]``, from 5.17 on already recomposed, ``[B, n, d]``; both are gathered along the token axis
(``-2``), so the hooks never look at the version.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import torch
from torch import Tensor

import mob_kernels
from mob_kernels.methods import most_isolated

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
# of rank before the budget, the most relevant remaining tokens.
ROLES = {
    "mob": ("prompt", "fps"),
    "divprune": ("isolated", "diverse"),
    "cdpruner": ("dpp", "relevance"),
}
METHODS = tuple(ROLES)
# The selection op of each method in mob_kernels (and its name for mob_kernels.budget_arguments).
_OPS = {"mob": "select", "divprune": "divprune", "cdpruner": "cdpruner"}


@dataclasses.dataclass
class KeptImage:
    """What was kept of one image (or video) run in one batch row, and why.

    ``indices`` are sorted positions within the image's own tokens (``0 .. num_tokens - 1``, row-major over the
    projector's patch grid); ``roles[i]`` says why ``indices[i]`` was kept (one of ``ROLES[method]``); ``from_prompt``
    marks MoB's prompt-cover picks (all False for the other methods). ``relevance`` (CDPruner) is each kept token's
    relevance to the prompt. ``start`` is where the run begins in the row's unpruned sequence."""

    row: int
    image: int
    start: int
    num_tokens: int
    indices: Tensor
    from_prompt: Tensor
    method: str = "mob"
    roles: tuple[str, ...] = ()
    relevance: Tensor | None = None

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
    keep: Tensor  # [B, L'] sorted positions kept
    dropped: Tensor  # [B] L - L'
    cache: Any  # weakref to the KV cache that holds the pruned prefix (None: not yet known)


@dataclasses.dataclass
class _Call:
    """The current forward call, as seen by the model-level pre-hook."""

    input_ids: Tensor | None = None
    mask2d: Tensor | None = None
    prune: bool = False
    keep: Tensor | None = None  # set once the selection has run in this call
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


class PruningHandle:
    """Returned by :func:`apply_pruning` and :func:`apply_mob`. ``remove()`` takes every hook off; ``kept`` is the
    last prefill's record."""

    def __init__(self, model, *, method="mob", budget, prompt_budget, fold, layer, mode, positions, backend, record):
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
        self.model_type = model.config.model_type
        self.kept: list[list[KeptImage]] = []  # [row][image] of the last pruned prefill
        self.keep_index: Tensor | None = None  # [B, L'] positions kept by the last pruned prefill
        self.selection_seconds = 0.0  # wall time spent in selection (cumulative; reset it freely)
        self._hooks: list = []
        self._call = _Call()
        self._prefill: _Prefill | None = None

        base = model.model
        self._base = base
        self._lm = base.language_model
        cfg = model.config
        ids = [getattr(cfg, "image_token_id", None), getattr(cfg, "image_token_index", None)]
        ids += [getattr(cfg, "video_token_id", None)]
        self._placeholder_ids = sorted({int(i) for i in ids if i is not None})
        self._chunk = int(getattr(cfg, "image_seq_length", 0) or 0) if self.model_type == "llava" else 0
        self._mrope = self.model_type in ("qwen2_vl", "qwen2_5_vl")

        self._hooks.append(base.register_forward_pre_hook(self._on_base, with_kwargs=True))
        self._hooks.append(self._lm.register_forward_pre_hook(self._on_lm, with_kwargs=True))
        self._hooks.append(self._lm.register_forward_hook(self._after_lm, with_kwargs=True))
        if mode == "layer":
            for i in range(layer, len(self._lm.layers)):
                hook = self._lm.layers[i].register_forward_pre_hook(self._make_layer_hook(i), with_kwargs=True)
                self._hooks.append(hook)

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

    def _select(self, feats: Tensor, input_ids: Tensor, mask2d: Tensor | None) -> Tensor:
        """Choose the kept positions ``[B, L']`` of a prefill from ``feats`` ``[B, L, d]``; records what was kept."""
        import time

        t0 = time.perf_counter()
        B, L, _ = feats.shape
        dev = feats.device
        runs = self._image_runs(input_ids)
        keep_mask = ~torch.isin(input_ids, self._ph_tensor(input_ids.device)).to(dev)
        valid = mask2d.to(dev).bool() if mask2d is not None else torch.ones(B, L, dtype=torch.bool, device=dev)

        # The prompt: text after the row's last image, padding excluded, right-aligned in a [B, Lp] block.
        ends = [runs[b][-1][0] + runs[b][-1][1] if runs[b] else 0 for b in range(B)]
        lp = max(L - e for e in ends) if ends else 0
        p_idx = torch.stack([torch.arange(L - lp, L, device=dev) for _ in range(B)]) if lp else None
        if p_idx is not None:
            after = torch.stack([torch.arange(L - lp, L, device=dev) >= ends[b] for b in range(B)])
            p_mask = after & torch.gather(valid, 1, p_idx.clamp_min(0))
            prompt = _index_seq(feats, p_idx.clamp_min(0))
        else:
            p_mask = torch.zeros(B, 0, dtype=torch.bool, device=dev)
            prompt = feats.new_zeros(B, 0, feats.shape[-1])

        records: list[list[KeptImage]] = [[] for _ in range(B)]
        for j, (_, n) in enumerate(runs[0] if runs else []):
            k = _resolve_budget(self.budget, n)
            starts = torch.tensor([runs[b][j][0] for b in range(B)], device=dev)
            v_idx = starts.unsqueeze(1) + torch.arange(n, device=dev)
            vis = _index_seq(feats, v_idx)
            picks, roles, relevance = self._choose(vis, prompt, p_mask, k)
            keep_mask.scatter_(1, torch.gather(v_idx, 1, picks), True)
            if self.record:
                names = ROLES[self.method]
                for b in range(B):
                    role = tuple(names[int(r)] for r in roles[b])
                    records[b].append(KeptImage(
                        row=b, image=j, start=int(starts[b]), num_tokens=n, indices=picks[b].cpu(),
                        from_prompt=torch.tensor([r == "prompt" for r in role], dtype=torch.bool),
                        method=self.method, roles=role,
                        relevance=None if relevance is None else relevance[b].gather(0, picks[b]).cpu(),
                    ))
        keep = keep_mask.nonzero()[:, 1].view(B, -1)
        self.kept = records
        self.keep_index = keep
        self._prefill = _Prefill(length=L, keep=keep, dropped=(L - keep.shape[1]) * torch.ones(B, dtype=torch.long,
                                                                                              device=dev), cache=None)
        self._call.keep = keep
        self.selection_seconds += time.perf_counter() - t0
        return keep

    def _choose(self, vis: Tensor, prompt: Tensor, p_mask: Tensor, k: int):
        """One image's kept indices ``[B, k]`` (sorted) by the handle's method; with ``record``, also each pick's role
        (``[B, k]``, an index into ``ROLES[method]``) and, for CDPruner, the relevance ``[B, N]``."""
        args = mob_kernels.budget_arguments(_OPS[self.method], k)
        relevance = roles = None
        if self.method == "mob":
            k_p = args["k_p"] if self.prompt_budget is None else _resolve_prompt_budget(self.prompt_budget, k)
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
        return picks, roles, relevance

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

    def _on_layer(self, index: int, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        call = self._call
        memo = call.memo
        if index == self.layer and call.prune and call.input_ids is not None and \
                call.input_ids.shape[1] == hidden.shape[1]:
            feats = self._lm.norm(hidden)
            keep = self._select(feats, call.input_ids, call.mask2d)
            hidden = _index_seq(hidden, keep)
            args = (hidden,) + tuple(args[1:]) if args else args
            if not args:
                kwargs["hidden_states"] = hidden
            memo.clear()
        if call.keep is not None:
            self._remap_prefill(kwargs, call.keep, memo, hidden)
            return args, kwargs
        p = self._decoding(kwargs.get("past_key_values"))
        if p is not None:
            self._remap_decode(kwargs, p, memo, hidden)
            return args, kwargs
        return None

    def _memo(self, memo: dict, key: str, x, fn):
        """Every layer gets the same mask / cos / sin objects: gather each once per forward call."""
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

    def _remap_decode(self, kwargs, p: _Prefill, memo: dict, hidden: Tensor) -> None:
        def mask_fn(m):
            # Masks are sized from layer 0's cache (L + t + q keys); layers >= l hold L' + t + q of them.
            idx = torch.cat([p.keep.to(m.device), torch.arange(p.length, m.shape[-1], device=m.device)
                             .unsqueeze(0).expand(p.keep.shape[0], -1)], dim=1)
            if m.dim() == 4:
                m = m.expand(idx.shape[0], *m.shape[1:])
                cols = idx.view(idx.shape[0], 1, 1, -1).expand(-1, m.shape[1], m.shape[2], -1)
                return torch.gather(m, 3, cols)
            if m.dim() == 2:
                return torch.gather(m, 1, idx)
            raise NotImplementedError(f"mob_kernels: unexpected attention mask of shape {tuple(m.shape)}")

        kwargs["attention_mask"] = self._memo(memo, "mask", kwargs.get("attention_mask"), mask_fn)
        if self.positions == "compact":
            pos = kwargs.get("position_ids")
            if pos is None:
                raise NotImplementedError("mob_kernels: positions='compact' needs position_ids at decode")
            new_pos = self._memo(memo, "pos", pos, lambda x: x - p.dropped.to(x.device).unsqueeze(1))
            kwargs["position_ids"] = new_pos
            kwargs["position_embeddings"] = self._memo(
                memo, "rope", new_pos, lambda x: self._lm.rotary_emb(hidden, x))


# --------------------------------------------------------------------------------------------------------- front door


def apply_pruning(
    model,
    method: str = "mob",
    *,
    budget: int | float = 64,
    prompt_budget: int | float | None = None,
    fold: int | None = None,
    layer: int = 2,
    mode: str | None = None,
    positions: str | None = None,
    backend: str = "auto",
    record: bool = True,
) -> PruningHandle:
    """Prune each image's visual tokens inside ``model`` (a transformers 5.x LLaVA-1.5, LLaVA-NeXT, Qwen2-VL or
    Qwen2.5-VL ``...ForConditionalGeneration``) with ``method``. Returns a :class:`PruningHandle`;
    ``handle.remove()`` undoes it.

    ``method``: ``"mob"`` (``mob_kernels.select``), ``"divprune"`` (``mob_kernels.divprune``) or ``"cdpruner"``
    (``mob_kernels.cdpruner`` with ``mob_kernels.cdpruner_relevance``); each spends ``budget`` per image through
    ``mob_kernels.budget_arguments``. Defaults follow each paper: MoB prunes before decoder layer ``layer`` and keeps
    the original positions; DivPrune and CDPruner prune the projector output before the first layer (``mode="input"``)
    and number the kept tokens contiguously (``positions="compact"``; on Qwen's M-RoPE, which has no contiguous
    equivalent, they keep the original grid positions). ``mode`` and ``positions`` override these for any method.

    CDPruner's relevance is approximated with the model's own tensors: the released code takes the negative mean
    cosine between CLIP's projected image embeddings and CLIP's text embeddings of the instruction; these models carry
    no CLIP text tower, so here the image side is the features the selection runs on (the projector output in input
    mode, the normed hidden states entering ``layer`` in layer mode) and the text side is the same features of the
    prompt's tokens (the text after the row's last image), i.e. the language model's space instead of CLIP's. The DPP's
    similarity is taken on the same image features (the released code uses the vision tower's).

    ``budget``: tokens kept per image (an int, clipped to the image's token count, or a float keep-ratio).
    ``prompt_budget`` (MoB only): how many of them cover the prompt (int, float ratio of ``budget``, or None: the
    package's rule). ``fold`` (MoB only): neighbours per prompt token (None: ``ceil(K_p / prompt length)``).
    ``layer``: the decoder layer before which layer-mode pruning happens. ``mode``: ``"layer"`` or ``"input"``.
    ``positions``: ``"keep"`` or ``"compact"``. ``backend``: passed to the selection op. ``record``: keep per-image
    records of what was kept and why (``handle.kept``; costs one extra pass of the method's first stage per image).
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
    if mode is None:
        mode = "layer" if method == "mob" else "input"
    if positions is None:
        positions = "keep" if method == "mob" or mrope else "compact"
    if mode not in ("layer", "input"):
        raise ValueError(f"mode must be 'layer' or 'input', got mode={mode!r}")
    if positions not in ("keep", "compact"):
        raise ValueError(f"positions must be 'keep' or 'compact', got positions={positions!r}")
    if positions == "compact" and mrope:
        raise ValueError(
            "positions='compact' is defined for 1-D positions only; Qwen's M-RoPE grid positions have no contiguous "
            "equivalent, use positions='keep'"
        )
    n_layers = len(model.model.language_model.layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ValueError(f"layer must be an int in [0, {n_layers}), got layer={layer!r}")
    _resolve_budget(budget, 1 << 30)  # argument checks only
    if method != "mob" and (prompt_budget is not None or fold is not None):
        raise ValueError(f"prompt_budget and fold are MoB's; method={method!r} takes neither")
    _resolve_prompt_budget(prompt_budget, 1 << 30)
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or fold < 0):
        raise ValueError(f"fold must be None or an int >= 0, got fold={fold!r}")
    mob_kernels.resolve_backend(backend, next(model.parameters()).device)
    return PruningHandle(model, method=method, budget=budget, prompt_budget=prompt_budget, fold=fold, layer=layer,
                         mode=mode, positions=positions, backend=backend, record=record)


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
) -> PruningHandle:
    """``apply_pruning(model, "mob", ...)``: MoB inside ``model``, before decoder layer ``layer`` by default, original
    positions kept. The arguments are :func:`apply_pruning`'s."""
    return apply_pruning(model, "mob", budget=budget, prompt_budget=prompt_budget, fold=fold, layer=layer, mode=mode,
                         positions=positions, backend=backend, record=record)


MobHandle = PruningHandle  # the name apply_mob's handle had first
