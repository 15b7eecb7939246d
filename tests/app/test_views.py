"""Every dashboard view under Streamlit's AppTest, on the runs root of conftest.py."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.app.conftest import (
    N_HEADS,
    N_LAYERS,
    RUN_SCALE,
    STEPS,
    TOKENS,
    expected_drift,
    expected_exit,
    expected_patch,
    expected_value,
    html_grids,
    make_runs_root,
    plotly_figures,
    stack_block,
    stacked_runs,
)


def _run(at):
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _csv(downloads, name_part: str) -> pd.DataFrame:
    matches = [data for name, data in downloads if name and name_part in name]
    assert matches, f"no download named like {name_part!r} in {[n for n, _ in downloads]}"
    return pd.read_csv(io.BytesIO(matches[-1]))


def test_runs_view_lists_runs_and_shows_the_broken_one(runs_root, make_app, downloads):
    at = _run(make_app(runs_root))
    assert at.query_params["view"] == "Runs"
    table = at.dataframe[0].value.set_index("run")
    assert sorted(table.index) == ["broken", "grpo", "oisd", "partial"]  # not-a-run has no run.json
    assert table.loc["grpo", "method"] == "grpo" and table.loc["oisd", "method"] == "oisd"
    assert table.loc["grpo", "status"] == "finished"
    assert table.loc["partial", "status"] == "training (live)"  # metrics written seconds ago
    assert table.loc["grpo", "steps"] == 30 and table.loc["partial", "steps"] == 1  # torn line dropped
    assert table.loc["oisd", "accuracy"] == pytest.approx(0.30)
    assert table.loc["oisd", "eval/accuracy"] == pytest.approx(0.60)
    assert table.loc["grpo", "checkpoints"] == len(STEPS)
    assert table.loc["broken", "status"] == "unreadable"
    errors = [e.value for e in at.error]
    assert any("`broken`" in e and "run.json is unreadable" in e for e in errors)
    # Default selection: the healthy runs; provenance shows the config.
    assert at.multiselect(key="runs").value == ["grpo", "oisd", "partial"]
    assert any('"method": "grpo"' in j.proto.body.replace("\n", " ") or '"method":"grpo"' in j.proto.body
               for j in at.json)
    exported = _csv(downloads, "runs.csv")
    assert sorted(exported["run"]) == ["broken", "grpo", "oisd", "partial"]


def test_training_view_overlays_runs(runs_root, make_app, downloads):
    at = _run(make_app(runs_root, view="Training", runs=["grpo", "oisd"]))
    figure = plotly_figures(at)["training_curves"]
    reward = {t.name: t for t in figure.data if t.xaxis in ("x", None) and t.yaxis in ("y", None)}
    assert set(reward) == {"grpo", "oisd"}
    steps = np.arange(1, STEPS[-1] + 1)
    np.testing.assert_allclose(reward["oisd"].y, 0.2 + 0.02 * steps * RUN_SCALE["oisd"])
    # The first DEFAULT_PANELS of the default keys are drawn; the others are one pick away.
    assert [a.text for a in figure.layout.annotations] == ["reward", "accuracy", "eval/accuracy", "entropy"]
    everything = ["reward", "accuracy", "eval/accuracy", "entropy", "kl", "loss/think", "sched/beta", "sched/lambda"]
    at.multiselect(key="training_keys").set_value(everything)
    figure = plotly_figures(_run(at))["training_curves"]
    assert [a.text for a in figure.layout.annotations] == everything
    exported = _csv(downloads, "training.csv")
    lambda_rows = exported[exported["metric"] == "sched/lambda"]
    assert set(lambda_rows["run"]) == {"oisd"} and len(lambda_rows) == STEPS[-1]  # grpo logs no lambda
    assert len(exported[(exported["metric"] == "eval/accuracy")]) == 2 * len(STEPS)


def test_alignment_heatmap_has_layer_by_checkpoint_shape(runs_root, make_app, downloads):
    at = _run(make_app(runs_root, view="Layer alignment", runs=["grpo", "oisd", "partial"], metric="lens_kl"))
    assert at.radio(key="source").value == "probe"
    figures = plotly_figures(at)
    heat = figures["alignment_heatmaps"]
    # One heat map, the runs stacked top to bottom (partial has no readable probes), a blank row
    # between them, one shared checkpoint-step axis and colour scale.
    assert len(heat.data) == 1 and stacked_runs(heat) == ["grpo", "oisd"]
    trace = heat.data[0]
    assert np.array(trace.z).shape == (2 * N_LAYERS + 1, len(STEPS)) and list(trace.x) == list(STEPS)
    assert np.isnan(np.array(trace.z, dtype=float)[N_LAYERS]).all()  # the row between the two runs
    assert trace.coloraxis == "coloraxis"
    for run in ["grpo", "oisd"]:
        expected = [[expected_value(run, "lens_kl", s, layer) for s in STEPS] for layer in range(1, N_LAYERS + 1)]
        np.testing.assert_allclose(stack_block(heat, run, range(1, N_LAYERS + 1)), expected)
    assert list(trace.y[:N_LAYERS]) == [f"oisd, layer {layer}" for layer in range(1, N_LAYERS + 1)]  # layer 1 low
    axis = figures["alignment_heatmaps"].layout.coloraxis
    assert axis.cmin == pytest.approx(expected_value("oisd", "lens_kl", 30, N_LAYERS))
    assert axis.cmax == pytest.approx(expected_value("grpo", "lens_kl", 10, 1))
    assert "KL(p^L || p^l), tuned-lens direction" in figures["alignment_heatmaps"].layout.title.text
    assert any("tuned-lens direction" in m.value for m in at.markdown)
    # The corrupt probes.parquet of `partial` is reported in its place.
    assert any("partial" in e.value and "unreadable" in e.value for e in at.error)
    # One section at a time: the heat maps alone are drawn until another section is chosen.
    assert set(figures) == {"alignment_heatmaps"}
    at.radio(key="alignment_show").set_value("Difference of two runs")
    figures = plotly_figures(_run(at))
    assert set(figures) == {"alignment_difference"} and at.query_params["alignment_show"] == "Difference of two runs"
    # Difference: OISD minus GRPO by default.
    diff = figures["alignment_difference"]
    assert "oisd minus grpo" in diff.layout.title.text
    expected_diff = [[expected_value("oisd", "lens_kl", s, layer) - expected_value("grpo", "lens_kl", s, layer)
                      for s in STEPS] for layer in range(1, N_LAYERS + 1)]
    np.testing.assert_allclose(diff.data[0].z, expected_diff)
    exported = _csv(downloads, "alignment-lens_kl.csv")
    assert len(exported) == 2 * N_LAYERS * len(STEPS)
    assert set(exported["metric"]) == {"lens_kl"} and set(exported["head"]) == {-1}


def test_alignment_from_url_analyzer_source_and_per_step_metric(runs_root, make_app):
    at = _run(make_app(runs_root, view="Layer alignment", runs=["oisd"], metric="top1_agree", source="analyzer"))
    assert at.radio(key="source").value == "analyzer"
    assert at.selectbox(key="metric").value == "top1_agree"
    heat = plotly_figures(at)["alignment_heatmaps"]
    np.testing.assert_allclose(stack_block(heat, "oisd", [1])[0], [expected_value("oisd", "top1_agree", s, 1) for s in STEPS])
    assert at.query_params["source"] == "analyzer" and at.query_params["metric"] == "top1_agree"

    at.selectbox(key="metric").set_value("prediction_depth")
    _run(at)
    lines = plotly_figures(at)["alignment_lines"]
    np.testing.assert_allclose(lines.data[0].y, [1.0 + 0.5 * 30.0 / s for s in STEPS])
    assert at.query_params["metric"] == "prediction_depth"


def test_attention_view(runs_root, make_app, downloads):
    at = _run(make_app(runs_root, view="Attention", runs=["grpo"], step="20"))
    assert at.selectbox(key="step").value == 20
    figures = plotly_figures(at)
    matrix = np.array(figures["attention_matrix"].data[0].z)
    layers = np.arange(1, N_LAYERS + 1)
    np.testing.assert_allclose(matrix, np.abs(layers[:, None] - layers[None, :]) * 0.05)
    per_head = np.array(figures["attention_heads"].data[0].z)
    assert per_head.shape == (N_LAYERS, N_HEADS)
    np.testing.assert_allclose(per_head[:, 1] - per_head[:, 0], 0.01)
    bars = {t.name: t.y for t in figures["attention_matching"].data}
    np.testing.assert_allclose(bars["Hungarian matched"], 0.8 * np.array(bars["identity (head h to head h)"]))
    exported = _csv(downloads, "attention-grpo-step20.csv")
    assert set(exported["step"]) == {20}
    assert len(exported[exported["metric"] == "attn_js"]) == N_LAYERS * N_LAYERS


def test_drilldown_lens_grid_and_attention_maps(runs_root, make_app, downloads):
    at = _run(make_app(runs_root, view="Drill-down", runs=["oisd"], step="10", prompt="1", layer="2"))
    assert (at.selectbox(key="step").value, at.selectbox(key="prompt").value) == (10, 1)
    grid = html_grids(at)["drilldown_grid"]  # an HTML table, not a Plotly figure
    assert grid.z.shape == (N_LAYERS, 2) and grid.layers == [str(n) for n in range(1, N_LAYERS + 1)]
    # Top-1 token written in each cell: the input token early, the target from layer 3 on.
    assert grid.text[0] == [TOKENS[5], TOKENS[6]] and grid.text[3] == [TOKENS[6], TOKENS[7]]
    tip = grid.tips[0][0]  # the tooltip: where, the value, then the top-k tokens with their probabilities
    assert tip.startswith("layer 1, position ") and "top-k:" in tip and "0.500" in tip and "7" in tip
    np.testing.assert_allclose(grid.z[1][0], expected_value("oisd", "lens_kl", 10, 2) + 0.5)
    assert "tuned-lens direction" in grid.title
    assert len(grid.ticks) == 2 and all("\u2192" in t for t in grid.ticks)  # input -> target under each column
    exported = _csv(downloads, "logit-oisd-step10-prompt1.csv")
    assert len(exported) == N_LAYERS * 2 * 3 and set(exported["prompt"]) == {1}
    assert not plotly_figures(at)  # one section at a time
    at.radio(key="drilldown_show").set_value("Attention maps")
    figures = plotly_figures(_run(at))
    assert set(figures) == {"drilldown_attention"}  # the three maps in one figure
    maps = figures["drilldown_attention"]
    assert [a.text for a in maps.layout.annotations] == ["Layer 2, step 10", "Final layer 4, step 10",
                                                        "Layer 2, step 20"]
    assert maps.layout.title.text == "Attention weights, mean over heads"
    # One colour scale for the three: from 0 to the highest weight of any.
    highest = max(np.nanmax(np.array(trace.z, dtype=float)) for trace in maps.data)
    assert [trace.coloraxis for trace in maps.data] == ["coloraxis"] * 3
    assert (maps.layout.coloraxis.cmin, maps.layout.coloraxis.cmax) == (0.0, pytest.approx(highest))
    assert at.selectbox(key="layer").value == 2  # the URL's layer, kept while the lens section was shown
    chosen = np.array(maps.data[0].z, dtype=float)
    assert chosen.shape == (2, 7)  # queries 5, 6 x keys 0..6
    np.testing.assert_allclose(np.nansum(chosen, axis=1), 1.0)  # each query row is a distribution
    assert list(maps.data[0].y) == list(maps.data[2].y)  # one query axis: the same prompt's positions
    assert set(_csv(downloads, "attention-oisd-step10-prompt1.csv")["layer"]) == {2, N_LAYERS}
    assert at.query_params["prompt"] == "1" and at.query_params["layer"] == "2"
    assert at.query_params["drilldown_show"] == "Attention maps"


def test_drilldown_attention_without_the_other_steps_detail(runs_root, tmp_path, make_app):
    """The step compared with has no attention table: the layer and final-layer maps are drawn,
    and the missing pair is named instead of drawn."""
    root = tmp_path / "runs"
    shutil.copytree(runs_root / "oisd", root / "oisd")
    (root / "oisd" / "analysis" / "step-000020-attn.parquet").unlink()
    at = _run(make_app(root, view="Drill-down", runs=["oisd"], step="10", prompt="1", layer="2",
                       drilldown_show="Attention maps"))
    assert at.selectbox(key="drilldown_step_b").value == 20
    maps = plotly_figures(at)["drilldown_attention"]
    assert [a.text for a in maps.layout.annotations] == ["Layer 2, step 10", "Final layer 4, step 10"]
    assert any(info.value == "No attention detail of prompt 1 at step 20." for info in at.info)


@pytest.mark.parametrize("name", ["../outside", "/etc", "grpo/../../outside"])
def test_url_naming_a_run_outside_the_root_is_refused(runs_root, make_app, name):
    at = _run(make_app(runs_root, view="Training", runs=[name, "grpo"]))
    assert any("Refused run" in e.value and name in e.value for e in at.error)
    assert at.multiselect(key="runs").value == ["grpo"]
    assert "training_curves" in plotly_figures(at)


def test_symlink_leaving_the_root_is_refused(tmp_path, make_app):
    root = make_runs_root(tmp_path / "inside")
    outside = tmp_path / "outside"
    shutil.copytree(root / "grpo", outside)
    os.symlink(outside, root / "escape")
    at = _run(make_app(root, runs=["escape"]))
    errors = " ".join(e.value for e in at.error)
    assert "escape" in errors and "outside" in errors
    assert "escape" not in at.multiselect(key="runs").options


def test_missing_root_is_one_message(tmp_path, make_app):
    at = _run(make_app(tmp_path / "nowhere"))
    assert len(at.error) == 1 and "is not a folder" in at.error[0].value


def test_live_run_refreshes_when_files_change(tmp_path, make_app):
    root = make_runs_root(tmp_path)
    at = _run(make_app(root, view="Training", runs=["partial"]))
    assert "Training now" in " ".join(c.value for c in at.sidebar.caption)  # written seconds ago: live
    at.toggle(key="live").set_value(True)
    _run(at)
    before = list(plotly_figures(at)["training_curves"].data[0].x)
    with open(root / "partial" / "metrics.jsonl", "w") as f:  # the run writes two more steps
        f.write("".join(json.dumps({"step": s, "time": 0.0, "reward": 0.1 * s}) + "\n" for s in (1, 2, 3)))
    _run(at)
    after = list(plotly_figures(at)["training_curves"].data[0].x)
    assert before == [1] and after == [1, 2, 3]


def test_gap_split_is_correct_minus_wrong_per_layer_and_step():
    from app.views.alignment import GAP, per_layer_rows
    from workbench.storage.schema import METRIC_COLUMNS

    rows = []
    for step, layer, split, value in [(0, 1, "sampled_correct", 0.7), (0, 1, "sampled_wrong", 0.5),
                                      (0, 2, "sampled_correct", 0.9), (0, 2, "sampled_wrong", 0.95),
                                      (5, 1, "sampled_correct", 0.6),  # no wrong sample at step 5: no gap
                                      (0, 1, "reference", 0.1)]:
        rows.append(["r", step, layer, -1, -1, "top1_agree", value, split, "probe"])
    table = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    gap = per_layer_rows(table, "top1_agree", GAP).set_index(["step", "layer"])["value"]
    assert gap.to_dict() == pytest.approx({(0, 1): 0.2, (0, 2): -0.05})


def test_drilldown_side_by_side_grids_and_their_difference(runs_root, make_app):
    at = _run(make_app(runs_root, view="Drill-down", runs=["oisd"], step="10", prompt="1", layer="2",
                       drilldown_show="Side by side: two checkpoints or models"))  # the section from the URL
    grids = html_grids(at)
    assert set(grids) == {"drilldown_grid_a", "drilldown_grid_b", "drilldown_grid_diff"}
    a, b, diff = (grids[key].z for key in ("drilldown_grid_a", "drilldown_grid_b", "drilldown_grid_diff"))
    # A and B on one colour scale, from the lower of their minima to the higher of their maxima.
    both = np.concatenate([a.ravel(), b.ravel()])
    scale = [f"{both.min():.3g}", f"{both.max():.3g}"]
    assert grids["drilldown_grid_a"].bar[:2] == scale and grids["drilldown_grid_b"].bar[:2] == scale
    assert a.min() != b.min() or a.max() != b.max()  # (their own ranges differ)
    bound = np.abs(diff).max()  # the difference: white at 0, symmetric about it
    assert grids["drilldown_grid_diff"].bar[:2] == [f"{-bound:.3g}", f"{bound:.3g}"]
    # The default partner is step 20 of the same run: A minus B cell by cell.
    assert "step 20" in at.selectbox(key="drilldown_pair").format_func(at.selectbox(key="drilldown_pair").value)
    np.testing.assert_allclose(diff, a - b)


def test_pair_problem_names_why_two_grids_do_not_line_up():
    from app.views.drilldown import pair_problem

    rec = {"prompt_ids": [1, 5, 6], "reference_ids": [7, 2]}
    assert pair_problem([rec], [dict(rec)], 0) is None
    assert "different tokenizers" in pair_problem([rec], [dict(rec)], 0, ("aaa", "bbb"))
    assert "tokenised differently" in pair_problem([rec], [{**rec, "prompt_ids": [1, 5, 9]}], 0)
    assert "no shared teacher-forced reference" in pair_problem([{**rec, "reference_ids": None}],
                                                                [{**rec, "reference_ids": None}], 0)
    assert "not in both probe sets" in pair_problem([rec], [], 0)


def test_alignment_overlays_per_layer_curves_at_one_checkpoint(runs_root, make_app):
    at = _run(make_app(runs_root, view="Layer alignment", runs=["grpo", "oisd"], metric="lens_kl",
                       alignment_show="Per-layer curves at one checkpoint"))
    profiles = plotly_figures(at)["alignment_profiles"]
    assert [t.name for t in profiles.data] == ["grpo", "oisd"]
    last = STEPS[-1]
    for trace, run in zip(profiles.data, ["grpo", "oisd"]):
        assert list(trace.x) == list(range(1, N_LAYERS + 1))
        np.testing.assert_allclose(trace.y, [expected_value(run, "lens_kl", last, layer)
                                             for layer in range(1, N_LAYERS + 1)])


def test_alignment_view_shows_where_training_changed_the_weights(runs_root, make_app):
    at = _run(make_app(runs_root, view="Layer alignment", runs=["grpo", "oisd"], metric="lens_kl",
                       alignment_show="Weight drift"))
    figure = plotly_figures(at)["alignment_drift"]
    assert len(figure.data) == 1 and stacked_runs(figure) == ["grpo", "oisd"]
    assert list(figure.data[0].x) == list(STEPS)
    blocks = ["embeddings"] + [str(b) for b in range(1, N_LAYERS + 1)]  # in model order, embeddings lowest
    for run in ["grpo", "oisd"]:
        expected = [[expected_drift(run, s, b) for s in STEPS] for b in range(N_LAYERS + 1)]
        np.testing.assert_allclose(stack_block(figure, run, blocks, "block"), expected)
    assert "Weight drift" in figure.layout.title.text
    caption = " ".join(c.value for c in at.caption)
    assert f"`oisd` at step {STEPS[-1]}: block 1 moved most" in caption
    assert f"`grpo` at step {STEPS[-1]}: block {N_LAYERS} moved most" in caption


def test_long_training_curves_are_drawn_from_bucket_extremes():
    """A 5,000-step curve is drawn from at most MAX_CURVE_POINTS points that keep each
    bucket's minimum and maximum (a one-step spike survives), in step order; a short curve
    is drawn as it is."""
    from app.figures import MAX_CURVE_POINTS, decimate, training_curves

    steps = np.arange(1, 5001)
    values = np.sin(steps / 300.0)
    values[3333] = 9.0  # a spike at step 3334
    x, y = decimate(steps, values)
    assert len(x) <= MAX_CURVE_POINTS and np.all(np.diff(x) > 0)
    assert y.max() == 9.0 and 3334 in x
    assert y.min() == pytest.approx(values.min())
    assert np.array_equal(values[x - 1], y)  # every drawn point is a real (step, value)
    short_x, short_y = decimate(steps[:50], values[:50])
    assert np.array_equal(short_x, steps[:50]) and np.array_equal(short_y, values[:50])
    table = pd.DataFrame({"step": steps, "reward": values})
    trace = training_curves({"run": table}, ["reward"]).data[0]
    assert len(trace.x) <= MAX_CURVE_POINTS and max(trace.y) == 9.0


def test_causal_view_early_exit_lens_and_patching(runs_root, make_app, downloads):
    at = _run(make_app(runs_root, view="Causal", runs=["grpo", "oisd"]))
    figures = plotly_figures(at)
    # Early exit: a layer x checkpoint heat map per run, and per-method curves at the last checkpoint.
    assert stacked_runs(figures["exit_heatmaps"]) == ["grpo", "oisd"]
    for run in ["grpo", "oisd"]:
        expected = [[expected_exit(run, s, layer) for s in STEPS] for layer in range(1, N_LAYERS + 1)]
        np.testing.assert_allclose(stack_block(figures["exit_heatmaps"], run, range(1, N_LAYERS + 1)), expected)
    curves = {t.name: t for t in figures["exit_curves"].data}
    assert set(curves) == {"grpo (1 run)", "oisd (1 run)"}
    np.testing.assert_allclose(curves["oisd (1 run)"].y, [expected_exit("oisd", STEPS[-1], layer)
                                                           for layer in range(1, N_LAYERS + 1)])
    # Logit against learned lens: the learned one 0.05 above at every layer below L.
    lines = {t.name: np.array(t.y) for t in figures["lens_comparison"].data}
    assert set(lines) == {"grpo (logit)", "grpo (affine)", "oisd (logit)", "oisd (affine)"}
    np.testing.assert_allclose(lines["grpo (affine)"] - lines["grpo (logit)"], [0.05] * (N_LAYERS - 1) + [0.0])
    # Patching: one panel per run, one line per component, at the last checkpoint.
    traces = figures["patch_curves"].data
    assert sorted({t.name for t in traces}) == ["attn", "block", "mlp"] and len(traces) == 6
    np.testing.assert_allclose(traces[0].y, [expected_patch("block", STEPS[-1], layer)
                                            for layer in range(1, N_LAYERS + 1)])
    assert any("KL(checkpoint || start) = 3 nats" in c.value for c in at.caption)
    exported = _csv(downloads, "early-exit.csv")
    assert set(exported["metric"]) == {"exit_accuracy", "exit_agree", "exit_length"}



def test_lens_grid_writes_tokens_only_where_cells_can_hold_them():
    """Up to LENS_TEXT_MAX_POSITIONS positions each cell shows its top-1 token; a wider grid
    (a long completion: cells under ~25 px) is drawn without text, its tokens still on hover."""
    from app.figures import LENS_TEXT_MAX_POSITIONS, lens_grid

    def grid(n: int):
        topk = pd.DataFrame([(layer, p, 0, f"t{p}", 0.5) for layer in (1, 2) for p in range(n)],
                            columns=["layer", "position", "k", "token", "prob"])
        cells = pd.DataFrame([(layer, p, f"i{p}", f"o{p}", "lens_kl", 0.1) for layer in (1, 2) for p in range(n)],
                             columns=["layer", "position", "token", "target", "metric", "value"])
        return lens_grid(topk, cells, "lens_kl").data[0]

    narrow, wide = grid(LENS_TEXT_MAX_POSITIONS), grid(LENS_TEXT_MAX_POSITIONS + 1)
    assert list(narrow.text[1][:3]) == ["t0", "t1", "t2"] and narrow.texttemplate == "%{text}"
    assert wide.text is None and wide.texttemplate is None
    assert "t7" in wide.customdata[0][7]  # the top-k on hover
