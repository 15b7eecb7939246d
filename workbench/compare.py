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

import math
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from workbench.errors import WorkbenchError
from workbench.measures.summary import ALIGNMENT_METRICS, GAP_METRICS, outcome_gap, report_layers
from workbench.storage.paths import run_label
from workbench.storage.runstore import Run, last_value
from workbench.storage.schema import OUTCOME_SPLITS

__all__ = ["COLUMNS", "ENTROPY_WINDOW", "comparability_warnings", "comparison_table", "print_comparison",
           "reference_notes"]

ENTROPY_WINDOW = 5  # "final entropy" = mean over the last this-many logged training steps

# Per-run table. Numeric columns after "layer" are the ones aggregated over seeds.
COLUMNS = [
    "run", "method", "seed", "steps", "layer",
    "accuracy_before", "accuracy_after", "mean_at_k_after", "entropy_final",
    "top1_agree_before", "top1_agree_after", "attn_js_final_before", "attn_js_final_after",
    "top1_agree_gap_before", "top1_agree_gap_after", "lens_js_gap_before", "lens_js_gap_after",
    "attn_js_final_gap_before", "attn_js_final_gap_after",
    "exit_accuracy_before", "exit_accuracy_after", "learned_top1_agree_after", "patch_half_layer",
    "probe_step", "source",
]
VALUE_COLUMNS = COLUMNS[5:23]

# Column headers of the printed per-method table.
_LABELS = {
    "accuracy_before": "acc before", "accuracy_after": "acc after",
    "mean_at_k_after": "mean@k after", "entropy_final": "entropy (end)",
    "top1_agree_before": "top1_agree before", "top1_agree_after": "top1_agree after",
    "attn_js_final_before": "attn_js_final before", "attn_js_final_after": "attn_js_final after",
    **{f"{m}_gap_{w}": f"{m} gap {w}" for m in GAP_METRICS for w in ("before", "after")},
    "exit_accuracy_before": "exit acc before", "exit_accuracy_after": "exit acc after",
    "learned_top1_agree_after": "top1_agree (learned lens) after", "patch_half_layer": "patch: half at layer",
}


# ---------------------------------------------------------------------------
# Reading one run
# ---------------------------------------------------------------------------


def _alignment_rows(run: Run) -> pd.DataFrame:
    """Per-layer alignment rows of both sources, one per (step, layer, metric, split).

    Splits ``reference``, ``sampled_correct`` and ``sampled_wrong``.

    Returns:
        Columns ``step, layer, metric, split, value, source``; where both the analyzer
        and the built-in probes have a row, the analyzer's is kept.
    """
    columns = ["step", "layer", "metric", "split", "value", "source"]
    frames = []
    for source in ("analyzer", "probe"):
        # Only these rows are decoded (the filter goes into the parquet scan): at 36 layers x
        # 32 heads a step's table is ~20k rows, of which these are a few hundred.
        table = run.metric_rows(source, columns=columns[:-1], split=("reference",) + OUTCOME_SPLITS, head=[-1],
                                ref_layer=[-1], metric=sorted(set(ALIGNMENT_METRICS) | set(GAP_METRICS)))
        part = table[table["layer"] >= 1].copy()
        if not len(part):
            continue
        part["source"] = source
        frames.append(part)
    if not frames:
        return pd.DataFrame(columns=columns)
    rows = pd.concat(frames, ignore_index=True)
    rows = rows.astype({"step": "int64", "layer": "int64", "value": "float64"})
    # concat order puts the analyzer first: keep its value where both exist.
    return rows.drop_duplicates(["step", "layer", "metric", "split"], keep="first").reset_index(drop=True)


def _num_layers(run: Run, rows: pd.DataFrame) -> int | None:
    """L, as the trainer recorded it in run.json; for a run without it, the deepest layer
    its probe tables hold; None when nothing says."""
    if run.num_layers is not None:
        return run.num_layers
    tables = [rows] + [run.metric_rows(source, columns=["layer"]) for source in ("probe", "analyzer")]
    found = [int(t["layer"].max()) for t in tables if len(t)]
    return max(found) if found else None


def _run_row(run: Run, rows: pd.DataFrame, layer: int | None) -> dict:
    """The comparison row of one run, read at ``layer``."""
    history = run.metrics()
    steps = run.last_step(history)
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
        "accuracy_before": last_value(before, "eval/accuracy", math.nan),
        "accuracy_after": last_value(after, "eval/accuracy", math.nan),
        "mean_at_k_after": last_value(after, "eval/mean_at_k", math.nan),
        "entropy_final": float(entropy.iloc[-ENTROPY_WINDOW:].mean()) if len(entropy) else math.nan,
        "probe_step": None,
        "source": None,
    }
    at_layer = rows[rows["layer"] == layer] if layer is not None else rows.iloc[0:0]
    reference = at_layer[at_layer["split"] == "reference"]
    last = int(reference["step"].max()) if len(reference) else None
    row["probe_step"] = last
    for metric in ALIGNMENT_METRICS:
        series = reference[reference["metric"] == metric].set_index("step")
        row[f"{metric}_before"] = float(series.at[0, "value"]) if 0 in series.index else math.nan
        has_last = last is not None and last in series.index
        row[f"{metric}_after"] = float(series.at[last, "value"]) if has_last else math.nan
    for metric in GAP_METRICS:
        gap = outcome_gap(at_layer[at_layer["metric"] == metric])
        row[f"{metric}_gap_before"] = float(gap.get(0, math.nan))
        row[f"{metric}_gap_after"] = float(gap.get(last, math.nan)) if last is not None else math.nan
    if last is not None:
        row["source"] = "+".join(sorted(set(reference.loc[reference["step"] == last, "source"])))
    return row


def _causal_values(run: Run, layer: int | None) -> dict:
    """What the causal analyses say of a run at ``layer`` (docs/metrics.md): early-exit accuracy
    there before training (the built-in probes at step 0) and after (the last checkpoint with
    exits: the analyzer's, else the probes'), ``top1_agree`` read through the learned lens at
    its last checkpoint, and the first layer whose block output, patched into the start model,
    recovers half of the last checkpoint's change (``patch_half_layer``). NaN where not measured."""
    out = {"exit_accuracy_before": math.nan, "exit_accuracy_after": math.nan,
           "learned_top1_agree_after": math.nan, "patch_half_layer": math.nan}
    if layer is None:
        return out
    for source in ("probe", "analyzer"):
        exits = run.metric_rows(source, metric=["exit_accuracy"], split=["greedy"], layer=[layer])
        if len(exits):
            if source == "probe" and (exits["step"] == 0).any():
                out["exit_accuracy_before"] = float(exits.loc[exits["step"] == 0, "value"].iloc[0])
            after = exits[exits["step"] > 0]
            if len(after):  # the analyzer's, read second, wins where both have one
                out["exit_accuracy_after"] = float(after.loc[after["step"].idxmax(), "value"])
    lens = run.analysis("lens")
    lens = lens[(lens["metric"] == "top1_agree") & (lens["split"] == "reference") & (lens["layer"] == layer)]
    if len(lens):
        out["learned_top1_agree_after"] = float(lens.loc[lens["step"].idxmax(), "value"])
    patch = run.analysis("patch")
    block = patch[(patch["component"] == "block") & (patch["metric"] == "patch_recovered")]
    if len(block):
        last = block[block["step"] == block["step"].max()].sort_values("layer")
        reached = last[last["value"] >= 0.5]
        out["patch_half_layer"] = float(reached["layer"].iloc[0]) if len(reached) else math.nan
    return out


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
        # An OISD run is read at its own layer; the others at the first OISD run's layer.
        shared = next((run.oisd_layers for run in runs if run.oisd_layers), [])
        layers = []
        for run, L in zip(runs, depth):
            chosen = run.oisd_layers or shared
            layers.append(report_layers(chosen, L)[0] if chosen or L is not None else None)

    records = [_run_row(run, rows, lay) | _causal_values(run, lay) for run, rows, lay in zip(runs, alignment, layers)]
    table = pd.DataFrame(records, columns=COLUMNS)
    table = table.astype({c: "float64" for c in VALUE_COLUMNS})
    table["layer"] = table["layer"].astype("Int64")
    table["probe_step"] = table["probe_step"].astype("Int64")
    return _aggregate(table) if aggregate else table


def comparability_warnings(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """What makes a mean ± std over these runs misleading, one line each (empty when nothing).

    Runs of one method are averaged together: they should train for the same number of steps
    and differ in their seed, or in their start (several warm starts: the spread is then over
    starts and seeds, and said so). Across methods, a comparison needs the same starts.
    """
    runs = [Run.open(path) for path in run_dirs]

    def start(run: Run) -> str:
        model = run.config.get("model")
        return str(model.get("path")) if isinstance(model, dict) else "?"

    out = []
    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(str(run.method), []).append(run)
    for method, group in by_method.items():
        if len(group) < 2:
            continue
        starts = sorted({start(r) for r in group})
        if len(starts) > 1:
            out.append(f"{method}: runs start from different models ({', '.join(starts)}); "
                       "their spread is over starts and seeds, not a seed spread")
        counts = sorted({r.last_step() for r in group})
        if len(counts) > 1:
            out.append(f"{method}: runs reached different steps ({', '.join(map(str, counts))})")
        seen: dict[object, str] = {}
        for r in group:
            key = (start(r), r.info.get("seed", r.config.get("seed")))
            if key in seen:
                out.append(f"{method}: seed {key[1]} appears twice ({seen[key]}, {r.name}); "
                           "the std counts one seed twice")
            seen.setdefault(key, r.name)
    start_sets = {method: tuple(sorted({start(r) for r in group})) for method, group in by_method.items()}
    if len(set(start_sets.values())) > 1:
        starts = sorted({start(r) for r in runs})
        out.append(f"methods start from different models ({', '.join(starts)}); differences between "
                   "methods mix the method with the start")
    return out


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


def drift_lines(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Per run with weight drift (``oisd probe`` measures it): at its last analysed checkpoint,
    the block whose weights moved most from the start, and the share of parameters whose
    bf16 value changed."""
    from workbench.measures.drift import drift_summary

    lines = []
    for run_dir in run_dirs:
        run = Run.open(run_dir)
        d = drift_summary(run.analysis("drift"))
        if d is not None:
            lines.append(f"weight drift, {run.name} at step {d['step']}: block {d['block']} moved most "
                         f"(||dW|| / ||W0|| = {d['rel_change']:.3g}); {d['changed_bf16']:.1%} of the parameters "
                         "changed at bf16 resolution")
    return lines


def reference_notes(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """One line per run whose probe prompts do not all have a reference (free prompts of
    ``oisd probe --prompts``): its reference split covers only those that have one, or,
    with none, it has no reference split and its alignment columns read "-"."""
    out = []
    for path in run_dirs:
        run = Run.open(path)
        records = run.probe_set()
        n = sum(1 for r in records if r.get("reference_ids"))
        if not records or n == len(records):
            continue
        if n == 0:
            out.append(f"{run.name}: no probe prompt has a reference, so there is no reference split and its "
                       "alignment columns read '-' (its greedy split is in the dashboard)")
        else:
            out.append(f"{run.name}: reference split over the {n} of {len(records)} probe prompts that have a reference")
    return out


def _per_run_table(table: pd.DataFrame, title: str):
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    for name in ("run", "method", "seed", "steps", "layer", "accuracy", "mean@k",
                 "entropy (end)", "top1_agree", "attn_js_final", "top1_agree gap", "probe step"):
        out.add_column(name, justify="left" if name in ("run", "method") else "right")
    for r in table.itertuples(index=False):
        out.add_row(
            str(r.run), str(r.method), str(r.seed), str(r.steps), _fmt(r.layer, 0),
            _arrow(r.accuracy_before, r.accuracy_after), _fmt(r.mean_at_k_after),
            _fmt(r.entropy_final),
            _arrow(r.top1_agree_before, r.top1_agree_after),
            _arrow(r.attn_js_final_before, r.attn_js_final_after),
            _arrow(r.top1_agree_gap_before, r.top1_agree_gap_after),
            "-" if r.probe_step is pd.NA else f"{r.probe_step} ({r.source})",
        )
    return out


def _gap_table(table: pd.DataFrame):
    """Per run: the correct-minus-wrong gap of each of :data:`GAP_METRICS` at the layer."""
    from rich.table import Table

    out = Table(title="Correct-minus-wrong gaps at the layer (before -> after)", title_justify="left")
    out.add_column("run", justify="left")
    out.add_column("layer", justify="right")
    for metric in GAP_METRICS:
        out.add_column(f"{metric} gap", justify="right")
    for r in table.itertuples(index=False):
        out.add_row(str(r.run), _fmt(r.layer, 0),
                    *(_arrow(getattr(r, f"{m}_gap_before"), getattr(r, f"{m}_gap_after")) for m in GAP_METRICS))
    return out


def _aggregate_table(table: pd.DataFrame, comparable: bool = True):
    from rich.table import Table

    def pm(row: pd.Series, column: str) -> str:
        std = row[f"{column}_std"]
        return _fmt(row[column]) if np.isnan(std) else f"{_fmt(row[column])} ± {_fmt(std)}"

    title = "Per method: mean ± std over seeds"
    if not comparable:
        title += " (runs not comparable: see the warnings above)"
    out = Table(title=title, title_justify="left")
    out.add_column("method", justify="left")
    shown = [c for c in VALUE_COLUMNS if table[c].notna().any()]  # what some run measured
    for name in ("runs", "layer", *(_LABELS[column] for column in shown)):
        out.add_column(name, justify="right")
    for _, row in table.iterrows():
        out.add_row(str(row["method"]), str(row["runs"]), _fmt(row["layer"], 0),
                    *(pm(row, column) for column in shown))
    return out


def _causal_table(table: pd.DataFrame):
    """Per run: the causal analyses at the layer (early exit, the learned lens, patching)."""
    from rich.table import Table

    out = Table(title="Causal analyses at the layer (oisd probe --exit --learned-lens --patch)", title_justify="left")
    for name in ("run", "layer", "exit accuracy", "top1_agree (learned lens)", "patch: half at layer"):
        out.add_column(name, justify="left" if name == "run" else "right")
    for r in table.itertuples(index=False):
        out.add_row(str(r.run), _fmt(r.layer, 0), _arrow(r.exit_accuracy_before, r.exit_accuracy_after),
                    _fmt(r.learned_top1_agree_after), _fmt(r.patch_half_layer, 0))
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
    for line in reference_notes(run_dirs):
        console.print(f"note: {line}", highlight=False)
    if aggregate is None:
        aggregate = bool(table["method"].duplicated().any())
    warnings = comparability_warnings(run_dirs)
    for line in warnings:
        console.print(f"[yellow]warning:[/yellow] {line}", highlight=False)
    if aggregate:
        console.print(_aggregate_table(_aggregate(table), comparable=not warnings))
    for line in drift_lines(run_dirs):
        console.print(line, highlight=False)
    if table[[f"{m}_gap_after" for m in GAP_METRICS]].notna().any().any():
        console.print(_gap_table(table))
        console.print(
            "gap = value on sampled completions the verifier accepts minus value on those it rejects "
            "(splits sampled_correct - sampled_wrong), at the same layer and step."
        )
    if table[["exit_accuracy_after", "learned_top1_agree_after", "patch_half_layer"]].notna().any().any():
        console.print(_causal_table(table))
    return table


# ---------------------------------------------------------------------------
# Per-method summary with the seed spread (the demo's summary.json)
# ---------------------------------------------------------------------------

# Per-run values listed per method (one entry per seed), and what the verdict compares.
SUMMARY_AFTER = ("accuracy_after", "top1_agree_after", "top1_agree_gap_after", "entropy_final",
                 "exit_accuracy_after", "learned_top1_agree_after", "patch_half_layer")
SUMMARY_BEFORE = ("accuracy_before", "top1_agree_before", "top1_agree_gap_before", "exit_accuracy_before")


def method_summary(run_dirs: Sequence[str | os.PathLike], baseline: str | None = None) -> dict:
    """Per method (runs named ``<method>-seed<k>``): values before, after per seed, and the verdict
    against ``baseline`` (a label; None: the label whose runs trained the baseline, run.json's
    ``baseline``, :attr:`Run.is_baseline`).

    Returns:
        ``{"layer": l, "methods": {name: {"seeds": n, "accuracy_before": x,
        "accuracy_after": [...], "top1_agree_before": x, "top1_agree_after": [...],
        "top1_agree_gap_before": x, "top1_agree_gap_after": [...], "entropy_final": [...],
        "exit_accuracy_before": x, "exit_accuracy_after": [...], "learned_top1_agree_after": [...],
        "patch_half_layer": [...], "accuracy_gain": [...], "gain_by_start": {start model: [...]},
        "vs_baseline": {value: {"difference": d, "spread": s, "larger_than_spread": bool}},
        "vs_baseline_by_start": {start model: the same, from that warm start's runs alone}}}}``
        (``vs_baseline_by_start`` only when the runs come from several warm starts).
        "before" values are the mean over the method's runs (over their warm starts when they
        have several); ``accuracy_gain`` is each run's after minus before, ``gain_by_start`` the
        same per start model (a run's ``model.path``), so that a gain can be checked from every
        warm start. The lists are in run order.
        The spread is the larger of the two methods' sample standard deviations over seeds;
        a difference counts as larger than the spread only when both have at least 2 seeds.
    """
    table = comparison_table(run_dirs)
    table["label"] = table["run"].map(run_label)
    if baseline is None:
        runs = [Run.open(d) for d in run_dirs]
        baseline = next((run_label(r.name) for r in runs if r.is_baseline), None)
    out: dict = {"layer": None if table["layer"].isna().all() else int(table["layer"].dropna().iloc[0]),
                 "baseline": baseline, "methods": {}}

    def clean(values) -> list[float | None]:
        return [None if (v is None or (isinstance(v, float) and math.isnan(v))) else float(v) for v in values]

    def mean(values) -> float | None:
        values = [v for v in clean(values) if v is not None]
        return float(np.mean(values)) if values else None

    starts = {}
    for path in run_dirs:
        run = Run.open(path)
        starts[run.name] = str((run.config.get("model") or {}).get("path"))
    for label, group in table.groupby("label", sort=False):
        entry = {"seeds": int(len(group)), "runs": group["run"].tolist()}
        for before in SUMMARY_BEFORE:
            entry[before] = mean(group[before])
        for after in SUMMARY_AFTER:
            entry[after] = clean(group[after])
        gains = clean(group["accuracy_after"] - group["accuracy_before"])
        entry["accuracy_gain"] = gains
        entry["gain_by_start"] = {}
        for run_name, gain in zip(group["run"], gains):
            entry["gain_by_start"].setdefault(starts[run_name], []).append(gain)
        out["methods"][label] = entry
    base = out["methods"].get(baseline)
    for label, entry in out["methods"].items():
        if base is None or label == baseline:
            continue
        entry["vs_baseline"] = _verdicts(entry, base)
        by_start = {}
        for start in dict.fromkeys(starts[r] for r in entry["runs"]):  # each warm start on its own
            mine = [i for i, r in enumerate(entry["runs"]) if starts[r] == start]
            theirs = [i for i, r in enumerate(base["runs"]) if starts[r] == start]
            if mine and theirs:
                by_start[start] = _verdicts(entry, base, mine, theirs)
        if len(by_start) > 1:
            entry["vs_baseline_by_start"] = by_start
    return out


def _verdicts(entry: dict, base: dict, mine: list[int] | None = None, theirs: list[int] | None = None) -> dict:
    """Each :data:`SUMMARY_AFTER` value of ``entry`` against ``base``'s (over the runs at the given
    indices, default all): the difference of means, the spread (the larger sample standard
    deviation) and whether the difference is larger than the spread (only with >= 2 runs each)."""
    verdict = {}
    for value in SUMMARY_AFTER:
        a = [v for i, v in enumerate(entry[value]) if v is not None and (mine is None or i in mine)]
        b = [v for i, v in enumerate(base[value]) if v is not None and (theirs is None or i in theirs)]
        if not a or not b:
            continue
        spread = max(float(np.std(a, ddof=1)) if len(a) > 1 else math.nan,
                     float(np.std(b, ddof=1)) if len(b) > 1 else math.nan)
        difference = float(np.mean(a) - np.mean(b))
        verdict[value] = {"difference": difference, "spread": None if math.isnan(spread) else spread,
                          "larger_than_spread": bool(len(a) > 1 and len(b) > 1 and abs(difference) > spread)}
    return verdict


_WORDS = {"accuracy_after": "accuracy", "top1_agree_after": "top1_agree",
          "top1_agree_gap_after": "correct-minus-wrong top1_agree gap", "entropy_final": "entropy",
          "exit_accuracy_after": "early-exit accuracy", "learned_top1_agree_after": "top1_agree through the learned lens",
          "patch_half_layer": "first layer whose patched block output recovers half the change"}


def summary_lines(summary: dict) -> list[str]:
    """The verdicts in words, one line per (method, value), against ``summary["baseline"]``."""
    baseline = summary.get("baseline")
    lines = []
    for label, entry in summary["methods"].items():
        for value, v in entry.get("vs_baseline", {}).items():
            spread = "n/a" if v["spread"] is None else f"{v['spread']:.3f}"
            word = "larger" if v["larger_than_spread"] else "not larger"
            line = (f"{label} vs {baseline}, {_WORDS[value]}: difference {v['difference']:+.3f} is {word} "
                    f"than the seed spread ({spread}, {entry['seeds']} vs {summary['methods'][baseline]['seeds']} "
                    "runs)")
            per_start = [s.get(value) for s in entry.get("vs_baseline_by_start", {}).values()]
            if per_start and all(per_start):  # the verdict from each warm start on its own
                same = sum(p["larger_than_spread"] == v["larger_than_spread"] for p in per_start)
                signs = sum((p["difference"] > 0) == (v["difference"] > 0) for p in per_start)
                line += (f"; from each warm start alone: the same verdict from {same} of {len(per_start)}, "
                         f"the same sign from {signs} of {len(per_start)}")
            lines.append(line)
    return lines


def print_summary(summary: dict, console=None) -> None:
    """The per-method table of :func:`method_summary`, then the verdicts in words."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)

    def pm(values: list) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        if len(values) == 1:
            return f"{values[0]:.3f}"
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"

    layer = summary["layer"]
    out = Table(title=f"Per method, mean ± std over runs (layer {layer} = the OISD layer)", title_justify="left")
    for name in ("method", "runs", "accuracy before -> after", f"top1_agree L{layer} before -> after",
                 "top1_agree gap (correct - wrong) before -> after", "entropy (end)"):
        out.add_column(name, justify="left" if name == "method" else "right")
    for label, e in summary["methods"].items():
        out.add_row(label, str(e["seeds"]), f"{_fmt(e['accuracy_before'])} -> {pm(e['accuracy_after'])}",
                    f"{_fmt(e['top1_agree_before'])} -> {pm(e['top1_agree_after'])}",
                    f"{_fmt(e['top1_agree_gap_before'])} -> {pm(e['top1_agree_gap_after'])}",
                    pm(e["entropy_final"]))
    console.print(out)
    causal = Table(title=f"What the causal analyses say at layer {layer} (docs/metrics.md)", title_justify="left")
    for name in ("method", f"exit accuracy L{layer} before -> after", f"top1_agree L{layer} learned lens",
                 "patched block output recovers half the change from layer", "accuracy gain per warm start"):
        causal.add_column(name, justify="left" if name == "method" else "right")
    for label, e in summary["methods"].items():
        per_start = ", ".join(pm(g) for g in e.get("gain_by_start", {}).values())
        causal.add_row(label, f"{_fmt(e.get('exit_accuracy_before'))} -> {pm(e.get('exit_accuracy_after', []))}",
                       pm(e.get("learned_top1_agree_after", [])), pm(e.get("patch_half_layer", [])), per_start)
    console.print(causal)
    for line in summary_lines(summary):
        console.print(line, highlight=False)
