"""Resume after SIGKILL: the same weights and the same metrics as an uninterrupted run.

Two ``oisd train`` processes start together on the coin task (RLSD: its frozen
teacher is part of the trainer state, re-synced every 4 steps, so a resume between
syncs must restore it from the checkpoint). One runs to the end; the other is
killed with SIGKILL at a random moment once two checkpoints exist. Then the newest
complete checkpoint of the killed run is truncated on disk, and ``--resume`` must
skip it with a warning, fall back to the previous one, and finish with the same
final weights and the same metrics.jsonl (minus timings) as the uninterrupted run.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

STEPS = 8


def _train_cmd(run_dir: Path, overrides: list[str], resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "workbench.cli", "train", "--config", "rlsd", "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def test_sigkill_then_resume_matches_an_uninterrupted_run(coin_model_dir, coin_data, tmp_path, run_overrides,
                                                          cli_env):
    overrides = [o for o in run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=STEPS,
                                          rollout__prompts_per_step=4, probe_every=3, eval_every=3,
                                          keep_last=3, rlsd__sync_every=4, rlsd__lambda_decay_steps=10)
                 if not o.startswith("run_dir=")]
    full, killed = tmp_path / "full", tmp_path / "killed"
    root = Path(__file__).resolve().parents[2]
    popen = dict(cwd=root, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference = subprocess.Popen(_train_cmd(full, overrides), **popen)
    victim = subprocess.Popen(_train_cmd(killed, overrides), **popen)
    try:
        second = killed / "checkpoints" / "step-000002"
        deadline = time.time() + 120
        while not second.exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        delay = random.uniform(0.0, 0.4)
        time.sleep(delay)
        assert victim.poll() is None, f"the run ended before the kill (delay {delay:.2f}s): {victim.stderr.read()}"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL

    complete = sorted(p for p in (killed / "checkpoints").glob("step-*") if (p / "manifest.json").is_file())
    assert len(complete) >= 2, f"delay {delay:.2f}s"
    assert complete[-1].name != f"step-{STEPS:06d}"
    newest, fallback = complete[-1], complete[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write on disk

    resumed = subprocess.run(_train_cmd(killed, overrides, resume=True), timeout=300, **popen)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"skipping checkpoint {newest}" in resumed.stderr
    assert f"from {fallback.name}" in resumed.stderr  # "resuming <run> from step-00000k"
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]

    final = f"checkpoints/step-{STEPS:06d}"
    for name in ("model.safetensors", "rlsd_teacher.safetensors"):
        a, b = load_file(full / final / name), load_file(killed / final / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{name}:{key}")
    # The run did move the weights (the comparison is not between two copies of the start).
    start = load_file(coin_model_dir / "model.safetensors")
    moved = load_file(full / final / "model.safetensors")
    assert any(not torch.equal(start[k], moved[k]) for k in start)

    rows_full, rows_resumed = _metrics(full), _metrics(killed)
    assert [r["step"] for r in rows_resumed] == list(range(STEPS + 1))  # every step once, no duplicates
    assert len(rows_full) == len(rows_resumed)
    for a, b in zip(rows_full, rows_resumed):
        assert a.keys() == b.keys()
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7), a["step"]
    assert any(r["reward_std"] > 0 for r in rows_full[1:])  # advantages were not all 0

    from workbench.runstore import Run

    probes_full = Run.open(full).probes().drop(columns="run")
    probes_resumed = Run.open(killed).probes().drop(columns="run")
    assert sorted(probes_resumed["step"].unique()) == [0, 3, 6, STEPS]
    pd.testing.assert_frame_equal(probes_resumed.reset_index(drop=True), probes_full.reset_index(drop=True),
                                  rtol=1e-6, atol=1e-7)
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "finished" and info["resumes"][-1]["step"] == int(fallback.name[5:])


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tiny_qwen3_dir, tmp_path, run_overrides, caplog):
    import logging

    from trainer.config import load_config
    from trainer.run import train

    run_dir = tmp_path / "r"
    cfg = load_config("grpo", run_overrides(tiny_qwen3_dir, run_dir, steps=1, probe_every=0, eval_every=0,
                                            data__arithmetic__n_train=50, data__arithmetic__n_test=5))
    train(cfg)
    before = (run_dir / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO, logger="trainer.loop"):
        train(cfg, resume=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "trainer.loop"]
    assert any("already finished its 1 steps; nothing to train" in m for m in messages)
    assert not any("steps 2..1" in m for m in messages)
    assert (run_dir / "metrics.jsonl").read_text() == before
