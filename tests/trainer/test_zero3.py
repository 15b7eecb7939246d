"""The TRL backend under DeepSpeed ZeRO-3 on CPU (``configs/accelerate/zero3-cpu.yaml``:
2 processes over gloo, DeepSpeed's CPU accelerator). Skipped when DeepSpeed is not installed.

ZeRO-3 shards every parameter over the processes, so everything that reads weights
outside the engine's forward must gather them: evaluation and probes (on every process),
checkpoints (full HF weights), the detached logit-lens readout, the vocabulary size, the
weight-spread check. The update must equal one process's (no DeepSpeed) on the same
global batch (``tests/trainer/trl_ranks.py``), for the tied tiny Qwen3 and the untied tiny
Llama (its ``lm_head`` is a parameter of its own); ``oisd probe`` must open the checkpoint;
grpo, sdpg-ufkl and rlsd train with every ``loss/<term>`` meaning what it means on one
process; ``--resume`` continues from TRL's DeepSpeed checkpoint.
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
from trainer.distributed import ZERO3_SPREAD_NOTE

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


def _train(config: str, keys: list[str], env: dict, *flags: str) -> subprocess.CompletedProcess:
    sets = [x for item in keys for x in ("--set", item)]
    command = [*_zero3_launch(), "-m", "workbench.cli", "train", "--backend", "trl", "--config", config, *sets,
               *flags]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _terms_add_up(config: str, info: dict, rows: list[dict]) -> None:
    """``loss`` is the sum of the logged terms times their coefficients (the 1-process meaning)."""
    cfg = info["config"]
    for r in rows:
        coefs = {"policy": 1.0}
        if config == "oisd":
            coefs |= {"think": cfg["oisd"]["lambda_logit"], "attn": cfg["oisd"]["lambda_attn"]}
        elif config == "sdpg-ufkl":
            coefs |= {"opd": r["sched/beta"], "ref_kl": cfg["sdpg"]["alpha"]}
        total = sum(c * r.get(f"loss/{name}", 0.0) for name, c in coefs.items())
        assert total == pytest.approx(r["loss"], rel=1e-4, abs=1e-6), (config, r["step"])


# Compared on plain SGD, whose update is the learning rate times the (clipped) gradient: a
# gradient not reduced over the processes, or a shard dropped, changes the update by its own
# order, while ZeRO-3's reduce-scatter and one process's accumulation differ by the rounding
# of float32 gradients: measured 1.8e-5 (tied Qwen3) and 1.9e-4 (untied Llama, whose embedding
# rows sum many cancelling contributions) of the update's scale on this project's AVX2 machine,
# 2026-12-06; the printed worst case says it again on any other. SGD_REL leaves 10x of room. Adam
# is not compared: it divides each entry by its own gradient's magnitude, so entries whose
# gradient is nearly 0 move by up to the full learning rate on rounding alone (8.8e-4 apart on
# an AVX-512 CPU with equal gradient norms).
SGD_LR, SGD_REL = 0.05, 2e-3


@pytest.mark.parametrize("model", ["coin_model_dir", "coin_llama_dir"], ids=["qwen3-tied", "llama-untied"])
def test_zero3_update_equals_one_process(model, request, coin_data, tmp_path, run_overrides, cli_env, ds_env):
    coin_model_dir = request.getfixturevalue(model)
    keys = run_overrides(coin_model_dir, tmp_path / "unused", data=coin_data, steps=STEPS, backend="trl",
                         rollout__prompts_per_step=4, optim__micro_batch_size=2, optim__name="sgd",
                         optim__lr=SGD_LR, probe_every=0, eval_every=0)
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
    print("worst difference over the update's scale:", assert_same_update(zero3, one, start, SGD_REL))

    rows_one = _steps(json.loads((runs["one"] / "rank0.json").read_text()))
    rows_z3 = _steps(json.loads((runs["zero3"] / "rank0.json").read_text()))
    assert len(rows_one) == len(rows_z3) == STEPS
    assert all(r["grad_norm"] > 0 for r in rows_z3)
    assert any(r["reward_std"] > 0 for r in rows_one)  # a policy that earns rewards: real gradients
    for r1, r2 in zip(rows_one, rows_z3):
        for key in ("loss", "grad_norm", "reward", "loss/policy", "loss/think", "loss/attn", "entropy"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (r1["step"], key)


@pytest.mark.parametrize("model", ["coin_model_dir", "coin_llama_dir"], ids=["qwen3-tied", "llama-untied"])
def test_oisd_train_under_zero3_and_probe_the_checkpoint(model, request, coin_data, tmp_path, run_overrides,
                                                         ds_env, cli_env):
    """The command a user runs: evaluation and probes at step 0 and at the end (run on
    every process), a checkpoint of full HF weights (the untied Llama's ``lm_head`` too),
    and ``oisd probe`` opens it."""
    coin_model_dir = request.getfixturevalue(model)
    run_dir = tmp_path / "z3"
    keys = run_overrides(coin_model_dir, run_dir, data=coin_data, steps=STEPS, rollout__prompts_per_step=4,
                         optim__lr=1e-3, checkpoint_every=STEPS, probe_every=STEPS, eval_every=STEPS)
    _train("oisd", keys, ds_env)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["backend"] == "trl" and info["status"] == "finished"
    assert info["distributed"] == {"type": "deepspeed", "processes": 2, "weight_spread": None,
                                   "weight_spread_note": ZERO3_SPREAD_NOTE}
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    assert any(k.startswith("probe/") for k in rows[-1])
    assert all(r["grad_norm"] > 0 for r in rows[1:])
    _terms_add_up("oisd", info, rows[1:])
    ckpt = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    saved, start = load_file(ckpt / "model.safetensors"), load_file(coin_model_dir / "model.safetensors")
    assert {k: v.shape for k, v in saved.items() if k in start} == {k: v.shape for k, v in start.items()}
    assert max(float((saved[k] - start[k]).abs().max()) for k in start) > 1e-4
    if model == "coin_llama_dir":  # untied: the output embedding is saved, and trained, on its own
        assert "lm_head.weight" in start
        assert float((saved["lm_head.weight"] - start["lm_head.weight"]).abs().max()) > 1e-4

    probe = subprocess.run([sys.executable, "-m", "workbench.cli", "probe", str(run_dir)], cwd=REPO, env=cli_env,
                           capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-3000:]


@pytest.mark.parametrize("config", ["sdpg-ufkl", "rlsd"])  # grpo: test_grpo_trains_and_resumes_under_zero3
def test_method_trains_under_zero3(config, coin_model_dir, coin_data, tmp_path, run_overrides, ds_env):
    """Each method's terms under ZeRO-3 mean what they mean on one process: they add up to
    ``loss``, and SDPG's L_K is exactly 1 at step 1 (policy = reference: the sharded policy
    and the reference, a plain replica, give the same logits). RLSD's frozen teacher is a full replica
    made before DeepSpeed partitions the policy; re-syncing it (every step here) gathers
    the policy's shards on every process."""
    run_dir = tmp_path / config
    keys = run_overrides(coin_model_dir, run_dir, data=coin_data, steps=STEPS, rollout__prompts_per_step=4,
                         optim__lr=1e-3, rlsd__sync_every=1, checkpoint_every=STEPS, probe_every=0, eval_every=0)
    _train(config, keys, ds_env)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["distributed"] == {"type": "deepspeed", "processes": 2, "weight_spread": None,
                                   "weight_spread_note": ZERO3_SPREAD_NOTE}
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    _terms_add_up(config, info, rows)
    if config == "sdpg-ufkl":
        assert rows[0]["loss/ref_kl"] == pytest.approx(1.0, abs=1e-5)
    if config == "rlsd":
        assert "rlsd/w_mean" in rows[0]
    assert (run_dir / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors").is_file()


def test_grpo_trains_and_resumes_under_zero3(coin_model_dir, coin_data, tmp_path, run_overrides, ds_env):
    """grpo trains 3 steps under ZeRO-3; a 2-step run (a checkpoint every step) continued
    with ``--resume`` from TRL's newest DeepSpeed checkpoint (``run_dir/trl``: the engine's
    sharded weights and optimizer state, the scheduler, the RNG) logs every step once,
    carries the warm-up over, writes the final checkpoint, and ends with the uninterrupted
    run's weights."""

    def keys(run_dir: Path, steps: int) -> list[str]:
        return run_overrides(coin_model_dir, run_dir, data=coin_data, steps=steps, rollout__prompts_per_step=4,
                             optim__lr=1e-3, optim__warmup_steps=4, checkpoint_every=1, probe_every=0,
                             eval_every=0)

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _train("grpo", keys(full, STEPS + 1), ds_env)
    info = json.loads((full / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["distributed"] == {"type": "deepspeed", "processes": 2, "weight_spread": None,
                                   "weight_spread_note": ZERO3_SPREAD_NOTE}
    rows_full = _metrics(full)
    assert [r["step"] for r in rows_full] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows_full)
    _terms_add_up("grpo", info, rows_full)

    _train("grpo", keys(resumed, STEPS), ds_env)
    assert sorted(p.name for p in (resumed / "trl").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-2"]
    assert any((resumed / "trl" / "checkpoint-2").glob("global_step*"))  # DeepSpeed's own checkpoint
    result = _train("grpo", keys(resumed, STEPS + 1), ds_env, "--resume")
    assert "from TRL's checkpoint-2 (step 2)" in result.stderr
    rows = _metrics(resumed)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["lr"] / 1e-3 for r in rows] == pytest.approx([1 / 4, 2 / 4, 3 / 4])  # the scheduler resumed
    for r, f in zip(rows, rows_full):
        for key in ("loss", "grad_norm", "reward", "lr"):
            assert r[key] == pytest.approx(f[key], rel=1e-5, abs=1e-7), (r["step"], key)
    info = json.loads((resumed / "run.json").read_text())
    assert info["status"] == "finished" and info["resumes"][-1]["step"] == STEPS
    assert info["distributed"]["type"] == "deepspeed"
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == [
        "step-000001", "step-000002", f"step-{STEPS + 1:06d}"]
    last = f"checkpoints/step-{STEPS + 1:06d}/model.safetensors"
    got, want = load_file(resumed / last), load_file(full / last)
    two = load_file(resumed / "checkpoints" / f"step-{STEPS:06d}" / "model.safetensors")
    assert max(float((got[k] - two[k]).abs().max()) for k in two) > 1e-4  # step 3 trained on
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
