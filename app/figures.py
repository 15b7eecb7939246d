"""Plotly figures built from the workbench's tidy tables (no Streamlit here).

Each function takes the rows it plots (``METRIC_COLUMNS``, ``TOPK_COLUMNS``, ...
from ``workbench.storage.schema``) and returns a ``plotly.graph_objects.Figure``, so the
notebooks can draw the same pictures as the dashboard.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import get_colorscale, qualitative, sample_colorscale
from plotly.subplots import make_subplots

from workbench.storage.schema import METRIC_INFO

PALETTE = qualitative.Plotly
SEQUENTIAL = "Viridis"
DIVERGING = "RdBu_r"
# Metrics whose larger value means "closer to the final layer / better": their heat
# maps are drawn with the scale reversed so that "good" is always the same colour.
HIGHER_IS_CLOSER = {"top1_agree"}
_FONT = dict(size=13)
# Margins are computed here, from the tick labels, and axis automargin is off. Streamlit's
# Plotly theme turns automargin on for every axis; Plotly then draws a figure, measures its
# tick labels, widens the margins and draws it again, each of the two or three times Streamlit draws
# the figure per view switch: the training view's figure took 0.34 s to appear instead of
# 0.25 s (measured 2026-12-07). A tick label is at most _CHAR_PX pixels per character at the
# theme's 12 px tick font (digits and Latin letters are 6-7), a number's at most
# _NUMBER_CHARS characters (Plotly's "-0.0004", "1.25k"). Legends and colour bars still widen
# the margins themselves: Plotly places them before the axes, without a second draw.
_CHAR_PX, _NUMBER_CHARS, _TICKS_PX, _TITLE_PX, _PAD_PX = 7, 7, 20, 22, 10


def metric_label(metric: str) -> str:
    """A metric's name with its definition, as written on every plot of it.

    ``lens_kl`` names its direction, KL(p^L || p^l) (the tuned-lens direction),
    because the opposite direction is also common in the literature.
    """
    if metric == "lens_kl":
        return "lens_kl = KL(p^L || p^l), tuned-lens direction"
    definition = METRIC_INFO.get(metric, (None, None))[0]
    return f"{metric} = {definition}" if definition else metric


def metric_direction(metric: str) -> str:
    """How to read the metric ("lower = closer to final layer", ...), or ``""``."""
    return METRIC_INFO.get(metric, ("", ""))[1]


def display_token(token: object) -> str:
    """A token as a short visible label (whitespace made visible, None as ``?``)."""
    if token is None or (isinstance(token, float) and math.isnan(token)):
        return "?"
    text = str(token)
    return text.replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def _grid(n: int, max_cols: int = 2) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols


# ---------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------


# A curve longer than this is drawn from the minimum and maximum of each of MAX_CURVE_POINTS / 2
# buckets of steps: a panel is a few hundred pixels wide (about 550 px in two columns), so a
# bucket spans about 2 px and nothing visible is lost (a spike stays: it is its bucket's
# extreme), and the browser draws a fixed number of points however long the run (the CSV
# download keeps every step). 1,000 points cost the browser a quarter more than 300 (6 runs x
# 8 panels, measured 2026-12-06).
MAX_CURVE_POINTS = 500


def _tick_chars(labels: object) -> int:
    """Characters of the longest tick label (markup such as ``<b>`` not counted)."""
    return max((len(re.sub(r"<[^>]*>", "", str(label))) for label in labels), default=0)


def _fixed_margins(fig: go.Figure, *, top: int = 60, y_labels: object = None,
                   x_upright_labels: object = None) -> go.Figure:
    """Set ``fig``'s margins from its tick labels and axis titles and turn automargin off.

    Args:
        top: Room for the title (and subplot titles) above the plot.
        y_labels: The y axis's tick labels where they are words; ``None``: numbers.
        x_upright_labels: The x axis's tick labels where they are words turned a quarter
            (``tickangle=-90``); ``None``: one line of horizontal labels.
    """
    y_title = any(axis.title.text for axis in fig.select_yaxes())
    x_title = any(axis.title.text for axis in fig.select_xaxes())
    y_chars = _tick_chars(y_labels) if y_labels is not None else _NUMBER_CHARS
    x_ticks = _CHAR_PX * _tick_chars(x_upright_labels) if x_upright_labels is not None else _TICKS_PX
    fig.update_xaxes(automargin=False)
    fig.update_yaxes(automargin=False)
    fig.update_layout(font=_FONT, margin=dict(
        t=top, r=20, l=_PAD_PX + _CHAR_PX * y_chars + (_TITLE_PX if y_title else 0),
        b=_PAD_PX + x_ticks + (_TITLE_PX if x_title else 0)))
    return fig


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as at most about ``max_points`` points: each of ``max_points // 2`` equal
    buckets keeps its minimum and its maximum, in step order; a shorter curve is returned
    as it is."""
    x, y = np.asarray(x), np.asarray(y, dtype=float)
    n = len(y)
    if n <= max_points:
        return x, y
    edges = np.linspace(0, n, max(1, max_points // 2) + 1).astype(int)
    bucket = np.searchsorted(edges, np.arange(n), side="right") - 1
    starts = np.flatnonzero(np.diff(bucket, prepend=-1))  # first position of each non-empty bucket
    ends = np.append(starts[1:], n) - 1
    order = np.arange(n)
    # Sorted by bucket, then value: a bucket's first entry is its minimum, its last its maximum
    # (ties: the earliest step, as np.argmin and np.argmax take).
    lowest = np.lexsort((order, y, bucket))[starts]
    highest = np.lexsort((-order, y, bucket))[ends]
    index = np.unique(np.concatenate([lowest, highest]))  # in step order
    return x[index], y[index]


def training_curves(tables: dict[str, pd.DataFrame], keys: list[str], smooth: int = 1) -> go.Figure:
    """One panel per metrics.jsonl key, every run overlaid in its own colour.

    Args:
        tables: Run name -> metrics table (``step`` plus the names of docs/objectives.md).
        keys: The columns to plot, one panel each.
        smooth: Trailing rolling-mean window in steps (1 = raw values).
    """
    rows, cols = _grid(len(keys))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=keys, horizontal_spacing=0.08,
                        vertical_spacing=min(0.12, 0.5 / max(rows, 1)))
    traces, at_rows, at_cols = [], [], []
    for i, (name, table) in enumerate(tables.items()):
        colour = PALETTE[i % len(PALETTE)]
        for j, key in enumerate(keys):
            if key not in table.columns:
                continue
            series = pd.to_numeric(table[key], errors="coerce")
            keep = series.notna()
            y = series[keep].rolling(smooth, min_periods=1).mean() if smooth > 1 else series[keep]
            x, y = decimate(table["step"][keep].to_numpy(), y.to_numpy())
            traces.append(go.Scatter(x=x, y=y, mode="lines", name=name, legendgroup=name,
                                     showlegend=j == 0, line=dict(color=colour)))
            at_rows.append(j // cols + 1)
            at_cols.append(j % cols + 1)
    if traces:  # one call: plotly validates the figure once, not once per trace
        fig.add_traces(traces, rows=at_rows, cols=at_cols)
    fig.update_xaxes(title_text="step", row=rows)  # the bottom row's: above, it would cover the titles below
    fig.update_layout(height=max(320, 260 * rows),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02 + 0.02 * rows, x=0))
    return _fixed_margins(fig, top=40)


# ---------------------------------------------------------------------------
# Layer x checkpoint
# ---------------------------------------------------------------------------


def layer_step_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Pivot per-layer values to a ``(layers, steps)`` frame (index layer, columns step)."""
    return rows.pivot_table(index="layer", columns="step", values="value", aggfunc="mean").sort_index()


def _heatmap(matrix: pd.DataFrame, **kwargs) -> go.Heatmap:
    """A heat map of ``matrix`` at its numeric labels (checkpoint steps across, layers down)."""
    return go.Heatmap(
        z=matrix.to_numpy(dtype=float), x=matrix.columns.to_numpy(), y=matrix.index.to_numpy(),
        hovertemplate="step %{x}<br>layer %{y}<br>%{z:.4g}<extra></extra>", **kwargs,
    )


def _layer_dtick(n_layers: int) -> int:
    """Whole-layer tick spacing for a numeric layer axis: every layer up to 12, then every
    few (plotly would otherwise tick 4 layers at 1, 1.5, 2, ...)."""
    return max(1, math.ceil(n_layers / 12))


def stack_row(run: str, row: object, row_title: str) -> str:
    """The y label of one run's row in :func:`_heatmap_stack` (what hover shows)."""
    return f"{run}, {row_title} {row}"


def _heatmap_stack(matrices: dict[str, pd.DataFrame], *, title: str, row_title: str, coloraxis: dict) -> go.Figure:
    """Every run's (rows x steps) matrix in one heat map on one colour axis: the runs stacked
    top to bottom in order (each with its first row at the bottom, blank rows between two
    runs), one shared checkpoint-step axis, the run's name at the middle of its rows.

    One heat map rather than one subplot per run: Streamlit draws a figure two or three
    times, and each subplot's heat map is its own canvas and axes; six runs in one trace cost
    the browser about half as much (measured 2026-12-06). A row's label (:func:`stack_row`) names the run
    and the row on hover.
    """
    steps = sorted(set().union(*(set(m.columns) for m in matrices.values()))) if matrices else []
    # Blank rows between two runs: one per 12 rows of the tallest run (the layer-tick rule), so
    # that one run's top tick and the next one's bottom tick do not overlap.
    gap = _layer_dtick(max((len(m.index) for m in matrices.values()), default=1))
    blocks, labels, ticks = [], [], {}
    for i, (name, matrix) in enumerate(reversed(list(matrices.items()))):  # category axis: bottom first
        if i:
            blocks.append(np.full((gap, len(steps)), np.nan))
            labels.extend(" " * (gap * (i - 1) + k + 1) for k in range(gap))  # blank, unique categories
        rows = [stack_row(name, r, row_title) for r in matrix.index]
        blocks.append(matrix.reindex(columns=steps).to_numpy(dtype=float))
        labels.extend(rows)
        if rows:
            marks = {0: str(matrix.index[0]), len(rows) - 1: str(matrix.index[-1])}
            middle = len(rows) // 2
            marks[middle] = f"<b>{name}</b>" + (f" {marks[middle]}" if middle in marks else "")
            ticks.update({rows[k]: text for k, text in marks.items()})
    z = np.vstack(blocks) if blocks else np.zeros((0, 0))
    fig = go.Figure(go.Heatmap(z=z, x=np.asarray(steps), y=labels, coloraxis="coloraxis",
                               hovertemplate="%{y}<br>step %{x}<br>%{z:.4g}<extra></extra>"))
    fig.update_xaxes(title_text="checkpoint step")
    fig.update_yaxes(title_text=row_title, type="category", tickvals=list(ticks), ticktext=list(ticks.values()))
    fig.update_layout(title=dict(text=title, font=dict(size=14)), coloraxis=coloraxis,
                      height=max(320, 110 + int(4.5 * len(labels))))
    return _fixed_margins(fig, y_labels=ticks.values())


def _finite_range(matrices: dict[str, pd.DataFrame]) -> tuple[float, float] | None:
    values = [m.to_numpy(dtype=float) for m in matrices.values() if m.size]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    return (float(finite.min()), float(finite.max())) if finite.size else None


def _symmetric_bound(diff: pd.DataFrame) -> float:
    """The largest absolute value of a difference (1 when there is none): its colour scale runs
    from minus it to it, white at 0."""
    bound = float(np.nanmax(np.abs(diff.to_numpy(dtype=float)))) if diff.size else 1.0
    return bound if bound > 0 and math.isfinite(bound) else 1.0


def layer_checkpoint_heatmaps(matrices: dict[str, pd.DataFrame], metric: str) -> go.Figure:
    """Each run's layer x checkpoint heat map, stacked in one figure on one shared colour scale.

    Args:
        matrices: Run name -> :func:`layer_step_matrix` of the metric.
        metric: The metric name (written with its definition on the figure).
    """
    cmin, cmax = _finite_range(matrices) or (0.0, 1.0)
    return _heatmap_stack(matrices, title=metric_label(metric), row_title="layer", coloraxis=dict(
        colorscale=SEQUENTIAL, cmin=cmin, cmax=cmax, reversescale=metric in HIGHER_IS_CLOSER,
        colorbar=dict(title=dict(text=metric, side="right"))))


def drift_matrix(drift: pd.DataFrame) -> pd.DataFrame:
    """Block x checkpoint matrix of ``rel_change`` (rows: embeddings, blocks 1..L, final norm,
    head, in model order) from a run's drift table (kind ``all``)."""
    rows = drift[drift["kind"] == "all"]
    labels = {"embeddings": "embeddings", "final_norm": "final norm", "head": "head", "other": "other"}
    rows = rows.assign(label=[labels.get(m, str(b)) if m != "block" else str(b)
                              for m, b in zip(rows["module"], rows["block"])])
    order = rows.drop_duplicates("label").sort_values("block")["label"].tolist()
    matrix = rows.pivot_table(index="label", columns="step", values="rel_change", aggfunc="first")
    return matrix.reindex(order)


def drift_heatmaps(matrices: dict[str, pd.DataFrame]) -> go.Figure:
    """Each run's block x checkpoint heat map of the weights' relative change from the start,
    stacked in one figure on one shared colour scale from 0."""
    top = (_finite_range(matrices) or (0.0, 1.0))[1]
    return _heatmap_stack(
        matrices, title="Weight drift: ||W_t - W_0|| / ||W_0|| per block (higher = moved more)", row_title="block",
        coloraxis=dict(colorscale=SEQUENTIAL, cmin=0.0, cmax=top if top > 0 else 1.0,
                       colorbar=dict(title=dict(text="rel. change", side="right"))))


def difference_heatmap(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str, metric: str) -> go.Figure:
    """The heat map of ``a - b`` on the layers and steps both runs have (white = 0)."""
    diff = layer_step_matrix_difference(a, b)
    bound = _symmetric_bound(diff)
    fig = go.Figure(_heatmap(diff, colorscale=DIVERGING, zmid=0.0, zmin=-bound, zmax=bound,
                             colorbar=dict(title=dict(text=f"\u0394 {metric}", side="right"))))
    fig.update_xaxes(title_text="checkpoint step")
    fig.update_yaxes(title_text="layer", dtick=_layer_dtick(len(diff.index)))
    fig.update_layout(title=dict(text=f"{name_a} minus {name_b}: {metric_label(metric)}", font=dict(size=14)),
                      height=320)
    return _fixed_margins(fig)


def layer_step_matrix_difference(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """``a - b`` of two :func:`layer_step_matrix` frames on their common layers and steps."""
    layers = a.index.intersection(b.index)
    steps = a.columns.intersection(b.columns)
    return a.loc[layers, steps] - b.loc[layers, steps]


def step_lines(series: dict[str, pd.DataFrame], metric: str) -> go.Figure:
    """Per-step values (one per checkpoint, e.g. ``prediction_depth``), one line per run."""
    fig = go.Figure()
    for i, (name, rows) in enumerate(series.items()):
        rows = rows.groupby("step", as_index=False)["value"].mean()
        fig.add_trace(go.Scatter(x=rows["step"], y=rows["value"], mode="lines+markers", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_layout(title=dict(text=metric_label(metric), font=dict(size=14)), xaxis_title="checkpoint step",
                      yaxis_title=metric, height=340)
    return _fixed_margins(fig)


# ---------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------


def square_heatmap(matrix: pd.DataFrame, title: str, x_title: str, y_title: str, *,
                   zmin: float | None = None, zmax: float | None = None, colorbar: str = "") -> go.Figure:
    """A heat map of ``matrix`` (index on y, top to bottom; columns on x)."""
    fig = go.Figure(go.Heatmap(
        z=matrix.to_numpy(dtype=float), x=[str(c) for c in matrix.columns], y=[str(i) for i in matrix.index],
        colorscale=SEQUENTIAL, zmin=zmin, zmax=zmax, colorbar=dict(title=dict(text=colorbar, side="right")),
        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{z:.4g}}<extra></extra>",
    ))
    fig.update_xaxes(title_text=x_title, type="category")
    fig.update_yaxes(title_text=y_title, type="category", autorange="reversed")
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=380)
    return _fixed_margins(fig, y_labels=[str(i) for i in matrix.index])


def head_matching_bars(rows: pd.DataFrame) -> go.Figure:
    """Matched (Hungarian) vs identity-matched head JSD to the final layer, per layer."""
    fig = go.Figure()
    for metric, label, colour in (("attn_head_identity", "identity (head h to head h)", PALETTE[1]),
                                  ("attn_head_match", "Hungarian matched", PALETTE[0])):
        part = rows[rows["metric"] == metric].groupby("layer", as_index=False)["value"].mean()
        fig.add_trace(go.Bar(x=part["layer"].astype(str), y=part["value"], name=label, marker_color=colour))
    fig.update_layout(barmode="group", title=dict(text="Head matching to the final layer: mean JSD (lower = more similar)",
                                                  font=dict(size=14)),
                      xaxis_title="layer", yaxis_title="mean JSD", height=340, legend=dict(orientation="h", y=-0.25))
    return _fixed_margins(fig)


def attention_map(rows: pd.DataFrame, title: str, tokens: dict[int, str] | None = None,
                  zmax: float | None = None) -> go.Figure:
    """Attention weights of one layer (and head selection): queries down, keys across.

    Args:
        rows: ``ATTN_COLUMNS`` rows of one (step, prompt, layer, head).
        title: Figure title.
        tokens: Position -> token label, used on the axes where known.
        zmax: Upper end of the colour scale (share it between maps to compare them).
    """
    return attention_maps([(rows, title)], tokens, zmax=zmax)


def attention_maps(maps: list[tuple[pd.DataFrame, str]], tokens: dict[int, str] | None = None, *,
                   title: str = "", zmax: float | None = None) -> go.Figure:
    """Attention maps side by side in one figure (queries down, on one axis; keys across), on
    one colour scale from 0 to ``zmax`` (default: the highest weight of any map), one colour bar.

    One figure rather than one per map: Streamlit draws every figure two or three times, and each
    figure is its own canvas, axes and colour bar (the drill-down's three maps, A/B in one
    browser: 2026-12-07, ``benchmarks/README.md``).

    Args:
        maps: ``(rows, subplot title)`` per map, left to right; ``rows``: ``ATTN_COLUMNS`` rows of
            one (step, prompt, layer, head selection).
        tokens: Position -> token label, used on the axes where known.
        title: Figure title (what the maps share, e.g. the head selection).
    """
    tokens = tokens or {}
    label = lambda p: f"{p} {display_token(tokens[p])}" if p in tokens else str(p)  # noqa: E731
    matrices = [rows.pivot_table(index="query", columns="key", values="weight", aggfunc="mean") for rows, _ in maps]
    if zmax is None:
        zmax = max((float(np.nanmax(m.to_numpy(dtype=float))) for m in matrices if m.size), default=1.0)
    fig = make_subplots(rows=1, cols=max(len(maps), 1), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[name for _, name in maps])
    keys, queries = [], []  # every map's tick labels, for the margins
    for i, matrix in enumerate(matrices):
        x, y = [label(k) for k in matrix.columns], [label(q) for q in matrix.index]
        keys += x
        queries += y
        fig.add_trace(go.Heatmap(z=matrix.to_numpy(dtype=float), x=x, y=y, coloraxis="coloraxis",
                                 hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"),
                      row=1, col=i + 1)
    fig.update_xaxes(title_text="key position", type="category", tickangle=-90)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_yaxes(title_text="query position", row=1, col=1)
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=420,
                      coloraxis=dict(colorscale="Blues", cmin=0.0, cmax=zmax,
                                     colorbar=dict(title=dict(text="weight", side="right"))))
    return _fixed_margins(fig, top=60 if title else 50, y_labels=queries, x_upright_labels=keys)


# ---------------------------------------------------------------------------
# Logit-lens grid
# ---------------------------------------------------------------------------


# A lens grid of more positions than this is drawn without the token in each cell (hover still
# shows the top-k): at the dashboard's width its cells are then under ~25 px, too narrow to
# read a token, and each written cell costs the browser about 0.1 ms per draw (576 cells:
# 60-110 ms of a view switch, measured 2026-12-06).
LENS_TEXT_MAX_POSITIONS = 48


# The lens grid's colour scale: the light two thirds of YlGnBu, so that one dark text colour
# reads on every cell (contrast 5.3:1 at its darkest; WCAG asks 4.5). Plotly otherwise picks black or white
# per cell, which cost the browser a third of the grid's drawing (measured 2026-12-06).
LENS_COLORSCALE = [[0.0, "#ffffd9"], [0.2, "#edf8b1"], [0.4, "#c7e9b4"], [0.6, "#7fcdbb"], [0.8, "#41b6c4"],
                   [1.0, "#1d91c0"]]
LENS_TEXT_COLOR = "#111111"


def _cell_text(text: np.ndarray, n_positions: int, size: int, color: str | None = None) -> dict:
    """The heat map arguments that write ``text`` in each cell (in ``color``; None: black or
    white by the cell's colour), or none for a wide grid."""
    if n_positions > LENS_TEXT_MAX_POSITIONS:
        return {}
    return dict(text=text, texttemplate="%{text}", textfont=dict(size=size, color=color))


@dataclass(frozen=True)
class LensGrid:
    """What a lens grid shows, drawn two ways: :func:`lens_grid_figure` (Plotly, the
    notebooks) and :func:`lens_table` (an HTML table, the dashboard).

    Attributes:
        z: the colour values, layers x positions (index: layers, ascending; columns: positions).
        text: the label written in each cell (same shape).
        hover: the extra lines shown on hover in each cell (the top-k tokens), or None.
        ticks: each position's label (``input -> target``), or None (the position).
        title: the grid's title.
        colour_title: what the colour is (the colour bar's title and the hover's name).
        colorscale: the colour scale; ``reversescale`` flips it.
        bounds: the scale's ``(zmin, zmax)``; None: the values' range.
        text_size: the cells' font size in the Plotly form.
        text_color: the cells' text colour in the Plotly form (None: black or white by cell).
    """

    z: pd.DataFrame
    text: np.ndarray
    hover: np.ndarray | None
    ticks: list[str] | None
    title: str
    colour_title: str
    colorscale: list | str
    reversescale: bool = False
    bounds: tuple[float, float] | None = None
    text_size: int = 16
    text_color: str | None = LENS_TEXT_COLOR


def lens_grid_content(topk: pd.DataFrame, cells: pd.DataFrame, metric: str | None) -> LensGrid:
    """The logit-lens grid of one prompt: layers x positions, the top-1 token in each cell, the
    top-k tokens with their probabilities on hover.

    Args:
        topk: ``TOPK_COLUMNS`` rows of one (step, prompt); ``k = 0`` is the top token.
        cells: ``CELL_COLUMNS`` rows of the same (step, prompt): metric values per
            (layer, position), plus the input token and the target at each position.
        metric: Cell metric to colour by; ``None`` colours by the top-1 probability.
    """
    ranked = topk.sort_values(["layer", "position", "k"])
    top1 = ranked.groupby(["layer", "position"]).first()
    text = top1["token"].map(display_token).unstack("position")
    hover = ranked.assign(item=[f"{display_token(t)}  {p:.3f}" for t, p in zip(ranked["token"], ranked["prob"])])
    hover = hover.groupby(["layer", "position"])["item"].agg("<br>".join).unstack("position")
    layers, positions = text.index, text.columns
    z = lens_cell_matrix(topk, cells, metric)
    colour_title = metric if metric is not None and metric in set(cells.loc[cells["layer"] >= 1, "metric"]) \
        else "top-1 prob"
    at_position = cells.drop_duplicates("position").set_index("position")

    def tick(p: int) -> str:
        if p not in at_position.index:
            return str(p)
        row = at_position.loc[p]
        return f"{display_token(row['token'])}\u2192{display_token(row['target'])}"

    title = metric_label(colour_title) if colour_title != "top-1 prob" else "top-1 probability"
    return LensGrid(
        z=z.reindex(index=layers, columns=positions), text=text.to_numpy(),
        hover=hover.reindex(index=layers, columns=positions).to_numpy(), ticks=[tick(p) for p in positions],
        title=f"Logit lens: top-1 token per layer; colour = {title}", colour_title=colour_title,
        colorscale=LENS_COLORSCALE, reversescale=colour_title in HIGHER_IS_CLOSER or colour_title == "top-1 prob")


def lens_grid(topk: pd.DataFrame, cells: pd.DataFrame, metric: str | None) -> go.Figure:
    """The logit-lens grid of one prompt (:func:`lens_grid_content`) as a Plotly heat map: layer 1
    at the bottom, the top-1 token written in each cell (up to ``LENS_TEXT_MAX_POSITIONS``
    positions), the top-k tokens with their probabilities on hover."""
    return lens_grid_figure(lens_grid_content(topk, cells, metric))


def lens_grid_figure(grid: LensGrid) -> go.Figure:
    """A :class:`LensGrid` as a Plotly heat map (the notebooks' form of the dashboard's table)."""
    positions, layers = [str(p) for p in grid.z.columns], [str(layer) for layer in grid.z.index]
    hover = "<br>top-k:<br>%{customdata}" if grid.hover is not None else ""
    bounds = dict(zmin=grid.bounds[0], zmax=grid.bounds[1]) if grid.bounds else {}
    fig = go.Figure(go.Heatmap(
        z=grid.z.to_numpy(dtype=float), x=positions, y=layers,
        **_cell_text(grid.text, len(positions), grid.text_size, grid.text_color),
        **({"customdata": grid.hover} if grid.hover is not None else {}),
        colorscale=grid.colorscale, reversescale=grid.reversescale, **bounds,
        colorbar=dict(title=dict(text=grid.colour_title, side="right")),
        hovertemplate=f"layer %{{y}}, position %{{x}}<br>{grid.colour_title} %{{z:.3g}}{hover}<extra></extra>",
    ))
    if grid.ticks is not None:
        fig.update_xaxes(title_text="position (input \u2192 target)", type="category", tickvals=positions,
                         ticktext=grid.ticks)
    else:
        fig.update_xaxes(title_text="position", type="category")
    fig.update_yaxes(title_text="layer", type="category")
    fig.update_layout(title=dict(text=grid.title, font=dict(size=14)), height=max(300, 60 + 42 * len(layers)))
    return _fixed_margins(fig, y_labels=layers)


def lens_cell_matrix(topk: pd.DataFrame, cells: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    """``(layers, positions)`` values of one lens grid: the cell metric, or the top-1 probability."""
    per_layer = cells[cells["layer"] >= 1]
    if metric is not None and metric in set(per_layer["metric"]):
        return per_layer[per_layer["metric"] == metric].pivot_table(index="layer", columns="position",
                                                                    values="value", aggfunc="mean")
    top1 = topk[topk["k"] == 0]
    return top1.pivot_table(index="layer", columns="position", values="prob", aggfunc="first")


def lens_difference_content(a: tuple[pd.DataFrame, pd.DataFrame], b: tuple[pd.DataFrame, pd.DataFrame],
                            metric: str | None, name_a: str, name_b: str) -> LensGrid:
    """A minus B of two lens grids of the same prompt and positions (white = 0). A cell's
    text is the top-1 token of A, or ``A|B`` where the two top-1 tokens differ."""
    za, zb = lens_cell_matrix(*a, metric), lens_cell_matrix(*b, metric)
    layers, positions = za.index.intersection(zb.index), za.columns.intersection(zb.columns)
    diff = za.loc[layers, positions] - zb.loc[layers, positions]
    tops = [t[t["k"] == 0].pivot_table(index="layer", columns="position", values="token", aggfunc="first")
            .reindex(index=layers, columns=positions) for t in (a[0], b[0])]
    text = [[display_token(x) if x == y else f"{display_token(x)}|{display_token(y)}"
             for x, y in zip(row_a, row_b)] for row_a, row_b in zip(tops[0].to_numpy(), tops[1].to_numpy())]
    bound = _symmetric_bound(diff)
    title = metric or "top-1 prob"
    return LensGrid(z=diff, text=np.array(text, dtype=object).reshape(diff.shape), hover=None, ticks=None,
                    title=f"{name_a} minus {name_b}: {title} (cells show A's top-1, or A|B)",
                    colour_title=f"\u0394 {title}", colorscale=DIVERGING, bounds=(-bound, bound),
                    text_size=13, text_color=None)


def lens_grid_difference(a: tuple[pd.DataFrame, pd.DataFrame], b: tuple[pd.DataFrame, pd.DataFrame],
                         metric: str | None, name_a: str, name_b: str) -> go.Figure:
    """:func:`lens_difference_content` as a Plotly heat map."""
    return lens_grid_figure(lens_difference_content(a, b, metric, name_a, name_b))


def on_one_scale(*grids: LensGrid) -> list[LensGrid]:
    """``grids`` with one colour scale, from the lowest value of any to the highest, so that
    a colour means the same value in each (two checkpoints' grids side by side)."""
    bounds = _finite_range({str(i): g.z for i, g in enumerate(grids)})
    return [replace(g, bounds=bounds) for g in grids] if bounds else list(grids)


def _colours(grid: LensGrid) -> tuple[list[list[str | None]], list[str], float, float]:
    """Each cell's colour on the grid's scale (None where the value is missing), the scale's
    colours from its low end to its high end, and the two ends' values."""
    values = grid.z.to_numpy(dtype=float)
    low, high = grid.bounds or _finite_range({"z": grid.z}) or (0.0, 1.0)
    scale = get_colorscale(grid.colorscale) if isinstance(grid.colorscale, str) else grid.colorscale
    span = high - low
    share = np.clip((values - low) / span, 0.0, 1.0) if span > 0 else np.full(values.shape, 0.5)
    share = 1.0 - share if grid.reversescale else share
    flat = sample_colorscale(scale, np.nan_to_num(share.ravel(), nan=0.0).tolist(), colortype="rgb")
    cells = [[None if not np.isfinite(v) else flat[i * values.shape[1] + j] for j, v in enumerate(row)]
             for i, row in enumerate(values)]
    ends = sample_colorscale(scale, [0.0, 0.25, 0.5, 0.75, 1.0], colortype="rgb")
    return cells, ends[::-1] if grid.reversescale else ends, low, high


def _ink(colour: str | None) -> str:
    """Dark or white text, whichever reads on ``colour`` (``rgb(r, g, b)``; None: the page's)."""
    if colour is None:
        return "inherit"
    r, g, b = (float(x) for x in colour[colour.index("(") + 1 : -1].split(","))
    return LENS_TEXT_COLOR if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#ffffff"


def lens_table(grid: LensGrid, name: str) -> str:
    """A :class:`LensGrid` as an HTML table (``st.html``): layer 1 at the bottom, each cell
    coloured on the grid's scale with its label written in it, a tooltip with its layer,
    position, value and the top-k tokens, the positions' labels under the grid and a colour
    bar. A browser lays out a table of 36 x 16 cells in milliseconds where a Plotly heat map
    with its text took 0.2-0.3 s per draw (Streamlit draws a figure two or three times).
    Each cell carries its value (``data-z``) and the table its ``name`` (``data-grid``)."""
    from html import escape

    colours, ends, low, high = _colours(grid)
    layers, positions = list(grid.z.index), list(grid.z.columns)
    values = grid.z.to_numpy(dtype=float)
    rows = []
    for i in range(len(layers) - 1, -1, -1):  # the last layer on top, as in a heat map
        tds = []
        for j, position in enumerate(positions):
            value, colour = values[i, j], colours[i][j]
            tip = f"layer {layers[i]}, position {position}\n{grid.colour_title} {value:.3g}"
            if grid.hover is not None and isinstance(grid.hover[i, j], str):
                tip += "\ntop-k:\n" + grid.hover[i, j].replace("<br>", "\n")
            background = f"background:{colour};color:{_ink(colour)}" if colour else ""
            tds.append(f'<td style="{background}" title="{escape(tip)}" data-z="{float(value)!r}">'
                       f"{escape(str(grid.text[i, j]))}</td>")
        rows.append(f'<tr><th class="layer">{layers[i]}</th>{"".join(tds)}</tr>')
    labels = grid.ticks or [str(p) for p in positions]
    foot = "".join(f'<th class="tick">{escape(label)}</th>' for label in labels)
    axis = "position (input \u2192 target)" if grid.ticks is not None else "position"
    return (
        f'<div class="lens-table" data-grid="{escape(name)}">{_LENS_TABLE_STYLE}'
        f'<div class="title">{escape(grid.title)}</div>'
        f'<table><tr><th class="tick">layer</th><th colspan="{len(positions)}"></th></tr>{"".join(rows)}'
        f'<tr><th></th>{foot}</tr></table><div class="axis">{axis}</div>'
        f'<div class="bar"><span>{low:.3g}</span><span class="scale" style="background:linear-gradient(to right, '
        f'{", ".join(ends)})"></span><span>{high:.3g}</span><span>{escape(grid.colour_title)}</span></div></div>'
    )


_LENS_TABLE_STYLE = (
    "<style>"
    ".lens-table{overflow-x:auto;font-size:13px}"
    ".lens-table .title{font-weight:600;font-size:14px;margin:4px 0 6px}"
    ".lens-table table{border-collapse:collapse;font-family:monospace;font-size:14px}"
    ".lens-table td{padding:3px 6px;text-align:center;white-space:pre;border:1px solid rgba(128,128,128,.25)}"
    ".lens-table th{font-weight:normal;padding:0 6px}"
    ".lens-table th.layer{text-align:right}"
    ".lens-table th.tick{font-size:11px;white-space:pre;padding:2px 4px}"
    ".lens-table .axis{font-size:11px;margin:2px 0 0 40px}"
    ".lens-table .bar{display:flex;align-items:center;gap:6px;margin:8px 0 0 40px;font-size:11px}"
    ".lens-table .scale{display:inline-block;width:220px;height:10px}"
    "</style>"
)


def layer_profiles(rows: dict[str, pd.DataFrame], metric: str) -> go.Figure:
    """Per-layer values at one checkpoint, one line per run (``rows``: name -> ``layer, value``)."""
    fig = go.Figure()
    for i, (name, part) in enumerate(rows.items()):
        part = part.groupby("layer", as_index=False)["value"].mean()
        fig.add_trace(go.Scatter(x=part["layer"], y=part["value"], mode="lines+markers", name=name,
                                 line=dict(color=PALETTE[i % len(PALETTE)])))
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_layout(title=dict(text=metric_label(metric), font=dict(size=14)), yaxis_title=metric, height=340)
    return _fixed_margins(fig)


# ---------------------------------------------------------------------------
# Causal analyses: early exit, the learned lens, patching
# ---------------------------------------------------------------------------


def lens_comparison(rows: dict[str, pd.DataFrame], metric: str) -> go.Figure:
    """A metric per layer read through the logit lens and the learned lens, side by side: one
    colour per run, solid = logit lens, dashed = learned (``rows``: name -> ``layer, value,
    lens``)."""
    fig = go.Figure()
    for i, (name, part) in enumerate(rows.items()):
        for lens, dash in (("logit", "solid"), ("affine", "dash")):
            line = part[part["lens"] == lens].groupby("layer", as_index=False)["value"].mean()
            if len(line):
                fig.add_trace(go.Scatter(x=line["layer"], y=line["value"], mode="lines+markers",
                                         name=f"{name} ({lens})", line=dict(color=PALETTE[i % len(PALETTE)], dash=dash)))
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_layout(title=dict(text=f"{metric_label(metric)}: logit lens (solid) and learned lens (dashed)",
                                 font=dict(size=14)), yaxis_title=metric, height=360)
    return _fixed_margins(fig)


def patch_curves(rows: dict[str, pd.DataFrame], metric: str = "patch_recovered") -> go.Figure:
    """The share of each run's change that patching recovers, per layer: one panel per run, one
    line per component (block output, attention, MLP). ``rows``: name -> ``layer, component,
    value`` at one checkpoint."""
    n = max(len(rows), 1)
    nrows, ncols = _grid(n)
    fig = make_subplots(rows=nrows, cols=ncols, subplot_titles=list(rows), horizontal_spacing=0.08,
                        vertical_spacing=0.18 if nrows > 1 else 0.0)
    colours = {"block": PALETTE[0], "attn": PALETTE[1], "mlp": PALETTE[2]}
    for i, part in enumerate(rows.values()):
        for component, colour in colours.items():
            line = part[part["component"] == component].sort_values("layer")
            fig.add_trace(go.Scatter(x=line["layer"], y=line["value"], mode="lines+markers", name=component,
                                     legendgroup=component, showlegend=i == 0, line=dict(color=colour)),
                          row=i // ncols + 1, col=i % ncols + 1)
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text="recovered share")
    fig.update_layout(title=dict(text=metric_label(metric), font=dict(size=14)), height=max(340, 320 * nrows))
    return _fixed_margins(fig, top=70)
