"""`oisd dashboard` start-up: the command line it runs and its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app import launch as launch_module
from workbench.errors import WorkbenchError

REPO = Path(__file__).resolve().parents[2]


def test_command_binds_localhost_headless_with_the_root(tmp_path):
    command = launch_module.streamlit_command(tmp_path, "127.0.0.1", 8765)
    assert command[:5] == [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "main.py")]
    pairs = dict(zip(command[5:-3:2], command[6:-3:2]))
    assert pairs["--server.address"] == "127.0.0.1" and pairs["--server.port"] == "8765"
    assert pairs["--server.headless"] == "true" and pairs["--browser.gatherUsageStats"] == "false"
    assert command[-3:] == ["--", "--root", str(tmp_path.resolve())]


def test_launch_runs_streamlit_and_returns_its_status(tmp_path, monkeypatch):
    calls = []

    class FakeProcess:
        def __init__(self, command, env):
            calls.append((command, env))

        def wait(self, timeout=None):
            return 3

    monkeypatch.setattr(subprocess, "Popen", FakeProcess)
    assert launch_module.launch(tmp_path, port=9001, headless=True) == 3
    command, env = calls[0]
    assert command[command.index("--server.port") + 1] == "9001"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"  # the default
    assert str(REPO) in env["PYTHONPATH"].split(":")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is not a folder"),
])
def test_bad_root_is_a_one_line_error(tmp_path, make, message):
    with pytest.raises(WorkbenchError, match=message) as info:
        launch_module.launch(make(tmp_path), headless=True)
    assert "\n" not in str(info.value)


def test_cli_reports_a_missing_root_with_exit_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "dashboard", str(tmp_path / "nope")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: runs root {tmp_path / 'nope'} does not exist"


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_sigterm_stops_the_streamlit_child(tmp_path):
    """SIGTERM to `oisd dashboard` must not leave Streamlit listening (re-parented to PID 1)."""
    import os
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-m", "workbench.cli", "dashboard", str(tmp_path), "--headless",
                               "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not _port_open(port):
            assert parent.poll() is None and time.time() < deadline, "the dashboard did not start"
            time.sleep(0.2)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 0
        deadline = time.time() + 15
        while _port_open(port) and time.time() < deadline:
            time.sleep(0.2)
        assert not _port_open(port), "Streamlit still listens after the parent got SIGTERM"
    finally:
        if parent.poll() is None:
            parent.kill()
