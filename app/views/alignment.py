"""Layer alignment view: a layer x checkpoint heat map per metric, and run differences."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, figures
from app.state import ViewContext, download_csv, select
from workbench.measures.drift import drift_summary
from workbench.measures.summary import outcome_gap
from workbench.storage.schema import METRIC_INFO, N_SAMPLES, OUTCOME_SPLITS

PAIRWISE = {"attn_js", "attn_head_match", "attn_head_identity"}  # shown in the attention view
# A pseudo split: the metric on sampled completions the verifier accepts minus those it rejects.
GAP = "gap: sampled_correct - sampled_wrong"
# The view's sections, one drawn at a time (the URL's ``alignment_show``).
HEATMAPS, DIFFERENCE, PROFILES, DRIFT = ("Heat maps", "Difference of two runs", "Per-layer curves at one checkpoint",
                                         "Weight drift")
SECTIONS = [HEATMAPS, DIFFERENCE, PROFILES, DRIFT]


def per_layer_rows(table: pd.DataFrame, metric: str, split: str | None) -> pd.DataFrame:
    """Rows of one metric over all heads (``head = -1``), not pairwise, of one split.

    ``split = GAP``: the correct-minus-wrong gap per (step, layer), where both outcome
    splits hold sequences (:func:`workbench.measures.summary.outcome_gap`).
    """
    rows = table[(table["metric"] == metric) & (table["head"] == -1) & (table["ref_layer"] == -1)]
    if split == GAP:
        parts = []
        for layer, group in rows.groupby("layer"):
            gap = outcome_gap(group)
            parts.append(pd.DataFrame({"step": gap.index.astype("int64"), "layer": layer, "metric": metric,
                                       "value": gap.values, "split": GAP}))
        return pd.concat(parts, ignore_index=True) if parts else rows.iloc[0:0]
    if split is not None:
        rows = rows[rows["split"] == split]
    return rows


def _default_pair(names: list[str], baseline: dict[str, bool]) -> tuple[str, str]:
    """(A, B) for "A minus B": a self-distillation run minus a baseline (GRPO) run when there are
    both (run.json's ``baseline``, :attr:`Run.is_baseline`)."""
    base = [n for n in names if baseline.get(n)]
    other = [n for n in names if not baseline.get(n)]
    if base and other:
        return other[0], base[0]
    return names[0], names[1]


def render(ctx: ViewContext) -> None:
    """Draw one section: heat maps of the chosen metric for the selected runs, A minus B, the
    per-layer curves at one checkpoint, or where training changed the weights."""
    st.header("Layer alignment")
    if not ctx.runs:
        st.info("Select one or more runs in the sidebar.")
        return
    found = {s for run in ctx.runs.values() for s in data.available_sources(run)}
    sources = [s for s in data.SOURCES if s in found]
    if not sources:
        st.info("None of the selected runs has built-in probes or analysis tables yet.")
        return
    source = select(ctx, "Source", sources, "source", format_func=data.SOURCES.get, widget="radio",
                    default="probe", horizontal=True)
    # What each run holds (metric, split) first; then only the rows the heat maps draw.
    catalogs = {}
    for name, run in ctx.runs.items():
        catalog, messages = data.metric_catalog(run, source)
        for message in messages:
            st.error(f"Run `{name}`: {message}")
        if len(catalog):
            catalogs[name] = catalog
        else:
            st.info(f"Run `{name}` has no {data.SOURCES[source]} rows.")
    if not catalogs:
        return
    present = set().union(*(set(c["metric"]) for c in catalogs.values())) - PAIRWISE - {N_SAMPLES}
    metrics = [m for m in METRIC_INFO if m in present] + sorted(present - set(METRIC_INFO))
    left, right = st.columns([1, 2])
    with left:
        metric = select(ctx, "Metric", metrics, "metric", default="lens_kl")
        splits = sorted(set().union(*(set(c["split"]) for c in catalogs.values())))
        if set(OUTCOME_SPLITS) <= set(splits):
            splits.append(GAP)
        split = select(None, "Split", splits, "alignment_split", default="reference")
        if split == GAP:
            st.caption("Value on sampled completions the verifier accepts minus value on those it "
                       "rejects, same layer and checkpoint (OISD's signed weight pulls the first toward "
                       "the final layer and pushes the second away).")
    with right:
        definition = figures.metric_label(metric)
        st.markdown(f"**{definition}**  \n{figures.metric_direction(metric)}")
        st.caption("Layers 1..L (L = final layer), the runs stacked top to bottom; one column per "
                   "checkpoint with probes, at its step. All runs share one colour scale.")

    # One section at a time: the browser draws only the figure the user looks at (six runs'
    # heat maps, their drift maps and the per-layer curves together cost seconds to draw).
    show = select(ctx, "Show", SECTIONS, "alignment_show", widget="radio", horizontal=True)
    if show == DRIFT:
        _weight_drift(ctx)
        return
    wanted = list(OUTCOME_SPLITS) if split == GAP else [split]
    rows = {}
    for name in catalogs:
        table, messages = data.metric_rows(ctx.runs[name], source, metric=[metric], head=[-1], ref_layer=[-1],
                                           split=wanted)
        for message in messages:
            st.error(f"Run `{name}`: {message}")
        rows[name] = per_layer_rows(table, metric, split)
    rows = {name: r for name, r in rows.items() if len(r)}
    if not rows:
        st.info(f"No {metric} rows in the selected runs.")
        return
    download_csv(lambda: pd.concat(rows.values(), ignore_index=True), f"alignment-{metric}.csv")
    per_step_only = all(set(r["layer"].unique()) <= {0} for r in rows.values())
    if per_step_only:  # e.g. prediction_depth: one value per checkpoint, not per layer
        st.plotly_chart(figures.step_lines(rows, metric), key="alignment_lines")
        return
    if show == PROFILES:
        _profiles_at_one_checkpoint(rows, metric)
        return

    def matrix(name: str) -> pd.DataFrame:
        return figures.layer_step_matrix(rows[name][rows[name]["layer"] >= 1])

    # Everything the figures depend on: the rows' files and the choices above.
    key = (tuple(data.source_key(ctx.runs[n], source) for n in rows), metric, split)
    if show == HEATMAPS:
        st.plotly_chart(data.cached_figure("alignment_heatmaps", key,
                                           lambda: figures.layer_checkpoint_heatmaps({n: matrix(n) for n in rows}, metric)),
                        key="alignment_heatmaps")
        return
    if len(rows) < 2:
        st.info("Select a second run with these rows to see the difference between two runs.")
        return
    names = list(rows)
    default_a, default_b = _default_pair(names, {n: ctx.runs[n].is_baseline for n in names})
    col_a, col_b = st.columns(2)
    a = select(None, "Run A", names, "diff_a", container=col_a, default=default_a)
    b = select(None, "minus run B", names, "diff_b", container=col_b, default=default_b)

    st.plotly_chart(data.cached_figure("alignment_difference", (key, a, b),
                                       lambda: figures.difference_heatmap(matrix(a), matrix(b), a, b, metric)),
                    key="alignment_difference")


def _weight_drift(ctx: ViewContext) -> None:
    """Which blocks training moved, beside what they compute: the weights' relative change
    from the start per block and checkpoint (``oisd probe`` measures it from the checkpoints)."""
    drifts = {name: data.drift_table(run) for name, run in ctx.runs.items()}
    drifts = {name: d for name, d in drifts.items() if len(d)}
    if not drifts:
        st.info("None of the selected runs has weight drift yet (`oisd probe` measures it from the checkpoints).")
        return
    st.subheader("Where training changed the weights")
    figure = data.cached_figure("alignment_drift", tuple(data.analysis_key(ctx.runs[n]) for n in drifts),
                                lambda: figures.drift_heatmaps({n: figures.drift_matrix(d) for n, d in drifts.items()}))
    st.plotly_chart(figure, key="alignment_drift")
    notes = []
    for name, d in drifts.items():
        s = drift_summary(d)
        if s is not None:
            notes.append(f"`{name}` at step {s['step']}: block {s['block']} moved most "
                         f"({s['rel_change']:.3g}); {s['changed_bf16']:.0%} of the parameters changed at bf16 resolution")
    st.caption("  \n".join(notes))
    download_csv(pd.concat(drifts.values(), ignore_index=True), "drift.csv")


def _profiles_at_one_checkpoint(rows: dict[str, pd.DataFrame], metric: str) -> None:
    """The selected runs' per-layer curves overlaid at one checkpoint step."""
    steps = sorted(set().union(*(set(r["step"].astype(int)) for r in rows.values())))
    if not steps:
        return
    step = select(None, "Checkpoint step", steps, "alignment_profile_step", default=steps[-1])
    at_step = {name: r[(r["step"] == step) & (r["layer"] >= 1)] for name, r in rows.items()}
    at_step = {name: r for name, r in at_step.items() if len(r)}
    if at_step:
        st.plotly_chart(figures.layer_profiles(at_step, metric), key="alignment_profiles")
    missing = sorted(set(rows) - set(at_step))
    if missing:
        st.caption(f"No {metric} at step {step} in: {', '.join(missing)}.")
