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


def _python_lines(*folders):
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                yield path, number, line


def test_teacher_kinds_are_named_only_in_the_table():
    """Which model plays the teacher is a question the table answers (``MethodSpec.teacher_model``,
    ``needs_frozen_copy``): no other module compares teacher-kind strings."""
    hits = [f"{p.relative_to(REPO)}:{n}" for p, n, line in _python_lines("trainer", "workbench", "app")
            if p.name != "methods.py" and re.search(r"current_hinted|frozen_copy_hinted|initial_hinted", line)]
    assert hits == []


def test_capabilities_answered_by_the_table():
    from types import SimpleNamespace

    cfg = SimpleNamespace(oisd=SimpleNamespace(lambda_logit=1.0, lambda_attn=0.0))
    assert spec_of("oisd").uses_lens(cfg) and not spec_of("oisd").uses_attention(cfg)
    assert not spec_of("sdpg").uses_lens(cfg)
    cfg.oisd.lambda_attn = 2.0
    assert spec_of("oisd+sdpg").uses_attention(cfg) and not spec_of("grpo").uses_attention(cfg)
    policy, frozen, reference = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert spec_of("sdpg").teacher_model(policy, None, reference) is policy
    assert spec_of("rlsd").teacher_model(policy, frozen, reference) is frozen
    assert spec_of("opsd").teacher_model(policy, None, reference) is reference
    assert [m for m in METHODS if METHODS[m].needs_frozen_copy] == ["rlsd"]
    with pytest.raises(ValueError, match="rlsd"):
        spec_of("rlsd").teacher_model(policy, None, reference)


def test_no_import_circle_in_trainer():
    """Every import between trainer modules, lazy ones included, points one way: the
    graph of ``trainer.*`` modules has no cycle (the backends share ``trainer.run``,
    ``trainer.recorder``, ``trainer.schedule``; neither imports the other)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "trainer").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for line in path.read_text().splitlines():
            m = re.match(r"\s*(?:from\s+(trainer(?:\.\w+)*)\s+import\s+([\w, ]+)|import\s+(trainer(?:\.\w+)*))", line)
            if not m:
                continue
            module = m.group(1) or m.group(3)
            deps.add(module)
            if m.group(1):  # from trainer.tasks import arithmetic: a submodule, if it is one
                for item in m.group(2).split(","):
                    sub = f"{module}.{item.strip()}"
                    if (REPO / Path(*sub.split("."))).with_suffix(".py").is_file():
                        deps.add(sub)
        graph[name] = deps - {name}
    assert "trainer.trl_backend" not in graph["trainer.loop"] and "trainer.loop" not in graph["trainer.trl_backend"]

    def cycle_from(node, stack):
        if node in stack:
            return stack[stack.index(node):] + [node]
        for dep in sorted(graph.get(node, ())):
            found = cycle_from(dep, stack + [node])
            if found:
                return found
        return None

    cycles = [c for n in graph if (c := cycle_from(n, []))]
    assert cycles == []


def test_analysis_side_never_imports_the_trainer():
    """workbench/ and app/ import nothing of trainer/, except the two entry points
    (``workbench/cli.py``, ``workbench/api.py``), and those only lazily (inside a function)."""
    hits = []
    for path, number, line in _python_lines("workbench", "app"):
        match = re.match(r"(\s*)(?:from\s+trainer\b|import\s+trainer\b)", line)
        if not match:
            continue
        entry = path.relative_to(REPO).as_posix() in ("workbench/cli.py", "workbench/api.py")
        if not (entry and match.group(1)):  # an entry point's indented import is lazy
            hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert hits == []
