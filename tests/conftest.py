"""Shared fixtures: tiny model folders and a data set, written once per test session.

- ``tiny_qwen3_dir``: the ``tiny`` preset (Qwen3, tied embeddings), random init.
- ``tiny_llama_dir``: a tiny Llama (untied ``lm_head``), random init.
- ``coin_data`` + ``coin_model_dir``: a "warm-started-ish" policy. A random model
  never earns a reward, so every advantage is 0 and GRPO-based updates are 0; tests
  of resume and multi-process training would then pass without checking anything.
  The coin task asks 40 questions whose answer is "1" or "2"; a few seconds of
  supervised training teach the tiny Qwen3 to answer "1" or "2" at random, so about
  half of the responses are right and most groups have a non-zero reward std.
  ``coin_llama_dir`` is the same for the tiny Llama (untied ``lm_head``).
- ``run_overrides``: ``--set`` overrides for a small, fast run (used in-process with
  ``load_config`` and on the command line).

Every folder holds the char tokenizer, so each loads with ``from_pretrained`` and
trains with the same code as a real model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

N_COIN = 40  # coin questions; 10% (4) are split off as the held-out set


@pytest.fixture(scope="session", autouse=True)
def _torch_single_thread():
    """One intra-op thread: these models are tiny, and on 2 cores a second thread
    costs more in synchronisation than it gains (and subprocess tests run beside)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def char_tokenizer():
    from trainer.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, char_tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    from trainer.presets import preset_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", char_tokenizer))
    return _save(model, char_tokenizer, tmp_path_factory.mktemp("tiny-qwen3"))


def _tiny_llama_config(tokenizer):
    """A 4-block Llama with an untied ``lm_head``, sized to ``tokenizer``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, char_tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_tiny_llama_config(char_tokenizer))
    return _save(model, char_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def coin_data(tmp_path_factory) -> Path:
    """JSONL with question/answer/solution columns; answers alternate "1", "2"."""
    path = tmp_path_factory.mktemp("coin") / "coin.jsonl"
    rows = [{"question": f"Flip {i}", "answer": str(1 + i % 2), "solution": "coin"} for i in range(N_COIN)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _coin_trained(model, tokenizer, coin_data: Path, steps: int):
    """``model`` after ``steps`` supervised steps of answering "1" or "2" at random (AdamW, lr 1e-2)."""
    from trainer.data import load_examples
    from trainer.warmstart import make_sft_batch

    examples = load_examples(coin_data, solution_column="solution")
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        pairs = [(rng.choice(examples).prompt, rng.choice("12")) for _ in range(16)]
        loss = model(**make_sft_batch(tokenizer, pairs)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="session")
def coin_model_dir(tmp_path_factory, char_tokenizer, coin_data) -> Path:
    """The tiny Qwen3 after 30 supervised steps of answering "1" or "2" at random."""
    from transformers import AutoModelForCausalLM

    from trainer.presets import preset_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", char_tokenizer))
    return _save(_coin_trained(model, char_tokenizer, coin_data, 30), char_tokenizer,
                 tmp_path_factory.mktemp("coin-model"))


@pytest.fixture(scope="session")
def coin_llama_dir(tmp_path_factory, char_tokenizer, coin_data) -> Path:
    """``coin_model_dir`` for the tiny Llama of ``tiny_llama_dir`` (untied ``lm_head``): 100
    supervised steps of answering "1" or "2" at random, so that it earns rewards. After 30
    (or 60) steps it still answers, but a first Adam step at lr 1e-3 breaks its answers."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(_tiny_llama_config(char_tokenizer))
    return _save(_coin_trained(model, char_tokenizer, coin_data, 100), char_tokenizer,
                 tmp_path_factory.mktemp("coin-llama"))


@pytest.fixture(scope="session")
def run_overrides():
    """``run_overrides(model_dir, run_dir, data=None, **keys)`` -> ``--set`` strings of a
    small run: 2 steps of 2 prompts x 2 responses, short responses, probes and eval at
    the end only, no progress bar. ``data`` switches to a JSONL file with solutions;
    ``keys`` override anything (``oisd__lambda_attn=0`` -> ``oisd.lambda_attn=0``)."""

    def make(model_dir, run_dir, data=None, **keys) -> list[str]:
        values = {
            "model.path": str(model_dir), "run_dir": str(run_dir), "steps": 2,
            "rollout.prompts_per_step": 2, "rollout.group_size": 2, "rollout.max_new_tokens": 16,
            "checkpoint_every": 1, "probe_every": 2, "eval_every": 2, "eval.n": 2, "eval.k": 1,
            "probe.n_prompts": 2, "probe.greedy": False, "logging.progress": False,
            "optim.warmup_steps": 0,
        }
        if data is not None:
            values.update({"data.path": str(data), "data.solution_column": "solution"})
        values.update({k.replace("__", "."): v for k, v in keys.items()})
        return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in values.items()]

    return make


@pytest.fixture(scope="session")
def cli_env() -> dict:
    """Environment for ``python -m workbench.cli`` subprocesses: the repo on the path,
    one thread each (runs compared bit for bit must use the same thread count)."""
    import os

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ)
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def assert_same_update(got: dict, want: dict, start: dict, rel: float) -> float:
    """Two trainings of the same start on the same global batch made the same update: for every
    parameter, ``max |(got - start) - (want - start)| <= rel * max |want - start|`` over all
    parameters (the update's own scale, so the bound does not depend on how far training
    moved), and the update is not nothing. Returns the largest difference over that scale.

    Meant for plain-SGD runs, whose update is the learning rate times the gradient: a
    gradient that was not reduced over processes, or a dropped shard, changes it by its own
    order, while two summation orders change it by the rounding of a float32 gradient."""
    scale = max(float((want[k].double() - start[k].double()).abs().max()) for k in start)
    assert scale > 0, "the update is zero: nothing was trained"
    worst = 0.0
    for key in start:
        diff = float((got[key].double() - want[key].double()).abs().max())
        worst = max(worst, diff / scale)
        assert diff <= rel * scale, f"{key}: updates differ by {diff:.3g} ({diff / scale:.3g} of the update's scale)"
    return worst


def kill_tree(pid: int) -> None:
    """SIGKILL to a process and every descendant, all at once (as a machine losing power would;
    torchrun's and accelerate's workers outlive a kill of their launcher's process group)."""
    import signal

    import psutil

    parent = psutil.Process(pid)
    family = [*parent.children(recursive=True), parent]
    for process in family:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=30)
