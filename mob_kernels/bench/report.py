"""Turning result rows into console tables, a markdown report, CSV and a PNG plot.

A result row is a dict: the case (method, preset, B, N, d, L, k, k_p), ``dtype``, ``stage`` (select / cover / fps for
MoB, the method's name for the others), ``impl`` (a backend or a peer), ``kind`` (backend / peer), ``mode`` (eager, or
graph: replayed from a CUDA graph), ``device``, the timing (median_ms, q1_ms, q3_ms, iqr_ms, ...), ``agrees`` /
``overlap`` with the reference's output (and ``margin``, the reference's closest decision, when they differ),
``speedup`` = reference median / this median, and ``workspace_bytes`` / ``workspace_how`` (see ``memory``).
"""

from __future__ import annotations

import csv
import math
from collections import OrderedDict

from .memory import fmt_bytes

SHAPE_KEYS = ("preset", "B", "N", "d", "L", "k", "k_p")
CASE_KEYS = ("method", *SHAPE_KEYS, "dtype", "stage")
METHOD_ORDER = ("select", "divprune", "cdpruner", "d2pruner", "btp_stage")
# What the CSV holds, in this order (one line per measurement).
CSV_FIELDS = (*CASE_KEYS, "impl", "kind", "mode", "device", "median_ms", "q1_ms", "q3_ms", "iqr_ms", "min_ms", "max_ms",
              "repeats", "warmup", "timer", "speedup", "agrees", "overlap", "margin", "workspace_bytes",
              "workspace_how", "workspace_rss_bytes", "workspace_torch_bytes")
NEAR_TIE = 1e-5  # a closest call below this (relative) is float32 rounding territory


def fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.0f}x" if x >= 100 else f"{x:.1f}x" if x >= 1 else f"{x:.2f}x"


def column(row: dict) -> str:
    """The table column of a row: the implementation, with " graph" for CUDA-graph replays."""
    return row["impl"] if row.get("mode", "eager") == "eager" else f"{row['impl']} graph"


def cell(row: dict, *, markdown: bool = False) -> str:
    """``median ±IQR/2 (speed-up)``, with a mark when the output differs from the reference's."""
    pm = "±" if not markdown else "± "
    s = f"{fmt_ms(row['median_ms'])} {pm}{fmt_ms(row['iqr_ms'] / 2)}"
    if column(row) != "reference" and row.get("speedup") is not None:
        s += f" ({fmt_ratio(row['speedup'])})"
    if row.get("agrees") is False:
        s += " !"
    return s


def methods_in(rows: list[dict]) -> list[str]:
    seen = {r["method"] for r in rows}
    return [m for m in METHOD_ORDER if m in seen] + sorted(seen - set(METHOD_ORDER))


def impl_order(rows: list[dict]) -> list[str]:
    """Columns: backends in registry order (each eager, then its graph replay), then peers, as they occur."""
    order = []
    for kind in ("backend", "peer"):
        for r in rows:
            if r["kind"] == kind and column(r) not in order:
                order.append(column(r))
    return order


def group_rows(rows: list[dict]) -> "OrderedDict[tuple, dict[str, dict]]":
    groups: OrderedDict[tuple, dict[str, dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(tuple(r[k] for k in CASE_KEYS), {})[column(r)] = r
    return groups


def _head_keys(method: str) -> list[str]:
    keys = ["preset", "B", "N", "d", "L", "k"] + (["k_p"] if method == "select" else []) + ["dtype"]
    return keys + (["stage"] if method == "select" else [])


def _table(rows: list[dict], method: str, value) -> list[list[str]]:
    sub = [r for r in rows if r["method"] == method]
    impls = impl_order(sub)
    keys = _head_keys(method)
    body = []
    for _, by_impl in group_rows(sub).items():
        first = next(iter(by_impl.values()))
        body.append([str(first[k]) for k in keys] + [value(by_impl[i]) if i in by_impl else "" for i in impls])
    return [keys + impls] + body


def _console(t: list[list[str]]) -> str:
    widths = [max(len(r[c]) for r in t) for c in range(len(t[0]))]
    numeric = {i for i, h in enumerate(t[0]) if h in ("B", "N", "d", "L", "k", "k_p")}
    lines = ["  ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in t]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def _markdown(t: list[list[str]]) -> str:
    out = ["| " + " | ".join(t[0]) + " |", "|" + "|".join("---" for _ in t[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in t[1:]]
    return "\n".join(out)


def _has_workspace(rows: list[dict]) -> bool:
    return any(r.get("workspace_bytes") is not None for r in rows)


def console_table(rows: list[dict]) -> str:
    """One fixed-width table per method: a line per (case, dtype, stage), a column per implementation; then the
    workspace per call in the same layout (when measured)."""
    parts = []
    for m in methods_in(rows):
        parts.append(f"{m}: time per call, ms")
        parts.append(_console(_table(rows, m, cell)))
        if _has_workspace([r for r in rows if r["method"] == m]):
            parts.append(f"\n{m}: workspace per call")
            parts.append(_console(_table(rows, m, lambda r: fmt_bytes(r.get("workspace_bytes")))))
        parts.append("")
    return "\n".join(parts).rstrip()


def markdown_table(rows: list[dict], method: str | None = None) -> str:
    return "\n\n".join(_markdown(_table(rows, m, lambda r: cell(r, markdown=True)))
                       for m in ([method] if method else methods_in(rows)))


def workspace_table(rows: list[dict], method: str) -> str:
    sub = [r for r in rows if r["method"] == method]
    hows: dict[str, set] = {}
    for r in sub:
        if r.get("workspace_how"):
            hows.setdefault(column(r), set()).add(r["workspace_how"])
    how = "; ".join(f"{c}: {', '.join(sorted(h))}" for c, h in hows.items())
    return _markdown(_table(rows, method, lambda r: fmt_bytes(r.get("workspace_bytes")))) + (
        f"\n\nHow: {how}." if how else "")


LEGEND = ("Times in ms: median ± half the interquartile range; (Nx) = speed-up over the reference (the reference "
          "backend: the contract written in plain PyTorch, run eagerly) on the same input; '!' = output differs from "
          "the reference's (see Mismatches). MoB stages: select = the whole op; cover = prompt_cover; fps = "
          "farthest_point_sample seeded with the cover picks. A 'graph' column replays the backend's call from a CUDA "
          "graph captured after warm-up. Peers: faiss = faiss-cpu inner-product k-NN + scatter-max (cover stage), "
          "fpsample = vanilla FPS (fps stage), greedy = DivPrune-style eager max-min loop with .item() per pick (fps "
          "stage), all three float32 only; divprune_released / cdpruner_released = the released DivPrune / CDPruner "
          "selection loops re-written from their published code (every dtype, float32 arithmetic). Workspace = peak "
          "memory one call adds beyond its inputs, measured: torch.cuda.max_memory_allocated on CUDA (outputs "
          "excluded); on the CPU the larger of the process's peak RSS during the call (sees the C++ kernels' own "
          "buffers; page-granular, small workspaces read low) and torch's allocator (profiler) plus Python/NumPy "
          "(tracemalloc) (see mob_kernels/bench/memory.py).")


def _shape_label(r: dict) -> str:
    s = f"{r['preset']} N={r['N']} d={r['d']} k={r['k']}"
    if r["method"] == "select":
        s += f" k_p={r['k_p']}"
    return s + (f" B={r['B']}" if r["B"] != 1 else "")


def summary_table(rows: list[dict]) -> str:
    """The README-style table: each method at the smallest budget of each shape; every backend (and graph replay)
    as time and speed-up over the reference, the peers as speed-ups, and the workspace of the reference and the
    fastest backend. MoB's stage speed-ups sit in their own column."""
    first_k: dict[tuple, int] = {}
    for r in rows:
        key = (r["method"], r["preset"], r["B"], r["N"], r["d"])
        first_k[key] = min(first_k.get(key, r["k"]), r["k"])
    keep = [r for r in rows if r["k"] == first_k[(r["method"], r["preset"], r["B"], r["N"], r["d"])]]
    groups = group_rows(keep)
    backends = [c for c in impl_order(rows) if c != "reference" and
                any(column(r) == c and r["kind"] == "backend" for r in rows)]
    has_select_stages = any(r["stage"] in ("cover", "fps") for r in rows)
    head = ["method", "shape", "dtype", "reference"] + backends
    if has_select_stages:
        head += ["MoB cover / fps stages"]
    head += ["peers (vs reference)", "workspace: reference / fastest"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for key, by_impl in groups.items():
        method, *_, stage = key
        if stage not in ("select", method) or "reference" not in by_impl:
            continue
        ref = by_impl["reference"]
        line = [method, _shape_label(ref), ref["dtype"], f"{fmt_ms(ref['median_ms'])} ms"]
        line += [f"{fmt_ms(by_impl[b]['median_ms'])} ms ({fmt_ratio(by_impl[b]['speedup'])})"
                 + (" !" if by_impl[b].get("agrees") is False else "") if b in by_impl else "" for b in backends]
        stage_of = {st: groups.get(key[:-1] + (st,), {}) for st in ("cover", "fps")} if method == "select" else {}
        if has_select_stages:
            line.append(", ".join(f"{b} " + " / ".join(fmt_ratio(stage_of[st][b]["speedup"]) if b in stage_of[st]
                                                       else "-" for st in ("cover", "fps"))
                                  for b in backends if any(b in stage_of[st] for st in stage_of)) or "-")
        peer_rows = [r for r in by_impl.values() if r["kind"] == "peer"]
        peer_rows += [r for st in stage_of.values() for r in st.values() if r["kind"] == "peer"]
        line.append(", ".join(f"{r['impl']} {fmt_ratio(r['speedup'])}" + (f" ({r['stage']})" if method == "select"
                                                                          else "")
                              for r in peer_rows) or "-")
        fastest = min((r for r in by_impl.values() if r["kind"] == "backend"), key=lambda r: r["median_ms"])
        line.append(f"{fmt_bytes(ref.get('workspace_bytes'))} / {fmt_bytes(fastest.get('workspace_bytes'))} "
                    f"({column(fastest)})")
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def mismatch_lines(rows: list[dict]) -> list[str]:
    """One line per output that differs from the reference's, with the reference's closest decision margin."""
    lines = []
    for r in rows:
        if r.get("agrees") is not False:
            continue
        s = (f"{column(r)} on {r['method']} {_shape_label(r)} {r['dtype']} ({r['stage']}): "
             f"{100 * r['overlap']:.1f}% of the reference's indices shared")
        m = r.get("margin")
        if m is not None:
            verdict = ("a near-tie (below ~1e-5 relative): float32 rounding may break it either way, which the "
                       "contract allows" if m < NEAR_TIE else "not a near-tie: a real difference to investigate")
            s += f"; the reference's closest decision on this input has a relative margin of {m:.2g}, {verdict}"
        lines.append(s)
    return lines


def markdown_report(result: dict) -> str:
    from .machine import machine_line

    m = result["machine"]
    rows = result["rows"]
    cfg = result["config"]
    what = ", ".join(cfg.get("presets", []) + [f"--shape {s}" for s in cfg.get("shapes", [])])
    parts = [
        f"# mob_kernels benchmark: {what}",
        "",
        f"Machine: {machine_line(m)}, {m.get('torch_threads')} threads. Commit {m.get('git_commit')}, "
        f"{result['created']}. Load average (1 min) {(m.get('load_average') or ['?'])[0]} at the start, "
        f"{(m.get('load_average_end') or ['?'])[0]} at the end (other jobs share this machine).",
        f"Command: `{result['command']}`",
        "",
        f"Methods: {', '.join(methods_in(rows))}. MoB's prompt share k_p follows mob_kernels.prompt_budget(k) "
        f"(K=64 -> 32, 128 -> 48, 192 -> 64, 320 -> 106) unless a note below says otherwise.",
    ]
    for note in result.get("notes", []):
        parts.append(f"Note: {note}")
    parts += [
        "",
        "## Summary (smallest budget per shape; ratios are speed-ups over the reference)",
        "",
        summary_table(rows),
        "",
    ]
    bad = mismatch_lines(rows)
    parts += ["## Mismatches", ""] + ([f"- {line}" for line in bad] if bad else
                                      ["Every output equals the reference's."]) + [""]
    parts += ["## All measurements", "", LEGEND, ""]
    for method in methods_in(rows):
        parts += [f"### {method}", "", markdown_table(rows, method), ""]
        if _has_workspace([r for r in rows if r["method"] == method]):
            parts += [f"Workspace per call ({method}):", "", workspace_table(rows, method), ""]
    prefill = result.get("prefill")
    if prefill and prefill.get("status") == "ok":
        parts += ["## End-to-end prefill (mob_kernels.integrations.prefill_bench)", "",
                  f"`{' '.join(prefill['command'][1:])}`", "", "```", prefill["output"].rstrip(), "```", ""]
    return "\n".join(parts)


def write_csv(rows: list[dict], path: str) -> None:
    """One line per measurement, the columns of ``CSV_FIELDS`` (missing values empty)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


# ------------------------------------------------------------------------------------------------------------ plot

SWEEP_KEYS = ("N", "k", "B")  # what a line panel may have on its x axis
MAX_BARS_CASES = 12


def _main_stage(rows: list[dict], method: str) -> list[dict]:
    return [r for r in rows if r["method"] == method and r["stage"] in (method, "select")]


def _case_of(r: dict) -> tuple:
    return tuple(r[k] for k in ("B", "N", "d", "L", "k", "k_p"))


def plot_panels(rows: list[dict]) -> list[dict]:
    """What to draw, for any subset of results. Per method (its whole-op rows): a line panel for each parameter in
    ``SWEEP_KEYS`` that varies while everything else about the shape is fixed (at least two values; the largest such
    group), and a bar panel of the cases no line panel shows (one group of bars per case). A single case, or cases
    differing in several parameters at once, therefore give bars, never a line through unrelated points."""
    panels = []
    for method in methods_in(rows):
        sub = _main_stage(rows, method)
        if not sub:
            continue
        shown: set[tuple] = set()
        for vary in SWEEP_KEYS:
            fixed = [k for k in ("B", "N", "d", "L", "k", "k_p") if k != vary and not (vary == "k" and k == "k_p")]
            groups: dict[tuple, list[dict]] = {}
            for r in sub:
                groups.setdefault(tuple(r[k] for k in fixed), []).append(r)
            best = max(groups.values(), key=lambda g: (len({r[vary] for r in g}), len(g)))
            if len({r[vary] for r in best}) < 2:
                continue
            panels.append({"kind": "line", "method": method, "vary": vary, "rows": best,
                           "fixed": {k: best[0][k] for k in fixed if not (method != "select" and k == "k_p")}})
            shown |= {_case_of(r) for r in best}
        rest = [r for r in sub if _case_of(r) not in shown]
        if rest:
            cases = list(OrderedDict.fromkeys(_case_of(r) for r in rest))
            panels.append({"kind": "bar", "method": method, "cases": cases[:MAX_BARS_CASES], "n_cases": len(cases),
                           "rows": [r for r in rest if _case_of(r) in set(cases[:MAX_BARS_CASES])]})
    return panels


def _series(rows: list[dict]) -> "OrderedDict[tuple[str, str], list[dict]]":
    out: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
    for c in impl_order(rows):
        for dt in OrderedDict.fromkeys(r["dtype"] for r in rows):
            pts = [r for r in rows if column(r) == c and r["dtype"] == dt]
            if pts:
                out[(c, dt)] = pts
    return out


def _bar_label(case: tuple, method: str) -> str:
    B, N, d, L, k, k_p = case
    s = f"N={N} d={d}\nk={k}" + (f" k_p={k_p}" if method == "select" else "")
    return s + (f"\nB={B}" if B != 1 else "")


def build_figure(rows: list[dict], title: str):
    """The matplotlib figure of ``plot_panels(rows)`` (log time axis; median with the IQR as a band or error bar).
    Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = plot_panels(rows)
    n = max(1, len(panels))
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.6 * nrows), squeeze=False)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours: dict[str, str] = {}
    dashes = {"float32": "-", "bfloat16": "--", "float16": ":"}
    flat = [ax for line in axes for ax in line]
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    if not panels:
        flat[0].set_visible(True)
        flat[0].set_title("no data", fontsize=10)
    for ax, p in zip(flat, panels):
        series = _series(p["rows"])
        if p["kind"] == "line":
            vary = p["vary"]
            xs_all = sorted({r[vary] for r in p["rows"]})
            for (col, dt), pts in series.items():
                by_x = OrderedDict()
                for r in sorted(pts, key=lambda r: r[vary]):
                    by_x.setdefault(r[vary], r)  # one point per x (a shape in two presets counts once)
                xs = list(by_x)
                colour = colours.setdefault(col, palette[len(colours) % len(palette)])
                ax.plot(xs, [r["median_ms"] for r in by_x.values()], marker="o", color=colour,
                        linestyle=dashes.get(dt, "-."), label=f"{col} {dt}")
                ax.fill_between(xs, [r["q1_ms"] for r in by_x.values()], [r["q3_ms"] for r in by_x.values()],
                                color=colour, alpha=0.15)
            if xs_all[-1] / max(xs_all[0], 1) >= 4:  # a wide sweep (N = 1024 .. 4096, B = 1 .. 32): log2 axis
                ax.set_xscale("log", base=2)
                ax.set_xlim(xs_all[0] / 1.15, xs_all[-1] * 1.15)
            else:
                pad = 0.05 * (xs_all[-1] - xs_all[0])
                ax.set_xlim(xs_all[0] - pad, xs_all[-1] + pad)
            ax.set_xticks(xs_all, [str(x) for x in xs_all])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_xlabel(vary)
            fixed = ", ".join(f"{k}={v}" for k, v in p["fixed"].items())
            ax.set_title(f"{p['method']}: time vs {vary}\n{fixed}", fontsize=10)
        else:
            cases = p["cases"]
            width = 0.8 / max(1, len(series))
            for s, ((col, dt), pts) in enumerate(series.items()):
                by_case = {_case_of(r): r for r in pts}
                xs = [i - 0.4 + width * (s + 0.5) for i, c in enumerate(cases) if c in by_case]
                got = [by_case[c] for c in cases if c in by_case]
                colour = colours.setdefault(col, palette[len(colours) % len(palette)])
                med = [r["median_ms"] for r in got]
                err = [[r["median_ms"] - r["q1_ms"] for r in got], [r["q3_ms"] - r["median_ms"] for r in got]]
                ax.bar(xs, med, width=width, color=colour, alpha=1.0 if dt == "float32" else 0.55,
                       hatch=None if dt == "float32" else "//", edgecolor=colour, yerr=err, capsize=2,
                       label=f"{col} {dt}")
            labels = [_bar_label(c, p["method"]) for c in cases]
            if len(cases) > 3:  # many cases: one-line labels, slanted so that they do not overlap
                ax.set_xticks(range(len(cases)), [s.replace("\n", " ") for s in labels], fontsize=7, rotation=30,
                              ha="right")
            else:
                ax.set_xticks(range(len(cases)), labels, fontsize=7)
            ax.set_xlim(-0.6, len(cases) - 0.4)
            ax.set_xlabel("case")
            more = f" (first {len(cases)} of {p['n_cases']})" if p["n_cases"] > len(cases) else ""
            ax.set_title(f"{p['method']}: time per case{more}", fontsize=10)
        ax.set_ylabel("ms (median, IQR)")
        ax.set_yscale("log")
        lo = min(r["q1_ms"] for r in p["rows"])
        hi = max(r["q3_ms"] for r in p["rows"])
        ax.set_ylim(lo / 1.5, hi * 1.5)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_plot(rows: list[dict], path: str, title: str) -> bool:
    """Writes ``build_figure(rows)`` to ``path``; returns False when matplotlib is missing."""
    try:
        fig = build_figure(rows, title)
    except ImportError:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
