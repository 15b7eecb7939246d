"""The method table: one spec per method, composers that add up named terms, and the
gradient share of each term (against gradients worked out by hand)."""

import re
from pathlib import Path

import pytest
import torch

from trainer.methods import METHOD_NAMES, METHODS, Term, gradient_shares, spec_of

REPO = Path(__file__).resolve().parents[2]


def test_table_covers_every_method_once():
    assert METHOD_NAMES == ("grpo", "oisd", "sdpg", "rlsd", "opsd", "oisd+sdpg")
    assert [spec_of(m).name for m in METHOD_NAMES] == list(METHOD_NAMES)
    assert {m for m in METHODS if METHODS[m].oisd} == {"oisd", "oisd+sdpg"}
    assert {m for m in METHODS if METHODS[m].sdpg} == {"sdpg", "oisd+sdpg"}
    assert {m: METHODS[m].teacher for m in METHODS} == {
        "grpo": "none", "oisd": "none", "sdpg": "current_hinted", "rlsd": "frozen_copy_hinted",
        "opsd": "initial_hinted", "oisd+sdpg": "current_hinted"}
    # Every method with a teacher says what it computes from the teacher's logits.
    assert all((s.teacher_term is not None) == s.needs_hint for s in METHODS.values())


def test_no_method_name_branches_outside_the_table():
    hits = []
    for folder in ("trainer", "workbench", "app"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "methods.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"method\s*(==|!=|in\s*\()", line):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert hits == []


def test_gradient_shares_of_two_terms_with_known_gradients():
    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.zeros(1))
    terms = {
        # d/dw of 2 * (3 w0 + 4 w1) = (6, 8): norm 10
        "a": Term(2.0, 3 * w[0] + 4 * w[1]),
        # d/dw of 0.5 * (10 w1) = (0, 5) and d/dv of 0.5 * 0 v = 0: norm 5
        "b": Term(0.5, 10 * w[1] + 0 * v.sum()),
        # switched off: no gradient, share 0
        "c": Term(0.0, 7 * v.sum()),
    }
    shares = gradient_shares(terms, [w, v])
    assert shares == pytest.approx({"a": 10 / 15, "b": 5 / 15, "c": 0.0}, abs=1e-12)
    assert w.grad is None and v.grad is None  # measuring leaves the real backward to the caller


def test_gradient_share_of_a_term_without_gradient_is_zero():
    w = torch.nn.Parameter(torch.ones(3))
    shares = gradient_shares({"policy": Term(1.0, (w ** 2).sum()), "const": Term(1.0, torch.tensor(3.0))}, [w])
    assert shares == {"policy": 1.0, "const": 0.0}
