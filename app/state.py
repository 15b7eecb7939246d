"""The view's state in the URL, so that a link reopens the same view.

The URL keys are ``view, runs, metric, step, prompt, layer`` (plus ``source``, and the
section a view shows: ``alignment_show``, ``drilldown_show``).
On a session's first run the query parameters become the widgets' initial values;
after each run the widgets' values are written back with ``st.query_params``.
Values from a URL are matched against the options a widget offers, so a stale or
hand-edited link falls back to a default instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import streamlit as st

from workbench.storage.runstore import Run

URL_KEYS = ("view", "runs", "metric", "step", "prompt", "layer", "source", "alignment_show", "drilldown_show")
_PENDING = "_url_pending"


@dataclass
class ViewContext:
    """What every view gets.

    Attributes:
        root: The runs root.
        runs: The selected healthy runs, by name, in selection order.
        all_runs: Every healthy run under the root, by name.
        broken: Run name -> why it cannot be opened (shown in its place).
        used_keys: URL keys the view rendered widgets for (written to the URL).
    """

    root: Path
    runs: dict[str, Run]
    all_runs: dict[str, Run]
    broken: dict[str, str]
    used_keys: set[str] = field(default_factory=set)


def read_url_once() -> None:
    """Keep the query parameters of a session's first run as pending widget values."""
    if _PENDING in st.session_state:
        return
    pending: dict[str, Any] = {}
    for key in URL_KEYS:
        values = st.query_params.get_all(key)
        if values:
            pending[key] = values if key == "runs" else values[-1]
    st.session_state[_PENDING] = pending


def pending(key: str) -> Any:
    """The URL's value for ``key`` that no widget has taken yet, or None."""
    return st.session_state.get(_PENDING, {}).get(key)


def keep_widget_state() -> None:
    """Keep widget values of views that are not shown in this run.

    Streamlit forgets the state of a widget that is not rendered; re-assigning the
    keys at the top of each run keeps e.g. the chosen metric while another view is open.
    """
    for key in URL_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


def select(ctx: ViewContext | None, label: str, options: Sequence, key: str, *,
           container: Any = None, format_func: Callable[[Any], str] = str, default: Any = None,
           widget: str = "selectbox", **kwargs) -> Any:
    """A selectbox (or radio) whose value survives reruns and comes from the URL first.

    Args:
        ctx: The view context; ``key`` is recorded as one of its URL keys when it is
            in ``URL_KEYS`` (None for widgets outside a view).
        label: Widget label.
        options: The choices (any values; matched to URL strings by ``str``).
        key: Session-state key of the widget.
        container: Where to draw it (``st`` by default, e.g. ``st.sidebar`` or a column).
        format_func: Label of each option.
        default: Option used when neither state nor URL names a valid one (else the first).
        widget: ``"selectbox"`` or ``"radio"``.

    Returns:
        The chosen option, or None when there are no options.
    """
    container = container or st
    options = list(options)
    if ctx is not None and key in URL_KEYS:
        ctx.used_keys.add(key)
    if not options:
        st.session_state.pop(key, None)
        return None
    if st.session_state.get(key) not in options:
        wanted = pending(key)
        by_text = {str(o): o for o in options}
        if wanted is not None and str(wanted) in by_text:
            st.session_state[key] = by_text[str(wanted)]
        else:
            st.session_state[key] = default if default in options else options[0]
    draw = container.radio if widget == "radio" else container.selectbox
    return draw(label, options, key=key, format_func=format_func, **kwargs)


def write_url(ctx: ViewContext, view: str) -> None:
    """Write the view, the selected runs and the view's widget values to the URL."""
    params: dict[str, Any] = {"view": view}
    if ctx.runs:
        params["runs"] = list(ctx.runs)
    for key in sorted(ctx.used_keys - {"view", "runs"}):
        value = st.session_state.get(key)
        if value is not None:
            params[key] = str(value)
    current = {k: (st.query_params.get_all(k) if k == "runs" else st.query_params.get(k)) for k in st.query_params}
    if current != params:
        st.query_params.from_dict(params)


def download_csv(table: pd.DataFrame | Callable[[], pd.DataFrame], file_name: str,
                 label: str = "Download table (CSV)", key: str | None = None) -> None:
    """A download button for the table behind a view (its exact rows, as CSV), written when
    the button is clicked: a view's table can be megabytes (the training view's 6 runs x 2,000
    steps x 8 curves: 3 MB, 0.25 s to write), which every rerun would otherwise pay.

    ``table`` may be a function that builds it, so that building it too waits for the click."""
    build = table if callable(table) else (lambda: table)
    empty = isinstance(table, pd.DataFrame) and table.empty
    st.download_button(label, data=lambda: build().to_csv(index=False).encode("utf-8"), file_name=file_name,
                       mime="text/csv", key=key or f"download-{file_name}", disabled=empty, on_click="ignore")
