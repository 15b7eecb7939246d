"""Runs view: every run under the root with method, status, steps, accuracy, provenance."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data
from app.state import ViewContext, download_csv


def runs_table(ctx: ViewContext) -> pd.DataFrame:
    """One row per run under the root, broken ones included with their error."""
    rows = [data.runs_table_row(name, run) for name, run in ctx.all_runs.items()]
    rows += [{"run": name, "status": "unreadable", "error": error} for name, error in ctx.broken.items()]
    table = pd.DataFrame(rows)
    if "error" not in table.columns:
        table["error"] = None
    return table.sort_values("run", ignore_index=True) if len(table) else table


def render(ctx: ViewContext) -> None:
    """Draw the runs table, the broken runs' errors and the selected runs' provenance."""
    st.header("Runs")
    st.caption(f"Runs root: `{ctx.root}`. Pick runs in the sidebar; every view shows the selected runs.")
    table = runs_table(ctx)
    if table.empty:
        st.info(f"No run folders (folders with a run.json) under {ctx.root}.")
        return
    st.dataframe(
        table, hide_index=True, width="stretch",
        column_config={
            "accuracy": st.column_config.NumberColumn("last accuracy", format="%.3f"),
            "eval/accuracy": st.column_config.NumberColumn("last eval/accuracy", format="%.3f"),
        },
    )
    for name, error in ctx.broken.items():
        st.error(f"Run `{name}` cannot be read: {error}")
    download_csv(table, "runs.csv")

    for name, run in ctx.runs.items():
        with st.expander(f"Provenance of {name}", expanded=len(ctx.runs) == 1):
            left, right = st.columns(2)
            with left:
                st.markdown("**Versions, seed, host**")
                st.json({k: run.info.get(k) for k in ("versions", "seed", "start_time", "end_time", "host",
                                                      "pid", "status", "error", "probe_set_hash", "resumes")
                         if k in run.info}, expanded=True)
            with right:
                st.markdown("**Config**")
                st.json(run.config, expanded=1)
            _, messages = data.metrics(run)
            for message in messages:
                st.warning(message)
