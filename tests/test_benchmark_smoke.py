"""Every benchmark's ``--smoke`` runs and measures (default suite; the full sizes are in
``tests/test_benchmarks.py``, marked slow).

Each benchmark runs as a user runs it, ``python benchmarks/<script> --smoke`` in a
subprocess (one thread), and each test checks what it printed or wrote: a row for every
variant, times and ratios above zero, ratios that are the quotients of the times shown.
No timing target is asserted. The subprocesses of the selected tests start together when
the first of them needs its result, two at a time (the benchmarks are single-threaded), so
the file costs about the sum of its smoke runs over two cores.

A benchmark that cannot measure (no Chromium for the dashboard, no TRL) exits non-zero
with a one-line error: checked here in-process, without running anything.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))  # the benchmark modules, for the in-process checks
TIMEOUT_S = 300  # per smoke run: each takes seconds alone, more beside a busy machine
# The longest first, so that two at a time finish together (most of each is importing torch,
# transformers and TransformerLens: ~5 s of CPU per process; probe, step and probe_depth
# run a child process too).
LONGEST_FIRST = ("probe", "step", "probe_depth", "trl_backend", "methods", "trl", "dashboard", "rollout",
                 "attention", "probe_log")
NUMBER = r"[-+]?\d+(?:\.\d+)?"


def _command(name: str, tmp: Path) -> list[str]:
    """The smoke run of ``name`` (its JSON or run folder, if any, under ``tmp``)."""
    extra = {"probe": ["--json", str(tmp / "probe.json"), "--causal"], "probe_depth": ["--json", str(tmp / "depth.json")],
             "methods": ["--out", str(tmp / "methods"), "--warmstart-seeds", "0", "1"]}.get(name, [])
    return [sys.executable, str(BENCH / f"bench_{name}.py"), "--smoke", *extra]


def smoke_test(name: str):
    """Mark a test as reading the smoke run of ``name`` (the ``smoke`` fixture starts it)."""
    def mark(fn):
        fn.smoke_name = name
        return fn
    return mark


@pytest.fixture(scope="module")
def smoke(request, tmp_path_factory, cli_env):
    """``smoke(name)`` -> ``(stdout, tmp)`` of ``name``'s finished smoke run, which exited 0.

    Every smoke run that a selected test of this module reads starts on first use, two at a
    time, the longest first."""
    tmp = tmp_path_factory.mktemp("smoke")
    wanted = (getattr(getattr(item, "function", None), "smoke_name", None)
              for item in request.session.items if getattr(item, "module", None) is request.module)
    names = sorted({name for name in wanted if name}, key=LONGEST_FIRST.index)

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(_command(name, tmp), check=False, cwd=REPO, env=cli_env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)

    pool = ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(run, name) for name in names}

    def result(name: str) -> tuple[str, Path]:
        done = futures[name].result()
        assert done.returncode == 0, f"{name} --smoke exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done.stdout, tmp

    yield result
    pool.shutdown(wait=True, cancel_futures=True)


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(NUMBER, line)]


def _row(out: str, first: str, cells: int) -> list[str]:
    """The ``cells`` cells after ``first`` of the one table row of ``out`` that starts with
    ``first`` (whitespace-split) and has that many more."""
    lead = first.split()
    rows = [line.split() for line in out.splitlines()
            if line.split()[: len(lead)] == lead and len(line.split()) == len(lead) + cells]
    assert len(rows) == 1, f"expected one row {first!r} of {cells} more cells in:\n{out}"
    return rows[0][len(lead):]


@smoke_test("attention")
def test_bench_attention_smoke_times_every_variant(smoke):
    out, _ = smoke("attention")
    line = next(line for line in out.splitlines() if line.strip().startswith("smoke:"))
    ms = {v: float(m) for v, m in re.findall(rf"(sdpa|selective|eager)\s+({NUMBER}) ms", line)}
    assert set(ms) == {"sdpa", "selective", "eager"} and all(t > 0 for t in ms.values())
    ratios = dict(re.findall(rf"(\w+/\w+) ({NUMBER})x", line))
    assert set(ratios) == {"selective/sdpa", "eager/sdpa", "selective/eager"}
    assert float(ratios["selective/sdpa"]) == pytest.approx(ms["selective"] / ms["sdpa"], abs=0.02, rel=0.05)
    assert float(ratios["eager/sdpa"]) == pytest.approx(ms["eager"] / ms["sdpa"], abs=0.02, rel=0.05)


@smoke_test("rollout")
def test_bench_rollout_smoke_compares_both_samplers(smoke):
    out, _ = smoke("rollout")
    assert "batch=4 prompt_len~8 new_tokens=8 repeats=1" in out
    params, ours, theirs, ratio = _row(out, "tiny", 4)
    assert params.endswith("M") and float(params[:-1]) > 0
    assert float(ours) > 0 and float(theirs) > 0
    assert float(ratio) == pytest.approx(float(ours) / float(theirs), abs=0.02)


@smoke_test("step")
def test_bench_step_smoke_has_every_method_against_grpo(smoke):
    out, _ = smoke("step")
    rows = {}
    for variant in ("grpo", "oisd", "sdpg", "rlsd", "opsd"):
        tokens, update_s, ratio, step_ratio, resident, peak, total, mem_ratio = map(
            float, _row(out, f"smoke {variant}", 8))
        assert tokens == 2 * 2 * 8  # full-length responses, every method the same batch
        assert update_s > 0 and ratio > 0 and step_ratio > 0 and math.isfinite(mem_ratio)
        # MiB, each rounded; in one process for all variants they are no figures to read.
        assert total == pytest.approx(resident + peak, abs=1.5)
        rows[variant] = ratio, mem_ratio
    assert rows["grpo"] == (1.0, 1.0)
    assert "unchunked" not in out  # the unchunked variants are for the real vocabulary only
    rollout = re.search(rf"\(smoke: rollout of the same batch ({NUMBER}) s", out)
    assert rollout and float(rollout.group(1)) > 0


@smoke_test("probe")
def test_bench_probe_smoke_measures_the_analyzer_against_its_floor(smoke):
    out, tmp = smoke("probe")
    r = json.loads((tmp / "probe.json").read_text())["tiny"]
    assert r["ratio_to_floor"] == pytest.approx(r["analyzer_s"] / r["floor_s"]) and r["ratio_to_floor"] > 0
    assert {"decode", "capture", "lens", "attention", "write"} <= set(r["analyzer_stages"])
    assert {"decode", "forward", "lens"} == set(r["floor_stages"])
    assert r["peak_rss_mb"] > 0 and r["weights_mb"] > 0 and r["probe_set"].startswith("2 prompts")
    # --causal: what early exit, the learned lens and patching add, each in its own stage.
    assert set(r["causal_added_s"]) == {"exit", "lens_fit", "lens_read", "patch"}
    assert all(v > 0 for v in r["causal_added_s"].values()) and r["causal_s"] > r["analyzer_s"] * 0.5
    assert r["causal_over_default"] == pytest.approx(r["causal_s"] / r["analyzer_s"])
    assert re.search(rf"causal analyses: {NUMBER} s = {NUMBER}x the default probe", out)
    for variant in ("ours", "capture", "naive", "forward"):
        median_s, vs_forward, peak_mib = _row(out, f"tiny {variant}", 3)
        assert float(median_s) > 0 and float(vs_forward.rstrip("x")) > 0 and float(peak_mib) >= 0
    assert float(_row(out, "tiny forward", 3)[1].rstrip("x")) == 1.0
    summary = re.search(rf"naive / ours = ({NUMBER})x, ours / forward = ({NUMBER})x", out)
    assert summary and min(map(float, summary.groups())) > 0


@smoke_test("probe_depth")
def test_bench_probe_depth_smoke_reports_time_memory_and_bytes(smoke):
    out, tmp = smoke("probe_depth")
    report = json.loads((tmp / "depth.json").read_text())
    assert report["shape"]["layers"] == 2 and report["shape"]["heads"] == 2
    assert report["seconds"] > 0 and report["peak_rss_mb"] > report["weights_mb"] > 0
    assert set(report["files_mb"]) == {f"step-000000-{k}.parquet" for k in ("attn", "cells", "drift", "metrics", "topk")}
    # A small model keeps every visible (query, key) pair, well inside the budget.
    assert report["attn_top_k"] is None and report["attn_mass_kept"] == 1.0 and report["within_budget"]
    assert "budget 100 MB: met" in out


@smoke_test("probe_log")
def test_bench_probe_log_smoke_times_both_layouts_and_merges(smoke):
    out, _ = smoke("probe_log")
    for layout in ("parts", "one_table"):
        step_1, step_34, ratio = map(float, _row(out, layout, 3))
        assert step_1 > 0 and step_34 > 0 and ratio == pytest.approx(step_34 / step_1, abs=0.01, rel=0.05)
    files = re.search(r"(\d+) files for 34 steps", out)
    assert files and 1 <= int(files.group(1)) < 34  # the parts of the first 32 steps were merged


@smoke_test("trl")
def test_bench_trl_smoke_compares_the_same_work(smoke):
    pytest.importorskip("trl")
    out, _ = smoke("trl")
    sides = {}
    for side in ("ours", "trl"):
        step_s, rollout_s, update_s, mean_len, tok_s = map(float, _row(out, side, 5))
        assert step_s > rollout_s > 0 and update_s > 0 and 1 <= mean_len <= 8 and tok_s > 0
        sides[side] = step_s
    ratio = float(_row(out, "ours/trl", 5)[0])
    assert ratio == pytest.approx(sides["ours"] / sides["trl"], abs=0.02, rel=0.05)
    assert re.search(rf"step-time ratio ours/trl = {NUMBER}", out)


@smoke_test("trl_backend")
def test_bench_trl_backend_smoke_times_every_variant(smoke):
    pytest.importorskip("trl")
    import bench_trl_backend

    out, _ = smoke("trl_backend")
    for name in bench_trl_backend.VARIANTS:
        line = next((line for line in out.splitlines() if line.startswith(name + " ")), None)
        assert line is not None, f"no row for {name!r} in:\n{out}"
        median_s, ratio = _numbers(line[len(name):])
        assert median_s > 0 and ratio > 0
    assert _numbers(next(line for line in out.splitlines() if line.startswith(bench_trl_backend.VARIANTS[0])))[-1] == 1.0


@smoke_test("methods")
def test_bench_methods_smoke_trains_probes_and_summarises(smoke):
    """Two warm starts (seeds 0 and 1), GRPO and OISD from each: the summary pools the runs,
    gives the gain per warm start and the verdicts from each start alone, with the causal
    read-outs (early exit, learned lens, patching) measured."""
    out, tmp = smoke("methods")
    summary = json.loads((tmp / "methods" / "summary.json").read_text())
    assert set(summary["methods"]) == {"grpo", "oisd"} and isinstance(summary["layer"], int)
    for label, entry in summary["methods"].items():
        assert entry["seeds"] == 2 and entry["runs"] == [f"{label}-ws0-seed0", f"{label}-ws1-seed0"]
        starts = sorted(entry["gain_by_start"])  # the two warm-start folders: <warmstart>-ws<s>
        assert [Path(s).name for s in starts] == ["warmstart-ws0", "warmstart-ws1"], starts
        for value in ("accuracy_after", "top1_agree_after", "exit_accuracy_after", "learned_top1_agree_after"):
            assert all(0.0 <= v <= 1.0 for v in entry[value]), (label, value, entry[value])
        assert 0.0 <= entry["accuracy_before"] <= 1.0 and all(v > 0 for v in entry["entropy_final"])
        assert 0.0 <= entry["exit_accuracy_before"] <= 1.0  # the built-in probes exit at step 0 (the demo's)
        # Patching ran on every run (2 smoke steps barely move a model: its curve may be undefined, NaN).
        assert len(entry["patch_half_layer"]) == 2
        for run in entry["runs"]:
            assert list((tmp / "methods" / run / "analysis").glob("step-*-patch.parquet")), run
    assert sorted(summary["methods"]["oisd"]["vs_baseline_by_start"]) == starts
    assert set(summary["seconds"]) == {"warmstart", "train", "probe"}
    for label in ("grpo", "oisd"):  # the printed table has a row per method
        assert re.search(rf"│ {label}\s+│\s+2 │", out), out
    assert "4 runs in" in out and any("OISD (signed)" in t for t in summary["targets"])


DASHBOARD_MEASURES = ("first render (alignment, cold)", "first render (new session)", "floor: bare Streamlit + 1 figure",
                      "switch to Training", "switch to Drill-down", "switch to Layer alignment", "floor: a bare view switch",
                      "oisd compare (all runs)")


@smoke_test("dashboard")
def test_bench_dashboard_smoke_measures_the_server_side(smoke):
    out, _ = smoke("dashboard")
    assert "server side only (Streamlit AppTest, no browser): 2 runs x 2 checkpoints" in out
    for name in DASHBOARD_MEASURES:
        line = next((line for line in out.splitlines() if line.startswith(name)), None)
        assert line is not None, f"no row {name!r} in:\n{out}"
        first, median = (float(x.rstrip("s")) for x in line[len(name):].split()[:2])
        assert first > 0 and median > 0
    memory = next(line for line in out.splitlines() if line.startswith("server process peak memory (MB)"))
    assert _numbers(memory.split(")")[-1])[0] > 0
    ratio = re.search(rf"new session / floor = ({NUMBER})", out)
    assert ratio and float(ratio.group(1)) > 0
    switches = re.search(rf"switch / floor switch: Training ({NUMBER}), Drill-down ({NUMBER}), "
                         rf"Layer alignment ({NUMBER})", out)
    assert switches and all(float(x) > 0 for x in switches.groups())
    assert "SLOW" not in out  # a smoke judges no target


@pytest.mark.slow
@pytest.mark.browser
def test_bench_dashboard_smoke_in_the_browser(cli_env):
    """``--smoke --browser``: the full run's code (headless Chromium) on the smoke root (~40 s)."""
    from tests.app.test_browser import require_chromium

    require_chromium()  # fails where `make browser` could have installed it, skips where not
    done = subprocess.run([sys.executable, str(BENCH / "bench_dashboard.py"), "--smoke", "--browser"], check=False,
                          cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "smoke, headless Chromium: 2 runs x 2 checkpoints" in done.stdout
    for name in DASHBOARD_MEASURES:
        line = next(line for line in done.stdout.splitlines() if line.startswith(name))
        assert float(line[len(name):].split()[0].rstrip("s")) > 0


def test_bench_dashboard_without_a_browser_exits_with_the_reason(monkeypatch):
    import bench_dashboard

    monkeypatch.setattr(bench_dashboard, "CHROMIUM", "/nonexistent/chromium")
    with pytest.raises(SystemExit) as exit_info:
        bench_dashboard.main(["--runs", "1", "--checkpoints", "1"])
    message = str(exit_info.value.code)
    assert message.startswith("bench_dashboard: cannot measure: /nonexistent/chromium is missing") and "\n" not in message
    with pytest.raises(SystemExit):  # --smoke --browser needs it too
        bench_dashboard.main(["--smoke", "--browser"])


@pytest.mark.parametrize("module", ["bench_trl", "bench_trl_backend"])
def test_bench_trl_without_trl_exits_with_the_reason(module, monkeypatch):
    bench = __import__(module)
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--smoke"])
    assert str(exit_info.value.code).startswith(f"{module}: cannot measure: TRL is not installed")


def test_run_all_smoke_covers_every_benchmark():
    import run_all

    scripts = {p.stem.removeprefix("bench_") for p in BENCH.glob("*.py") if p.name != "run_all.py"}
    assert set(run_all.SMOKES) == scripts
    for name in run_all.SMOKES:  # each script has the flag
        source = (BENCH / Path(run_all.smoke_command(name, Path("/tmp"))[1]).name).read_text()
        assert '"--smoke"' in source, name


def test_run_all_smoke_reports_each_and_fails_when_one_fails(monkeypatch, capfd):
    """The runner itself, on stand-in commands (each benchmark's smoke is run by the tests above)."""
    import run_all

    def stand_in(name, tmp):
        return [sys.executable, "-c", f"print('measured {name}')" if name == "attention" else "raise SystemExit(3)"]

    monkeypatch.setattr(run_all, "smoke_command", stand_in)
    assert run_all.main(["--smoke", "--only", "attention"]) == 0
    out = capfd.readouterr().out
    assert "=== attention (smoke)" in out and "measured attention" in out  # the benchmark's output, passed through
    assert re.search(rf"smoke attention\s+{NUMBER} s  ok", out) and "1 of 1 smoke runs passed" in out
    assert run_all.main(["--smoke", "--skip", *[n for n in run_all.SMOKES if n not in ("attention", "probe_log")]]) == 1
    out = capfd.readouterr().out
    assert "smoke probe_log" in out and "FAILED (exit status 3)" in out
    assert "1 of 2 smoke runs passed; failed: probe_log" in out
