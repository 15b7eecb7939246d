"""The dashboard over analysis folders of checkpoints this project did not train."""

from __future__ import annotations

import pytest

from tests.workbench.test_external import PROMPTS, _save
from trainer.tokenizer import build_char_tokenizer
from workbench.analysis.analyzer import probe_run
from workbench.analysis.external import prepare_analysis_folder, resolve_source


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_dashboard_shows_analysis_folders_of_two_models_side_by_side(tmp_path, tokenizer, make_app):
    """Two plain model folders probed into analysis folders: the dashboard's alignment view
    overlays them and the drill-down draws A, B and A minus B (same tokenizer, same prompt)."""
    import numpy as np

    from tests.app.conftest import html_grids, plotly_figures

    out = tmp_path / "analysis"
    for name, seed in (("base", 1), ("tuned", 2)):
        folder = prepare_analysis_folder(resolve_source(_save(tmp_path / name, "qwen3", tokenizer, seed)), out,
                                         PROMPTS, max_new_tokens=6)
        assert probe_run(folder, progress=False).analysed == [0]
    at = make_app(out, view="Layer alignment", runs=["base", "tuned"], source="analyzer", metric="lens_js",
                  alignment_show="Per-layer curves at one checkpoint")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    profiles = plotly_figures(at)["alignment_profiles"]
    assert [t.name for t in profiles.data] == ["base", "tuned"]

    at = make_app(out, view="Drill-down", runs=["base", "tuned"], prompt="0",
                  drilldown_show="Side by side: two checkpoints or models")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    grids = html_grids(at)
    a, b = grids["drilldown_grid_a"].z, grids["drilldown_grid_b"].z
    np.testing.assert_allclose(grids["drilldown_grid_diff"].z, a - b)
    assert not np.allclose(a, b)  # two different models
