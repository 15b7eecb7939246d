"""Resume after SIGKILL, on each backend: the same weights, bit for bit, and the same metrics
as an uninterrupted run.

Two ``oisd train`` processes start together on the coin task (RLSD: its frozen teacher is
part of the trainer state, re-synced every 3 steps, so a resume between syncs must restore
it from the checkpoint). One runs to the end; the other is killed with SIGKILL at a random
moment once two checkpoints exist. Then the newest complete checkpoint of the killed run is
cut short on disk, and ``--resume`` must skip it, fall back to the previous one, and finish
with the same final weights and frozen teacher (``torch.equal``) and the same metrics.jsonl
(minus timings, exactly) as the uninterrupted run.
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
SYNC = 3  # the frozen teacher's re-sync period: the resume starts after its first re-sync, before the next


def _train_cmd(run_dir: Path, overrides: list[str], resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "workbench.cli", "train", "--config", "rlsd", "--run-dir", str(run_dir)]
    for item in overrides:
        cmd += ["--set", item]
    return cmd + (["--resume"] if resume else [])


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def _complete(backend: str, run_dir: Path) -> list[Path]:
    """The checkpoints a resume may start from, oldest first: the run folder's (manifest
    written last) on the built-in backend, TRL's own (``trainer_state.json`` written last)."""
    if backend == "builtin":
        found = [p for p in (run_dir / "checkpoints").glob("step-*") if (p / "manifest.json").is_file()]
    else:
        found = [p for p in (run_dir / "trl").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]))


@pytest.mark.parametrize("backend", ["builtin", "trl"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(backend, coin_model_dir, coin_data, tmp_path,
                                                          run_overrides, cli_env):
    overrides = [o for o in run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=STEPS,
                                          rollout__prompts_per_step=4, probe_every=3, eval_every=3, backend=backend,
                                          keep_last=3, rlsd__sync_every=SYNC, rlsd__lambda_decay_steps=10)
                 if not o.startswith("run_dir=")]
    full, killed = tmp_path / "full", tmp_path / "killed"
    root = Path(__file__).resolve().parents[2]
    popen = dict(cwd=root, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference = subprocess.Popen(_train_cmd(full, overrides), **popen)
    victim = subprocess.Popen(_train_cmd(killed, overrides), **popen)
    try:
        deadline = time.time() + 120
        while (not any(int(p.name.rsplit("-", 1)[1]) > SYNC + 1 for p in _complete(backend, killed))
               and victim.poll() is None and time.time() < deadline):
            time.sleep(0.02)
        delay = random.uniform(0.0, 0.2)
        time.sleep(delay)
        assert victim.poll() is None, f"the run ended before the kill (delay {delay:.2f}s): {victim.stderr.read()}"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL

    complete = _complete(backend, killed)
    assert len(complete) >= 2, f"delay {delay:.2f}s"
    assert int(complete[-1].name.rsplit("-", 1)[1]) < STEPS
    # The resume must start between two re-syncs of the frozen teacher, after its first one
    # (before it the teacher is the start model, which a resume that lost it would rebuild):
    # the newest such checkpoint before the newest of all. Every newer one is cut short, as a
    # kill while writing it would leave it, so the resume must skip them.
    fallback = [p for p in complete[:-1] if (k := int(p.name.rsplit("-", 1)[1])) > SYNC and k % SYNC][-1]
    fallback_step = int(fallback.name.rsplit("-", 1)[1])
    newer = [p for p in complete if int(p.name.rsplit("-", 1)[1]) > fallback_step]
    newest = newer[-1]
    for folder in newer:
        if backend == "builtin":
            weights = folder / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a torn write on disk
        else:
            (folder / "trainer_state.json").unlink()  # HF writes it last

    resumed = subprocess.run(_train_cmd(killed, overrides, resume=True), timeout=300, **popen)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    if backend == "builtin":
        assert f"skipping checkpoint {newest}" in resumed.stderr
        assert f"from {fallback.name}" in resumed.stderr  # "resuming <run> from step-00000k"
    else:
        assert f"from TRL's {fallback.name} (step {fallback_step})" in resumed.stderr
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-2000:]

    # Bit-identical, as docs/design.md says: the weights of the last checkpoint, and the frozen
    # teacher of the newest checkpoint that holds one (the built-in backend's run folder; TRL's
    # own checkpoint-N).
    final = Path("checkpoints") / f"step-{STEPS:06d}"
    teacher = final if backend == "builtin" else Path("trl") / f"checkpoint-{STEPS}"
    for folder, name in ((final, "model.safetensors"), (teacher, "frozen_teacher.safetensors")):
        a, b = load_file(full / folder / name), load_file(killed / folder / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(b[key], a[key]), f"{folder / name}:{key}"
    # The run did move the weights (the comparison is not between two copies of the start),
    # and the teacher is not the start model (it was re-synced from the policy).
    start = load_file(coin_model_dir / "model.safetensors")
    moved = load_file(full / final / "model.safetensors")
    assert any(not torch.equal(start[k], moved[k]) for k in start)
    synced = load_file(full / teacher / "frozen_teacher.safetensors")
    assert any(not torch.equal(start[k], synced[k]) for k in start)

    rows_full, rows_resumed = _metrics(full), _metrics(killed)
    assert [r["step"] for r in rows_resumed] == list(range(STEPS + 1))  # every step once, no duplicates
    assert rows_resumed == rows_full  # every logged number, exactly
    assert any(r["reward_std"] > 0 for r in rows_full[1:])  # advantages were not all 0

    from workbench.storage.runstore import Run

    probes_full = Run.open(full).probes().drop(columns="run")
    probes_resumed = Run.open(killed).probes().drop(columns="run")
    assert sorted(probes_resumed["step"].unique()) == [0, 3, 6, STEPS]
    pd.testing.assert_frame_equal(probes_resumed.reset_index(drop=True), probes_full.reset_index(drop=True),
                                  check_exact=True)
    info = json.loads((killed / "run.json").read_text())
    assert info["status"] == "finished" and info["resumes"][-1]["step"] == fallback_step


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
