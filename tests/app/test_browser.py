"""End to end: `oisd dashboard` in a subprocess, driven by headless Chromium.

Needs Debian's chromium at /usr/bin/chromium (``make browser``) and the Playwright
Python package. Without chromium the test fails where ``scripts/install-browser.sh`` could
have installed it (root or password-less sudo, and apt-get: its install failed or was not
run), and is skipped, with the reason, only where it could not; without Playwright it is
skipped. Screenshots are saved under the test's tmp folder (``runs-view.png``,
``drilldown-view.png``, ``alignment-view.png``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import pytest

from app.launch import wait_for_health

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.browser


def why_chromium_cannot_be_installed() -> str | None:
    """Why ``scripts/install-browser.sh`` could not install chromium here (its rule), or None
    where it could: running as root or with password-less sudo, and apt-get present."""
    if shutil.which("apt-get") is None:
        return "no apt-get"
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None or subprocess.run([sudo, "-n", "true"], check=False, capture_output=True).returncode != 0:
            return "not root and no password-less sudo"
    return None


def require_chromium() -> None:
    """Skip where chromium is missing and could not have been installed; fail where it could."""
    if CHROMIUM.exists():
        return
    reason = why_chromium_cannot_be_installed()
    if reason:
        pytest.skip(f"needs {CHROMIUM}, which `make browser` cannot install here ({reason})")
    pytest.fail(f"{CHROMIUM} is missing although it could have been installed here (root or sudo, and "
                "apt-get): `make browser` (scripts/install-browser.sh) failed or was not run", pytrace=False)


@pytest.fixture(autouse=True)
def _chromium():
    require_chromium()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dashboard(runs_root, tmp_path):
    """``(url, log)`` of an `oisd dashboard` server over the test runs root; killed afterwards."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "dashboard", str(runs_root), "--port", str(port), "--headless"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_for_health(url, timeout_s=60):
            pytest.fail(f"dashboard did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield url
    finally:
        # The CLI starts streamlit as a child: end the whole process group we created.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1500, "height": 1100})
        yield context.new_page()
        browser.close()


def open_view(page, url: str, **query) -> None:
    """Open the app with query parameters and wait until the script has finished."""
    page.goto(f"{url}/?{urlencode(query, doseq=True)}", wait_until="domcontentloaded")
    page.wait_for_selector("[data-testid='stSidebar']", timeout=60_000)
    # The app root's script state (what Streamlit's own browser tests wait on; the status
    # widget's text never says "Running" in this Streamlit).
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=60_000)


def assert_labels_inside(page) -> None:
    """Every drawn figure's tick labels and axis titles lie inside its SVG: the margins that
    figures.py computes from the labels (automargin is off) leave room for them."""
    outside = page.evaluate("""() => {
        const out = [];
        for (const plot of document.querySelectorAll('.js-plotly-plot')) {
            const box = plot.querySelector('.main-svg').getBoundingClientRect();
            for (const t of plot.querySelectorAll('.xtick text, .ytick text, .g-xtitle text, .g-ytitle text')) {
                const r = t.getBoundingClientRect();
                if (!t.textContent.trim() || r.width === 0) continue;
                if (r.left < box.left - 1 || r.right > box.right + 1 || r.top < box.top - 1 || r.bottom > box.bottom + 1)
                    out.push(t.textContent);
            }
        }
        return out;
    }""")
    assert page.locator(".js-plotly-plot .xtick text").count() > 0
    assert outside == [], f"labels drawn outside their figure: {outside}"


def test_runs_view_and_drilldown_render(dashboard, page, tmp_path):
    open_view(page, dashboard, view="Runs")
    page.wait_for_selector("[data-testid='stDataFrame']", timeout=60_000)
    page.get_by_text("cannot be read").first.wait_for(timeout=30_000)  # the broken run's message
    page.screenshot(path=str(tmp_path / "runs-view.png"), full_page=True)

    open_view(page, dashboard, view="Drill-down", runs=["oisd"], step="30", prompt="0", layer="2")
    page.wait_for_selector(".lens-table td", timeout=60_000)
    assert page.get_by_text("Logit lens: top-1 token").count() >= 1
    # The lens grid is an HTML table: its style reached the page (coloured, bordered cells) and
    # each cell has its tooltip.
    cell = page.locator(".lens-table td").first
    assert cell.evaluate("c => getComputedStyle(c).borderCollapse === 'collapse' || "
                         "getComputedStyle(c.closest('table')).borderCollapse === 'collapse'")
    assert cell.evaluate("c => getComputedStyle(c).backgroundColor") not in ("rgba(0, 0, 0, 0)", "transparent")
    assert "top-k:" in cell.get_attribute("title")
    # One section at a time: the lens grid alone, then the three attention maps once chosen.
    assert page.locator(".js-plotly-plot").count() == 0
    page.locator("[data-testid='stMain'] label").filter(has_text="Attention maps").first.click()
    page.wait_for_function("() => document.querySelectorAll('.js-plotly-plot .hm').length >= 3", timeout=60_000)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=60_000)
    # Streamlit scrolls inside its main block, so a tall viewport is what shows the whole view.
    page.set_viewport_size({"width": 1500, "height": 2700})
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "drilldown-view.png"))
    assert_labels_inside(page)  # token labels on both axes, the keys' turned a quarter
    page.set_viewport_size({"width": 1500, "height": 1100})
    # The view's state is in the URL, so the link reopens it.
    assert "prompt=0" in page.url and "layer=2" in page.url and "view=Drill-down" in page.url
    assert "drilldown_show=Attention+maps" in page.url

    open_view(page, dashboard, view="Layer alignment", runs=["grpo", "oisd"], metric="lens_kl")
    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
    page.set_viewport_size({"width": 1500, "height": 1500})
    page.wait_for_timeout(500)
    page.screenshot(path=str(tmp_path / "alignment-view.png"))
    assert_labels_inside(page)  # the runs' names beside their rows
    # The table behind a view is written when its download button is clicked (deferred): the
    # file that arrives holds the view's rows.
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="Download table (CSV)").first.click()
    rows = Path(download.value.path()).read_text().splitlines()
    assert rows[0].split(",")[:2] == ["run", "step"] and len(rows) > 1
    assert download.value.suggested_filename == "alignment-lens_kl.csv"
    # Layer alignment's weight-drift section: the block x checkpoint heat map, drawn in the browser.
    page.locator("[data-testid='stMain'] label").filter(has_text="Weight drift").first.click()
    page.get_by_text("Where training changed the weights").first.wait_for(timeout=30_000)
    page.get_by_text("Weight drift:").first.wait_for(timeout=30_000)
    assert page.get_by_text("block 1 moved most").count() >= 1

    open_view(page, dashboard, view="Training", runs=["../grpo"])
    page.get_by_text("Refused run").first.wait_for(timeout=30_000)
