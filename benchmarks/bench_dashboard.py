"""Benchmark: dashboard first render and view switch in headless Chromium.

Builds a runs root of N runs x M checkpoints with synthetic tables of the real
shapes (``probes/step-*.parquet`` through ``RunWriter.log_probes`` and
``analysis/step-*-metrics.parquet``, both from ``ProbeResult.to_frame`` for all four splits
with their ``n_samples`` rows; weight drift per block; the metrics and drift merged into
segments of 32 checkpoints as ``oisd probe`` leaves them; top-k / cells / attention detail for
4 prompts per checkpoint, in the analyzer's compact dtypes and row groups), starts ``oisd dashboard`` on a
free port, and times in the browser:

- first render: a fresh server (nothing imported, empty caches) opening the
  layer-alignment view of every run until its heat maps are drawn, then the same
  page in new browser sessions on the running server;
- view switch: clicking another view in the sidebar until its figures are drawn
  (training curves, then the drill-down, then back to layer alignment, warm);
- section switch: inside the drill-down and layer-alignment views, clicking the section drawn
  on demand (attention maps, weight drift) and back, until its figures are drawn (each view
  draws one section at a time, so these are what the rest of a view costs).

- ``oisd compare`` over every run of the root (a fresh process, wall time);
- the dashboard server's peak resident memory (``VmHWM``) after all of the above.

Targets: first render within 1 s of Streamlit's own floor (a minimal Streamlit page with
one Plotly figure and no data, opened in new sessions interleaved with ours), view switch
< 0.5 s, compare < 5 s. Beside the switches, Streamlit's own switch on that minimal page (a
sidebar radio between two views of one figure, timed in the same rounds) and each switch's
ratio to it: what a switch costs before the dashboard reads or draws anything. ``--shape qwen3-4b`` is Qwen3-4B's 36 layers x 32 heads; the issue's
measurement is ``--shape qwen3-4b --checkpoints 200 --runs 6``.

A checkpoint's drill-down files are the same bytes for every checkpoint of a run (hard
links of the first checkpoint's), so a long series fits on disk: the dashboard reads one
checkpoint's detail at a time and cannot tell. Needs /usr/bin/chromium and the playwright
package: without them the script exits with an error (nothing is measured). Run:
``python benchmarks/bench_dashboard.py [--shape qwen3-4b] [--runs 6] [--checkpoints 200] [--root DIR]``.

``--smoke`` measures the server side only, with no browser: 2 runs x 2 checkpoints of 4 layers
x 2 heads, the same renders and view switches run as Streamlit's ``AppTest`` scripts (the
server's part of each: reading the tables and building the figures), against the floor
page under ``AppTest``, and ``oisd compare``; a view that raises or draws fewer figures
than it should fails it. ``--smoke --browser`` measures that tiny root in headless
Chromium instead (the full run's code). Smoke runs check that the code runs; their numbers
are not to report, and no target is judged.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout

from app.launch import wait_for_health  # noqa: E402
from workbench.analysis.analyzer import ATTN_ROW_GROUP  # noqa: E402
from workbench.analysis.memory import peak_rss_mb  # noqa: E402
from workbench.analysis.probe_runner import n_samples_frame  # noqa: E402
from workbench.measures.probing import LENS_STAT_NAMES, ProbeResult  # noqa: E402
from workbench.storage.atomic import atomic_write_parquet  # noqa: E402
from workbench.storage.runwriter import RunWriter, merge_analysis_files, write_metric_table  # noqa: E402
from workbench.storage.schema import DRIFT_COLUMNS  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TARGET_OVER_FLOOR_S, TARGET_SWITCH_S, TARGET_COMPARE_S = 1.0, 0.5, 5.0
METHODS = ["grpo", "oisd", "sdpg", "rlsd", "opsd"]
SPLITS = ("reference", "greedy", "sampled_correct", "sampled_wrong")
# (layers, heads) of each --shape; --layers / --heads override.
SHAPES = {"small": (8, 4), "qwen3-4b": (36, 32)}


def _probe_frame(rng: np.random.Generator, name: str, step: int, layers: int, heads: int, source: str) -> pd.DataFrame:
    lens = {m: rng.random(layers) for m in LENS_STAT_NAMES}
    js = rng.random((layers, layers)) * 0.3
    js = (js + js.T) / 2
    np.fill_diagonal(js, 0.0)
    result = ProbeResult(
        n_layers=layers, n_positions=64, lens=lens, prediction_depth=float(rng.random() * layers), n_heads=heads,
        attn_js=js, attn_js_final_per_head=rng.random((layers, heads)), attn_entropy=rng.random((layers, heads)),
        bos_mass=rng.random((layers, heads)), attn_head_match=js[:, -1] * 0.8, attn_head_identity=js[:, -1],
        head_perm=np.tile(np.arange(heads), (layers, 1)),
    )
    frames = []
    for split in SPLITS:
        frames.append(result.to_frame(name, step, split, source))
        if split.startswith("sampled"):
            frames.append(n_samples_frame(name, step, split, int(rng.integers(1, 8)), source))
    return pd.concat(frames, ignore_index=True)


def _detail(rng: np.random.Generator, layers: int, heads: int, prompts: int, seq: int, scored: int,
            top_k: int = 5) -> dict[str, pd.DataFrame]:
    """One checkpoint's drill-down tables (without run/step), real column layout."""
    positions = np.arange(seq - scored, seq)
    grid = pd.MultiIndex.from_product([range(prompts), range(1, layers + 1), positions, range(top_k)],
                                      names=["prompt", "layer", "position", "k"]).to_frame(index=False)
    grid["token_id"] = rng.integers(0, 64, len(grid))
    grid["token"] = [chr(48 + i % 40) for i in grid["token_id"]]
    grid["prob"] = rng.random(len(grid)) / (1 + grid["k"])
    cells = pd.MultiIndex.from_product([range(prompts), range(1, layers + 1), positions, LENS_STAT_NAMES],
                                       names=["prompt", "layer", "position", "metric"]).to_frame(index=False)
    cells["token"] = [chr(48 + p % 40) for p in cells["position"]]
    cells["target"] = [chr(49 + p % 40) for p in cells["position"]]
    cells["value"] = rng.random(len(cells))
    parts = []
    for query in positions:
        keys = np.arange(query + 1)
        block = pd.MultiIndex.from_product([range(prompts), range(1, layers + 1), range(-1, heads), keys],
                                           names=["prompt", "layer", "head", "key"]).to_frame(index=False)
        block["query"] = query
        parts.append(block)
    attn = pd.concat(parts, ignore_index=True)
    attn["weight"] = (rng.random(len(attn)) / seq).astype("float16")
    attn = attn.astype({"prompt": "int16", "layer": "int16", "head": "int16", "query": "int16", "key": "int16"})
    attn = attn.sort_values(["prompt", "layer", "head", "query", "key"], ignore_index=True)
    return {"topk": grid, "cells": cells[["prompt", "layer", "position", "token", "target", "metric", "value"]],
            "attn": attn[["prompt", "layer", "head", "query", "key", "weight"]]}


def _drift_frame(rng: np.random.Generator, name: str, step: int, layers: int) -> pd.DataFrame:
    """One checkpoint's weight-drift table (``DRIFT_COLUMNS``), the rows ``oisd probe`` writes."""
    rows = [(name, step, module, block, "all", float(rng.random() * 0.01), float(rng.random()), 10**6)
            for module, block in (("embeddings", 0), ("final_norm", layers + 1), ("head", layers + 2))]
    rows += [(name, step, "block", block, kind, float(rng.random() * 0.01), float(rng.random()), 10**5)
             for block in range(1, layers + 1) for kind in ("attention", "mlp", "norm", "all")]
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)


def build_root(root: Path, runs: int, checkpoints: int, layers: int, heads: int = 4, prompts: int = 4,
               seq: int = 48, scored: int = 16) -> None:
    """Write ``runs`` runs of ``checkpoints`` probed and analysed checkpoints each."""
    from tqdm import tqdm

    rng = np.random.default_rng(0)
    detail = _detail(rng, layers, heads, prompts, seq, scored)
    every = 10
    bar = tqdm(total=runs * checkpoints, desc="synthetic runs root", unit="checkpoint")
    for r in range(runs):
        method = METHODS[r % len(METHODS)]
        name = f"{method}-{r}"
        writer = RunWriter(root / name, {"method": method, "seed": r, "steps": checkpoints * every}, resume=False)
        writer.record(num_layers=layers, oisd_layers=[max(1, layers // 4)] if method == "oisd" else [])
        writer.write_probe_set([{"prompt": f"{i}+{i}=", "reference": str(2 * i), "prompt_ids": [i]}
                                for i in range(prompts)])
        for step in range(1, checkpoints * every + 1):
            writer.log_metrics(step, {"reward": float(rng.random()), "accuracy": float(rng.random()),
                                      "entropy": float(rng.random()), "kl": float(rng.random() * 0.1),
                                      "loss/policy": float(rng.normal()), "sched/beta": 0.04,
                                      "sched/lambda": min(1.0, step / 100),
                                      **({"eval/accuracy": float(rng.random())} if step % 50 == 0 else {})})
        folder = root / name / "analysis"
        first: dict[str, Path] = {}
        for c in range(1, checkpoints + 1):
            step = c * every
            writer.log_probes(_probe_frame(rng, name, step, layers, heads, "probe"))
            meta = {"probe_set_hash": writer.info["probe_set_hash"], "n_layers": layers, "n_heads": heads}
            for kind, table in detail.items():
                path = folder / f"step-{step:06d}-{kind}.parquet"
                if kind in first:  # the same bytes as the first checkpoint's (see the module doc)
                    os.link(first[kind], path)
                    continue
                frame = table.assign(run=name, step=step)
                if kind == "attn":
                    frame = frame.astype({"step": "int32"})
                    frame["run"] = frame["run"].astype("category")
                atomic_write_parquet(path, frame, metadata={**meta, "kind": kind},
                                     row_group_size=ATTN_ROW_GROUP if kind == "attn" else None)
                first[kind] = path
            atomic_write_parquet(folder / f"step-{step:06d}-drift.parquet", _drift_frame(rng, name, step, layers),
                                 metadata={"kind": "drift", "step": step})
            write_metric_table(folder / f"step-{step:06d}-metrics.parquet",
                               _probe_frame(rng, name, step, layers, heads, "analyzer"), metadata={**meta, "kind": "metrics"})
            bar.update()
        for kind in ("metrics", "drift"):  # as `oisd probe` leaves them: merged into segments
            merge_analysis_files(writer.paths, kind)
        writer.set_status("finished")
    bar.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_view(page, header: str, figure_text: str, figures: int) -> None:
    """Until the main header is ``header``, Streamlit has finished running the script (the
    app root's ``data-test-script-state``, what Streamlit's own browser tests wait on) and
    ``figures`` figures (Plotly figures, and the drill-down's lens tables), one showing
    ``figure_text``, are drawn.

    (Until 2026-12-06 this read the status widget's text, which never says "Running" in
    this Streamlit: a switch counted as done once its first figures were drawn, while the
    script still ran, and the rest of that view, the alignment view's 650 KB drift figure,
    was drawn inside the next switch's time. Until 2026-12-07 a figure counted once its SVG
    existed; Streamlit's Plotly component first draws a figure hidden, before it knows its
    container's width, and shows it at the next draw, 0.03 s later in a minimal page: a
    figure now counts once it is shown.)"""
    page.wait_for_function(
        """([header, text, n]) => {
            const app = document.querySelector('[data-testid="stApp"]');
            if (!app || app.getAttribute('data-test-script-state') !== 'notRunning') return false;
            const h = document.querySelector('[data-testid="stMain"] h2');
            if (!h || h.innerText.trim() !== header) return false;
            const shown = p => { const s = getComputedStyle(p); return s.visibility !== 'hidden' && s.display !== 'none'; };
            const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.main-svg') && shown(p))
                .concat([...document.querySelectorAll('.lens-table')].filter(t => t.querySelector('td')));
            if (plots.length < n) return false;
            return plots.some(p => p.textContent.includes(text));
        }""",
        arg=[header, figure_text, figures], timeout=120_000, polling=20,
    )


# The floor: Streamlit's own page load, a header and one Plotly heat map, no data read; and
# Streamlit's own view switch: a sidebar radio between two such views (what any switch costs:
# the script's rerun, the round trip and drawing one figure).
FLOOR_APP = """
import numpy as np
import plotly.graph_objects as go
import streamlit as st
view = st.sidebar.radio("View", ["Floor", "Floor B"])
st.header(view)
st.plotly_chart(go.Figure(go.Heatmap(z=np.random.default_rng(0).random((8, 50))), layout=dict(title=view)))
"""
FLOOR = "floor: bare Streamlit + 1 figure"
# The views switched between, each as it opens (its first section): header, a text one of its
# figures shows, how many figures it draws.
VIEWS = (("Training", "reward", 1), ("Drill-down", "Logit lens", 1), ("Layer alignment", "tuned-lens direction", 1))
# Sections drawn on demand inside a view (a radio in the main area), timed like a switch:
# (view, section label, text one of its figures shows, figures, URL key of the radio).
SECTIONS = (("Drill-down", "Attention maps", "Final layer", 1, "drilldown_show"),
            ("Drill-down", "Logit lens", "Logit lens", 1, "drilldown_show"),
            ("Layer alignment", "Weight drift", "Weight drift", 1, "alignment_show"),
            ("Layer alignment", "Heat maps", "tuned-lens direction", 1, "alignment_show"))
FLOOR_SWITCH = "floor: a bare view switch"


def _serve(cmd: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    server = subprocess.Popen([*cmd, "--port" if "workbench.cli" in cmd else "--server.port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    return server, f"http://127.0.0.1:{port}"


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def measure(root: Path, repeats: int) -> dict[str, list[float]]:
    from playwright.sync_api import sync_playwright

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # Every run of the root selected (the dashboard's default is the first four).
    query = "view=Layer+alignment&metric=lens_kl" + "".join(
        f"&runs={p.name}" for p in sorted(root.iterdir()) if (p / "run.json").is_file())
    server, url = _serve([sys.executable, "-m", "workbench.cli", "dashboard", str(root), "--headless"], env)
    floor_app = Path(tempfile.mkdtemp(prefix="bench-floor-")) / "floor.py"
    floor_app.write_text(FLOOR_APP)
    floor, floor_url = _serve([sys.executable, "-m", "streamlit", "run", str(floor_app), "--server.headless",
                               "true", "--browser.gatherUsageStats", "false"], env)
    times: dict[str, list[float]] = {"first render (alignment, cold)": [], "first render (new session)": [],
                                     FLOOR: [], **{f"switch to {v}": [] for v, _, _ in VIEWS},
                                     **{f"section: {v} > {s}": [] for v, s, *_ in SECTIONS}, FLOOR_SWITCH: []}
    try:
        if not (wait_for_health(url, timeout_s=120) and wait_for_health(floor_url, timeout_s=120)):
            raise RuntimeError("dashboard did not start")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
            start = time.perf_counter()
            page.goto(f"{url}/?{query}")
            _wait_view(page, "Layer alignment", "tuned-lens direction", 1)
            times["first render (alignment, cold)"].append(time.perf_counter() - start)
            for _ in range(repeats):  # a new browser session on the running server
                fresh = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
                start = time.perf_counter()
                fresh.goto(f"{url}/?{query}")
                _wait_view(fresh, "Layer alignment", "tuned-lens direction", 1)
                times["first render (new session)"].append(time.perf_counter() - start)
                fresh.context.close()
                fresh = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
                start = time.perf_counter()  # the floor, side by side with the session above
                fresh.goto(floor_url)
                _wait_view(fresh, "Floor", "Floor", 1)  # waited on as the dashboard's page is
                times[FLOOR].append(time.perf_counter() - start)
                fresh.context.close()
            floor_page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
            floor_page.goto(floor_url)
            _wait_view(floor_page, "Floor", "Floor", 1)
            for _ in range(repeats):  # the dashboard's switches, then the floor's, side by side
                for view, text, n in VIEWS:
                    start = time.perf_counter()
                    page.locator('[data-testid="stSidebar"] label').filter(has_text=view).first.click()
                    _wait_view(page, view, text, n)
                    times[f"switch to {view}"].append(time.perf_counter() - start)
                    for _, section, text_s, n_s, _ in (s for s in SECTIONS if s[0] == view):
                        start = time.perf_counter()
                        page.locator('[data-testid="stMain"] label').filter(
                            has_text=re.compile(rf"^\s*{section}\s*$")).first.click()
                        _wait_view(page, view, text_s, n_s)
                        times[f"section: {view} > {section}"].append(time.perf_counter() - start)
                for view in ("Floor B", "Floor"):
                    start = time.perf_counter()
                    floor_page.locator('[data-testid="stSidebar"] label').filter(
                        has_text=re.compile(rf"^\s*{view}\s*$")).first.click()
                    _wait_view(floor_page, view, view, 1)
                    times[FLOOR_SWITCH].append(time.perf_counter() - start)
            browser.close()
        times["dashboard peak memory (MB)"] = [_peak_rss_mb(server.pid)]
    finally:
        _stop(server)
        _stop(floor)
        shutil.rmtree(floor_app.parent, ignore_errors=True)
    return times


def measure_server(root: Path, repeats: int) -> dict[str, list[float]]:
    """The server's part of the same renders and switches as :func:`measure`, no browser:
    each is one run of ``app/main.py`` under Streamlit's ``AppTest`` (the script, reading the
    tables and building every figure), the floor page likewise. Raises when a run raises or
    draws fewer figures than the view should."""
    from streamlit.testing.v1 import AppTest

    os.environ["OISD_RUNS_ROOT"] = str(root)
    runs = [p.name for p in sorted(root.iterdir()) if (p / "run.json").is_file()]

    def fresh(view: str = "Layer alignment") -> AppTest:
        at = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=120)
        at.query_params.update({"view": view, "metric": "lens_kl", "runs": runs})
        return at

    def timed(at: AppTest, what: str, figures: int) -> float:
        start = time.perf_counter()
        at.run()
        seconds = time.perf_counter() - start
        if at.exception:
            raise RuntimeError(f"{what}: the app raised {at.exception[0].value}")
        drawn = len(at.get("plotly_chart")) + sum('class="lens-table"' in e.proto.body for e in at.get("html"))
        if drawn < figures:
            raise RuntimeError(f"{what}: {drawn} figures drawn, expected at least {figures}")
        return seconds

    times: dict[str, list[float]] = {"first render (alignment, cold)": [], "first render (new session)": [],
                                     FLOOR: [], **{f"switch to {v}": [] for v, _, _ in VIEWS},
                                     **{f"section: {v} > {s}": [] for v, s, *_ in SECTIONS}}
    page = fresh()
    times["first render (alignment, cold)"].append(timed(page, "first render", 1))
    for _ in range(repeats):
        times["first render (new session)"].append(timed(fresh(), "first render (new session)", 1))
        times[FLOOR].append(timed(AppTest.from_string(FLOOR_APP, default_timeout=120), FLOOR, 1))
    floor = AppTest.from_string(FLOOR_APP, default_timeout=120)
    timed(floor, FLOOR, 1)
    times[FLOOR_SWITCH] = []
    for _ in range(repeats):
        for view, _, n in VIEWS:
            page.radio(key="view").set_value(view)
            times[f"switch to {view}"].append(timed(page, f"switch to {view}", n))
            if page.query_params.get("view") not in (view, [view]):
                raise RuntimeError(f"switch to {view}: the page shows {page.query_params.get('view')}")
            for _, section, _, n_s, key in (s for s in SECTIONS if s[0] == view):
                page.radio(key=key).set_value(section)
                times[f"section: {view} > {section}"].append(timed(page, f"section {section}", n_s))
        for view in ("Floor B", "Floor"):
            floor.sidebar.radio[0].set_value(view)
            times[FLOOR_SWITCH].append(timed(floor, FLOOR_SWITCH, 1))
            if floor.header[0].value != view:
                raise RuntimeError(f"{FLOOR_SWITCH}: the page shows {floor.header[0].value}")
    times["server process peak memory (MB)"] = [peak_rss_mb()]
    return times


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of the process ``pid`` and its children (the Streamlit server
    runs under ``oisd dashboard``), their ``VmHWM``."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return max([peak_rss_mb(pid)] + [peak_rss_mb(int(c)) for c in children])


def time_compare(root: Path, repeats: int = 2) -> list[float]:
    """Wall seconds of ``oisd compare`` over every run under ``root``, in a fresh process."""
    runs = sorted(str(p) for p in root.iterdir() if (p / "run.json").is_file())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "workbench.cli", "compare", *runs], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small",
                        help="layers x heads: small 8 x 4, qwen3-4b 36 x 32")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, default=50)
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layers")
    parser.add_argument("--heads", type=int, default=None, help="override the shape's heads")
    parser.add_argument("--repeats", type=int, default=3, help="view-switch rounds (the first is cold)")
    parser.add_argument("--root", default=None, help="reuse / write the synthetic root here")
    parser.add_argument("--smoke", action="store_true",
                        help="2 runs x 2 checkpoints of 4 x 2, 1 repeat, the server side under AppTest (no browser)")
    parser.add_argument("--browser", action="store_true", help="with --smoke: measure in headless Chromium instead")
    args = parser.parse_args(argv)
    layers, heads = SHAPES[args.shape]
    layers, heads = args.layers or layers, args.heads or heads
    if args.smoke:
        args.runs, args.checkpoints, args.repeats, layers, heads = 2, 2, 1, 4, 2
    browser = args.browser or not args.smoke
    missing = [what for what, ok in ((CHROMIUM, Path(CHROMIUM).exists()),
                                     ("the playwright package", importlib.util.find_spec("playwright") is not None))
               if not ok]
    if browser and missing:
        verb = "is" if len(missing) == 1 else "are"
        raise SystemExit(f"bench_dashboard: cannot measure: {' and '.join(missing)} {verb} missing (make browser; "
                         "pip install playwright); --smoke measures the server side without a browser")
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        return run(args, Path(args.root) if args.root else Path(tmp) / "runs", layers, heads, browser)


def run(args, root: Path, layers: int, heads: int, browser: bool) -> int:
    """Build (or reuse) the root, measure, print the table; the exit status."""
    if not root.exists() or not any(root.iterdir()):
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        build_root(root, args.runs, args.checkpoints, layers, heads)
        print(f"built {args.runs} runs x {args.checkpoints} checkpoints ({layers} layers x {heads} heads) "
              f"under {root} in {time.perf_counter() - start:.1f} s")
    times = measure(root, args.repeats) if browser else measure_server(root, args.repeats)
    times["oisd compare (all runs)"] = time_compare(root, repeats=1 if args.smoke else 2)
    floor = float(np.median(times[FLOOR]))
    where = "headless Chromium" if browser else "server side only (Streamlit AppTest, no browser)"
    print(f"{'smoke, ' if args.smoke else ''}{where}: {args.runs} runs x {args.checkpoints} checkpoints, "
          f"{layers} layers x {heads} heads")
    # Seconds to the millisecond: Streamlit's bare switch under AppTest (the smoke) takes a few ms.
    seconds, megabytes = "{:7.3f}s".format, "{:8.2f}".format
    print(f"{'measure':42s} {'first':>8s} {'median':>8s} {'target':>8s}")
    ok = True
    for name, values in times.items():
        warm = float(np.median(values[1:])) if len(values) > 1 else float(values[0])
        if name in (FLOOR, FLOOR_SWITCH) or name.endswith("(MB)") or args.smoke:  # a smoke judges no target
            cell = megabytes if name.endswith("(MB)") else seconds
            print(f"{name:42s} {cell(values[0])} {cell(warm)}")
            continue
        if name.startswith("first"):
            target = floor + TARGET_OVER_FLOOR_S
        elif name.startswith("oisd compare"):
            target = TARGET_COMPARE_S
        else:
            target = TARGET_SWITCH_S
        verdict = "ok" if warm < target else "SLOW"
        ok &= warm < target
        print(f"{name:42s} {seconds(values[0])} {seconds(warm)} {seconds(target)}  {verdict}")
    switch_floor = float(np.median(times[FLOOR_SWITCH]))
    print("switch / floor switch: " + ", ".join(
        f"{name.removeprefix('switch to ').removeprefix('section: ')} "
        f"{float(np.median(values[1:] or values)) / switch_floor:.2f}"
        for name, values in times.items() if name.startswith(("switch to", "section: "))))
    session = float(np.median(times["first render (new session)"]))
    print(f"(median over warm repeats; the first switch to a view reads its tables cold; first-render targets are "
          f"the floor + {TARGET_OVER_FLOOR_S:.0f} s{'; a smoke judges none' if args.smoke else ''})\n"
          f"new session / floor = {session / floor:.2f}: what the workbench adds to Streamlit's own page load")
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    sys.exit(main())
