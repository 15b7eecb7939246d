"""``oisd probe`` spread over processes (``accelerate launch --multi_gpu --num_processes 2`` on
CPU, gloo): the analysis folder equals one process's, value for value; each checkpoint's files
are written by exactly one process; a 2-process probe killed midway and launched again ends
with the same folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import kill_tree
from workbench.storage.atomic import read_provenance

REPO = Path(__file__).resolve().parents[2]
KINDS = ("metrics", "topk", "cells", "attn", "drift", "lens", "patch")
FLAGS = ["--exit", "--learned-lens", "--patch", "--detail-prompts", "1"]


def _probe(run_dir: Path, env: dict, processes: int, wait: bool = True):
    launch = [sys.executable]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(port)]
    command = [*launch, "-m", "workbench.cli", "probe", str(run_dir), *FLAGS]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {p.name: pd.read_parquet(p) for p in sorted((run_dir / "analysis").glob("*.parquet"))}


@pytest.fixture(scope="module")
def four_checkpoints(tmp_path_factory, coin_model_dir, coin_data, run_overrides) -> Path:
    """A run of 4 checkpoints on the coin task (steps 1..4)."""
    from trainer.config import load_config
    from trainer.run import train

    run_dir = tmp_path_factory.mktemp("probe-processes") / "run"
    train(load_config("oisd", run_overrides(coin_model_dir, run_dir, data=coin_data, steps=4, keep_last=4,
                                            probe_every=0, eval_every=0, rollout__prompts_per_step=4)))
    assert len(list((run_dir / "checkpoints").glob("step-*"))) == 4
    return run_dir


def test_two_processes_write_what_one_does_each_checkpoint_once(four_checkpoints, tmp_path, cli_env):
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(four_checkpoints, one)
    shutil.copytree(four_checkpoints, two)
    _probe(one, cli_env, 1)
    result = _probe(two, cli_env, 2)
    assert result.stdout.count("analysed 4, up to date 0, skipped 0") == 1  # one summary, every checkpoint
    a, b = _tables(one), _tables(two)
    assert sorted(a) == sorted(b) == sorted(f"step-{s:06d}-{k}.parquet" for s in range(1, 5) for k in KINDS)
    for name in a:
        frame_a = a[name].drop(columns=["run"], errors="ignore").reset_index(drop=True)
        frame_b = b[name].drop(columns=["run"], errors="ignore").reset_index(drop=True)
        pd.testing.assert_frame_equal(frame_b, frame_a, check_exact=True, obj=name)
    # Each checkpoint was made by one process, and both processes worked.
    makers = {s: read_provenance(two / "analysis" / f"step-{s:06d}-metrics.parquet")["process"] for s in range(1, 5)}
    assert makers == {1: 0, 2: 1, 3: 0, 4: 1}
    for step, maker in makers.items():
        for kind in ("topk", "lens", "patch"):
            assert read_provenance(two / "analysis" / f"step-{step:06d}-{kind}.parquet")["process"] == maker


def test_a_killed_two_process_probe_continues_where_it_stopped(four_checkpoints, tmp_path, cli_env):
    one, killed = tmp_path / "one", tmp_path / "killed"
    shutil.copytree(four_checkpoints, one)
    shutil.copytree(four_checkpoints, killed)
    _probe(one, cli_env, 1)
    victim = _probe(killed, cli_env, 2, wait=False)
    try:
        deadline = time.time() + 300
        while (not list((killed / "analysis").glob("*-metrics.parquet")) and victim.poll() is None
               and time.time() < deadline):
            time.sleep(0.05)
        assert victim.poll() is None, f"the probe ended before the kill: {victim.stderr.read()[-2000:]}"
        kill_tree(victim.pid)
    finally:
        if victim.poll() is None:
            kill_tree(victim.pid)
    partial = sorted(p.name for p in (killed / "analysis").glob("*-metrics.parquet"))
    assert 1 <= len(partial) < 4, partial  # killed midway
    result = _probe(killed, cli_env, 2)
    assert f"up to date {len(partial)}" in result.stdout
    a, b = _tables(one), _tables(killed)
    assert sorted(a) == sorted(b)
    for name in a:
        pd.testing.assert_frame_equal(b[name].drop(columns=["run"], errors="ignore").reset_index(drop=True),
                                      a[name].drop(columns=["run"], errors="ignore").reset_index(drop=True),
                                      check_exact=True, obj=name)
    assert not list(killed.glob("**/.tmp-*"))  # no half-written file left behind
