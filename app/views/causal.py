"""Causal analyses view: can a layer do the task (early exit), is its alignment content or
readability (logit against learned lens), and where did training change the computation
(activation patching from the start model). ``oisd probe RUN --exit --learned-lens --patch``
writes what this view reads (docs/metrics.md)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, figures
from app.state import ViewContext, download_csv, select
from workbench.analysis.early_exit import EXIT_METRICS
from workbench.storage.paths import run_label

LENS_METRICS_SHOWN = ["top1_agree", "lens_kl", "lens_js", "final_rank"]
HOW = "`oisd probe RUN --exit --learned-lens --patch`"


def render(ctx: ViewContext) -> None:
    st.header("Causal analyses")
    if not ctx.runs:
        st.info("Select one or more runs in the sidebar.")
        return
    st.caption(f"What {HOW} measures: early exit, the learned-lens control and activation patching "
               "from the start model (docs/metrics.md).")
    _early_exit(ctx)
    _learned_lens(ctx)
    _patching(ctx)


def _exit_rows(ctx: ViewContext) -> dict[str, pd.DataFrame]:
    """Each run's early-exit rows: the analyzer's where it has them, else the trainer's probes."""
    out = {}
    for name, run in ctx.runs.items():
        for source in ("analyzer", "probe"):
            if source not in data.available_sources(run):
                continue
            rows, _ = data.metric_rows(run, source, metric=list(EXIT_METRICS), head=[-1], ref_layer=[-1])
            if len(rows):
                out[name] = rows
                break
    return out


def _early_exit(ctx: ViewContext) -> None:
    st.subheader("Can layer l do the task? Early exit")
    rows = _exit_rows(ctx)
    if not rows:
        st.info(f"No early-exit rows in the selected runs: {HOW} (or `probe.exit_layers` in training).")
        return
    metric = select(None, "Early-exit metric", list(EXIT_METRICS), "exit_metric", default="exit_accuracy",
                    horizontal=True, widget="radio")
    st.markdown(f"**{figures.metric_label(metric)}**  \n{figures.metric_direction(metric)}")
    chosen = {name: r[r["metric"] == metric] for name, r in rows.items()}
    matrices = {name: figures.layer_step_matrix(r) for name, r in chosen.items() if len(r)}
    st.plotly_chart(figures.layer_checkpoint_heatmaps(matrices, metric), key="exit_heatmaps")
    # Per method: the mean over its seeds at each run's last checkpoint, per layer.
    last = {name: r[r["step"] == r["step"].max()] for name, r in chosen.items() if len(r)}
    by_method: dict[str, list[pd.DataFrame]] = {}
    for name, r in last.items():
        by_method.setdefault(run_label(name), []).append(r)
    curves = {f"{label} ({len(parts)} run{'s' * (len(parts) > 1)})": pd.concat(parts, ignore_index=True)
              for label, parts in by_method.items()}
    st.plotly_chart(figures.layer_profiles(curves, metric), key="exit_curves")
    st.caption("At each run's last analysed checkpoint, the mean over a method's seeds. Layer L is the full model.")
    download_csv(pd.concat(rows.values(), ignore_index=True), "early-exit.csv")


def _learned_lens(ctx: ViewContext) -> None:
    st.subheader("Content or readability? The logit lens beside the learned lens")
    learned = {name: data.analysis_table(run, "lens") for name, run in ctx.runs.items()}
    learned = {name: t for name, t in learned.items() if len(t)}
    if not learned:
        st.info(f"No learned-lens tables in the selected runs: {HOW}.")
        return
    left, right = st.columns(2)
    metric = select(None, "Lens metric", LENS_METRICS_SHOWN, "lens_metric", default="top1_agree", container=left)
    splits = sorted(set().union(*(set(t["split"]) for t in learned.values())))
    split = select(None, "Split", splits, "lens_split", default="reference", container=right)
    steps = sorted(set().union(*(set(t["step"].astype(int)) for t in learned.values())))
    step = select(None, "Checkpoint step", steps, "lens_step", default=steps[-1])
    rows = {}
    for name, table in learned.items():
        mine = table[(table["metric"] == metric) & (table["split"] == split) & (table["step"] == step)
                     & (table["layer"] >= 1)]
        logit, _ = data.metric_rows(ctx.runs[name], "analyzer", metric=[metric], split=[split], step=[step],
                                    head=[-1], ref_layer=[-1])
        logit = logit[logit["layer"] >= 1].assign(lens="logit")
        if len(mine) or len(logit):
            rows[name] = pd.concat([logit, mine], ignore_index=True)
    if not rows:
        st.info(f"No {metric} on split {split} at step {step}.")
        return
    st.plotly_chart(figures.lens_comparison(rows, metric), key="lens_comparison")
    st.caption("The learned lens maps layer l affinely onto the final block's output space before the same final "
               "norm and unembedding (fitted per checkpoint, cross-fitted by prompt). Agreement the logit lens "
               "gains and the learned lens does not is readability, not content.")
    download_csv(pd.concat(rows.values(), ignore_index=True), f"lens-{metric}.csv")


def _patching(ctx: ViewContext) -> None:
    st.subheader("Where did training change the computation? Patching from the start model")
    tables = {name: data.analysis_table(run, "patch") for name, run in ctx.runs.items()}
    tables = {name: t for name, t in tables.items() if len(t)}
    if not tables:
        st.info(f"No patching tables in the selected runs: {HOW}.")
        return
    metric = select(None, "Patching metric", ["patch_recovered", "patch_recovered_logp"], "patch_metric",
                    default="patch_recovered", widget="radio", horizontal=True)
    steps = sorted(set().union(*(set(t["step"].astype(int)) for t in tables.values())))
    step = select(None, "Checkpoint step", steps, "patch_step", default=steps[-1])
    at_step = {name: t[(t["step"] == step) & (t["metric"] == metric)] for name, t in tables.items()}
    at_step = {name: t for name, t in at_step.items() if len(t)}
    if at_step:
        st.plotly_chart(figures.patch_curves(at_step, metric), key="patch_curves")
    notes = []
    for name, t in tables.items():
        base = t[(t["metric"] == "patch_kl_base") & (t["step"] == step)]["value"]
        if len(base):
            notes.append(f"`{name}`: KL(checkpoint || start) = {float(base.iloc[0]):.4g} nats")
    st.caption("Run the start model with one activation replaced, at every position, by the checkpoint's: the "
               "share of the checkpoint's change it reproduces. The block curve rises where the change lives; "
               "a share is undefined (not drawn) where the checkpoint did not change what it measures.  \n"
               + "  \n".join(notes))
    blocks = {name: figures.layer_step_matrix(t[(t["component"] == "block") & (t["metric"] == metric)])
              for name, t in tables.items()}
    blocks = {name: m for name, m in blocks.items() if m.size}
    if blocks:
        st.plotly_chart(figures.layer_checkpoint_heatmaps(blocks, metric), key="patch_heatmaps")
    download_csv(pd.concat(tables.values(), ignore_index=True), "patching.csv")
