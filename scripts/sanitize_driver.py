"""A small driver for compute-sanitizer (scripts/gpu_check.sh): every op of the GPU backends on the GPU test shapes.

Runs each selection method and primitive on the ``triton`` and ``cuda`` backends (whichever can run here) for every
dtype, on shapes that reach the kernels' edges: partial Gram tiles (N, L not multiples of 64), a depth that is not a
multiple of the stage width, rows that are not 16-byte aligned (the plain-load path), no prompt rows, k_p = 0, k = N,
seeds with padding, a ``valid`` mask and a caller's Gram matrix; the cuda backend also on its global-workspace and
rows-on-demand paths. Every result is checked to be a valid selection, so a kernel that reads garbage without faulting
is caught too. Exits non-zero on the first failure; the sanitizer's own findings set its exit code
(``--error-exitcode``).

    python scripts/sanitize_driver.py [--backends triton cuda] [--dtypes float32 bfloat16] [--quick]

Without a GPU it runs the same calls on CPU tensors with the backends that run there (the cpu backend, and triton under
TRITON_INTERPRET=1), which checks the driver itself.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import mob_kernels as mk

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (B, N, L, d, k_p, k): partial tiles everywhere; a depth with a tail; no prompt; k_p = 0; k = N.
SHAPES = [
    (2, 150, 5, 48, 12, 24),
    (1, 70, 0, 33, 0, 10),
    (2, 65, 3, 8, 4, 65),
    (1, 130, 70, 40, 20, 20),
]
QUICK_SHAPES = SHAPES[:2]


def features(shape, dtype, seed, device, unaligned=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    if not unaligned:
        return x.to(device)
    B, R, d = shape  # the same values one element off a 16-byte boundary: the kernels' plain-load path
    flat = torch.zeros(B * R * d + 1, dtype=dtype, device=device)
    flat[1:] = x.reshape(-1).to(device)
    return flat[1:].view(B, R, d)


def check(out, B, N, k, what):
    out = out.reshape(B, k).cpu()
    ok = ((out >= 0) & (out < N)).all() and (k < 2 or (out[:, 1:] > out[:, :-1]).all())
    if not bool(ok):
        raise AssertionError(f"{what}: not a valid selection: {out}")


def check_picks(picks, N, what):
    p = picks.cpu()
    for row in p.tolist():
        real = [i for i in row if i >= 0]
        if len(set(real)) != len(real) or any(i >= N for i in real) or row[len(real):] != [-1] * (len(row) - len(real)):
            raise AssertionError(f"{what}: bad picks row {row}")


def run_backend(backend, device, dtypes, shapes):
    calls = 0
    for dt_name in dtypes:
        dt = DTYPES[dt_name]
        for s, (B, N, L, d, k_p, k) in enumerate(shapes):
            for unaligned in (False, True):
                vis = features((B, N, d), dt, 10 * s + 1, device, unaligned)
                prompt = features((B, max(L, 1), d), dt, 10 * s + 2, device, unaligned)[:, :L]
                mask = torch.ones(B, L, dtype=torch.bool, device=device)
                if L > 1:
                    mask[-1, L // 2:] = False  # padding prompt rows
                what = f"{backend} {dt_name} B={B} N={N} L={L} d={d} k_p={k_p} k={k}{' unaligned' if unaligned else ''}"
                check(mk.select(vis, prompt, k_p, k, prompt_mask=mask, backend=backend), B, N, k, f"select {what}")
                picks, count = mk.prompt_cover(vis, prompt, k_p, prompt_mask=mask, backend=backend)
                check_picks(picks, N, f"prompt_cover {what}")
                seed = torch.full((B, 3), -1, dtype=torch.int64, device=device)
                seed[0, 0], seed[-1, 2] = 0, N - 1
                kk = min(k, N - 2)
                fps = mk.farthest_point_sample(vis, kk, seed, backend=backend)
                check_picks(fps, N, f"farthest_point_sample {what}")
                valid = torch.rand(B, N, generator=torch.Generator().manual_seed(s)).to(device) < 0.7
                check(mk.divprune(vis, k, valid=valid, backend=backend), B, N, k, f"divprune {what}")
                rel = torch.rand(B, N, generator=torch.Generator().manual_seed(s + 1)).to(device)
                check(mk.cdpruner(vis, rel, k, valid=valid, backend=backend), B, N, k, f"cdpruner {what}")
                calls += 5
                if backend == "cuda":  # the primitives directly: the caller's Gram matrix, valid, dpp
                    from mob_kernels.backends.cuda import BACKEND as P

                    sim = P.gram(vis)
                    num = torch.full((B,), kk, dtype=torch.int64, device=device)
                    check_picks(P.farthest_point_sample(vis, seed, num, kk, valid, sim), N, f"fps(valid, sim) {what}")
                    order, _ = P.dpp_greedy(vis, rel, valid, k)
                    check_picks(order, N, f"dpp_greedy {what}")
                    calls += 3
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    args = ap.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = QUICK_SHAPES if args.quick else SHAPES
    ran = []
    t0 = time.perf_counter()
    for backend in args.backends:
        if device == "cpu" and backend == "cuda":
            backend = "cpu"  # the driver's own check without a GPU: the C++ backend stands in
        if backend not in mk.available_backends(device):
            print(f"sanitize_driver: backend {backend!r} cannot run on {device} here; skipped", file=sys.stderr)
            continue
        if backend == "cuda":
            from mob_kernels.backends import cuda as cuda_mod

            n = 0
            for force_global, on_demand in ((False, False), (True, False), (False, True)):
                cuda_mod.FORCE_GLOBAL_WORKSPACE, cuda_mod.ROWS_ON_DEMAND = force_global, on_demand
                n += run_backend(backend, device, args.dtypes, shapes)
            cuda_mod.FORCE_GLOBAL_WORKSPACE = cuda_mod.ROWS_ON_DEMAND = False
        else:
            n = run_backend(backend, device, args.dtypes, shapes)
        ran.append(f"{backend} ({n} calls)")
    if device == "cuda":
        torch.cuda.synchronize()
    if not ran:
        print("sanitize_driver: no backend ran", file=sys.stderr)
        return 1
    print(f"sanitize_driver: ok on {device}: {', '.join(ran)} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
