"""Benchmark: dashboard first render and view switch in headless Chromium.

Builds a runs root of 5 runs x 50 checkpoints with synthetic tables of the real
shapes (probes.parquet and ``analysis/step-*-metrics.parquet`` from
``ProbeResult.to_frame``; top-k / cells / attention detail for 4 prompts per
checkpoint), starts ``oisd dashboard`` on a free port, and times in the browser:

- first render: a fresh server (nothing imported, empty caches) opening the
  layer-alignment view of all 5 runs until its heat maps are drawn, then the same
  page in new browser sessions on the running server;
- view switch: clicking another view in the sidebar until its figures are drawn
  (training curves, then the drill-down, then back to layer alignment, warm).

Targets: first render < 2 s, view switch < 0.5 s. Side by side, the floor: a minimal
Streamlit page with one Plotly figure (no data), opened in new sessions interleaved with
ours, so the table shows how much of a first render is Streamlit's own page load.
Needs /usr/bin/chromium and the playwright package. Run:
``python benchmarks/bench_dashboard.py [--runs 5] [--checkpoints 50] [--layers 8] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import os
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
from workbench.probing import LENS_STAT_NAMES, ProbeResult  # noqa: E402
from workbench.atomic import atomic_write_parquet  # noqa: E402
from workbench.runwriter import RunWriter  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TARGET_FIRST_S, TARGET_SWITCH_S = 2.0, 0.5
METHODS = ["grpo", "oisd", "sdpg", "rlsd", "opsd"]


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
    return pd.concat([result.to_frame(name, step, split, source) for split in ("reference", "greedy")],
                     ignore_index=True)


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
    attn["weight"] = rng.random(len(attn)) / seq
    return {"topk": grid, "cells": cells[["prompt", "layer", "position", "token", "target", "metric", "value"]],
            "attn": attn[["prompt", "layer", "head", "query", "key", "weight"]]}


def build_root(root: Path, runs: int, checkpoints: int, layers: int, heads: int = 4, prompts: int = 4,
               seq: int = 48, scored: int = 16) -> None:
    """Write ``runs`` runs of ``checkpoints`` probed and analysed checkpoints each."""
    rng = np.random.default_rng(0)
    detail = _detail(rng, layers, heads, prompts, seq, scored)
    every = 10
    for r in range(runs):
        method = METHODS[r % len(METHODS)]
        name = f"{method}-{r}"
        writer = RunWriter(root / name, {"method": method, "seed": r, "steps": checkpoints * every}, resume=False)
        writer.write_probe_set([{"prompt": f"{i}+{i}=", "reference": str(2 * i), "prompt_ids": [i]}
                                for i in range(prompts)])
        for step in range(1, checkpoints * every + 1):
            writer.log_metrics(step, {"reward": float(rng.random()), "accuracy": float(rng.random()),
                                      "entropy": float(rng.random()), "kl": float(rng.random() * 0.1),
                                      "loss/policy": float(rng.normal()), "sched/beta": 0.04,
                                      "sched/lambda": min(1.0, step / 100)})
        probes = [_probe_frame(rng, name, c * every, layers, heads, "probe") for c in range(1, checkpoints + 1)]
        atomic_write_parquet(root / name / "probes.parquet", pd.concat(probes, ignore_index=True))
        for c in range(1, checkpoints + 1):
            step = c * every
            folder = root / name / "analysis"
            atomic_write_parquet(folder / f"step-{step:06d}-metrics.parquet",
                                 _probe_frame(rng, name, step, layers, heads, "analyzer"),
                                 metadata={"probe_set_hash": writer.info["probe_set_hash"]})
            for kind, table in detail.items():
                atomic_write_parquet(folder / f"step-{step:06d}-{kind}.parquet",
                                     table.assign(run=name, step=step),
                                     metadata={"probe_set_hash": writer.info["probe_set_hash"]})
        writer.set_status("finished")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_view(page, header: str, figure_text: str, figures: int) -> None:
    """Until the main header is ``header`` and ``figures`` Plotly figures, one showing
    ``figure_text``, are drawn and Streamlit is no longer running the script."""
    page.wait_for_function(
        """([header, text, n]) => {
            const h = document.querySelector('[data-testid="stMain"] h2');
            if (!h || h.innerText.trim() !== header) return false;
            const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('.main-svg'));
            if (plots.length < n) return false;
            if (!plots.some(p => p.textContent.includes(text))) return false;
            const status = document.querySelector('[data-testid="stStatusWidget"]');
            return !status || !status.innerText.includes('Running');
        }""",
        arg=[header, figure_text, figures], timeout=120_000, polling=20,
    )


# The floor: Streamlit's own page load, a header and one Plotly heat map, no data read.
FLOOR_APP = """
import numpy as np
import plotly.graph_objects as go
import streamlit as st
st.header("Floor")
st.plotly_chart(go.Figure(go.Heatmap(z=np.random.default_rng(0).random((8, 50)))))
"""
FLOOR = "floor: bare Streamlit + 1 figure"


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
    server, url = _serve([sys.executable, "-m", "workbench.cli", "dashboard", str(root), "--headless"], env)
    floor_app = Path(tempfile.mkdtemp(prefix="bench-floor-")) / "floor.py"
    floor_app.write_text(FLOOR_APP)
    floor, floor_url = _serve([sys.executable, "-m", "streamlit", "run", str(floor_app), "--server.headless",
                               "true", "--browser.gatherUsageStats", "false"], env)
    times: dict[str, list[float]] = {"first render (alignment, cold)": [], "first render (new session)": [],
                                     FLOOR: [], "switch to Training": [],
                                     "switch to Drill-down": [], "switch to Layer alignment": []}
    try:
        if not (wait_for_health(url, timeout_s=120) and wait_for_health(floor_url, timeout_s=120)):
            raise RuntimeError("dashboard did not start")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
            start = time.perf_counter()
            page.goto(f"{url}/?view=Layer+alignment&metric=lens_kl")
            _wait_view(page, "Layer alignment", "tuned-lens direction", 2)
            times["first render (alignment, cold)"].append(time.perf_counter() - start)
            for _ in range(repeats):  # a new browser session on the running server
                fresh = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
                start = time.perf_counter()
                fresh.goto(f"{url}/?view=Layer+alignment&metric=lens_kl")
                _wait_view(fresh, "Layer alignment", "tuned-lens direction", 2)
                times["first render (new session)"].append(time.perf_counter() - start)
                fresh.context.close()
                fresh = browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
                start = time.perf_counter()  # the floor, side by side with the session above
                fresh.goto(floor_url)
                fresh.wait_for_function("() => document.querySelector('.js-plotly-plot .main-svg')",
                                        timeout=120_000, polling=20)
                times[FLOOR].append(time.perf_counter() - start)
                fresh.context.close()
            for _ in range(repeats):
                for view, text, n in (("Training", "reward", 1), ("Drill-down", "Logit lens", 3),
                                      ("Layer alignment", "tuned-lens direction", 2)):
                    start = time.perf_counter()
                    page.locator('[data-testid="stSidebar"] label').filter(has_text=view).first.click()
                    _wait_view(page, view, text, n)
                    times[f"switch to {view}"].append(time.perf_counter() - start)
            browser.close()
    finally:
        _stop(server)
        _stop(floor)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checkpoints", type=int, default=50)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="view-switch rounds (the first is cold)")
    parser.add_argument("--root", default=None, help="reuse / write the synthetic root here")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"skipped: {CHROMIUM} is missing (apt-get install chromium)")
        return 0
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench-dashboard-")) / "runs"
    if not root.exists() or not any(root.iterdir()):
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        build_root(root, args.runs, args.checkpoints, args.layers)
        print(f"built {args.runs} runs x {args.checkpoints} checkpoints under {root} "
              f"in {time.perf_counter() - start:.1f} s")
    times = measure(root, args.repeats)
    print(f"{'measure':34s} {'first':>7s} {'median':>7s} {'target':>7s}")
    ok = True
    for name, values in times.items():
        warm = float(np.median(values[1:])) if len(values) > 1 else float(values[0])
        if name == FLOOR:
            print(f"{name:34s} {values[0]:6.2f}s {warm:6.2f}s")
            continue
        target = TARGET_FIRST_S if name.startswith("first") else TARGET_SWITCH_S
        verdict = "ok" if warm < target else "SLOW"
        ok &= warm < target
        print(f"{name:34s} {values[0]:6.2f}s {warm:6.2f}s {target:6.1f}s  {verdict}")
    session = float(np.median(times["first render (new session)"]))
    print(f"(median over warm repeats; the first switch to a view reads its tables cold)\n"
          f"new session / floor = {session / float(np.median(times[FLOOR])):.2f}: what the workbench adds "
          f"to Streamlit's own page load")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
