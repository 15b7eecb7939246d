"""Drill-down view: one probe prompt's logit-lens grid and attention maps."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import data, figures
from app.state import ViewContext, download_csv, select

# The view's sections, one drawn at a time (the URL's ``drilldown_show``).
LENS, ATTENTION, SIDE_BY_SIDE = "Logit lens", "Attention maps", "Side by side: two checkpoints or models"
SECTIONS = [LENS, ATTENTION, SIDE_BY_SIDE]


def head_rows(attn: pd.DataFrame, layer: int, head: int) -> pd.DataFrame:
    """Attention rows of one layer for one head, or the mean over heads (``head = -1``).

    The analyzer stores the mean over heads as ``head = -1``; when a table lacks it,
    the mean is taken here.
    """
    rows = attn[attn["layer"] == layer]
    if head >= 0 or (rows["head"] == -1).any():
        return rows[rows["head"] == head]
    return rows[rows["head"] >= 0].groupby(["query", "key"], as_index=False)["weight"].mean()


def pair_problem(records_a: list[dict], records_b: list[dict], prompt: int,
                 fingerprints: tuple[str | None, str | None] = (None, None)) -> str | None:
    """Why two checkpoints cannot be compared cell by cell on ``prompt`` (None when they can).

    They need the same tokenizer (the fingerprints that ``oisd probe --out`` records, where
    both have one) and the same token sequence at this prompt: the same prompt ids and the
    same teacher-forced reference (free prompts without references are scored on each
    model's own completion, whose positions need not match).
    """
    a_print, b_print = fingerprints
    if a_print and b_print and a_print != b_print:
        return "the two models have different tokenizers: their lens grids cannot be compared cell by cell"
    if not (0 <= prompt < len(records_a) and 0 <= prompt < len(records_b)):
        return f"probe prompt {prompt} is not in both probe sets"
    a, b = records_a[prompt], records_b[prompt]
    if list(a["prompt_ids"]) != list(b["prompt_ids"]):
        return f"probe prompt {prompt} is tokenised differently in the two (different tokenizers or prompts)"
    if not a.get("reference_ids") or list(a.get("reference_ids") or []) != list(b.get("reference_ids") or []):
        return (f"probe prompt {prompt} has no shared teacher-forced reference: each side reads its own "
                "completion, so positions do not line up")
    return None


def _prompt_label(records: list[dict], prompt: int) -> str:
    if 0 <= prompt < len(records):
        text = str(records[prompt].get("prompt", "")).replace("\n", " ")
        return f"#{prompt}: {text[:70]}"
    return f"#{prompt}"


def render(ctx: ViewContext) -> None:
    """Draw one section for one prompt at one checkpoint: its logit-lens grid, its attention
    maps, or its lens grid beside another checkpoint's or model's."""
    st.header("Drill-down")
    if not ctx.runs:
        st.info("Select one or more runs in the sidebar.")
        return
    top = st.columns(3)
    name = select(None, "Run", list(ctx.runs), "drilldown_run", container=top[0])
    run = ctx.runs[name]
    steps = data.analysed_steps(run, "topk")
    if not steps:
        st.info(f"Run `{name}` has no per-prompt detail yet (run `oisd probe {run.path}`).")
        return
    step = select(ctx, "Checkpoint step", steps, "step", container=top[1], default=steps[-1])
    prompts = data.detail_prompts(run, step)
    records = data.probe_set(run)
    prompt = select(ctx, "Probe prompt", prompts, "prompt", container=top[2],
                    format_func=lambda p: _prompt_label(records, p))
    if prompt is None:
        st.info(f"No prompts in the detail of step {step}.")
        return
    if 0 <= prompt < len(records):
        record = records[prompt]
        st.markdown(f"**Prompt** `{record.get('prompt', '')}` \u2192 **reference** `{record.get('reference', '')}`")

    # One section at a time: the browser draws only what the user looks at (the lens grid,
    # attention maps and three more grids together took two seconds to draw).
    show = select(ctx, "Show", SECTIONS, "drilldown_show", widget="radio", horizontal=True)
    if show == ATTENTION:
        _attention_maps(ctx, name, run, steps, step, prompt)
        return
    topk, topk_messages = data.detail(run, step, "topk", prompt)
    cells, cell_messages = data.detail(run, step, "cells", prompt)
    for message in topk_messages + cell_messages:
        st.error(message)
    lens_metrics = sorted(set(cells.loc[cells["layer"] >= 1, "metric"])) if len(cells) else []
    metric = select(ctx, "Colour by", ["top-1 prob", *lens_metrics], "metric",
                    default="lens_kl" if "lens_kl" in lens_metrics else "top-1 prob")
    if show == SIDE_BY_SIDE:
        _side_by_side(ctx, name, run, step, prompt, records, metric, topk, cells)
        return
    if len(topk):
        colour = None if metric == "top-1 prob" else metric
        key = (data.detail_key(run, step, "topk"), data.detail_key(run, step, "cells"), prompt, colour)
        # An HTML table, not a Plotly heat map: the browser lays it out in milliseconds, where
        # the heat map with a token in each of 576 cells took 0.2-0.3 s per draw.
        st.html(data.cached_figure("lens_table", key, lambda: figures.lens_table(
            figures.lens_grid_content(topk, cells, colour), "drilldown_grid")))
        if metric != "top-1 prob":
            st.caption(f"{figures.metric_label(metric)}; {figures.metric_direction(metric)}. "
                       "Hover a cell for the top-k tokens with their probabilities.")
    else:
        st.info("No top-k table for this prompt.")
    left, right = st.columns(2)
    with left:
        download_csv(topk, f"logit-{name}-step{step}-prompt{prompt}.csv", label="Download the top-k table (CSV)")
    with right:
        download_csv(cells, f"cells-{name}-step{step}-prompt{prompt}.csv", label="Download the cells table (CSV)")


def _attention_maps(ctx: ViewContext, name: str, run, steps: list[int], step: int, prompt: int) -> None:
    """One layer's attention map beside the final layer's and beside the same layer's at another
    step, the three on one colour scale."""
    shape = data.attention_shape(run, step, prompt)
    if shape is None:
        st.info(f"No attention detail at step {step}.")
        return
    layers, heads = shape.layers, shape.heads
    final = layers[-1]
    controls = st.columns(3)
    layer = select(ctx, "Layer", layers, "layer", container=controls[0], default=layers[0])
    head = select(None, "Head", [-1, *heads], "drilldown_head", container=controls[1],
                  format_func=lambda h: "mean over heads" if h == -1 else f"head {h}")
    other_steps = [s for s in steps if s != step] or steps
    step_b = select(None, "Compare with step", other_steps, "drilldown_step_b", container=controls[2],
                    default=other_steps[0])
    # Only the chosen layer and the final one are read (the table holds every layer and head).
    attn, attn_messages = data.detail(run, step, "attn", prompt, layers=[layer, final])
    for message in attn_messages:
        st.error(message)
    if attn.empty:
        st.info(f"No attention detail of prompt {prompt} at step {step}.")
        return
    download_csv(attn, f"attention-{name}-step{step}-prompt{prompt}.csv")
    if shape.top_k is not None:
        st.caption(f"Each query shows its {shape.top_k} heaviest keys, which hold {shape.mass_kept:.0%} of its "
                   "attention on average (the model's depth, heads and length exceed the table's budget; "
                   "`workbench.analysis.analyzer.ATTN_DETAIL_ROWS`).")
    cells, _ = data.detail(run, step, "cells", prompt)
    tokens = {int(p): t for p, t in cells.drop_duplicates("position")[["position", "token"]].itertuples(index=False)}
    head_text = "mean over heads" if head == -1 else f"head {head}"
    attn_b, messages_b = data.detail(run, step_b, "attn", prompt, layers=[layer])
    for message in messages_b:
        st.error(message)

    def build():  # the figure, built once per key
        maps = [(head_rows(attn, layer, head), f"Layer {layer}, step {step}"),
                (head_rows(attn, final, head), f"Final layer {final}, step {step}")]
        rows_b = head_rows(attn_b, layer, head) if len(attn_b) else attn_b
        if len(rows_b):
            maps.append((rows_b, f"Layer {layer}, step {step_b}"))
        return figures.attention_maps(maps, tokens, title=f"Attention weights, {head_text}")

    key = (data.detail_key(run, step, "attn"), data.detail_key(run, step_b, "attn"), data.detail_key(run, step, "cells"),
           prompt, layer, head)
    # One row, one colour scale: the layer, the final layer, the same layer at the other step
    # (the layer's map at this step is the left one of both comparisons).
    figure = data.cached_figure("attention_maps", key, build)
    st.plotly_chart(figure, key="drilldown_attention")
    if len(figure.data) < 3:
        st.info(f"No attention detail of prompt {prompt} at step {step_b}.")


def _side_by_side(ctx: ViewContext, name: str, run, step: int, prompt: int, records: list[dict], metric: str,
                  topk: pd.DataFrame, cells: pd.DataFrame) -> None:
    """Lens grid A (the checkpoint above), lens grid B (another checkpoint of any selected
    run, or another model's analysis folder), and A minus B."""
    choices = [(n, s) for n, r in ctx.runs.items() for s in data.analysed_steps(r, "topk") if (n, s) != (name, step)]
    if not choices:
        st.info("Select another run (or a run with another analysed checkpoint) to compare with.")
        return
    # Default partner: another run at the same step (another model), else another step of this run.
    same_step = [c for c in choices if c[1] == step and c[0] != name]
    other_name, other_step = select(None, "Compare with", choices, "drilldown_pair",
                                    format_func=lambda c: f"{c[0]}, step {c[1]}",
                                    default=(same_step or choices)[0])
    other = ctx.runs[other_name]
    problem = pair_problem(records, data.probe_set(other), prompt,
                           (run.info.get("tokenizer_fingerprint"), other.info.get("tokenizer_fingerprint")))
    topk_b, _ = data.detail(other, other_step, "topk", prompt)
    cells_b, _ = data.detail(other, other_step, "cells", prompt)
    colour = None if metric == "top-1 prob" else metric
    grids = [figures.lens_grid_content(topk, cells, colour)]
    if len(topk_b):  # one colour scale for both: a colour is the same value in A and in B
        grids = figures.on_one_scale(*grids, figures.lens_grid_content(topk_b, cells_b, colour))
    st.caption(f"A: {name}, step {step}" + (" (A and B share one colour scale)" if len(grids) == 2 else ""))
    st.html(figures.lens_table(grids[0], "drilldown_grid_a"))
    st.caption(f"B: {other_name}, step {other_step}")
    if len(grids) == 2:
        st.html(figures.lens_table(grids[1], "drilldown_grid_b"))
    else:
        st.info(f"No detail of prompt {prompt} at {other_name}, step {other_step}.")
    if problem:
        st.error(f"No difference grid: {problem}.")
    elif len(topk_b):
        st.html(figures.lens_table(figures.lens_difference_content(
            (topk, cells), (topk_b, cells_b), colour, f"{name}@{step}", f"{other_name}@{other_step}"),
            "drilldown_grid_diff"))
