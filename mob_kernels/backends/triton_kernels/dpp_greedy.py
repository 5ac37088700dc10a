"""Triton greedy MAP of a DPP (CDPruner's selection), in one launch: the cosine Gram tiles, then one program per sample
running the incremental-Cholesky greedy loop. Imports only torch and triton; this file can be copied alone.

What it computes (the reference backend's ``dpp_greedy``, same semantics): with S the cosine Gram matrix (raw-row dots,
float32 accumulation, times the float32 inverse norms 1 / max(|v|, 1e-12)) and r = relevance where valid, else 0, the
kernel is L_ij = (r_i S_ij) r_j, and 0 in the rows and columns of invalid tokens (so a NaN feature of an invalid
token reaches nothing). Fast greedy MAP (Chen et al. 2018): d2 starts at diag(L) (-inf where invalid); step i
takes j = argmax d2 (first maximum) with gain g = d2_j, and continues only while no d2 is NaN and g > 1e-5 · max over
valid of L_jj; then e = (L[j, :] - Σ_{t<i} C[t, j] C[t, :]) / sqrt(g) becomes row i of C, d2 -= e², d2_j = -inf.
Returns (order [B, k] int64, -1 after the stop; gain [B, k] float32, 0 after the stop). Host-sync free.

How (grid = (T(T+1)/2, B), T = cdiv(N, BM)): every program computes one [BM x BM] upper-triangle tile of S and writes it
with its mirror into the workspace (diagonal tiles write their upper half twice, so S is symmetric bit for bit); the
last program of each sample to arrive at its atomic ticket (acq_rel, gpu scope; it resets the ticket to 0 so a cached
ticket buffer needs no memset) runs the greedy loop for that sample. d2, r and the Cholesky rows C [k, N] live in the
workspace; a step is one pass over N in CH chunks: the Gram row of j, the column C[:i, j] and the [i, CH] block of C
(TB rows at a time), the new row of C, d2 updated, and the next argmax / NaN check folded into the same pass.
float32 inputs use 3xTF32 (each operand split into two tf32 parts, hi·hi + hi·lo + lo·hi in float32; the parts are
tf32-exact, so the interpreter's float32 dot reproduces the GPU's products).

Cost estimate (H100, not measured: no GPU was available while this was written): the tiles as for the MoB Gram
(LLaVA-1.5, N=576, d=4096: 45 tiles, ~5-9 µs). Step i reads i·N floats of C (L1/L2) plus one Gram row, writes N:
O(k² N / 2) reads in total, ~1-2 µs per step at k=64, N=576 (~100 µs per sample, samples in parallel); at k=320,
N=2880 the C traffic (~590 MB per sample from one SM) makes it ~3-5 ms -- the price of the exact sequential algorithm.

Knobs: GRAM_BYTES (batch chunking), block_m, chunk (CH), t_block (TB), num_warps.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GRAM_BYTES = 1 << 30  # per launch: the batch runs in chunks whose Gram matrices fit together
DPP_STOP = 1e-5  # the reference's stopping fraction of the largest valid diagonal entry
_DPP_STOP = tl.constexpr(DPP_STOP)  # a jit-visible global must be a constexpr


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
    # True in the last of n programs to arrive; it resets the ticket (see the module docstring).
    tl.debug_barrier()
    t = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    last = t == n - 1
    if last:
        tl.store(ticket_ptr, 0)
    return last


@triton.jit
def _gram_tile(vis_b, stride_vn, gram_b, t, N, d,
               BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, EVEN_D: tl.constexpr):
    # Tile t of the upper triangle, enumerated along the rows r of the lower one: r(r+1)/2 <= t < (r+1)(r+2)/2.
    r = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= t, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > t, r - 1, r)
    i = (t - r * (r + 1) // 2) * BM + tl.arange(0, BM)
    j = r * BM + tl.arange(0, BM)
    rows_i = vis_b + i.to(tl.int64) * stride_vn
    rows_j = vis_b + j.to(tl.int64) * stride_vn
    acc = tl.zeros([BM, BM], tl.float32)
    sq_i = tl.zeros([BM], tl.float32)
    sq_j = tl.zeros([BM], tl.float32)
    for d0 in range(0, d, BD):
        cols = d0 + tl.arange(0, BD)
        if EVEN_D:
            a = tl.load(rows_i[:, None] + cols[None, :], mask=(i < N)[:, None], other=0.0)
            b = tl.load(rows_j[:, None] + cols[None, :], mask=(j < N)[:, None], other=0.0)
        else:
            a = tl.load(rows_i[:, None] + cols[None, :], mask=(i < N)[:, None] & (cols < d)[None, :], other=0.0)
            b = tl.load(rows_j[:, None] + cols[None, :], mask=(j < N)[:, None] & (cols < d)[None, :], other=0.0)
        af = a.to(tl.float32)
        bf = b.to(tl.float32)
        sq_i += tl.sum(af * af, 1)
        sq_j += tl.sum(bf * bf, 1)
        if PREC == 0:  # float16 / bfloat16: products exact in float32
            acc = tl.dot(a, tl.trans(b), acc)
        elif PREC == 1:  # float32 operands, IEEE FMA
            acc = tl.dot(af, tl.trans(bf), acc, input_precision="ieee")
        else:  # float32 by 3xTF32
            a_hi = _round_tf32(af)
            b_hi = _round_tf32(bf)
            a_lo = _round_tf32(af - a_hi)
            b_lo = _round_tf32(bf - b_hi)
            acc = tl.dot(a_lo, tl.trans(b_hi), acc, input_precision="tf32")
            acc = tl.dot(a_hi, tl.trans(b_lo), acc, input_precision="tf32")
            acc = tl.dot(a_hi, tl.trans(b_hi), acc, input_precision="tf32")
    s = acc * _inv_norm(sq_i)[:, None] * _inv_norm(sq_j)[None, :]
    ok = (i < N)[:, None] & (j < N)[None, :]
    tl.store(gram_b + i.to(tl.int64)[:, None] * N + j[None, :], s, mask=ok & (i[:, None] <= j[None, :]))
    tl.store(gram_b + j.to(tl.int64)[None, :] * N + i[:, None], s, mask=ok & (i[:, None] < j[None, :]))


@triton.jit
def _dpp_tail(gram_b, rel_b, valid_b, d2_b, r_b, c_b, order_b, gain_b, N, k, CH: tl.constexpr, TB: tl.constexpr):
    # Initial pass: r, d2 = diag(L) (-inf where invalid), the stopping threshold, the first argmax / NaN check.
    top = tl.full([], float("-inf"), tl.float32)
    top_nan = tl.zeros([], tl.int32)
    best_v = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], -1, tl.int32)
    has_nan = tl.zeros([], tl.int32)
    for n0 in range(0, N, CH):
        n = n0 + tl.arange(0, CH)
        inb = n < N
        ok = inb & (tl.load(valid_b + n, mask=inb, other=0) != 0)
        r = tl.where(ok, tl.load(rel_b + n, mask=inb, other=0.0), 0.0)
        d2 = tl.where(ok, (r * tl.load(gram_b + n.to(tl.int64) * (N + 1), mask=inb, other=0.0)) * r, 0.0)
        diag = tl.where(inb, d2, float("-inf"))
        top_nan = tl.maximum(top_nan, tl.max((diag != diag).to(tl.int32), 0))
        top = tl.maximum(top, tl.max(diag, 0))
        d2 = tl.where(ok, d2, float("-inf"))
        tl.store(r_b + n, r, mask=inb)
        tl.store(d2_b + n, d2, mask=inb)
        has_nan = tl.maximum(has_nan, tl.max(((d2 != d2) & inb).to(tl.int32), 0))
        v, idx = tl.max(tl.where(inb & (d2 == d2), d2, float("-inf")), 0, return_indices=True,
                        return_indices_tie_break_left=True)
        better = v > best_v  # strict: an earlier chunk keeps a tie
        best_i = tl.where(better, n0 + idx, best_i)
        best_v = tl.where(better, v, best_v)
    stop = tl.where(top_nan != 0, float("nan"), _DPP_STOP * top)
    tl.debug_barrier()
    i = tl.zeros([], tl.int32)
    active = (has_nan == 0) & (best_v > stop) & (k > 0)
    while active:
        j = best_i
        g = best_v
        sg = tl.sqrt_rn(g)
        r_j = tl.load(r_b + j)
        row_j = gram_b + j.to(tl.int64) * N
        best_v = tl.full([], float("-inf"), tl.float32)
        best_i = tl.full([], -1, tl.int32)
        has_nan = tl.zeros([], tl.int32)
        for n0 in range(0, N, CH):
            n = n0 + tl.arange(0, CH)
            inb = n < N
            lrow = (r_j * tl.load(row_j + n, mask=inb, other=0.0)) * tl.load(r_b + n, mask=inb, other=0.0)
            lrow = tl.where(tl.load(valid_b + n, mask=inb, other=0) != 0, lrow, 0.0)  # invalid columns are 0
            acc = tl.zeros([CH], tl.float32)
            for t0 in range(0, i, TB):  # Σ_{t<i} C[t, j] C[t, n]
                t = t0 + tl.arange(0, TB)
                c_j = tl.load(c_b + t.to(tl.int64) * N + j, mask=t < i, other=0.0)
                c_t = tl.load(c_b + t.to(tl.int64)[:, None] * N + n[None, :], mask=(t < i)[:, None] & inb[None, :],
                              other=0.0)
                acc += tl.sum(c_j[:, None] * c_t, 0)
            e = tl.div_rn(lrow - acc, sg)
            tl.store(c_b + i.to(tl.int64) * N + n, e, mask=inb)
            d2 = tl.load(d2_b + n, mask=inb, other=0.0) - e * e
            d2 = tl.where(n == j, float("-inf"), d2)
            tl.store(d2_b + n, d2, mask=inb)
            has_nan = tl.maximum(has_nan, tl.max(((d2 != d2) & inb).to(tl.int32), 0))
            v, idx = tl.max(tl.where(inb & (d2 == d2), d2, float("-inf")), 0, return_indices=True,
                            return_indices_tie_break_left=True)
            better = v > best_v
            best_i = tl.where(better, n0 + idx, best_i)
            best_v = tl.where(better, v, best_v)
        tl.store(order_b + i, j.to(tl.int64))
        tl.store(gain_b + i, g)
        i += 1
        active = (has_nan == 0) & (best_v > stop) & (i < k)
        tl.debug_barrier()
    for n0 in range(0, k, CH):
        t = n0 + tl.arange(0, CH)
        pad = (t >= i) & (t < k)
        tl.store(order_b + t, tl.full([CH], -1, tl.int64), mask=pad)
        tl.store(gain_b + t, tl.zeros([CH], tl.float32), mask=pad)


@triton.jit
def _dpp_kernel(vis_ptr, rel_ptr, valid_ptr, ws_ptr, ticket_ptr, order_ptr, gain_ptr, N, d, k, stride_vb, stride_vn,
                PREC: tl.constexpr, EVEN_D: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, CH: tl.constexpr,
                TB: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nb = tl.num_programs(1).to(tl.int64)
    T = tl.cdiv(N, BM)
    gram_b = ws_ptr + b * N * N  # [B, N, N] S, then [B, N] d2, [B, N] r, [B, k, N] C
    rest = ws_ptr + nb * N * N
    _gram_tile(vis_ptr + b * stride_vb, stride_vn, gram_b, pid, N, d, BM, BD, PREC, EVEN_D)
    if _arrive(ticket_ptr + b, T * (T + 1) // 2):
        _dpp_tail(gram_b, rel_ptr + b * N, valid_ptr + b * N, rest + b * N, rest + nb * N + b * N,
                  rest + 2 * nb * N + b * k * N, order_ptr + b * k, gain_ptr + b * k, N, k, CH, TB)


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # fixed when triton is imported, so read once


def _interpreting() -> bool:
    return _INTERPRET


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


def dpp_greedy(vis, relevance, valid, k, *, block_m=None, chunk=None, t_block=None, num_warps=None):
    """Greedy DPP MAP on ``vis`` [B, N, d] (float32 / float16 / bfloat16, unit stride in d) with ``relevance`` [B, N]
    float32 and ``valid`` [B, N] bool. Returns (order [B, k] int64, -1 padded after the stop; gain [B, k] float32)."""
    B, N, d = vis.shape
    dev = vis.device
    order = torch.empty(B, k, dtype=torch.int64, device=dev)
    gain = torch.empty(B, k, dtype=torch.float32, device=dev)
    if B == 0 or k == 0:
        return order, gain
    if N == 0:
        return order.fill_(-1), gain.zero_()
    p2 = lambda x: triton.next_power_of_2(max(int(x), 1))  # noqa: E731
    interp = _interpreting()
    half = vis.dtype != torch.float32
    if interp:  # programs run one by one in Python: few big tiles
        bm = block_m or min(max(p2(N), 16), 128)
        bd = min(max(p2(d), 16), 256)
        prec = 1 if vis.dtype == torch.bfloat16 else (0 if half else 2)  # interpreter bfloat16 dots are wrong: widen
    else:
        bm = block_m or 64
        bd = 64 if half else 32
        prec = 0 if half else 2
    ch = chunk or min(max(p2(N), 16), 4096 if interp else 1024)
    tb = t_block or (32 if interp else 8)
    T = triton.cdiv(N, bm)
    per_call = min(B, 65535, max(1, GRAM_BYTES // (N * N * 4)))
    ws = torch.empty(per_call * (N * N + 2 * N + k * N), dtype=torch.float32, device=dev)
    tickets = _tickets(dev, per_call)
    rel = relevance if relevance.dtype == torch.float32 else relevance.float()
    for b0 in range(0, B, per_call):
        nb = min(B, b0 + per_call) - b0
        part = (lambda x: x) if nb == B else (lambda x, b0=b0, nb=nb: x[b0 : b0 + nb])
        vb = part(vis)
        _dpp_kernel[(T * (T + 1) // 2, nb)](
            vb, part(rel), part(valid), ws, tickets, part(order), part(gain), N, d, k, vb.stride(0), vb.stride(1),
            PREC=prec, EVEN_D=d % bd == 0, BM=bm, BD=bd, CH=ch, TB=tb,
            num_warps=num_warps or 4, num_stages=3 if half else 2, enable_fp_fusion=False,
        )
    return order, gain
