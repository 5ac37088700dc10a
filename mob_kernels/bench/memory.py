"""Workspace per call: the peak memory a call needs beyond its inputs (and, on CUDA, the outputs it returns).

How each number is obtained (the ``workspace_how`` field of a result row says which):

* CUDA, measured: ``torch.cuda.reset_peak_memory_stats()``, one call, synchronise; workspace =
  ``max_memory_allocated()`` minus ``memory_allocated()`` after the call (which still holds the returned outputs).
  Everything the CUDA and Triton backends allocate goes through torch's caching allocator, so this is complete.
* CPU, measured two ways, each a lower bound of the true peak, and the larger is reported:

  - ``rss``: the process's peak resident memory during one call. glibc's ``malloc_trim(0)`` first hands free heap
    pages back to the OS, ``/proc/self/clear_refs`` (``5``) resets the peak (VmHWM) to the current RSS, then
    workspace = VmHWM after the call − VmRSS before it. This sees every allocator: torch's, the C++ kernels'
    ``std::vector``s, NumPy's, faiss's and fpsample's own buffers. Page-granular and good to a few hundred KiB
    (on the development machine an 8-32 MiB block read up to ~200 KiB low); it misses memory the allocator serves
    from pages that stayed resident, so small workspaces read low or zero. Linux with glibc only.
  - ``torch+python``: one call under ``torch.profiler`` with ``profile_memory=True`` (every allocation and free of
    torch's CPU allocator, ATen's internal buffers included, replayed in time order: the running peak minus what is
    still allocated when the call returns) plus ``tracemalloc``'s peak for Python objects and NumPy arrays (from just
    before the call, inside the profiler, whose own entry allocations differ between torch releases). Exact for
    those allocators, blind to memory allocated in C/C++ outside them.

  The two run as separate calls (the profiler's own buffers would otherwise count as the call's resident memory).
  The JSON and CSV keep both (``workspace_rss_bytes``, ``workspace_torch_bytes``).
"""

import contextlib
import os
import sys
import tracemalloc
from typing import Callable

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines) for the duration."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _allocation_peak(prof) -> tuple[int, int] | None:
    """(peak, net) bytes of torch CPU allocations recorded by a finished profiler, or None when it has no event tree."""
    try:
        roots = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:
        return None
    events: list[tuple[int, int]] = []
    stack = list(roots)
    while stack:
        node = stack.pop()
        if str(getattr(node, "tag", "")).endswith("Allocation"):
            fields = node.extra_fields
            if str(getattr(fields, "device", "cpu")).startswith("cpu"):
                events.append((node.start_time_ns, int(fields.alloc_size)))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak, cur


_profiler_warm = False


def torch_cpu_workspace(fn: Callable[[], object]) -> tuple[int | None, int, object]:
    """(torch allocator workspace or None if unmeasurable, Python/NumPy workspace, fn's output) of one call."""
    global _profiler_warm
    if not _profiler_warm:  # the profiler's first use imports and builds things tracemalloc would count
        _profiler_warm = True
        _measure(lambda: torch.zeros(1))
    return _measure(fn)


def _measure(fn: Callable[[], object]) -> tuple[int | None, int, object]:
    from torch.profiler import ProfilerActivity, profile

    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        with _quiet_stderr():
            prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            prof.__enter__()
        try:
            # The Python baseline is taken inside the profiler, just before the call: what the profiler itself
            # allocates or frees on entry (it differs between torch releases) is not the call's.
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            out = fn()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            with _quiet_stderr():
                prof.__exit__(None, None, None)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    py = max(0, peak - base)  # includes the Python objects of the output (a tensor's: ~100 B)
    got = _allocation_peak(prof)
    return (None if got is None else max(0, got[0] - got[1])), py, out


def cuda_workspace(fn: Callable[[], object]) -> tuple[int, object]:
    """(peak bytes allocated during one call beyond what it returns, fn's output) on the current CUDA device."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()), out


# ------------------------------------------------------------------------------------------------------- RSS (CPU)


def _status_bytes(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0]) * 1024  # kB
    return out


_libc = None
_rss_reason: list[str | None] = []  # cached answer of rss_available()


def rss_available() -> str | None:
    """None when the RSS measurement works here, else why not (checked once per process)."""
    global _libc
    if _rss_reason:
        return _rss_reason[0]
    reason = None
    if not os.path.exists("/proc/self/clear_refs"):
        reason = "no /proc/self/clear_refs (not Linux)"
    else:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except (OSError, AttributeError) as e:
            reason = f"cannot trim the heap and reset the peak RSS here ({e})"
    _rss_reason.append(reason)
    return reason


def rss_workspace(fn: Callable[[], object]) -> tuple[int | None, object]:
    """(peak resident bytes one call of ``fn`` adds, or None where unmeasurable; fn's output)."""
    if rss_available() is not None:
        return None, fn()
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_bytes("VmRSS")["VmRSS"]
    out = fn()
    peak = _status_bytes("VmHWM")["VmHWM"]
    return max(0, peak - base), out


def cpu_workspace(fn: Callable[[], object]) -> tuple[int, str, dict]:
    """(bytes, how, parts) for one call on the CPU: the larger of the RSS and the torch+python measurements."""
    rss, _ = rss_workspace(fn)
    torch_ws, py_ws, _ = torch_cpu_workspace(fn)
    tp = py_ws + (torch_ws or 0)
    parts = {"workspace_rss_bytes": rss, "workspace_torch_bytes": tp}
    if rss is None:
        return tp, "torch profiler + tracemalloc (no RSS here: C/C++ allocations outside torch not seen)", parts
    return max(rss, tp), "max(RSS peak, torch profiler + tracemalloc)", parts


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
