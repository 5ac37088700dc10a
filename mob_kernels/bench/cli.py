"""``python -m mob_kernels.bench``: time select and its two stages for every backend and peer, side by side.

    python -m mob_kernels.bench --preset demo               # the main job (``make demo``): one LLaVA-1.5 image
    python -m mob_kernels.bench                             # every preset; table, JSON, markdown and PNG in --out
    python -m mob_kernels.bench --preset llava15 --dtypes bfloat16 --backends cpu --no-peers

Every output is checked against the reference backend's output on the same input, so a speed-up is never quoted
for a wrong answer ("agrees" in the JSON; "!" in the tables).
"""

from __future__ import annotations

import argparse
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

from . import peers as peer_mod
from .machine import machine_info, machine_line
from .presets import DEFAULT_PRESETS, OBJECT_REGION, PRESETS, Case, build_preset, grid_side, make_inputs, token_regions
from .report import LEGEND, console_table, markdown_report, write_plot
from .timing import Policy, time_fn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("select", "cover", "fps")


def default_backends(device: str) -> list[str]:
    # Triton on CPU tensors runs in its interpreter: a correctness tool, not something to time.
    return [b for b in mk.available_backends(device) if not (b == "triton" and device == "cpu")]


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled, self.start = total, 0, enabled, time.perf_counter()

    def step(self, what: str, ms: float) -> None:
        self.done += 1
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.done:>3}/{self.total}] {elapsed:6.1f}s  {what}: {ms:.3f} ms", file=sys.stderr, flush=True)


def _rows_of(x: torch.Tensor) -> list[list[int]]:
    return [[int(i) for i in row if i >= 0] for row in x.cpu().tolist()]


def _compare(got: list[list[int]], want: list[list[int]]) -> tuple[bool, float]:
    """(exactly equal, fraction of the reference's indices that the output also holds)."""
    total = sum(len(w) for w in want)
    shared = sum(len(set(g) & set(w)) for g, w in zip(got, want))
    return got == want, (shared / total if total else 1.0)


def bench_case(case: Case, dtype: str, device: str, backends: list[str], peers: list[str], stages: list[str],
               policy: Policy, progress: Progress) -> list[dict]:
    """Every (stage, implementation) on one input. The reference runs first in each stage; its output is the answer
    every other implementation is checked against (and its cover picks seed the FPS stage)."""
    vis, prompt = make_inputs(case, DTYPES[dtype], device)
    k_p, k = case.k_p, case.k
    cover = count = None

    def fps_setup():
        nonlocal cover, count
        if cover is None:
            cover, count = mk.prompt_cover(vis, prompt, k_p, backend="reference")
        # The FPS stage as select runs it: seeded by the cover, for the rest of the budget (one k for the batch).
        return cover, k - int(count.min())

    def job(stage: str, impl: str):
        if stage == "select":
            return lambda: mk.select(vis, prompt, k_p, k, backend=impl)
        if stage == "cover":
            return lambda: mk.prompt_cover(vis, prompt, k_p, backend=impl)
        seed, k_fps = fps_setup()
        return lambda: mk.farthest_point_sample(vis, k_fps, seed=seed, backend=impl)

    def peer_job(stage: str, name: str):
        seed, k_fps = fps_setup()
        return peer_mod.peer_call(name, vis, prompt, k_p, 0, _rows_of(seed), [k_fps] * case.B)

    rows = []
    for stage in stages:
        jobs = [(b, "backend", device, (lambda s=stage, b=b: job(s, b))) for b in backends]
        if dtype == "float32":
            jobs += [(p, "peer", peer_mod.peer_device(p, device), (lambda s=stage, p=p: peer_job(s, p)))
                     for p in peers if peer_mod.STAGE_OF_PEER[p] == stage]
        want = None
        stage_rows = []
        for impl, kind, dev, make_fn in jobs:
            timing, out = time_fn(make_fn(), dev, policy)
            if stage == "cover" and kind == "backend":
                if impl == "reference":
                    cover, count = out
                out = out[0]
            got = _rows_of(out) if isinstance(out, torch.Tensor) else out
            if impl == "reference":
                want = got
            agrees, overlap = _compare(got, want)
            stage_rows.append({**case.as_dict(), "dtype": dtype, "stage": stage, "impl": impl, "kind": kind,
                               "device": dev, **timing.as_dict(), "agrees": agrees, "overlap": overlap})
            progress.step(f"{case.label()} {dtype} {stage} {impl}", timing.median_ms)
        ref = stage_rows[0]  # backends[0] is always the reference (main() sees to it)
        for r in stage_rows:
            r["speedup"] = ref["median_ms"] / r["median_ms"]
        rows += stage_rows
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
    result = {"status": "ok" if proc.returncode == 0 else "failed", "command": cmd, "returncode": proc.returncode,
              "output": proc.stdout}
    written = Path(out_stem).with_suffix(".json")
    if proc.returncode == 0 and written.exists():
        result.update({"json": str(written), **json.loads(written.read_text())})
    return result


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m mob_kernels.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=list(DEFAULT_PRESETS), choices=PRESETS, metavar="NAME",
                    help=f"shape presets ({', '.join(PRESETS)}); default: {' '.join(DEFAULT_PRESETS)}")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192],
                    help="K values for the presets whose budget is not fixed (k_p per SPEC.md §6)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--backends", nargs="+", default=None, help="default: every available backend on --device")
    ap.add_argument("--peers", nargs="+", default=None, choices=["faiss", "fpsample", "greedy"],
                    help="default: every installed peer (float32 inputs only)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--max-repeats", type=int, default=50)
    ap.add_argument("--budget-s", type=float, default=0.5, help="seconds of repeats per measurement (at least "
                    "--min-repeats)")
    ap.add_argument("--out", default=None, help="directory for results.json, results.md and results.png "
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        # torch.set_num_threads sets OpenMP's thread count for this thread, which the C++ kernels' regions use too.
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    demo = args.preset == ["demo"]
    backends = args.backends or default_backends(device)
    # Every ratio and every agreement check needs the reference, measured first.
    backends = ["reference", *[b for b in backends if b != "reference"]]
    peers = [] if (args.no_peers or demo) else (args.peers or peer_mod.available_peers())
    stages = ["select"] if demo else args.stages
    policy = Policy(warmup=args.warmup, min_repeats=args.min_repeats, max_repeats=args.max_repeats,
                    budget_s=args.budget_s)
    cases = [c for p in args.preset for c in build_preset(p, tuple(args.budgets))]

    n_jobs = 0
    for _ in cases:
        for dt in args.dtypes:
            for st in stages:
                n_jobs += len(backends) + (sum(peer_mod.STAGE_OF_PEER[p] == st for p in peers) if dt == "float32" else 0)
    progress = Progress(n_jobs, enabled=not args.quiet and not demo)

    info = machine_info()
    if not demo:
        print(f"mob_kernels bench on {device}: {machine_line(info)}", flush=True)
        print(f"{len(cases)} cases x {len(args.dtypes)} dtypes, backends {backends}, peers {peers}, "
              f"{n_jobs} measurements", flush=True)
    load = info.get("load_average")
    if load and load[0] > (info["cpu_count"] or 1):
        print(f"warning: the machine is busy (load average {load[0]} on {info['cpu_count']} cores); wall-clock "
              f"timings will be inflated, the reference's (many small multi-threaded ops) most", file=sys.stderr)
    rows = []
    for case in cases:
        for dt in args.dtypes:
            rows += bench_case(case, dt, device, backends, peers, stages, policy, progress)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None

    result = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m mob_kernels.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": info,
        "config": {"presets": args.preset, "budgets": args.budgets, "dtypes": args.dtypes, "device": device,
                   "backends": backends, "peers": peers, "stages": stages,
                   "policy": {"warmup": policy.warmup, "min_repeats": policy.min_repeats,
                              "max_repeats": policy.max_repeats, "budget_s": policy.budget_s},
                   "peer_versions": {p: peer_mod.peer_version(p) for p in peers}},
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
    disagree = [r for r in rows if r["kind"] == "backend" and not r["agrees"]]
    if disagree:
        print(f"\n{len(disagree)} backend result(s) differ from the reference (see 'agrees' in the JSON)",
              file=sys.stderr)
    return 0
