"""The run store: reading and writing run folders (the contract in docs/design.md).

A run folder::

    runs/<run_name>/
      run.json                 config, versions, seed, start time, host, pid, status
      metrics.jsonl            one JSON object per training step ("step", "time", ...)
      probe_set.jsonl          the fixed probe prompts and reference completions
      probes.parquet           built-in probes, METRIC_COLUMNS (schema.py)
      checkpoints/step-000050/ HF files + tokenizer + trainer_state + manifest.json
      analysis/step-000050-<kind>.parquet   analyzer output with provenance metadata

Every file is written atomically (temporary name in the same folder, fsync,
``os.replace``), except ``metrics.jsonl``, which is appended one fsynced line at a
time so a kill loses at most the line being written. A checkpoint is assembled in
``checkpoints/.tmp-*``, gets its ``manifest.json`` (sha256 and size of every file)
last, and only then is renamed to ``step-NNNNNN``: a reader never sees half a
checkpoint, and a killed run resumes from the last complete one.

Readers (:class:`Run`, :func:`list_runs`) are cheap and never crash on a partial
folder: missing tables come back empty with their contract columns, a torn last
metrics line is dropped, and a run folder that cannot be opened is listed as a
:class:`BrokenRun` carrying the one-line reason.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workbench.errors import CheckpointError, ConfigError, DataError, WorkbenchError
from workbench.schema import ATTN_COLUMNS, CELL_COLUMNS, METRIC_COLUMNS, SAMPLE_COLUMNS, TOPK_COLUMNS

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "workbench-checkpoint"
MANIFEST_VERSION = 1
PROVENANCE_KEY = b"workbench.provenance"
LIVE_SECONDS = 120.0  # a "training" run whose metrics moved this recently is live
STATUSES = ("training", "finished", "failed")
# Columns of an empty analysis table, by kind (other kinds come back with no columns).
ANALYSIS_COLUMNS = {
    "metrics": METRIC_COLUMNS,
    "topk": TOPK_COLUMNS,
    "cells": CELL_COLUMNS,
    "attn": ATTN_COLUMNS,
}



@dataclass(frozen=True)
class RunPaths:
    """Every path of a run folder: the one place their names are written.

    ``run.json``, ``metrics.jsonl``, ``probe_set.jsonl``, ``probes.parquet``,
    ``probe_samples.parquet`` (the sampled completions of the outcome-conditioned
    probes), ``checkpoints/step-NNNNNN/``, ``analysis/``, ``events/``.
    """

    root: Path

    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def probe_set(self) -> Path:
        return self.root / "probe_set.jsonl"

    @property
    def probes(self) -> Path:
        return self.root / "probes.parquet"

    @property
    def samples(self) -> Path:
        return self.root / "probe_samples.parquet"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def events(self) -> Path:
        return self.root / "events"


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``run.json``."""
    return RunPaths(Path(path)).run_json.is_file()

_STEP_DIR = re.compile(r"^step-(\d+)$")
_KIND = re.compile(r"^[a-z0-9_]+$")
_TMP_PREFIX = ".tmp-"


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a temp file beside it, then rename.

    The temp file lives in the same folder (a rename across file systems is not
    atomic) and starts with a dot, so globbing readers never pick it up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run folders are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    """Serialise numpy / torch scalars and arrays, and paths, as plain JSON."""
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_write_parquet(
    path: str | os.PathLike, df: pd.DataFrame, *, metadata: dict | None = None
) -> None:
    """Write ``df`` (without its index) to a parquet file atomically.

    Args:
        path: Destination file.
        df: The table.
        metadata: Optional provenance (JSON-serialisable dict), stored in the parquet
            schema metadata and read back by :func:`read_provenance`.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata is not None:
        merged = dict(table.schema.metadata or {})
        merged[PROVENANCE_KEY] = json.dumps(metadata, default=_json_default).encode("utf-8")
        table = table.replace_schema_metadata(merged)
    _atomic_write(path, lambda f: pq.write_table(table, f))


def read_provenance(path: str | os.PathLike) -> dict:
    """Provenance stored by :func:`atomic_write_parquet` (``{}`` when there is none).

    Reads only the parquet footer, so it is cheap on large tables.
    """
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def probe_set_hash(records: Iterable[dict]) -> str:
    """sha256 (hex) of the canonical JSON of the probe set (sorted keys, no spaces)."""
    canonical = json.dumps(
        list(records), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        default=_json_default,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """Resolve a user-supplied run name inside ``root``, refusing to leave it.

    Raises:
        WorkbenchError: ``name`` is empty, absolute, contains ``..``, or resolves
            (through a symlink) outside ``root``.
    """
    root_resolved = Path(root).resolve()
    if not name or name.strip() == "":
        raise WorkbenchError("empty run name")
    candidate = Path(name)
    if candidate.is_absolute() or name.startswith(("/", "\\")):
        raise WorkbenchError(f"run name {name!r} must be relative to {root}")
    if ".." in candidate.parts or ".." in name.replace("\\", "/").split("/"):
        raise WorkbenchError(f"run name {name!r} must not contain '..'")
    resolved = (root_resolved / candidate).resolve()
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise WorkbenchError(f"run name {name!r} points outside {root}")
    return resolved


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_manifest(folder: Path, step: int) -> dict:
    """sha256 and size of every file under ``folder`` (relative POSIX paths, sorted).

    Each file is fsynced while it is read, so the data the manifest describes is on
    disk before the folder is renamed into place.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            os.fsync(f.fileno())
        files[rel] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "files": files}


def _read_manifest(folder: Path) -> dict:
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: missing {MANIFEST_NAME}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder} has a corrupt {MANIFEST_NAME}: {exc}") from None
    return manifest


def verify_checkpoint(path: str | os.PathLike, *, full: bool = True) -> None:
    """Check a checkpoint folder against its manifest.

    Args:
        path: The ``step-NNNNNN`` folder.
        full: Also compare sha256 digests (reads every byte). ``False`` checks only
            that every file is present with the recorded size (fast).

    Raises:
        CheckpointError: One line naming the folder and the first problem found:
            missing folder or manifest, a missing file, a size or sha256 mismatch.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    manifest = _read_manifest(folder)
    for rel, entry in manifest["files"].items():
        file = folder / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing file {rel}")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(
                f"checkpoint {folder}: size mismatch for {rel} "
                f"({size} bytes, manifest says {entry['size']})"
            )
    if full:
        for rel, entry in manifest["files"].items():
            if _sha256_file(folder / rel) != entry["sha256"]:
                raise CheckpointError(f"checkpoint {folder}: sha256 mismatch for {rel}")


@dataclass
class Checkpoint:
    """A complete checkpoint folder ``checkpoints/step-NNNNNN``.

    Attributes:
        path: The folder (loadable with ``from_pretrained`` and TransformerLens).
        step: The training step it was written after.
    """

    path: Path
    step: int

    @cached_property
    def manifest(self) -> dict:
        """The parsed ``manifest.json`` (read on first access)."""
        return _read_manifest(self.path)

    def verify(self, *, full: bool = True) -> None:
        """See :func:`verify_checkpoint`."""
        verify_checkpoint(self.path, full=full)


def _checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return RunPaths(Path(run_dir)).checkpoints


def _step_folders(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """Every ``step-*`` folder, unverified, sorted by step (temp folders ignored)."""
    folder = _checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append(Checkpoint(path=child, step=int(match.group(1))))
    return sorted(found, key=lambda c: c.step)


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
    logger.warning(message)


def list_checkpoints(
    run_dir: str | os.PathLike, *, verify: bool = True, full: bool = True, warn: bool = True
) -> list[Checkpoint]:
    """Complete checkpoints of a run, sorted by step.

    Args:
        run_dir: The run folder (holding ``checkpoints/``).
        verify: Check each against its manifest and skip those that fail.
        full: With ``verify``, compare sha256 digests too (slow on large models);
            ``False`` checks presence and sizes only.
        warn: Emit a warning naming each skipped checkpoint.

    Returns:
        The checkpoints; ``[]`` when the run has none (or no ``checkpoints/``).
    """
    result = []
    for ckpt in _step_folders(run_dir):
        if verify:
            try:
                verify_checkpoint(ckpt.path, full=full)
            except CheckpointError as exc:
                if warn:
                    _warn(f"skipping {exc}")
                continue
        result.append(ckpt)
    return result


def latest_checkpoint(run_dir: str | os.PathLike, *, full: bool = True) -> Checkpoint | None:
    """The newest checkpoint that passes verification (warning about newer bad ones).

    Verifies from the newest backwards, so only as many folders are hashed as needed.
    """
    for ckpt in reversed(_step_folders(run_dir)):
        try:
            verify_checkpoint(ckpt.path, full=full)
        except CheckpointError as exc:
            _warn(f"skipping {exc}")
            continue
        return ckpt
    return None


def _remove_tree(folder: Path) -> None:
    """Delete a folder by first renaming it to a ``.tmp-`` name.

    A crash in the middle of ``rmtree`` then leaves a temp folder that readers ignore
    and the next write removes, never a half-deleted ``step-*``.
    """
    aside = folder.with_name(f"{_TMP_PREFIX}old-{folder.name}-{os.urandom(4).hex()}")
    os.rename(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)


def write_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    save_fn: Callable[[Path], None],
    *,
    keep_last: int | None,
) -> Path:
    """Write a checkpoint atomically and prune old ones.

    ``save_fn(tmpdir)`` writes the HF files, the tokenizer and the trainer state into
    a fresh ``checkpoints/.tmp-step-NNNNNN-<random>/``; the manifest is written last,
    then the folder is renamed to ``checkpoints/step-NNNNNN``. An existing folder of
    that name is renamed aside before the new one takes its place, then deleted.

    Args:
        run_dir: The run folder.
        step: Training step (folder name ``step-`` + 6 digits).
        save_fn: Writes the checkpoint's files into the folder it is given.
        keep_last: Keep this many newest complete checkpoints (the one just written
            is always kept); ``None`` keeps all.

    Returns:
        The path of the new ``step-NNNNNN`` folder.

    Raises:
        ConfigError: ``keep_last`` is below 1 or ``step`` is negative.
    """
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be >= 1 or None, got {keep_last}")
    if step < 0:
        raise ConfigError(f"checkpoint step must be >= 0, got {step}")
    parent = _checkpoint_dir(run_dir)
    parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a write or a prune that was killed half way.
    for stale in parent.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=parent))
    try:
        save_fn(tmp)
        manifest = _build_manifest(tmp, step)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        _fsync_dir(tmp)
        final = parent / name
        if final.exists():
            aside = parent / f"{_TMP_PREFIX}old-{name}-{os.urandom(4).hex()}"
            os.rename(final, aside)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(aside, final)  # put the old checkpoint back
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)

    if keep_last is not None:
        complete = list_checkpoints(run_dir, verify=True, full=False, warn=False)
        keep = {c.path for c in complete[-keep_last:]} | {final}
        for ckpt in complete:
            if ckpt.path not in keep:
                _remove_tree(ckpt.path)
        _fsync_dir(parent)
    return final


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``config.json`` and model weights (safetensors or .bin,
    single-file, sharded with an index, or any ``*.safetensors`` / ``*.bin``)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return False
    return (any((folder / w).is_file() for w in _WEIGHT_FILES) or any(folder.glob("*.safetensors"))
            or any(folder.glob("*.bin")))


def require_model_folder(path: str | os.PathLike) -> Path:
    """Return ``path`` if it is a model folder, else raise a one-line CheckpointError."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"model folder '{folder}' does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a model folder (not a folder)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder (no config.json)")
    if not is_model_folder(folder):
        raise CheckpointError(
            f"{folder} is not a model folder (no *.safetensors or pytorch_model.bin weights)"
        )
    return folder


# ---------------------------------------------------------------------------
# Writing a run
# ---------------------------------------------------------------------------


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


def _read_metrics_lines(path: Path) -> tuple[list[dict], int]:
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

    Raises:
        WorkbenchError: ``run_dir`` already holds a run and ``resume`` is False, or its
            run.json is unreadable.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict,
        *,
        resume: bool,
        resume_step: int | None = None,
    ):
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
                f"{self.run_dir} already holds a run (run.json); "
                "resume it or choose another run_dir"
            )
        if self.run_json.exists():
            self.info = _load_run_json(self.run_dir)
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
            records, bad = _read_metrics_lines(self.metrics_path)
            kept = [r for r in records if r["step"] <= step]
            if bad or len(kept) != len(records):
                atomic_write_text(
                    self.metrics_path,
                    "".join(json.dumps(r, default=_json_default) + "\n" for r in kept),
                )
        for path in (self.probes_path, self.samples_path):
            if path.exists():
                table = pd.read_parquet(path)
                if (table["step"] > step).any():
                    atomic_write_parquet(path, table[table["step"] <= step])

    def log_metrics(self, step: int, values: dict) -> None:
        """Append one line ``{"step", "time", **values}`` to metrics.jsonl, fsynced.

        Args:
            step: Training step.
            values: Metric name -> number (names in docs/objectives.md); numpy/torch scalars are fine.
        """
        clash = {"step", "time"} & values.keys()
        if clash:
            raise ValueError(f"metric names {sorted(clash)} are reserved")
        line = json.dumps({"step": int(step), "time": time.time(), **values}, default=_json_default)
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
        lines = (json.dumps(r, ensure_ascii=False, default=_json_default) for r in records)
        atomic_write_text(self.probe_set_path, "".join(line + "\n" for line in lines))
        self.info["probe_set_hash"] = digest
        atomic_write_json(self.run_json, self.info)
        return digest

    def log_probes(self, df: pd.DataFrame) -> None:
        """Append probe rows (METRIC_COLUMNS) to probes.parquet.

        Read-modify-write with an atomic replace: the table stays small (steps x
        layers x metrics), and one file is what every reader expects.
        """
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"probe rows lack columns {missing}")
        new = df[METRIC_COLUMNS]
        if self.probes_path.exists():
            new = pd.concat([pd.read_parquet(self.probes_path), new], ignore_index=True)
        atomic_write_parquet(self.probes_path, new)

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


# ---------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------


def _load_run_json(folder: Path) -> dict:
    path = RunPaths(folder).run_json
    if not path.is_file():
        raise WorkbenchError(f"{folder} is not a run folder (no run.json)")
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
        return cls(folder, _load_run_json(folder))

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

    def metrics(self) -> pd.DataFrame:
        """Training metrics, one row per step (sorted; a re-logged step keeps its last line)."""
        records, _ = _read_metrics_lines(self.paths.metrics)
        if not records:
            return pd.DataFrame(columns=["step", "time"])
        df = pd.DataFrame.from_records(records)
        return df.drop_duplicates("step", keep="last").sort_values("step", ignore_index=True)

    def probes(self) -> pd.DataFrame:
        """The trainer's built-in probes (METRIC_COLUMNS); empty when there are none yet."""
        path = self.paths.probes
        if path.is_file():
            try:
                return pd.read_parquet(path)
            except Exception as exc:  # a corrupt file must not take the dashboard down
                _warn(f"{path} is unreadable: {exc}")
        return pd.DataFrame(columns=METRIC_COLUMNS)

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
        return list_checkpoints(self.path, verify=True, full=full)

    def analysis_path(self, step: int, kind: str) -> Path:
        """``analysis/step-NNNNNN-{kind}.parquet`` (kind: metrics, topk, cells, attn, ...)."""
        if not _KIND.match(kind):
            raise WorkbenchError(f"analysis kind {kind!r} must be lowercase letters, digits or _")
        return self.paths.analysis / f"step-{step:06d}-{kind}.parquet"

    def _analysis_files(self, kind: str) -> list[tuple[int, Path]]:
        if not _KIND.match(kind):
            raise WorkbenchError(f"analysis kind {kind!r} must be lowercase letters, digits or _")
        folder = self.paths.analysis
        if not folder.is_dir():
            return []
        pattern = re.compile(rf"^step-(\d+)-{kind}\.parquet$")
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := pattern.match(p.name))]
        return sorted(found)

    def analysis(self, kind: str) -> pd.DataFrame:
        """All analyzer tables of one kind, concatenated over checkpoints (sorted by step)."""
        frames = []
        for _, path in self._analysis_files(kind):
            try:
                frames.append(pd.read_parquet(path))
            except Exception as exc:
                _warn(f"{path} is unreadable: {exc}")
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=ANALYSIS_COLUMNS.get(kind, []))
        return pd.concat(frames, ignore_index=True)

    def analyzed_steps(self, kind: str, probe_set_hash: str | None = None) -> set[int]:
        """Steps with an analysis file of ``kind`` (made with this probe set hash, if given)."""
        steps = set()
        for step, path in self._analysis_files(kind):
            try:
                provenance = read_provenance(path)
            except Exception as exc:
                _warn(f"{path} is unreadable: {exc}")
                continue
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
