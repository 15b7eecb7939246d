"""``oisd compare``: one table that puts runs side by side.

For each run: held-out accuracy before training (the step-0 evaluation) and after
(the last evaluation), mean@k after, the policy's entropy at the end of training,
and the logit-lens agreement (``top1_agree``) and attention distance
(``attn_js_final``) of one intermediate layer to the final layer, at step 0 and at
the last probed step::

    from workbench.compare import comparison_table
    comparison_table(["runs/grpo-seed0", "runs/oisd-seed0"])
    comparison_table(run_dirs, aggregate=True)     # mean and std over seeds, per method

The layer is the OISD layer, so that a GRPO baseline is read at the layer the OISD
run was trained to align: an OISD run's own resolved ``oisd.layers`` (the first one
when it has several), the other runs the layer of the first OISD run in the
comparison, or ``L // 2`` when there is none; ``layer=`` overrides it for every run.

Alignment values come from the analyzer's tables (TransformerLens) where a step was
analysed, else from the trainer's built-in probes (``probes.parquet``); the two agree
to 1e-4 by construction. Only the analyzer misses step 0 (no checkpoint is written
before training), so "before" values normally come from the built-in probes.
Every value is the ``reference`` split (teacher-forced probe set), all heads
(``head = -1``), not pairwise (``ref_layer = -1``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.runstore import Run, list_checkpoints

__all__ = ["ALIGNMENT_METRICS", "COLUMNS", "ENTROPY_WINDOW", "comparison_table", "print_comparison"]

ALIGNMENT_METRICS = ("top1_agree", "attn_js_final")
ENTROPY_WINDOW = 5  # "final entropy" = mean over the last this-many logged training steps
OISD_METHODS = ("oisd", "oisd+sdpg")

# Per-run table. Numeric columns after "layer" are the ones aggregated over seeds.
COLUMNS = [
    "run", "method", "seed", "steps", "layer",
    "accuracy_before", "accuracy_after", "mean_at_k_after", "entropy_final",
    "top1_agree_before", "top1_agree_after", "attn_js_final_before", "attn_js_final_after",
    "probe_step", "source",
]
VALUE_COLUMNS = COLUMNS[5:13]

# Column headers of the printed per-method table.
_LABELS = {
    "accuracy_before": "acc before", "accuracy_after": "acc after",
    "mean_at_k_after": "mean@k after", "entropy_final": "entropy (end)",
    "top1_agree_before": "top1_agree before", "top1_agree_after": "top1_agree after",
    "attn_js_final_before": "attn_js_final before", "attn_js_final_after": "attn_js_final after",
}


# ---------------------------------------------------------------------------
# Reading one run
# ---------------------------------------------------------------------------


def _alignment_rows(run: Run) -> pd.DataFrame:
    """Per-layer alignment rows of both sources, one per (step, layer, metric).

    Returns:
        Columns ``step, layer, metric, value, source``; where both the analyzer and
        the built-in probes have a (step, layer, metric), the analyzer's row is kept.
    """
    frames = []
    for source, table in (("analyzer", run.analysis("metrics")), ("probe", run.probes())):
        if not len(table):
            continue
        keep = (
            (table["split"] == "reference") & (table["head"] == -1) & (table["ref_layer"] == -1)
            & table["metric"].isin(ALIGNMENT_METRICS) & (table["layer"] >= 1)
        )
        part = table.loc[keep, ["step", "layer", "metric", "value"]].copy()
        part["source"] = source
        frames.append(part)
    if not frames:
        return pd.DataFrame(columns=["step", "layer", "metric", "value", "source"])
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.astype({"step": "int64", "layer": "int64", "value": "float64"})
    # concat order puts the analyzer first: keep its value where both exist.
    return rows.drop_duplicates(["step", "layer", "metric"], keep="first").reset_index(drop=True)


def _num_layers(run: Run, rows: pd.DataFrame) -> int | None:
    """L, the number of blocks: from the probe tables, else a checkpoint's or the start
    model's ``config.json``; None when nothing says."""
    tables = [rows, run.probes(), run.analysis("metrics")]
    found = [int(t["layer"].max()) for t in tables if len(t)]
    if found:
        return max(found)
    folders = [c.path for c in list_checkpoints(run.path, verify=False, warn=False)]
    model = run.config.get("model")
    model_path = model.get("path") if isinstance(model, dict) else None
    if model_path:
        folders.append(model_path)
    for folder in folders:
        try:
            config = json.loads(Path(folder, "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(config, dict) and isinstance(config.get("num_hidden_layers"), int):
            return config["num_hidden_layers"]
    return None


def _oisd_layer(run: Run, num_layers: int | None) -> int | None:
    """The first of an OISD run's selected layers, resolved as the trainer does."""
    from trainer.setup import resolve_layers

    section = run.config.get("oisd")
    spec = section.get("layers") if isinstance(section, dict) else None
    if not spec:
        spec = [0.5]  # the config default (trainer.config.OISDConfig)
    if num_layers is None:
        ints = [x for x in spec if isinstance(x, int)]  # a block index needs no L
        return min(ints) if ints else None
    return resolve_layers(spec, num_layers, key=f"oisd.layers of {run.name}")[0]


def _is_oisd(run: Run) -> bool:
    return run.method in OISD_METHODS


def _last_value(frame: pd.DataFrame, column: str) -> float:
    if column not in frame.columns:
        return math.nan
    values = frame[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _run_row(run: Run, rows: pd.DataFrame, layer: int | None) -> dict:
    """The comparison row of one run, read at ``layer``."""
    history = run.metrics()
    steps = int(history["step"].max()) if len(history) else 0
    if "eval/accuracy" in history.columns:
        evals = history[history["eval/accuracy"].notna()]
    else:
        evals = history.iloc[0:0]
    before = evals[evals["step"] == 0]
    after = evals[evals["step"] > 0]
    trained = history[history["step"] > 0]
    if "entropy" in trained.columns:
        entropy = trained["entropy"].dropna()
    else:
        entropy = pd.Series(dtype=float)

    row = {
        "run": run.name,
        "method": run.method,
        "seed": run.info.get("seed", run.config.get("seed")),
        "steps": steps,
        "layer": layer,
        "accuracy_before": _last_value(before, "eval/accuracy"),
        "accuracy_after": _last_value(after, "eval/accuracy"),
        "mean_at_k_after": _last_value(after, "eval/mean_at_k"),
        "entropy_final": float(entropy.iloc[-ENTROPY_WINDOW:].mean()) if len(entropy) else math.nan,
        "probe_step": None,
        "source": None,
    }
    at_layer = rows[rows["layer"] == layer] if layer is not None else rows.iloc[0:0]
    last = int(at_layer["step"].max()) if len(at_layer) else None
    row["probe_step"] = last
    for metric in ALIGNMENT_METRICS:
        series = at_layer[at_layer["metric"] == metric].set_index("step")
        row[f"{metric}_before"] = float(series.at[0, "value"]) if 0 in series.index else math.nan
        has_last = last is not None and last in series.index
        row[f"{metric}_after"] = float(series.at[last, "value"]) if has_last else math.nan
    if last is not None:
        row["source"] = "+".join(sorted(set(at_layer.loc[at_layer["step"] == last, "source"])))
    return row


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


def comparison_table(
    run_dirs: Sequence[str | os.PathLike],
    layer: int | None = None,
    *,
    aggregate: bool = False,
) -> pd.DataFrame:
    """Accuracy, entropy and alignment at the OISD layer, one row per run (or method).

    Args:
        run_dirs: Run folders.
        layer: Block (1..L) to read ``top1_agree`` and ``attn_js_final`` at, for every
            run. ``None``: an OISD run's own first selected layer; other runs the layer
            of the first OISD run listed, or ``L // 2`` (at least 1) without one.
        aggregate: One row per method instead: the mean of each value column over its
            runs (seeds) and its sample standard deviation in ``<column>_std`` (NaN for
            a single run).

    Returns:
        Per run (``aggregate=False``), columns :data:`COLUMNS`: ``run, method, seed,
        steps`` (last logged step), ``layer``, ``accuracy_before`` (``eval/accuracy``
        at step 0), ``accuracy_after`` (the last evaluation after step 0),
        ``mean_at_k_after``, ``entropy_final`` (mean ``entropy`` of the last
        :data:`ENTROPY_WINDOW` training steps), ``top1_agree_before/after``,
        ``attn_js_final_before/after`` (step 0 and ``probe_step``, the last step
        probed at that layer), ``source`` (``analyzer`` or ``probe``: where the
        "after" values come from). Missing values are NaN.
        Per method (``aggregate=True``): ``method, runs, seeds, steps, layer``, then
        each value column and its ``_std``.

    Raises:
        WorkbenchError: No run folders, a folder that is not a run, or a ``layer``
            that a run does not have.
    """
    if not run_dirs:
        raise WorkbenchError("compare needs at least one run folder")
    runs = [Run.open(path) for path in run_dirs]
    alignment = [_alignment_rows(run) for run in runs]
    depth = [_num_layers(run, rows) for run, rows in zip(runs, alignment)]

    if layer is not None:
        for run, num_layers in zip(runs, depth):
            if num_layers is not None and not 1 <= layer <= num_layers:
                raise WorkbenchError(
                    f"layer {layer} does not exist in run {run.name} "
                    f"(it has layers 1..{num_layers})"
                )
        layers = [layer] * len(runs)
    else:
        own = [_oisd_layer(run, L) if _is_oisd(run) else None for run, L in zip(runs, depth)]
        shared = next((x for x in own if x is not None), None)
        layers = [
            mine if mine is not None
            else shared if shared is not None
            else (max(1, L // 2) if L is not None else None)
            for mine, L in zip(own, depth)
        ]

    records = [_run_row(run, rows, lay) for run, rows, lay in zip(runs, alignment, layers)]
    table = pd.DataFrame(records, columns=COLUMNS)
    table = table.astype({c: "float64" for c in VALUE_COLUMNS})
    table["layer"] = table["layer"].astype("Int64")
    table["probe_step"] = table["probe_step"].astype("Int64")
    return _aggregate(table) if aggregate else table


def _aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std of each value column per method (methods in first-seen order)."""
    rows = []
    for method, group in table.groupby("method", sort=False, dropna=False):
        row = {
            "method": method,
            "runs": len(group),
            "seeds": sorted(group["seed"].dropna().tolist()),
            "steps": int(group["steps"].min()),
            "layer": group["layer"].iloc[0] if group["layer"].nunique(dropna=False) == 1 else pd.NA,
        }
        for column in VALUE_COLUMNS:
            values = group[column].dropna()
            row[column] = float(values.mean()) if len(values) else math.nan
            row[f"{column}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    columns = ["method", "runs", "seeds", "steps", "layer"]
    columns += [name for column in VALUE_COLUMNS for name in (column, f"{column}_std")]
    out = pd.DataFrame(rows, columns=columns)
    out["layer"] = out["layer"].astype("Int64")
    return out


# ---------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------


def _fmt(value: object, digits: int = 3) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _arrow(before: object, after: object) -> str:
    return f"{_fmt(before)} -> {_fmt(after)}"


def _per_run_table(table: pd.DataFrame, title: str):
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    for name in ("run", "method", "seed", "steps", "layer", "accuracy", "mean@k",
                 "entropy (end)", "top1_agree", "attn_js_final", "probe step"):
        out.add_column(name, justify="left" if name in ("run", "method") else "right")
    for r in table.itertuples(index=False):
        out.add_row(
            str(r.run), str(r.method), str(r.seed), str(r.steps), _fmt(r.layer, 0),
            _arrow(r.accuracy_before, r.accuracy_after), _fmt(r.mean_at_k_after),
            _fmt(r.entropy_final),
            _arrow(r.top1_agree_before, r.top1_agree_after),
            _arrow(r.attn_js_final_before, r.attn_js_final_after),
            "-" if r.probe_step is pd.NA else f"{r.probe_step} ({r.source})",
        )
    return out


def _aggregate_table(table: pd.DataFrame):
    from rich.table import Table

    def pm(row: pd.Series, column: str) -> str:
        std = row[f"{column}_std"]
        return _fmt(row[column]) if np.isnan(std) else f"{_fmt(row[column])} ± {_fmt(std)}"

    out = Table(title="Per method: mean ± std over seeds", title_justify="left")
    out.add_column("method", justify="left")
    for name in ("runs", "layer", *(_LABELS[column] for column in VALUE_COLUMNS)):
        out.add_column(name, justify="right")
    for _, row in table.iterrows():
        out.add_row(str(row["method"]), str(row["runs"]), _fmt(row["layer"], 0),
                    *(pm(row, column) for column in VALUE_COLUMNS))
    return out


def print_comparison(
    run_dirs: Sequence[str | os.PathLike],
    layer: int | None = None,
    *,
    aggregate: bool | None = None,
    console=None,
) -> pd.DataFrame:
    """Print the comparison as a rich table and return it (``oisd compare``).

    Args:
        run_dirs: Run folders.
        layer: See :func:`comparison_table`.
        aggregate: Also print the per-method mean ± std table. ``None``: when some
            method has more than one run (several seeds).
        console: A ``rich.console.Console`` (default: a new one on stdout).

    Returns:
        The per-run table (:func:`comparison_table`).
    """
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and CI: do not squeeze the table into 80 columns
            console = Console(width=200)
    table = comparison_table(run_dirs, layer=layer)
    console.print(_per_run_table(
        table, "Runs: held-out accuracy and alignment to the final layer (before -> after training)"
    ))
    console.print(
        "top1_agree: share of probe positions where layer l's logit-lens top-1 equals the "
        "final layer's (higher = closer); attn_js_final: JSD(mean_h a^l, mean_h a^L) "
        "(lower = closer). Reference split, all heads."
    )
    if aggregate is None:
        aggregate = bool(table["method"].duplicated().any())
    if aggregate:
        console.print(_aggregate_table(_aggregate(table)))
    return table
