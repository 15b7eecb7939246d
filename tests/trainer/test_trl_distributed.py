"""The TRL backend with two processes (DDP over gloo on CPU) on a policy that earns rewards.

Data parallelism is correct when (1) the gradients are not zero, (2) every process ends
with the same weights, and (3) the update equals one process's on the same global batch.
``tests/trainer/trl_ranks.py`` trains on rollouts keyed by their global row, so 1 and 2
processes see the same batch; each process writes its own weights and logs. The
``oisd train`` run through ``accelerate launch`` checks the production path: run.json's
process count and weight spread, and per-term losses with their 1-process meaning.
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

from tests.conftest import assert_same_update

pytest.importorskip("trl")

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
# Plain SGD (see test_zero3.py): 2 processes' update equals 1 process's to the rounding of the
# gradients' two summation orders, whatever the CPU (measured 2.3e-6 of the update's scale).
SGD_LR, SGD_REL = 0.05, 2e-3


def _launch(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def _sets(overrides: list[str]) -> list[str]:
    return [x for item in overrides for x in ("--set", item)]


def _steps(history: list[dict]) -> list[dict]:
    return [row for row in history if "reward" in row]


def test_two_processes_hold_the_same_weights_and_match_one(coin_model_dir, coin_data, tmp_path, run_overrides,
                                                           cli_env):
    keys = run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=STEPS, backend="trl",
                         rollout__prompts_per_step=4, optim__micro_batch_size=2, optim__name="sgd",
                         optim__lr=SGD_LR, probe_every=0, eval_every=0)
    keys = [k for k in keys if not k.startswith("run_dir=")]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        command = [*_launch(n), str(REPO / "tests" / "trainer" / "trl_ranks.py"), "oisd", str(out), *keys,
                   f"run_dir={out / 'run'}"]
        result = subprocess.run(command, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[n] = out
    one = load_file(runs[1] / "rank0.safetensors")
    ranks = [load_file(runs[2] / f"rank{r}.safetensors") for r in (0, 1)]
    start = load_file(coin_model_dir / "model.safetensors")
    for key in one:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"ranks differ on {key}"
    print("worst difference over the update's scale:", assert_same_update(ranks[0], one, start, SGD_REL))

    rows_one = _steps(json.loads((runs[1] / "rank0.json").read_text()))
    rows_two = _steps(json.loads((runs[2] / "rank0.json").read_text()))
    assert len(rows_one) == len(rows_two) == STEPS
    assert all(r["grad_norm"] > 0 for r in rows_two)  # a policy that earns rewards: real gradients
    assert any(r["reward_std"] > 0 for r in rows_one)
    for r1, r2 in zip(rows_one, rows_two):
        for key in ("loss", "grad_norm", "reward", "loss/policy", "loss/think", "loss/attn", "entropy"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)


@pytest.mark.parametrize("config", ["oisd", "sdpg-ufkl"])
def test_oisd_train_on_two_processes(config, coin_model_dir, coin_data, tmp_path, run_overrides, cli_env):
    """The command a user runs: run.json records the launch and that the processes stayed in
    step; every ``loss/<term>`` means what it means on one process (the terms, times their
    coefficients, add up to ``loss``; SDPG's L_K is exactly 1 at step 1, policy = reference)."""
    run_dir = tmp_path / "two"
    keys = run_overrides(coin_model_dir, run_dir, data=coin_data, steps=STEPS, rollout__prompts_per_step=4,
                         optim__lr=1e-3, checkpoint_every=STEPS, probe_every=STEPS, eval_every=0)
    command = [*_launch(2), "-m", "workbench.cli", "train", "--backend", "trl", "--config", config, *_sets(keys)]
    result = subprocess.run(command, cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backend"] == "trl" and info["status"] == "finished"
    assert info["distributed"] == {"type": "multi_cpu", "processes": 2, "weight_spread": 0.0}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in steps)
    cfg = info["config"]
    for r in steps:
        if config == "oisd":
            coefs = {"policy": 1.0, "think": cfg["oisd"]["lambda_logit"], "attn": cfg["oisd"]["lambda_attn"]}
        else:
            coefs = {"policy": 1.0, "opd": r["sched/beta"], "ref_kl": cfg["sdpg"]["alpha"]}
        total = sum(c * r.get(f"loss/{name}", 0.0) for name, c in coefs.items())
        assert total == pytest.approx(r["loss"], rel=1e-4, abs=1e-6), r["step"]
    if config == "sdpg-ufkl":
        assert steps[0]["loss/ref_kl"] == pytest.approx(1.0, abs=1e-5)
    assert (run_dir / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors").is_file()
