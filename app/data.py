"""Cached, read-only access to run folders for the dashboard.

Every reader goes through :mod:`workbench.storage.runstore` and is cached with
``st.cache_data`` under a key that includes the file's (or folder's) modification
time and size, so a page load re-reads only what changed: a live run's new metrics
line or a new analysis file invalidates exactly that entry. Readers return plain
DataFrames or lists; problems (a corrupt table, an unreadable run.json) come back as
one-line messages so the view can show them in the table's place.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from workbench.errors import WorkbenchError
from workbench.storage.paths import RunPaths, safe_join
from workbench.storage.runstore import BrokenRun, Run, list_runs
from workbench.storage.runstore import run_summary
from workbench.storage.schema import ATTN_COLUMNS, CELL_COLUMNS, METRIC_COLUMNS, TOPK_COLUMNS

DETAIL_COLUMNS = {"topk": TOPK_COLUMNS, "cells": CELL_COLUMNS, "attn": ATTN_COLUMNS}
SOURCES = {"probe": "built-in probes (probes/)", "analyzer": "analyzer (analysis/)"}


def signature(path: str | os.PathLike) -> tuple[int, int]:
    """``(mtime_ns, size)`` of a file or folder, ``(0, -1)`` when it does not exist.

    A folder's mtime changes when an entry is added, removed or renamed into it,
    which is how every atomic write in the run store lands, so it also keys a
    folder of per-checkpoint tables.

    The cached readers below take it as their ``file_key`` argument (a name without
    a leading underscore: ``st.cache_data`` does not hash underscored arguments).
    """
    try:
        stat = os.stat(path)
    except OSError:
        return (0, -1)
    return (stat.st_mtime_ns, stat.st_size)


def _collect(call, *args, **kwargs):
    """``(call(...), [warning messages])``: the run store warns instead of raising."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)
    return result, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------
# Runs under the root
# ---------------------------------------------------------------------------


@dataclass
class RunListing:
    """What the runs root holds.

    Attributes:
        runs: Healthy runs by name (sorted), each opened with its run.json.
        broken: Run name -> one-line reason it cannot be opened.
    """

    runs: dict[str, Run] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)


def _root_signature(root: Path) -> tuple:
    """Modification times of the root and of every candidate run.json."""
    parts = [signature(root), signature(RunPaths(root).run_json)]
    try:
        children = sorted(root.iterdir())
    except OSError:
        children = []
    parts += [(p.name, signature(RunPaths(p).run_json)) for p in children if not p.name.startswith(".")]
    return tuple(parts)


@st.cache_data(show_spinner=False, max_entries=16)
def _scan(root: str, file_key: tuple) -> tuple[list[tuple[str, str, dict]], list[tuple[str, str]]]:
    runs, broken = [], []
    for entry in list_runs(root):
        name = "." if Path(entry.path).resolve() == Path(root).resolve() else entry.name
        try:
            safe_join(root, name)  # a symlink that leads outside the root is not browsed
        except WorkbenchError as exc:
            broken.append((name, str(exc)))
            continue
        if isinstance(entry, BrokenRun):
            broken.append((name, entry.error))
        else:
            runs.append((name, str(entry.path), entry.info))
    return runs, broken


def scan_root(root: str | os.PathLike) -> RunListing:
    """Healthy and broken runs under ``root`` (cached until a run.json changes).

    Raises:
        WorkbenchError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise WorkbenchError(f"runs root {root} is not a folder")
    runs, broken = _scan(str(root), _root_signature(root))
    return RunListing(
        runs={name: Run(Path(path), info) for name, path, info in runs},
        broken=dict(broken),
    )


def resolve_run(root: str | os.PathLike, name: str) -> Run:
    """Open the run ``name`` inside ``root`` (the one way a URL reaches a folder).

    Raises:
        WorkbenchError: The name leaves the root (``..``, absolute, a link), names no
            folder, or the folder is not a readable run.
    """
    path = safe_join(root, name)
    if not path.is_dir():
        raise WorkbenchError(f"no run named {name!r} under {root}")
    return Run.open(path)


# ---------------------------------------------------------------------------
# Per-run tables
# ---------------------------------------------------------------------------


@st.cache_data(show_spinner=False, max_entries=64)
def _metrics(path: str, file_key: tuple) -> tuple[pd.DataFrame, list[str]]:
    return _collect(lambda: Run(Path(path), {}).metrics())


def metrics(run: Run) -> tuple[pd.DataFrame, list[str]]:
    """Training metrics (one row per step) and any warnings (e.g. an unreadable line)."""
    return _metrics(str(run.path), signature(run.paths.metrics))


@st.cache_data(show_spinner=False, max_entries=64)
def _analysis(path: str, kind: str, file_key: tuple) -> tuple[pd.DataFrame, list[str]]:
    return _collect(lambda: Run(Path(path), {}).analysis(kind))


def drift_table(run: Run) -> pd.DataFrame:
    """Weight drift from the start, every analysed checkpoint (``DRIFT_COLUMNS``; empty when
    the run has none)."""
    return analysis_table(run, "drift")


def analysis_table(run: Run, kind: str) -> pd.DataFrame:
    """Every analysed checkpoint's table of one kind (``drift``, ``lens``, ``patch``: small
    tables, read whole), with its schema columns; empty when the run has none."""
    return _analysis(str(run.path), kind, signature(run.paths.analysis))[0]


def _source_key(run: Run, source: str) -> tuple:
    """What changes when a metric source gains or loses a file (its folders' signatures)."""
    if source == "probe":
        return (signature(run.paths.probes), signature(run.paths.probe_parts))
    if source == "analyzer":
        return (signature(run.paths.analysis),)
    raise WorkbenchError(f"unknown metric source {source!r}; expected one of {sorted(SOURCES)}")


@st.cache_data(show_spinner=False, max_entries=256)
def _metric_rows(path: str, source: str, where: tuple, file_key: tuple) -> tuple[pd.DataFrame, list[str]]:
    return _collect(lambda: Run(Path(path), {}).metric_rows(source, **dict(where)))


def metric_rows(run: Run, source: str, **where) -> tuple[pd.DataFrame, list[str]]:
    """The rows of one metric source a view draws (:meth:`workbench.storage.runstore.Run.metric_rows`:
    the filter goes into the parquet scan), cached until the source gains a file.

    Args:
        run: The run.
        source: ``"probe"`` (``probes/``, the trainer's built-in probes) or
            ``"analyzer"`` (``analysis/``: the metrics of every analysed checkpoint).
        where: column -> values to keep, e.g. ``metric=["lens_kl"], head=[-1]``.

    Returns:
        ``(rows, warnings)``; no match gives an empty table with the contract columns.
    """
    key = tuple(sorted((k, None if v is None else tuple(v)) for k, v in where.items()))
    return _metric_rows(str(run.path), source, key, _source_key(run, source))


@st.cache_data(show_spinner=False, max_entries=64)
def _metric_catalog(path: str, source: str, file_key: tuple) -> tuple[pd.DataFrame, list[str]]:
    return _collect(lambda: Run(Path(path), {}).metric_catalog(source))


def metric_catalog(run: Run, source: str) -> tuple[pd.DataFrame, list[str]]:
    """The distinct ``(metric, split)`` pairs of one metric source (no values read)."""
    return _metric_catalog(str(run.path), source, _source_key(run, source))


@st.cache_data(show_spinner=False, max_entries=64)
def _metric_steps(path: str, source: str, file_key: tuple) -> tuple[list[int], list[str]]:
    return _collect(lambda: Run(Path(path), {}).metric_steps(source))


def metric_steps(run: Run, source: str) -> list[int]:
    """Steps with metric rows of one source (from the file names)."""
    return _metric_steps(str(run.path), source, _source_key(run, source))[0]


@st.cache_data(show_spinner=False, max_entries=64)
def _available_sources(path: str, file_key: tuple) -> list[str]:
    run, found = Run(Path(path), {}), []
    if run.has_probes():
        found.append("probe")
    if run.metric_files("analyzer"):  # a folder listing, no footer read
        found.append("analyzer")
    return found


def available_sources(run: Run) -> list[str]:
    """The metric sources a run has files for (without reading the tables; the folders are
    listed again only when one of them gained or lost a file)."""
    return _available_sources(str(run.path), (*_source_key(run, "probe"), *_source_key(run, "analyzer")))


@st.cache_data(show_spinner=False, max_entries=64)
def _analysed_steps(path: str, kind: str, file_key: tuple) -> tuple[list[int], list[str]]:
    steps, messages = _collect(lambda: Run(Path(path), {}).analyzed_steps(kind))
    return sorted(steps), messages


def analysed_steps(run: Run, kind: str) -> list[int]:
    """Checkpoint steps with an analysis table of ``kind`` (reads parquet footers only)."""
    return _analysed_steps(str(run.path), kind, signature(run.paths.analysis))[0]


@st.cache_data(show_spinner=False, max_entries=128)
def _detail(path: str, step: int, kind: str, prompt: int | None, layers: tuple[int, ...] | None,
            file_key: tuple) -> tuple[pd.DataFrame, list[str]]:
    file = Run(Path(path), {}).analysis_path(step, kind)
    if not file.is_file():
        return pd.DataFrame(columns=DETAIL_COLUMNS[kind]), []
    try:
        # Only the rows asked for: a per-checkpoint attention table holds every (layer, head,
        # query, key) of several prompts, sorted so that the filter skips whole row groups.
        filters = [] if prompt is None else [("prompt", "==", prompt)]
        if layers is not None:
            filters.append(("layer", "in", list(layers)))
        return pd.read_parquet(file, filters=filters or None), []
    except Exception as exc:  # a corrupt file shows a message, not a traceback
        return pd.DataFrame(columns=DETAIL_COLUMNS[kind]), [f"{file} is unreadable: {exc}"]


def detail(run: Run, step: int, kind: str, prompt: int | None = None,
           layers: list[int] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One checkpoint's drill-down table of ``kind`` ("topk", "cells" or "attn").

    Reads only ``analysis/step-NNNNNN-{kind}.parquet`` of that step, and only the rows of
    ``prompt`` and of ``layers`` when they are given.
    """
    if kind not in DETAIL_COLUMNS:
        raise WorkbenchError(f"unknown detail kind {kind!r}; expected one of {sorted(DETAIL_COLUMNS)}")
    file = run.analysis_path(int(step), kind)
    chosen = None if layers is None else tuple(sorted({int(x) for x in layers}))
    return _detail(str(run.path), int(step), kind, prompt, chosen, signature(file))


@dataclass(frozen=True)
class AttentionShape:
    """What one checkpoint's attention table holds: its layers and heads, and how many keys
    each query kept (``top_k`` None: all) with the weight they hold on average."""

    layers: list[int]
    heads: list[int]
    top_k: int | None
    mass_kept: float


@st.cache_data(show_spinner=False, max_entries=128)
def _attention_shape(path: str, step: int, prompt: int, file_key: tuple) -> AttentionShape | None:
    from workbench.storage.atomic import read_provenance

    file = Run(Path(path), {}).analysis_path(step, "attn")
    if not file.is_file():
        return None
    try:
        info = read_provenance(file)
        if info.get("n_layers") and info.get("n_heads"):  # the footer says it: no rows read
            layers, heads = list(range(1, int(info["n_layers"]) + 1)), list(range(int(info["n_heads"])))
        else:
            frame = pd.read_parquet(file, columns=["layer", "head"], filters=[("prompt", "==", prompt)])
            layers = sorted(int(x) for x in frame["layer"].unique())
            heads = sorted(int(h) for h in frame["head"].unique() if h >= 0)
    except Exception:  # an unreadable file: detail() reports it
        return None
    if not layers:
        return None
    return AttentionShape(layers, heads, info.get("attn_top_k"), float(info.get("attn_mass_kept", 1.0)))


def attention_shape(run: Run, step: int, prompt: int) -> AttentionShape | None:
    """Layers, heads and top-k of a checkpoint's attention table (None when it has none);
    from the file's footer, so the table's rows are not read."""
    file = run.analysis_path(int(step), "attn")
    return _attention_shape(str(run.path), int(step), int(prompt), signature(file))


@st.cache_data(show_spinner=False, max_entries=64)
def _prompts(path: str, step: int, file_key: tuple) -> list[int]:
    file = Run(Path(path), {}).analysis_path(step, "topk")
    try:
        column = pd.read_parquet(file, columns=["prompt"])["prompt"]
    except Exception:
        return []
    return sorted(int(p) for p in column.unique())


def detail_prompts(run: Run, step: int) -> list[int]:
    """Probe prompts kept in the drill-down detail of one checkpoint."""
    file = run.analysis_path(int(step), "topk")
    return _prompts(str(run.path), int(step), signature(file))


@st.cache_data(show_spinner=False, max_entries=64)
def _probe_set(path: str, file_key: tuple) -> tuple[list[dict], list[str]]:
    return _collect(lambda: Run(Path(path), {}).probe_set())


def probe_set(run: Run) -> list[dict]:
    """The run's probe prompts and reference completions (``[]`` when absent)."""
    return _probe_set(str(run.path), signature(run.paths.probe_set))[0]


@st.cache_data(show_spinner=False, max_entries=64)
def _checkpoint_steps(path: str, file_key: tuple) -> tuple[list[int], list[str]]:
    return _collect(lambda: Run(Path(path), {}).checkpoint_steps())


def checkpoint_steps(run: Run) -> tuple[list[int], list[str]]:
    """Steps of complete checkpoints (presence and sizes checked, not hashes), or the
    checkpoints an analysis folder's run.json lists."""
    if run.is_analysis_folder:
        return run.checkpoint_steps(), []
    return _checkpoint_steps(str(run.path), signature(run.paths.checkpoints))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def metrics_key(run: Run) -> tuple:
    """What a figure drawn from the run's training metrics depends on."""
    return (str(run.path), signature(run.paths.metrics))


def source_key(run: Run, source: str) -> tuple:
    """What a figure drawn from one metric source of the run depends on."""
    return (str(run.path), source, *_source_key(run, source))


def analysis_key(run: Run) -> tuple:
    """What a figure drawn from the run's per-checkpoint analysis tables depends on."""
    return (str(run.path), signature(run.paths.analysis))


def detail_key(run: Run, step: int, kind: str) -> tuple:
    """What a figure drawn from one checkpoint's detail table of ``kind`` depends on."""
    return (str(run.path), int(step), kind, signature(run.analysis_path(int(step), kind)))


@st.cache_resource(show_spinner=False, max_entries=64)
def _figure(what: str, key: tuple, _build: Callable[[], Any]) -> Any:
    return _build()


def cached_figure(what: str, key: tuple, build: Callable[[], Any]) -> Any:
    """The figure ``build()`` returns, built once per ``(what, key)`` and shared by every session.

    ``key`` holds the figure's parameters and the keys of the files its rows come from
    (:func:`metrics_key`, :func:`source_key`, :func:`analysis_key`, :func:`detail_key`), so a
    file that changes (a live run's new step, a new checkpoint's analysis) builds it again.
    Building a figure costs 0.05-0.15 s (plotly validates every property); a view that draws one
    it drew before costs only its serialization. The figure is never modified:
    ``st.plotly_chart`` serializes a copy.
    """
    return _figure(what, key, build)


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def runs_table_row(name: str, run: Run) -> dict:
    """The runs table's row of one run: :func:`workbench.storage.runstore.run_summary` (the one
    summary of a run) over the cached tables, under the table's column names."""
    table, _ = metrics(run)
    steps, _ = checkpoint_steps(run)
    row = run_summary(run, history=table, checkpoint_steps=steps)
    return {
        "run": name,
        "method": row["method"],
        "status": row["status"] + (" (live)" if row["live"] else ""),
        "steps": row["steps"],
        "accuracy": row["last_accuracy"],
        "eval/accuracy": row["last_eval_accuracy"],
        "checkpoints": row["checkpoints"],
        "seed": row["seed"],
        "started": row["start_time"],
        "torch": row["torch"],
        "transformers": row["transformers"],
        "transformer_lens": row["transformer_lens"],
    }


def clear_caches() -> None:
    """Drop every cached table and figure (tests call this between runs of the app)."""
    st.cache_data.clear()
    _figure.clear()


__all__ = [
    "METRIC_COLUMNS", "RunListing", "SOURCES", "analysed_steps", "analysis_key", "analysis_table",
    "available_sources", "cached_figure", "checkpoint_steps", "clear_caches", "detail", "detail_key",
    "detail_prompts", "metric_catalog", "metric_rows", "metric_steps", "metrics", "metrics_key",
    "probe_set", "resolve_run", "runs_table_row", "scan_root", "signature", "source_key",
]
