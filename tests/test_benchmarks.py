"""The performance harness runs end to end (slow: minutes; ``make test-all``).

No timing is asserted here (targets live in the benchmarks' own output): these tests
keep the harness from rotting, and check that each table is complete and consistent.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_bench_step_tiny_has_every_method_against_grpo():
    import bench_step

    rows = bench_step.main(["--sizes", "tiny", "--repeats", "1"])
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"grpo", "oisd", "sdpg", "rlsd", "opsd"}
    assert by_variant["grpo"]["ratio"] == 1.0 and by_variant["grpo"]["mem_ratio"] == 1.0
    for r in rows:
        assert r["update_s"] > 0 and r["rollout_s"] > 0 and r["resident_mib"] > 0
        assert r["tokens"] == 8 * 8 * 40  # full-length responses, every method the same batch
    # Methods that keep a frozen model hold more than GRPO before their update.
    assert by_variant["opsd"]["resident_mib"] > by_variant["grpo"]["resident_mib"]


def test_bench_trl_compares_the_same_work():
    pytest.importorskip("trl")
    import bench_trl

    ours, trl, ratio = bench_trl.main(["--repeats", "1"])
    assert (ours["side"], trl["side"], ratio["side"]) == ("ours", "trl", "ours/trl")
    for r in (ours, trl):
        assert r["step_s"] > r["rollout_s"] > 0 and 1 <= r["mean_len"] <= 40
    assert ratio["step_s"] == pytest.approx(ours["step_s"] / trl["step_s"])


def test_bench_trl_backend_times_every_variant():
    pytest.importorskip("trl")
    import bench_trl_backend

    medians = bench_trl_backend.main(["--steps", "3"])
    assert set(medians) == set(bench_trl_backend.VARIANTS)
    assert all(m > 0 for m in medians.values())


def test_bench_probe_depth_reports_time_memory_and_bytes(tmp_path):
    import json
    import subprocess

    out = tmp_path / "depth.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_probe_depth.py"
    subprocess.run([sys.executable, str(script), "--layers", "3", "--heads", "4", "--kv-heads", "2",
                    "--hidden", "64", "--tokens", "96", "--json", str(out)], check=True, timeout=600)
    report = json.loads(out.read_text())
    assert report["seconds"] > 0 and report["peak_rss_mb"] > report["weights_mb"] > 0
    assert set(report["files_mb"]) == {f"step-000000-{k}.parquet" for k in ("attn", "cells", "drift", "metrics", "topk")}
    # A small model keeps every visible (query, key) pair, well inside the budget.
    assert report["attn_top_k"] is None and report["attn_mass_kept"] == 1.0 and report["within_budget"]


def test_bench_probe_log_times_both_layouts():
    import bench_probe_log

    r = bench_probe_log.main(["--steps", "5", "--layers", "4", "--heads", "2"])
    assert r["rows_per_step"] > 0 and r["steps"] == 5
    for layout in ("parts", "one_table"):
        assert r[layout]["step_1_s"] > 0 and r[layout]["step_5_s"] > 0


def test_bench_probe_measures_the_analyzer_against_its_floor(tmp_path):
    import json
    import subprocess

    out = tmp_path / "floor.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_probe.py"
    subprocess.run([sys.executable, str(script), "--sizes", "tiny", "--repeats", "1", "--json", str(out)],
                   check=True, timeout=900)
    r = json.loads(out.read_text())["tiny"]
    assert r["ratio_to_floor"] == pytest.approx(r["analyzer_s"] / r["floor_s"])
    assert {"decode", "capture", "lens", "attention", "write"} <= set(r["analyzer_stages"])
    assert {"decode", "forward", "lens"} == set(r["floor_stages"])
    assert r["peak_rss_mb"] > 0 and r["weights_mb"] > 0
