"""One per-run summary row (notebook API and dashboard), the probe summary the trainer logs,
the layers it is reported at, and appending to an analysis folder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from workbench.compare import comparison_table
from workbench.measures.summary import probe_summary, report_layers
from workbench.storage.checkpoints import write_checkpoint
from workbench.storage.runstore import Run, run_summary
from workbench.storage.runwriter import RunWriter
from workbench.storage.schema import METRIC_COLUMNS


def _save(folder):
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")


def test_run_summary_steps_is_the_last_logged_step(tmp_path):
    run_dir = tmp_path / "run"
    writer = RunWriter(run_dir, {"method": "grpo", "seed": 3}, resume=False)
    for step, accuracy in ((0, 0.1), (4, 0.2), (9, 0.5)):
        writer.log_metrics(step, {"accuracy": accuracy, "reward": accuracy, "eval/accuracy": accuracy})
    write_checkpoint(run_dir, 4, _save, keep_last=None)
    write_checkpoint(run_dir, 9, _save, keep_last=None)
    row = run_summary(Run.open(run_dir))
    assert (row["name"], row["method"], row["seed"], row["status"]) == ("run", "grpo", 3, "training")
    assert row["steps"] == 9 and row["last_logged_step"] == 9 and row["checkpoints"] == 2
    assert row["last_accuracy"] == row["last_eval_accuracy"] == row["last_reward"] == 0.5

    empty = RunWriter(tmp_path / "empty", {"method": "oisd"}, resume=False)
    row = run_summary(Run.open(empty.run_dir))
    assert row["steps"] == 0 and row["last_logged_step"] is None and row["checkpoints"] == 0


def _analysis_folder(tmp_path, steps=(2, 4)):
    folder = tmp_path / "out" / "trl-out"
    writer = RunWriter(folder, {"method": None, "source": "trl-out", "kind": "trainer"}, resume=False)
    writer.record(external={"source": "trl-out", "kind": "trainer",
                            "checkpoints": [{"step": s, "path": f"trl-out/checkpoint-{s}", "origin": "x"}
                                            for s in steps]})
    writer.set_status("finished")
    return folder


def test_an_analysis_folder_counts_the_checkpoints_it_lists(tmp_path):
    folder = _analysis_folder(tmp_path)
    run = Run.open(folder)
    assert run.is_analysis_folder and run.checkpoint_steps() == [2, 4]
    row = run_summary(run)
    assert row["steps"] == 4 and row["checkpoints"] == 2 and row["last_logged_step"] is None
    assert comparison_table([folder])["steps"].tolist() == [4]

    from workbench import api

    table = api.runs(tmp_path / "out")
    assert (table.iloc[0]["steps"], table.iloc[0]["checkpoints"]) == (4, 2)


def test_append_keeps_everything_and_says_so(tmp_path):
    folder = _analysis_folder(tmp_path)
    RunWriter(folder, {"method": None, "source": "trl-out", "kind": "trainer"}, resume=True).log_metrics(7, {"x": 1})
    writer = RunWriter(folder, {"method": None}, resume=True, append=True)
    assert writer.info["resumes"][-1]["step"] is None
    assert Run.open(folder).metrics()["step"].tolist() == [7]  # a plain resume (no checkpoint) would drop it
    with pytest.raises(ValueError):
        RunWriter(folder, {}, resume=True, resume_step=3, append=True)
    with pytest.raises(ValueError):
        RunWriter(tmp_path / "new", {}, resume=False, append=True)
    assert json.loads(writer.run_json.read_text())["resumes"][-1]["step"] is None


def _reference_summary(df, layers):
    """The trainer's probe summary before it moved here, kept to check the numbers."""
    base = df[(df["head"] == -1) & (df["ref_layer"] == -1)]
    out = {}
    for layer in layers:
        for m in ("top1_agree", "lens_js", "attn_js_final"):
            value = {split: base[(base["split"] == split) & (base["layer"] == layer) & (base["metric"] == m)]["value"]
                     for split in ("reference", "sampled_correct", "sampled_wrong")}
            if len(value["reference"]):
                out[f"probe/{m}/layer{layer}"] = float(value["reference"].iloc[0])
            if len(value["sampled_correct"]) and len(value["sampled_wrong"]):
                out[f"probe/gap/{m}/layer{layer}"] = float(
                    value["sampled_correct"].iloc[0] - value["sampled_wrong"].iloc[0])
    return out


def test_probe_summary_gives_the_trainers_numbers():
    rng = np.random.default_rng(0)
    rows = [["r", 3, layer, head, -1, metric, rng.random(), split, "probe"]
            for split in ("reference", "greedy", "sampled_correct", "sampled_wrong")
            for layer in range(5) for head in (-1, 0, 1)
            for metric in ("top1_agree", "lens_js", "attn_js_final", "entropy")]
    df = pd.DataFrame(rows, columns=METRIC_COLUMNS)
    for layers in ([2], [1, 3], [9]):
        assert probe_summary(df, layers) == _reference_summary(df, layers)
    reference_only = df[df["split"] == "reference"]
    summary = probe_summary(reference_only, [2])
    assert summary == _reference_summary(reference_only, [2]) and len(summary) == 3
    assert not any(key.startswith("probe/gap/") for key in summary)


def test_report_layers():
    assert report_layers([3, 5], 8) == [3, 5]
    assert report_layers([], 8) == [4] and report_layers([], 1) == [1] and report_layers([], 3) == [1]
    with pytest.raises(ValueError):
        report_layers([], None)
