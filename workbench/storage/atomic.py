"""Atomic writes: a reader sees the old file or the new one, never half of one.

Every file of a run folder is written through here (temporary dot-file in the same
folder, fsync, ``os.replace``, fsync of the folder), except ``metrics.jsonl``, which is
appended one fsynced line at a time (:class:`workbench.storage.runwriter.RunWriter`), and
checkpoints, which are whole folders renamed into place (:mod:`workbench.storage.checkpoints`).
Parquet tables can carry provenance in their schema metadata (:func:`read_provenance`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "PROVENANCE_KEY", "atomic_write_bytes", "atomic_write_json", "atomic_write_parquet", "atomic_write_text",
    "fsync_dir", "json_default", "provenance_of", "read_provenance",
]

PROVENANCE_KEY = b"workbench.provenance"


def fsync_dir(path: Path) -> None:
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
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: readers see the old file or the new one."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
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
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def atomic_write_parquet(
    path: str | os.PathLike, df: pd.DataFrame, *, metadata: dict | None = None,
    row_group_size: int | None = None,
) -> None:
    """Write ``df`` (without its index) to a parquet file atomically.

    Args:
        path: Destination file.
        df: The table.
        metadata: Optional provenance (JSON-serialisable dict), stored in the parquet
            schema metadata and read back by :func:`read_provenance`.
        row_group_size: rows per row group (pyarrow's default when None); smaller groups
            of a sorted table let a filtered read skip most of the file.
    """
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata is not None:
        merged = dict(table.schema.metadata or {})
        merged[PROVENANCE_KEY] = json.dumps(metadata, default=json_default).encode("utf-8")
        table = table.replace_schema_metadata(merged)
    _atomic_write(path, lambda f: pq.write_table(table, f, row_group_size=row_group_size))


def read_provenance(path: str | os.PathLike) -> dict:
    """Provenance stored by :func:`atomic_write_parquet` (``{}`` when there is none).

    Reads only the parquet footer, so it is cheap on large tables.
    """
    return provenance_of(pq.read_schema(path))


def provenance_of(schema: pa.Schema) -> dict:
    """The provenance in a parquet table's schema (``{}`` when there is none), for a caller
    that has read the table already."""
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}
