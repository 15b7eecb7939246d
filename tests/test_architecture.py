"""The project's structure, as docs/architecture.md states it: rooms by concern, imports that
flow one way, the method table as the only place that knows a method by name.

Every check reads the code's own syntax trees (imports at any depth, lazy ones included), so
a test here fails on the line that breaks the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from trainer.methods import METHOD_NAMES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "workbench", "app")

#: workbench/'s rooms from the ground up: a room imports only rooms below it (and itself).
WORKBENCH_LAYERS = (
    ("workbench.errors",),
    ("workbench.storage",),
    ("workbench.models",),
    ("workbench.measures",),
    ("workbench.analysis",),
    ("workbench.compare", "workbench.api", "workbench.cli"),  # the front door
)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _sources(*packages: str) -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            out[_module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return out


def _imports(tree: ast.Module, modules: set[str]) -> list[tuple[int, str, bool]]:
    """``(line, module, lazy)`` of every import of a project module in ``tree``: ``from a.b import
    c`` counts as ``a.b.c`` when that is a module; ``lazy`` when inside a function."""
    found = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.lineno, child.module, lazy))
                found.extend((child.lineno, f"{child.module}.{a.name}", lazy) for a in child.names
                             if f"{child.module}.{a.name}" in modules)
            visit(child, inner)

    visit(tree, False)
    return [(line, name, lazy) for line, name, lazy in found if name.split(".")[0] in PACKAGES]


def _graph(package: str) -> dict[str, set[str]]:
    sources = _sources(package)
    modules = set(sources)
    graph = {}
    for name, (_, tree) in sources.items():
        deps = {m for _, m, _ in _imports(tree, modules) if m in modules}
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def walk(node: str, stack: list[str]) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            found = walk(dep, stack + [node])
            if found:
                return found
        done.add(node)
        return None

    for node in sorted(graph):
        found = walk(node, [])
        if found:
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    """Between the modules of each package, lazy imports included, imports point one way."""
    assert _cycle(_graph(package)) is None


def test_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _layer(module: str) -> int | None:
    for i, rooms in enumerate(WORKBENCH_LAYERS):
        if any(module == r or module.startswith(r + ".") for r in rooms):
            return i
    return None


def test_workbench_rooms_import_downwards():
    """workbench/'s rooms (docs/architecture.md): errors, storage, models, measures, analysis,
    the front door; each imports only the rooms below it."""
    sources = _sources("workbench")
    assert all(_layer(m) is not None for m in sources if m != "workbench"), "a module outside every room"
    hits = []
    for name, (path, tree) in sources.items():
        if name == "workbench":
            continue
        for line, dep, _ in _imports(tree, set(sources)):
            if dep.startswith("workbench.") and dep in sources and _layer(dep) > _layer(name):
                hits.append(f"{path.relative_to(REPO)}:{line}: {name} imports {dep}")
    assert hits == []


def test_analysis_side_never_imports_the_trainer():
    """workbench/ and app/ import nothing of trainer/, except the two entry points
    (``workbench/cli.py``, ``workbench/api.py``), and those only lazily (inside a function)."""
    hits = []
    for name, (path, tree) in _sources("workbench", "app").items():
        for line, dep, lazy in _imports(tree, set()):
            entry = name in ("workbench.cli", "workbench.api")
            if dep.split(".")[0] == "trainer" and not (entry and lazy):
                hits.append(f"{path.relative_to(REPO)}:{line}: {dep}")
    assert hits == []


def _method_name_uses(tree: ast.Module) -> list[int]:
    """Lines where a method's name is branched on: compared (``==``, ``!=``, ``in``), used as a
    mapping's key, or as a ``match`` pattern."""
    names = set(METHOD_NAMES)

    def is_name(node) -> bool:
        return isinstance(node, ast.Constant) and node.value in names

    def holds_name(node) -> bool:
        return is_name(node) or (isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(map(is_name, node.elts)))

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(map(holds_name, [node.left, *node.comparators])):
            lines.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(is_name(k) for k in node.keys if k is not None):
            lines.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and is_name(node.value):
            lines.append(node.lineno)
    return lines


def test_no_method_name_branches_outside_the_table():
    """What a method is and does is the method table's (``trainer/methods.py``): no other module
    compares a method's name or keys a mapping by one (``trainer.methods.MethodSpec.config`` says
    which bundled config a name stands for; run.json's ``baseline`` which runs are the baseline)."""
    hits = [f"{path.relative_to(REPO)}:{line}" for name, (path, tree) in _sources(*PACKAGES).items()
            if name != "trainer.methods" for line in _method_name_uses(tree)]
    assert hits == []


@pytest.mark.parametrize("code", [
    'if run.method == "grpo": pass',
    'grpo = [n for n in names if methods.get(n) not in (None, "grpo")]',
    'CONFIG_OF = {"sdpg": "sdpg-ufkl"}',
    'match m:\n    case "oisd": pass',
])
def test_method_name_guard_catches(code):
    """The forms that slipped past the old line-by-line check are caught."""
    assert _method_name_uses(ast.parse(code)) == [1] if "match" not in code else [2]


def test_teacher_kinds_are_named_only_in_the_table():
    """Which model plays the teacher is a question the table answers (``MethodSpec.teacher_model``,
    ``needs_frozen_copy``): no other module names a teacher kind."""
    kinds = {"current_hinted", "frozen_copy_hinted", "initial_hinted"}
    hits = [f"{path.relative_to(REPO)}:{node.lineno}" for name, (path, tree) in _sources(*PACKAGES).items()
            if name != "trainer.methods" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in kinds]
    assert hits == []
