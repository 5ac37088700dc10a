"""Benchmarks for mob_kernels: ``python -m mob_kernels.bench`` (see ``mob_kernels.bench.cli``).

Times ``select`` and its two stages (prompt cover, farthest point sampling) for every available backend and for the
peers people use today (faiss-cpu, fpsample, a DivPrune-style eager loop), checks every output against the reference,
and writes a table, JSON (with the machine) and a PNG plot. ``--preset demo`` is the README's main job.
"""

from .presets import PRESETS, Case, build_preset, make_inputs
from .timing import Policy, Timing, summarize, time_fn

__all__ = ["PRESETS", "Case", "build_preset", "make_inputs", "Policy", "Timing", "summarize", "time_fn"]
