"""Tests of the run store: atomic writes, checkpoint manifests, run writing and reading."""

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest

from workbench import __version__
from workbench.errors import CheckpointError, ConfigError, DataError, WorkbenchError
from workbench.models.loading import is_model_folder, require_model_folder
from workbench.storage.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    read_provenance,
)
from workbench.storage.checkpoints import (
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
    write_checkpoint,
)
from workbench.storage.paths import probe_set_hash, safe_join
from workbench.storage.runstore import BrokenRun, Run, list_runs
from workbench.storage.runwriter import RunWriter
from workbench.storage.schema import METRIC_COLUMNS, TOPK_COLUMNS


def _save_fn(payload: bytes = b"weights-0123456789"):
    """A save_fn writing a weights file, a config and a file in a subfolder."""

    def save(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(payload)
        (folder / "config.json").write_text('{"model_type": "qwen3"}')
        (folder / "trainer_state").mkdir()
        (folder / "trainer_state" / "rng.bin").write_bytes(b"\x00\x01\x02")

    return save


def _probe_rows(step: int, layers=(1, 2)) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"run": "r", "step": step, "layer": layer, "head": -1, "ref_layer": -1,
             "metric": "lens_kl", "value": 0.5 * layer + step, "split": "reference",
             "source": "probe"}
            for layer in layers
        ]
    )


# --------------------------------------------------------------------------- atomic writes


def test_atomic_writes_round_trip_and_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\xff")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"x": [1, 2]})
    atomic_write_parquet(tmp_path / "d.parquet", pd.DataFrame({"x": [1, 2]}))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2]}
    assert pd.read_parquet(tmp_path / "d.parquet")["x"].tolist() == [1, 2]
    names = sorted(p.name for p in tmp_path.rglob("*"))
    assert names == ["a.bin", "b.txt", "c.json", "d.parquet", "sub"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    atomic_write_json(target, {"status": "training"})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(target, {"status": "finished"})
    assert json.loads(target.read_text()) == {"status": "training"}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# --------------------------------------------------------------------------- checkpoints


def test_write_checkpoint_manifest_lists_every_file_with_sha256(tmp_path):
    path = write_checkpoint(tmp_path, 50, _save_fn(b"abc"), keep_last=None)
    assert path == tmp_path / "checkpoints" / "step-000050"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 50 and manifest["version"] == 1
    assert sorted(manifest["files"]) == [
        "config.json", "model.safetensors", "trainer_state/rng.bin"
    ]
    assert manifest["files"]["model.safetensors"] == {
        "size": 3,
        # sha256("abc"), the FIPS 180-2 test vector
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }
    assert manifest["files"]["trainer_state/rng.bin"]["size"] == 3
    verify_checkpoint(path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000050"]


def test_failed_save_leaves_no_step_folder_and_stale_tmp_is_cleaned(tmp_path):
    def failing_save(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed while saving")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path, 10, failing_save, keep_last=None)
    ckpts = tmp_path / "checkpoints"
    assert list(ckpts.iterdir()) == []
    # A process killed outright leaves its temp folder behind: readers ignore it ...
    stale = ckpts / ".tmp-step-000010-abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert list_checkpoints(tmp_path) == []
    assert latest_checkpoint(tmp_path) is None
    # ... and the next write removes it.
    write_checkpoint(tmp_path, 20, _save_fn(), keep_last=None)
    assert [p.name for p in ckpts.iterdir()] == ["step-000020"]


def test_rewriting_a_step_replaces_the_old_folder(tmp_path):
    write_checkpoint(tmp_path, 5, _save_fn(b"old"), keep_last=None)
    path = write_checkpoint(tmp_path, 5, _save_fn(b"new!"), keep_last=None)
    assert (path / "model.safetensors").read_bytes() == b"new!"
    verify_checkpoint(path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000005"]


def test_manifest_detects_truncation_changed_byte_and_missing_file(tmp_path):
    path = write_checkpoint(tmp_path, 1, _save_fn(b"0123456789"), keep_last=None)
    weights = path / "model.safetensors"

    weights.write_bytes(b"01234")  # truncated
    with pytest.raises(CheckpointError, match=r"step-000001: size mismatch for model.safetensors"):
        verify_checkpoint(path, full=False)

    weights.write_bytes(b"0123456780")  # same size, one byte changed
    verify_checkpoint(path, full=False)  # the fast check looks at sizes only
    with pytest.raises(CheckpointError, match="sha256 mismatch for model.safetensors"):
        verify_checkpoint(path)

    weights.write_bytes(b"0123456789")
    verify_checkpoint(path)
    (path / "trainer_state" / "rng.bin").unlink()
    with pytest.raises(CheckpointError, match="missing file trainer_state/rng.bin"):
        verify_checkpoint(path)

    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="missing manifest.json"):
        verify_checkpoint(path, full=False)


def test_checkpoint_error_is_one_line(tmp_path):
    path = write_checkpoint(tmp_path, 1, _save_fn(), keep_last=None)
    (path / "manifest.json").write_text("{not json\n\n")
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint(path)
    assert "\n" not in str(info.value) and "corrupt manifest.json" in str(info.value)


def test_list_checkpoints_skips_corrupt_with_warning(tmp_path):
    for step in (10, 20, 30):
        write_checkpoint(tmp_path, step, _save_fn(), keep_last=None)
    (tmp_path / "checkpoints" / "step-000030" / "model.safetensors").write_bytes(b"torn")
    with pytest.warns(UserWarning, match="step-000030"):
        found = list_checkpoints(tmp_path)
    assert [c.step for c in found] == [10, 20]
    assert found[0].manifest["step"] == 10
    with pytest.warns(UserWarning, match="step-000030"):
        assert latest_checkpoint(tmp_path).step == 20
    # Unverified listing sees every step folder; warn=False is silent.
    assert [c.step for c in list_checkpoints(tmp_path, verify=False)] == [10, 20, 30]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list_checkpoints(tmp_path, warn=False)) == 2


def test_keep_last_prunes_older_complete_checkpoints(tmp_path):
    for step in range(1, 6):
        write_checkpoint(tmp_path, step, _save_fn(), keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 5]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000005"]
    # Writing an earlier step (a resume from step 3) never prunes the one just written.
    write_checkpoint(tmp_path, 3, _save_fn(), keep_last=1)
    assert [c.step for c in list_checkpoints(tmp_path)] == [3, 5]


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="keep_last"):
        write_checkpoint(tmp_path, 1, _save_fn(), keep_last=0)


def test_model_folder_check(tmp_path):
    assert not is_model_folder(tmp_path)
    with pytest.raises(CheckpointError, match=r"is not a model folder \(no config.json\)"):
        require_model_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no .*weights"):
        require_model_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert is_model_folder(tmp_path)
    assert require_model_folder(tmp_path) == tmp_path


# --------------------------------------------------------------------------- writing a run


def test_run_writer_creates_run_json_and_metrics(tmp_path):
    run_dir = tmp_path / "runs" / "a"
    writer = RunWriter(run_dir, {"method": "oisd", "seed": 7}, resume=False)
    writer.log_metrics(1, {"loss": 0.5})
    writer.log_metrics(2, {"loss": 0.25})
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "training" and info["seed"] == 7 and info["pid"] == os.getpid()
    assert info["versions"]["workbench"] == __version__
    assert set(info["versions"]) == {
        "python", "torch", "transformers", "transformer_lens", "workbench"
    }
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert abs(json.loads(lines[0])["time"] - time.time()) < 60

    run = Run.open(run_dir)
    assert run.name == "a" and run.method == "oisd" and run.status == "training"
    assert run.is_live
    assert run.metrics()["loss"].tolist() == [0.5, 0.25]

    writer.set_status("finished", final_reward=0.9)
    run = Run.open(run_dir)
    assert run.status == "finished" and run.info["final_reward"] == 0.9 and not run.is_live

    with pytest.raises(WorkbenchError, match="already holds a run"):
        RunWriter(run_dir, {"method": "oisd"}, resume=False)


def test_resume_truncates_metrics_and_probes_after_the_resumed_step(tmp_path):
    run_dir = tmp_path / "r"
    writer = RunWriter(run_dir, {"seed": 0}, resume=False)
    for step in range(1, 6):
        writer.log_metrics(step, {"loss": float(step)})
        writer.log_probes(_probe_rows(step))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 6.')  # killed mid-line

    RunWriter(run_dir, {"seed": 0}, resume=True, resume_step=3)
    run = Run.open(run_dir)
    assert run.metrics()["step"].tolist() == [1, 2, 3]
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")  # torn line dropped
    probes = run.probes()
    assert list(probes.columns) == METRIC_COLUMNS
    assert sorted(probes["step"].unique()) == [1, 2, 3] and len(probes) == 6
    assert run.info["resumes"][0]["step"] == 3 and run.status == "training"


def test_resume_defaults_to_latest_checkpoint(tmp_path):
    run_dir = tmp_path / "r"
    writer = RunWriter(run_dir, {"seed": 0}, resume=False)
    for step in range(1, 5):
        writer.log_metrics(step, {"loss": 1.0})
    write_checkpoint(run_dir, 2, _save_fn(), keep_last=None)
    RunWriter(run_dir, {"seed": 0}, resume=True)
    assert Run.open(run_dir).metrics()["step"].tolist() == [1, 2]


def test_torn_last_metrics_line_is_tolerated_by_the_reader(tmp_path):
    writer = RunWriter(tmp_path, {}, resume=False)
    writer.log_metrics(0, {"reward": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "rew')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a torn *last* line is expected: no warning
        metrics = Run.open(tmp_path).metrics()
    assert metrics["step"].tolist() == [0] and metrics["reward"].tolist() == [1]


def test_probe_set_written_hashed_and_guarded_on_resume(tmp_path):
    records = [{"prompt": "1+1=", "completion": "2"}, {"prompt": "2*3=", "completion": "6"}]
    writer = RunWriter(tmp_path, {}, resume=False)
    digest = writer.write_probe_set(records)
    run = Run.open(tmp_path)
    assert run.probe_set() == records and run.info["probe_set_hash"] == digest
    resumed = RunWriter(tmp_path, {}, resume=True)
    assert resumed.write_probe_set(records) == digest
    with pytest.raises(DataError, match="probe set .* changed"):
        resumed.write_probe_set(records[:1])


def test_probe_set_hash_is_canonical():
    expected = hashlib.sha256(b'[{"a":1,"b":"x"}]').hexdigest()
    assert probe_set_hash([{"b": "x", "a": 1}]) == expected
    assert probe_set_hash([{"a": 1, "b": "y"}]) != expected


def test_writer_context_marks_a_crash_failed(tmp_path):
    with pytest.raises(RuntimeError):
        with RunWriter(tmp_path, {}, resume=False):
            raise RuntimeError("out of memory")
    run = Run.open(tmp_path)
    assert run.status == "failed" and run.info["error"] == "RuntimeError: out of memory"


# --------------------------------------------------------------------------- reading runs


def test_empty_run_gives_empty_tables_with_contract_columns(tmp_path):
    RunWriter(tmp_path, {}, resume=False)
    run = Run.open(tmp_path)
    assert list(run.probes().columns) == METRIC_COLUMNS and run.probes().empty
    assert run.metrics().empty and run.probe_set() == [] and run.checkpoints() == []
    assert list(run.analysis("topk").columns) == TOPK_COLUMNS
    assert run.analyzed_steps("metrics") == set()


def test_analysis_tables_and_provenance_round_trip(tmp_path):
    RunWriter(tmp_path, {}, resume=False)
    run = Run.open(tmp_path)
    assert run.analysis_path(50, "metrics") == tmp_path / "analysis" / "step-000050-metrics.parquet"
    provenance = {"transformer_lens": "4.3.0", "processing": "none", "probe_set_hash": "h1"}
    atomic_write_parquet(run.analysis_path(50, "metrics"), _probe_rows(50), metadata=provenance)
    atomic_write_parquet(run.analysis_path(100, "metrics"), _probe_rows(100),
                         metadata={**provenance, "probe_set_hash": "h2"})
    atomic_write_parquet(run.analysis_path(50, "attn"), pd.DataFrame({"weight": [1.0]}))

    assert read_provenance(run.analysis_path(50, "metrics")) == provenance
    assert read_provenance(run.analysis_path(50, "attn")) == {}
    table = run.analysis("metrics")
    assert sorted(table["step"].unique()) == [50, 100] and len(table) == 4
    assert run.analyzed_steps("metrics", "h1") == {50}
    assert run.analyzed_steps("metrics") == {50, 100}
    assert run.analyzed_steps("attn") == {50}
    with pytest.raises(WorkbenchError, match="analysis kind"):
        run.analysis_path(1, "../x")


def test_list_runs_reports_broken_folders_without_hiding_good_ones(tmp_path):
    RunWriter(tmp_path / "good", {"method": "grpo"}, resume=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "run.json").write_text('{"status": "train')
    runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["corrupt", "good"]
    broken, good = runs
    assert isinstance(broken, BrokenRun) and "run.json" in broken.error and "\n" not in broken.error
    assert isinstance(good, Run) and good.method == "grpo"
    # The root itself is listed when it is a run.
    assert [r.name for r in list_runs(tmp_path / "good")] == ["good"]
    with pytest.raises(WorkbenchError, match="is not a run folder"):
        Run.open(tmp_path / "empty")
    with pytest.raises(WorkbenchError, match="not a folder"):
        list_runs(tmp_path / "nope")


def test_safe_join_refuses_escapes(tmp_path):
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "evil")
    os.symlink(root / "a", root / "alias")
    assert safe_join(root, "a") == (root / "a").resolve()
    assert safe_join(root, "alias") == (root / "a").resolve()  # a link inside root is fine
    for name in ("../secret", "a/../../secret", str(tmp_path / "secret"), "/etc", "evil", ""):
        with pytest.raises(WorkbenchError):
            safe_join(root, name)


def _lens_rows(step: int) -> pd.DataFrame:
    """Two probe rows of one step (lens_kl at layers 1 and 2, value step + layer / 10)."""
    return pd.DataFrame([{"run": "r", "step": step, "layer": layer, "head": -1, "ref_layer": -1,
                          "metric": "lens_kl", "value": step + layer / 10, "split": "reference",
                          "source": "probe"} for layer in (1, 2)])[METRIC_COLUMNS]


def test_each_probe_step_writes_only_its_own_file(tmp_path):
    """Built-in probes go to probes/step-NNNNNN.parquet: logging a step leaves every earlier
    step's file untouched (its cost does not grow with the run), Run.probes() reads them
    as one table (with an older run's probes.parquet), and a resume drops later steps."""
    from workbench.storage.runwriter import RunWriter

    run_dir = tmp_path / "r"
    writer = RunWriter(run_dir, {"method": "grpo"}, resume=False)
    writer.log_probes(_lens_rows(0))
    first = (run_dir / "probes" / "step-000000.parquet").stat()
    for step in (2, 4, 6):
        writer.log_probes(_lens_rows(step))
    after = (run_dir / "probes" / "step-000000.parquet").stat()
    assert (after.st_mtime_ns, after.st_ino) == (first.st_mtime_ns, first.st_ino)
    assert sorted(p.name for p in (run_dir / "probes").iterdir()) == [
        f"step-{s:06d}.parquet" for s in (0, 2, 4, 6)]
    writer.log_probes(_lens_rows(6).assign(split="greedy"))  # a further split of a step: appended to its file
    assert len(pd.read_parquet(run_dir / "probes" / "step-000006.parquet")) == 4
    table = Run.open(run_dir).probes()
    table = table[table["split"] == "reference"]
    assert table["step"].tolist() == [0, 0, 2, 2, 4, 4, 6, 6]
    assert table["value"].tolist() == pytest.approx([0.1, 0.2, 2.1, 2.2, 4.1, 4.2, 6.1, 6.2])
    # An older run's single file is read beside the parts.
    _lens_rows(-1).assign(step=1).to_parquet(run_dir / "probes.parquet")
    assert Run.open(run_dir).probes()["step"].tolist()[:2] == [1, 1]
    (run_dir / "probes.parquet").unlink()
    # Resuming from step 2 drops the later steps' files.
    RunWriter(run_dir, {"method": "grpo"}, resume=True, resume_step=2)
    assert sorted(Run.open(run_dir).probes()["step"].unique()) == [0, 2]


def test_metric_rows_read_only_what_is_asked_and_list_the_catalog_from_footers(tmp_path):
    """Metric files are sorted by metric and split, in row groups, with their (metric, split)
    pairs in the footer. Run.metric_rows returns exactly the rows a pandas filter of the whole
    table would (any order of filters, several steps, a legacy unsorted file beside the
    parts), opens only the asked steps' files, and skips an unreadable file with a warning."""
    import pyarrow.parquet as pq

    from workbench.storage.runwriter import METRIC_ROW_GROUP

    metrics = ["top1_agree", "lens_kl", "attn_entropy"]
    splits = ["sampled_wrong", "reference", "greedy"]

    def rows(step: int) -> pd.DataFrame:
        out = [{"run": "r", "step": step, "layer": layer, "head": head, "ref_layer": -1, "metric": metric,
                "value": step * 1000 + layer * 10 + head + 0.5 * metrics.index(metric) + 0.25 * splits.index(split),
                "split": split, "source": "probe"}
               for split in splits for layer in range(1, 40) for head in range(-1, 33) for metric in metrics]
        return pd.DataFrame(out)[METRIC_COLUMNS]

    run_dir = tmp_path / "r"
    writer = RunWriter(run_dir, {"method": "grpo"}, resume=False)
    for step in (0, 10, 20):
        writer.log_probes(rows(step))
    part = run_dir / "probes" / "step-000010.parquet"
    meta = pq.read_metadata(part)
    assert meta.num_row_groups == -(-len(rows(10)) // METRIC_ROW_GROUP) > 1
    stored = pd.read_parquet(part)
    assert stored["metric"].is_monotonic_increasing  # sorted: one metric's rows are a few row groups
    assert sorted(map(tuple, read_provenance(part)["catalog"])) == sorted((m, s) for m in metrics for s in splits)

    run = Run.open(run_dir)
    everything = pd.concat([rows(s) for s in (0, 10, 20)], ignore_index=True)
    picked = run.metric_rows("probe", metric=["lens_kl"], head=[-1], split=["reference", "greedy"])
    expected = everything.query("metric == 'lens_kl' and head == -1 and split in ['reference', 'greedy']")
    key = ["step", "split", "layer"]
    pd.testing.assert_frame_equal(picked.sort_values(key, ignore_index=True),
                                  expected.sort_values(key, ignore_index=True), check_dtype=False)
    one_step = run.metric_rows("probe", step=[10], metric=["attn_entropy"], columns=["step", "value"])
    assert list(one_step.columns) == ["step", "value"] and set(one_step["step"]) == {10}
    assert len(one_step) == 3 * 39 * 34
    assert run.metric_rows("probe", metric=["no_such_metric"]).empty
    with pytest.raises(WorkbenchError, match="unknown metric columns"):
        run.metric_rows("probe", colour=["red"])
    assert run.metric_steps("probe") == [0, 10, 20]

    # A run from before the layout: one unsorted probes.parquet, no catalog in its footer.
    legacy = rows(5).assign(metric="entropy")
    legacy.sample(frac=1.0, random_state=0).to_parquet(run_dir / "probes.parquet")
    catalog = run.metric_catalog("probe")
    assert set(zip(catalog["metric"], catalog["split"])) == {(m, s) for m in metrics + ["entropy"] for s in splits}
    assert run.metric_steps("probe") == [0, 5, 10, 20]
    old = run.metric_rows("probe", metric=["entropy"], layer=[3], head=[-1])
    assert sorted(old["value"]) == sorted(legacy.query("layer == 3 and head == -1")["value"])

    # An unreadable part hides nothing else.
    (run_dir / "probes" / "step-000020.parquet").write_bytes(b"not parquet")
    with pytest.warns(UserWarning, match="step-000020.parquet is unreadable"):
        survived = run.metric_rows("probe", metric=["lens_kl"], head=[-1], split=["reference"])
    assert sorted(survived["step"].unique()) == [0, 10]


def test_probe_parts_merge_into_segments_and_survive_a_cut_merge_and_a_resume(tmp_path):
    """Once SEGMENT_STEPS parts have gathered before the newest step, they are merged into one
    segment file; readers see the same rows either way, a merge cut short (the segment
    written, the parts not yet removed) neither duplicates nor loses rows, and a resume into
    a segment keeps its earlier steps."""
    from workbench.storage.paths import SEGMENT_STEPS

    run_dir = tmp_path / "r"
    writer = RunWriter(run_dir, {"method": "grpo"}, resume=False)
    steps = [5 * i for i in range(SEGMENT_STEPS + 3)]
    for step in steps:
        writer.log_probes(_lens_rows(step))
    folder = run_dir / "probes"
    names = sorted(p.name for p in folder.iterdir())
    last_merged = steps[SEGMENT_STEPS - 1]
    assert names == [f"step-{s:06d}.parquet" for s in steps[SEGMENT_STEPS:]] + [
        f"steps-000000-{last_merged:06d}.parquet"]
    run = Run.open(run_dir)
    assert run.metric_steps("probe") == steps
    table = run.probes()
    assert sorted(table["step"].tolist()) == sorted(steps * 2)
    assert sorted(table["value"]) == pytest.approx(sorted(s + layer / 10 for s in steps for layer in (1, 2)))
    assert set(run.metric_rows("probe", step=[10])["step"]) == {10}  # found inside the segment

    # A merge cut short: a part the segment already holds is back beside it.
    _lens_rows(10).to_parquet(folder / "step-000010.parquet")
    assert sorted(Run.open(run_dir).probes()["step"].tolist()) == sorted(steps * 2)
    writer.log_probes(_lens_rows(steps[-1] + 5))  # the next log removes the leftover
    assert not (folder / "step-000010.parquet").exists()

    # Resume at a step inside the segment: its rows up to that step stay, the rest go.
    RunWriter(run_dir, {"method": "grpo"}, resume=True, resume_step=50)
    resumed = Run.open(run_dir)
    assert resumed.metric_steps("probe") == [s for s in steps if s <= 50]
    assert sorted(p.name for p in folder.iterdir()) == ["steps-000000-000050.parquet"]


def _write_analysis(run: Run, step: int, offset: float = 0.0, process: int = 0) -> None:
    """One checkpoint's analyzer files as `oisd probe` writes them: its metric table (lens_kl
    at layers 1 and 2, value step + layer / 10 + offset) and its drift table, each with its
    provenance in the footer."""
    from workbench.storage.runwriter import write_metric_table
    from workbench.storage.schema import DRIFT_COLUMNS

    rows = _lens_rows(step).assign(source="analyzer")
    rows["value"] += offset
    write_metric_table(run.analysis_path(step, "metrics"), rows,
                       metadata={"probe_set_hash": "h", "process": process, "offset": offset, "kind": "metrics"})
    drift = pd.DataFrame([{"run": "r", "step": step, "module": "block", "block": b, "kind": "all",
                           "rel_change": step / 100 + b + offset, "changed_bf16": 0.5, "n_params": 10}
                          for b in (1, 2, 3)])[DRIFT_COLUMNS]
    atomic_write_parquet(run.analysis_path(step, "drift"), drift, metadata={"kind": "drift", "step": step})


def _analysis_state(run: Run) -> dict:
    """What every reader of analysis files gives, in a form that compares equal across layouts."""
    metrics = run.analysis("metrics").sort_values(["step", "layer"], ignore_index=True)
    drift = run.analysis("drift").sort_values(["step", "block"], ignore_index=True)
    return {
        "metrics": metrics.to_dict("list"),
        "drift": drift.to_dict("list"),
        "one_step": run.metric_rows("analyzer", step=[10], metric=["lens_kl"])["value"].tolist(),
        "provenance": run.analysis_provenance("metrics"),
        "drift_steps": sorted(run.analysis_provenance("drift")),
        "steps": run.metric_steps("analyzer"),
        "analysed": sorted(run.analyzed_steps("metrics", "h")),
        "catalog": run.metric_catalog("analyzer").values.tolist(),
    }


def test_analysis_files_merge_into_segments_and_read_the_same(tmp_path):
    """The analyzer's files of the kinds read over every checkpoint merge into segments of
    ``size`` checkpoints (``analysis/steps-A-B-{kind}.parquet``, provenance per step in the
    footer): every reader gives the same rows and provenance before and after; a checkpoint
    analysed again replaces its rows (readers take the newer file; the next merge folds it
    in); a merge cut short duplicates nothing; a segment is never made across another."""
    from workbench.storage.runwriter import merge_analysis_files

    run_dir = tmp_path / "r"
    RunWriter(run_dir, {"method": "grpo"}, resume=False).set_status("finished")
    run = Run.open(run_dir)
    steps = [10 * i for i in range(1, 8)]
    for step in steps:
        _write_analysis(run, step, process=(step // 10) % 2)
    before = _analysis_state(run)
    assert before["steps"] == steps and before["provenance"][30]["process"] == 1
    assert before["one_step"] == [10.1, 10.2]

    written = merge_analysis_files(run.paths, "metrics", size=3)
    written += merge_analysis_files(run.paths, "drift", size=3)
    names = sorted(p.name for p in run.paths.analysis.iterdir())
    assert names == ["step-000070-drift.parquet", "step-000070-metrics.parquet",
                     "steps-000010-000030-drift.parquet", "steps-000010-000030-metrics.parquet",
                     "steps-000040-000060-drift.parquet", "steps-000040-000060-metrics.parquet"]
    assert sorted(p.name for p in written) == names[2:]
    assert _analysis_state(run) == before

    # Step 20 analysed again (another probe set, --force): its new rows, not the old ones.
    _write_analysis(run, 20, offset=1000.0)
    again = _analysis_state(run)
    assert again["provenance"][20]["offset"] == 1000.0
    values = pd.DataFrame(again["metrics"]).query("step == 20")["value"].tolist()
    assert values == [1020.1, 1020.2]
    drift = pd.DataFrame(again["drift"])
    assert drift.query("step == 20")["rel_change"].tolist() == [1001.2, 1002.2, 1003.2]
    assert len(drift) == 3 * len(steps)
    merge_analysis_files(run.paths, "metrics", size=3)
    merge_analysis_files(run.paths, "drift", size=3)
    assert not run.analysis_path(20, "metrics").exists() and not run.analysis_path(20, "drift").exists()
    assert _analysis_state(run) == again

    # A merge cut short: a checkpoint file the segment already holds is back beside it.
    _write_analysis(run, 40)
    assert _analysis_state(run) == again
    merge_analysis_files(run.paths, "metrics", size=3)
    assert not run.analysis_path(40, "metrics").exists()

    # Step 5 (before every segment) and steps 80, 90: no segment spans 5..80 across the others.
    for step in (5, 80, 90):
        _write_analysis(run, step)
    merge_analysis_files(run.paths, "metrics", size=3)
    segments, parts = run.paths.analysis_files("metrics")
    assert [(a, b) for a, b, _ in segments] == [(10, 30), (40, 60), (70, 90)]
    assert [step for step, _ in parts] == [5]
    assert run.metric_steps("analyzer") == [5, *steps, 80, 90]

    with pytest.raises(WorkbenchError, match="analysis kind 'attn' is not merged"):
        merge_analysis_files(run.paths, "attn")
