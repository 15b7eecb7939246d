"""``oisd compare``: run folders written by hand through the run store, so every
value in the table is known exactly."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from rich.console import Console

from trainer.methods import METHODS, spec_of
from trainer.setup import resolve_layers
from workbench.compare import (
    COLUMNS,
    ENTROPY_WINDOW,
    comparability_warnings,
    comparison_table,
    method_summary,
    print_comparison,
    summary_lines,
)
from workbench.errors import WorkbenchError
from workbench.storage.atomic import atomic_write_parquet
from workbench.storage.runstore import Run
from workbench.storage.runwriter import RunWriter
from workbench.storage.schema import METRIC_COLUMNS


def probe_value(metric: str, step: int, layer: int, scale: float) -> float:
    """The value written for (metric, step, layer); distinct everywhere."""
    return scale * (100 * layer + step) + (0.5 if metric == "attn_js_final" else 0.0)


def probe_rows(run: str, step: int, n_layers: int, scale: float,
               source: str = "probe") -> pd.DataFrame:
    """Per-layer alignment rows plus distractors the table must ignore
    (greedy split, a per-head row, a pairwise row, another metric)."""
    rows = []
    for layer in range(1, n_layers + 1):
        for metric in ("top1_agree", "attn_js_final", "lens_js"):
            value = probe_value(metric, step, layer, scale)
            rows.append((run, step, layer, -1, -1, metric, value, "reference", source))
            rows.append((run, step, layer, -1, -1, metric, value + 1000, "greedy", source))
        rows.append((run, step, layer, 0, -1, "attn_js_final", -1.0, "reference", source))
        rows.append((run, step, layer, -1, n_layers, "attn_js_final", -2.0, "reference", source))
    rows.append((run, step, 0, -1, -1, "prediction_depth", 2.0, "reference", source))
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)


def make_run(root, name, method, *, seed=0, n_layers=4, layers=(0.5,), steps=(0, 10, 20),
             entropy=None, accuracy=(0.3, 0.5, 0.6), scale=1.0, gaps=None, start="nowhere"):
    """A finished run: eval at every step in ``steps``, entropy per training step, probes;
    ``gaps``: step -> (correct, wrong) top1_agree at every layer on the sampled splits."""
    path = root / name
    config = {"method": method, "seed": seed, "oisd": {"layers": list(layers)},
              "model": {"path": start}}
    writer = RunWriter(path, config, resume=False)
    # What the trainer records: L and the resolved OISD layers (none when OISD is off).
    oisd = spec_of(method).oisd if method in METHODS else False
    writer.record(num_layers=n_layers, oisd_layers=resolve_layers(list(layers), n_layers) if oisd else [],
                  baseline=spec_of(method).baseline if method in METHODS else False)
    last = steps[-1]
    entropy = entropy or {k: 2.0 - 0.1 * k for k in range(1, last + 1)}
    evals = dict(zip(steps, accuracy))
    for k in range(0, last + 1):
        values = {}
        if k in entropy:
            values.update(entropy=entropy[k], reward=0.1 * k)
        if k in evals:
            values.update({"eval/accuracy": evals[k], "eval/mean_at_k": evals[k] / 2})
        if values:
            writer.log_metrics(k, values)
    for step in steps:
        writer.log_probes(probe_rows(name, step, n_layers, scale))
    for step, (correct, wrong) in (gaps or {}).items():
        rows = [(name, step, layer, -1, -1, "top1_agree", value, split, "probe")
                for layer in range(1, n_layers + 1)
                for split, value in (("sampled_correct", correct), ("sampled_wrong", wrong))]
        writer.log_probes(pd.DataFrame(rows, columns=METRIC_COLUMNS))
    writer.set_status("finished")
    return path


def test_one_row_per_run_with_known_values(tmp_path):
    oisd = make_run(tmp_path, "oisd-seed0", "oisd", layers=[0.25])  # round(0.25 * 4) = block 1
    grpo = make_run(tmp_path, "grpo-seed0", "grpo", scale=2.0, accuracy=(0.3, 0.4, 0.45))
    table = comparison_table([grpo, oisd])

    assert list(table.columns) == COLUMNS
    assert list(table["run"]) == ["grpo-seed0", "oisd-seed0"]
    g, o = table.iloc[0], table.iloc[1]
    # GRPO has no OISD layer: it is read at the OISD run's layer, 1 (not L // 2 = 2).
    assert g["layer"] == 1 and o["layer"] == 1
    assert g["method"] == "grpo" and g["seed"] == 0 and g["steps"] == 20
    assert (g["accuracy_before"], g["accuracy_after"]) == (0.3, 0.45)
    assert g["mean_at_k_after"] == 0.225
    # Entropy 2 - 0.1 k at steps 16..20: mean 2 - 0.1 * 18.
    assert ENTROPY_WINDOW == 5
    assert g["entropy_final"] == pytest.approx(2.0 - 1.8)
    assert g["top1_agree_before"] == probe_value("top1_agree", 0, 1, 2.0)
    assert g["top1_agree_after"] == probe_value("top1_agree", 20, 1, 2.0)
    assert g["attn_js_final_before"] == probe_value("attn_js_final", 0, 1, 2.0)
    assert g["attn_js_final_after"] == probe_value("attn_js_final", 20, 1, 2.0)
    assert g["probe_step"] == 20 and g["source"] == "probe"
    assert o["top1_agree_after"] == probe_value("top1_agree", 20, 1, 1.0)


def test_default_layer_is_half_depth_without_oisd_runs(tmp_path):
    grpo = make_run(tmp_path, "grpo", "grpo", n_layers=6)
    sdpg = make_run(tmp_path, "sdpg", "sdpg", n_layers=6)
    table = comparison_table([grpo, sdpg])
    assert list(table["layer"]) == [3, 3]
    assert table["top1_agree_after"].tolist() == [probe_value("top1_agree", 20, 3, 1.0)] * 2


def test_oisd_fraction_resolves_like_the_trainer(tmp_path):
    # 0.5 of 6 blocks = block 3; an int block index is used as it is.
    frac = make_run(tmp_path, "frac", "oisd", n_layers=6, layers=[0.5])
    block = make_run(tmp_path, "block", "oisd+sdpg", n_layers=6, layers=[4, 2])
    table = comparison_table([frac, block])
    assert list(table["layer"]) == [3, 2]  # several layers: the first (lowest) one


def test_layer_override_applies_to_every_run(tmp_path):
    oisd = make_run(tmp_path, "oisd", "oisd")
    grpo = make_run(tmp_path, "grpo", "grpo")
    table = comparison_table([oisd, grpo], layer=3)
    assert list(table["layer"]) == [3, 3]
    assert table["attn_js_final_after"].tolist() == [probe_value("attn_js_final", 20, 3, 1.0)] * 2


def test_analyzer_tables_are_preferred_for_the_last_step(tmp_path):
    path = make_run(tmp_path, "oisd", "oisd", steps=(0, 10, 20))
    run = Run.open(path)
    # The analyzer saw checkpoints 10 and 20 (never step 0) and reports other numbers.
    for step in (10, 20):
        rows = probe_rows("oisd", step, 4, 3.0, "analyzer")
        atomic_write_parquet(run.analysis_path(step, "metrics"), rows)
    row = comparison_table([path]).iloc[0]
    assert row["top1_agree_after"] == probe_value("top1_agree", 20, 2, 3.0)
    assert row["attn_js_final_after"] == probe_value("attn_js_final", 20, 2, 3.0)
    assert row["source"] == "analyzer"
    # Step 0 exists only in the built-in probes.
    assert row["top1_agree_before"] == probe_value("top1_agree", 0, 2, 1.0)


def test_analyzer_step_after_the_last_probe_step_wins(tmp_path):
    path = make_run(tmp_path, "grpo", "grpo", steps=(0, 10))
    rows = probe_rows("grpo", 15, 4, 1.0, "analyzer")
    atomic_write_parquet(Run.open(path).analysis_path(15, "metrics"), rows)
    row = comparison_table([path]).iloc[0]
    assert row["probe_step"] == 15 and row["source"] == "analyzer"
    assert row["top1_agree_after"] == probe_value("top1_agree", 15, 2, 1.0)


def test_missing_values_are_nan(tmp_path):
    path = tmp_path / "bare"
    RunWriter(path, {"method": "grpo", "seed": 3}, resume=False).log_metrics(1, {"reward": 0.0})
    row = comparison_table([path]).iloc[0]
    assert row["steps"] == 1 and row["seed"] == 3
    assert row["layer"] is pd.NA  # no probes, no checkpoint, no model config: L unknown
    for column in ("accuracy_before", "accuracy_after", "entropy_final", "top1_agree_after"):
        assert math.isnan(row[column])


def test_aggregate_mean_and_std_over_seeds(tmp_path):
    runs = [
        make_run(tmp_path, "oisd-seed0", "oisd", seed=0, accuracy=(0.3, 0.5, 0.6)),
        make_run(tmp_path, "oisd-seed1", "oisd", seed=1, accuracy=(0.3, 0.5, 0.8)),
        make_run(tmp_path, "grpo-seed0", "grpo", seed=0, accuracy=(0.3, 0.5, 0.4)),
    ]
    agg = comparison_table(runs, aggregate=True)
    assert list(agg["method"]) == ["oisd", "grpo"]
    oisd, grpo = agg.iloc[0], agg.iloc[1]
    assert oisd["runs"] == 2 and oisd["seeds"] == [0, 1]
    assert oisd["accuracy_after"] == pytest.approx(0.7)
    assert oisd["accuracy_after_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.6, 0.8
    assert oisd["accuracy_before_std"] == 0.0
    assert grpo["accuracy_after"] == 0.4 and math.isnan(grpo["accuracy_after_std"])


def test_not_a_run_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="not a run folder") as info:
        comparison_table([tmp_path / "empty"])
    assert "\n" not in str(info.value)
    with pytest.raises(WorkbenchError, match="at least one"):
        comparison_table([])


def test_layer_out_of_range(tmp_path):
    path = make_run(tmp_path, "grpo", "grpo")
    with pytest.raises(WorkbenchError, match="layer 5 does not exist in run grpo"):
        comparison_table([path], layer=5)


def test_print_comparison_prints_and_returns_the_table(tmp_path):
    runs = [make_run(tmp_path, f"oisd-seed{s}", "oisd", seed=s) for s in (0, 1)]
    console = Console(record=True, width=250)
    table = print_comparison(runs, console=console)
    text = console.export_text()
    assert list(table["run"]) == ["oisd-seed0", "oisd-seed1"]
    assert "oisd-seed0" in text and "0.300 -> 0.600" in text
    assert "mean ± std over seeds" in text  # two runs of one method: the aggregate too
    assert "0.300 ± 0.000" in text


def test_gap_is_correct_minus_wrong_at_the_layer(tmp_path):
    path = make_run(tmp_path, "oisd-seed0", "oisd", gaps={0: (0.50, 0.45), 20: (0.70, 0.40)})
    console = Console(record=True, width=250)
    print_comparison([path], console=console)
    text = console.export_text()
    assert "Correct-minus-wrong gaps" in text and "0.050 -> 0.300" in text
    row = comparison_table([path]).iloc[0]
    assert row["top1_agree_gap_before"] == pytest.approx(0.05)
    assert row["top1_agree_gap_after"] == pytest.approx(0.30)
    assert math.isnan(row["lens_js_gap_after"])  # no sampled lens_js rows were written


def test_incomparable_runs_are_named(tmp_path):
    runs = [make_run(tmp_path, "a", "grpo", seed=0), make_run(tmp_path, "b", "grpo", seed=0, steps=(0, 10)),
            make_run(tmp_path, "c", "grpo", seed=1, start="other-model")]
    warnings = comparability_warnings(runs)
    assert any("grpo: runs start from different models (nowhere, other-model)" in w for w in warnings)
    assert any("grpo: runs reached different steps (10, 20)" in w for w in warnings)
    assert any("grpo: seed 0 appears twice (a, b)" in w for w in warnings)
    console = Console(record=True, width=250)
    print_comparison(runs, console=console)
    text = console.export_text()
    assert "warning: grpo: seed 0 appears twice" in text and "runs not comparable" in text
    # Comparable seeds of one method, from one start: no warning.
    good = [make_run(tmp_path, f"oisd-seed{s}", "oisd", seed=s) for s in (0, 1)]
    assert comparability_warnings(good) == []


def test_method_summary_says_whether_a_difference_beats_the_seed_spread(tmp_path):
    runs = [make_run(tmp_path, f"grpo-seed{s}", "grpo", seed=s, accuracy=(0.3, 0.5, a))
            for s, a in ((0, 0.60), (1, 0.62))]
    runs += [make_run(tmp_path, f"oisd-seed{s}", "oisd", seed=s, accuracy=(0.3, 0.5, a), gaps={20: (0.6, 0.4)})
             for s, a in ((0, 0.70), (1, 0.74))]
    summary = method_summary(runs)
    assert summary["layer"] == 2 and list(summary["methods"]) == ["grpo", "oisd"]
    assert summary["baseline"] == "grpo"  # from run.json's baseline, which the method table decides
    oisd = summary["methods"]["oisd"]
    assert oisd["seeds"] == 2 and oisd["accuracy_before"] == pytest.approx(0.3)
    assert oisd["accuracy_after"] == pytest.approx([0.70, 0.74])
    assert oisd["top1_agree_gap_after"] == pytest.approx([0.2, 0.2])
    verdict = oisd["vs_baseline"]["accuracy_after"]
    # difference 0.72 - 0.61 = 0.11; spread = max(std(0.70, 0.74), std(0.60, 0.62)) = sqrt(0.0008)
    assert verdict["difference"] == pytest.approx(0.11)
    assert verdict["spread"] == pytest.approx(math.sqrt(0.0008))
    assert verdict["larger_than_spread"] is True
    lines = summary_lines(summary)
    assert "oisd vs grpo, accuracy: difference +0.110 is larger than the seed spread (0.028, 2 vs 2 runs)" in lines


def test_verdicts_are_also_given_from_each_warm_start_alone(tmp_path):
    """Runs from two warm starts: the pooled verdict, the gain per start, and the verdict from
    each start's runs alone (one start agrees with the pooled verdict, the other does not)."""
    after = {("grpo", "ws0"): (0.60, 0.62), ("grpo", "ws1"): (0.50, 0.52),
             ("oisd", "ws0"): (0.70, 0.72), ("oisd", "ws1"): (0.51, 0.53)}
    runs = [make_run(tmp_path, f"{m}-{w}-seed{s}", m, seed=s, start=w, accuracy=(0.3, 0.4, a))
            for (m, w), values in after.items() for s, a in enumerate(values)]
    summary = method_summary(runs)
    oisd = summary["methods"]["oisd"]
    assert oisd["gain_by_start"] == {"ws0": pytest.approx([0.4, 0.42]), "ws1": pytest.approx([0.21, 0.23])}
    pooled = oisd["vs_baseline"]["accuracy_after"]
    assert pooled["difference"] == pytest.approx(0.055)  # 0.615 - 0.56
    assert pooled["larger_than_spread"] is False  # the spread spans both starts: std(.7,.72,.51,.53) = 0.1102
    by_start = oisd["vs_baseline_by_start"]
    assert by_start["ws0"]["accuracy_after"]["difference"] == pytest.approx(0.10)
    assert by_start["ws0"]["accuracy_after"]["larger_than_spread"] is True  # 0.10 > std(0.70, 0.72) = 0.0141
    assert by_start["ws1"]["accuracy_after"]["difference"] == pytest.approx(0.01)
    assert by_start["ws1"]["accuracy_after"]["larger_than_spread"] is False
    assert "grpo" not in summary["methods"]["grpo"].get("vs_baseline_by_start", {})
    line = next(x for x in summary_lines(summary) if x.startswith("oisd vs grpo, accuracy:"))
    assert line.endswith("from each warm start alone: the same verdict from 1 of 2, the same sign from 2 of 2")
