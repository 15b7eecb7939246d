"""The run store: the layout of a run folder (:class:`RunPaths`, the one place file
names are written) and reading it (:class:`Run`, :func:`list_runs`, :func:`run_summary`).
The contract is in docs/design.md.

A run folder::

    runs/<run_name>/
      run.json                 config, versions, seed, start time, host, pid, status
      metrics.jsonl            one JSON object per training step ("step", "time", ...)
      probe_set.jsonl          the fixed probe prompts and reference completions
      probes/step-NNNNNN.parquet  built-in probes, one file per probed step, METRIC_COLUMNS (schema.py)
      probes/steps-A-B.parquet    ...merged 32 steps at a time (paths.SEGMENT_STEPS)
      checkpoints/step-000050/ HF files + tokenizer + trainer_state + manifest.json
      analysis/step-000050-<kind>.parquet   analyzer output with provenance metadata
      analysis/steps-A-B-<kind>.parquet     ...metrics, drift, lens, patch merged 32 checkpoints at a time

The rest of the store, by seam: :mod:`workbench.storage.atomic` (every file is written
atomically), :mod:`workbench.storage.checkpoints` (checkpoints and their manifests),
:mod:`workbench.storage.runwriter` (:class:`~workbench.storage.runwriter.RunWriter`, writing a run)
and :mod:`workbench.models.loading` (what a model folder is).

Readers are cheap and never crash on a partial folder: missing tables come back
empty with their contract columns, a torn last metrics line is dropped, and a run
folder that cannot be opened is listed as a :class:`BrokenRun` carrying the one-line
reason.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from workbench.errors import WorkbenchError, warn
from workbench.storage.atomic import read_provenance
from workbench.storage.paths import RunPaths, is_run_folder
from workbench.storage.schema import (
    ATTN_COLUMNS,
    CELL_COLUMNS,
    DRIFT_COLUMNS,
    LENS_COLUMNS,
    METRIC_COLUMNS,
    PATCH_COLUMNS,
    SAMPLE_COLUMNS,
    TOPK_COLUMNS,
)

if TYPE_CHECKING:
    from workbench.storage.checkpoints import Checkpoint

__all__ = [
    "ANALYSIS_COLUMNS", "LIVE_SECONDS", "METRIC_CATALOG_KEY", "STATUSES", "BrokenRun", "Run", "list_runs",
    "last_value", "load_run_json", "read_metrics_lines", "run_summary",
]

# The footer key of a metric table's distinct (metric, split) pairs (runwriter.write_metric_table).
METRIC_CATALOG_KEY = "catalog"
LIVE_SECONDS = 120.0  # a "training" run whose metrics moved this recently is live
STATUSES = ("training", "finished", "failed")
# Columns of an empty analysis table, by kind (other kinds come back with no columns).
ANALYSIS_COLUMNS = {
    "metrics": METRIC_COLUMNS,
    "topk": TOPK_COLUMNS,
    "cells": CELL_COLUMNS,
    "attn": ATTN_COLUMNS,
    "drift": DRIFT_COLUMNS,
    "lens": LENS_COLUMNS,
    "patch": PATCH_COLUMNS,
}


def _warn(message: str) -> None:
    warn(message, stacklevel=4, logger=__name__)


def _read_files(files: list[Path], columns: list[str] | None, where: dict[str, list],
                skip: dict[Path, frozenset[int]] | None = None) -> pd.DataFrame:
    """The rows of ``files`` that match ``where`` (:func:`_read_where`), in file order, as one
    table of ``columns`` (None: every column), leaving out the rows of the steps ``skip``
    names for a file (a segment's steps that a newer per-checkpoint file holds). Files are
    read on a few threads (parquet decoding releases the GIL) and joined as Arrow tables, so
    there is one conversion to pandas, not one per file. An unreadable file is skipped with a
    warning."""
    import pyarrow as pa

    skip = skip or {}

    def read(path: Path):
        try:
            return _read_where(path, columns, where, skip.get(path, frozenset()))
        except Exception as exc:  # a corrupt file must not take the dashboard down
            _warn(f"{path} is unreadable: {exc}")
            return None

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        tables = [t for t in pool.map(read, files) if t is not None and t.num_rows]
    if not tables:
        return pd.DataFrame(columns=columns or [])
    try:
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # types that Arrow will not unify: let pandas
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True)


_PRUNE_COLUMNS = ("metric", "split", "step")  # the leading keys of runwriter.METRIC_SORT


def _read_where(path: Path, columns: list[str] | None, where: dict[str, list], skip_steps: frozenset[int] = frozenset()):
    """The rows of one parquet file whose ``column`` is in ``values`` for every item of
    ``where`` and whose step is not in ``skip_steps``, as an Arrow table of ``columns``.

    Row groups are chosen from the footer's min/max statistics first (a sorted metric file
    keeps one metric in a few row groups), and only those are decoded. Measured on a
    32-step segment at 36 x 32 (325 row groups): 7 ms, against 37 ms for a pyarrow dataset
    scan with the same filter.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    meta = file.metadata
    names = meta.schema.names
    groups = []
    # Only the columns metric files are sorted by narrow a row group's range.
    prune = {c: v for c, v in where.items() if c in _PRUNE_COLUMNS and c in names}
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        for column, values in prune.items():
            stats = group.column(names.index(column)).statistics
            if stats is not None and stats.has_min_max and not any(stats.min <= v <= stats.max for v in values):
                break  # no value of this column can be in the row group
        else:
            groups.append(i)
    needed = None if columns is None else list(dict.fromkeys(columns + list(where) + (["step"] if skip_steps else [])))
    table = file.read_row_groups(groups, columns=needed)
    for column, values in where.items():
        table = table.filter(pc.is_in(table[column], value_set=_value_set(values, table.schema.field(column).type)))
    if skip_steps:
        kept = pc.invert(pc.is_in(table["step"], value_set=_value_set(sorted(skip_steps), table.schema.field("step").type)))
        table = table.filter(kept)
    return table if columns is None else table.select(columns)


def _value_set(values: list, type_):
    """``values`` as an Arrow array of ``type_`` (the filter's value set)."""
    import pyarrow as pa

    return pa.array(values).cast(type_)


# ---------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------


def read_metrics_lines(path: Path) -> tuple[list[dict], int]:
    """Parse ``metrics.jsonl``; returns (records, number of unparsable lines).

    A torn last line (the process was killed mid-write) is dropped silently; a bad
    line in the middle is dropped with a warning.
    """
    if not path.is_file():
        return [], 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records, bad = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not an object with a step")
        except ValueError:
            bad += 1
            if i != len(lines) - 1:
                _warn(f"{path}: skipping unreadable line {i + 1}")
            continue
        records.append(record)
    return records, bad


def load_run_json(folder: Path) -> dict:
    """The parsed run.json of ``folder``.

    Raises:
        WorkbenchError: there is none, it is not valid JSON, or not a JSON object.
    """
    path = RunPaths(folder).run_json
    if not path.is_file():
        raise WorkbenchError(f"{folder} is not a run folder (no {RunPaths.RUN_JSON})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkbenchError(f"{path} is unreadable: {exc}") from None
    if not isinstance(info, dict):
        raise WorkbenchError(f"{path} is not a JSON object")
    return info


class Run:
    """A run folder opened for reading (cheap; tables are read on demand).

    Use :meth:`Run.open`. Every table accessor tolerates a partial folder (a run
    still training, or killed): missing files give empty tables.
    """

    def __init__(self, path: Path, info: dict):
        self.path = path
        self.paths = RunPaths(path)
        self.info = info

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        """Open a run folder.

        Raises:
            WorkbenchError: No run.json, or run.json is not valid JSON.
        """
        folder = Path(path)
        return cls(folder, load_run_json(folder))

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> dict:
        config = self.info.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def method(self) -> str | None:
        return self.config.get("method")

    @property
    def is_baseline(self) -> bool:
        """Whether the run trained the plain RL baseline the other methods are compared with
        (run.json's ``baseline``, from the trainer's method table; False when it does not say)."""
        return bool(self.info.get("baseline", False))

    @property
    def status(self) -> str:
        """What run.json says: "training", "finished" or "failed"."""
        return str(self.info.get("status", "unknown"))

    @property
    def is_live(self) -> bool:
        """Training, and metrics.jsonl (or run.json) changed in the last 120 s."""
        if self.status != "training":
            return False
        mtimes = [p.stat().st_mtime for p in (self.paths.metrics, self.paths.run_json)
                  if p.exists()]
        return bool(mtimes) and time.time() - max(mtimes) < LIVE_SECONDS

    @property
    def is_analysis_folder(self) -> bool:
        """An analysis folder of checkpoints trained elsewhere (``oisd probe PATH --out DIR``):
        its checkpoints are listed in run.json (``external``), not held in ``checkpoints/``."""
        return isinstance(self.info.get("external"), dict)

    def metrics(self) -> pd.DataFrame:
        """Training metrics, one row per step (sorted; a re-logged step keeps its last line)."""
        records, _ = read_metrics_lines(self.paths.metrics)
        if not records:
            return pd.DataFrame(columns=["step", "time"])
        df = pd.DataFrame.from_records(records)
        return df.drop_duplicates("step", keep="last").sort_values("step", ignore_index=True)

    def probes(self) -> pd.DataFrame:
        """The trainer's built-in probes (METRIC_COLUMNS), every probed step in step order;
        empty when there are none yet. Reads ``probes/step-*.parquet`` and, for runs written
        before them, ``probes.parquet``."""
        return self.metric_rows("probe")

    def metric_files(self, source: str, steps: Iterable[int] | None = None) -> list[Path]:
        """The files of one metric source (``"probe"``: ``probes/``, its segments and parts,
        and a legacy ``probes.parquet``; ``"analyzer"``: the analysis segments and
        per-checkpoint files of kind ``metrics``), by step; only those that may hold
        ``steps`` when given (a legacy single table is always included)."""
        return list(self._metric_sources(source, steps))

    def _metric_sources(self, source: str, steps: Iterable[int] | None = None) -> dict[Path, frozenset[int]]:
        """:meth:`metric_files`, each with the steps whose rows it must not give."""
        if source == "analyzer":
            return self._analysis_sources("metrics", steps)
        if source != "probe":
            raise WorkbenchError(f"unknown metric source {source!r}; expected 'probe' or 'analyzer'")
        wanted = None if steps is None else {int(s) for s in steps}
        # files of several steps first: a legacy table, then the segments
        several = [self.paths.probes] if self.paths.probes.is_file() else []
        several += [p for a, b, p in self.paths.probe_segment_files()
                    if wanted is None or any(a <= step <= b for step in wanted)]
        parts = [p for step, p in self.paths.probe_part_files() if wanted is None or step in wanted]
        return dict.fromkeys(several + parts, frozenset())

    def _analysis_sources(self, kind: str, steps: Iterable[int] | None = None) -> dict[Path, frozenset[int]]:
        """The analysis files of ``kind`` (its segments, then its per-checkpoint files, by
        step; only those that may hold ``steps`` when given), each with the steps whose rows
        it must not give: a segment's steps that a newer per-checkpoint file holds."""
        wanted = None if steps is None else {int(s) for s in steps}
        segments, parts = self.paths.analysis_files(kind)
        newer = [step for step, _ in parts]
        found = {p: frozenset(s for s in newer if a <= s <= b) for a, b, p in segments
                 if wanted is None or any(a <= s <= b for s in wanted)}
        found.update((p, frozenset()) for step, p in parts if wanted is None or step in wanted)
        return found

    def metric_rows(self, source: str, *, columns: list[str] | None = None,
                    **where: Iterable | None) -> pd.DataFrame:
        """Rows of one metric source (see :meth:`metric_files`) that match ``where``, read
        with the filter pushed into the parquet scan: only the row groups and columns
        asked for are decoded, never the whole series.

        Args:
            source: ``"probe"`` or ``"analyzer"``.
            columns: the columns to return (default: ``METRIC_COLUMNS``).
            where: column -> the values to keep, e.g. ``metric=["lens_kl"], head=[-1]``
                (None: no condition). ``step=`` also picks the per-step files to open.

        Returns:
            The rows in file (step) order; empty with the columns when nothing matches.
            An unreadable file is skipped with a warning.
        """
        columns = list(columns or METRIC_COLUMNS)
        unknown = sorted(set(where) - set(METRIC_COLUMNS))
        if unknown:
            raise WorkbenchError(f"unknown metric columns {unknown}; expected some of {METRIC_COLUMNS}")
        where = {column: list(values) for column, values in where.items() if values is not None}
        sources = self._metric_sources(source, where.get("step"))
        return _read_files(list(sources), columns, where, sources)

    def has_probes(self) -> bool:
        """Whether the trainer wrote built-in probes (without reading them)."""
        return bool(self.metric_files("probe"))

    @property
    def num_layers(self) -> int | None:
        """L, the model's decoder blocks, as the trainer recorded it (None for older runs)."""
        value = self.info.get("num_layers")
        return int(value) if value is not None else None

    @property
    def oisd_layers(self) -> list[int]:
        """The resolved OISD layers S the trainer recorded ([] when OISD is off)."""
        return [int(x) for x in self.info.get("oisd_layers") or []]

    def samples(self) -> pd.DataFrame:
        """Sampled probe completions (SAMPLE_COLUMNS); empty when there are none."""
        path = self.paths.samples
        if path.is_file():
            try:
                return pd.read_parquet(path)
            except Exception as exc:
                _warn(f"{path} is unreadable: {exc}")
        return pd.DataFrame(columns=SAMPLE_COLUMNS)

    def probe_set(self) -> list[dict]:
        """The probe prompts and reference completions (``[]`` when not written yet)."""
        path = self.paths.probe_set
        if not path.is_file():
            return []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line.strip()]
        except (OSError, ValueError) as exc:
            _warn(f"{path} is unreadable: {exc}")
            return []

    def checkpoints(self, *, full: bool = False) -> list[Checkpoint]:
        """Complete checkpoints; by default checked by presence and size only (cheap)."""
        from workbench.storage.checkpoints import list_checkpoints

        return list_checkpoints(self.path, verify=True, full=full)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the run's checkpoints, sorted: its complete ``checkpoints/step-*`` folders
        (sizes checked), or, for an analysis folder, the checkpoints its run.json lists."""
        if self.is_analysis_folder:
            listed = self.info["external"].get("checkpoints") or []
            return sorted(int(c["step"]) for c in listed if isinstance(c, dict) and "step" in c)
        return [c.step for c in self.checkpoints()]

    def last_step(self, history: pd.DataFrame | None = None, checkpoint_steps: list[int] | None = None) -> int:
        """The last training step the run reached: its last logged step, or, for an analysis
        folder (no metrics), its last checkpoint's step; 0 when there is neither.

        Args:
            history: :meth:`metrics`, when the caller has it already.
            checkpoint_steps: :meth:`checkpoint_steps`, when the caller has them already.
        """
        history = self.metrics() if history is None else history
        if len(history):
            return int(history["step"].max())
        if self.is_analysis_folder:
            steps = self.checkpoint_steps() if checkpoint_steps is None else checkpoint_steps
            return max(steps) if steps else 0
        return 0

    def analysis_path(self, step: int, kind: str) -> Path:
        """``analysis/step-NNNNNN-{kind}.parquet`` (kind: metrics, topk, cells, attn, ...)."""
        return self.paths.analysis_file(step, kind)

    def metric_catalog(self, source: str) -> pd.DataFrame:
        """What one metric source holds, without its values: the distinct ``(metric,
        split)`` pairs over every step (columns ``metric, split``), from the files' footers
        (:func:`workbench.storage.runwriter.write_metric_table` lists them there); a file written
        before that has its two columns read."""
        pairs, unlisted = set(), []
        for path in self.metric_files(source):
            try:
                listed = read_provenance(path).get(METRIC_CATALOG_KEY)
            except Exception as exc:
                _warn(f"{path} is unreadable: {exc}")
                continue
            if listed is None:  # written before the footer listed it: read the two columns
                unlisted.append(path)
            else:
                pairs.update((str(m), str(s)) for m, s in listed)
        for path in unlisted:
            try:
                rows = pd.read_parquet(path, columns=["metric", "split"]).drop_duplicates()
            except Exception as exc:
                _warn(f"{path} is unreadable: {exc}")
                continue
            pairs.update(zip(rows["metric"].astype(str), rows["split"].astype(str)))
        return pd.DataFrame(sorted(pairs), columns=["metric", "split"])

    def metric_steps(self, source: str) -> list[int]:
        """Steps with metric rows of ``source``: from the per-step file names and the
        segments' footers (and a legacy ``probes.parquet``'s step column), without reading
        any rows of the parts."""
        if source not in ("probe", "analyzer"):
            raise WorkbenchError(f"unknown metric source {source!r}; expected 'probe' or 'analyzer'")
        steps: set[int] = set()
        if source == "probe" and self.paths.probes.is_file():
            try:
                steps = {int(s) for s in pd.read_parquet(self.paths.probes, columns=["step"])["step"].unique()}
            except Exception as exc:
                _warn(f"{self.paths.probes} is unreadable: {exc}")
        if source == "probe":
            segments, parts = self.paths.probe_segment_files(), self.paths.probe_part_files()
        else:
            segments, parts = self.paths.analysis_files("metrics")
        for _, _, path in segments:
            try:
                steps.update(int(s) for s in read_provenance(path).get("steps", []))
            except Exception as exc:
                _warn(f"{path} is unreadable: {exc}")
        return sorted(steps | {step for step, _ in parts})

    def analysis(self, kind: str) -> pd.DataFrame:
        """All analyzer tables of one kind, concatenated over checkpoints (segments first, then
        the per-checkpoint files, each in step order)."""
        if kind == "metrics":
            return self.metric_rows("analyzer")
        sources = self._analysis_sources(kind)
        return _read_files(list(sources), ANALYSIS_COLUMNS.get(kind), {}, sources)

    def analysis_provenance(self, kind: str) -> dict[int, dict]:
        """``{step: provenance}`` of every analysed checkpoint of ``kind``, by step, from the
        files' footers (each file opened once: a segment lists its steps' provenance; a newer
        per-checkpoint file's is the step's; an unreadable file is left out with a warning)."""
        segments, parts = self.paths.analysis_files(kind)
        out = {}
        for _, _, path in segments:
            try:
                out.update((int(step), info) for step, info in read_provenance(path)["provenance"].items())
            except Exception as exc:  # noqa: BLE001 - a corrupt segment must not hide the other files
                _warn(f"{path} is unreadable: {exc}")
        for step, path in parts:
            try:
                out[step] = read_provenance(path)
            except Exception as exc:
                _warn(f"{path} is unreadable: {exc}")
        return dict(sorted(out.items()))

    def analyzed_steps(self, kind: str, probe_set_hash: str | None = None) -> set[int]:
        """Steps with an analysis file of ``kind`` (made with this probe set hash, if given)."""
        steps = set()
        for step, provenance in self.analysis_provenance(kind).items():
            if probe_set_hash is None or provenance.get("probe_set_hash") == probe_set_hash:
                steps.add(step)
        return steps


@dataclass
class BrokenRun:
    """A folder with a run.json that could not be opened, listed by :func:`list_runs`.

    Attributes:
        path: The folder.
        error: The one-line reason (to show in the dashboard in the run's place).
    """

    path: Path
    error: str

    @property
    def name(self) -> str:
        return self.path.name


def list_runs(root: str | os.PathLike) -> list[Run | BrokenRun]:
    """Every run under ``root``: ``root`` itself if it is a run, then its immediate
    subfolders holding a run.json, sorted by name.

    Folders without run.json (and hidden ones) are not runs and are left out. A
    folder whose run.json cannot be read comes back as a :class:`BrokenRun`, so
    one bad folder never hides the others: check ``isinstance(r, BrokenRun)``.

    Raises:
        WorkbenchError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise WorkbenchError(f"runs root {root} is not a folder")
    candidates = [root] + sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    )
    runs: list[Run | BrokenRun] = []
    for folder in candidates:
        if not is_run_folder(folder):
            continue
        try:
            runs.append(Run.open(folder))
        except WorkbenchError as exc:
            runs.append(BrokenRun(folder, str(exc)))
    return runs


# ---------------------------------------------------------------------------
# One summary row per run (the notebook API's runs() and the dashboard's Runs table)
# ---------------------------------------------------------------------------


def last_value(frame: pd.DataFrame, column: str, default: float | None = None) -> float | None:
    """The last non-missing number of ``column`` in ``frame`` (e.g. a run's last evaluation
    accuracy in its metrics history); ``default`` when the column is absent or empty."""
    if column not in frame.columns:
        return default
    values = pd.to_numeric(frame[column], errors="coerce").dropna()
    return float(values.iloc[-1]) if len(values) else default


def run_summary(
    run: Run, *, history: pd.DataFrame | None = None, checkpoint_steps: list[int] | None = None
) -> dict:
    """The facts of one run that a runs table shows, in one place.

    Args:
        run: the run.
        history: its :meth:`Run.metrics`, when the caller has it (e.g. cached); read otherwise.
        checkpoint_steps: its :meth:`Run.checkpoint_steps`, likewise.

    Returns:
        ``name, path, method, status, live, steps`` (the last step the run reached:
        :meth:`Run.last_step`), ``last_logged_step`` (None when nothing is logged),
        ``checkpoints`` (how many: complete ``step-*`` folders, or those an analysis
        folder lists), ``last_accuracy``, ``last_eval_accuracy``, ``last_reward``,
        ``seed``, ``start_time``, ``torch``, ``transformers``, ``transformer_lens``.
    """
    history = run.metrics() if history is None else history
    checkpoint_steps = run.checkpoint_steps() if checkpoint_steps is None else checkpoint_steps
    versions = run.info.get("versions") if isinstance(run.info.get("versions"), dict) else {}
    return {
        "name": run.name,
        "path": str(run.path),
        "method": run.method,
        "status": run.status,
        "live": run.is_live,
        "steps": run.last_step(history, checkpoint_steps),
        "last_logged_step": int(history["step"].max()) if len(history) else None,
        "checkpoints": len(checkpoint_steps),
        "last_accuracy": last_value(history, "accuracy"),
        "last_eval_accuracy": last_value(history, "eval/accuracy"),
        "last_reward": last_value(history, "reward"),
        "seed": run.info.get("seed"),
        "start_time": run.info.get("start_time"),
        "torch": versions.get("torch"),
        "transformers": versions.get("transformers"),
        "transformer_lens": versions.get("transformer_lens"),
    }
