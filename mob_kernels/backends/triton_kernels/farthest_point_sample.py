"""Triton farthest point sampling on cosine distance (SPEC.md §2 step 3), one program per sample for all steps.

Computes, per sample: dist(i) = min over centres c of 1 - v̂_i · v̂_c, with v̂ = v / max(|v|, 1e-12). The seeds (taken,
-1 padded) start the distances; with no seed the first pick is the largest raw norm (NaN lowest). Each step takes the
untaken token with the largest dist -- ties to the lower index, a NaN distance below every finite one and NaN forever
after (min propagates NaN, as torch.minimum does), taken tokens never again -- and folds its distances in.
min(num_picks, untaken) picks in selection order, -1 padded; or, with sorted_union=True, the sorted union of seeds and
picks (what MoB's select returns), and with fill_to_k=True num_picks = k - #distinct seeds (select's budget rule).

Gram matrix vs per-step dot products. Per-step products re-read all N x d features every step from ONE program per
sample: k * N * d * 2 bytes at the ~100-200 GB/s a single SM pulls from L2 -- LLaVA-1.5 (N=576, d=4096, k=64): 300 MB,
~2 ms. The Gram matrix G = V Vᵀ (raw rows, float32 accumulation, upper-triangle tiles mirrored, N² d FLOPs on tensor
cores across the whole GPU; float32 with input_precision="ieee") costs ~2-4 µs there, after which each step reads one
N-float row of G from L2. Gram wins whenever the B * N² * 4-byte workspace fits (ratio ~ 1e4 * k / (B * N) in its
favour), so it is used whenever one sample's Gram fits GRAM_BYTES (1 GiB: N <= 16384), the batch running in chunks
of samples whose Grams fit together; above that the per-step path runs, slow but exact and without workspace. Norms come from G's diagonal (Gram path) or one pass over V (per-step path).

On chip vs tiled. When N <= onchip_max_n (8192) the running min-distances, the taken flags and the inverse norms
live in registers of the one program for all steps (a step: one L2 row load, one fused update + int64 key max);
nothing round-trips through global memory between steps. Larger N, or a forced smaller block_n, uses the tiled path:
the same loop over BLOCK_N tiles with dist / taken / norms in an L2-resident workspace.

Cost estimate (H100, bfloat16, not measured here; no GPU was available when this was written), per step ~0.5-1 µs
(dependent L2 row load + block-wide max + broadcast): LLaVA-1.5 k=64 (~32 FPS steps + 32 seeds, seed rows load
independently): Gram ~3 µs + ~25-40 µs; LLaVA-NeXT N=2880, k=320 (~160 steps): Gram (34 GFLOP half-matrix) ~60-80 µs +
~150 µs; B=32 at LLaVA-1.5: 32 programs run side by side, Gram 2.7 GFLOP x 32 ~ 0.2 ms -> ~4-6x the B=1 time.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GRAM_BYTES = 1 << 30
ONCHIP_MAX_N = 8192


@triton.jit
def _rank_key(value, index):
    # (value descending, index ascending) as one int64, so max() = "largest, ties to the lower index". Float bits map
    # to an unsigned order in [0, 2^32); -0.0 is folded onto +0.0 so that they tie.
    value = tl.where(value == 0.0, 0.0, value)
    bits = value.to(tl.int32, bitcast=True).to(tl.int64)
    order = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    return (order << 31) | (2147483647 - index.to(tl.int64))


@triton.jit
def _key_index(key):
    return 2147483647 - (key & 2147483647)


@triton.jit
def _nan_min(a, b):
    # torch.minimum semantics: NaN in either operand gives NaN.
    return tl.where((a != a) | (b != b), float("nan"), tl.minimum(a, b))


@triton.jit
def _gram_kernel(vis_ptr, gram_ptr, N, d, stride_vb, stride_vn,
                 IS_FP32: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    ti = tl.program_id(0)
    tj = tl.program_id(1)
    b = tl.program_id(2)
    if tj >= ti:  # upper-triangle tiles only; the strict upper ones are mirrored (G is symmetric)
        i = ti * BLOCK_M + tl.arange(0, BLOCK_M)
        j = tj * BLOCK_M + tl.arange(0, BLOCK_M)
        base = vis_ptr + b.to(tl.int64) * stride_vb
        rows_i = base + i.to(tl.int64) * stride_vn
        rows_j = base + j.to(tl.int64) * stride_vn
        acc = tl.zeros([BLOCK_M, BLOCK_M], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            a = tl.load(rows_i[:, None] + cols[None, :], mask=(i < N)[:, None] & (cols < d)[None, :], other=0.0)
            c = tl.load(rows_j[:, None] + cols[None, :], mask=(j < N)[:, None] & (cols < d)[None, :], other=0.0)
            if IS_FP32 or DOT_IN_FP32:
                acc = tl.dot(a.to(tl.float32), tl.trans(c.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(c), acc)  # float16 / bfloat16 products are exact in float32
        g = gram_ptr + b.to(tl.int64) * N * N
        ok = (i < N)[:, None] & (j < N)[None, :]
        tl.store(g + i.to(tl.int64)[:, None] * N + j[None, :], acc, mask=ok)
        if tj > ti:
            tl.store(g + j.to(tl.int64)[None, :] * N + i[:, None], acc, mask=ok)


@triton.jit
def _sq_norms(vis_b, gram_b, i, N, d, stride_vn, USE_GRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    # |v_i|² for a vector of indices i (out-of-range ones give 0).
    if USE_GRAM:
        sq = tl.load(gram_b + i.to(tl.int64) * (N + 1), mask=i < N, other=0.0)
    else:
        sq = tl.zeros(i.shape, tl.float32)
        rows = vis_b + i.to(tl.int64) * stride_vn
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(rows[:, None] + cols[None, :], mask=(i < N)[:, None] & (cols < d)[None, :], other=0.0)
            v = v.to(tl.float32)
            sq += tl.sum(v * v, 1)
    return sq


@triton.jit
def _inv_norm(sq):
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq), 1e-12))


@triton.jit
def _distance_to(vis_b, gram_b, i, inv_i, c, N, d, stride_vn, USE_GRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    # 1 - v̂_i · v̂_c for the indices i and one centre c.
    c64 = c.to(tl.int64)
    if USE_GRAM:
        dots = tl.load(gram_b + c64 * N + i, mask=i < N, other=0.0)
        inv_c = _inv_norm(tl.load(gram_b + c64 * (N + 1)))
    else:
        dots = tl.zeros(i.shape, tl.float32)
        c_sq = tl.zeros([BLOCK_D], tl.float32)
        rows = vis_b + i.to(tl.int64) * stride_vn
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            vc = tl.load(vis_b + c64 * stride_vn + cols, mask=cols < d, other=0.0).to(tl.float32)
            v = tl.load(rows[:, None] + cols[None, :], mask=(i < N)[:, None] & (cols < d)[None, :], other=0.0)
            dots += tl.sum(v.to(tl.float32) * vc[None, :], 1)
            c_sq += vc * vc
        inv_c = _inv_norm(tl.sum(c_sq, 0))
    return 1.0 - dots * inv_i * inv_c


@triton.jit
def _fps_kernel(
    vis_ptr, gram_ptr, seed_ptr, num_picks_ptr, dist_ptr, norm_ptr, taken_ptr, out_ptr,
    N, d, m, k, stride_vb, stride_vn,
    USE_GRAM: tl.constexpr, ONCHIP: tl.constexpr, FILL_TO_K: tl.constexpr, SORTED_UNION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    vis_b = vis_ptr + b.to(tl.int64) * stride_vb
    gram_b = gram_ptr + b.to(tl.int64) * N * N
    out_b = out_ptr + b.to(tl.int64) * k
    if ONCHIP:
        # Whole sample in registers: dist, taken flags, norms; only G rows (or V) are read per step.
        i = tl.arange(0, BLOCK_N)
        norm = tl.sqrt_rn(_sq_norms(vis_b, gram_b, i, N, d, stride_vn, USE_GRAM, BLOCK_D))
        inv = tl.div_rn(1.0, tl.maximum(norm, 1e-12))
        taken = i >= N  # padding slots count as taken: never picked
        dist = tl.full([BLOCK_N], float("inf"), tl.float32)
        for s in range(m):
            c = tl.load(seed_ptr + b * m + s)
            if c >= 0:
                taken = taken | (i == c)
                dist = _nan_min(dist, _distance_to(vis_b, gram_b, i, inv, c, N, d, stride_vn, USE_GRAM, BLOCK_D))
        n_seeds = tl.sum(((i < N) & taken).to(tl.int32), 0)
        if FILL_TO_K:
            n_picks = k - n_seeds
        else:
            n_picks = tl.load(num_picks_ptr + b).to(tl.int32)
        n_picks = tl.minimum(tl.maximum(tl.minimum(n_picks, k), 0), N - n_seeds)
        norm_rank = tl.where(norm == norm, norm, -1.0)
        for t in range(n_picks):
            use_norm = (t == 0) & (n_seeds == 0)
            rank = tl.where(use_norm, norm_rank, tl.where(dist == dist, dist, -3.0))
            key = tl.where(taken, -1, _rank_key(rank, i))
            c = _key_index(tl.max(key, 0))
            if not SORTED_UNION:
                tl.store(out_b + t, c)
            taken = taken | (i == c)
            if t + 1 < n_picks:
                dist = _nan_min(dist, _distance_to(vis_b, gram_b, i, inv, c, N, d, stride_vn, USE_GRAM, BLOCK_D))
        if SORTED_UNION:
            chosen = (i < N) & taken
            pos = tl.cumsum(chosen.to(tl.int32), 0) - 1
            tl.store(out_b + pos, i.to(tl.int64), mask=chosen & (pos < k))
            n_out = n_seeds + n_picks
        else:
            n_out = n_picks
        for t in range(n_out, k):
            tl.store(out_b + t, -1)
    else:
        # Tiled: the same algorithm with dist / norms / taken in a [B, N] workspace, streamed in BLOCK_N tiles.
        dist_b = dist_ptr + b.to(tl.int64) * N
        norm_b = norm_ptr + b.to(tl.int64) * N
        taken_b = taken_ptr + b.to(tl.int64) * N
        for n0 in range(0, N, BLOCK_N):
            i = n0 + tl.arange(0, BLOCK_N)
            tl.store(norm_b + i, tl.sqrt_rn(_sq_norms(vis_b, gram_b, i, N, d, stride_vn, USE_GRAM, BLOCK_D)), mask=i < N)
            tl.store(dist_b + i, tl.full([BLOCK_N], float("inf"), tl.float32), mask=i < N)
            tl.store(taken_b + i, tl.zeros([BLOCK_N], tl.int8), mask=i < N)
        tl.debug_barrier()
        for s in range(m):
            c = tl.load(seed_ptr + b * m + s)
            if c >= 0:
                for n0 in range(0, N, BLOCK_N):
                    i = n0 + tl.arange(0, BLOCK_N)
                    inv = tl.div_rn(1.0, tl.maximum(tl.load(norm_b + i, mask=i < N, other=1.0), 1e-12))
                    dd = _distance_to(vis_b, gram_b, i, inv, c, N, d, stride_vn, USE_GRAM, BLOCK_D)
                    cur = tl.load(dist_b + i, mask=i < N, other=0.0)
                    tl.store(dist_b + i, _nan_min(cur, dd), mask=i < N)
                tl.store(taken_b + c, tl.full([], 1, tl.int8))
                tl.debug_barrier()
        n_seeds = 0
        for n0 in range(0, N, BLOCK_N):
            i = n0 + tl.arange(0, BLOCK_N)
            n_seeds += tl.sum(tl.load(taken_b + i, mask=i < N, other=0).to(tl.int32), 0)
        if FILL_TO_K:
            n_picks = k - n_seeds
        else:
            n_picks = tl.load(num_picks_ptr + b).to(tl.int32)
        n_picks = tl.minimum(tl.maximum(tl.minimum(n_picks, k), 0), N - n_seeds)
        prev = -1
        for t in range(n_picks):
            use_norm = (t == 0) & (n_seeds == 0)
            best = tl.full([], -1, tl.int64)
            for n0 in range(0, N, BLOCK_N):
                i = n0 + tl.arange(0, BLOCK_N)
                norm = tl.load(norm_b + i, mask=i < N, other=0.0)
                cur = tl.load(dist_b + i, mask=i < N, other=0.0)
                if prev >= 0:  # fold the previous pick in while the tile is loaded anyway
                    inv = tl.div_rn(1.0, tl.maximum(norm, 1e-12))
                    cur = _nan_min(cur, _distance_to(vis_b, gram_b, i, inv, prev, N, d, stride_vn, USE_GRAM, BLOCK_D))
                    tl.store(dist_b + i, cur, mask=i < N)
                rank = tl.where(use_norm, tl.where(norm == norm, norm, -1.0), tl.where(cur == cur, cur, -3.0))
                off = (tl.load(taken_b + i, mask=i < N, other=1) != 0) | (i >= N)
                key = tl.where(off, -1, _rank_key(rank, i))
                best = tl.maximum(best, tl.max(key, 0))
            c = _key_index(best)
            if not SORTED_UNION:
                tl.store(out_b + t, c)
            tl.store(taken_b + c, tl.full([], 1, tl.int8))
            prev = c.to(tl.int32)
            tl.debug_barrier()
        if SORTED_UNION:
            n_out = 0
            for n0 in range(0, N, BLOCK_N):
                i = n0 + tl.arange(0, BLOCK_N)
                chosen = (tl.load(taken_b + i, mask=i < N, other=0) != 0) & (i < N)
                pos = n_out + tl.cumsum(chosen.to(tl.int32), 0) - 1
                tl.store(out_b + pos, i.to(tl.int64), mask=chosen & (pos < k))
                n_out += tl.sum(chosen.to(tl.int32), 0)
        else:
            n_out = n_picks
        for t in range(n_out, k):
            tl.store(out_b + t, -1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def farthest_point_sample(
    vis: torch.Tensor,
    k: int,
    seed: torch.Tensor | None = None,
    num_picks: torch.Tensor | None = None,
    *,
    fill_to_k: bool = False,
    sorted_union: bool = False,
    use_gram: bool | None = None,
    block_n: int | None = None,
    block_d: int | None = None,
    gram_block: int | None = None,
) -> torch.Tensor:
    """FPS on ``vis`` [B, N, d] (float32 / float16 / bfloat16, unit stride in d). ``seed`` [B, m] int64 (-1 padded) are
    taken and seed the distances; ``num_picks`` [B] int64 caps the picks per sample (default k). Returns [B, k] int64:
    picks in selection order, -1 padded; with ``sorted_union`` the ascending union of seeds and picks, -1 padded; with
    ``fill_to_k`` each sample picks k - #distinct seeds. Host-sync free, fixed output shape. ``use_gram`` / ``block_*``
    override the automatic choices (tests force the per-step and tiled paths with them)."""
    B, N, d = vis.shape
    dev = vis.device
    if seed is None:
        seed = torch.empty(B, 0, dtype=torch.int64, device=dev)
    seed = seed.contiguous()
    out = torch.empty(B, k, dtype=torch.int64, device=dev)
    if B == 0 or k == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    if N >= 2**31:
        raise ValueError(f"N must be < 2^31 for the packed (value, index) keys, got N={N}")
    if num_picks is None:
        num_picks = torch.full((B,), k, dtype=torch.int64, device=dev)
    interp = _interpreting()
    if use_gram is None:
        use_gram = N * N * 4 <= GRAM_BYTES
    per_call = max(1, GRAM_BYTES // (N * N * 4)) if use_gram else B
    if B > per_call:  # bound the Gram workspace: samples are independent, run them in fixed-size chunks
        for b0 in range(0, B, per_call):
            sl = slice(b0, b0 + per_call)
            out[sl] = farthest_point_sample(
                vis[sl], k, seed[sl], num_picks[sl], fill_to_k=fill_to_k, sorted_union=sorted_union,
                use_gram=use_gram, block_n=block_n, block_d=block_d, gram_block=gram_block,
            )
        return out
    block_n = block_n or max(triton.next_power_of_2(N), 16)
    onchip = block_n >= N and block_n <= ONCHIP_MAX_N
    if not onchip:
        block_n = min(block_n, 1024 if not interp else 4096)
    block_d = block_d or (min(max(triton.next_power_of_2(d), 16), 256) if interp else 64)
    if not use_gram and not interp:
        block_d = min(block_d, 32)  # per-step path: keep the [BLOCK_N, BLOCK_D] register tile modest

    gram = torch.empty(B, N, N, dtype=torch.float32, device=dev) if use_gram else torch.empty(1, dtype=torch.float32, device=dev)
    if use_gram:
        gb = gram_block or (min(max(triton.next_power_of_2(N), 16), 128) if interp else 64)
        gd = min(max(triton.next_power_of_2(d), 16), 256) if interp else 64
        t = triton.cdiv(N, gb)
        _gram_kernel[(t, t, B)](
            vis, gram, N, d, vis.stride(0), vis.stride(1),
            IS_FP32=vis.dtype == torch.float32, DOT_IN_FP32=interp and vis.dtype == torch.bfloat16,
            BLOCK_M=gb, BLOCK_D=gd, num_warps=4,
        )
    if onchip:
        dist = norm = taken = gram  # unused
    else:
        dist = torch.empty(B, N, dtype=torch.float32, device=dev)
        norm = torch.empty(B, N, dtype=torch.float32, device=dev)
        taken = torch.empty(B, N, dtype=torch.int8, device=dev)
    _fps_kernel[(B,)](
        vis, gram, seed, num_picks, dist, norm, taken, out,
        N, d, seed.shape[1], k, vis.stride(0), vis.stride(1),
        USE_GRAM=use_gram, ONCHIP=onchip, FILL_TO_K=fill_to_k, SORTED_UNION=sorted_union,
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=8 if block_n <= 2048 else 16,
    )
    return out
