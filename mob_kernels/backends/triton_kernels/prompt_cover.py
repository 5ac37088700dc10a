"""Triton prompt cover: MoB's prompt-alignment set (SPEC.md §2 steps 0-2) in one launch for the whole batch.

Computes, per sample b: v̂ = v / max(|v|, 1e-12), p̂ likewise; S[j, i] = p̂_j · v̂_i for the valid prompt rows j; for each
valid row the f best tokens T_j (f = fold[b], the sample's neighbour count, resolved by the caller); the covering
score c(i) = max{S[j, i] : i ∈ T_j}; and the min(k_p, #candidates) candidates with the largest c, by descending score,
-1 padded, plus that count. Ties go to the lower index; a non-finite similarity never makes a token a candidate.

How (one launch, grid = (cdiv(N, BLOCK_N), B)):
  phase 1, every program: one [L, BLOCK_N] tile of S. Dot products of the *raw* rows with float32 accumulation
    (tl.dot; float32 inputs use input_precision="ieee", never TF32; products of two float16 / bfloat16 values are exact
    in float32), then scaled by float32 inverse norms computed from the same loads: reference-level accuracy at
    tensor-core speed. The tile goes to an L2-resident float32 workspace [B, L, N].
  phase 2, the last program of each sample to finish (an atomic ticket per sample, so no grid-wide barrier and no
    second launch; which program finishes last does not change the result): per-row top-f and the max-merge, then
    top-k_p. Every "largest" is a max over one int64 key per element, (order-preserving float bits << 31) |
    (2^31 - 1 - index), so value-descending, index-ascending order and ties are exact. Top-f runs f max-passes per
    group of rows, each pass taking the best key below the previous one (no per-element state); top-k_p is a bitonic
    sort of the keys when N fits one tile, else k_p max-passes over the tiles (the tiled path for large N).

Cost estimate (H100, bfloat16, not measured here; no GPU was available when this was written):
  LLaVA-1.5 (B=1, N=576, d=4096, L=64, k_p=32, f=1): phase 1 is 0.3 GFLOP over 18 programs, each streaming its
    32x4096 visual tile and the 64x4096 prompt from L2, ~5-8 µs; phase 2: one max-pass plus one merge pass over a
    64x576 float32 tile and a 1024-key bitonic sort, ~5 µs. LLaVA-NeXT (N=2880, k_p ~ 160): 90 programs, phase 1
    ~8 µs, the 4096-key sort ~10 µs. B=32: 576 programs fill the GPU, phase-2 tails run in parallel: ~1.5-2x B=1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INT64_MAX = tl.constexpr(9223372036854775807)  # a jit-visible global must be a constexpr


@triton.jit
def _rank_key(value, index):
    # One int64 per element ordering by (value descending, index ascending): max() is "largest, ties to the lower
    # index". Float bits are mapped to an unsigned order in [0, 2^32); -0.0 is folded onto +0.0 so that they tie.
    value = tl.where(value == 0.0, 0.0, value)
    bits = value.to(tl.int32, bitcast=True).to(tl.int64)
    order = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    return (order << 31) | (2147483647 - index.to(tl.int64))


@triton.jit
def _key_index(key):
    return 2147483647 - (key & 2147483647)


@triton.jit
def _finite_key(s, i):
    # Non-finite similarities (NaN, +-inf, masked-out slots loaded as NaN) get -1, below every real key.
    finite = (s == s) & (tl.abs(s) < float("inf"))
    return tl.where(finite, _rank_key(s, i), -1)


@triton.jit
def _finish_sample(
    sim_ptr, cover_ptr, mask_ptr, fold_ptr, picks_ptr, count_ptr, b, N, L, k_p,
    FIN_BLOCK_N: tl.constexpr, FIN_BLOCK_L: tl.constexpr, SORT_TOP: tl.constexpr,
):
    sim_b = sim_ptr + b.to(tl.int64) * L * N
    cover_b = cover_ptr + b.to(tl.int64) * N
    f = tl.minimum(tl.maximum(tl.load(fold_ptr + b).to(tl.int32), 0), N)  # resolved by the caller, in [0, N]

    for n0 in range(0, N, FIN_BLOCK_N):
        i = n0 + tl.arange(0, FIN_BLOCK_N)
        tl.store(cover_b + i, tl.full([FIN_BLOCK_N], float("-inf"), tl.float32), mask=i < N)
    tl.debug_barrier()

    for l0 in range(0, L, FIN_BLOCK_L):
        j = l0 + tl.arange(0, FIN_BLOCK_L)
        row_ok = (j < L) & (tl.load(mask_ptr + b * L + j, mask=j < L, other=0) != 0)
        # After pass p, thr holds row j's p-th best key; a pass takes the best key strictly below it.
        thr = tl.full([FIN_BLOCK_L], _INT64_MAX, tl.int64)
        for _ in range(f):
            best = tl.full([FIN_BLOCK_L], -1, tl.int64)
            for n0 in range(0, N, FIN_BLOCK_N):
                i = n0 + tl.arange(0, FIN_BLOCK_N)
                ok = row_ok[:, None] & (i < N)[None, :]
                s = tl.load(sim_b + j[:, None] * N + i[None, :], mask=ok, other=float("nan"))
                key = _finite_key(s, i[None, :])
                key = tl.where(key < thr[:, None], key, -1)
                best = tl.maximum(best, tl.max(key, 1))
            thr = tl.where(best >= 0, best, thr)
        has_pick = thr != _INT64_MAX
        # T_j = the finite keys at or above the row's last pick (all of them when the row has fewer than f).
        for n0 in range(0, N, FIN_BLOCK_N):
            i = n0 + tl.arange(0, FIN_BLOCK_N)
            ok = row_ok[:, None] & (i < N)[None, :]
            s = tl.load(sim_b + j[:, None] * N + i[None, :], mask=ok, other=float("nan"))
            key = _finite_key(s, i[None, :])
            in_t = (key >= 0) & (key >= thr[:, None]) & has_pick[:, None]
            c = tl.max(tl.where(in_t, s, float("-inf")), 0)
            old = tl.load(cover_b + i, mask=i < N, other=float("-inf"))
            tl.store(cover_b + i, tl.maximum(old, c), mask=i < N)
        tl.debug_barrier()

    # S_p: the k_p candidates with the largest covering score (non-candidates hold -inf).
    if SORT_TOP:
        i = tl.arange(0, FIN_BLOCK_N)
        c = tl.load(cover_b + i, mask=i < N, other=float("-inf"))
        key = tl.where(c > float("-inf"), _rank_key(c, i), -1)
        ordered = tl.sort(key, descending=True)
        tl.store(picks_ptr + b * k_p + i, tl.where(ordered >= 0, _key_index(ordered), -1), mask=i < k_p)
        n_cand = tl.sum((key >= 0).to(tl.int64), 0)
        tl.store(count_ptr + b, tl.minimum(n_cand, k_p))
    else:
        thr = tl.full([], _INT64_MAX, tl.int64)
        count = tl.full([], 0, tl.int64)
        for p in range(k_p):
            best = tl.full([], -1, tl.int64)
            for n0 in range(0, N, FIN_BLOCK_N):
                i = n0 + tl.arange(0, FIN_BLOCK_N)
                c = tl.load(cover_b + i, mask=i < N, other=float("-inf"))
                key = tl.where(c > float("-inf"), _rank_key(c, i), -1)
                key = tl.where(key < thr, key, -1)
                best = tl.maximum(best, tl.max(key, 0))
            tl.store(picks_ptr + b * k_p + p, tl.where(best >= 0, _key_index(best), -1))
            count += (best >= 0).to(tl.int64)
            thr = tl.where(best >= 0, best, thr)
        tl.store(count_ptr + b, count)


@triton.jit
def _prompt_cover_kernel(
    vis_ptr, prompt_ptr, mask_ptr, fold_ptr, sim_ptr, cover_ptr, ticket_ptr, picks_ptr, count_ptr,
    N, L, d, k_p,
    stride_vb, stride_vn, stride_pb, stride_pl,
    IS_FP32: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
    FIN_BLOCK_N: tl.constexpr, FIN_BLOCK_L: tl.constexpr, SORT_TOP: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    n_tiles = tl.num_programs(0)

    # Phase 1: S[:, tile] for every prompt row (masked rows too; phase 2 ignores them).
    i = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = i < N
    v_rows = vis_ptr + b.to(tl.int64) * stride_vb + i.to(tl.int64) * stride_vn
    for l0 in range(0, L, BLOCK_L):
        j = l0 + tl.arange(0, BLOCK_L)
        j_ok = j < L
        p_rows = prompt_ptr + b.to(tl.int64) * stride_pb + j.to(tl.int64) * stride_pl
        acc = tl.zeros([BLOCK_L, BLOCK_N], tl.float32)
        p_sq = tl.zeros([BLOCK_L], tl.float32)
        v_sq = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_ok = cols < d
            p = tl.load(p_rows[:, None] + cols[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
            v = tl.load(v_rows[:, None] + cols[None, :], mask=i_ok[:, None] & c_ok[None, :], other=0.0)
            pf = p.to(tl.float32)
            vf = v.to(tl.float32)
            if IS_FP32 or DOT_IN_FP32:
                acc = tl.dot(pf, tl.trans(vf), acc, input_precision="ieee")
            else:
                acc = tl.dot(p, tl.trans(v), acc)
            p_sq += tl.sum(pf * pf, 1)
            v_sq += tl.sum(vf * vf, 1)
        inv_p = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(p_sq), 1e-12))
        inv_v = tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(v_sq), 1e-12))
        s = acc * inv_p[:, None] * inv_v[None, :]
        out = sim_ptr + b.to(tl.int64) * L * N + j[:, None] * N + i[None, :]
        tl.store(out, s, mask=j_ok[:, None] & i_ok[None, :])

    # Phase 2 in whichever program of this sample finishes last: the barrier makes all of this program's stores
    # precede its ticket, and the acq_rel ticket makes the other programs' stores visible to the finisher.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + b, 1, sem="acq_rel", scope="gpu")
    if ticket == n_tiles - 1:
        _finish_sample(sim_ptr, cover_ptr, mask_ptr, fold_ptr, picks_ptr, count_ptr, b, N, L, k_p,
                       FIN_BLOCK_N, FIN_BLOCK_L, SORT_TOP)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def prompt_cover(
    vis: torch.Tensor,
    prompt: torch.Tensor,
    mask: torch.Tensor,
    k_p: int,
    fold: torch.Tensor,
    *,
    block_n: int | None = None,
    block_d: int | None = None,
    fin_block_n: int | None = None,
    sort_top: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoB's prompt cover on batched inputs: ``vis`` [B, N, d], ``prompt`` [B, L, d] (float32 / float16 / bfloat16,
    unit stride in d), ``mask`` [B, L] bool, ``fold`` [B] int64 each sample's neighbour count f in [0, N]. Returns (picks [B, k_p] int64 by descending score, -1 padded; count [B]).
    Host-sync free with fixed output shapes (CUDA-graph capturable). ``block_*`` override the tile sizes (tests use
    small ones to exercise the multi-tile paths); ``sort_top`` picks the bitonic-sort top-k_p (needs N <= fin_block_n)
    over the k_p max-passes."""
    B, N, d = vis.shape
    L = prompt.shape[1]
    dev = vis.device
    if k_p == 0 or L == 0 or N == 0 or B == 0:
        return (torch.full((B, k_p), -1, dtype=torch.int64, device=dev), torch.zeros(B, dtype=torch.int64, device=dev))
    if N >= 2**31:
        raise ValueError(f"N must be < 2^31 for the packed (value, index) keys, got N={N}")
    interp = _interpreting()
    # triton 3.9's interpreter computes tl.dot on bfloat16 operands wrongly (errors ~1e10 seen); there the operands
    # are widened to float32 first, which is exact (bfloat16 -> float32 is lossless, and so are their products).
    # The interpreter runs programs one by one in Python: few big tiles are fastest there.
    block_n = block_n or (min(triton.next_power_of_2(N), 256) if interp else 32)
    block_d = block_d or (min(max(triton.next_power_of_2(d), 16), 256) if interp else 64)
    block_l = min(max(triton.next_power_of_2(L), 16), 64)
    fin_block_n = fin_block_n or min(max(triton.next_power_of_2(N), 16), 4096)
    fin_block_l = max(1, min(triton.next_power_of_2(L), 16384 // fin_block_n))
    # tl.sort is a long chain of tiny reductions: fine compiled, but ~5 s per 512 keys in the interpreter.
    sort_top = (not interp) if sort_top is None else sort_top
    sort_top = sort_top and N <= fin_block_n

    sim = torch.empty(B, L, N, dtype=torch.float32, device=dev)
    cover = torch.empty(B, N, dtype=torch.float32, device=dev)
    tickets = torch.zeros(B, dtype=torch.int32, device=dev)
    picks = torch.empty(B, k_p, dtype=torch.int64, device=dev)
    count = torch.empty(B, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(N, block_n), B)
    _prompt_cover_kernel[grid](
        vis, prompt, mask.view(torch.uint8), fold, sim, cover, tickets, picks, count,
        N, L, d, k_p,
        vis.stride(0), vis.stride(1), prompt.stride(0), prompt.stride(1),
        IS_FP32=vis.dtype == torch.float32, DOT_IN_FP32=interp and vis.dtype == torch.bfloat16, BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_D=block_d,
        FIN_BLOCK_N=fin_block_n, FIN_BLOCK_L=fin_block_l, SORT_TOP=sort_top,
        num_warps=8,
    )
    return picks, count
