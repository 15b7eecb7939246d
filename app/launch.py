"""Start the dashboard server: ``oisd dashboard [RUNS_ROOT] [--host] [--port]``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path

from workbench.errors import WorkbenchError

#: The dashboard's port unless ``--port`` names another (Streamlit's own default).
DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
MAIN_SCRIPT = Path(__file__).resolve().parent / "main.py"
REPO_ROOT = MAIN_SCRIPT.parent.parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def streamlit_command(runs_root: str | os.PathLike, host: str, port: int) -> list[str]:
    """The ``python -m streamlit run app/main.py ...`` command line for a runs root.

    Always headless: a non-headless Streamlit asks for an e-mail address on stdin on
    first use, which would hang a non-interactive start. :func:`launch` opens the
    browser itself instead. The file watcher is off because the app never edits
    itself and polling the tree costs CPU on small machines.
    """
    return [
        sys.executable, "-m", "streamlit", "run", str(MAIN_SCRIPT),
        "--server.address", str(host),
        "--server.port", str(int(port)),
        "--server.headless", "true",
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "viewer",
        "--",
        "--root", str(Path(runs_root).resolve()),
    ]


def wait_for_health(url: str, timeout_s: float = 60.0) -> bool:
    """Poll ``{url}/_stcore/health`` until the server answers 200; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _open_browser_when_ready(url: str) -> None:
    """Open ``url`` in the user's browser once the server answers its health check."""
    if wait_for_health(url):
        webbrowser.open(url)


def launch(
    runs_root: str | os.PathLike,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    headless: bool = False,
) -> int:
    """Run the dashboard over ``runs_root`` until it is stopped (Ctrl-C).

    Args:
        runs_root: Folder holding run folders (or a single run folder).
        host: Bind address; the default keeps the dashboard on this machine.
        port: TCP port.
        headless: Do not open a browser tab.

    Returns:
        The Streamlit process's exit status (0 after Ctrl-C).

    Raises:
        WorkbenchError: ``runs_root`` does not exist or is not a folder, or the port
            is out of range.
    """
    root = Path(runs_root)
    if not root.exists():
        raise WorkbenchError(f"runs root {root} does not exist")
    if not root.is_dir():
        raise WorkbenchError(f"runs root {root} is not a folder")
    if not 0 < int(port) < 65536:
        raise WorkbenchError(f"port must be in 1..65535, got {port}")
    url = f"http://{'localhost' if host in LOCAL_HOSTS else host}:{port}"
    if host not in LOCAL_HOSTS:
        print(f"warning: binding {host}; anyone who can reach this machine can read {root.resolve()}",
              file=sys.stderr)
    print(f"Dashboard over {root.resolve()} at {url} (Ctrl-C to stop)", flush=True)

    # The app imports `app` and `workbench`; make them importable in the child even
    # when the package is used from a checkout rather than installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    process = subprocess.Popen(streamlit_command(root, host, port), env=env)

    # SIGTERM (kill, systemd, a container stop) must stop the Streamlit child too, or it
    # keeps the port after the parent is gone: turn it into the Ctrl-C path below.
    def _on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    if not headless:
        threading.Thread(target=_open_browser_when_ready, args=(url,), daemon=True).start()
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
