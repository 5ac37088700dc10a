"""Turning result rows into a console table, a markdown table and a PNG plot.

A result row is a dict: the case (preset, B, N, d, L, k, k_p), ``dtype``, ``stage`` (select / cover / fps), ``impl``
(a backend or a peer), ``kind``, ``device``, the timing (median_ms, q1_ms, q3_ms, iqr_ms, ...), ``agrees`` /
``overlap`` with the reference's output, and ``speedup`` = reference median / this median (None without a reference).
"""

from __future__ import annotations

from collections import OrderedDict

CASE_KEYS = ("preset", "B", "N", "d", "L", "k", "k_p", "dtype", "stage")


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


def cell(row: dict, *, markdown: bool = False) -> str:
    """``median ±IQR/2 (speed-up)``, with a mark when the output differs from the reference's."""
    pm = "±" if not markdown else "± "
    s = f"{fmt_ms(row['median_ms'])} {pm}{fmt_ms(row['iqr_ms'] / 2)}"
    if row["impl"] != "reference" and row.get("speedup") is not None:
        s += f" ({fmt_ratio(row['speedup'])})"
    if row.get("agrees") is False:
        s += " !"
    return s


def impl_order(rows: list[dict]) -> list[str]:
    """Backends in SPEC order, then peers, as they occur."""
    order = []
    for kind in ("backend", "peer"):
        for r in rows:
            if r["kind"] == kind and r["impl"] not in order:
                order.append(r["impl"])
    return order


def group_rows(rows: list[dict]) -> "OrderedDict[tuple, dict[str, dict]]":
    groups: OrderedDict[tuple, dict[str, dict]] = OrderedDict()
    for r in rows:
        groups.setdefault(tuple(r[k] for k in CASE_KEYS), {})[r["impl"]] = r
    return groups


def _table(rows: list[dict], markdown: bool) -> list[list[str]]:
    impls = impl_order(rows)
    head = ["preset", "B", "N", "d", "L", "k", "k_p", "dtype", "stage"] + impls
    body = []
    for key, by_impl in group_rows(rows).items():
        line = [str(v) for v in key]
        line += [cell(by_impl[i], markdown=markdown) if i in by_impl else "" for i in impls]
        body.append(line)
    return [head] + body


def console_table(rows: list[dict]) -> str:
    """Fixed-width table: one line per (case, dtype, stage), one column per implementation."""
    t = _table(rows, markdown=False)
    widths = [max(len(r[c]) for r in t) for c in range(len(t[0]))]
    lines = ["  ".join(v.rjust(w) if i >= 1 and i <= 6 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in t]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(rows: list[dict]) -> str:
    t = _table(rows, markdown=True)
    out = ["| " + " | ".join(t[0]) + " |", "|" + "|".join("---" for _ in t[0]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in t[1:]]
    return "\n".join(out)


LEGEND = ("Times in ms: median ± half the interquartile range; (Nx) = speed-up over the reference (pure-torch eager "
          "implementation of SPEC.md) on the same input; '!' = output differs from the reference's. Stages: select = "
          "the whole op; cover = prompt_cover; fps = farthest_point_sample seeded with the cover picks. Peers run on "
          "float32 inputs only: faiss = faiss-cpu inner-product k-NN + scatter-max (cover stage), fpsample = vanilla "
          "FPS (fps stage), greedy = DivPrune-style eager max-min loop with .item() per pick (fps stage).")


def summary_table(rows: list[dict]) -> str:
    """The README's table: select at one budget per shape (the smallest), fastest backend vs the reference, and the
    peers beside the stage they stand in for, as speed-ups over the reference."""
    first_k: dict[tuple, int] = {}
    for r in rows:
        key = (r["preset"], r["N"])
        first_k[key] = min(first_k.get(key, r["k"]), r["k"])
    groups = group_rows([r for r in rows if r["k"] == first_k[(r["preset"], r["N"])]])
    backends = [i for i in impl_order(rows) if i != "reference" and any(r["impl"] == i and r["kind"] == "backend"
                                                                          for r in rows)]
    head = ["shape", "dtype", "reference select"] + [f"{b} select" for b in backends] + [
        f"{b} cover / fps" for b in backends] + ["peers: cover / fps (vs reference stage)"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for key, by_impl in groups.items():
        preset, B, N, d, L, k, k_p, dtype, stage = key
        if stage != "select" or "reference" not in by_impl:
            continue
        stage_of = {st: groups.get(key[:-1] + (st,), {}) for st in ("cover", "fps")}
        line = [f"{preset} N={N} d={d} k={k}", dtype, f"{fmt_ms(by_impl['reference']['median_ms'])} ms"]
        line += [f"{fmt_ms(by_impl[b]['median_ms'])} ms ({fmt_ratio(by_impl[b]['speedup'])})" if b in by_impl else ""
                 for b in backends]
        line += [" / ".join(fmt_ratio(stage_of[st][b]["speedup"]) if b in stage_of[st] else "-"
                            for st in ("cover", "fps")) for b in backends]
        peers = [f"{r['impl']} {fmt_ratio(r['speedup'])}" for st in ("cover", "fps") for r in stage_of[st].values()
                 if r["kind"] == "peer"]
        line.append(", ".join(peers) if peers else "-")
        out.append("| " + " | ".join(line) + " |")
    return "\n".join(out)


def markdown_report(result: dict) -> str:
    from .machine import machine_line

    m = result["machine"]
    parts = [
        f"# mob_kernels benchmark: {', '.join(result['config']['presets'])}",
        "",
        f"Machine: {machine_line(m)}, {m.get('torch_threads')} threads. Commit {m.get('git_commit')}, "
        f"{result['created']}. Load average (1 min) {(m.get('load_average') or ['?'])[0]} at the start, "
        f"{(m.get('load_average_end') or ['?'])[0]} at the end (other jobs share this machine).",
        f"Command: `{result['command']}`",
        "",
        "## Summary (smallest budget per shape; ratios are speed-ups over the reference)",
        "",
        summary_table(result["rows"]),
        "",
        "## All measurements",
        "",
        LEGEND,
        "",
        markdown_table(result["rows"]),
        "",
    ]
    prefill = result.get("prefill")
    if prefill and prefill.get("status") == "ok":
        parts += ["## End-to-end prefill (mob_kernels.integrations.prefill_bench)", "",
                  f"`{' '.join(prefill['command'][1:])}`", "", "```", prefill["output"].rstrip(), "```", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------------ plot


def _sweep(rows: list[dict], vary: str, fixed: tuple[str, ...]) -> list[dict]:
    """The rows of the (fixed-keys) group that has the most distinct values of ``vary`` (B = 1 only)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["B"] == 1:
            groups.setdefault(tuple(r[k] for k in fixed), []).append(r)
    if not groups:
        return []
    return max(groups.values(), key=lambda g: (len({r[vary] for r in g}), len(g)))


def write_plot(rows: list[dict], path: str, title: str) -> bool:
    """Time against N and against k (select, every backend and dtype), and the FPS stage against N with the peers.
    Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    select = [r for r in rows if r["stage"] == "select"]
    fps = [r for r in rows if r["stage"] == "fps" and r["dtype"] == "float32"]
    panels = [
        ("select: time vs N", "N", _sweep(select, "N", ("d", "L", "k"))),
        ("select: time vs k", "k", _sweep(select, "k", ("N", "d", "L"))),
        ("fps stage (float32): time vs N", "N", _sweep(fps, "N", ("d", "L", "k"))),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colours: dict[str, str] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, vary, sub) in zip(axes, panels):
        lines: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
        for r in sub:
            lines.setdefault((r["impl"], r["dtype"]), []).append((r[vary], r["median_ms"], r["q1_ms"], r["q3_ms"]))
        for (impl, dtype), pts in sorted(lines.items()):
            pts.sort()
            colour = colours.setdefault(impl, palette[len(colours) % len(palette)])
            xs = [p[0] for p in pts]
            ax.plot(xs, [p[1] for p in pts], marker="o", color=colour,
                    linestyle="-" if dtype == "float32" else "--", label=f"{impl} {dtype}")
            ax.fill_between(xs, [p[2] for p in pts], [p[3] for p in pts], color=colour, alpha=0.15)
        if sub:
            fixed = {k: sub[0][k] for k in ("N", "d", "L", "k") if k != vary}
            ax.set_title(f"{name}\n" + ", ".join(f"{k}={v}" for k, v in fixed.items()), fontsize=10)
        else:
            ax.set_title(f"{name}\n(no data)", fontsize=10)
        ax.set_xlabel(vary)
        ax.set_ylabel("ms (median, IQR band)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
