"""Timers: wall clock on the CPU, device time (CUDA events) on a GPU, and CUDA-graph replays; all report the median
and interquartile range.

Each measurement warms up first (the first call pays for lazy initialisation, allocator growth, Triton compilation),
then repeats until it has at least ``min_repeats`` samples and has spent ``budget_s`` seconds, or reached
``max_repeats``. A call slower than ``budget_s`` therefore gets exactly ``min_repeats`` samples, which keeps the slow
baselines (the reference at N = 4096, fpsample at N = 2880) from dominating a run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    warmup: int
    timer: str  # "perf_counter" (host wall clock) or "cuda_event" (device time)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "iqr_ms": self.iqr_ms}


def summarize(samples_ms: list[float], *, warmup: int, timer: str) -> Timing:
    """Median, quartiles (inclusive method: the quartiles of 3 samples are the midpoints), min and max of samples."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    s = sorted(samples_ms)
    if len(s) == 1:
        q1 = q3 = s[0]
    else:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    return Timing(statistics.median(s), q1, q3, s[0], s[-1], len(s), warmup, timer)


@dataclass(frozen=True)
class Policy:
    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 50
    budget_s: float = 0.5

    def slow_warmup(self, first_call_s: float) -> int:
        # One warm-up call suffices for anything that takes longer than the whole budget.
        return 1 if first_call_s >= self.budget_s else self.warmup


def time_host(fn: Callable[[], object], policy: Policy = Policy()) -> tuple[Timing, object]:
    """Wall-clock time of ``fn()`` (CPU backends and CPU peers), and what the last call returned."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    warmup = policy.slow_warmup(first)
    for _ in range(warmup - 1):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < policy.max_repeats and (
        len(samples) < policy.min_repeats or time.perf_counter() - start < policy.budget_s
    ):
        t0 = time.perf_counter()
        out = fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples, warmup=warmup, timer="perf_counter"), out


def time_cuda(fn: Callable[[], object], policy: Policy = Policy()) -> tuple[Timing, object]:
    """Device time of ``fn()`` from CUDA events around each call (one synchronisation at the end, so launches of
    consecutive calls overlap the way they do in a model), and what the last call returned. A host sync inside
    ``fn`` (``.item()``) is included."""
    import torch

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    warmup = policy.slow_warmup(first)
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    # Size the run from the (warm) cost of one call: budget_s worth of calls within [min_repeats, max_repeats].
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    per_call = max(time.perf_counter() - t0, 1e-6)
    n = int(min(policy.max_repeats, max(policy.min_repeats, policy.budget_s / per_call)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    out = None
    for s, e in zip(starts, ends):
        s.record()
        out = fn()
        e.record()
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], warmup=warmup + 1, timer="cuda_event"), out


def capture_cuda_graph(fn: Callable[[], object], warmup: int = 2) -> tuple[object, object]:
    """(graph, static output): ``fn`` warmed up on a side stream (allocator, Triton compilation, lazy state), then
    captured once into a ``torch.cuda.CUDAGraph``. ``graph.replay()`` re-runs the captured kernels and rewrites the
    static output in place. Raises what capture raises (a host synchronisation inside ``fn``, say)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out


def time_cuda_graph(fn: Callable[[], object], policy: Policy = Policy()) -> tuple[Timing, object]:
    """Device time of replaying ``fn`` from a CUDA graph captured after warm-up (CUDA events around each replay), and
    the static output after the last replay. ``timer`` is "cuda_graph"."""
    import torch

    graph, out = capture_cuda_graph(fn, policy.warmup)
    timing, _ = time_cuda(graph.replay, Policy(warmup=1, min_repeats=policy.min_repeats,
                                               max_repeats=policy.max_repeats, budget_s=policy.budget_s))
    torch.cuda.synchronize()
    return Timing(**{**timing.__dict__, "warmup": timing.warmup + max(1, policy.warmup), "timer": "cuda_graph"}), out


def time_fn(fn: Callable[[], object], device: str, policy: Policy = Policy()) -> tuple[Timing, object]:
    """Device time on CUDA, wall-clock time otherwise; and the last call's output (to check it)."""
    return time_cuda(fn, policy) if str(device).startswith("cuda") else time_host(fn, policy)
