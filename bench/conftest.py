"""Shared set-up for the pytest-benchmark files: cached inputs, the backends to time, and a closing summary that puts
each implementation's median next to the reference's and checks the project's speed targets.

Targets (ratios of medians from one run on the 2-core development machine), for the cpu backend over the reference:
MoB's select at least 3x at the LLaVA-1.5 and LLaVA-NeXT shapes in float32 and bfloat16 and at least 20x at the small
shape; DivPrune and CDPruner at least 5x at LLaVA-1.5 (N=576, d=4096, k=64) in float32 and bfloat16. They are
reported, not enforced, unless ``--mob-enforce-targets`` is given: wall-clock ratios on a shared machine are evidence,
not a unit test.
"""

from __future__ import annotations

import functools

import pytest
import torch

import mob_kernels
from mob_kernels.bench.presets import Case, build_preset, make_inputs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton on CPU tensors would run in its interpreter: not worth timing.
BACKENDS = [b for b in mob_kernels.available_backends(DEVICE) if not (b == "triton" and DEVICE == "cpu")]

# (stage or method, preset, k) -> minimum speed-up of cpu over the reference.
TARGETS = {("select", "llava15", 64): 3.0, ("select", "llava_next", 320): 3.0, ("select", "small", 16): 20.0,
           ("divprune", "llava15", 64): 5.0, ("cdpruner", "llava15", 64): 5.0}

_medians: dict[tuple, float] = {}


def cases(preset: str, budgets=(64, 128, 192), methods=("select",)) -> list[Case]:
    return build_preset(preset, budgets, methods)


def case_id(case: Case) -> str:
    return f"{case.preset}-N{case.N}-d{case.d}-k{case.k}" + (f"-B{case.B}" if case.B != 1 else "")


@functools.lru_cache(maxsize=4)
def inputs(case: Case, dtype: str):
    return make_inputs(case, DTYPES[dtype], DEVICE)


def run_benchmark(benchmark, key: tuple, fn):
    """Times ``fn`` with pytest-benchmark (synchronising after each call on CUDA) and records the median."""
    if DEVICE == "cuda":
        def timed():
            out = fn()
            torch.cuda.synchronize()
            return out
    else:
        timed = fn
    benchmark.group = " ".join(str(k) for k in key[:-1])
    out = benchmark(timed)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        _medians[key] = stats.stats.median
    return out


def pytest_addoption(parser):
    parser.addoption("--mob-enforce-targets", action="store_true",
                     help="fail the session when cpu misses a speed-up target over the reference")


def _target_lines() -> tuple[list[str], bool]:
    """One line per measured implementation other than the reference: its ratio to the reference's median on the same
    case, and for the cpu backend the target where there is one."""
    lines, ok = [], True
    for key, median in sorted(_medians.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        *case_key, impl = key
        ref = _medians.get(tuple(case_key) + ("reference",))
        if impl == "reference" or ref is None:
            continue
        ratio = ref / median
        stage, preset, k = case_key[0], case_key[1], case_key[4]
        target = TARGETS.get((stage, preset, k)) if impl == "cpu" else None
        verdict = ""
        if target is not None:
            met = ratio >= target
            ok &= met
            verdict = f"  target {target:.0f}x: {'met' if met else 'MISSED'}"
        lines.append(f"{' '.join(str(c) for c in case_key):<48} {impl:<10} {ratio:7.2f}x vs reference{verdict}")
    return lines, ok


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines, _ = _target_lines()
    if lines:
        terminalreporter.section("mob_kernels: every implementation vs the reference (ratio of medians)")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("--mob-enforce-targets"):
        _, ok = _target_lines()
        if not ok and exitstatus == 0:
            session.exitstatus = 1
