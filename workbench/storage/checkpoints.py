"""Checkpoints and their manifests: ``checkpoints/step-NNNNNN/`` of a run folder.

A checkpoint is assembled in ``checkpoints/.tmp-*``, gets its manifest (sha256 and
size of every file, :attr:`RunPaths.MANIFEST <workbench.storage.paths.RunPaths.MANIFEST>`)
last, and only then is renamed to ``step-NNNNNN``: a reader never sees half a
checkpoint, and a killed run resumes from the last complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from workbench.errors import CheckpointError, ConfigError, warn
from workbench.storage.atomic import atomic_write_json, fsync_dir
from workbench.storage.paths import RunPaths

__all__ = [
    "MANIFEST_FORMAT", "MANIFEST_NAME", "MANIFEST_VERSION", "Checkpoint", "latest_checkpoint",
    "list_checkpoints", "read_manifest", "verify_checkpoint", "write_checkpoint",
]

MANIFEST_NAME = RunPaths.MANIFEST
MANIFEST_FORMAT = "workbench-checkpoint"
MANIFEST_VERSION = 1


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


def read_manifest(folder: str | os.PathLike) -> dict:
    """The parsed manifest of a checkpoint folder.

    Raises:
        CheckpointError: it is missing or corrupt (one line).
    """
    folder = Path(folder)
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


def has_manifest(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a checkpoint manifest (a checkpoint this project wrote)."""
    return (Path(folder) / MANIFEST_NAME).is_file()


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
    manifest = read_manifest(folder)
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
        """The parsed manifest (read on first access)."""
        return read_manifest(self.path)

    def verify(self, *, full: bool = True) -> None:
        """See :func:`verify_checkpoint`."""
        verify_checkpoint(self.path, full=full)


def _step_folders(run_dir: str | os.PathLike) -> list[Checkpoint]:
    """Every ``step-*`` folder, unverified, sorted by step (temp folders ignored)."""
    folder = RunPaths(Path(run_dir)).checkpoints
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        step = RunPaths.checkpoint_step(child.name)
        if step is not None and child.is_dir():
            found.append(Checkpoint(path=child, step=step))
    return sorted(found, key=lambda c: c.step)


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


def _warn(message: str) -> None:
    warn(message, stacklevel=4, logger=__name__)


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
    aside = folder.with_name(f"{RunPaths.TMP_PREFIX}old-{folder.name}-{os.urandom(4).hex()}")
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
    paths = RunPaths(Path(run_dir))
    parent = paths.checkpoints
    parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a write or a prune that was killed half way.
    for stale in parent.glob(f"{RunPaths.TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)

    final = paths.checkpoint(step)
    name = final.name
    tmp = Path(tempfile.mkdtemp(prefix=f"{RunPaths.TMP_PREFIX}{name}-", dir=parent))
    try:
        save_fn(tmp)
        manifest = _build_manifest(tmp, step)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        fsync_dir(tmp)
        if final.exists():
            aside = parent / f"{RunPaths.TMP_PREFIX}old-{name}-{os.urandom(4).hex()}"
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
    fsync_dir(parent)

    if keep_last is not None:
        complete = list_checkpoints(run_dir, verify=True, full=False, warn=False)
        keep = {c.path for c in complete[-keep_last:]} | {final}
        for ckpt in complete:
            if ckpt.path not in keep:
                _remove_tree(ckpt.path)
        fsync_dir(parent)
    return final
