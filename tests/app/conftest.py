"""A runs root for the dashboard tests, written through the run store.

``make_runs_root(tmp_path)`` is the one place that builds it (the lead may swap it
for a tiny real training run plus probe): runs ``grpo`` and ``oisd`` with metrics,
probes, checkpoints, analysis tables and per-prompt detail; ``partial`` (still
training, a torn metrics line, a corrupt probes.parquet); ``broken`` (an unreadable
run.json). Values follow :func:`expected_value`, so tests can check the numbers.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st

from trainer.methods import METHODS

from workbench.measures.probing import LENS_STAT_NAMES, ProbeResult
from workbench.storage.atomic import atomic_write_parquet
from workbench.storage.checkpoints import write_checkpoint
from workbench.storage.runwriter import RunWriter
from workbench.storage.schema import DRIFT_COLUMNS, LENS_COLUMNS, METRIC_COLUMNS, PATCH_COLUMNS

N_LAYERS = 4
N_HEADS = 2
STEPS = (10, 20, 30)
PROMPTS = (0, 1)
RUN_SCALE = {"grpo": 1.0, "oisd": 0.5}  # OISD pulls the layers closer to the final one
TOKENS = list("12+34=46")  # the probe sequence of every prompt (prompt "12+34=", answer "46")
SCORED = (5, 6)  # positions that predict response tokens (queries of attention detail)
APP_SCRIPT = Path(__file__).resolve().parents[2] / "app" / "main.py"


def expected_value(run: str, metric: str, step: int, layer: int) -> float:
    """The value written for a per-layer lens metric (all heads, reference split).

    Distance to the final layer shrinks with depth and training: ``(L - l + 1) *
    scale(run) * 10 / step`` plus a per-metric offset, so every cell is distinct.
    """
    offset = LENS_STAT_NAMES.index(metric) if metric in LENS_STAT_NAMES else 0
    return (N_LAYERS - layer + 1) * RUN_SCALE[run] * 10.0 / step + offset


def _probe_result(run: str, step: int) -> ProbeResult:
    layers = np.arange(1, N_LAYERS + 1)
    lens = {m: np.array([expected_value(run, m, step, int(l)) for l in layers]) for m in LENS_STAT_NAMES}
    depth = 1.0 + RUN_SCALE[run] * 30.0 / step
    # Symmetric layer x layer JSD that grows with the distance between layers.
    attn_js = np.abs(layers[:, None] - layers[None, :]) * 0.05 * RUN_SCALE[run]
    per_head = np.array([[attn_js[l - 1, -1] + 0.01 * h for h in range(N_HEADS)] for l in layers])
    return ProbeResult(
        n_layers=N_LAYERS, n_positions=len(SCORED) * len(PROMPTS), lens=lens, prediction_depth=depth,
        n_heads=N_HEADS, attn_js=attn_js, attn_js_final_per_head=per_head,
        attn_entropy=np.full((N_LAYERS, N_HEADS), 0.5), bos_mass=np.full((N_LAYERS, N_HEADS), 0.2),
        attn_head_match=attn_js[:, -1] * 0.8, attn_head_identity=attn_js[:, -1],
        head_perm=np.tile(np.arange(N_HEADS), (N_LAYERS, 1)),
    )


def expected_exit(run: str, step: int, layer: int) -> float:
    """``exit_accuracy`` at a layer: deeper and later is better; OISD's early layers gain faster."""
    return min(1.0, 0.2 * layer + step / 100.0 * (2.0 if run == "oisd" else 1.0))


def expected_patch(component: str, step: int, layer: int) -> float:
    """``patch_recovered``: the block curve rises with depth; attention and MLP share it."""
    share = layer / N_LAYERS
    return {"block": share, "attn": 0.3 * share, "mlp": 0.7 * share}[component] * (1.0 if step > 10 else 0.5)


def _causal_tables(name: str, run: str, step: int) -> dict[str, pd.DataFrame]:
    """The early-exit rows (analyzer, split greedy), the learned-lens table (top1_agree 0.05
    above the logit lens's value at every layer below L) and the patching table."""
    exits = [(name, step, layer, -1, -1, metric, value, "greedy", "analyzer")
             for layer in range(1, N_LAYERS + 1)
             for metric, value in (("exit_accuracy", expected_exit(run, step, layer)),
                                   ("exit_agree", 1.0 if layer == N_LAYERS else 0.5), ("exit_length", 8.0))]
    lens = [(name, step, layer, -1, -1, "top1_agree",
             expected_value(run, "top1_agree", step, layer) + (0.05 if layer < N_LAYERS else 0.0),
             "reference", "analyzer", "affine") for layer in range(1, N_LAYERS + 1)]
    patch = [(name, step, layer, component, "patch_recovered", expected_patch(component, step, layer), "reference")
             for layer in range(1, N_LAYERS + 1) for component in ("block", "attn", "mlp")]
    patch.append((name, step, 0, "none", "patch_kl_base", 0.1 * step, "reference"))
    return {"exit": pd.DataFrame(exits, columns=METRIC_COLUMNS), "lens": pd.DataFrame(lens, columns=LENS_COLUMNS),
            "patch": pd.DataFrame(patch, columns=PATCH_COLUMNS)}


def _detail_tables(run: str, step: int) -> dict[str, pd.DataFrame]:
    """topk / cells / attn rows of both prompts at one step (``*_COLUMNS`` of schema.py)."""
    topk, cells, attn = [], [], []
    for prompt in PROMPTS:
        for layer in range(1, N_LAYERS + 1):
            for pos in SCORED:
                target = TOKENS[pos + 1] if pos + 1 < len(TOKENS) else "<eos>"
                first = target if layer >= 3 else TOKENS[pos]  # later layers predict the target
                p1 = 0.4 + 0.1 * layer
                for k, (token, prob) in enumerate([(first, p1), ("7", (1 - p1) * 0.6), ("8", (1 - p1) * 0.3)]):
                    topk.append((run, step, prompt, layer, pos, k, ord(token[0]), token, prob))
                for metric in LENS_STAT_NAMES:
                    cells.append((run, step, prompt, layer, pos, TOKENS[pos], target, metric,
                                  expected_value(run, metric, step, layer) + 0.1 * pos))
        for pos in SCORED:
            cells.append((run, step, prompt, 0, pos, TOKENS[pos], TOKENS[(pos + 1) % len(TOKENS)],
                          "prediction_depth", 3.0))
        for layer in range(1, N_LAYERS + 1):
            for query in SCORED:
                keys = np.arange(query + 1)
                for head in range(N_HEADS):
                    # Head 0 attends to the first token, head 1 to the query itself,
                    # sharper in later layers and later checkpoints.
                    logits = -np.abs(keys - (0 if head == 0 else query)) * layer * step / 10.0
                    weights = np.exp(logits) / np.exp(logits).sum()
                    attn += [(run, step, prompt, layer, head, query, int(k), float(w)) for k, w in zip(keys, weights)]
    topk = pd.DataFrame(topk, columns=["run", "step", "prompt", "layer", "position", "k", "token_id", "token", "prob"])
    cells = pd.DataFrame(cells, columns=["run", "step", "prompt", "layer", "position", "token", "target", "metric",
                                         "value"])
    attn = pd.DataFrame(attn, columns=["run", "step", "prompt", "layer", "head", "query", "key", "weight"])
    mean = attn.groupby(["run", "step", "prompt", "layer", "query", "key"], as_index=False)["weight"].mean()
    attn = pd.concat([mean.assign(head=-1), attn], ignore_index=True)[attn.columns]
    return {"topk": topk, "cells": cells, "attn": attn}


def expected_drift(method: str, step: int, block: int) -> float:
    """The drift table's ``rel_change`` of a block (0 = embeddings): OISD moves block 1 most."""
    if method == "oisd" and block == 1:
        return 0.01 * step
    return 0.001 * step * block


def _drift_table(name: str, method: str, step: int) -> pd.DataFrame:
    rows = [(name, step, "embeddings", 0, "all", expected_drift(method, step, 0), 0.1, 1000)]
    for block in range(1, N_LAYERS + 1):
        for kind in ("attention", "mlp", "all"):
            rows.append((name, step, "block", block, kind, expected_drift(method, step, block), 0.2, 500))
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)


def _write_run(root: Path, name: str, method: str) -> None:
    config = {"method": method, "seed": 0, "steps": STEPS[-1], "checkpoint_every": 10, "probe_every": 10,
              "model": {"path": "runs/warmstart-tiny"}, "run_dir": str(root / name)}
    writer = RunWriter(root / name, config, resume=False)
    writer.record(baseline=method in METHODS and METHODS[method].baseline)  # as the trainer records it
    writer.write_probe_set([{"prompt": "12+34=", "reference": "46", "prompt_ids": [1, 2, 3, 4, 5, 6],
                             "reference_ids": [7, 8]},
                            {"prompt": "5+17=", "reference": "22", "prompt_ids": [9, 3, 1, 10, 6],
                             "reference_ids": [11, 11]}])
    for step in range(1, STEPS[-1] + 1):
        values = {"reward": 0.2 + 0.02 * step * RUN_SCALE[method], "accuracy": 0.01 * step,
                  "entropy": 1.0 / step, "kl": 0.001 * step, "loss/policy": -0.1, "sched/beta": 0.04}
        if method == "oisd":
            values.update({"loss/think": 0.5 / step, "loss/attn": 0.2 / step, "sched/lambda": min(1.0, step / 20)})
        if step % 10 == 0:
            values["eval/accuracy"] = 0.02 * step
        writer.log_metrics(step, values)
    for step in STEPS:
        writer.log_probes(_probe_result(method, step).to_frame(name, step, "reference", "probe"))
        write_checkpoint(root / name, step, lambda d: (d / "config.json").write_text("{}"), keep_last=None)
        provenance = {"transformer_lens": "4.3", "probe_set_hash": writer.info["probe_set_hash"]}
        analysis = _probe_result(method, step).to_frame(name, step, "reference", "analyzer")
        causal = _causal_tables(name, method, step)
        analysis = pd.concat([analysis, causal["exit"]], ignore_index=True)
        atomic_write_parquet(root / name / "analysis" / f"step-{step:06d}-metrics.parquet", analysis,
                             metadata=provenance)
        for kind in ("lens", "patch"):
            atomic_write_parquet(root / name / "analysis" / f"step-{step:06d}-{kind}.parquet", causal[kind],
                                 metadata=provenance)
        for kind, table in _detail_tables(method, step).items():
            table["run"] = name
            atomic_write_parquet(root / name / "analysis" / f"step-{step:06d}-{kind}.parquet", table,
                                 metadata=provenance)
        atomic_write_parquet(root / name / "analysis" / f"step-{step:06d}-drift.parquet",
                             _drift_table(name, method, step), metadata={"kind": "drift"})
    writer.set_status("finished")


def make_runs_root(tmp_path: Path) -> Path:
    """Write the test runs root under ``tmp_path`` and return it."""
    root = Path(tmp_path) / "runs"
    root.mkdir(parents=True)
    for method in ("grpo", "oisd"):
        _write_run(root, method, method)

    partial = RunWriter(root / "partial", {"method": "sdpg", "seed": 1}, resume=False)
    partial.log_metrics(1, {"reward": 0.1, "accuracy": 0.0})
    with open(partial.metrics_path, "a", encoding="utf-8") as f:
        f.write('{"step": 2, "rew')  # killed mid-line
    partial.probes_path.write_bytes(b"PAR1 this is not a parquet file")

    (root / "broken").mkdir()
    (root / "broken" / "run.json").write_text("{not json")
    (root / "not-a-run").mkdir()  # no run.json: not listed
    return root


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return make_runs_root(tmp_path_factory.mktemp("dashboard"))


@pytest.fixture(autouse=True)
def _fresh_streamlit_caches():
    st.cache_data.clear()
    yield
    st.cache_data.clear()


@pytest.fixture
def make_app(monkeypatch):
    """``make_app(root, **query)`` -> an AppTest of app/main.py over ``root``, not yet run."""
    from streamlit.testing.v1 import AppTest

    def factory(root: Path, **query) -> AppTest:
        monkeypatch.setenv("OISD_RUNS_ROOT", str(root))
        at = AppTest.from_file(str(APP_SCRIPT), default_timeout=60)
        for key, value in query.items():
            at.query_params[key] = value
        return at

    return factory


@pytest.fixture
def downloads(monkeypatch):
    """Bytes handed to ``st.download_button``, captured as (file_name, data) in order; a
    deferred download (``data`` a callable, written on click) is written here as a click would."""
    import streamlit.testing.v1.app_test as app_test_module
    from streamlit.runtime.media_file_manager import MediaFileManager
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    captured: list[tuple[str | None, bytes]] = []
    add_deferred = MediaFileManager.add_deferred

    def recording_add_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        captured.append((file_name, data_callable()))
        return add_deferred(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", recording_add_deferred)

    class Recording(MemoryMediaFileStorage):
        def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
            if isinstance(path_or_data, bytes):
                captured.append((filename, path_or_data))
            return super().load_and_get_id(path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(app_test_module, "MemoryMediaFileStorage", Recording)
    return captured


def _decode_typed_arrays(node):
    """Plotly >= 6 writes numpy arrays as ``{"dtype", "bdata"[, "shape"]}``: decode them."""
    if isinstance(node, dict):
        if "bdata" in node and "dtype" in node:
            array = np.frombuffer(base64.b64decode(node["bdata"]), dtype=np.dtype(node["dtype"]))
            shape = node.get("shape")
            if shape:
                array = array.reshape([int(n) for n in str(shape).split(",")])
            return array
        return {k: _decode_typed_arrays(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_decode_typed_arrays(v) for v in node]
    return node


def plotly_figures(at) -> dict:
    """The Plotly figures an AppTest run drew, by element key, as ``go.Figure`` objects."""
    import plotly.graph_objects as go

    return {element.key: go.Figure(_decode_typed_arrays(json.loads(element.proto.spec)))
            for element in at.get("plotly_chart")}


@dataclass
class HtmlGrid:
    """A lens table (``app.figures.lens_table``) read back: its title, the cells' values
    (``data-z``), labels and tooltips (layers x positions, layer 1 first), the layer labels (1
    first), the positions' labels and the colour bar's texts (low end, high end, title)."""

    title: str
    z: np.ndarray
    text: list[list[str]]
    tips: list[list[str]]
    layers: list[str]
    ticks: list[str]
    bar: list[str]


def html_grids(at) -> dict[str, HtmlGrid]:
    """The lens tables an AppTest run wrote (``st.html``), by their ``data-grid`` name."""
    from html.parser import HTMLParser

    class Reader(HTMLParser):
        def __init__(self):
            super().__init__()
            self.grids, self.grid, self.where, self.row = {}, None, None, None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "div" and attrs.get("class") == "lens-table":
                self.grid = HtmlGrid("", None, [], [], [], [], [])
                self.grids[attrs["data-grid"]] = self.grid
            elif tag == "div" and attrs.get("class") == "title":
                self.where = "title"
            elif tag == "div" and attrs.get("class") == "bar":
                self.where = "bar"
            elif tag == "span" and self.where == "bar" and attrs.get("class") != "scale":
                self.grid.bar.append("")
                self.where = "bar-text"
            elif tag == "tr":
                self.row = {"z": [], "text": [], "tips": [], "head": []}
            elif tag == "td":
                self.row["z"].append(float(attrs["data-z"]))
                self.row["tips"].append(attrs.get("title", ""))
                self.row["text"].append("")
                self.where = "td"
            elif tag == "th":
                self.row["head"].append("")
                self.where = "th"

        def handle_data(self, text):
            if self.where == "title":
                self.grid.title += text
            elif self.where == "bar-text":
                self.grid.bar[-1] += text
            elif self.where == "td":
                self.row["text"][-1] += text
            elif self.where == "th":
                self.row["head"][-1] += text

        def handle_endtag(self, tag):
            if tag in ("td", "th", "div"):
                self.where = None
            elif tag == "span" and self.where == "bar-text":
                self.where = "bar"
            elif tag == "tr" and self.row is not None:
                if self.row["z"]:  # a layer's row: its label, then its cells
                    self.grid.layers.insert(0, self.row["head"][0])
                    self.grid.z = (np.array([self.row["z"]]) if self.grid.z is None
                                   else np.vstack([np.array([self.row["z"]]), self.grid.z]))
                    self.grid.text.insert(0, self.row["text"])
                    self.grid.tips.insert(0, self.row["tips"])
                elif self.grid.layers:  # the positions' labels, under the cells
                    self.grid.ticks = self.row["head"][1:]
                self.row = None

    reader = Reader()
    for element in at.get("html"):
        reader.feed(element.proto.body)
    return reader.grids


def stack_block(figure, run: str, rows, row_title: str = "layer") -> np.ndarray:
    """The values of ``run``'s ``rows`` (in that order) in a heat map that stacks runs
    (``app.figures.layer_checkpoint_heatmaps``, ``drift_heatmaps``)."""
    from app.figures import stack_row

    trace = figure.data[0]
    labels = list(trace.y)
    return np.array(trace.z, dtype=float)[[labels.index(stack_row(run, r, row_title)) for r in rows]]


def stacked_runs(figure) -> list[str]:
    """The runs of a stacked heat map, top to bottom (the bold tick at each run's middle row)."""
    texts = [t for t in figure.layout.yaxis.ticktext if t.startswith("<b>")]
    return [t.removeprefix("<b>").split("</b>")[0] for t in reversed(texts)]


def isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
