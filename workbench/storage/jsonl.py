"""Reading JSON lines with one-line errors that say where a line is bad."""

from __future__ import annotations

import json
from pathlib import Path

from workbench.errors import DataError


def read_json_objects(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSONL file.

    Raises:
        DataError: a line that is not JSON (named by line and column) or not an object.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path} line {number}, column {error.colno}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
            out.append((number, record))
    return out
