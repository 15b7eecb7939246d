"""docs/architecture.md's "Where to add" recipe for a method, followed for a throwaway one.

The new method lives in a temporary module (standing in for the lines the recipe adds to
``trainer/objectives.py`` and ``trainer/methods.py``), its row is put into the method table,
and its config is a YAML file (standing in for ``configs/<name>.yaml``). Nothing else of the
project is touched, and it trains on both backends into a run folder whose every logged term
adds up: adding a method is the files the doc names, and nothing else.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest

from trainer import methods
from trainer.config import load_config
from trainer.run import train

TOY = textwrap.dedent('''
    """A throwaway method: GRPO plus a likelihood term on the sampled tokens."""
    import torch

    from trainer.methods import MethodSpec, Term, grpo_terms

    COEF = 0.01


    def toy_nll(logp: torch.Tensor) -> torch.Tensor:
        """``-log pi(y_t)`` per token: the objective's pure function (recipe step 1)."""
        return -logp


    def compose_toy(x):
        """TOY: ``L = L_GRPO + 0.01 agg(-log pi(y_t))`` (recipe step 3: the composer)."""
        return grpo_terms(x) | {"toy": Term(COEF, x.aggregate(toy_nll(x.logp)))}


    SPEC = MethodSpec("toy", compose_toy, coefficients=())
''')


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    source = tmp_path / "toy_method.py"
    source.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_method", source)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_method", module)
    spec.loader.exec_module(module)
    monkeypatch.setitem(methods.METHODS, "toy", module.SPEC)  # recipe step 3: its row of the table
    config = tmp_path / "toy.yaml"  # recipe step 4: configs/toy.yaml
    config.write_text("method: toy\nsteps: 1\noptim:\n  lr: 1.0e-3\n")
    return config


@pytest.mark.parametrize("backend", ["builtin", "trl"])
def test_a_new_method_trains_on_each_backend(backend, toy_method, coin_model_dir, coin_data, tmp_path,
                                             run_overrides):
    run_dir = tmp_path / f"toy-{backend}"
    keys = run_overrides(coin_model_dir, run_dir, data=coin_data, steps=1, backend=backend,
                         rollout__prompts_per_step=4, probe_every=1, eval_every=0, logging__grad_share_every=1)
    assert train(load_config(toy_method, keys)) == run_dir
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["config"]["method"] == "toy" and info["backend"] == backend
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["step"] == 1 and row["loss/toy"] > 0  # -log pi of sampled tokens
    assert row["loss"] == pytest.approx(row["loss/policy"] + 0.01 * row["loss/toy"], rel=1e-5, abs=1e-7)
    assert 0 < row["grad_share/toy"] < 1 and row["grad_share/policy"] + row["grad_share/toy"] == pytest.approx(1)
    assert (run_dir / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    assert any(k.startswith("probe/") for k in row)  # the built-in probes ran at its last step
