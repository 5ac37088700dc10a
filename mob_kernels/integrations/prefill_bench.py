"""Prefill speed with visual-token pruning: a LLaVA-1.5-shaped model on the CPU, pruned vs unpruned, side by side in
one run (MoB by default; ``--methods`` gives one row per method and configuration).

What it measures: the time of one prefill forward (``logits_to_keep=1``, as ``generate()`` does) of a
``LlavaForConditionalGeneration`` with random weights: 576 image tokens (336 / 14 patches), a Llama text model of
``hidden`` width and ``layers`` layers, a short text prompt around the image. The vision tower is kept tiny (one layer,
width 64) because the question is what pruning saves inside the language model; it costs the same in both columns.
Pruned: ``apply_mob(model, budget=64, layer=2, mode="layer")`` (the MoB paper's setting); with ``--methods`` each
method's own setting (``pruning_arguments``): D2Pruner ``budget=64, layer=2``; BTP the released LLaVA plan
(576 -> 288 -> 144 -> 48 -> 0 before layers 4 / 7 / 15 / 23 of 32) with its layers scaled to the model's depth
(``btp_plan``); DivPrune and CDPruner ``budget=64`` on the projector output. The two variants alternate run by run so
drifts in machine load hit both alike; medians are reported. "selection" is the wall time spent inside the hooks
choosing the tokens (``handle.selection_seconds``: run detection, feature gathers, the last-token attention where the
method reads it, and the selection op), as a share of the pruned prefill.

    python -m mob_kernels.integrations.prefill_bench               # writes bench/results/prefill_cpu.{md,json}
    python -m mob_kernels.integrations.prefill_bench --quick       # a smaller, faster check
    python -m mob_kernels.integrations.prefill_bench --methods mob,d2pruner,btp --configs 1024x16 --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

IMAGE_TOKEN = 31999
IMAGE_SIZE, PATCH = 336, 14  # 24 x 24 = 576 image tokens, as LLaVA-1.5


def build_model(hidden: int, layers: int, *, dtype=torch.float32, seed: int = 0):
    """A LLaVA-1.5-shaped ``LlavaForConditionalGeneration`` with random weights (nothing downloaded)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    heads = max(1, hidden // 128)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH),
        text_config=LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads),
        image_token_index=IMAGE_TOKEN, image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(cfg).to(dtype).eval()


def make_inputs(n_before: int = 20, n_after: int = 40, *, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_img = (IMAGE_SIZE // PATCH) ** 2
    before = torch.randint(2, 30000, (n_before,), generator=g)
    after = torch.randint(2, 30000, (n_after,), generator=g)
    ids = torch.cat([before, torch.full((n_img,), IMAGE_TOKEN), after]).unsqueeze(0)
    px = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(dtype)
    return dict(input_ids=ids, pixel_values=px, logits_to_keep=1)


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core CPU ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def btp_plan(layers: int) -> list[dict]:
    """BTP's released LLaVA plan with its 1-based layers (4 / 7 / 15 / 23 of LLaVA-1.5-7B's 32) scaled to a model of
    ``layers`` layers: ``max(2, round(L * layers / 32))``, each at least one past the previous."""
    from mob_kernels.methods.btp import SCHEDULES

    plan, previous = [], 1
    for stage in SCHEDULES["llava"]:
        layer = stage["layer"]
        assert isinstance(layer, int)
        at = max(previous + 1, round(layer * layers / 32), 2)
        if at > layers:
            break
        plan.append(dict(stage, layer=at))
        previous = at
    return plan


def pruning_arguments(method: str, layers: int, budget: int = 64, layer: int = 2) -> dict:
    """The ``apply_pruning`` arguments of one pruned row."""
    if method == "btp":
        return dict(schedule=btp_plan(layers))
    if method in ("mob", "d2pruner"):
        return dict(budget=budget, layer=layer, mode="layer")
    return dict(budget=budget)  # DivPrune, CDPruner: their papers' input mode


def layer_tokens(method: str, layers: int, tokens: int, image_tokens: int, budget: int = 64, layer: int = 2
                 ) -> list[int]:
    """The tokens each decoder layer runs on in a pruned prefill of ``method`` (one image of ``image_tokens``)."""
    text = tokens - image_tokens
    if method == "btp":
        out, kept = [], image_tokens
        stages = {s["layer"] - 1: s["keep"] for s in btp_plan(layers)}
        for i in range(layers):
            kept = stages.get(i, kept)
            out.append(text + kept)
        return out
    first = layer if method in ("mob", "d2pruner") else 0
    return [tokens] * first + [text + budget] * (layers - first)


def _call_text(method: str, args: dict) -> str:
    if method == "btp":
        plan = args["schedule"]
        return (f'`apply_pruning(model, "btp", schedule=...)` (the LLaVA plan, stages before layers '
                f'{" / ".join(str(s["layer"]) for s in plan)}: {" -> ".join(str(s["keep"]) for s in plan)} image tokens)')
    if method == "mob" and set(args) == {"budget", "layer", "mode"}:
        return f'`apply_mob(model, budget={args["budget"]}, layer={args["layer"]}, mode="layer")`'
    inner = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in args.items()).replace("'", '"')
    return f'`apply_pruning(model, "{method}", {inner})`'


def measure(hidden: int, layers: int, *, dtype=torch.float32, budget: int = 64, layer: int = 2, repeats: int = 5,
            backend: str = "auto", method: str = "mob") -> dict:
    from . import apply_pruning

    model = build_model(hidden, layers, dtype=dtype)
    inputs = make_inputs(dtype=dtype)
    args = pruning_arguments(method, layers, budget, layer)
    handle = apply_pruning(model, method, backend=backend, record=False, **args)
    handle.remove()  # re-applied per pruned run below; remove() is exact, so the unpruned runs see the plain model

    def timed(pruned: bool) -> tuple[float, float, float]:
        h = apply_pruning(model, method, backend=backend, record=False, **args) if pruned else None
        try:
            with torch.inference_mode():
                c0, t0 = time.process_time(), time.perf_counter()
                model(**inputs)
                dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            return dt, (h.selection_seconds if h else 0.0), cpu
        finally:
            if h:
                h.remove()

    timed(False), timed(True)  # warm-up: allocator, oneDNN primitives, lazy imports
    full, pruned, select, full_cpu, pruned_cpu = [], [], [], [], []
    for _ in range(repeats):
        dt, _, cpu = timed(False)
        full.append(dt)
        full_cpu.append(cpu)
        dt, sel, cpu = timed(True)
        pruned.append(dt)
        pruned_cpu.append(cpu)
        select.append(sel)
    n_tokens = inputs["input_ids"].shape[1]
    n_image = (IMAGE_SIZE // PATCH) ** 2
    per_layer = layer_tokens(method, layers, n_tokens, n_image, budget, layer)
    full_ms, pruned_ms, sel_ms = (1e3 * statistics.median(x) for x in (full, pruned, select))
    return {
        "method": method, "call": _call_text(method, args), "layer_tokens": per_layer,
        "hidden": hidden, "layers": layers, "dtype": str(dtype).replace("torch.", ""), "budget": budget,
        "layer": layer, "backend": backend, "tokens": n_tokens, "image_tokens": n_image,
        "tokens_after_pruning": per_layer[-1], "repeats": repeats,
        "unpruned_ms": full_ms, "pruned_ms": pruned_ms, "speedup": full_ms / pruned_ms,
        "selection_ms": sel_ms, "selection_share": sel_ms / pruned_ms,
        # CPU time of the process: what the work costs, less sensitive than wall time to other jobs on the machine.
        "unpruned_cpu_ms": 1e3 * statistics.median(full_cpu), "pruned_cpu_ms": 1e3 * statistics.median(pruned_cpu),
        "cpu_speedup": statistics.median(full_cpu) / statistics.median(pruned_cpu), "threads": torch.get_num_threads(),
        "unpruned_runs_ms": [1e3 * x for x in full], "pruned_runs_ms": [1e3 * x for x in pruned],
    }


CONFIGS = [(1024, 8), (1024, 16), (2048, 8)]
QUICK = [(1024, 8)]


TARGETS = {"speedup": 3.0, "selection_share": 0.02}  # the project's prefill targets


def _speedup_bound(layers: int, layer: int, tokens: int, after: int) -> float:
    """Upper bound on the prefill speed-up when every layer costs time linear in its tokens: the first ``layer``
    layers run on all ``tokens``, the other ``layers - layer`` on ``after``."""
    return 1.0 / (layer / layers + (layers - layer) / layers * after / tokens)


def _values(rows: list[dict], key: str) -> str:
    vals = list(dict.fromkeys(r[key] for r in rows))
    return " / ".join(str(v) for v in vals)


def to_markdown(rows: list[dict], where: str, command: str = "python -m mob_kernels.integrations.prefill_bench") -> str:
    """The report of one run, every number in its text taken from ``rows``; ``command`` is the run's own command
    line, given as the way to reproduce it."""
    if any(r.get("method", "mob") != "mob" for r in rows):
        return _methods_markdown(rows, where, command)
    if not rows:
        return f"# Prefill with MoB pruning (CPU)\n\nMachine: {where}.\n\nNo configuration was measured.\n\n" \
               f"Reproduce: `{command}`\n"
    r0 = rows[0]
    text = r0["tokens"] - r0["image_tokens"]
    pruned = "; ".join(
        f"`apply_mob(model, budget={b}, layer={lay}, mode=\"layer\")` (layers >= {lay} see {after} tokens)"
        for b, lay, after in dict.fromkeys((r["budget"], r["layer"], r["tokens_after_pruning"]) for r in rows))
    met = [r for r in rows if r["speedup"] >= TARGETS["speedup"] and r["selection_share"] <= TARGETS["selection_share"]]
    lines = [
        "# Prefill with MoB pruning (CPU)",
        "",
        f"Machine: {where}.",
        "",
        f"LLaVA-1.5-shaped `LlavaForConditionalGeneration`, random weights: {r0['image_tokens']} image tokens + {text} "
        f"text tokens ({r0['tokens']} in all), tiny vision tower; one prefill forward with `logits_to_keep=1`. "
        f"Pruned: {pruned}; backend {_values(rows, 'backend')}. Unpruned and pruned runs alternate in one process; "
        f"medians of {_values(rows, 'repeats')} runs each. Selection = time inside the hook choosing tokens, as a "
        "share of the pruned prefill. CPU-time speed-up: the same ratio on the process's CPU time, less sensitive to "
        "other jobs sharing the machine.",
        "",
        f"Targets: speed-up >= {TARGETS['speedup']:g}x with a selection share <= "
        f"{100 * TARGETS['selection_share']:g}%; met by {len(met)} of {len(rows)} rows.",
        "",
        "| hidden | layers | dtype | threads | unpruned (ms) | pruned (ms) | speed-up | selection (ms) "
        "| selection share | CPU-time speed-up |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['layers']} | {r['dtype']} | {r['threads']} | {r['unpruned_ms']:.1f} | "
            f"{r['pruned_ms']:.1f} | {r['speedup']:.2f}x | {r['selection_ms']:.2f} | "
            f"{100 * r['selection_share']:.2f}% | {r['cpu_speedup']:.2f}x |"
        )
    bounds = {}
    for r in rows:
        key = (r["layers"], r["layer"], r["tokens"], r["tokens_after_pruning"])
        bounds[key] = _speedup_bound(*key)
    lines += [""]
    for (layer, tokens, after) in dict.fromkeys((k[1], k[2], k[3]) for k in bounds):
        at = ", ".join(f"{b:.2f}x at n = {n} layers" for (n, lay, t, a), b in sorted(bounds.items())
                       if (lay, t, a) == (layer, tokens, after))
        lines.append(
            f"Ceiling: with l = {layer} the first {layer} layers always run on all {tokens} tokens, so linear-cost "
            f"layers bound the speed-up by 1 / (l/n + (n-l)/n * {after}/{tokens}): {at}.")
    lines += [
        "",
        f"Reproduce: `{command}` (writes this file and its `.json`).",
        "",
    ]
    return "\n".join(lines)


def _methods_markdown(rows: list[dict], where: str, command: str) -> str:
    """The report of a ``--methods`` run: one row per method and configuration."""
    r0 = rows[0]
    text = r0["tokens"] - r0["image_tokens"]
    calls = "; ".join(f"{m}: {c}" for m, c in dict.fromkeys((r["method"], r["call"]) for r in rows))
    met = [r for r in rows if r["speedup"] >= TARGETS["speedup"] and r["selection_share"] <= TARGETS["selection_share"]]
    lines = [
        "# Prefill with visual-token pruning, per method (CPU)",
        "",
        f"Machine: {where}.",
        "",
        f"LLaVA-1.5-shaped `LlavaForConditionalGeneration`, random weights: {r0['image_tokens']} image tokens + {text} "
        f"text tokens ({r0['tokens']} in all), tiny vision tower; one prefill forward with `logits_to_keep=1`. "
        f"Pruned, per method: {calls}; backend {_values(rows, 'backend')}. Unpruned and pruned runs alternate in one "
        f"process; medians of {_values(rows, 'repeats')} runs each. Selection = time inside the hooks choosing tokens "
        "(the last-token attention included where the method reads it), as a share of the pruned prefill. CPU-time "
        "speed-up: the same ratio on the process's CPU time, less sensitive to other jobs sharing the machine.",
        "",
        f"Targets: speed-up >= {TARGETS['speedup']:g}x with a selection share <= "
        f"{100 * TARGETS['selection_share']:g}%; met by {len(met)} of {len(rows)} rows.",
        "",
        "| method | hidden | layers | dtype | threads | unpruned (ms) | pruned (ms) | speed-up | selection (ms) "
        "| selection share | CPU-time speed-up | ceiling |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bound = r["layers"] * r["tokens"] / sum(r["layer_tokens"])
        lines.append(
            f"| {r['method']} | {r['hidden']} | {r['layers']} | {r['dtype']} | {r['threads']} | {r['unpruned_ms']:.1f} "
            f"| {r['pruned_ms']:.1f} | {r['speedup']:.2f}x | {r['selection_ms']:.2f} | "
            f"{100 * r['selection_share']:.2f}% | {r['cpu_speedup']:.2f}x | {bound:.2f}x |"
        )
    lines += [""]
    for method, layers, per_layer in dict.fromkeys((r["method"], r["layers"], tuple(r["layer_tokens"])) for r in rows):
        lines.append(f"Ceiling of {method} at {layers} layers: the layers run on {', '.join(map(str, per_layer))} "
                     f"tokens, so linear-cost layers bound the speed-up by {layers} * {r0['tokens']} / "
                     f"{sum(per_layer)} = {layers * r0['tokens'] / sum(per_layer):.2f}x.")
    lines += ["", f"Reproduce: `{command}` (writes this file and its `.json`).", ""]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small configuration, float32 only")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results/prefill_cpu", help="path without suffix for the .md and .json")
    ap.add_argument("--configs", default="", help="hidden x layers list, e.g. 1024x16,2048x8 (default: all)")
    ap.add_argument("--methods", default="mob",
                    help="comma-separated methods, one row each per configuration: mob, d2pruner, btp, divprune, "
                         "cdpruner (default: mob)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    command = " ".join(["python -m mob_kernels.integrations.prefill_bench", *(shlex.quote(a) for a in argv)])
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["float32"] if args.quick else args.dtypes.split(",")
    rows = []
    configs = QUICK if args.quick else CONFIGS
    if args.configs:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    from .hf import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"--methods takes a comma-separated list of {', '.join(METHODS)}; got {args.methods!r}")
    for hidden, layers in configs:
        for dt in dtypes:
            for method in methods:
                # MoB's row keeps measure()'s original call; the other methods name themselves.
                extra = {} if method == "mob" else {"method": method}
                row = measure(hidden, layers, dtype=getattr(torch, dt), repeats=args.repeats, backend=args.backend,
                              **extra)
                row.setdefault("method", method)
                rows.append(row)
                print(f"{method} hidden={hidden} layers={layers} {dt}: unpruned {row['unpruned_ms']:.1f} ms, pruned "
                      f"{row['pruned_ms']:.1f} ms ({row['speedup']:.2f}x), selection {row['selection_ms']:.2f} ms "
                      f"({100 * row['selection_share']:.2f}%)", flush=True)
    where = machine()
    try:
        where += f"; load average at the end of the run {os.getloadavg()[0]:.1f} (other jobs share the machine)"
    except OSError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(to_markdown(rows, where, command))
    out.with_suffix(".json").write_text(json.dumps({"machine": where, "command": command, "rows": rows}, indent=2)
                                        + "\n")
    return rows


if __name__ == "__main__":
    main()
