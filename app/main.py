"""The dashboard's Streamlit script: ``streamlit run app/main.py -- --root RUNS_ROOT``.

Started by ``oisd dashboard`` (:func:`app.launch.launch`). The runs root comes from
``--root``, else from the ``OISD_RUNS_ROOT`` environment variable, else ``runs``.
Nothing here runs a model: every view reads tables through :mod:`app.data`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the checkout holding the
# `app` and `workbench` packages; add it when the package is not installed.
if importlib.util.find_spec("workbench") is None:  # pragma: no cover - depends on install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import streamlit as st  # noqa: E402

from app import data, state  # noqa: E402
from app.views import VIEWS  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402

DEFAULT_SELECTION = 4  # runs selected when neither the URL nor the user chose any


def runs_root() -> Path:
    """The runs root from ``--root`` (after ``--`` on the streamlit command line)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--root", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:])
    return Path(args.root or os.environ.get("OISD_RUNS_ROOT", "runs"))


def _runs_from_url(root: Path, listing: data.RunListing) -> list[str]:
    """Runs named in the URL that may be shown; refusals are kept as messages.

    Every name goes through :func:`app.data.resolve_run` (``safe_join``): ``..``,
    absolute paths and links that lead outside the root are refused.
    """
    wanted = state.pending("runs") or []
    chosen, messages = [], []
    for name in wanted:
        if name in listing.broken:
            messages.append(f"Run `{name}` cannot be read: {listing.broken[name]}")
            continue
        try:
            data.resolve_run(root, name)
        except WorkbenchError as exc:
            messages.append(f"Refused run {name!r} from the URL: {exc}")
            continue
        if name in listing.runs:
            chosen.append(name)
        else:
            messages.append(f"Refused run {name!r} from the URL: it is not a run folder directly under {root}")
    st.session_state["_url_run_messages"] = messages
    return chosen


def sidebar(root: Path, listing: data.RunListing) -> tuple[str, list[str], bool, float]:
    """Navigation, run selection and the live toggle."""
    st.sidebar.title("OISD workbench")
    st.sidebar.caption(f"Runs root: `{root}`")
    view = state.select(None, "View", list(VIEWS), "view", container=st.sidebar, widget="radio")
    names = list(listing.runs)
    if "runs" not in st.session_state:
        from_url = _runs_from_url(root, listing)
        st.session_state["runs"] = from_url if state.pending("runs") else names[:DEFAULT_SELECTION]
    st.session_state["runs"] = [n for n in st.session_state["runs"] if n in names]
    selected = st.sidebar.multiselect("Runs", names, key="runs")
    live_names = [n for n in selected if listing.runs[n].is_live]
    live = st.sidebar.toggle("Live refresh", key="live",
                             help="Re-read the selected runs every few seconds (only changed files are read).")
    every = st.sidebar.number_input("Refresh every (s)", min_value=1.0, max_value=600.0, value=5.0, step=1.0,
                                    key="live_every", disabled=not live)
    if live_names:
        st.sidebar.caption("Training now: " + ", ".join(f"`{n}`" for n in live_names))
    if listing.broken:
        st.sidebar.caption(f"{len(listing.broken)} unreadable run folder(s): see Runs.")
    return view, selected, live, float(every)


def main() -> None:
    """Draw the page: sidebar, then the chosen view (in a timed fragment when live)."""
    st.set_page_config(page_title="OISD workbench", layout="wide")
    state.read_url_once()
    state.keep_widget_state()
    root = runs_root()
    try:
        listing = data.scan_root(root)
    except WorkbenchError as exc:
        st.error(str(exc))
        st.stop()
    view, selected, live, every = sidebar(root, listing)
    for message in st.session_state.get("_url_run_messages", []):
        st.error(message)
    ctx = state.ViewContext(root=root, runs={n: listing.runs[n] for n in selected}, all_runs=listing.runs,
                            broken=listing.broken)

    def render() -> None:
        ctx.used_keys.clear()
        VIEWS[view](ctx)
        state.write_url(ctx, view)

    if live:
        # Only the view re-runs on the timer; the cached readers re-read a file only
        # when its modification time changed.
        st.fragment(render, run_every=every)()
    else:
        render()


main()
