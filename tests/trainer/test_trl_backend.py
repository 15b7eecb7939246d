"""The TRL backend: the same losses inside TRL's GRPOTrainer.

- with every auxiliary coefficient 0 its loss and gradients equal plain GRPOTrainer's on
  the same batch;
- every auxiliary term's value on a fixed batch equals the built-in backend's;
- each method trains a few steps on the embedded task into a run folder that `oisd probe`
  analyses; TRL's resume continues a run; two CPU processes work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")

from trainer.config import load_config  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.methods import METHOD_NAMES, METHODS  # noqa: E402
from trainer.setup import prepare  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SMALL = {"data.arithmetic.n_train": 200, "data.arithmetic.n_test": 20}


def _cfg(method, model_dir, run_dir, run_overrides, data=None, **keys):
    return load_config(method, run_overrides(model_dir, run_dir, data=data, **keys))


def _trl_trainers(cfg, plain: bool):
    """(ours, plain GRPOTrainer or None) on copies of the same weights, ready to compute a loss."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from trainer.trl_backend import SelfDistillGRPOTrainer, build_grpo_config

    setup = prepare(cfg)
    examples = setup.task.train_examples()
    dataset = Dataset.from_list([{"prompt": e.prompt, "teacher_prompt": e.teacher_prompt, "example": i}
                                 for i, e in enumerate(examples)])

    def accuracy(prompts, completions, example, **kwargs):
        return [float(setup.task.reward(c, examples[int(i)])) for c, i in zip(completions, example)]

    args = build_grpo_config(cfg, setup.run_dir / "trl", 1)
    import copy

    model_plain = copy.deepcopy(setup.model)
    ours = SelfDistillGRPOTrainer(model=setup.model, reward_funcs=[accuracy], args=args, train_dataset=dataset,
                                  processing_class=setup.tokenizer, workbench_config=cfg, reference=setup.reference)
    other = GRPOTrainer(model=model_plain, reward_funcs=[accuracy], args=args, train_dataset=dataset,
                        processing_class=setup.tokenizer) if plain else None
    for t in (ours, other):
        if t is not None:
            t.current_gradient_accumulation_steps = 1
            t.model.train()
    rows = [dataset[i] for i in range(cfg.rollout.prompts_per_step) for _ in range(cfg.rollout.group_size)]
    return ours, other, rows, setup


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_zero_auxiliary_coefficients_equal_plain_grpo_trainer(coin_model_dir, coin_data, tmp_path, run_overrides):
    cfg = _cfg("oisd+sdpg", coin_model_dir, tmp_path / "r", run_overrides, data=coin_data,
               rollout__prompts_per_step=4, oisd__lambda_logit=0.0, oisd__lambda_attn=0.0, sdpg__beta_base=0.0,
               sdpg__alpha=0.0)
    ours, plain, rows, _ = _trl_trainers(cfg, plain=True)
    torch.manual_seed(0)
    batch = plain._generate_and_score_completions(rows)
    assert batch["advantages"].abs().sum() > 0  # the coin task earns rewards: the loss has a gradient
    batch["teacher_prompts"] = [r["teacher_prompt"] for r in rows]
    loss_plain = plain._compute_loss(plain.model, batch)
    loss_plain.backward()
    loss_ours = ours._compute_loss(ours.model, batch)
    loss_ours.backward()
    assert loss_ours.item() == pytest.approx(loss_plain.item(), abs=1e-6)
    gp, go = _grads(plain.model), _grads(ours.model)
    assert gp.keys() == go.keys()
    for name in gp:
        torch.testing.assert_close(go[name], gp[name], rtol=0, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in gp.values()) > 1e-4  # the gradients are not all zero


@pytest.mark.parametrize("method", [m for m in METHOD_NAMES if not METHODS[m].baseline])
def test_auxiliary_terms_equal_the_builtin_backend(method, coin_model_dir, coin_data, tmp_path, run_overrides):
    cfg = _cfg(method, coin_model_dir, tmp_path / "r", run_overrides, data=coin_data, rollout__prompts_per_step=4,
               sdpg__t_warm=0, sdpg__gate=False, grpo__kl_coef=0.05)
    builtin = Trainer(cfg, prepare(cfg))
    sb, _ = builtin.rollout()
    sb.advantages = torch.tensor([1.0, -0.5, 0.8, -0.3, -0.7, 0.4, 0.2, 0.0])
    rows = torch.arange(sb.input_ids.shape[0])
    _, logs_builtin, _ = builtin.micro_loss(sb, rows, None, builtin.normalisers(sb, rows))

    ours, _, _, setup = _trl_trainers(cfg, plain=False)
    ours.model.load_state_dict(builtin.model.state_dict())
    P = sb.prompt_width
    batch = {"prompt_ids": sb.input_ids[:, :P], "prompt_mask": sb.attention_mask[:, :P],
             "completion_ids": sb.input_ids[:, P:], "completion_mask": sb.response_mask.long(),
             "advantages": sb.advantages, "num_items_in_batch": sb.response_mask.sum(),
             "teacher_prompts": sb.teacher_prompts}
    ours._compute_loss(ours.model, batch)
    logged = {k: v[-1] for k, v in ours._metrics["train"].items()}
    terms = [k for k in logs_builtin if k.startswith("loss/") or k in ("kl", "rlsd/w_mean", "entropy")]
    assert {"loss/policy", "kl", "entropy"} <= set(terms)
    for key in terms:
        assert logged[key] == pytest.approx(float(logs_builtin[key]), abs=1e-5), key


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_each_method_trains_into_a_run_folder_that_probes(method, tiny_qwen3_dir, tmp_path, run_overrides):
    from trainer.run import train
    from workbench.analysis.analyzer import probe_run
    from workbench.storage.runstore import Run

    run_dir = tmp_path / "run"
    cfg = _cfg(method, tiny_qwen3_dir, run_dir, run_overrides, **SMALL, backend="trl", steps=2, checkpoint_every=2,
               probe_every=2, eval_every=2, sdpg__t_warm=0, probe__samples_per_prompt=2, logging__grad_share_every=1)
    assert train(cfg) == run_dir
    run = Run.open(run_dir)
    assert run.status == "finished" and run.info["backend"] == "trl" and run.info["trl_version"].startswith("1.16")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    spec = METHODS[method]
    want = {"reward", "accuracy", "entropy", "loss/policy", "grad_share/policy"}
    want |= ({"loss/think", "loss/attn"} if spec.oisd else set()) | (
        {"loss/opd", "loss/ref_kl", "sdpg/gate_fraction"} if spec.sdpg else set())
    want |= {"rlsd/w_mean"} if spec.needs_frozen_copy else set()
    assert want <= rows[1].keys(), sorted(want - rows[1].keys())
    assert {"eval/accuracy"} <= rows[0].keys() and {"eval/accuracy"} <= rows[2].keys()
    assert set(run.probes()["step"]) == {0, 2} and set(run.samples()["step"]) == {0, 2}
    report = probe_run(run_dir, progress=False, detail_prompts=1)
    assert report.analysed == [2] and not report.skipped
    merged = run.probes().merge(run.analysis("metrics"), on=["step", "layer", "head", "ref_layer", "metric", "split"])
    assert len(merged) and (merged["value_x"] - merged["value_y"]).abs().max() <= 1e-4


def test_resume_continues_through_trl(tiny_qwen3_dir, tmp_path, run_overrides):
    from trainer.run import train

    run_dir = tmp_path / "run"
    keys = dict(**SMALL, backend="trl", checkpoint_every=1, probe_every=0, eval_every=0, optim__warmup_steps=4)
    cfg = _cfg("grpo", tiny_qwen3_dir, run_dir, run_overrides, steps=2, **keys)
    train(cfg)
    train(_cfg("grpo", tiny_qwen3_dir, run_dir, run_overrides, steps=3, **keys), resume=True)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    # The built-in backend's warm-up (update u runs at (u + 1) / 4 of the rate), carried over
    # the resume; HF's constant_with_warmup would run at 0, 1/4, 2/4. Both backends log the
    # rate each step's update ran at.
    assert [r["lr"] / cfg.optim.lr for r in lines] == pytest.approx([1 / 4, 2 / 4, 3 / 4])
    builtin_dir = tmp_path / "builtin"
    train(_cfg("grpo", tiny_qwen3_dir, builtin_dir, run_overrides, steps=3, **{**keys, "backend": "builtin"}))
    builtin = [json.loads(line)["lr"] for line in (builtin_dir / "metrics.jsonl").read_text().splitlines()]
    assert builtin == pytest.approx([r["lr"] for r in lines])
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001", "step-000002", "step-000003"]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["resumes"][-1]["step"] == 2


def test_resume_of_a_finished_run_trains_nothing(tiny_qwen3_dir, tmp_path, run_overrides, caplog):
    """TRL would run one step more (HF's Trainer does not check before the step); the backend says so instead."""
    import logging

    from trainer.run import train

    run_dir = tmp_path / "done"
    cfg = _cfg("grpo", tiny_qwen3_dir, run_dir, run_overrides, steps=2, probe_every=0, eval_every=0,
               backend="trl", **SMALL)
    train(cfg)
    before = (run_dir / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO, logger="trainer.trl_backend"):
        train(cfg, resume=True)
    assert any("already finished its 2 steps; nothing to train" in r.getMessage() for r in caplog.records)
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (run_dir / "trl").iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-2"]


@pytest.mark.parametrize("variable, name", [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")])
def test_builtin_backend_refuses_a_sharded_launch(variable, name, tiny_qwen3_dir, tmp_path, run_overrides, cli_env):
    run_dir = tmp_path / "run"
    sets = [x for item in run_overrides(tiny_qwen3_dir, run_dir) for x in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "train", "--config", "grpo", *sets],
                            cwd=REPO, env={**cli_env, variable: "true"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: backend 'builtin' runs plain data parallel only; this {name} launch needs --backend trl "
        "(TRL's trainer shards the model)")
    assert not run_dir.exists()


def test_task_data_scores_completions_as_the_verifier_does():
    """TRL's dataset holds every training example with its index, and the reward functions
    TRL calls give 1/0 by the task's verifier for the row's own example, plus the format
    bonus when it is on."""
    from trainer.tasks import ArithmeticTask
    from trainer.trl_backend import task_data

    task = ArithmeticTask(n_operands=2, digits=1, n_train=5, n_test=2, seed=0)
    examples = task.train_examples()
    cfg = load_config("grpo")
    dataset, funcs = task_data(cfg, task)
    assert len(dataset) == 5 and dataset["example"] == [0, 1, 2, 3, 4]
    assert dataset["prompt"] == [e.prompt for e in examples]
    assert dataset["teacher_prompt"] == [e.teacher_prompt for e in examples]
    right = f"Answer: {examples[3].answer}"
    wrong = f"Answer: {int(examples[3].answer) + 1}"
    (accuracy,) = funcs
    assert accuracy(None, [right, wrong, "junk"], [3, 3, 3]) == [1.0, 0.0, 0.0]
    assert accuracy(None, [right], [2])[0] == float(examples[2].answer == examples[3].answer)
    cfg = load_config("grpo", ["grpo.format_bonus=0.25"])
    _, (accuracy, bonus) = task_data(cfg, task)
    assert bonus(None, [wrong, "junk"]) == [0.25, 0.0]


def test_a_lora_run_writes_full_checkpoints_that_probe(coin_model_dir, coin_data, tmp_path, run_overrides):
    """``trl.lora_r``: TRL trains a LoRA adapter; each ``checkpoints/step-N`` holds the merged
    full model (what every reader opens) and the adapter in ``adapter/``; ``oisd probe``
    analyses every checkpoint, none skipped."""
    from trainer.run import train
    from workbench.analysis.analyzer import probe_run
    from workbench.storage.runstore import Run

    run_dir = tmp_path / "lora"
    # The coin task earns rewards, so the adapters get a gradient.
    cfg = _cfg("oisd", coin_model_dir, run_dir, run_overrides, data=coin_data, backend="trl", steps=2,
               rollout__prompts_per_step=4, checkpoint_every=1, probe_every=2, eval_every=2, trl__lora_r=4,
               trl__lora_dropout=0.0, optim__lr=0.05)
    train(cfg)
    step = run_dir / "checkpoints" / "step-000002"
    assert (step / "config.json").is_file() and (step / "adapter" / "adapter_config.json").is_file()
    saved, start = load_file(step / "model.safetensors"), load_file(coin_model_dir / "model.safetensors")
    assert set(start) <= set(saved) and not any("lora" in k for k in saved)
    adapted = [k for k in start if any(f"self_attn.{m}.weight" in k for m in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    # Only the adapted projections moved, and by exactly (alpha / r) B A of the saved adapter.
    assert all(torch.equal(saved[k], start[k]) for k in start if k not in adapted)
    lora = load_file(step / "adapter" / "adapter_model.safetensors")
    scale = cfg.trl.lora_alpha / cfg.trl.lora_r
    moved = 0
    for key in adapted:
        prefix = "base_model.model." + key.removesuffix(".weight")
        delta = scale * (lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"])
        torch.testing.assert_close(saved[key], start[key] + delta, rtol=0, atol=1e-6, msg=key)
        moved += int(delta.abs().max() > 0)
    assert moved > 0  # the adapters trained
    report = probe_run(run_dir, progress=False, detail_prompts=1)
    assert report.analysed == [1, 2] and report.skipped == []
    assert len(Run.open(run_dir).analysis("drift"))
