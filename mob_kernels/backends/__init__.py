"""The backend axis: what a backend provides, and the backends this package ships.

A backend is a set of *primitives* on checked, batched inputs (``Backend`` below). Every selection method is written
once as a composition of these primitives (``mob_kernels/methods``); run over ``reference``'s plain-torch primitives
that composition *is* the method's contract. A backend may also provide a *fused* implementation of a whole method
(a function named after the method, with the method's batched signature), which the registry prefers; fused
implementations are optional speed-ups and are tested against the composition.

What every primitive may assume (``mob_kernels/registry.py`` and ``mob_kernels/checks.py`` make it so): features
``[B, N, d]`` (and a prompt ``[B, L, d]``) share a dtype in {float32, float16, bfloat16} and a device, with unit stride
in ``d`` (batch and row strides are free); masks are contiguous bool; index tensors contiguous int64; per-sample
integers contiguous int64 ``[B]``; ``0 <= k <= N``.

Adding a backend: write a class with these methods, then add one ``BackendSpec`` line to ``mob_kernels/registry.py``
(name, device types, auto priority, module). Until a primitive has a native kernel it may delegate to
``ReferenceBackend``'s (plain torch runs on every device).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Backend(Protocol):
    """The primitives every backend implements (docs/contract.md §2 gives their exact semantics)."""

    name: str

    def gram(self, vis: Tensor) -> Tensor:
        """Cosine similarities ``[B, N, N]`` float32: ``v̂_i · v̂_j`` with ``v̂ = v / max(|v|, 1e-12)``."""
        ...

    def prompt_cover(self, vis: Tensor, prompt: Tensor, mask: Tensor, k_p: int, fold: Tensor) -> tuple[Tensor, Tensor]:
        """MoB's prompt cover. ``fold`` ``[B]`` is each sample's resolved neighbour count f (0: no valid prompt row).
        Returns (picks ``[B, k_p]`` by descending covering score, ``-1`` padded; count ``[B]``)."""
        ...

    def farthest_point_sample(
        self, vis: Tensor, seed: Tensor, num_picks: Tensor, k: int, valid: Tensor | None, sim: Tensor | None
    ) -> Tensor:
        """Seeded farthest point sampling on cosine distance. ``seed`` ``[B, m]`` (``-1`` padded) are taken and seed
        the distances (whatever ``valid`` says of them); other tokens where ``valid`` is False are never picked and
        never become centres; ``sim`` (``gram(vis)``, when
        the caller has it) may be read instead of recomputing products. Sample b makes ``min(num_picks[b], k,
        untaken valid)`` picks; returns ``[B, k]`` in selection order, ``-1`` padded."""
        ...

    def dpp_greedy(self, vis: Tensor, relevance: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Greedy MAP of the DPP with kernel ``r_i S_ij r_j`` (S cosine) over the valid tokens, stopping early when
        the best gain falls to the stopping threshold. Returns (order ``[B, k]``, ``-1`` padded after a stop; gain
        ``[B, k]`` float32, 0 after a stop)."""
        ...

    def independent_set(
        self, vis: Tensor, rank: Tensor, num_picks: Tensor, k: int, near: float, far: float, grid: Tensor | None,
        radius: int,
    ) -> Tensor:
        """Greedy maximal independent set on the similarity graph: tokens i, j are adjacent when ``cos(v_i, v_j)``
        exceeds ``near`` (same tile of ``grid`` ``[B, N, 3]`` = (tile, row, col) and Chebyshev distance <= ``radius``)
        or ``far`` (otherwise). Candidates are the tokens with ``rank >= 0``, visited in increasing rank; each one no
        earlier pick is adjacent to is picked, up to ``num_picks[b]``. Returns ``[B, k]`` picks in order, ``-1``
        padded."""
        ...


__all__ = ["Backend"]
