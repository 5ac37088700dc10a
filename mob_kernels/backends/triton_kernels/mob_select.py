"""Triton kernels for MoB selection and its primitives -- cosine Gram matrix, prompt cover, farthest point sampling --
and the whole ``select`` in ONE launch. Imports only torch and triton; this file can be copied alone.

What it computes (the reference backend's primitives, same semantics; every "largest" ties to the lower index):
  gram     S = v̂ v̂ᵀ, v̂ = v / max(|v|, 1e-12): raw-row dot products (float32 accumulation) times the float32 inverse
           norms, symmetric bit for bit.
  cover    per valid prompt row j its f best tokens T_j (f = fold[b]); covering score c(i) = max S_pi[j, i] over the
           T_j holding i; the min(k_p, #candidates) best-scoring tokens by descending score, -1 padded.
  FPS      seeds (taken, -1 padded; duplicates allowed) start dist(i) = min over centres of 1 - S[c, i]; each step
           takes the untaken valid token with the largest dist (NaN below every finite distance and NaN forever, as
           torch.minimum; unseeded: first pick = largest raw norm, NaN lowest) and folds its row in; min(num_picks, k,
           untaken valid) picks in selection order, -1 padded. Rows come from a given Gram ``sim``, from the Gram this
           launch computes, or (N too large for a Gram) per step from V.
  select   cover -> FPS seeded by the cover picks for k - count picks -> the sorted union.

How (one launch, grid = (programs per sample, B); each program of sample b is one of):
  cover tile  [BL prompt rows x BM tokens] of p̂ v̂ᵀ (dots of raw rows on tensor cores, norms from the same loads); it
              keeps each row's FT best (value, index) int64 keys within its tile -- the union of per-tile top-f sets
              holds each row's top-f whenever f <= FT -- and stores the similarities only when the sample's f > FT.
  Gram tile   [BM x BM] upper-triangle tile of S, stored with its mirror; diagonal tiles also store the raw norms.
  norm tile   raw norms of NB rows (when the FPS reads a given ``sim`` or computes rows from V).
  Then per sample two tails, each run by the LAST program to arrive at an atomic ticket (acq_rel, gpu scope, after a
  CTA barrier; the last arrival resets the ticket to 0, so a cached ticket buffer needs no memset between launches):
    cover finish  (last cover tile) the per-row f-th best key from one register tile of partial keys (f <= FT; else f
                  passes over the stored similarities), c(i) by an int64 atomic-max scatter, then top-k_p without a
                  sort: compact the candidates, rank each by counting the candidate keys above it ([RANK_B, RANK_B]
                  compare tiles), write pick r to slot r. It then arrives at the FPS ticket, so it overlaps the
                  sample's Gram tiles still running.
    FPS           (last of the Gram / norm tiles and the cover finish) on chip for N <= ONCHIP_MAX_N: dist, taken and
                  the valid mask live in registers of this one program; the seeds are folded SEED_ROWS Gram rows per
                  tile (the next tile's indices loaded ahead); a step is one (value, index) argmax tree reduction, one
                  dependent Gram-row load and a NaN-propagating min (min.NaN.f32). Beyond ONCHIP_MAX_N: the same loop
                  with dist / taken in the workspace, CH-wide chunks per step. select writes the sorted union (cumsum
                  compaction of the taken flags) instead of the picks.
  float32 inputs run 3xTF32 on tensor cores: each operand is split x = hi + lo with hi and lo rounded to tf32, and
  lo·hi + hi·lo + hi·hi accumulate in float32 (~2^-21 relative per product). The parts handed to the tensor cores are
  exactly tf32, so their products are exact in float32 and the interpreter's float32 dot computes the GPU's products
  (only the accumulation order differs): the split is tested under the interpreter, not assumed.

Host side: one ``torch.empty`` workspace per call (regions laid out by ``_regions`` in the kernel and ``_ws_floats``
on the host; the B·N²·4-byte Gram dominates), the output, a cached ticket buffer and one launch. The batch runs in
chunks whose Gram fits GRAM_BYTES (one chunk for model shapes), every chunk reusing that one workspace. Shapes map to
block sizes through one cached ``_plan``.

Cost estimate (H100; NOT measured -- no GPU was available while this was written):
  FPS step on chip: dependent L2 load of a Gram row (~300-600 cycles) + argmax tree (5 shuffle levels of (value,
    index) pairs + one shared-memory round across 4-8 warps, ~300-400 cycles) + ~12 ALU ops per element a thread
    holds (4-16): ~0.4-0.6 µs, vs ~1.7 µs measured for the previous int64-key kernel.
  LLaVA-1.5 bf16 (B=1, N=576, d=4096, L=64, k_p=32, k=64): 54 tiles of 64x64 in one wave, each streaming 1 MB of
    bf16 from L2 (~5-9 µs); cover finish ~2-3 µs (overlapping the Gram tiles); seed fold 4 tiles ~1-2 µs; 32 steps
    ~13-19 µs: ~22-32 µs in a CUDA graph. Eager adds the host path: this file's part is two allocations, a dict
    lookup and one launch (~15-25 µs), on top of the registry's checks and fold resolution.
  B=32: 1728 64-tiles exceed 2 waves, so 128x128 tiles (640 programs, 8 warps): ~27 GMAC, ~60-90 µs of tensor-core
    work, the 32 per-sample FPS tails overlapping the tiles of later samples: ~2.5-3.5x B=1.
  LLaVA-NeXT (N=2880, k_p=160, k=320): 299 tiles of 128x128 ~40-55 µs; seed fold 40 tiles ~10-15 µs (one SM);
    160 steps at BLOCK_N=4096, 8 warps ~80-100 µs: ~130-160 µs.
  float32: 3 tf32 MMAs per bf16 one on the tiles (tf32 rate is half of bf16): ~6x the tile phase, which B=1 hides
    mostly behind the FPS (~1.3-1.8x bf16); at B=32 the tile phase dominates (~3-4x bf16).

Knobs (module constants, or keyword arguments of the launchers for tests and tuning): GRAM_BYTES, ONCHIP_MAX_N,
COVER_FT; block_m (64 while the 64-tiles fit ~2 waves, else 128), block_d, num_warps (4 with BM=64 and
BLOCK_N <= 2048, else 8), seed_rows, cover_ft, fin_block_n, rank_block, onchip, rows_from_v, chunk.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

GRAM_BYTES = 1 << 30  # per launch: the batch runs in chunks whose Gram matrices fit together
ONCHIP_MAX_N = 8192  # FPS state in registers up to this N (next power of two), tiled beyond
COVER_FT = 4  # cover tiles keep each row's FT best keys; folds above FT take the finisher's full passes

_INT64_MAX = tl.constexpr(9223372036854775807)  # a jit-visible global must be a constexpr
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


# ------------------------------------------------------------------------------------------------ small helpers


@triton.jit
def _rank_key(value, index):
    # One int64 ordering by (value descending, index ascending): max() is "largest, ties to the lower index". Float
    # bits map to an unsigned order in [0, 2^32); -0.0 is folded onto +0.0 so that they tie.
    value = tl.where(value == 0.0, 0.0, value)
    bits = value.to(tl.int32, bitcast=True).to(tl.int64)
    order = tl.where(bits >= 0, bits + 2147483648, -1 - bits)
    return (order << 31) | (2147483647 - index.to(tl.int64))


@triton.jit
def _key_index(key):
    return 2147483647 - (key & 2147483647)


@triton.jit
def _finite_key(s, i):
    # Non-finite similarities (NaN, +-inf, masked slots loaded as NaN) get -1, below every real key.
    finite = (s == s) & (tl.abs(s) < float("inf"))
    return tl.where(finite, _rank_key(s, i), -1)


@triton.jit
def _nan_min(a, b):
    # torch.minimum: NaN in either operand gives NaN (one min.NaN.f32 on sm_80+).
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _inv_norm(sq):
    return tl.div_rn(1.0, tl.maximum(tl.sqrt_rn(sq), 1e-12))


@triton.jit
def _round_tf32(x):
    # Round float32 to the nearest tf32 (10 mantissa bits, ties to even); inf / NaN unchanged.
    bits = x.to(tl.int32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000
    rounded = (bits + (((bits >> 13) & 1) + 4095)) & -8192
    return tl.where(special, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _dist_rank(dist):
    # The reference's nan_to_num(dist, nan=-3): NaN below every finite distance, +-inf clamped to +-FLT_MAX.
    return tl.where(dist != dist, -3.0, tl.maximum(tl.minimum(dist, _FLT_MAX), -_FLT_MAX))


@triton.jit
def _norm_rank(norm):
    return tl.where(norm != norm, -1.0, tl.minimum(norm, _FLT_MAX))


@triton.jit
def _arrive(ticket_ptr, n):
    # True in the program that arrives last of n. The barrier orders this program's stores before its ticket; the
    # acq_rel ticket makes every earlier arrival's stores visible to the last one. The last one resets the ticket.
    tl.debug_barrier()
    t = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = t == n - 1
    if last:
        tl.store(ticket_ptr, 0)
    return last


# --------------------------------------------------------------------------------------------------- tile phase


@triton.jit
def _dot_rows(a_base, a_stride, a_idx, na, b_base, b_stride, b_idx, nb, d,
              BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, EVEN_D: tl.constexpr):
    # acc[x, y] = A[a_idx[x]] · B[b_idx[y]] with float32 accumulation, and the squared norms of both row sets from the
    # same loads. PREC 0: float16/bfloat16 operands on tensor cores (their products are exact in float32); 1: float32
    # operands, IEEE FMA; 2: float32 by 3xTF32.
    a_rows = a_base + a_idx.to(tl.int64) * a_stride
    b_rows = b_base + b_idx.to(tl.int64) * b_stride
    a_ok = a_idx < na
    b_ok = b_idx < nb
    acc = tl.zeros([BA, BB], tl.float32)
    a_sq = tl.zeros([BA], tl.float32)
    b_sq = tl.zeros([BB], tl.float32)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        if EVEN_D:
            a = tl.load(a_rows[:, None] + cols[None, :], mask=a_ok[:, None], other=0.0)
            b = tl.load(b_rows[:, None] + cols[None, :], mask=b_ok[:, None], other=0.0)
        else:
            a = tl.load(a_rows[:, None] + cols[None, :], mask=a_ok[:, None] & (cols < d)[None, :], other=0.0)
            b = tl.load(b_rows[:, None] + cols[None, :], mask=b_ok[:, None] & (cols < d)[None, :], other=0.0)
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        a_sq += tl.sum(af * af, 1)
        b_sq += tl.sum(bf * bf, 1)
        if PREC == 0:
            acc = tl.dot(a, tl.trans(b), acc)
        elif PREC == 1:
            acc = tl.dot(af, tl.trans(bf), acc, input_precision="ieee")
        else:
            a_hi = _round_tf32(af)
            b_hi = _round_tf32(bf)
            a_lo = _round_tf32(af - a_hi)
            b_lo = _round_tf32(bf - b_hi)
            acc = tl.dot(a_lo, tl.trans(b_hi), acc, input_precision="tf32")
            acc = tl.dot(a_hi, tl.trans(b_lo), acc, input_precision="tf32")
            acc = tl.dot(a_hi, tl.trans(b_hi), acc, input_precision="tf32")
    return acc, a_sq, b_sq


@triton.jit
def _gram_tile(vis_b, stride_vn, gram_b, stride_gn, norm_b, t, N, d, STORE_NORMS: tl.constexpr,
               BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, EVEN_D: tl.constexpr):
    # Tile t of the upper triangle, enumerated along the rows r of the lower one: r(r+1)/2 <= t < (r+1)(r+2)/2.
    r = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= t, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > t, r - 1, r)
    ti = t - r * (r + 1) // 2  # ti <= tj = r
    i = ti * BM + tl.arange(0, BM)
    j = r * BM + tl.arange(0, BM)
    acc, sq_i, sq_j = _dot_rows(vis_b, stride_vn, i, N, vis_b, stride_vn, j, N, d, BM, BM, BD, PREC, EVEN_D)
    s = acc * _inv_norm(sq_i)[:, None] * _inv_norm(sq_j)[None, :]
    ok = (i < N)[:, None] & (j < N)[None, :]
    # Stored at (i, j) where i <= j and mirrored where i < j (always so off the diagonal): a diagonal tile writes its
    # upper half twice, so S is symmetric bit for bit.
    tl.store(gram_b + i.to(tl.int64)[:, None] * stride_gn + j[None, :], s, mask=ok & (i[:, None] <= j[None, :]))
    tl.store(gram_b + j.to(tl.int64)[None, :] * stride_gn + i[:, None], s, mask=ok & (i[:, None] < j[None, :]))
    if STORE_NORMS:
        if ti == r:
            tl.store(norm_b + i, tl.sqrt_rn(sq_i), mask=i < N)


@triton.jit
def _norm_tile(vis_b, stride_vn, norm_b, t, N, d, NB: tl.constexpr, BD: tl.constexpr, EVEN_D: tl.constexpr):
    i = t * NB + tl.arange(0, NB)
    rows = vis_b + i.to(tl.int64) * stride_vn
    sq = tl.zeros([NB], tl.float32)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        if EVEN_D:
            x = tl.load(rows[:, None] + cols[None, :], mask=(i < N)[:, None], other=0.0)
        else:
            x = tl.load(rows[:, None] + cols[None, :], mask=(i < N)[:, None] & (cols < d)[None, :], other=0.0)
        x = x.to(tl.float32)
        sq += tl.sum(x * x, 1)
    tl.store(norm_b + i, tl.sqrt_rn(sq), mask=i < N)


@triton.jit
def _cover_tile(vis_b, stride_vn, prompt_b, stride_pl, part_b, csim_b, f, t, N, L, d, T,
                FT: tl.constexpr, BL: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                PREC: tl.constexpr, EVEN_D: tl.constexpr):
    lt = t // T
    nt = t - lt * T
    j = lt * BL + tl.arange(0, BL)
    i = nt * BM + tl.arange(0, BM)
    acc, p_sq, v_sq = _dot_rows(prompt_b, stride_pl, j, L, vis_b, stride_vn, i, N, d, BL, BM, BD, PREC, EVEN_D)
    s = acc * _inv_norm(p_sq)[:, None] * _inv_norm(v_sq)[None, :]
    if f > FT:  # the finisher's full passes read the similarities themselves
        tl.store(csim_b + j.to(tl.int64)[:, None] * N + i[None, :], s, mask=(j < L)[:, None] & (i < N)[None, :])
    key = tl.where((i < N)[None, :], _finite_key(s, i[None, :]), -1)
    P = T * FT
    for q in tl.static_range(FT):  # this tile's FT best keys per row, -1 where it has fewer finite ones
        best = tl.max(key, 1)
        tl.store(part_b + j.to(tl.int64) * P + nt * FT + q, best, mask=j < L)
        key = tl.where(key == best[:, None], -1, key)


# ------------------------------------------------------------------------------------------------- cover finish


@triton.jit
def _cover_finish(mask_b, part_b, ckey_b, cand_b, csim_b, f, picks_b, count_ptr, N, L, k_p, T,
                  COVER_OUT: tl.constexpr, FT: tl.constexpr, RG: tl.constexpr, P_PAD: tl.constexpr,
                  FIN_BN: tl.constexpr, RG2: tl.constexpr, RANK_B: tl.constexpr):
    for n0 in range(0, N, FIN_BN):
        i = n0 + tl.arange(0, FIN_BN)
        tl.store(ckey_b + i, tl.full([FIN_BN], -1, tl.int64), mask=i < N)
    tl.debug_barrier()
    if f <= FT:
        # Each row's f-th best key among its tiles' partial keys; T_j = the finite keys at or above it. c(i) is the
        # largest key naming token i: an int64 max scatter (order-free, so deterministic).
        P = T * FT
        p = tl.arange(0, P_PAD)
        for l0 in range(0, L, RG):
            j = l0 + tl.arange(0, RG)
            row_ok = (j < L) & (tl.load(mask_b + j, mask=j < L, other=0) != 0)
            keys = tl.load(part_b + j.to(tl.int64)[:, None] * P + p[None, :],
                           mask=row_ok[:, None] & (p < P)[None, :], other=-1)
            thr = tl.full([RG], _INT64_MAX, tl.int64)
            for _ in range(f):
                best = tl.max(tl.where(keys < thr[:, None], keys, -1), 1)
                thr = tl.where(best >= 0, best, thr)
            in_t = (keys >= 0) & (keys >= thr[:, None])
            tl.atomic_max(ckey_b + _key_index(keys), keys, mask=in_t, sem="relaxed", scope="cta")
    else:
        # f > FT: f max passes per group of rows over the stored similarities, then the same scatter.
        for l0 in range(0, L, RG2):
            j = l0 + tl.arange(0, RG2)
            row_ok = (j < L) & (tl.load(mask_b + j, mask=j < L, other=0) != 0)
            thr = tl.full([RG2], _INT64_MAX, tl.int64)
            for _ in range(f):
                best = tl.full([RG2], -1, tl.int64)
                for n0 in range(0, N, FIN_BN):
                    i = n0 + tl.arange(0, FIN_BN)
                    s = tl.load(csim_b + j.to(tl.int64)[:, None] * N + i[None, :],
                                mask=row_ok[:, None] & (i < N)[None, :], other=float("nan"))
                    key = _finite_key(s, i[None, :])
                    best = tl.maximum(best, tl.max(tl.where(key < thr[:, None], key, -1), 1))
                thr = tl.where(best >= 0, best, thr)
            for n0 in range(0, N, FIN_BN):
                i = n0 + tl.arange(0, FIN_BN)
                s = tl.load(csim_b + j.to(tl.int64)[:, None] * N + i[None, :],
                            mask=row_ok[:, None] & (i < N)[None, :], other=float("nan"))
                key = _finite_key(s, i[None, :])
                col = tl.max(tl.where((key >= 0) & (key >= thr[:, None]), key, -1), 0)
                tl.atomic_max(ckey_b + i, col, mask=(i < N) & (col >= 0), sem="relaxed", scope="cta")
    tl.debug_barrier()
    # S_p, the k_p best covering keys, without a sort: compact the candidates (key >= 0; .cg reads the scattered values
    # from L2), then each candidate's rank = how many candidate keys beat it, and pick ranks < k_p go to their slot.
    n_cand = tl.zeros([], tl.int32)
    for n0 in range(0, N, FIN_BN):
        i = n0 + tl.arange(0, FIN_BN)
        key = tl.load(ckey_b + i, mask=i < N, other=-1, cache_modifier=".cg")
        is_c = key >= 0
        tl.store(cand_b + n_cand + tl.cumsum(is_c.to(tl.int32), 0) - 1, key, mask=is_c)
        n_cand += tl.sum(is_c.to(tl.int32), 0)
    tl.debug_barrier()
    for c0 in range(0, n_cand, RANK_B):
        c = c0 + tl.arange(0, RANK_B)
        mine = tl.load(cand_b + c, mask=c < n_cand, other=-1)
        rank = tl.zeros([RANK_B], tl.int32)
        for e0 in range(0, n_cand, RANK_B):
            e = e0 + tl.arange(0, RANK_B)
            other = tl.load(cand_b + e, mask=e < n_cand, other=-1)
            rank += tl.sum((other[None, :] > mine[:, None]).to(tl.int32), 1)
        tl.store(picks_b + rank, _key_index(mine), mask=(c < n_cand) & (rank < k_p))
    count = tl.minimum(n_cand, k_p)
    for q0 in range(0, k_p, FIN_BN):
        q = q0 + tl.arange(0, FIN_BN)
        tl.store(picks_b + q, tl.full([FIN_BN], -1, tl.int64), mask=(q >= count) & (q < k_p))
    if COVER_OUT:
        tl.store(count_ptr, count.to(tl.int64))


# ---------------------------------------------------------------------------------------------------------- FPS


@triton.jit
def _n_picks(n_taken, n_avail, num_picks_b, k, FILL_TO_K: tl.constexpr):
    if FILL_TO_K:  # select: k - #distinct seeds
        want = k - n_taken
    else:
        want = tl.minimum(tl.maximum(tl.load(num_picks_b), 0), k).to(tl.int32)
    return tl.maximum(tl.minimum(tl.minimum(want, k), n_avail), 0)


@triton.jit
def _fps_onchip(gram_b, stride_gn, norm_b, seeds_b, m, valid_b, num_picks_b, out_b, N, k,
                HAS_VALID: tl.constexpr, FILL_TO_K: tl.constexpr, SORTED_UNION: tl.constexpr,
                BLOCK_N: tl.constexpr, SEED_ROWS: tl.constexpr):
    i = tl.arange(0, BLOCK_N)
    inb = i < N
    dist = tl.full([BLOCK_N], float("inf"), tl.float32)
    taken = i < 0
    n_seeded = tl.zeros([], tl.int32)
    # Seeds as [SEED_ROWS, BLOCK_N] tiles of Gram rows, the next tile's indices loaded ahead.
    r = tl.arange(0, SEED_ROWS)
    c_next = tl.load(seeds_b + r, mask=r < m, other=-1).to(tl.int32)
    for s0 in range(0, m, SEED_ROWS):
        c = c_next
        c_next = tl.load(seeds_b + s0 + SEED_ROWS + r, mask=s0 + SEED_ROWS + r < m, other=-1).to(tl.int32)
        has = c >= 0
        g = tl.load(gram_b + c.to(tl.int64)[:, None] * stride_gn + i[None, :], mask=has[:, None] & inb[None, :],
                    other=float("-inf"))
        # min over the tile's rows, NaN if any is NaN (two plain reductions along the in-thread axis)
        g_nan = tl.max((g != g).to(tl.int32), 0) != 0
        dist = _nan_min(dist, tl.where(g_nan, float("nan"), 1.0 - tl.max(g, 0)))
        taken = taken | (tl.max((c[:, None] == i[None, :]).to(tl.int32), 0) != 0)
        n_seeded += tl.sum(has.to(tl.int32), 0)
    if HAS_VALID:
        ok = inb & (tl.load(valid_b + i, mask=inb, other=0) != 0)
    else:
        ok = inb
    off = taken | ~ok
    n_taken = tl.sum((taken & inb).to(tl.int32), 0)
    n_picks = _n_picks(n_taken, tl.sum((~off).to(tl.int32), 0), num_picks_b, k, FILL_TO_K)

    t0 = tl.zeros([], tl.int32)
    if (n_seeded == 0) & (n_picks > 0):  # unseeded: the first pick is the largest raw norm
        rank = tl.where(off, float("-inf"), _norm_rank(tl.load(norm_b + i, mask=inb, other=0.0)))
        c = tl.argmax(rank, 0, tie_break_left=True)
        if not SORTED_UNION:
            tl.store(out_b, c.to(tl.int64))
        off = off | (i == c)
        taken = taken | (i == c)
        row = tl.load(gram_b + c.to(tl.int64) * stride_gn + i, mask=inb, other=0.0)
        dist = _nan_min(dist, 1.0 - row)
        t0 += 1
    for t in range(t0, n_picks):  # the hot loop (helpers inlined: the interpreter pays per helper call)
        rank = tl.where(dist != dist, -3.0, tl.maximum(tl.minimum(dist, _FLT_MAX), -_FLT_MAX))  # = _dist_rank
        c = tl.argmax(tl.where(off, float("-inf"), rank), 0, tie_break_left=True)
        if not SORTED_UNION:
            tl.store(out_b + t, c.to(tl.int64))
        off = off | (i == c)
        taken = taken | (i == c)
        if t + 1 < n_picks:
            row = tl.load(gram_b + c.to(tl.int64) * stride_gn + i, mask=inb, other=0.0)
            dist = tl.minimum(dist, 1.0 - row, propagate_nan=tl.PropagateNan.ALL)
    if SORTED_UNION:
        chosen = taken & inb
        pos = tl.cumsum(chosen.to(tl.int32), 0) - 1
        tl.store(out_b + pos, i.to(tl.int64), mask=chosen & (pos < k))
        n_out = tl.sum(chosen.to(tl.int32), 0)
    else:
        n_out = n_picks
    tl.store(out_b + i, tl.full([BLOCK_N], -1, tl.int64), mask=(i >= n_out) & (i < k))


@triton.jit
def _row_chunk(gram_b, stride_gn, vis_b, stride_vn, norm_b, c, i, N, d,
               ROWS_FROM_V: tl.constexpr, CH: tl.constexpr, BD: tl.constexpr, EVEN_D: tl.constexpr):
    # (BD here is the per-step dot's own d block, BDV, sized so that a [CH, BD] tile stays in registers.)
    # S[c, i] for one centre c and a chunk of indices i: a Gram row, or (no Gram) v_i · v_c times the inverse norms.
    c64 = c.to(tl.int64)
    if ROWS_FROM_V:
        dots = tl.zeros([CH], tl.float32)
        rows = vis_b + i.to(tl.int64) * stride_vn
        for d0 in range(0, d, BD):
            cols = d0 + tl.arange(0, BD)
            if EVEN_D:
                vc = tl.load(vis_b + c64 * stride_vn + cols).to(tl.float32)
                v = tl.load(rows[:, None] + cols[None, :], mask=(i < N)[:, None], other=0.0)
            else:
                vc = tl.load(vis_b + c64 * stride_vn + cols, mask=cols < d, other=0.0).to(tl.float32)
                v = tl.load(rows[:, None] + cols[None, :], mask=(i < N)[:, None] & (cols < d)[None, :], other=0.0)
            dots += tl.sum(v.to(tl.float32) * vc[None, :], 1)
        inv_i = tl.div_rn(1.0, tl.maximum(tl.load(norm_b + i, mask=i < N, other=1.0), 1e-12))
        return dots * inv_i * tl.div_rn(1.0, tl.maximum(tl.load(norm_b + c64), 1e-12))
    else:
        return tl.load(gram_b + c64 * stride_gn + i, mask=i < N, other=0.0)


@triton.jit
def _fps_tiled(gram_b, stride_gn, vis_b, stride_vn, norm_b, seeds_b, m, valid_b, num_picks_b, out_b, dist_b, taken_b,
               N, d, k, ROWS_FROM_V: tl.constexpr, HAS_VALID: tl.constexpr, FILL_TO_K: tl.constexpr,
               SORTED_UNION: tl.constexpr, CH: tl.constexpr, BDV: tl.constexpr, EVEN_D: tl.constexpr):
    # The on-chip algorithm with dist / taken in the workspace, streamed in CH chunks (large N).
    for n0 in range(0, N, CH):
        i = n0 + tl.arange(0, CH)
        tl.store(dist_b + i, tl.full([CH], float("inf"), tl.float32), mask=i < N)
        tl.store(taken_b + i, tl.zeros([CH], tl.int32), mask=i < N)
    tl.debug_barrier()
    n_seeded = tl.zeros([], tl.int32)
    for s in range(m):
        c = tl.load(seeds_b + s).to(tl.int32)
        if c >= 0:
            for n0 in range(0, N, CH):
                i = n0 + tl.arange(0, CH)
                row = _row_chunk(gram_b, stride_gn, vis_b, stride_vn, norm_b, c, i, N, d, ROWS_FROM_V, CH, BDV,
                                 EVEN_D)
                cur = tl.load(dist_b + i, mask=i < N, other=0.0)
                tl.store(dist_b + i, _nan_min(cur, 1.0 - row), mask=i < N)
            tl.debug_barrier()
            tl.store(taken_b + c, 1)
            n_seeded += 1
        tl.debug_barrier()
    n_taken = tl.zeros([], tl.int32)
    n_avail = tl.zeros([], tl.int32)
    for n0 in range(0, N, CH):
        i = n0 + tl.arange(0, CH)
        tk = (tl.load(taken_b + i, mask=i < N, other=0) != 0) & (i < N)
        ok = i < N
        if HAS_VALID:
            ok = ok & (tl.load(valid_b + i, mask=i < N, other=0) != 0)
        n_taken += tl.sum(tk.to(tl.int32), 0)
        n_avail += tl.sum((ok & ~tk).to(tl.int32), 0)
    n_picks = _n_picks(n_taken, n_avail, num_picks_b, k, FILL_TO_K)
    prev = tl.full([], -1, tl.int32)
    for t in range(n_picks):
        use_norm = (t == 0) & (n_seeded == 0)
        best_v = tl.full([], float("-inf"), tl.float32)
        best_i = tl.full([], -1, tl.int32)
        for n0 in range(0, N, CH):
            i = n0 + tl.arange(0, CH)
            cur = tl.load(dist_b + i, mask=i < N, other=0.0)
            if prev >= 0:  # fold the previous pick in while the chunk is loaded anyway
                row = _row_chunk(gram_b, stride_gn, vis_b, stride_vn, norm_b, prev, i, N, d, ROWS_FROM_V, CH, BDV,
                                 EVEN_D)
                cur = _nan_min(cur, 1.0 - row)
                tl.store(dist_b + i, cur, mask=i < N)
            if use_norm:
                rank = _norm_rank(tl.load(norm_b + i, mask=i < N, other=0.0))
            else:
                rank = _dist_rank(cur)
            off = (tl.load(taken_b + i, mask=i < N, other=1) != 0) | (i >= N)
            if HAS_VALID:
                off = off | (tl.load(valid_b + i, mask=i < N, other=0) == 0)
            v, idx = tl.max(tl.where(off, float("-inf"), rank), 0, return_indices=True,
                            return_indices_tie_break_left=True)
            better = v > best_v  # strict: an earlier chunk keeps a tie
            best_i = tl.where(better, n0 + idx, best_i)
            best_v = tl.where(better, v, best_v)
        if not SORTED_UNION:
            tl.store(out_b + t, best_i.to(tl.int64))
        tl.store(taken_b + best_i, 1)
        prev = best_i
        tl.debug_barrier()
    if SORTED_UNION:
        n_out = tl.zeros([], tl.int32)
        for n0 in range(0, N, CH):
            i = n0 + tl.arange(0, CH)
            chosen = (tl.load(taken_b + i, mask=i < N, other=0) != 0) & (i < N)
            pos = n_out + tl.cumsum(chosen.to(tl.int32), 0) - 1
            tl.store(out_b + pos, i.to(tl.int64), mask=chosen & (pos < k))
            n_out += tl.sum(chosen.to(tl.int32), 0)
    else:
        n_out = n_picks
    for n0 in range(0, k, CH):
        i = n0 + tl.arange(0, CH)
        tl.store(out_b + i, tl.full([CH], -1, tl.int64), mask=(i >= n_out) & (i < k))


# ----------------------------------------------------------------------------------------------- the one kernel


@triton.jit
def _regions(ws, B, N, L, k_p, P):
    # Workspace regions after the Gram (float32 units; int64 regions stay 8-byte aligned). Mirrored by _ws_floats.
    B = B.to(tl.int64)
    norm = ws  # [B, N] float32 raw norms
    part = norm + (B * N + 1) // 2 * 2  # [B, L, P] int64 partial cover keys
    ckey = part + 2 * B * L * P  # [B, N] int64 covering keys
    cand = ckey + 2 * B * N  # [B, N] int64 the candidates' keys, compacted
    seeds = cand + 2 * B * N  # [B, k_p] int64 cover picks (select)
    csim = seeds + 2 * B * k_p  # [B, L, N] float32 cover similarities (f > FT only)
    dist = csim + (B * L * N + 1) // 2 * 2  # [B, N] float32 (tiled FPS)
    taken = dist + B * N  # [B, N] int32 (tiled FPS)
    i64 = tl.pointer_type(tl.int64)
    return (norm, part.to(i64), ckey.to(i64), cand.to(i64), seeds.to(i64), csim, dist,
            taken.to(tl.pointer_type(tl.int32)))


@triton.jit
def _mob_kernel(
    vis_ptr, prompt_ptr, mask_ptr, fold_ptr, seed_ptr, num_picks_ptr, valid_ptr, gram_ptr, ws_ptr, ticket_ptr,
    out_ptr, count_ptr,
    N, L, d, k_p, m, k, ws_off,
    stride_vb, stride_vn, stride_pb, stride_pl, stride_gb, stride_gn,
    COVER: tl.constexpr, COVER_OUT: tl.constexpr, GRAM: tl.constexpr, NORMS: tl.constexpr, FPS: tl.constexpr,
    ROWS_FROM_V: tl.constexpr, HAS_VALID: tl.constexpr, FILL_TO_K: tl.constexpr, SORTED_UNION: tl.constexpr,
    PREC: tl.constexpr, EVEN_D: tl.constexpr, BM: tl.constexpr, BL: tl.constexpr, BD: tl.constexpr, NB: tl.constexpr,
    FT: tl.constexpr, RG: tl.constexpr, P_PAD: tl.constexpr, FIN_BN: tl.constexpr, RG2: tl.constexpr,
    RANK_B: tl.constexpr, BLOCK_N: tl.constexpr, SEED_ROWS: tl.constexpr, CH: tl.constexpr, BDV: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    b64 = b.to(tl.int64)
    T = tl.cdiv(N, BM)
    norm_r, part_r, ckey_r, cand_r, seed_r, csim_r, dist_r, taken_r = _regions(ws_ptr + ws_off, tl.num_programs(1),
                                                                                N, L, k_p, T * FT)
    vis_b = vis_ptr + b64 * stride_vb
    gram_b = gram_ptr + b64 * stride_gb
    norm_b = norm_r + b64 * N
    if COVER:
        n_cov = tl.cdiv(L, BL) * T
    else:
        n_cov = 0
    if GRAM:
        n_gram = T * (T + 1) // 2
    else:
        n_gram = 0
    if NORMS:
        n_norm = tl.cdiv(N, NB)
    else:
        n_norm = 0

    go = (pid >= n_cov).to(tl.int32)  # Gram / norm programs all arrive at the FPS ticket; of the cover ones, the last
    if COVER:
        if pid < n_cov:
            f = tl.minimum(tl.maximum(tl.load(fold_ptr + b), 0), N).to(tl.int32)
            part_b = part_r + b64 * L * (T * FT)
            csim_b = csim_r + b64 * L * N
            _cover_tile(vis_b, stride_vn, prompt_ptr + b64 * stride_pb, stride_pl, part_b, csim_b, f, pid, N, L, d,
                        T, FT, BL, BM, BD, PREC, EVEN_D)
            if _arrive(ticket_ptr + 2 * b, n_cov):
                if COVER_OUT:
                    picks_b = out_ptr + b64 * k_p
                else:
                    picks_b = seed_r + b64 * k_p
                _cover_finish(mask_ptr + b64 * L, part_b, ckey_r + b64 * N, cand_r + b64 * N, csim_b, f, picks_b,
                              count_ptr + b, N, L, k_p, T, COVER_OUT, FT, RG, P_PAD, FIN_BN, RG2, RANK_B)
                go += 1
    if pid >= n_cov:
        t = pid - n_cov
        if GRAM:
            if t < n_gram:
                _gram_tile(vis_b, stride_vn, gram_b, stride_gn, norm_b, t, N, d, FPS != 0, BM, BD, PREC, EVEN_D)
        if NORMS:
            if t >= n_gram:
                _norm_tile(vis_b, stride_vn, norm_b, t - n_gram, N, d, NB, BD, EVEN_D)
    if FPS != 0:
        if go > 0:
            if COVER:
                n_arrive = n_gram + n_norm + 1
            else:
                n_arrive = n_gram + n_norm
            if _arrive(ticket_ptr + 2 * b + 1, n_arrive):
                if COVER:
                    seeds_b = seed_r + b64 * k_p
                    n_seed = k_p
                else:
                    seeds_b = seed_ptr + b64 * m
                    n_seed = m
                valid_b = valid_ptr + b64 * N
                out_b = out_ptr + b64 * k
                if FPS == 1:
                    _fps_onchip(gram_b, stride_gn, norm_b, seeds_b, n_seed, valid_b, num_picks_ptr + b, out_b, N, k,
                                HAS_VALID, FILL_TO_K, SORTED_UNION, BLOCK_N, SEED_ROWS)
                else:
                    _fps_tiled(gram_b, stride_gn, vis_b, stride_vn, norm_b, seeds_b, n_seed, valid_b,
                               num_picks_ptr + b, out_b, dist_r + b64 * N, taken_r + b64 * N, N, d, k, ROWS_FROM_V,
                               HAS_VALID, FILL_TO_K, SORTED_UNION, CH, BDV, EVEN_D)


# ------------------------------------------------------------------------------------------------------ launchers


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when triton is imported, so read once


def _interpreting() -> bool:
    return _INTERPRET


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Ticket counters, two per sample, cached per (device, stream): every launch leaves them at 0 (the last arrival resets
# its ticket), and launches on one stream run in order, so a cached buffer needs no memset. Never cached while a CUDA
# graph is being captured: a captured launch gets its own zeroed buffer from the graph's pool (one memset node), so
# graph replays and eager calls never share counters.
_TICKETS: dict[tuple[int, int], torch.Tensor] = {}


def _tickets(dev: torch.device, n: int) -> torch.Tensor:
    if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=dev)
    key = (dev.index, torch.cuda.current_stream(dev).cuda_stream)
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        t = _TICKETS[key] = torch.zeros(max(n, 512), dtype=torch.int32, device=dev)
    return t


def _ws_floats(B: int, N: int, L: int, k_p: int, P: int) -> int:
    """Float32 elements of the regions after the Gram (mirrors ``_regions``)."""
    even = lambda x: (x + 1) // 2 * 2  # noqa: E731
    return even(B * N) + 2 * B * L * P + 4 * B * N + 2 * B * k_p + even(B * L * N) + 2 * B * N


@functools.lru_cache(maxsize=512)
def _plan(B, N, L, d, k_p, m, dtype, interp, sms, cover, gram, norms, fps, rows_from_v, knobs):
    """Block sizes and variant switches for one call shape (a pure function of its arguments, cached)."""
    kn = dict(knobs)
    half = dtype != torch.float32
    if interp:  # programs run one by one in Python: few big tiles
        bm = kn.get("block_m") or min(max(_p2(N), 16), 128)
        bd = kn.get("block_d") or min(max(_p2(d), 16), 256)
        prec = 1 if dtype == torch.bfloat16 else (0 if half else 2)  # interpreter bfloat16 dots are wrong: widen
    else:
        bm = kn.get("block_m")
        if bm is None:  # 64-tiles spread a small problem over the SMs; 128-tiles move less data per FLOP
            t64 = triton.cdiv(N, 64)
            tiles = B * ((t64 * (t64 + 1) // 2 if gram else 0) + (triton.cdiv(L, 64) * t64 if cover else 0))
            bm = 64 if tiles <= 2 * sms else 128
        bd = kn.get("block_d") or (64 if half else 32)
        prec = 0 if half else 2
    block_n = max(_p2(N), 16)
    onchip = fps and not rows_from_v and block_n <= ONCHIP_MAX_N and kn.get("onchip", True)
    warps = 4 if interp else kn.get("num_warps") or (4 if bm == 64 and (not onchip or block_n <= 2048) else 8)
    bl = min(max(_p2(L), 16), 64)
    T = triton.cdiv(N, bm)
    ft = kn.get("cover_ft", COVER_FT) if cover else 0
    if T * ft > 4096:  # too many partial keys for one register tile: always the full passes
        ft = 0
    p_pad = _p2(T * ft)
    fin_bn = kn.get("fin_block_n") or min(max(_p2(N), 16), 4096 if interp else 1024)
    ch = kn.get("chunk") or min(block_n, 4096 if interp else 1024)
    bdv = bd if interp else 32  # the per-step dot of the no-Gram path: a [CH, BDV] tile in registers
    if rows_from_v and not interp:
        ch = min(ch, 256)
    seed_rows = kn.get("seed_rows")
    if seed_rows is None:  # one seed tile holds ~64 Gram values per thread
        seed_rows = max(1, min(_p2(m), (1 << 16 if interp else 64 * 32 * warps) // block_n))
    return dict(
        const=dict(
            COVER=cover, GRAM=gram, NORMS=norms, FPS=(1 if onchip else 2) if fps else 0, ROWS_FROM_V=rows_from_v,
            PREC=prec, EVEN_D=d % bd == 0 and d % bdv == 0, BM=bm, BL=bl, BD=bd,
            NB=min(max(_p2(N), 16), 128) if interp else 16, FT=ft, RG=max(1, min(_p2(L), 2048 // p_pad)), P_PAD=p_pad,
            FIN_BN=fin_bn, RG2=max(1, min(_p2(L), 2048 // fin_bn)),
            RANK_B=kn.get("rank_block") or (256 if interp else 64),
            BLOCK_N=block_n if onchip else 16, SEED_ROWS=seed_rows, CH=ch, BDV=bdv,
        ),
        T=T, num_warps=warps, num_stages=3 if half else 2,
    )


@functools.lru_cache(maxsize=512)
def _launch_plan(B, N, L, d, k_p, m, k, dtype, interp, sms, gram_bytes, cover, cover_out, gram_out, has_sim, fps,
                 has_valid, fill_to_k, sorted_union, knobs):
    """Everything a call needs that its shapes and modes decide: the launch keywords, grid width, batch chunk and
    workspace size (cached, so a repeated call spends its host time on two allocations and the launch)."""
    kn = dict(knobs)
    rows_from_v = fps and not has_sim and (bool(kn.pop("rows_from_v", False)) or N * N * 4 > gram_bytes)
    gram = gram_out or (fps and not has_sim and not rows_from_v)
    internal_gram = gram and not gram_out
    norms = fps and not gram
    plan = _plan(B, N, L, d, k_p, max(m, k_p), dtype, interp, sms, cover, gram, norms, fps, rows_from_v,
                 tuple(sorted(kn.items())))
    const, T = plan["const"], plan["T"]
    per_call = min(B, 65535, max(1, gram_bytes // (N * N * 4)) if internal_gram else B)
    g_floats = (per_call * N * N + 3) // 4 * 4 if internal_gram else 0
    ws_floats = g_floats + _ws_floats(per_call, N, L, k_p, T * const["FT"])
    n_prog = (-(-L // const["BL"]) * T if cover else 0) + (T * (T + 1) // 2 if gram else 0)
    n_prog += -(-N // const["NB"]) if norms else 0
    launch = dict(const, COVER_OUT=cover_out, HAS_VALID=has_valid, FILL_TO_K=fill_to_k, SORTED_UNION=sorted_union,
                  num_warps=plan["num_warps"], num_stages=plan["num_stages"], enable_fp_fusion=False)
    strides = (N * N, N) if gram else (0, 0)
    return launch, n_prog, per_call, g_floats, ws_floats, strides


def _run(vis, out, *, k=0, prompt=None, mask=None, fold=None, k_p=0, seed=None, num_picks=None, valid=None, sim=None,
         count=None, cover=False, cover_out=False, gram_out=None, fps=False, fill_to_k=False, sorted_union=False,
         knobs=()):
    """Launch ``_mob_kernel`` once per chunk of samples (one chunk unless their Gram matrices exceed GRAM_BYTES)."""
    B, N, d = vis.shape
    dev = vis.device
    L = prompt.shape[1] if cover else 0
    k_p = k_p if cover else 0
    m = seed.shape[1] if seed is not None else 0
    launch, n_prog, per_call, g_floats, ws_floats, (sgb, sgn) = _launch_plan(
        B, N, L, d, k_p, m, k, vis.dtype, _interpreting(), _sm_count(dev.index) if dev.type == "cuda" else 132,
        GRAM_BYTES, cover, cover_out, gram_out is not None, sim is not None, fps, valid is not None, fill_to_k,
        sorted_union, knobs)
    ws = torch.empty(ws_floats, dtype=torch.float32, device=dev)
    tickets = _tickets(dev, 2 * per_call) if (cover or fps) else ws
    g_src = sim if sim is not None else gram_out if gram_out is not None else ws
    if sim is not None:
        sgb, sgn = sim.stride(0), sim.stride(1)
    ps = (prompt.stride(0), prompt.stride(1)) if cover else (0, 0)
    for b0 in range(0, B, per_call):
        nb = min(B, b0 + per_call) - b0
        one = nb == B  # the common single chunk: no views at all

        def part(x, b0=b0, nb=nb):  # this chunk's rows; unused pointer arguments get ``out``
            return out if x is None else x if one else x[b0 : b0 + nb]

        vb = part(vis)
        _mob_kernel[(n_prog, nb)](
            vb, part(prompt), part(mask), part(fold), part(seed if m else None), part(num_picks), part(valid),
            ws if g_src is ws else part(g_src), ws, tickets, part(out), part(count),
            N, L, d, k_p, m, k, g_floats, vb.stride(0), vb.stride(1), ps[0], ps[1], sgb, sgn, **launch,
        )
    return out


def _knobs(knobs: dict) -> tuple:
    return tuple(sorted((a, v) for a, v in knobs.items() if v is not None))


def _check_n(N: int) -> None:
    if N >= 2**31:
        raise ValueError(f"N must be < 2^31 for the packed (value, index) keys, got N={N}")


def gram(vis: torch.Tensor, *, block_m: int | None = None) -> torch.Tensor:
    """Cosine similarities [B, N, N] float32 of ``vis`` [B, N, d] (float32 / float16 / bfloat16, unit stride in d)."""
    B, N, d = vis.shape
    out = torch.empty(B, N, N, dtype=torch.float32, device=vis.device)
    if B == 0 or N == 0:
        return out
    _check_n(N)
    return _run(vis, out, gram_out=out, knobs=(("block_m", block_m),) if block_m else ())


def prompt_cover(vis, prompt, mask, k_p, fold, **knobs):
    """MoB's prompt cover: ``vis`` [B, N, d], ``prompt`` [B, L, d], ``mask`` [B, L] bool, ``fold`` [B] int64 (each
    sample's f). Returns (picks [B, k_p] int64 by descending score, -1 padded; count [B] int64). ``knobs``: block_m,
    block_d, cover_ft, fin_block_n, rank_block, num_warps (tests force every path with them)."""
    B, N, d = vis.shape
    L = prompt.shape[1]
    dev = vis.device
    picks = torch.empty(B, k_p, dtype=torch.int64, device=dev)
    count = torch.empty(B, dtype=torch.int64, device=dev)
    if k_p == 0 or L == 0 or N == 0 or B == 0:
        return picks.fill_(-1), count.zero_()
    _check_n(N)
    _run(vis, picks, prompt=prompt, mask=mask, fold=fold, k_p=k_p, count=count, cover=True, cover_out=True,
         knobs=_knobs(knobs))
    return picks, count


def farthest_point_sample(vis, seed, num_picks, k, valid=None, sim=None, **knobs):
    """Seeded FPS: ``seed`` [B, m] int64 (-1 padded, values in [-1, N)), ``num_picks`` [B] int64, ``valid`` [B, N] bool
    or None, ``sim`` a [B, N, N] float32 Gram to read rows from (else this launch computes it, or for very large N
    computes rows per step). Returns [B, k] int64 in selection order, -1 padded. ``knobs``: onchip, rows_from_v,
    block_m, seed_rows, chunk, num_warps."""
    B, N, d = vis.shape
    out = torch.empty(B, k, dtype=torch.int64, device=vis.device)
    if B == 0 or k == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    _check_n(N)
    if sim is not None and sim.stride(2) != 1:
        sim = sim.contiguous()
    seed = seed.contiguous() if seed.shape[1] else None
    return _run(vis, out, k=k, seed=seed, num_picks=num_picks, valid=valid, sim=sim, fps=True, knobs=_knobs(knobs))


def select(vis, prompt, mask, k_p, k, fold, **knobs):
    """MoB select in one launch: cover (k_p) -> FPS seeded by the cover picks for k - count picks -> the sorted union
    [B, k] int64. Host-sync free, fixed output shape (CUDA-graph capturable)."""
    B, N, d = vis.shape
    L = prompt.shape[1]
    out = torch.empty(B, k, dtype=torch.int64, device=vis.device)
    if B == 0 or k == 0:
        return out
    _check_n(N)
    if k_p == 0 or L == 0:
        return _run(vis, out, k=k, fps=True, fill_to_k=True, sorted_union=True, knobs=_knobs(knobs))
    return _run(vis, out, k=k, prompt=prompt, mask=mask, fold=fold, k_p=k_p, cover=True, fps=True, fill_to_k=True,
                sorted_union=True, knobs=_knobs(knobs))
