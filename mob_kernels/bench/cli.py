"""``python -m mob_kernels.bench``: time every selection method, backend and peer side by side, against the reference.

    python -m mob_kernels.bench --preset demo                   # the main job (``make demo``): one LLaVA-1.5 image
    python -m mob_kernels.bench                                 # every CPU preset and method; JSON, MD, CSV, PNG
    python -m mob_kernels.bench --preset llava15 --method divprune --method cdpruner --dtype bfloat16
    python -m mob_kernels.bench --shape 1,576,4096,64,64,32 --shape 1,576,4096,64,128 --dtype float32
    python -m mob_kernels.bench --preset gpu                    # the GPU check (needs CUDA): eager and CUDA graphs

Methods (``--method``, repeatable; default every registered method a preset has cases for): ``select`` (MoB, with its
two stages cover and fps timed alone too), ``divprune``, ``cdpruner``, ``d2pruner`` and ``btp_stage`` (one BTP stage: the
released LLaVA-1.5 first stage, scaled to the case). ``--shape B,N,d,L,k[,k_p]`` (repeatable)
adds a custom case for every chosen method; k_p defaults to ``mob_kernels.prompt_budget(k)``.

Every output is checked against the reference backend's output on the same input, so a speed-up is never quoted
for a wrong answer ("agrees" in the JSON and CSV; "!" in the tables; when they differ, the reference's closest
decision margin says whether the input held a near-tie). Each measurement also records the workspace of one call
(``mob_kernels/bench/memory.py`` says how it is measured on each device).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import mob_kernels as mk

from . import memory
from . import peers as peer_mod
from .machine import machine_info, machine_line
from .presets import (
    BENCH_METHODS,
    DEFAULT_PRESETS,
    GPU_PRESETS,
    OBJECT_REGION,
    PRESETS,
    Case,
    build_preset,
    grid_side,
    btp_stage_args,
    make_importance,
    make_inputs,
    make_relevance,
    parse_shape,
    token_regions,
)
from .report import LEGEND, console_table, markdown_report, mismatch_lines, write_csv, write_plot
from .timing import Policy, time_cuda_graph, time_fn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("select", "cover", "fps")  # MoB's; the other methods have one stage, the method itself
DEFAULT_DTYPES = ("float32", "bfloat16")


def default_backends(device: str) -> list[str]:
    # Triton on CPU tensors runs in its interpreter: a correctness tool, not something to time.
    return [b for b in mk.available_backends(device) if not (b == "triton" and device == "cpu")]


def bench_methods() -> list[str]:
    """The registered selection methods the bench can feed, in registration order."""
    return [m for m in mk.method_names() if m in BENCH_METHODS]


def stages_of(method: str, select_stages) -> list[str]:
    return list(select_stages) if method == "select" else [method]


# ------------------------------------------------------------------------------------------------------------ jobs


@dataclasses.dataclass(frozen=True)
class Job:
    """One measurement: an implementation of one stage on one (case, dtype)."""

    case: Case
    dtype: str
    stage: str
    impl: str
    kind: str  # "backend" or "peer"
    mode: str  # "eager" or "graph"
    device: str

    def what(self) -> str:
        return f"{self.case.label()} {self.dtype} {self.stage} {self.impl}" + (" graph" if self.mode == "graph" else "")

    def work(self) -> float:
        """Rough multiply-adds of one call (only ratios between jobs of one implementation matter: the ETA)."""
        c = self.case
        base = c.B * c.N * c.d
        return float({"select": base * (c.L + c.k), "cover": base * c.L, "fps": base * c.k,
                      "divprune": base * (c.N + c.k), "cdpruner": base * c.N + c.B * c.N * c.k * c.k,
                      "d2pruner": base * c.N, "btp_stage": base * (c.N + c.k)}
                     .get(self.stage, base * c.k)) or 1.0


def case_dtypes(case: Case, dtypes: list[str], explicit: bool) -> list[str]:
    if case.dtypes is None:
        return dtypes
    return [d for d in case.dtypes if d in dtypes] if explicit else list(case.dtypes)


def plan(cases: list[Case], dtypes: list[str], dtypes_explicit: bool, backends: list[str], peers: list[str],
         select_stages: list[str], device: str, graphs: bool) -> list[Job]:
    """Every measurement of a run, in order: per (case, dtype, stage) the reference first (its output is the answer
    the others are checked against), the other backends (each followed by its CUDA-graph replay when ``graphs``),
    then the peers that stand in for that stage."""
    jobs = []
    for case in cases:
        for dt in case_dtypes(case, dtypes, dtypes_explicit):
            for stage in stages_of(case.method, select_stages):
                for b in backends:
                    jobs.append(Job(case, dt, stage, b, "backend", "eager", device))
                    if graphs and b != "reference":
                        jobs.append(Job(case, dt, stage, b, "backend", "graph", device))
                for p in peers:
                    if peer_mod.STAGE_OF_PEER[p] == stage and (dt == "float32" or p in peer_mod.ANY_DTYPE):
                        jobs.append(Job(case, dt, stage, p, "peer", "eager", peer_mod.peer_device(p, device)))
    return jobs


class Progress:
    """Progress lines on stderr with an ETA. The ETA models each remaining measurement from its implementation's
    observed cost per multiply-add and the timing policy (warm-up, the memory call, repeats up to ``budget_s``),
    scaled by how far the model was off for the measurements already made."""

    def __init__(self, jobs: list[Job], policy: Policy, enabled: bool, clock=time.perf_counter):
        self.jobs, self.policy, self.enabled, self.clock = jobs, policy, enabled, clock
        self.done = 0
        self.start = clock()
        self.rate: dict[tuple, float] = {}  # (impl, mode, stage) -> seconds per unit of work, from its medians

    def _rate(self, job: Job) -> float | None:
        for key in ((job.impl, job.mode, job.stage), (job.impl, job.mode), (job.impl,)):
            got = [r for k, r in self.rate.items() if k[:len(key)] == key]
            if got:
                return sorted(got)[len(got) // 2]
        return sorted(self.rate.values())[len(self.rate) // 2] if self.rate else None

    def predict(self, job: Job) -> float:
        rate = self._rate(job)
        if rate is None:
            return self.policy.budget_s
        t = rate * job.work()
        p = self.policy
        return (p.warmup + 1) * t + min(max(p.min_repeats * t, p.budget_s), p.max_repeats * t)

    def eta(self) -> float | None:
        if not self.done or not self.rate:
            return None
        elapsed = self.clock() - self.start
        modelled = sum(self.predict(j) for j in self.jobs[:self.done]) or 1e-9
        return elapsed / modelled * sum(self.predict(j) for j in self.jobs[self.done:])

    def step(self, job: Job, median_ms: float) -> str:
        self.rate[(job.impl, job.mode, job.stage)] = median_ms / 1e3 / job.work()
        self.done += 1
        elapsed = self.clock() - self.start
        eta = self.eta()
        left = "done" if self.done == len(self.jobs) else ("ETA ?" if eta is None else f"ETA {fmt_duration(eta)}")
        line = f"[{self.done:>3}/{len(self.jobs)}] {elapsed:6.1f}s {left:>11}  {job.what()}: {median_ms:.3f} ms"
        if self.enabled:
            print(line, file=sys.stderr, flush=True)
        return line


def fmt_duration(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


# --------------------------------------------------------------------------------------------------------- running


def _rows_of(x) -> list[list[int]]:
    if isinstance(x, torch.Tensor):
        x = x.cpu().tolist()
    return [[int(i) for i in row if i >= 0] for row in x]


def _compare(got: list[list[int]], want: list[list[int]]) -> tuple[bool, float]:
    """(exactly equal, fraction of the reference's indices that the output also holds)."""
    total = sum(len(w) for w in want)
    shared = sum(len(set(g) & set(w)) for g, w in zip(got, want))
    return got == want, (shared / total if total else 1.0)


class CaseInputs:
    """The inputs of one (case, dtype), made once, and the callables of every implementation of every stage."""

    def __init__(self, case: Case, dtype: str, device: str):
        self.case, self.dtype, self.device = case, dtype, device
        self.vis, self.prompt = make_inputs(case, DTYPES[dtype], device)
        self.relevance = make_relevance(self.vis, self.prompt) if case.method == "cdpruner" else None
        self.importance = make_importance(self.vis, self.prompt) if case.method in ("d2pruner", "btp_stage") else None
        self._cover = None

    def cover(self):
        """The reference's cover picks and, for the FPS stage as select runs it, how many picks remain (one k for
        the batch: k - the smallest count)."""
        if self._cover is None:
            cover, count = mk.prompt_cover(self.vis, self.prompt, self.case.k_p, backend="reference")
            self._cover = (cover, self.case.k - int(count.min()))
        return self._cover

    def call(self, stage: str, impl: str, kind: str):
        c, vis, prompt = self.case, self.vis, self.prompt
        if kind == "peer":
            if stage in ("cover", "fps"):
                seed, k_fps = self.cover()
                return peer_mod.peer_call(impl, vis, prompt, c.k_p, 0, _rows_of(seed), [k_fps] * c.B)
            return peer_mod.peer_call(impl, vis, k=c.k, relevance=self.relevance)
        if stage == "select":
            return lambda: mk.select(vis, prompt, c.k_p, c.k, backend=impl)
        if stage == "cover":
            return lambda: mk.prompt_cover(vis, prompt, c.k_p, backend=impl)[0]
        if stage == "fps":
            seed, k_fps = self.cover()
            return lambda: mk.farthest_point_sample(vis, k_fps, seed=seed, backend=impl)
        if stage == "divprune":
            return lambda: mk.divprune(vis, c.k, backend=impl)
        if stage == "cdpruner":
            return lambda: mk.cdpruner(vis, self.relevance, c.k, backend=impl)
        if stage in ("d2pruner", "btp_stage"):
            importance = self.importance
            assert importance is not None  # made for these methods' cases
            if stage == "d2pruner":
                return lambda: mk.d2pruner(vis, importance, c.k, backend=impl)[0]
            args = btp_stage_args(c)
            return lambda: mk.btp_stage(vis, importance, c.k, backend=impl, **args)
        raise ValueError(f"unknown stage {stage!r}")

    def picks(self, stage: str, out) -> list[list[int]]:
        rows = _rows_of(out)
        # DivPrune's released loop returns picks in selection order; the method's output is sorted.
        return [sorted(r) for r in rows] if stage in ("divprune", "cdpruner") else rows

    def margin(self, stage: str) -> float | None:
        c = self.case
        if stage not in peer_mod.MARGIN_STAGES:
            return None  # no margin model for this method: a disagreement is reported as is
        seeds = _rows_of(self.cover()[0]) if stage == "fps" else None
        return peer_mod.decision_margin(stage, self.vis, prompt=self.prompt, k_p=c.k_p, k=c.k,
                                        relevance=self.relevance, seeds=seeds)


def measure_workspace(job: Job, fn) -> tuple[int | None, str, dict]:
    """(bytes, how, parts) for one call of ``fn`` (see ``memory``)."""
    if job.device.startswith("cuda"):
        ws, _ = memory.cuda_workspace(fn)
        return ws, "cuda max_memory_allocated", {}
    return memory.cpu_workspace(fn)


def run_jobs(jobs: list[Job], policy: Policy, progress: Progress, *, workspace: bool = True) -> list[dict]:
    rows: list[dict] = []
    inputs: CaseInputs | None = None
    want: dict[tuple, list[list[int]]] = {}
    ref_ms: dict[tuple, float] = {}
    eager_ws: dict[tuple, tuple] = {}
    margins: dict[tuple, float | None] = {}
    for job in jobs:
        if inputs is None or (inputs.case, inputs.dtype) != (job.case, job.dtype):
            # A (case, dtype) starts with the reference backend, on the run's device.
            inputs = CaseInputs(job.case, job.dtype, job.device)
        key = (job.case, job.dtype, job.stage)
        fn = inputs.call(job.stage, job.impl, job.kind)
        ws, how, parts = None, None, {}
        if job.mode == "graph":
            try:
                timing, out = time_cuda_graph(fn, policy)
            except Exception as e:  # noqa: BLE001 - a backend that cannot be captured is a result, not a crash
                print(f"{job.what()}: CUDA graph capture failed ({type(e).__name__}: {e}); no graph column here",
                      file=sys.stderr)
                progress.jobs = [j for j in progress.jobs if j is not job]
                continue
            ws, how, parts = eager_ws.get((key, job.impl), (None, None, {}))
            how = how and f"{how} (eager call; replays reuse the graph's pool)"
        else:
            timing, out = time_fn(fn, job.device, policy)
            if workspace:
                ws, how, parts = measure_workspace(job, fn)
                eager_ws[(key, job.impl)] = (ws, how, parts)
        got = inputs.picks(job.stage, out)
        if job.impl == "reference":
            want[key], ref_ms[key] = got, timing.median_ms
        agrees, overlap = _compare(got, want[key])
        margin = None
        if not agrees:
            if key not in margins:
                margins[key] = inputs.margin(job.stage)
            margin = margins[key]
        rows.append({**job.case.as_dict(), "dtype": job.dtype, "stage": job.stage, "impl": job.impl,
                     "kind": job.kind, "mode": job.mode, "device": job.device, **timing.as_dict(),
                     "agrees": agrees, "overlap": overlap, "margin": margin,
                     "speedup": ref_ms[key] / timing.median_ms, "workspace_bytes": ws, "workspace_how": how,
                     **parts})
        progress.step(job, timing.median_ms)
    return rows


# ------------------------------------------------------------------------------------------------------------ demo


def kept_summary(case: Case, device: str) -> dict:
    """What select keeps on the demo input (float32, reference backend): how many from the prompt cover, how many from
    FPS, how many inside the region the prompt talks about, and a token map."""
    vis, prompt = make_inputs(case, torch.float32, device)
    keep = mk.select(vis, prompt, case.k_p, case.k, backend="reference")[0].cpu()
    cover, count = mk.prompt_cover(vis, prompt, case.k_p, backend="reference")
    cover = set(int(i) for i in cover[0].cpu() if i >= 0)
    region = token_regions(case.N)
    obj = set((region == OBJECT_REGION).nonzero().flatten().tolist())
    side = grid_side(case.N)
    marks = ["."] * case.N
    for i in keep.tolist():
        marks[i] = "P" if i in cover else "F"
    grid = ["".join(marks[r * side:(r + 1) * side]) for r in range((case.N + side - 1) // side)]
    kept = set(keep.tolist())
    return {
        "kept": len(kept), "of": case.N, "from_cover": len(cover), "from_fps": len(kept - cover),
        "object_tokens": len(obj), "cover_in_object": len(cover & obj), "fps_in_object": len((kept - cover) & obj),
        "regions_covered": len({int(region[i]) for i in kept}), "map": grid,
    }


def print_demo(case: Case, summary: dict, rows: list[dict], info: dict) -> None:
    print(f"MoB selection on a LLaVA-1.5-sized input: {case.N} visual tokens ({grid_side(case.N)} x "
          f"{grid_side(case.N)} grid), d={case.d}, prompt L={case.L}, keep k={case.k} (k_p={case.k_p}, fold auto)")
    print(f"Machine: {machine_line(info)}")
    s = summary
    print(f"\nKept {s['kept']} of {s['of']} tokens: {s['from_cover']} from the prompt cover, {s['from_fps']} from "
          f"farthest point sampling.")
    print(f"The prompt talks about one region of {s['object_tokens']} tokens: the cover took {s['cover_in_object']} of "
          f"its picks there, FPS {s['fps_in_object']} (FPS spreads the rest over {s['regions_covered']} of 16 regions).")
    print("Token map (P = prompt cover, F = FPS, . = dropped):")
    for line in s["map"]:
        print("   " + " ".join(line))
    print(f"\n{'backend':<10} {'dtype':<9} {'median':>10} {'IQR':>9} {'vs reference':>13}  agrees with reference")
    for r in rows:
        agree = "yes" if r["agrees"] else f"NO ({100 * r['overlap']:.0f}% of indices shared)"
        print(f"{r['impl']:<10} {r['dtype']:<9} {r['median_ms']:>7.2f} ms {r['iqr_ms']:>6.2f} ms "
              f"{r['speedup']:>12.1f}x  {agree}")


# --------------------------------------------------------------------------------------------------------- prefill


PREFILL_MODULE = "mob_kernels.integrations.prefill_bench"


def run_prefill(extra_args: str, out_stem: str) -> dict:
    """The end-to-end prefill table from the integrations, in a subprocess (it builds models; keep it isolated).
    Its rows (from ``<out_stem>.json``, which it writes) are embedded in this run's JSON."""
    try:
        found = importlib.util.find_spec(PREFILL_MODULE) is not None
    except ImportError:
        found = False
    if not found:
        print(f"prefill: {PREFILL_MODULE} is not available here (the model integrations are not installed); skipped")
        return {"status": "unavailable", "module": PREFILL_MODULE}
    args = shlex.split(extra_args)
    if "--out" not in args:
        args += ["--out", out_stem]
    else:
        out_stem = args[args.index("--out") + 1]
    cmd = [sys.executable, "-m", PREFILL_MODULE, *args]
    print(f"\nprefill: running {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode:
        print(proc.stderr, end="", file=sys.stderr)
    result = {"status": "ok" if proc.returncode == 0 else "failed",
              "command": ["python", "-m", PREFILL_MODULE, *args], "returncode": proc.returncode,
              "output": proc.stdout}
    written = Path(out_stem).with_suffix(".json")
    if proc.returncode == 0 and written.exists():
        result.update({"json": str(written), **json.loads(written.read_text())})
    return result


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mob_kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", "--presets", dest="presets", action="extend", nargs="+", default=None,
                    choices=PRESETS, metavar="NAME",
                    help=f"shape presets, repeatable ({', '.join(PRESETS)}); default: {' '.join(DEFAULT_PRESETS)} "
                         "(none when --shape is given)")
    ap.add_argument("--shape", dest="shapes", action="append", default=None, metavar="B,N,d,L,k[,k_p]",
                    help="a custom case, repeatable; k_p defaults to mob_kernels.prompt_budget(k)")
    ap.add_argument("--method", "--methods", dest="methods", action="extend", nargs="+", default=None,
                    metavar="NAME", help=f"selection methods, repeatable ({', '.join(BENCH_METHODS)}); default: every "
                                         "registered one that the chosen presets have cases for")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192],
                    help="K values for MoB's presets whose budget is not fixed (k_p = mob_kernels.prompt_budget(K))")
    ap.add_argument("--dtype", "--dtypes", dest="dtypes", action="extend", nargs="+", default=None,
                    choices=list(DTYPES), help="repeatable; default: float32 bfloat16 (the gpu preset pins its own)")
    ap.add_argument("--backends", nargs="+", default=None, help="default: every available backend on --device")
    ap.add_argument("--peers", nargs="+", default=None, choices=list(peer_mod.PEERS),
                    help="default: every installed peer")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="MoB stages to time")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                    help="also replay each non-reference backend from a CUDA graph (auto: on CUDA)")
    ap.add_argument("--no-memory", action="store_true", help="skip the workspace measurement (one extra call each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--max-repeats", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=0.5, help="seconds of repeats per measurement (at least "
                    "--min-repeats)")
    ap.add_argument("--out", default=None, help="directory for NAME.json, .md, .csv and .png "
                    "(default: ./mob_bench_results; the demo writes nothing unless asked)")
    ap.add_argument("--name", default="results", help="file stem inside --out")
    ap.add_argument("--json", default=None, help="write the JSON here (overrides --out)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--prefill", action="store_true", help=f"also run {PREFILL_MODULE} (end-to-end prefill table)")
    ap.add_argument("--prefill-args", default="", help="arguments passed on to the prefill benchmark")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the C++ kernels (default: "
                    "torch's, one per core); 1 makes timings on a shared machine far steadier")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap.parse_args(argv)


def _no_cuda_message(what: str) -> str:
    return (f"{what} needs a CUDA device, and torch.cuda.is_available() is False here (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda or 'none'}).")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.threads:
        # torch.set_num_threads sets OpenMP's thread count for this thread, which the C++ kernels' regions use too.
        torch.set_num_threads(args.threads)
    has_cuda = torch.cuda.is_available()
    device = args.device if args.device != "auto" else ("cuda" if has_cuda else "cpu")
    if device.startswith("cuda") and not has_cuda:
        print(_no_cuda_message(f"--device {device}") + " Nothing was measured.", file=sys.stderr)
        return 2

    registered = bench_methods()
    methods = args.methods or registered
    unknown = [m for m in methods if m not in registered]
    if unknown:
        print(f"--method: {unknown} not among the registered methods the bench runs ({registered})", file=sys.stderr)
        return 2
    presets = args.presets or ([] if args.shapes else list(DEFAULT_PRESETS))
    notes = []
    gpu_asked = [p for p in presets if p in GPU_PRESETS]
    if gpu_asked and not device.startswith("cuda"):
        print(_no_cuda_message(f"--preset {' '.join(gpu_asked)}") + " Its cases are skipped (run it on a machine "
              "with a GPU, e.g. python -m mob_kernels.bench --preset gpu).", file=sys.stderr)
        presets = [p for p in presets if p not in GPU_PRESETS]
        notes.append(f"preset {', '.join(gpu_asked)} skipped: no CUDA device")
    try:
        cases = [c for p in presets for c in build_preset(p, tuple(args.budgets), tuple(methods))]
        cases += [c for s in (args.shapes or []) for c in parse_shape(s, tuple(methods))]
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not cases:
        print("Nothing to measure: no case of the chosen presets and shapes applies to the chosen methods "
              f"({', '.join(methods)}).", file=sys.stderr)
        return 2
    notes += list(dict.fromkeys(c.note for c in cases if c.note))

    demo = presets == ["demo"] and not args.shapes
    backends = args.backends or default_backends(device)
    # Every ratio and every agreement check needs the reference, measured first.
    backends = ["reference", *[b for b in backends if b != "reference"]]
    peers = [] if (args.no_peers or demo) else (args.peers or peer_mod.available_peers())
    select_stages = ["select"] if demo else args.stages
    graphs = args.graphs == "on" or (args.graphs == "auto" and device.startswith("cuda"))
    if graphs and not device.startswith("cuda"):
        print("--graphs on needs --device cuda; no graph columns", file=sys.stderr)
        graphs = False
    dtypes = args.dtypes or list(DEFAULT_DTYPES)
    policy = Policy(warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                    budget_s=args.budget_s)
    jobs = plan(cases, dtypes, args.dtypes is not None, backends, peers, select_stages, device, graphs)
    if not jobs:
        print("Nothing to measure: the chosen dtypes leave no case to run.", file=sys.stderr)
        return 2
    progress = Progress(jobs, policy, enabled=not args.quiet and not demo)

    info = machine_info()
    if not demo:
        print(f"mob_kernels bench on {device}: {machine_line(info)}", flush=True)
        print(f"{len(cases)} cases, methods {methods}, dtypes {dtypes}, backends {backends}"
              f"{' (+ CUDA graphs)' if graphs else ''}, peers {peers}: {len(jobs)} measurements", flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
    load = info.get("load_average")
    if load and load[0] > (info["cpu_count"] or 1):
        print(f"warning: the machine is busy (load average {load[0]} on {info['cpu_count']} cores); wall-clock "
              f"timings will be inflated, the reference's (many small multi-threaded ops) most", file=sys.stderr)
    rows = run_jobs(jobs, policy, progress, workspace=not (args.no_memory or demo))
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None

    result = {
        "schema": 2,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mob_kernels.bench " + " ".join(shlex.quote(a) for a in argv),
        "config": {"presets": presets, "shapes": list(args.shapes or []), "methods": methods, "dtypes": dtypes,
                   "device": device, "backends": backends, "graphs": graphs, "peers": peers,
                   "stages": select_stages, "budgets": args.budgets, "memory": not (args.no_memory or demo),
                   "policy": dataclasses.asdict(policy), "threads": torch.get_num_threads(),
                   "peer_versions": {p: peer_mod.peer_version(p) for p in peers}},
        "machine": info,
        "notes": notes,
        "rows": rows,
    }
    if demo:
        result["demo"] = kept_summary(cases[0], device)
        print_demo(cases[0], result["demo"], rows, info)
    else:
        print()
        print(console_table(rows))
        print()
        print(LEGEND)
    out_dir = args.out or (None if demo else "mob_bench_results")
    if args.prefill:
        stem = os.path.join(out_dir, f"{args.name}_prefill") if out_dir else os.path.join(tempfile.mkdtemp(), "prefill")
        result["prefill"] = run_prefill(args.prefill_args, stem)
    json_path = args.json or (os.path.join(out_dir, f"{args.name}.json") if out_dir else None)
    written = []
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        md = os.path.join(out_dir, f"{args.name}.md")
        Path(md).write_text(markdown_report(result))
        written.append(md)
        csv_path = os.path.join(out_dir, f"{args.name}.csv")
        write_csv(rows, csv_path)
        written.append(csv_path)
        if not args.no_plot and not demo:
            png = os.path.join(out_dir, f"{args.name}.png")
            if write_plot(rows, png, f"mob_kernels on {machine_line(info)}"):
                written.append(png)
            else:
                print("plot skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1) + "\n")
        written.append(json_path)
    if written:
        print("\nwrote " + ", ".join(written))
    bad = mismatch_lines([r for r in rows if r["kind"] == "backend"])
    if bad:
        print(f"\n{len(bad)} backend result(s) differ from the reference:", file=sys.stderr)
        for line in bad:
            print(f"  {line}", file=sys.stderr)
    return 0
