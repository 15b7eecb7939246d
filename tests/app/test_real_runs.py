"""Every view on run folders that a tiny *real* training run and `oisd probe` made.

The synthetic root of conftest.py pins exact values; this one proves the dashboard
reads what the trainer and the analyzer actually write.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.app.conftest import html_grids, plotly_figures, stack_block

L = 4  # blocks of the tiny preset


@pytest.fixture(scope="session")
def real_root(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.presets import preset_config
    from trainer.run import train
    from trainer.tokenizer import build_char_tokenizer
    from workbench.analysis.analyzer import probe_run

    root = tmp_path_factory.mktemp("real-runs")
    tok = build_char_tokenizer()
    model = AutoModelForCausalLM.from_config(preset_config("tiny", tok))
    model.save_pretrained(root / "start")
    tok.save_pretrained(root / "start")
    runs = root / "runs"
    for method in ("grpo", "oisd"):
        cfg = load_config(method, [f"model.path={root / 'start'}", "steps=2", "checkpoint_every=1",
                                   "probe_every=1", "eval_every=2", "eval.n=4", "eval.k=1", "probe.n_prompts=2",
                                   "rollout.prompts_per_step=2", "rollout.group_size=2",
                                   "rollout.max_new_tokens=12", "logging.progress=false",
                                   f"run_dir={runs / method}"])
        train(cfg)
        probe_run(runs / method, detail_prompts=1, progress=False, max_new_tokens=12)
    return runs


def _run(at):
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_runs_and_training_views(real_root, make_app):
    at = _run(make_app(real_root))
    table = at.dataframe[0].value.set_index("run")
    assert sorted(table.index) == ["grpo", "oisd"]
    assert set(table["status"]) == {"finished"} and set(table["steps"]) == {2}
    at = _run(make_app(real_root, view="Training", runs=["grpo", "oisd"]))
    fig = plotly_figures(at)["training_curves"]
    assert {t.name for t in fig.data} >= {"grpo", "oisd"}


@pytest.mark.parametrize("source", ["probe", "analyzer"])
def test_alignment_heatmap_is_layers_by_checkpoints(real_root, make_app, source):
    at = _run(make_app(real_root, view="Layer alignment", runs=["grpo", "oisd"], metric="top1_agree",
                       source=source))
    figures = plotly_figures(at)
    assert "alignment_heatmaps" in figures, list(figures)
    z = stack_block(figures["alignment_heatmaps"], "oisd", range(1, L + 1))
    # probes: steps 0, 1, 2; analyzer: checkpoints 1, 2 — one row per layer 1..L
    assert z.shape[0] == L and z.shape[1] in (2, 3)
    assert np.nanmax(z) <= 1.0 and np.nanmin(z) >= 0.0
    assert np.allclose(z[-1][~np.isnan(z[-1])], 1.0)  # the final layer agrees with itself


def test_attention_and_drilldown_views(real_root, make_app):
    at = _run(make_app(real_root, view="Attention", runs=["oisd"], step="2"))
    assert plotly_figures(at)
    at = _run(make_app(real_root, view="Drill-down", runs=["oisd"], step="2", prompt="0", layer="2"))
    grid = html_grids(at)["drilldown_grid"].z
    assert grid.shape[0] == L and grid.shape[1] > 1
    at.radio(key="drilldown_show").set_value("Attention maps")
    maps = plotly_figures(_run(at))["drilldown_attention"]
    assert len(maps.data) >= 2 and "Final layer" in maps.layout.annotations[1].text
