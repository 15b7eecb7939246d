"""Writing a run folder: :class:`RunWriter` (run.json, metrics, probe set, probes, samples),
and :func:`merge_analysis_files` (the analyzer's files of one kind merged into segments).

Every file is written atomically (:mod:`workbench.storage.atomic`) except ``metrics.jsonl``,
which is appended one fsynced line at a time so a kill loses at most the line being
written. Checkpoints are written by :func:`workbench.storage.checkpoints.write_checkpoint`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from workbench.errors import DataError, WorkbenchError
from workbench.storage.atomic import (
    atomic_write_json,
    atomic_write_parquet,
    atomic_write_text,
    json_default,
    provenance_of,
)
from workbench.storage.checkpoints import latest_checkpoint
from workbench.storage.paths import SEGMENT_KINDS, SEGMENT_STEPS, RunPaths, probe_set_hash
from workbench.storage.runstore import (
    METRIC_CATALOG_KEY,
    STATUSES,
    load_run_json,
    read_metrics_lines,
)
from workbench.storage.schema import METRIC_COLUMNS, SAMPLE_COLUMNS

__all__ = ["METRIC_ROW_GROUP", "METRIC_SORT", "RunWriter", "merge_analysis_files", "write_metric_table"]

# A metric table (one step's probes, one checkpoint's analysis) is stored sorted by metric,
# then split, in row groups of METRIC_ROW_GROUP rows: a read of one metric (the dashboard's
# heat maps, `oisd compare`) decodes the row groups that hold it and skips the rest. At 36
# layers x 32 heads a step holds ~20k rows, of which one metric on one split is ~36.
METRIC_SORT = ["metric", "split", "step", "layer", "head", "ref_layer"]
METRIC_ROW_GROUP = 2048
# Built-in probe parts are merged into one segment file once paths.SEGMENT_STEPS have
# gathered (the newest step's part is never merged: a further split of it may still come);
# a step's write stays bounded: its own part, and every SEGMENT_STEPS steps one merge.


def write_metric_table(path: str | os.PathLike, df: pd.DataFrame, metadata: dict | None = None) -> None:
    """Write a metric table (``METRIC_COLUMNS``) atomically, sorted and grouped for filtered
    reads, with its distinct ``(metric, split)`` pairs in the footer
    (:data:`~workbench.storage.runstore.METRIC_CATALOG_KEY`) so that listing what a long series
    holds reads footers, not rows."""
    rows = df[METRIC_COLUMNS].sort_values(METRIC_SORT, kind="stable", ignore_index=True)
    catalog = rows[["metric", "split"]].drop_duplicates().values.tolist()
    atomic_write_parquet(path, rows, metadata={**(metadata or {}), METRIC_CATALOG_KEY: catalog},
                         row_group_size=METRIC_ROW_GROUP)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    """Versions of the libraries that decide the numbers (from metadata, no imports)."""
    from workbench import __version__

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": dist("torch"),
        "transformers": dist("transformers"),
        "transformer_lens": dist("transformer-lens"),
        "workbench": __version__,
    }


class RunWriter:
    """Writes one run folder: run.json, metrics, probe set, probes.

    Only the main process of a distributed run should hold a RunWriter.

    Args:
        run_dir: The run folder (created if needed).
        config: The run's resolved config (a JSON-serialisable dict); ``config["seed"]``
            is recorded as the seed.
        resume: Continue the run in ``run_dir``. Metrics and probe rows with a step
            after ``resume_step`` are dropped so the run's tables match an
            uninterrupted run. Without ``resume``, a folder that already has a
            ``run.json`` is refused.
        resume_step: The step of the checkpoint the trainer resumed from. ``None``
            means the latest complete checkpoint, or, when there is none, a restart
            from scratch (all metrics and probe rows dropped).
        append: With ``resume``, continue the folder as it is and drop nothing (an
            analysis folder, which has no checkpoints of its own to resume from);
            the ``resumes`` entry then has ``step: null``. Excludes ``resume_step``.

    Raises:
        WorkbenchError: ``run_dir`` already holds a run and ``resume`` is False, or its
            run.json is unreadable.
        ValueError: ``append`` without ``resume``, or with a ``resume_step``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict,
        *,
        resume: bool,
        resume_step: int | None = None,
        append: bool = False,
    ):
        if append and (not resume or resume_step is not None):
            raise ValueError("RunWriter(append=True) needs resume=True and no resume_step")
        self.run_dir = Path(run_dir)
        self.paths = RunPaths(self.run_dir)
        self.run_json = self.paths.run_json
        self.metrics_path = self.paths.metrics
        self.probes_path = self.paths.probes
        self.probe_set_path = self.paths.probe_set
        self.samples_path = self.paths.samples
        self.run_dir.mkdir(parents=True, exist_ok=True)
        here = {"host": socket.gethostname(), "pid": os.getpid()}

        if self.run_json.exists() and not resume:
            raise WorkbenchError(
                f"{self.run_dir} already holds a run ({RunPaths.RUN_JSON}); "
                "resume it or choose another run_dir"
            )
        if self.run_json.exists():
            self.info = load_run_json(self.run_dir)
            if not append:
                if resume_step is None:
                    latest = latest_checkpoint(self.run_dir)
                    resume_step = latest.step if latest is not None else -1
                self._truncate_after(resume_step)
            self.info.setdefault("resumes", []).append(
                {"time": _now_iso(), "step": resume_step, "versions": _versions(),
                 "config_changed": self.info.get("config") != config, **here}
            )
            self.info.update(config=config, status="training", **here)
        else:
            self.info = {
                "config": config,
                "seed": config.get("seed"),
                "start_time": _now_iso(),
                "versions": _versions(),
                "status": "training",
                **here,
            }
        atomic_write_json(self.run_json, self.info)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # A crash (or Ctrl-C) marks the run failed; success is marked by the caller.
        if exc_type is not None:
            self.set_status("failed", error=f"{exc_type.__name__}: {exc}")

    def _truncate_after(self, step: int) -> None:
        """Drop metrics lines and probe rows with a step after ``step``."""
        if self.metrics_path.exists():
            records, bad = read_metrics_lines(self.metrics_path)
            kept = [r for r in records if r["step"] <= step]
            if bad or len(kept) != len(records):
                atomic_write_text(
                    self.metrics_path,
                    "".join(json.dumps(r, default=json_default) + "\n" for r in kept),
                )
        for path in (self.probes_path, self.samples_path):
            if path.exists():
                table = pd.read_parquet(path)
                if (table["step"] > step).any():
                    atomic_write_parquet(path, table[table["step"] <= step])
        for part_step, path in self.paths.probe_part_files():
            if part_step > step:
                path.unlink()
        for first, last, path in self.paths.probe_segment_files():
            if last > step:  # keep the segment's rows up to the step, under its new range
                table = pd.read_parquet(path)
                kept = table[table["step"] <= step]
                if len(kept):
                    steps = sorted(int(s) for s in kept["step"].unique())
                    write_metric_table(self.paths.probe_segment(first, steps[-1]), kept, metadata={"steps": steps})
                path.unlink()

    def log_metrics(self, step: int, values: dict) -> None:
        """Append one line ``{"step", "time", **values}`` to metrics.jsonl, fsynced.

        Args:
            step: Training step.
            values: Metric name -> number (names in docs/objectives.md); numpy/torch scalars are fine.
        """
        clash = {"step", "time"} & values.keys()
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved")
        line = json.dumps({"step": int(step), "time": time.time(), **values}, default=json_default)
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_probe_set(self, records: list[dict]) -> str:
        """Write the probe set (atomically) and record its hash in run.json.

        Returns:
            The probe set hash (:func:`probe_set_hash`).

        Raises:
            DataError: On resume, the probe set differs from the one the run started
                with (numbers would no longer be comparable across steps).
        """
        digest = probe_set_hash(records)
        previous = self.info.get("probe_set_hash")
        if previous is not None and previous != digest and self.probe_set_path.exists():
            raise DataError(
                f"probe set of {self.run_dir} changed since the run started "
                f"(hash {previous[:12]} != {digest[:12]})"
            )
        lines = (json.dumps(r, ensure_ascii=False, default=json_default) for r in records)
        atomic_write_text(self.probe_set_path, "".join(line + "\n" for line in lines))
        self.info["probe_set_hash"] = digest
        atomic_write_json(self.run_json, self.info)
        return digest

    def log_probes(self, df: pd.DataFrame) -> None:
        """Append probe rows (METRIC_COLUMNS) of one or more steps: each step's rows go to its
        own ``probes/step-NNNNNN.parquet``, atomically (rows logged again for a step, e.g. a
        further split, are appended to that step's file).

        A probe step reads and writes only its own step's rows, whatever the run's length:
        probing step 201 of a 200-step run costs what step 1 did
        (``benchmarks/bench_probe_log.py``). :meth:`Run.probes` reads the parts as one table.
        """
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"probe rows lack columns {missing}")
        rows = df[METRIC_COLUMNS]
        for step, part in rows.groupby("step", sort=True):
            path = self.paths.probe_part(int(step))
            if path.exists():
                part = pd.concat([pd.read_parquet(path), part], ignore_index=True)
            write_metric_table(path, part)
        self._merge_probe_parts()

    def _merge_probe_parts(self) -> None:
        """Merge the per-step parts into one segment once ``SEGMENT_STEPS`` have gathered
        before the newest one. The segment is written (atomically) before the parts go, so a
        kill in between leaves parts the segment covers, which readers skip and the next
        merge removes."""
        for _, leftover in self.paths.probe_part_files(covered=True):  # of a merge cut short
            leftover.unlink()
        parts = self.paths.probe_part_files()[:-1]  # never the newest step's part
        if len(parts) < SEGMENT_STEPS:
            return
        table = pd.concat([pd.read_parquet(p) for _, p in parts], ignore_index=True)
        steps = [step for step, _ in parts]
        write_metric_table(self.paths.probe_segment(steps[0], steps[-1]), table, metadata={"steps": steps})
        for _, path in parts:
            path.unlink()

    def log_samples(self, df: pd.DataFrame) -> None:
        """Append sampled probe completions (SAMPLE_COLUMNS) to probe_samples.parquet.

        One row per sampled sequence: ``step, prompt, sample, response_ids, correct``.
        The analyzer re-scores exactly these token ids (splits ``sampled_correct`` and
        ``sampled_wrong``), so it needs no sampler and no verifier of its own.
        """
        missing = [c for c in SAMPLE_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"sample rows lack columns {missing}")
        new = df[SAMPLE_COLUMNS]
        if self.samples_path.exists():
            new = pd.concat([pd.read_parquet(self.samples_path), new], ignore_index=True)
        atomic_write_parquet(self.samples_path, new)

    def record(self, **facts: Any) -> None:
        """Write resolved facts of the run into run.json (e.g. ``num_layers``, ``oisd_layers``),
        so that readers never re-derive them from the config."""
        self.info.update(facts)
        atomic_write_json(self.run_json, self.info)

    def set_status(self, status: str, **extra: Any) -> None:
        """Set ``status`` ("training" | "finished" | "failed") plus extra fields in run.json."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.info.update(status=status, **extra)
        if status != "training":
            self.info["end_time"] = _now_iso()
        atomic_write_json(self.run_json, self.info)


def merge_analysis_files(paths: RunPaths, kind: str, *, size: int = SEGMENT_STEPS) -> list[Path]:
    """Merge the per-checkpoint analysis files of ``kind`` (one of
    :data:`~workbench.storage.paths.SEGMENT_KINDS`) into segment files
    (``analysis/steps-AAAAAA-BBBBBB-{kind}.parquet``), the way the built-in probes' parts are.

    A per-checkpoint file inside a segment's range (a checkpoint analysed again, or a merge
    cut short) replaces that step's rows and provenance in the segment. Of the others, every
    ``size`` consecutive checkpoints with no segment between them become one segment; fewer
    stay as they are. Each segment keeps its steps' provenance in its footer (``steps``,
    ``provenance``: step -> the checkpoint file's footer), so
    :meth:`~workbench.storage.runstore.Run.analysis_provenance` reads the same either way. A
    segment is written (atomically) before its checkpoint files go: a kill in between leaves
    files the segment also holds, with the same rows, which readers take from the files and
    the next merge removes. Called by ``oisd probe`` once every process finished.

    Returns:
        The segment files written.
    """
    if kind not in SEGMENT_KINDS:
        raise WorkbenchError(f"analysis kind {kind!r} is not merged; merged kinds: {', '.join(SEGMENT_KINDS)}")
    segments, parts = paths.analysis_files(kind)
    written = []
    for first, last, path in segments:  # newer per-checkpoint files inside a segment's range
        inside = [(step, p) for step, p in parts if first <= step <= last]
        if not inside:
            continue
        newer = {step for step, _ in inside}
        table, info = _read_with_provenance(path)
        provenance = {int(step): v for step, v in info.get("provenance", {}).items() if int(step) not in newer}
        tables = [table[~table["step"].isin(newer)]]
        for step, p in inside:
            part, provenance[step] = _read_with_provenance(p)
            tables.append(part)
        _write_segment(path, kind, tables, provenance)
        written.append(path)
        for _, p in inside:
            p.unlink()
    starts = [first for first, _, _ in segments]
    loose = [(step, p) for step, p in parts if not any(a <= step <= b for a, b, _ in segments)]
    groups: list[list[tuple[int, Path]]] = []
    for step, p in loose:  # runs of consecutive files with no segment between them
        if groups and not any(groups[-1][-1][0] < a < step for a in starts):
            groups[-1].append((step, p))
        else:
            groups.append([(step, p)])
    for group in groups:
        for i in range(0, len(group) - size + 1, size):
            chunk = group[i : i + size]
            path = paths.analysis_segment(chunk[0][0], chunk[-1][0], kind)
            read = {step: _read_with_provenance(p) for step, p in chunk}
            _write_segment(path, kind, [table for table, _ in read.values()],
                           {step: info for step, (_, info) in read.items()})
            written.append(path)
            for _, p in chunk:
                p.unlink()
    return written


def _read_with_provenance(path: Path) -> tuple[pd.DataFrame, dict]:
    """A parquet file's table and its provenance, the file opened once."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return table.to_pandas(), provenance_of(table.schema)


def _write_segment(path: Path, kind: str, tables: list[pd.DataFrame], provenance: dict[int, dict]) -> None:
    """One segment of analysis ``kind``: the checkpoints' rows in step order, and their
    provenance in the footer."""
    table = pd.concat(tables, ignore_index=True)
    steps = sorted(provenance)
    metadata = {"kind": kind, "steps": steps, "provenance": {str(step): provenance[step] for step in steps}}
    if kind == "metrics":
        write_metric_table(path, table, metadata)
    else:
        atomic_write_parquet(path, table.sort_values("step", kind="stable", ignore_index=True), metadata=metadata)
