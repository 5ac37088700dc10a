"""The benchmark CLI (mob_kernels.bench): it runs end to end, and what it writes is complete and self-consistent.

Timing values cannot be asserted on a shared machine, but their structure can (quartiles ordered, ratios computed
from the medians), and so can the parts that make a benchmark trustworthy: every backend and peer is measured on
every case it should be, and every output was checked against the reference (and agrees, on these inputs).
"""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import mob_kernels
from mob_kernels.bench import cli, peers, presets
from mob_kernels.bench.timing import Policy, summarize, time_host

# A run of the tiny preset with as few repeats as the policy allows: the point is the output, not the numbers.
FAST = ["--budget-s", "0.005", "--warmup", "1", "--min-repeats", "3", "--max-repeats", "4", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "mob_kernels.bench", "--preset", "tiny", "--out", str(out), *FAST],
        capture_output=True, text=True, timeout=300,
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


def test_every_backend_and_peer_is_measured_once_per_case(tiny_run):
    *_, result = tiny_run
    rows = result["rows"]
    device = result["config"]["device"]
    backends = cli.default_backends(device)
    assert "reference" in backends and result["config"]["backends"] == backends
    want = set()
    for case in presets.build_preset("tiny"):
        for dtype in ("float32", "bfloat16"):
            for stage in cli.STAGES:
                want |= {(case.N, case.B, dtype, stage, b) for b in backends}
                if dtype == "float32":  # peers are float32-only
                    want |= {(case.N, case.B, dtype, stage, p) for p in peers.available_peers()
                             if peers.STAGE_OF_PEER[p] == stage}
    got = [(r["N"], r["B"], r["dtype"], r["stage"], r["impl"]) for r in rows]
    assert len(got) == len(set(got)), "a measurement was repeated"
    assert set(got) == want


def test_timings_are_consistent_and_ratios_come_from_medians(tiny_run):
    *_, result = tiny_run
    rows = result["rows"]
    ref = {(r["N"], r["B"], r["dtype"], r["stage"]): r["median_ms"] for r in rows if r["impl"] == "reference"}
    for r in rows:
        assert 0 < r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"], r
        assert r["iqr_ms"] == pytest.approx(r["q3_ms"] - r["q1_ms"])
        assert 3 <= r["repeats"] <= 4
        assert r["timer"] == ("cuda_event" if r["device"].startswith("cuda") else "perf_counter")
        assert r["speedup"] == pytest.approx(ref[(r["N"], r["B"], r["dtype"], r["stage"])] / r["median_ms"])


def test_every_output_agrees_with_the_reference(tiny_run):
    # The synthetic inputs have no near-ties, so backends must match exactly (SPEC.md §4) and the peers, which do the
    # same job with other libraries, must too; a peer that disagreed would mean the bench times something else.
    *_, result = tiny_run
    bad = [(r["impl"], r["stage"], r["dtype"], r["N"]) for r in result["rows"] if not r["agrees"]]
    assert bad == []
    assert all(r["overlap"] == 1.0 for r in result["rows"])


def test_table_markdown_and_plot_are_written(tiny_run):
    out, stdout, stderr, result = tiny_run
    header = next(line for line in stdout.splitlines() if line.startswith("preset"))
    for impl in result["config"]["backends"] + result["config"]["peers"]:
        assert impl in header
    md = (out / "results.md").read_text()
    assert "| preset |" in md and result["machine"]["cpu_model"] in md
    # The summary has one line per (shape, dtype) at its smallest budget, with the cpu backend's speed-up.
    summary = md.split("## Summary")[1].split("## All measurements")[0]
    assert summary.count("\n| tiny N=") == 2 * len(presets.build_preset("tiny"))
    assert md.count("\n| tiny |") == len({(r["N"], r["dtype"], r["stage"]) for r in result["rows"]})
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # the plot is optional (bench extra); its absence must be said, not silent
        assert not (out / "results.png").exists() and "matplotlib is not installed" in stderr


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
    # Unseeded, both FPS peers start from the largest norm as SPEC.md says.
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


def test_cuda_timer_path_with_stand_in_events(monkeypatch):
    # No GPU here: stand-in events that read the host clock exercise time_cuda's bookkeeping (warm-up, sizing the run
    # from one call, pairing start/end events, returning the last output) the way a GPU run uses it.
    import time

    from mob_kernels.bench import timing

    class Event:
        def __init__(self, enable_timing=False):
            assert enable_timing
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)
        return len(calls)

    t, out = timing.time_fn(fn, "cuda:0", Policy(warmup=2, min_repeats=3, max_repeats=5, budget_s=1.0))
    assert t.timer == "cuda_event" and t.repeats == 5 and t.warmup == 3
    assert out == len(calls) == 3 + 5  # 2 warm-up + 1 sizing call, then the timed ones
    assert 2.0 <= t.min_ms <= t.median_ms <= t.max_ms < 50.0
