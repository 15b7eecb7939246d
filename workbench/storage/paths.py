"""Where things are in a run folder: :class:`RunPaths`, the one place file names are
written, and the small facts every reader and writer shares (a run folder is one with a
``run.json``; the probe set's hash; a user-supplied run name resolved safely).

Nothing here reads a table or runs a model; :mod:`workbench.storage.runstore` reads a run,
:mod:`workbench.storage.runwriter` writes one, :mod:`workbench.storage.checkpoints` owns the
checkpoints and their manifests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable

from workbench.errors import WorkbenchError
from workbench.storage.atomic import json_default

__all__ = ["SEGMENT_KINDS", "SEGMENT_STEPS", "WARMSTART_DIR", "RunPaths", "is_run_folder", "probe_set_hash", "run_label", "run_name", "safe_join",
           "warmstart_folder"]

_KIND = re.compile(r"^[a-z0-9_]+$")
#: Steps per segment file: the built-in probes' parts and the analysis files of
#: :data:`SEGMENT_KINDS` are merged this many steps to a file, so a reader opens about
#: steps / SEGMENT_STEPS files, not one per step (at 36 x 32 and 200 steps, opening 200
#: files cost ~0.25-0.4 s per run on a 2-core machine), and a write stays bounded.
SEGMENT_STEPS = 32
#: The analysis kinds read over every checkpoint (the alignment heat maps, drift,
#: `oisd compare`), merged into segments once SEGMENT_STEPS have gathered. The
#: drill-down's kinds (topk, cells, attn) are read one checkpoint at a time and stay
#: one file per checkpoint.
SEGMENT_KINDS = ("metrics", "drift", "lens", "patch")


@dataclass(frozen=True)
class RunPaths:
    """Every path of a run folder: the one place their names are written.

    ``run.json``, ``metrics.jsonl``, ``probe_set.jsonl``, ``probes/step-NNNNNN.parquet``
    and ``probes/steps-AAAAAA-BBBBBB.parquet`` (``probes.parquet`` in older runs),
    ``probe_samples.parquet`` (the sampled completions of the outcome-conditioned
    probes), ``checkpoints/step-NNNNNN/`` (each with its ``manifest.json``),
    ``analysis/`` (``step-NNNNNN-{kind}.parquet``, and for :data:`SEGMENT_KINDS`
    ``steps-AAAAAA-BBBBBB-{kind}.parquet``, several checkpoints' files merged), ``events/``; and ``warmstart.json``, the figures a warm-start model
    folder carries (:attr:`warmstart`, with ``root`` = that folder).
    """

    root: Path

    RUN_JSON: ClassVar[str] = "run.json"
    MANIFEST: ClassVar[str] = "manifest.json"  # inside each checkpoint folder
    WARMSTART_JSON: ClassVar[str] = "warmstart.json"  # inside a warm-start model folder
    TMP_PREFIX: ClassVar[str] = ".tmp-"  # in-progress writes under checkpoints/; readers ignore them
    _STEP_DIR: ClassVar[re.Pattern] = re.compile(r"^step-(\d+)$")
    _STEP_PART: ClassVar[re.Pattern] = re.compile(r"^step-(\d+)\.parquet$")
    _SEGMENT: ClassVar[re.Pattern] = re.compile(r"^steps-(\d+)-(\d+)\.parquet$")

    @property
    def run_json(self) -> Path:
        return self.root / self.RUN_JSON

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def probe_set(self) -> Path:
        return self.root / "probe_set.jsonl"

    @property
    def probes(self) -> Path:
        """The built-in probes of runs written before the per-step parts (read, never written)."""
        return self.root / "probes.parquet"

    @property
    def probe_parts(self) -> Path:
        """``probes/``: the built-in probes, one ``step-NNNNNN.parquet`` per probed step, so a
        probe step writes only its own rows (a single table rewritten at every step grew
        with the run)."""
        return self.root / "probes"

    def probe_part(self, step: int) -> Path:
        return self.probe_parts / f"step-{step:06d}.parquet"

    def probe_segment(self, first: int, last: int) -> Path:
        return self.probe_parts / f"steps-{first:06d}-{last:06d}.parquet"

    def probe_segment_files(self) -> list[tuple[int, int, Path]]:
        """``(first, last, file)`` of every segment (``probes/steps-AAAAAA-BBBBBB.parquet``:
        the parts of steps ``first..last`` merged into one file), by first step."""
        if not self.probe_parts.is_dir():
            return []
        found = [(int(m.group(1)), int(m.group(2)), p) for p in self.probe_parts.iterdir()
                 if (m := self._SEGMENT.match(p.name))]
        return sorted(found)

    def probe_part_files(self, covered: bool = False) -> list[tuple[int, Path]]:
        """``(step, file)`` of every per-step probe table not merged into a segment, by step.
        A part whose step a segment covers is a leftover of a merge cut short (the segment
        holds its rows): ``covered=True`` lists those instead."""
        if not self.probe_parts.is_dir():
            return []
        segments = [(a, b) for a, b, _ in self.probe_segment_files()]
        found = [(int(m.group(1)), p) for p in self.probe_parts.iterdir()
                 if (m := self._STEP_PART.match(p.name))]
        return sorted((step, p) for step, p in found if any(a <= step <= b for a, b in segments) == covered)

    @property
    def samples(self) -> Path:
        return self.root / "probe_samples.parquet"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @classmethod
    def checkpoint_step(cls, name: str) -> int | None:
        """The step of a checkpoint folder name ``step-NNNNNN`` (None for any other name)."""
        match = cls._STEP_DIR.match(name)
        return int(match.group(1)) if match else None

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    def analysis_file(self, step: int, kind: str) -> Path:
        """``analysis/step-NNNNNN-{kind}.parquet`` (kind: lowercase letters, digits or _)."""
        _check_kind(kind)
        return self.analysis / f"step-{step:06d}-{kind}.parquet"

    @staticmethod
    def analysis_pattern(kind: str) -> re.Pattern:
        """Matches the analysis file names of ``kind``; group 1 is the step."""
        _check_kind(kind)
        return re.compile(rf"^step-(\d+)-{kind}\.parquet$")

    def analysis_segment(self, first: int, last: int, kind: str) -> Path:
        """``analysis/steps-AAAAAA-BBBBBB-{kind}.parquet``: the files of ``kind`` of the
        checkpoints ``first..last`` merged into one (:data:`SEGMENT_KINDS`)."""
        _check_kind(kind)
        return self.analysis / f"steps-{first:06d}-{last:06d}-{kind}.parquet"

    def analysis_files(self, kind: str) -> tuple[list[tuple[int, int, Path]], list[tuple[int, Path]]]:
        """What ``analysis/`` holds of ``kind``, from one listing of the folder: its segments
        ``(first, last, file)`` by first step, and its per-checkpoint files ``(step, file)``
        by step. A per-checkpoint file inside a segment's range is newer than the segment
        (a checkpoint analysed again, or a merge cut short): its rows are the step's."""
        _check_kind(kind)
        if not self.analysis.is_dir():
            return [], []
        part = self.analysis_pattern(kind)
        segment = re.compile(rf"^steps-(\d+)-(\d+)-{kind}\.parquet$")
        segments, parts = [], []
        for p in self.analysis.iterdir():
            if m := part.match(p.name):
                parts.append((int(m.group(1)), p))
            elif m := segment.match(p.name):
                segments.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(segments), sorted(parts)

    @property
    def events(self) -> Path:
        return self.root / "events"

    @property
    def warmstart(self) -> Path:
        """``warmstart.json`` of a warm-start model folder (``root`` = the model folder)."""
        return self.root / self.WARMSTART_JSON


def _check_kind(kind: str) -> None:
    if not _KIND.match(kind):
        raise WorkbenchError(f"analysis kind {kind!r} must be lowercase letters, digits or _")


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``run.json``."""
    return RunPaths(Path(path)).run_json.is_file()


def probe_set_hash(records: Iterable[dict]) -> str:
    """sha256 (hex) of the canonical JSON of the probe set (sorted keys, no spaces)."""
    canonical = json.dumps(
        list(records), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        default=json_default,
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


#: Where the tiny preset's warm start is made and read by default (``oisd warmstart``, the
#: bundled configs' ``model.path``, the demo, the notebooks).
WARMSTART_DIR = "runs/warmstart-tiny"
_SEED_SUFFIX = re.compile(r"(-ws\d+)?-seed(\d+)$")


def run_name(label: str, seed: int, start: int | None = None) -> str:
    """The folder name of one seed of a method or variant: ``<label>-seed<seed>``, or
    ``<label>-ws<start>-seed<seed>`` for one of several warm starts (its seed)."""
    return f"{label}-seed{int(seed)}" if start is None else f"{label}-ws{int(start)}-seed{int(seed)}"


def warmstart_folder(base: str | os.PathLike, seed: int | None = None) -> Path:
    """The folder of a warm start: ``base`` itself, or ``<base>-ws<seed>`` for one of several
    warm starts made with different seeds (their runs: :func:`run_name` with ``start=seed``)."""
    return Path(base) if seed is None else Path(f"{os.fspath(base)}-ws{int(seed)}")


def run_label(name: str) -> str:
    """What :func:`run_name` was given as ``label``: the name without its ``-ws<s>-seed<k>``."""
    return _SEED_SUFFIX.sub("", name)
