"""Training view: curves of reward, accuracy, entropy, loss terms, schedules and KL."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, figures
from app.state import ViewContext, download_csv

# The names of docs/objectives.md, in the order a reader scans them. grad_share/<term>: each
# loss term's share of the gradient norm (0 = the term does nothing to the parameters).
DEFAULT_KEYS = ["reward", "accuracy", "eval/accuracy", "entropy", "kl", "loss/policy", "loss/think",
                "loss/attn", "loss/opd", "loss/ref_kl", "grad_share/policy", "grad_share/think",
                "grad_share/attn", "grad_share/opd", "grad_share/ref_kl", "sched/beta", "sched/lambda"]
HIDDEN = {"step", "time"}
# Panels drawn before the user picks: the browser's cost grows with every panel of every run
# (6 runs x 8 panels took about half a second to draw); the rest are one click away.
DEFAULT_PANELS = 4


def curves_table(tables: dict[str, pd.DataFrame], keys: list[str]) -> pd.DataFrame:
    """The tidy table behind the curves: ``run, step, metric, value``."""
    parts = []
    for name, table in tables.items():
        present = [k for k in keys if k in table.columns]
        if not present:
            continue
        long = table[["step", *present]].melt(id_vars="step", var_name="metric", value_name="value")
        parts.append(long.dropna(subset=["value"]).assign(run=name))
    if not parts:
        return pd.DataFrame(columns=["run", "step", "metric", "value"])
    return pd.concat(parts, ignore_index=True)[["run", "step", "metric", "value"]]


def render(ctx: ViewContext) -> None:
    """Draw the selected runs' training curves, overlaid, one panel per metric."""
    st.header("Training")
    if not ctx.runs:
        st.info("Select one or more runs in the sidebar.")
        return
    tables = {}
    for name, run in ctx.runs.items():
        table, messages = data.metrics(run)
        for message in messages:
            st.warning(f"{name}: {message}")
        if len(table):
            tables[name] = table
        else:
            st.info(f"Run `{name}` has no training metrics yet.")
    if not tables:
        return
    columns = sorted({c for t in tables.values() for c in t.columns} - HIDDEN)
    defaults = ([k for k in DEFAULT_KEYS if k in columns] or columns)[:DEFAULT_PANELS]
    keys = st.multiselect("Metrics", columns, default=defaults, key="training_keys",
                          help="One panel per metric; loss terms, gradient shares and schedules are in the list.")
    smooth = st.slider("Smoothing (rolling mean over steps)", 1, 50, 1, key="training_smooth")
    if not keys:
        st.info("Pick at least one metric.")
        return
    figure = data.cached_figure("training_curves", (tuple(data.metrics_key(ctx.runs[n]) for n in tables),
                                                    tuple(keys), smooth),
                                lambda: figures.training_curves(tables, keys, smooth=smooth))
    st.plotly_chart(figure, key="training_curves")
    download_csv(lambda: curves_table(tables, keys), "training.csv")
