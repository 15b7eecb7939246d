"""The TRL backend under DeepSpeed ZeRO-3 on CPU (``configs/accelerate/zero3-cpu.yaml``:
2 processes over gloo, DeepSpeed's CPU accelerator). Skipped when DeepSpeed is not installed.

ZeRO-3 shards every parameter over the processes, so everything that reads weights
outside the engine's forward must gather them: evaluation and probes (on every process),
checkpoints (full HF weights), the detached logit-lens readout, the vocabulary size, the
weight-spread check. The update must equal one process's (no DeepSpeed) on the same
global batch (``tests/trainer/trl_ranks.py``), and ``oisd probe`` must open the checkpoint.
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

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "accelerate" / "zero3-cpu.yaml"
STEPS = 2


def _zero3_launch() -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).with_name("accelerate")
    return [str(accelerate), "launch", "--config_file", str(CONFIG), "--main_process_port", str(port)]


@pytest.fixture
def ds_env(cli_env) -> dict:
    return {**cli_env, "DS_ACCELERATOR": "cpu"}


def _steps(history: list[dict]) -> list[dict]:
    return [row for row in history if "reward" in row]


def test_zero3_update_equals_one_process(coin_model_dir, coin_data, tmp_path, run_overrides, cli_env, ds_env):
    keys = run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=STEPS, backend="trl",
                         rollout__prompts_per_step=4, optim__micro_batch_size=2, optim__lr=1e-3,
                         probe_every=0, eval_every=0)
    keys = [k for k in keys if not k.startswith("run_dir=")]
    runs = {}
    for name, launch, env in (("one", [sys.executable], cli_env), ("zero3", _zero3_launch(), ds_env)):
        out = tmp_path / name
        out.mkdir()
        command = [*launch, str(REPO / "tests" / "trainer" / "trl_ranks.py"), "oisd", str(out), *keys,
                   f"run_dir={out / 'run'}"]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out
        print(name, [(r["loss"], r["grad_norm"]) for r in _steps(json.loads((out / "rank0.json").read_text()))])
    assert not (runs["zero3"] / "rank1.safetensors").exists()  # the sharded path: process 0 wrote gathered weights
    one, zero3 = (load_file(runs[n] / "rank0.safetensors") for n in ("one", "zero3"))
    start = load_file(coin_model_dir / "model.safetensors")
    assert set(zero3) >= set(start)
    for key in start:
        torch.testing.assert_close(zero3[key], one[key], rtol=0, atol=1e-5, msg=key)
    assert max(float((one[k] - start[k]).abs().max()) for k in start) > 1e-3  # training moved them

    rows_one = _steps(json.loads((runs["one"] / "rank0.json").read_text()))
    rows_z3 = _steps(json.loads((runs["zero3"] / "rank0.json").read_text()))
    assert len(rows_one) == len(rows_z3) == STEPS
    assert all(r["grad_norm"] > 0 for r in rows_z3)
    for r1, r2 in zip(rows_one, rows_z3):
        for key in ("loss", "grad_norm", "reward", "loss/policy", "loss/think", "loss/attn", "entropy"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)


def test_oisd_train_under_zero3_and_probe_the_checkpoint(coin_model_dir, coin_data, tmp_path, run_overrides,
                                                         ds_env, cli_env):
    """The command a user runs: evaluation and probes at step 0 and at the end (run on
    every process), a checkpoint of full HF weights, and ``oisd probe`` opens it."""
    run_dir = tmp_path / "z3"
    keys = run_overrides(coin_model_dir, run_dir, data=coin_data, steps=STEPS, rollout__prompts_per_step=4,
                         optim__lr=1e-3, checkpoint_every=STEPS, probe_every=STEPS, eval_every=STEPS)
    sets = [x for item in keys for x in ("--set", item)]
    command = [*_zero3_launch(), "-m", "workbench.cli", "train", "--backend", "trl", "--config", "oisd", *sets]
    result = subprocess.run(command, cwd=REPO, env=ds_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backend"] == "trl" and info["status"] == "finished"
    assert info["distributed"] == {"type": "deepspeed", "processes": 2, "weight_spread": 0.0}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert any(k.startswith("probe/") for k in rows[-1])
    assert all(r["grad_norm"] > 0 for r in rows[1:])
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    saved, start = load_file(ckpt / "model.safetensors"), load_file(coin_model_dir / "model.safetensors")
    assert {k: v.shape for k, v in saved.items() if k in start} == {k: v.shape for k, v in start.items()}
    assert max(float((saved[k] - start[k]).abs().max()) for k in start) > 1e-4

    probe = subprocess.run([sys.executable, "-m", "workbench.cli", "probe", str(run_dir)], cwd=REPO, env=cli_env,
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]


def test_rlsd_resyncs_its_frozen_copy_under_zero3(coin_model_dir, coin_data, tmp_path, run_overrides, ds_env):
    """RLSD's frozen teacher is a full replica made before DeepSpeed partitions the policy;
    re-syncing it (every step here) gathers the policy's shards on every process."""
    run_dir = tmp_path / "rlsd"
    keys = run_overrides(coin_model_dir, run_dir, data=coin_data, steps=STEPS, rollout__prompts_per_step=4,
                         optim__lr=1e-3, rlsd__sync_every=1, checkpoint_every=STEPS, probe_every=0, eval_every=0)
    sets = [x for item in keys for x in ("--set", item)]
    command = [*_zero3_launch(), "-m", "workbench.cli", "train", "--backend", "trl", "--config", "rlsd", *sets]
    result = subprocess.run(command, cwd=REPO, env=ds_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["distributed"]["type"] == "deepspeed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
