"""The synthetic runs root of benchmarks/bench_dashboard.py, read the way the dashboard and
`oisd compare` read a real one (fast: part of the default suite, unlike the benchmark)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_bench_dashboard_root_is_read_as_the_dashboard_reads_it(tmp_path):
    """The synthetic root of bench_dashboard holds what a real one does (four splits with
    their n_samples rows, merged probe and analysis segments, drift, compact hard-linked detail), and the
    readers the dashboard and `oisd compare` use find it all."""
    import bench_dashboard

    from workbench.compare import comparison_table
    from workbench.storage.runstore import Run
    from workbench.storage.paths import SEGMENT_STEPS

    root = tmp_path / "runs"
    bench_dashboard.build_root(root, runs=2, checkpoints=SEGMENT_STEPS + 2, layers=6, heads=3)
    run = Run.open(root / "grpo-0")
    assert run.num_layers == 6
    assert len(run.paths.probe_segment_files()) == 1 and len(run.paths.probe_part_files()) == 2
    for kind in ("metrics", "drift"):  # merged as `oisd probe` leaves them; the detail is per checkpoint
        segments, parts = run.paths.analysis_files(kind)
        assert len(segments) == 1 and len(parts) == 2
    assert len(run.paths.analysis_files("attn")[1]) == SEGMENT_STEPS + 2
    steps = [10 * c for c in range(1, SEGMENT_STEPS + 3)]
    assert run.metric_steps("probe") == steps and run.metric_steps("analyzer") == steps
    catalog = run.metric_catalog("analyzer")
    assert set(catalog["split"]) == {"reference", "greedy", "sampled_correct", "sampled_wrong"}
    heat = run.metric_rows("probe", metric=["lens_kl"], head=[-1], ref_layer=[-1], split=["reference"])
    assert len(heat) == 6 * len(steps)
    assert len(run.analysis("drift")) == len(steps) * (3 + 6 * 4)
    attn = run.analysis_path(steps[-1], "attn")
    assert attn.stat().st_ino == run.analysis_path(steps[0], "attn").stat().st_ino  # one file, linked
    table = comparison_table([str(root / "grpo-0"), str(root / "oisd-1")])
    assert len(table) == 2 and table["top1_agree_after"].notna().all()
