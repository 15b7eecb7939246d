"""Every notebook in notebooks/ runs top to bottom with small parameters.

The notebooks are executed with nbclient in a ``python3`` kernel (jupyter_client
starts it with this interpreter, so the venv's packages are the kernel's). Small
values are injected into each notebook's cell tagged ``parameters``, papermill-style,
and all notebooks share one ``WORK`` folder: the first notebook creates the warm start
and the OISD run, later ones reuse them and add what they need (a GRPO run, then SDPG
and RLSD runs with two seeds). Real code paths throughout: warm start, training,
TransformerLens probing, comparison.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# Small budgets: seconds per run on 2 CPU cores.
SMALL = {
    "PRESET": "tiny",
    "WARMSTART_STEPS": 20,
    "WARMSTART_EVAL_N": 4,
    "STEPS": 2,
    "CHECKPOINT_EVERY": 1,
    "EVAL_N": 4,
    "PROBE_PROMPTS": 2,
    "DETAIL_PROMPTS": 1,
    # Greedy decoding of the probe set dominates probing at this size; every notebook
    # reads the reference split, and greedy probes are tested in tests/trainer and tests/workbench.
    "PROBE_GREEDY": False,
    "OVERRIDES": [
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=12",
        "eval.k=2", "data.arithmetic.n_train=64", "data.arithmetic.n_test=16", "probe.greedy=false",
    ],
    "PROGRESS": False,
    "METHODS": ["grpo", "oisd", "sdpg", "rlsd"],
    "SEEDS": [0, 1],
    "PROMPT": 0,
}


def test_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb", "02_logit_lens.ipynb", "03_attention_alignment.ipynb",
        "04_methods_compared.ipynb", "05_causal.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "WORK =" in tagged[0].source and "STEPS =" in tagged[0].source
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 4, "an investigation needs prose"


def inject(nb: nbformat.NotebookNode, values: dict) -> None:
    """Append assignments for the parameters a notebook defines to its parameters cell."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    defined = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line
               and not line.lstrip().startswith("#")}
    lines = [f"{name} = {value!r}" for name, value in values.items() if name in defined]
    cell.source += "\n# injected by tests/test_notebooks.py\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def work(tmp_path_factory) -> Path:
    """One runs folder shared by every notebook of the session."""
    return tmp_path_factory.mktemp("notebook-runs")


# 04_methods_compared (25 s) runs with the slow tests: the same readers and figures run in the
# other notebooks and in tests/app, and the default suite stays under 15 minutes on 2 cores.
SLOW_NOTEBOOKS = {"04_methods_compared"}


@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p
                                  for p in NOTEBOOKS], ids=lambda p: p.stem)
def test_notebook_runs(path, work):
    nb = nbformat.read(path, as_version=4)
    inject(nb, {"WORK": str(work), **SMALL})
    client = NotebookClient(nb, kernel_name="python3", timeout=600,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{path.name} failed:\n{exc}")
    # Every code cell ran, and the figures were drawn.
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    plotly = [o for c in code for o in c.outputs
              if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert plotly, f"{path.name} drew no Plotly figure"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
