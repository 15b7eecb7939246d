"""Two processes give the same update as one process with the same global batch.

``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine starts two
processes with torchrun and gloo (accelerate 1.x: ``--cpu --num_processes 2`` runs
*one* process). Each process samples half of the step's prompts; rewards are
gathered so advantages are over the global batch, every loss divides by the global
normaliser, and gradients are summed, so the update of 3 OISD steps (4 prompts x 2
responses, micro-batches of 2 to exercise accumulation) must equal one process's up to
float rounding (the two processes pad their own prompts, which changes the order of a few
float operations, never a sampled token). The update is compared on plain SGD (the
learning rate times the gradient; see ``tests/conftest.assert_same_update``): after Adam
steps, rounding alone can move an entry whose gradient is nearly 0 by the whole rate.

A 2-process run killed with SIGKILL mid-training and resumed with 2 processes ends with the
uninterrupted run's weights, bit for bit.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_same_update, kill_tree

STEPS = 3
SGD_LR, SGD_REL = 0.05, 2e-3  # as in test_zero3.py (measured 9.5e-7 of the update's scale)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def test_two_processes_match_one(coin_model_dir, coin_data, tmp_path, run_overrides, cli_env):
    one, two = tmp_path / "one", tmp_path / "two"
    sets = []
    for item in run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=STEPS,
                              rollout__prompts_per_step=4, optim__micro_batch_size=2, optim__name="sgd",
                              optim__lr=SGD_LR, checkpoint_every=STEPS, probe_every=0, eval_every=0):
        if not item.startswith("run_dir="):
            sets += ["--set", item]
    args = ["-m", "workbench.cli", "train", "--config", "oisd", *sets, "--run-dir"]
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    root = Path(__file__).resolve().parents[2]
    popen = dict(cwd=root, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = subprocess.Popen([sys.executable, *args, str(one)], **popen)
    double = subprocess.run([*launch, *args, str(two)], timeout=300, **popen)
    out, err = single.communicate(timeout=300)
    assert single.returncode == 0, err[-2000:]
    assert double.returncode == 0, double.stderr[-3000:]
    assert "on 2 process(es)" in double.stderr and "on 1 process(es)" in err
    # Every process ended with the same weights (run.json's fingerprint spread over ranks).
    info = json.loads((two / "run.json").read_text())
    assert info["distributed"] == {"type": "multi_cpu", "processes": 2, "weight_spread": 0.0}

    final = f"checkpoints/step-{STEPS:06d}/model.safetensors"
    a, b = load_file(one / final), load_file(two / final)
    start = load_file(coin_model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    print("worst difference over the update's scale:", assert_same_update(b, a, start, SGD_REL))

    rows_one, rows_two = _metrics(one), _metrics(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for r1, r2 in zip(rows_one, rows_two):
        assert r1.keys() == r2.keys()
        assert r2 == pytest.approx(r1, rel=1e-4, abs=1e-6), r1["step"]
    assert any(r["reward_std"] > 0 for r in rows_one)  # GRPO and OISD terms had advantages to use
    assert any(abs(r["loss/think"]) > 0 for r in rows_one)


def test_two_processes_killed_and_resumed_match_an_uninterrupted_run(coin_model_dir, coin_data, tmp_path,
                                                                    run_overrides, cli_env):
    """Two 2-process runs start together; one is killed (SIGKILL to every process of the
    launch) once two checkpoints exist and resumed with 2 processes (safetensors refused
    accelerate's 'cpu:0' once: that is tested too); both end with the same weights, bit for
    bit, and the same logged numbers."""
    steps = 6
    sets = []
    for item in run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=steps,
                              rollout__prompts_per_step=4, checkpoint_every=1, probe_every=0, eval_every=0):
        if not item.startswith("run_dir="):
            sets += ["--set", item]
    accelerate = Path(sys.executable).with_name("accelerate")
    root = Path(__file__).resolve().parents[2]

    def command(run_dir: Path, *extra: str) -> list[str]:
        return [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                "-m", "workbench.cli", "train", "--config", "grpo", *sets, "--run-dir", str(run_dir), *extra]

    full, killed = tmp_path / "full", tmp_path / "killed"
    popen = dict(cwd=root, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reference = subprocess.Popen(command(full), **popen)
    victim = subprocess.Popen(command(killed), **popen)
    try:
        deadline = time.time() + 240
        while (len(list((killed / "checkpoints").glob("step-*/manifest.json"))) < 2 and victim.poll() is None
               and time.time() < deadline):
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.3))
        assert victim.poll() is None, f"the run ended before the kill: {victim.stderr.read()[-2000:]}"
        kill_tree(victim.pid)  # the launcher and both training processes (torchrun's own sessions too)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            kill_tree(victim.pid)
    done = sorted(p.parent.name for p in (killed / "checkpoints").glob("step-*/manifest.json"))
    assert 2 <= len(done) and done[-1] != f"step-{steps:06d}", done

    resumed = subprocess.run(command(killed, "--resume"), timeout=300, **popen)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from {done[-1]} (step {int(done[-1][5:])})" in resumed.stderr
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    final = f"checkpoints/step-{steps:06d}/model.safetensors"
    a, b = load_file(full / final), load_file(killed / final)
    start = load_file(coin_model_dir / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], start[k]) for k in start)  # it trained
    for key in a:
        assert torch.equal(b[key], a[key]), key
    rows_full, rows_resumed = _metrics(full), _metrics(killed)
    assert [r["step"] for r in rows_resumed] == list(range(1, steps + 1))
    assert rows_resumed == rows_full
    assert any(r["reward_std"] > 0 for r in rows_full) and all(r["grad_norm"] > 0 for r in rows_full)
    info = json.loads((killed / "run.json").read_text())
    assert info["distributed"]["weight_spread"] == 0.0 and info["resumes"][-1]["step"] == int(done[-1][5:])
