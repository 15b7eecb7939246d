"""Two processes give the same update as one process with the same global batch.

``accelerate launch --multi_gpu --num_processes 2`` on a CPU-only machine starts two
processes with torchrun and gloo (accelerate 1.x: ``--cpu --num_processes 2`` runs
*one* process). Each process samples half of the step's prompts; rewards are
gathered so advantages are over the global batch, every loss divides by the global
normaliser, and gradients are summed, so the weights after 3 OISD steps (4 prompts
x 2 responses, micro-batches of 2 to exercise accumulation) must equal those of one
process up to float rounding (the two processes pad their own prompts, which
changes the order of a few float operations, never a sampled token).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 3


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
                              rollout__prompts_per_step=4, optim__micro_batch_size=2, optim__lr=1e-3,
                              checkpoint_every=STEPS, probe_every=0, eval_every=0):
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
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # training moved them (100x atol)

    rows_one, rows_two = _metrics(one), _metrics(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for r1, r2 in zip(rows_one, rows_two):
        assert r1.keys() == r2.keys()
        assert r2 == pytest.approx(r1, rel=1e-4, abs=1e-6), r1["step"]
    assert any(r["reward_std"] > 0 for r in rows_one)  # GRPO and OISD terms had advantages to use
    assert any(abs(r["loss/think"]) > 0 for r in rows_one)


def test_two_processes_resume(coin_model_dir, coin_data, tmp_path, run_overrides, cli_env):
    """A killed 2-process run resumes with 2 processes (safetensors refused accelerate's 'cpu:0')."""
    run_dir = tmp_path / "two"
    sets = []
    for item in run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=2,
                              rollout__prompts_per_step=4, checkpoint_every=1, probe_every=0, eval_every=0):
        if not item.startswith(("run_dir=", "steps=")):
            sets += ["--set", item]
    accelerate = Path(sys.executable).with_name("accelerate")
    root = Path(__file__).resolve().parents[2]

    def launch(steps: int, *extra: str):
        command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   "-m", "workbench.cli", "train", "--config", "grpo", *sets, "--set", f"steps={steps}",
                   "--run-dir", str(run_dir), *extra]
        return subprocess.run(command, cwd=root, env=cli_env, capture_output=True, text=True, timeout=300)

    first = launch(2)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = launch(3, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step-000002 (step 2)" in resumed.stderr
    assert [r["step"] for r in _metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step-000003" / "manifest.json").is_file()
