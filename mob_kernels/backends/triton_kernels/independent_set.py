"""Triton greedy maximal independent set on a thresholded cosine-similarity graph (D2Pruner's diversity stage), in ONE
launch: Gram tiles that threshold in their epilogue and write bit-packed adjacency, then one program per sample that
walks the candidates. Imports only torch and triton; this file can be copied alone.

What it computes (the reference backend's ``independent_set``, docs/contract.md §3.4.1, same semantics): with
S = v̂ v̂ᵀ computed exactly as the ``gram`` primitive of ``mob_select.py`` (raw-row dot products accumulated in float32,
times the float32 inverse norms 1 / max(|v|, 1e-12); the upper triangle decides both halves), tokens i != j are
adjacent when S_ij > near (same tile of ``grid`` = (tile, row, col) and Chebyshev distance <= radius) or S_ij > far
(otherwise; every pair when there is no grid); a NaN similarity makes no edge; near and far are rounded to float32 as
the reference's threshold tensor rounds them. Candidates are the tokens with rank >= 0, visited in increasing
(rank, index) order -- the reference's stable sort. Each candidate no earlier pick is adjacent to is picked, up to
min(num_picks[b], k) picks. Returns [B, k] int64 picks in order, -1 padded. Host-sync free, fixed output shape.

The walk takes one step per PICK, not per candidate: the next candidate the sequential scan picks is the first one in
rank order that is neither picked nor adjacent to a pick (a candidate the scan passed over was adjacent to an earlier
pick and stays so), so each step is an argmin over the still-available candidates' positions followed by OR-ing the
pick's adjacency row into the blocked set. Equal to the sequential scan by construction, not by a margin.

How (grid = (T(T+1)/2, B), T = cdiv(N, BM); every program is one tile, the last of a sample's tiles walks it):
  tile   [BM x BM] upper-triangle tile (ti <= tj) of S (the Gram tile code of mob_select.py: same loads, same dot
         precision, same d block, same scaling), thresholded in registers -- no float Gram is written. Adjacency is
         [N, W] int32 per sample, W = cdiv(N, 32) (18 words per row at N = 576, 90 at N = 2880): N²/8 bytes, 1/32 of
         a float Gram. The strictly upper part (i < j: the diagonal tile is symmetric bit for bit, as the Gram
         primitive mirrors its upper half) is packed into 32-bit words by BM/32 masked sum reductions per direction
         (the bits are disjoint, so a sum is an OR) and stored twice: rows i get the words of columns j, rows j the
         words of rows i (a diagonal tile ORs both into the same words). Every word has exactly one owning tile.
         Before its Gram loop (so that none of it is live next to the accumulators), 32 rows at a time, a tile
           - counts for every token the candidates of the other block that come before it in (rank, index) order
             into a [T, N] int32 table (no atomics: each (row block, column block) pair has one tile);
           - with a grid, packs the spatial-neighbour mask (int64 Chebyshev distances, as the reference computes
             them) into the very adjacency words it owns; after the loop each pair reads its bit back (a gather
             of L1-resident words) to choose near or far, and the final words overwrite them. Per-pair int64 grid
             values next to the accumulators cost ~100 registers more (ptxas: 240+ and spills at BM = 128).
  walk   run by the LAST tile program of the sample to arrive at its atomic ticket (acq_rel, gpu scope, after a CTA
         barrier; it resets the ticket to 0 so the cached ticket buffer needs no memset), as the FPS tail of
         mob_select.py. pos(i) = the sum of i's T partial counts: each candidate's place in the visiting order,
         unique. On chip (N <= ONCHIP_MAX_N): one int32 key per token in registers (pos for an available candidate,
         INT32_MAX once picked, blocked or not a candidate) -- the availability set, spread one lane per token; a
         step is one (value, index) min tree reduction, one dependent load of the pick's adjacency row (each warp
         reads the one 32-bit word its 32 consecutive tokens share: a broadcast) and a shift / and / select per
         token; it stops at min(num_picks, k) picks or when nothing is available. (A packed availability bitset of
         W words would have to be unpacked to one lane per token for that argmin anyway; walked candidate by
         candidate instead, it would take one dependent step per candidate, ~N, instead of one per pick.) Beyond
         ONCHIP_MAX_N the keys live in the workspace and a step is one pass over them in CH-wide chunks.

Why sequential and not the parallel-round formulation (an undecided candidate joins when its position beats every
undecided neighbour's; winners and their neighbours are decided; truncated to the first m picks it is the same set):
each round needs every undecided candidate's smallest undecided-neighbour position, a pass over the whole bit matrix
(N·W words: 41 KB at N = 576, 1 MB at N = 2880 per round), and the number of rounds is the longest chain of the
greedy's dependencies among the first m picks -- not bounded by log N for importance orders, where similar neighbours
have similar importance. D2Pruner takes m = n - n_p picks (20 at LLaVA-1.5's k = 64, 96 at LLaVA-NeXT's k = 320);
at ~0.5 µs per sequential step the whole walk is 10-50 µs, less than the parallel form would spend on ~10 rounds of
matrix passes plus a grid-wide barrier per round if the sample were spread over several SMs. Sequential it is.

Cost estimate (H100; NOT measured -- no GPU was available while this was written):
  tiles  as the MoB Gram (LLaVA-1.5 bf16, N = 576, d = 4096: 45 tiles of 64 x 64, each streaming 1 MB of bf16 from
         L2, ~5-9 µs); the pre-pass and the epilogue add ~10-20·BM² integer / compare / select ops and 2·BM/32 tile
         reductions (4·BM/32 with a grid), a few % of the tile's BM²·d MACs at d = 4096; the tile stores 41 KB of
         adjacency in all instead of a 1.3 MB float Gram. Registers (ptxas for sm_90, see the AOT test): 104 (no
         grid) / 152 (grid) at BM = 64 with 4 warps, 201-254 at BM = 128 with 8 warps (the MoB Gram alone: 113 /
         194), no spills; float32 with a grid at BM = 128: 255 and a 48-byte stack (3xTF32 is at the limit there,
         as in the MoB select's float32 128-tile).
  walk   prologue: T coalesced loads of N int32 (~1-2 µs). Step: the min tree (in-thread over BLOCK_N / (32·warps)
         keys, 5 shuffle levels of (value, index) pairs, one shared-memory round across the warps, ~300-400 cycles),
         the dependent L2 load of the row words (~300-500 cycles), ~5 ALU ops per key a thread holds (8 at N = 576
         with 4 warps, 16 at N = 2880 with 8): ~0.4-0.6 µs.
  LLaVA-1.5 (B = 1, N = 576, k = 64, pivot ratio 0.7: 20 picks): ~6-9 µs tiles + ~10-14 µs walk: ~17-25 µs in a CUDA
    graph. B = 32: 1440 64-tiles exceed 2 waves, so 128-tiles (480 programs, 8 warps, ~60-90 µs of tensor-core
    work, the 32 walks overlapping later samples' tiles).
  LLaVA-NeXT (N = 2880, k = 320: 96 picks): 276 tiles of 128 x 128 ~40-55 µs; walk ~50-65 µs: ~90-120 µs.
  float32: the tiles by 3xTF32 (3 tf32 MMAs per bf16 one at half the rate, ~6x the tile phase); the walk is the same.

Host side: one ``torch.empty`` int32 workspace ([B, N, W] adjacency, [B, T, N] partial counts, [B, N] keys for the
tiled walk), the output, a cached ticket buffer and one launch. The batch runs in chunks whose workspace fits
ADJ_BYTES (one chunk for model shapes). Shapes map to block sizes through one cached ``_launch_plan``. Offsets inside
one sample's adjacency are int32: N < 262144 (an 8 GiB bit matrix per sample).

Knobs (module constants, or keyword arguments of the launcher for tests and tuning): ADJ_BYTES, ONCHIP_MAX_N;
block_m (a multiple of 32; 64 while the 64-tiles fit ~2 waves, else 128, as the Gram primitive chooses), onchip,
chunk (CH), num_warps.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ADJ_BYTES = 1 << 30  # per launch: the batch runs in chunks whose workspaces fit together
ONCHIP_MAX_N = 8192  # walk keys in registers up to this N (next power of two), in the workspace beyond

_BIG = tl.constexpr(2147483647)  # the key of a token that is not available (a jit-visible global must be a constexpr)


# ------------------------------------------------------------------------------------------------ small helpers
# (repeated from mob_select.py so that this file stands alone; the Gram arithmetic must stay identical to it)


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
def _arrive(ticket_ptr, n):
    # True in the program that arrives last of n. The barrier orders this program's stores before its ticket; the
    # acq_rel ticket makes every earlier arrival's stores visible to the last one. The last one resets the ticket.
    tl.debug_barrier()
    t = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = t == n - 1
    if last:
        tl.store(ticket_ptr, 0)
    return last


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


# --------------------------------------------------------------------------------------------------- tile phase


@triton.jit
def _words(e, loc, w):
    # Word w (bit = index % 32) of a [BM, BM] 0/1 int32 tile, per row (its columns 32w..32w+31) and per column (its
    # rows 32w..32w+31). Bits are disjoint, so the sums are ORs (no carries, no int32 overflow).
    shift = loc & 31
    in_w = (loc // 32) == w
    per_row = tl.sum(tl.where(in_w[None, :], e << shift[None, :], 0), 1)
    per_col = tl.sum(tl.where(in_w[:, None], e << shift[:, None], 0), 0)
    return per_row, per_col


@triton.jit
def _adj_tile(vis_b, stride_vn, rank_b, grid_b, stride_gn, stride_gc, adj_b, part_b, t, N, d, W, near, far, radius,
              HAS_GRID: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, EVEN_D: tl.constexpr):
    # Tile t of the upper triangle, enumerated along the rows r of the lower one: r(r+1)/2 <= t < (r+1)(r+2)/2.
    r = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= t, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > t, r - 1, r)
    ti = t - r * (r + 1) // 2  # ti <= tj = r
    loc = tl.arange(0, BM)
    i = ti * BM + loc
    j = r * BM + loc
    wr = r * (BM // 32) + (loc >> 5)  # the word of column j in a row

    # Before the Gram loop, 32 rows x at a time (no int64 pair values for many rows per thread; nothing here stays
    # live through the loop): the visiting-order counts and, with a grid, the spatial-neighbour mask.
    rk_j = tl.load(rank_b + j, mask=j < N, other=-1)
    if HAS_GRID:
        gj = grid_b + j.to(tl.int64) * stride_gn
        tile_j = tl.load(gj, mask=j < N, other=0)
        row_j = tl.load(gj + stride_gc, mask=j < N, other=0)
        col_j = tl.load(gj + 2 * stride_gc, mask=j < N, other=0)
    cnt_j = tl.zeros([BM], tl.int32)
    sub = tl.arange(0, 32)
    for x0 in range(0, BM, 32):
        x = ti * BM + x0 + sub
        # (rank, index) order: for each token, how many candidates of the other block come before it.
        rk_x = tl.load(rank_b + x, mask=x < N, other=-1)
        j_first = (rk_j[None, :] < rk_x[:, None]) | ((rk_j[None, :] == rk_x[:, None]) & (j[None, :] < x[:, None]))
        tl.store(part_b + r * N + x, tl.sum(((rk_j >= 0)[None, :] & j_first).to(tl.int32), 1), mask=x < N)
        cnt_j += tl.sum(((rk_x >= 0)[:, None] & ~j_first & (x[:, None] != j[None, :])).to(tl.int32), 0)
        if HAS_GRID:
            # Spatial neighbours (symmetric), packed like the adjacency into the words this tile owns: rows x get
            # their columns j, and (off the diagonal) rows j get their columns x, read back after the loop.
            gx = grid_b + x.to(tl.int64) * stride_gn
            tile_x = tl.load(gx, mask=x < N, other=0)
            row_x = tl.load(gx + stride_gc, mask=x < N, other=0)
            col_x = tl.load(gx + 2 * stride_gc, mask=x < N, other=0)
            cheb = tl.maximum(tl.abs(row_x[:, None] - row_j[None, :]), tl.abs(col_x[:, None] - col_j[None, :]))
            close = ((tile_x[:, None] == tile_j[None, :]) & (cheb <= radius)).to(tl.int32)
            for v in tl.static_range(BM // 32):
                in_v = (loc >> 5) == v
                word = tl.sum(tl.where(in_v[None, :], close << (loc & 31)[None, :], 0), 1)
                wv = r * (BM // 32) + v + 0 * sub  # [32]: a scalar mask term does not broadcast under the interpreter
                tl.store(adj_b + (x * W + wv), word, mask=(x < N) & (wv < W))
            if ti != r:
                wx = ti * (BM // 32) + x0 // 32 + 0 * loc
                tl.store(adj_b + (j * W + wx), tl.sum(close << sub[:, None], 0), mask=(j < N) & (wx < W))
    if ti != r:
        tl.store(part_b + ti * N + j, cnt_j, mask=j < N)
    if HAS_GRID:
        tl.debug_barrier()

    acc, sq_i, sq_j = _dot_rows(vis_b, stride_vn, i, N, vis_b, stride_vn, j, N, d, BM, BM, BD, PREC, EVEN_D)
    s = acc * _inv_norm(sq_i)[:, None] * _inv_norm(sq_j)[None, :]  # = the Gram primitive's S[i, j]
    # Strictly upper (i < j): both halves of the matrix come from it, as the Gram primitive mirrors its upper half.
    # A NaN similarity compares False: no edge.
    up = (i[:, None] < j[None, :]) & (j < N)[None, :]
    if HAS_GRID:
        words = tl.load(adj_b + (i[:, None] * W + wr[None, :]), mask=up, other=0)
        close = ((words >> (j & 31)[None, :]) & 1) != 0
        e = (up & tl.where(close, s > near, s > far)).to(tl.int32)
        tl.debug_barrier()  # every thread has read the spatial words before they are overwritten
    else:
        e = (up & (s > far)).to(tl.int32)
    for w in tl.static_range(BM // 32):
        row_words, col_words = _words(e, loc, w)  # rows i: their columns j; rows j: their columns i
        wi = r * (BM // 32) + w + 0 * loc  # [BM]: a scalar mask term does not broadcast under the interpreter
        if ti == r:  # diagonal tile: row x of the symmetric tile is row x of e OR column x of e
            tl.store(adj_b + (i * W + wi), row_words | col_words, mask=(i < N) & (wi < W))
        else:
            wj = ti * (BM // 32) + w + 0 * loc
            tl.store(adj_b + (i * W + wi), row_words, mask=(i < N) & (wi < W))
            tl.store(adj_b + (j * W + wj), col_words, mask=(j < N) & (wj < W))


# --------------------------------------------------------------------------------------------------------- walk


@triton.jit
def _want(num_picks_b, k):
    return tl.minimum(tl.maximum(tl.load(num_picks_b), 0), k).to(tl.int32)


@triton.jit
def _walk_onchip(rank_b, num_picks_b, adj_b, part_b, out_b, N, k, W, T, BLOCK_N: tl.constexpr):
    i = tl.arange(0, BLOCK_N)
    inb = i < N
    cand = inb & (tl.load(rank_b + i, mask=inb, other=-1) >= 0)
    pos = tl.zeros([BLOCK_N], tl.int32)
    for t in range(T):
        pos += tl.load(part_b + t * N + i, mask=inb, other=0)
    key = tl.where(cand, pos, _BIG)
    want = _want(num_picks_b, k)
    best, c = tl.min(key, 0, return_indices=True, return_indices_tie_break_left=True)
    n = tl.zeros([], tl.int32)
    active = (want > 0) & (best < _BIG)
    while active:  # the hot loop
        tl.store(out_b + n, c.to(tl.int64))
        n += 1
        active = n < want
        if active:
            words = tl.load(adj_b + c.to(tl.int64) * W + (i >> 5), mask=inb, other=0)
            key = tl.where((((words >> (i & 31)) & 1) != 0) | (i == c), _BIG, key)
            best, c = tl.min(key, 0, return_indices=True, return_indices_tie_break_left=True)
            active = best < _BIG
    for q0 in range(0, k, BLOCK_N):
        q = q0 + i
        tl.store(out_b + q, tl.full([BLOCK_N], -1, tl.int64), mask=(q >= n) & (q < k))


@triton.jit
def _walk_tiled(rank_b, num_picks_b, adj_b, part_b, key_b, out_b, N, k, W, T, CH: tl.constexpr):
    # The on-chip walk with the keys in the workspace, streamed in CH chunks (large N).
    best = tl.full([], _BIG, tl.int32)
    c = tl.full([], -1, tl.int32)
    for n0 in range(0, N, CH):
        i = n0 + tl.arange(0, CH)
        inb = i < N
        cand = inb & (tl.load(rank_b + i, mask=inb, other=-1) >= 0)
        pos = tl.zeros([CH], tl.int32)
        for t in range(T):
            pos += tl.load(part_b + t * N + i, mask=inb, other=0)
        key = tl.where(cand, pos, _BIG)
        tl.store(key_b + i, key, mask=inb)
        v, idx = tl.min(key, 0, return_indices=True, return_indices_tie_break_left=True)
        better = v < best  # positions are unique: no tie among available candidates
        c = tl.where(better, n0 + idx, c)
        best = tl.where(better, v, best)
    tl.debug_barrier()
    want = _want(num_picks_b, k)
    n = tl.zeros([], tl.int32)
    active = (want > 0) & (best < _BIG)
    while active:
        tl.store(out_b + n, c.to(tl.int64))
        n += 1
        active = n < want
        if active:
            row = adj_b + c.to(tl.int64) * W
            nbest = tl.full([], _BIG, tl.int32)
            nc = tl.full([], -1, tl.int32)
            for n0 in range(0, N, CH):
                i = n0 + tl.arange(0, CH)
                inb = i < N
                words = tl.load(row + (i >> 5), mask=inb, other=0)
                key = tl.load(key_b + i, mask=inb, other=_BIG)
                key = tl.where((((words >> (i & 31)) & 1) != 0) | (i == c), _BIG, key)
                tl.store(key_b + i, key, mask=inb)
                v, idx = tl.min(key, 0, return_indices=True, return_indices_tie_break_left=True)
                better = v < nbest
                nc = tl.where(better, n0 + idx, nc)
                nbest = tl.where(better, v, nbest)
            c = nc
            active = nbest < _BIG
        tl.debug_barrier()
    for q0 in range(0, k, CH):
        q = q0 + tl.arange(0, CH)
        tl.store(out_b + q, tl.full([CH], -1, tl.int64), mask=(q >= n) & (q < k))


# ----------------------------------------------------------------------------------------------- the one kernel


@triton.jit
def _mis_kernel(vis_ptr, rank_ptr, num_picks_ptr, grid_ptr, ws_ptr, ticket_ptr, out_ptr,
                N, d, k, near, far, radius,
                stride_vb, stride_vn, stride_gb, stride_gn, stride_gc,
                HAS_GRID: tl.constexpr, WALK: tl.constexpr, PREC: tl.constexpr, EVEN_D: tl.constexpr,
                BM: tl.constexpr, BD: tl.constexpr, BLOCK_N: tl.constexpr, CH: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nb = tl.num_programs(1).to(tl.int64)
    T = tl.cdiv(N, BM)
    W = tl.cdiv(N, 32)
    # Workspace (int32, mirrored by _launch_plan): [nb, N, W] adjacency, [nb, T, N] partial counts, [nb, N] keys.
    adj_b = ws_ptr + b * N * W
    part_r = ws_ptr + nb * N * W
    part_b = part_r + b * T * N
    rank_b = rank_ptr + b * N
    _adj_tile(vis_ptr + b * stride_vb, stride_vn, rank_b, grid_ptr + b * stride_gb, stride_gn, stride_gc, adj_b,
              part_b, pid, N, d, W, near, far, radius, HAS_GRID, BM, BD, PREC, EVEN_D)
    if _arrive(ticket_ptr + b, T * (T + 1) // 2):
        if WALK == 1:
            _walk_onchip(rank_b, num_picks_ptr + b, adj_b, part_b, out_ptr + b * k, N, k, W, T, BLOCK_N)
        else:
            key_b = part_r + nb * T * N + b * N
            _walk_tiled(rank_b, num_picks_ptr + b, adj_b, part_b, key_b, out_ptr + b * k, N, k, W, T, CH)


# ------------------------------------------------------------------------------------------------------ launchers


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when triton is imported, so read once


def _interpreting() -> bool:
    return _INTERPRET


def _p2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=64)
def _f32(x: float) -> float:
    """``x`` rounded to float32 (to nearest; beyond the range: +-inf), as ``torch.full_like(sim, x)`` rounds it."""
    return torch.tensor(x, dtype=torch.float32).item()


# Ticket counters cached per (device, stream): every launch leaves them at 0, launches on one stream run in order, so
# no memset is needed; never cached while a CUDA graph is captured (a captured launch gets its own zeroed buffer).
_TICKETS: dict[tuple[int, int], torch.Tensor] = {}


def _tickets(dev: torch.device, n: int) -> torch.Tensor:
    if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=dev)
    key = (dev.index, torch.cuda.current_stream(dev).cuda_stream)
    t = _TICKETS.get(key)
    if t is None or t.numel() < n:
        t = _TICKETS[key] = torch.zeros(max(n, 512), dtype=torch.int32, device=dev)
    return t


@functools.lru_cache(maxsize=512)
def _launch_plan(B, N, d, dtype, interp, sms, adj_bytes, onchip_max_n, has_grid, knobs):
    """Launch keywords, grid width, batch chunk and workspace size (int32 words) for one call shape (cached)."""
    kn = dict(knobs)
    half = dtype != torch.float32
    if interp:  # programs run one by one in Python: few big tiles
        bm = kn.get("block_m") or min(max(_p2(N), 32), 128)
        bd = min(max(_p2(d), 16), 256)
        prec = 1 if dtype == torch.bfloat16 else (0 if half else 2)  # interpreter bfloat16 dots are wrong: widen
    else:  # the Gram primitive's choices, so that the similarities are its own
        bm = kn.get("block_m")
        if bm is None:  # 64-tiles spread a small problem over the SMs; 128-tiles move less data per FLOP
            t64 = triton.cdiv(N, 64)
            bm = 64 if B * (t64 * (t64 + 1) // 2) <= 2 * sms else 128
        bd = 64 if half else 32
        prec = 0 if half else 2
    if bm % 32:
        raise ValueError(f"block_m must be a multiple of 32 (whole adjacency words per tile), got {bm}")
    block_n = max(_p2(N), 32)
    onchip = block_n <= onchip_max_n and kn.get("onchip", True)
    warps = 4 if interp else kn.get("num_warps") or (4 if bm == 64 and (not onchip or block_n <= 2048) else 8)
    ch = kn.get("chunk") or min(block_n, 4096 if interp else 1024)
    T = triton.cdiv(N, bm)
    W = triton.cdiv(N, 32)
    per_sample = N * W + T * N + (0 if onchip else N)
    per_call = min(B, 65535, max(1, adj_bytes // (4 * per_sample)))
    launch = dict(HAS_GRID=has_grid, WALK=1 if onchip else 2, PREC=prec, EVEN_D=d % bd == 0, BM=bm, BD=bd,
                  BLOCK_N=block_n if onchip else 32, CH=ch, num_warps=warps, num_stages=3 if half else 2,
                  enable_fp_fusion=False)
    return launch, T * (T + 1) // 2, per_call, per_call * per_sample


def independent_set(vis, rank, num_picks, k, near, far, grid, radius, **knobs):
    """Greedy maximal independent set (docs/contract.md §3.4.1): ``vis`` [B, N, d] (float32 / float16 / bfloat16,
    unit stride in d), ``rank`` [B, N] int64 (-1: not a candidate; candidates visited in increasing rank, ties to the
    lower index), ``num_picks`` [B] int64, ``near`` / ``far`` cosine thresholds, ``grid`` [B, N, 3] int64 (tile, row,
    col; any strides) or None, ``radius`` the Chebyshev radius of spatial neighbours. Returns [B, k] int64 picks in
    order, -1 padded. ``knobs``: block_m, onchip, chunk, num_warps (tests force every path with them)."""
    B, N, d = vis.shape
    dev = vis.device
    out = torch.empty(B, k, dtype=torch.int64, device=dev)
    if B == 0 or k == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    if N * triton.cdiv(N, 32) >= 2**31:  # int32 offsets within one sample's adjacency (N < 262144)
        raise ValueError(f"N must be below 262144 for one sample's bit-packed adjacency, got N={N}")
    launch, n_prog, per_call, ws_words = _launch_plan(
        B, N, d, vis.dtype, _interpreting(), _sm_count(dev.index) if dev.type == "cuda" else 132, ADJ_BYTES,
        ONCHIP_MAX_N, grid is not None, tuple(sorted((a, v) for a, v in knobs.items() if v is not None)))
    ws = torch.empty(ws_words, dtype=torch.int32, device=dev)
    tickets = _tickets(dev, per_call)
    near, far = _f32(float(near)), _f32(float(far))
    radius = max(-(2**63), min(int(radius), 2**63 - 1))
    g = grid if grid is not None else out
    gs = (grid.stride(0), grid.stride(1), grid.stride(2)) if grid is not None else (0, 0, 0)
    for b0 in range(0, B, per_call):
        nb = min(B, b0 + per_call) - b0
        one = nb == B  # the common single chunk: no views at all

        def part(x, b0=b0, nb=nb):
            return x if one else x[b0 : b0 + nb]

        vb = part(vis)
        _mis_kernel[(n_prog, nb)](
            vb, part(rank), part(num_picks), g if grid is None else part(g), ws, tickets, part(out),
            N, d, k, near, far, radius, vb.stride(0), vb.stride(1), *gs, **launch,
        )
    return out
