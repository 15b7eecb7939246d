"""Attention view: the layer x layer similarity matrix, per-head JSD, head matching."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, figures
from app.state import ViewContext, download_csv, select

ATTENTION_METRICS = ("attn_js", "attn_js_final", "attn_head_match", "attn_head_identity",
                     "attn_entropy", "bos_mass")


def attention_rows(table: pd.DataFrame, step: int, split: str | None) -> pd.DataFrame:
    """The attention metric rows of one checkpoint (and split)."""
    rows = table[(table["step"] == step) & table["metric"].isin(ATTENTION_METRICS)]
    return rows if split is None else rows[rows["split"] == split]


def render(ctx: ViewContext) -> None:
    """Draw the attention-similarity figures of one run at one checkpoint."""
    st.header("Attention")
    if not ctx.runs:
        st.info("Select one or more runs in the sidebar.")
        return
    top = st.columns(4)
    name = select(None, "Run", list(ctx.runs), "attention_run", container=top[0])
    run = ctx.runs[name]
    sources = data.available_sources(run)
    if not sources:
        st.info(f"Run `{name}` has no built-in probes or analysis tables yet.")
        return
    source = select(ctx, "Source", sources, "source", container=top[1], format_func=data.SOURCES.get,
                    default="probe")
    catalog, messages = data.metric_catalog(run, source)
    for message in messages:
        st.error(f"Run `{name}`: {message}")
    catalog = catalog[catalog["metric"].isin(ATTENTION_METRICS)]
    steps = data.metric_steps(run, source)
    if catalog.empty or not steps:
        st.info(f"Run `{name}` has no attention metrics from the {data.SOURCES[source]}.")
        return
    step = select(ctx, "Checkpoint step", steps, "step", container=top[2], default=steps[-1])
    splits = sorted(catalog["split"].unique())
    split = select(None, "Split", splits, "attention_split", container=top[3], default="reference")
    # One checkpoint's attention rows of one split: only its file is opened.
    table, messages = data.metric_rows(run, source, step=[step], split=[split], metric=list(ATTENTION_METRICS))
    for message in messages:
        st.error(f"Run `{name}`: {message}")
    rows = attention_rows(table, step, split)

    left, right = st.columns(2)
    with left:
        matrix = rows[(rows["metric"] == "attn_js") & (rows["head"] == -1)].pivot_table(
            index="layer", columns="ref_layer", values="value", aggfunc="mean")
        if matrix.empty:
            st.info("No attn_js matrix at this checkpoint.")
        else:
            st.plotly_chart(figures.square_heatmap(
                matrix, f"JSD(mean_h a^l, mean_h a^m), step {step} (lower = more similar)", "layer m", "layer l",
                zmin=0.0, colorbar="JSD"), key="attention_matrix")
    with right:
        per_head = rows[(rows["metric"] == "attn_js_final") & (rows["head"] >= 0)].pivot_table(
            index="layer", columns="head", values="value", aggfunc="mean")
        if per_head.empty:
            st.info("No per-head attn_js_final at this checkpoint.")
        else:
            st.plotly_chart(figures.square_heatmap(
                per_head, f"Per-head JSD(a^l_h, a^L_h) to the final layer, step {step}", "head", "layer",
                zmin=0.0, colorbar="JSD"), key="attention_heads")
    matching = rows[rows["metric"].isin(["attn_head_match", "attn_head_identity"])]
    if len(matching):
        st.plotly_chart(figures.head_matching_bars(matching), key="attention_matching")
    else:
        st.info("No head matching (attn_head_match / attn_head_identity) at this checkpoint.")
    download_csv(rows, f"attention-{name}-step{step}.csv")
