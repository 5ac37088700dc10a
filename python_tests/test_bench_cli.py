"""The benchmark CLI (mob_kernels.bench): it runs end to end, and what it writes is complete and self-consistent.

Timing values cannot be asserted on a shared machine, but their structure can (quartiles ordered, ratios computed
from the medians), and so can the parts that make a benchmark trustworthy: every method, backend and peer is measured
on every case it should be, every output was checked against the reference (and agrees, on these inputs), the plot
shows what was run, and the released-algorithm peers pick exactly what mob_kernels.divprune / cdpruner pick.
"""

import csv
import importlib.util
import json
import subprocess
import sys
import time

import pytest
import torch

import mob_kernels
from mob_kernels.bench import cli, memory, peers, presets, report
from mob_kernels.bench.timing import Policy, summarize, time_host

# A run of the tiny preset with as few repeats as the policy allows: the point is the output, not the numbers.
FAST = ["--budget-s", "0.005", "--warmup", "1", "--min-repeats", "3", "--max-repeats", "4", "--quiet"]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "mob_kernels.bench", "--preset", "tiny", "--out", str(out), *FAST],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, proc.stderr, json.loads((out / "results.json").read_text())


def test_json_names_the_machine_and_config(tiny_run):
    *_, result = tiny_run
    m = result["machine"]
    assert m["torch"] == torch.__version__
    assert m["cpu_count"] >= 1 and m["cpu_model"]
    assert "triton" in m and "gpu" in m and "load_average" in m
    assert result["config"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert result["config"]["presets"] == ["tiny"]
    assert result["config"]["methods"] == cli.bench_methods() == ["select", "divprune", "cdpruner", "d2pruner",
                                                                 "btp_stage"]
    assert result["command"] == "python -m mob_kernels.bench --preset tiny --out " + str(tiny_run[0]) + " " + \
        " ".join(FAST)


def test_every_method_backend_and_peer_is_measured_once_per_case(tiny_run):
    *_, result = tiny_run
    rows = result["rows"]
    device = result["config"]["device"]
    backends = cli.default_backends(device)
    assert "reference" in backends and result["config"]["backends"] == backends
    want = set()
    for case in presets.build_preset("tiny", methods=cli.bench_methods()):
        for dtype in ("float32", "bfloat16"):
            for stage in cli.stages_of(case.method, cli.STAGES):
                want |= {(case.method, case.N, case.B, dtype, stage, b) for b in backends}
                want |= {(case.method, case.N, case.B, dtype, stage, p) for p in peers.available_peers()
                         if peers.STAGE_OF_PEER[p] == stage and (dtype == "float32" or p in peers.ANY_DTYPE)}
    got = [(r["method"], r["N"], r["B"], r["dtype"], r["stage"], r["impl"]) for r in rows]
    assert len(got) == len(set(got)), "a measurement was repeated"
    assert set(got) == want
    # Each new method has its released-algorithm peer beside the backends.
    assert {("divprune", "divprune_released"), ("cdpruner", "cdpruner_released")} <= {(g[0], g[5]) for g in got}


def test_timings_are_consistent_and_ratios_come_from_medians(tiny_run):
    *_, result = tiny_run
    rows = result["rows"]
    ref = {(r["method"], r["N"], r["B"], r["dtype"], r["stage"]): r["median_ms"] for r in rows
           if r["impl"] == "reference"}
    for r in rows:
        assert 0 < r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"], r
        assert r["iqr_ms"] == pytest.approx(r["q3_ms"] - r["q1_ms"])
        assert 3 <= r["repeats"] <= 4
        assert r["mode"] == "eager"
        assert r["timer"] == ("cuda_event" if r["device"].startswith("cuda") else "perf_counter")
        key = (r["method"], r["N"], r["B"], r["dtype"], r["stage"])
        assert r["speedup"] == pytest.approx(ref[key] / r["median_ms"])


def test_every_output_agrees_with_the_reference(tiny_run):
    # The synthetic inputs have no near-ties, so backends must match exactly and the peers, which do the same job
    # with other libraries or the released loops, must too; a peer that disagreed would mean the bench times
    # something else.
    *_, result = tiny_run
    bad = [(r["impl"], r["stage"], r["dtype"], r["N"]) for r in result["rows"] if not r["agrees"]]
    assert bad == []
    assert all(r["overlap"] == 1.0 and r["margin"] is None for r in result["rows"])


def test_every_measurement_has_its_workspace_and_says_how(tiny_run):
    *_, result = tiny_run
    for r in result["rows"]:
        assert isinstance(r["workspace_bytes"], int) and r["workspace_bytes"] >= 0, r
        if r["device"] == "cpu":
            assert "torch profiler + tracemalloc" in r["workspace_how"], r
            parts = [r["workspace_torch_bytes"]] + ([r["workspace_rss_bytes"]] if "RSS" in r["workspace_how"] else [])
            assert r["workspace_bytes"] == max(parts)
        else:
            assert r["workspace_how"] == "cuda max_memory_allocated"
    # The reference materialises float32 copies and a score matrix: never nothing.
    assert all(r["workspace_bytes"] > 0 for r in result["rows"] if r["impl"] == "reference")


def test_table_markdown_csv_and_plot_are_written(tiny_run):
    out, stdout, stderr, result = tiny_run
    for method in cli.bench_methods():
        assert f"{method}: time per call, ms" in stdout and f"{method}: workspace per call" in stdout
    headers = [line for line in stdout.splitlines() if line.startswith("preset")]
    for impl in result["config"]["backends"] + result["config"]["peers"]:
        assert any(impl in h for h in headers)
    md = (out / "results.md").read_text()
    assert result["machine"]["cpu_model"] in md and "Every output equals the reference's." in md
    # The summary has one line per (method, shape, dtype) at its smallest budget.
    summary = md.split("## Summary")[1].split("## Mismatches")[0]
    n_cases = len(presets.build_preset("tiny", methods=cli.bench_methods()))
    assert summary.count("\n| ") - 1 == 2 * n_cases  # the header, then a line per (case, dtype)
    for method in cli.bench_methods():
        assert f"### {method}" in md and f"Workspace per call ({method})" in md
    assert md.count("\n| tiny |") == 2 * len({(r["method"], r["N"], r["dtype"], r["stage"]) for r in result["rows"]})
    # No absolute paths or tracker wording in the report's fixed text.
    assert "issue" not in report.LEGEND.lower() and "SPEC.md" not in report.LEGEND
    # CSV: the same measurements as the JSON, one line each, in the documented columns.
    with open(out / "results.csv", newline="") as f:
        lines = list(csv.DictReader(f))
    assert list(lines[0]) == list(report.CSV_FIELDS) and len(lines) == len(result["rows"])
    for line, r in zip(lines, result["rows"]):
        assert (line["method"], line["impl"], line["dtype"], int(line["N"])) == (r["method"], r["impl"], r["dtype"],
                                                                                 r["N"])
        assert float(line["median_ms"]) == pytest.approx(r["median_ms"])
        assert int(line["workspace_bytes"]) == r["workspace_bytes"]
    if HAS_MPL:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the plot is optional (bench extra); its absence must be said, not silent
        assert not (out / "results.png").exists() and "matplotlib is not installed" in stderr


def test_shape_and_dtype_flags_run_exactly_the_asked_subset(tmp_path, capsys):
    rc = cli.main(["--shape", "1,64,32,4,8", "--shape", "2,100,48,6,12,4", "--dtype", "float32",
                   "--method", "select", "--method", "divprune", "--stages", "select", "--no-peers",
                   "--no-memory", "--out", str(tmp_path), *FAST])
    assert rc == 0
    result = json.loads((tmp_path / "results.json").read_text())
    got = {(r["method"], r["B"], r["N"], r["k"], r["k_p"], r["dtype"], r["stage"], r["impl"]) for r in result["rows"]}
    backends = cli.default_backends("cpu")
    assert got == {(m, B, N, k, k_p if m == "select" else 0, "float32", m, b)
                   for m in ("select", "divprune") for (B, N, k, k_p) in ((1, 64, 8, 4), (2, 100, 12, 4))
                   for b in backends}
    assert result["config"]["shapes"] == ["1,64,32,4,8", "2,100,48,6,12,4"] and result["config"]["presets"] == []
    assert all(r["workspace_bytes"] is None for r in result["rows"])
    assert (tmp_path / "results.csv").exists()


def test_parse_shape_defaults_k_p_to_the_budget_rule():
    (c,) = presets.parse_shape("1,2880,4096,64,320")
    assert (c.B, c.N, c.d, c.L, c.k, c.k_p, c.preset) == (1, 2880, 4096, 64, 320, 106, "custom")
    assert c.k_p == mob_kernels.prompt_budget(320)
    d, p = presets.parse_shape("2,100,48,6,12,5", ("divprune", "cdpruner"))
    assert (d.method, d.k_p, p.method, p.k) == ("divprune", 0, "cdpruner", 12)
    for bad in ("1,2,3", "1,64,32,4,80", "a,b,c,d,e", "1,64,32,4,8,9", "0,64,32,4,8"):
        with pytest.raises(ValueError):
            presets.parse_shape(bad)
    assert cli.main(["--shape", "1,64,32,4", "--quiet"]) == 2


def test_presets_follow_the_budget_rule_and_cover_the_methods():
    nxt = presets.build_preset("llava_next", methods=presets.BENCH_METHODS)
    assert [(c.method, c.N, c.k, c.k_p) for c in nxt] == [("select", 2880, 320, 106), ("divprune", 2880, 320, 0),
                                                           ("cdpruner", 2880, 320, 0), ("d2pruner", 2880, 320, 0),
                                                           ("btp_stage", 2880, 1440, 0)]
    l15 = presets.build_preset("llava15", methods=presets.BENCH_METHODS)
    assert [(c.method, c.k, c.k_p) for c in l15] == [("select", 64, 32), ("select", 128, 48), ("select", 192, 64),
                                                     ("divprune", 64, 0), ("cdpruner", 64, 0), ("d2pruner", 64, 0),
                                                     ("btp_stage", 288, 0)]
    assert all((c.N, c.d) == (576, 4096) for c in l15)
    assert presets.build_preset("qwen2vl", methods=("divprune", "d2pruner", "btp_stage")) == []


def test_btp_bench_stage_is_the_released_llava_first_stage():
    (case,) = presets.build_preset("llava15", methods=("btp_stage",))
    args = presets.btp_stage_args(case)
    from mob_kernels.methods.btp import SCHEDULES

    first = SCHEDULES["llava"][0]
    assert case.k == first["keep"] == 288
    assert (args["mode"], args["n_div"], args["n_attn"], args["rebalance"]) == (
        first["mode"], first["n_div"], first["n_attn"], first["rebalance"])
    assert args["n_extra"] == first["n_extra"] and args["seed"].numel() == first["spatial_seed"]
    assert torch.equal(args["seed"], mob_kernels.methods.spatial_seed(24, 24, 144))


def test_the_model_reading_methods_agree_with_the_reference_in_the_tiny_run(tiny_run):
    *_, result = tiny_run
    rows = [r for r in result["rows"] if r["method"] in ("d2pruner", "btp_stage")]
    assert {r["method"] for r in rows} == {"d2pruner", "btp_stage"}
    assert {r["impl"] for r in rows} >= {"reference", "cpu"}
    assert all(r["agrees"] for r in rows), [(r["method"], r["impl"], r["dtype"]) for r in rows if not r["agrees"]]


def test_gpu_preset_cases_and_columns():
    cases = presets.build_preset("gpu", methods=("select", "divprune", "cdpruner"))
    got = [(c.method, c.B, c.N, c.d, c.L, c.k, c.k_p, c.dtypes) for c in cases]
    both = ("bfloat16", "float32")
    assert got == [("select", 1, 576, 4096, 64, 64, 32, both), ("select", 32, 576, 4096, 64, 64, 32, both),
                   ("select", 1, 2880, 4096, 64, 320, 160, ("bfloat16",)),
                   ("divprune", 1, 576, 4096, 64, 64, 0, both), ("cdpruner", 1, 576, 4096, 64, 64, 0, both)]
    model_reading = presets.build_preset("gpu", methods=("d2pruner", "btp_stage"))
    assert [(c.method, c.N, c.k) for c in model_reading] == [("d2pruner", 576, 64), ("btp_stage", 576, 288)]
    assert "160" in cases[2].note and "H100" in cases[2].note  # the one departure from prompt_budget, said
    jobs = cli.plan(cases, list(cli.DEFAULT_DTYPES), False, ["reference", "triton", "cuda"], [], ["select"], "cuda",
                    graphs=True)
    first = [(j.impl, j.mode) for j in jobs if j.case == cases[0] and j.dtype == "bfloat16"]
    assert first == [("reference", "eager"), ("triton", "eager"), ("triton", "graph"), ("cuda", "eager"),
                     ("cuda", "graph")]
    assert {j.dtype for j in jobs if j.case == cases[2]} == {"bfloat16"}
    # An explicit --dtype narrows the pinned dtypes.
    jobs = cli.plan(cases, ["float32"], True, ["reference"], [], ["select"], "cuda", graphs=False)
    assert {j.dtype for j in jobs} == {"float32"} and not any(j.case == cases[2] for j in jobs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_gpu_preset_without_a_gpu_says_so(capsys):
    assert cli.main(["--preset", "gpu", *FAST]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "torch.cuda.is_available() is False" in err and "Traceback" not in err
    assert cli.main(["--device", "cuda", "--preset", "tiny", *FAST]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- plots


def _row(method="select", N=64, k=8, B=1, impl="reference", dtype="float32", ms=1.0, mode="eager", kind="backend",
         stage=None):
    return {"method": method, "preset": "t", "B": B, "N": N, "d": 32, "L": 4, "k": k,
            "k_p": mob_kernels.prompt_budget(k) if method == "select" else 0, "dtype": dtype,
            "stage": stage or method, "impl": impl, "kind": kind, "mode": mode, "device": "cpu", "median_ms": ms,
            "q1_ms": 0.9 * ms, "q3_ms": 1.1 * ms, "iqr_ms": 0.2 * ms, "speedup": 1.0, "agrees": True, "overlap": 1.0}


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_of_a_single_case_is_bars_not_a_line():
    import matplotlib.pyplot as plt

    rows = [_row(impl=i, dtype=dt, ms=ms) for i, ms in (("reference", 10.0), ("cpu", 0.5)) for dt in ("float32",
                                                                                                        "bfloat16")]
    rows.append(_row(impl="reference", stage="cover", ms=3.0))  # a stage row: not the whole op, not plotted
    fig = report.build_figure(rows, "t")
    (ax,) = _visible(fig)
    assert ax.get_xlabel() == "case" and ax.get_ylabel().startswith("ms") and ax.get_yscale() == "log"
    from matplotlib.container import BarContainer

    # One bar per (implementation, dtype), no line joining anything (error-bar caps are markers only).
    assert [len(c) for c in ax.containers if isinstance(c, BarContainer)] == [1, 1, 1, 1] and len(ax.patches) == 4
    assert all(line.get_linestyle() in ("None", "") for line in ax.lines)
    assert len(ax.get_xticklabels()) == 1 and "N=64" in ax.get_xticklabels()[0].get_text()
    lo, hi = ax.get_ylim()
    assert lo < 0.5 * 0.9 and hi > 10.0 * 1.1
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == [0.5, 0.5, 10.0, 10.0]
    plt.close(fig)


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_of_a_budget_sweep_draws_lines_against_k():
    import matplotlib.pyplot as plt

    ks = (8, 12, 16)
    rows = [_row(k=k, impl=i, ms=f * k) for k in ks for i, f in (("reference", 1.0), ("cpu", 0.1))]
    fig = report.build_figure(rows, "t")
    (ax,) = _visible(fig)
    assert ax.get_xlabel() == "k" and "time vs k" in ax.get_title()
    assert len(ax.lines) == 2
    for line in ax.lines:
        assert list(line.get_xdata()) == list(ks)
    assert sorted(list(ax.lines[0].get_ydata()) + list(ax.lines[1].get_ydata())) == sorted(r["median_ms"]
                                                                                           for r in rows)
    lo, hi = ax.get_xlim()
    assert lo < 8 and hi > 16
    plt.close(fig)


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_of_a_mixed_subset_has_a_panel_per_method_and_sweep():
    import matplotlib.pyplot as plt

    rows = [_row(N=N, impl=i, ms=N / 64 * f) for N in (64, 256, 1024) for i, f in (("reference", 1.0), ("cpu", 0.1))]
    rows += [_row(N=100, k=12, impl="reference", ms=2.0)]  # differs in N and k at once: no line through it
    rows += [_row(method="divprune", impl=i, ms=ms) for i, ms in (("reference", 3.0), ("divprune_released", 9.0))]
    rows[-1]["kind"] = "peer"
    fig = report.build_figure(rows, "t")
    axes = _visible(fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == ["select: time vs N", "select: time per case",
                                                               "divprune: time per case"]
    sweep, extra, div = axes
    assert sweep.get_xscale() == "log" and [list(line.get_xdata()) for line in sweep.lines] == [[64, 256, 1024]] * 2
    assert len(extra.patches) == 1 and all(line.get_linestyle() in ("None", "") for line in extra.lines)
    assert len(div.patches) == 2 and {t.get_text() for t in div.get_legend().get_texts()} == {
        "reference float32", "divprune_released float32"}
    plt.close(fig)


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_plot_graph_replays_are_their_own_series():
    import matplotlib.pyplot as plt

    rows = [_row(impl="reference", ms=5.0), _row(impl="triton", ms=1.0), _row(impl="triton", ms=0.2, mode="graph")]
    fig = report.build_figure(rows, "t")
    (ax,) = _visible(fig)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"reference float32", "triton float32",
                                                                    "triton graph float32"}
    plt.close(fig)


# ------------------------------------------------------------------------------------------- peers = the released


@pytest.mark.parametrize("B,N,d,k,seed", [(1, 576, 4096, 64, 0), (2, 100, 48, 12, 1), (3, 300, 128, 40, 2),
                                          (1, 64, 32, 8, 3)])
def test_divprune_and_cdpruner_pick_exactly_what_the_released_loops_pick(B, N, d, k, seed):
    # Well-conditioned float32 inputs (the bench's synthetic features, and plain Gaussian ones): the package's
    # DivPrune and CDPruner on the reference backend must return the released algorithms' picks, sorted.
    case = presets.Case("t", B, N, d, 8, k, 0)
    vis, prompt = presets.make_inputs(case, torch.float32, seed=seed)
    relevance = presets.make_relevance(vis, prompt)
    gauss = torch.randn(B, N, d, generator=torch.Generator().manual_seed(seed))
    r_gauss = 0.1 + torch.rand(B, N, generator=torch.Generator().manual_seed(seed + 100))
    for v, r in ((vis, relevance), (gauss, r_gauss)):
        released = peers.divprune_released(v, k)
        assert released.shape == (B, k) and all(len(set(row)) == k for row in released.tolist())
        assert torch.equal(mob_kernels.divprune(v, k, backend="reference"), released.sort(dim=1).values)
        assert torch.equal(mob_kernels.cdpruner(v, r, k, backend="reference"), peers.cdpruner_released(v, r, k))


def test_released_peers_follow_the_published_semantics():
    # DivPrune: the first pick is the most isolated token (largest nearest-neighbour distance); no masking afterwards,
    # yet no repeats on distinct rows. CDPruner: the first pick is the largest diagonal r_i^2 (unit rows).
    vis = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]]])
    assert peers.divprune_released(vis, 1).tolist() == [[2]]
    assert peers.divprune_released(vis, 3)[0, 1].item() == 0  # farthest from token 2
    r = torch.tensor([[0.5, 0.9, 0.2, 0.4]])
    assert peers.cdpruner_released(vis, r, 1).tolist() == [[1]]
    # then the largest gain r_j^2 (1 - S_1j^2): token 3 (0.16 * 0.39) ahead of token 2 (0.04 * 0.99)
    assert peers.cdpruner_released(vis, r, 2).tolist() == [[1, 3]]


def test_decision_margin_flags_near_ties():
    case = presets.Case("t", 1, 64, 32, 4, 8, 4)
    vis, prompt = presets.make_inputs(case, torch.float32)
    for stage in ("select", "cover", "divprune"):
        m = peers.decision_margin(stage, vis, prompt=prompt, k_p=4, k=8)
        assert 0 < m < float("inf")
    tie = vis.clone()
    tie[0, 1] = -tie[0, 0]  # two copies of the token opposite the seed: the first FPS step is an exact tie
    tie[0, 2] = -tie[0, 0]
    assert peers.decision_margin("fps", tie, seeds=[[0]], k=3) == 0.0
    row = {"impl": "cpu", "kind": "backend", "mode": "eager", "method": "select", "preset": "t", "B": 1, "N": 64,
           "d": 32, "k": 8, "k_p": 4, "dtype": "float32", "stage": "select", "agrees": False, "overlap": 0.875}
    (near,) = report.mismatch_lines([{**row, "margin": 2e-7}])
    (far,) = report.mismatch_lines([{**row, "margin": 0.3}])
    assert "87.5%" in near and "a near-tie" in near and "not a near-tie" in far


# ------------------------------------------------------------------------------------------------------- workspace


def test_cpu_workspace_counts_torch_and_numpy_peaks():
    import numpy as np

    def f():
        a = torch.empty(1000)  # 4000 B
        b = torch.empty(2000)  # 8000 B: the peak is 12000 B with both alive
        del a, b
        scratch = np.ones(10_000)  # 80000 B through NumPy (tracemalloc)
        del scratch
        return torch.empty(10)  # 40 B returned: not workspace

    ws_torch, ws_py, out = memory.torch_cpu_workspace(f)
    assert out.shape == (10,)
    assert ws_torch == 12000 - 40
    assert 80_000 <= ws_py < 200_000


@pytest.mark.skipif(memory.rss_available() is not None, reason="needs Linux /proc/self/clear_refs and glibc")
def test_rss_workspace_sees_memory_allocated_outside_torch_and_python():
    # What the C++ kernels do: malloc, touch, free, invisible to torch's profiler and to tracemalloc.
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    n = 8 << 20

    def native():
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(ctypes.c_void_p(p))
        return None

    slack = 512 << 10  # resident-page accounting is not byte-exact: some of the block may already count
    rss, _ = memory.rss_workspace(native)
    assert n - slack <= rss < n + (4 << 20)
    ws, how, parts = memory.cpu_workspace(native)
    assert parts["workspace_torch_bytes"] < (1 << 20) and n - slack <= parts["workspace_rss_bytes"] == ws
    assert how == "max(RSS peak, torch profiler + tracemalloc)"
    assert memory.fmt_bytes(3 * 2**20) == "3.0 MiB" and memory.fmt_bytes(None) == "-"


def test_cuda_workspace_arithmetic_with_stand_ins(monkeypatch):
    state = {"allocated": 1000, "peak": 1000}

    def fn():
        state["peak"] = state["allocated"] + 5000  # scratch during the call
        state["allocated"] += 64  # the returned output
        return "out"

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    ws, out = memory.cuda_workspace(fn)
    assert out == "out" and ws == 5000 - 64


# ----------------------------------------------------------------------------------------------------- timers, ETA


def test_summarize_quartiles():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0], warmup=1, timer="perf_counter")
    assert (t.min_ms, t.q1_ms, t.median_ms, t.q3_ms, t.max_ms) == (1.0, 2.0, 3.0, 4.0, 5.0)
    assert t.iqr_ms == 2.0 and t.repeats == 5
    one = summarize([7.0], warmup=0, timer="perf_counter")
    assert one.q1_ms == one.median_ms == one.q3_ms == 7.0
    with pytest.raises(ValueError):
        summarize([], warmup=0, timer="perf_counter")


def test_time_host_respects_the_repeat_policy():
    calls = []
    t, out = time_host(lambda: calls.append(1) or len(calls), Policy(warmup=2, min_repeats=3, max_repeats=7,
                                                                      budget_s=10.0))
    assert t.repeats == 7 and len(calls) == 2 + 7 and out == 9  # budget not reached: stops at max_repeats after the warm-up
    calls.clear()
    t, _ = time_host(lambda: calls.append(1), Policy(warmup=1, min_repeats=3, max_repeats=50, budget_s=0.0))
    assert t.repeats == 3 and len(calls) == 1 + 3  # budget spent at once: min_repeats still taken


def test_progress_lines_carry_an_eta():
    now = [0.0]
    case = presets.Case("t", 1, 64, 32, 4, 8, 4)
    jobs = [cli.Job(case, "float32", "select", "reference", "backend", "eager", "cpu") for _ in range(4)]
    progress = cli.Progress(jobs, Policy(warmup=1, min_repeats=3, max_repeats=4, budget_s=0.0), enabled=False,
                            clock=lambda: now[0])
    now[0] = 2.0
    line = progress.step(jobs[0], 100.0)
    assert line.startswith("[  1/4]") and "ETA 6s" in line  # three more measurements like the first
    now[0] = 4.0
    assert "ETA 4s" in progress.step(jobs[1], 100.0)
    progress.step(jobs[2], 100.0)
    assert "done" in progress.step(jobs[3], 100.0)
    assert cli.fmt_duration(75) == "1m15s" and cli.fmt_duration(7300) == "2h01m"


class _Event:
    """A stand-in for torch.cuda.Event that reads the host clock."""

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _Stream:
    def wait_stream(self, other):
        pass


class _Graph:
    """A stand-in CUDA graph: capture runs the function once (as real capture records it); replay counts."""

    replays = 0
    fail = False

    def replay(self):
        type(self).replays += 1
        time.sleep(0.001)


class _GraphContext:
    def __init__(self, graph):
        if _Graph.fail:
            raise RuntimeError("operation not permitted when stream is capturing")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _stand_in_cuda(monkeypatch):
    import contextlib

    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", _GraphContext)
    _Graph.replays, _Graph.fail = 0, False


def test_cuda_timer_path_with_stand_in_events(monkeypatch):
    # No GPU here: stand-in events that read the host clock exercise time_cuda's bookkeeping (warm-up, sizing the run
    # from one call, pairing start/end events, returning the last output) the way a GPU run uses it.
    from mob_kernels.bench import timing

    _stand_in_cuda(monkeypatch)
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)
        return len(calls)

    t, out = timing.time_fn(fn, "cuda:0", Policy(warmup=2, min_repeats=3, max_repeats=5, budget_s=1.0))
    assert t.timer == "cuda_event" and t.repeats == 5 and t.warmup == 3
    assert out == len(calls) == 3 + 5  # 2 warm-up + 1 sizing call, then the timed ones
    assert 2.0 <= t.min_ms <= t.median_ms <= t.max_ms < 50.0


def test_cuda_graph_timer_captures_after_warm_up_and_times_replays(monkeypatch):
    from mob_kernels.bench import timing

    _stand_in_cuda(monkeypatch)
    calls = []
    t, out = timing.time_cuda_graph(lambda: calls.append(1) or f"static {len(calls)}",
                                    Policy(warmup=2, min_repeats=3, max_repeats=5, budget_s=1.0))
    assert len(calls) == 2 + 1  # warm-up on the side stream, then the one captured call
    assert out == "static 3"  # the captured call's (static) output
    assert t.timer == "cuda_graph" and t.repeats == 5 and t.warmup == 2 + 1 + 1
    assert _Graph.replays == 1 + 1 + 5  # replay warm-up, sizing, timed replays
    assert 1.0 <= t.min_ms <= t.median_ms <= t.max_ms < 50.0


def test_run_jobs_graph_rows_and_a_failed_capture(monkeypatch, capsys):
    # The GPU columns' bookkeeping on CPU tensors: eager rows, graph rows timed from replays, checked against the
    # reference, carrying the eager call's workspace; a backend whose capture fails loses its graph row, loudly.
    _stand_in_cuda(monkeypatch)
    case = presets.Case("t", 1, 64, 32, 4, 8, 4)
    jobs = cli.plan([case], ["float32"], True, ["reference", "cpu"], [], ["select"], "cpu", graphs=True)
    assert [(j.impl, j.mode) for j in jobs] == [("reference", "eager"), ("cpu", "eager"), ("cpu", "graph")]
    policy = Policy(warmup=1, min_repeats=3, max_repeats=3, budget_s=0.0)
    rows = cli.run_jobs(jobs, policy, cli.Progress(jobs, policy, enabled=False))
    graph = rows[2]
    assert (graph["impl"], graph["mode"], graph["timer"]) == ("cpu", "graph", "cuda_graph")
    assert graph["agrees"] and graph["speedup"] == pytest.approx(rows[0]["median_ms"] / graph["median_ms"])
    assert graph["workspace_bytes"] == rows[1]["workspace_bytes"] and "graph's pool" in graph["workspace_how"]
    assert report.column(graph) == "cpu graph" and "cpu graph" in report.console_table(rows)
    _Graph.fail = True
    progress = cli.Progress(jobs, policy, enabled=False)
    rows = cli.run_jobs(jobs, policy, progress)
    assert [(r["impl"], r["mode"]) for r in rows] == [("reference", "eager"), ("cpu", "eager")]
    assert "CUDA graph capture failed" in capsys.readouterr().err and progress.done == len(progress.jobs) == 2


# ------------------------------------------------------------------------------------------------------------ misc


def test_demo_kept_summary_accounts_for_every_token():
    case = presets.Case("t", 1, 144, 64, 16, 16, 8)  # 12 x 12 grid: the object region has 9 tokens
    s = cli.kept_summary(case, "cpu")
    vis, prompt = presets.make_inputs(case, torch.float32)
    _, count = mob_kernels.prompt_cover(vis, prompt, case.k_p, backend="reference")
    assert s["kept"] == case.k and s["from_cover"] + s["from_fps"] == case.k
    assert s["from_cover"] == int(count[0]) and s["object_tokens"] == 9
    cells = "".join(s["map"])
    assert len(cells) == case.N and cells.count("P") == s["from_cover"] and cells.count("F") == s["from_fps"]
    # The synthetic prompt is about OBJECT_REGION: the cover must find it.
    assert s["cover_in_object"] >= case.k_p // 2


def test_peers_do_the_same_job_as_the_stages():
    pytest.importorskip("faiss")  # installed with the bench extra (make bench / make demo)
    pytest.importorskip("fpsample")
    case = presets.Case("t", 1, 200, 24, 5, 20, 10)
    vis, prompt = presets.make_inputs(case, torch.float32, seed=3)
    cover, count = mob_kernels.prompt_cover(vis, prompt, 10, backend="reference")
    seeds = [[int(i) for i in cover[0] if i >= 0]]
    fps = mob_kernels.farthest_point_sample(vis, 10, seed=cover, backend="reference")[0].tolist()
    assert peers.faiss_cover(vis, prompt, 10, 0) == seeds
    assert peers.fpsample_fps(vis, seeds, [10]) == [fps]
    assert peers.greedy_fps(vis, seeds, [10]) == [fps]
    # Unseeded, both FPS peers start from the largest norm as the contract says.
    fps0 = mob_kernels.farthest_point_sample(vis, 6, backend="reference")[0].tolist()
    assert peers.fpsample_fps(vis, [[]], [6]) == [fps0] == peers.greedy_fps(vis, [[]], [6])


def test_prefill_option_reports_a_missing_module_and_embeds_a_present_ones_rows(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "PREFILL_MODULE", "mob_kernels.integrations.no_such_module")
    assert cli.run_prefill("", str(tmp_path / "none"))["status"] == "unavailable"
    assert "not available" in capsys.readouterr().out
    # A stand-in with the prefill benchmark's interface: --out STEM, writes STEM.json with its rows.
    (tmp_path / "fake_prefill.py").write_text(
        "import argparse, json\n"
        "ap = argparse.ArgumentParser(); ap.add_argument('--out'); ap.add_argument('--quick', action='store_true')\n"
        "a = ap.parse_args()\n"
        "open(a.out + '.json', 'w').write(json.dumps({'machine': 'm', 'rows': [{'quick': a.quick, 'speedup': 2.5}]}))\n"
        "print('prefill table')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(cli, "PREFILL_MODULE", "fake_prefill")
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: object())
    r = cli.run_prefill("--quick", str(tmp_path / "run_prefill"))
    assert r["status"] == "ok" and r["returncode"] == 0 and r["output"] == "prefill table\n"
    assert r["rows"] == [{"quick": True, "speedup": 2.5}] and r["json"] == str(tmp_path / "run_prefill.json")
    # The command recorded for the report names the module, not this machine's interpreter path.
    assert r["command"][:3] == ["python", "-m", "fake_prefill"]


def test_prefill_report_text_comes_from_the_run(monkeypatch, tmp_path):
    # The prefill report's prose, targets line, ceiling and reproduce line are generated from the rows and the argv
    # of the run (measure() is replaced: building models is the integrations' business, not the report's).
    from mob_kernels.integrations import prefill_bench as pb

    def fake_measure(hidden, layers, *, dtype, repeats, backend, budget=64, layer=2):
        tokens, image, after = 700, 576, 700 - 576 + budget
        return {"hidden": hidden, "layers": layers, "dtype": str(dtype).replace("torch.", ""), "budget": budget,
                "layer": layer, "backend": backend, "tokens": tokens, "image_tokens": image,
                "tokens_after_pruning": after, "repeats": repeats, "unpruned_ms": 100.0, "pruned_ms": 25.0 * layers / 8,
                "speedup": 4.0 * 8 / layers, "selection_ms": 0.5, "selection_share": 0.02 * layers / 8,
                "unpruned_cpu_ms": 200.0, "pruned_cpu_ms": 50.0, "cpu_speedup": 4.0, "threads": 1}

    monkeypatch.setattr(pb, "measure", fake_measure)
    argv = ["--configs", "512x8,512x16", "--dtypes", "float32", "--repeats", "2", "--out", str(tmp_path / "p")]
    rows = pb.main(argv)
    md = (tmp_path / "p.md").read_text()
    assert f"Reproduce: `python -m mob_kernels.integrations.prefill_bench {' '.join(argv)}`" in md
    assert "576 image tokens + 124 text tokens (700 in all)" in md and "layers >= 2 see 188 tokens" in md
    assert "medians of 2 runs each" in md and "met by 1 of 2 rows" in md
    want = [1 / (2 / n + (n - 2) / n * 188 / 700) for n in (8, 16)]
    assert f"{want[0]:.2f}x at n = 8 layers, {want[1]:.2f}x at n = 16 layers" in md
    assert "issue" not in md.lower() and str(tmp_path) not in md.split("Reproduce:")[0]
    assert json.loads((tmp_path / "p.json").read_text())["command"].endswith(" ".join(argv)) and len(rows) == 2
