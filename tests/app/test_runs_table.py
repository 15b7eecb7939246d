"""The dashboard's Runs table row comes from workbench.storage.runstore.run_summary: steps is the last
step reached (an analysis folder's last listed checkpoint) and checkpoints how many it has."""

from __future__ import annotations

from app import data
from workbench.storage.runstore import Run, run_summary
from workbench.storage.runwriter import RunWriter


def test_runs_table_row_of_a_run_and_of_an_analysis_folder(tmp_path):
    data.clear_caches()
    run_dir = tmp_path / "grpo-seed0"
    writer = RunWriter(run_dir, {"method": "grpo", "seed": 0}, resume=False)
    writer.log_metrics(0, {"accuracy": 0.25})
    writer.log_metrics(6, {"accuracy": 0.5, "eval/accuracy": 0.75})
    row = data.runs_table_row("grpo-seed0", Run.open(run_dir))
    shared = run_summary(Run.open(run_dir))
    assert (row["steps"], row["checkpoints"], row["accuracy"], row["eval/accuracy"]) == (6, 0, 0.5, 0.75)
    assert (row["steps"], row["checkpoints"]) == (shared["steps"], shared["checkpoints"])

    folder = tmp_path / "external"
    writer = RunWriter(folder, {"method": None}, resume=False)
    writer.record(external={"source": "x", "kind": "verl",
                            "checkpoints": [{"step": s, "path": f"x/global_step_{s}", "origin": "x"} for s in (10, 30)]})
    writer.set_status("finished")
    row = data.runs_table_row("external", Run.open(folder))
    assert (row["status"], row["steps"], row["checkpoints"]) == ("finished", 30, 2)
