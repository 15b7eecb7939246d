"""The notebook API: run folders as pandas DataFrames.

A thin layer over :mod:`workbench.runstore` for Jupyter::

    from workbench.api import runs, metrics, probes, analysis, probe

    runs("runs/")                                   # one row per run
    metrics("runs/oisd-tiny")                       # training curves
    probes("runs/oisd-tiny", metric="lens_js")      # built-in probes (HF)
    probe("runs/oisd-tiny")                         # run the TransformerLens analyzer
    analysis("runs/oisd-tiny", kind="metrics")      # its tables

Every function takes a :class:`~workbench.runstore.Run` or a path. Importing this
module is cheap (no torch, no TransformerLens): :func:`probe` imports the analyzer
when it is called.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pandas as pd

from workbench.runstore import BrokenRun, Run, list_checkpoints, list_runs

if TYPE_CHECKING:
    from workbench.analyzer import ProbeReport

__all__ = ["load_run", "runs", "metrics", "probes", "analysis", "probe"]

RunLike = Run | str | os.PathLike

RUN_COLUMNS = [
    "name", "method", "status", "live", "steps", "last_step", "checkpoints",
    "last_accuracy", "last_reward", "start_time", "path", "error",
]


def load_run(path: str | os.PathLike) -> Run:
    """Open a run folder (raises WorkbenchError, one line, when it is not a run)."""
    return Run.open(path)


def _run(run: RunLike) -> Run:
    return run if isinstance(run, Run) else Run.open(run)


def _last(frame: pd.DataFrame, column: str) -> float | None:
    if column not in frame.columns:
        return None
    values = frame[column].dropna()
    return float(values.iloc[-1]) if len(values) else None


def runs(root: str | os.PathLike) -> pd.DataFrame:
    """One row per run under ``root`` (``root`` itself if it is a run).

    Columns: ``name, method, status, live, steps`` (logged steps), ``last_step``,
    ``checkpoints`` (complete step folders, not hashed), ``last_accuracy``,
    ``last_reward``, ``start_time``, ``path``, ``error`` (the one-line reason for
    a run folder that cannot be opened; None otherwise).
    """
    rows = []
    for run in list_runs(root):
        if isinstance(run, BrokenRun):
            rows.append({"name": run.name, "path": str(run.path), "error": run.error})
            continue
        history = run.metrics()
        rows.append(
            {
                "name": run.name,
                "method": run.method,
                "status": run.status,
                "live": run.is_live,
                "steps": len(history),
                "last_step": int(history["step"].iloc[-1]) if len(history) else None,
                "checkpoints": len(list_checkpoints(run.path, verify=False)),
                "last_accuracy": _last(history, "accuracy"),
                "last_reward": _last(history, "reward"),
                "start_time": run.info.get("start_time"),
                "path": str(run.path),
                "error": None,
            }
        )
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def metrics(run: RunLike) -> pd.DataFrame:
    """Training metrics, one row per step (``metrics.jsonl``; METHODS.md names)."""
    return _run(run).metrics()


def probes(run: RunLike, metric: str | None = None) -> pd.DataFrame:
    """The trainer's built-in probes (``probes.parquet``), optionally one metric only."""
    table = _run(run).probes()
    if metric is not None:
        table = table[table["metric"] == metric].reset_index(drop=True)
    return table


def analysis(run: RunLike, kind: str = "metrics") -> pd.DataFrame:
    """Analyzer tables of one kind (``metrics``, ``topk``, ``cells``, ``attn``), all steps."""
    return _run(run).analysis(kind)


def probe(run: RunLike, **kwargs) -> ProbeReport:
    """Run the TransformerLens analyzer on a run (see :func:`workbench.analyzer.probe_run`).

    Keyword arguments (``device``, ``dtype``, ``force``, ``detail_prompts``,
    ``progress``, ...) are passed through.
    """
    from workbench.analyzer import probe_run

    path = run.path if isinstance(run, Run) else run
    return probe_run(path, **kwargs)
