"""Real data: question/answer tables from files or ``datasets``, verified with math-verify.

:func:`load_examples` reads a JSONL/JSON, Parquet or CSV file, a folder written
by ``datasets.Dataset.save_to_disk``, or a hub data set name, and turns each row
into an :class:`~trainer.tasks.base.Example`. :class:`MathVerifyTask` wraps
train and test examples as a :class:`~trainer.tasks.base.Task` whose reward
checks the completion's final answer against the gold with ``math_verify``
(``\\boxed{3/4}``, ``0.75`` and ``3/4`` all agree).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from trainer.tasks.base import DEFAULT_PROMPT_FORMAT, Example, PromptFormat
from workbench.measures.answers import math_agree, math_gold, math_parse
from workbench.errors import DataError
from workbench.storage.jsonl import read_json_objects

logger = logging.getLogger(__name__)

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def load_examples(
    path_or_name: str | Path,
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    solution_column: str | None = None,
    split: str = "train",
    limit: int | None = None,
    prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
    config_name: str | None = None,
) -> list[Example]:
    """Load question/answer rows as examples.

    Args:
        path_or_name: A ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a folder
            saved with ``datasets`` ``save_to_disk`` (a ``Dataset`` or a
            ``DatasetDict``), or a ``datasets`` hub name.
        question_column: Column with the question text.
        answer_column: Column with the canonical final answer (``\\boxed{...}``
            or a plain number both work with :class:`MathVerifyTask`).
        solution_column: Optional column with solution steps, used in the
            teacher's hint and in the reference completion; empty cells give
            examples without a solution.
        split: Split of a ``DatasetDict`` folder or of a hub data set.
        limit: Keep only the first ``limit`` rows.
        prompt_format: How prompts, hints and references are written.
        config_name: Configuration of a hub data set (e.g. ``"main"`` for gsm8k).

    Returns:
        One example per row, in file order.

    Raises:
        DataError: one line naming the problem: a missing or empty file, an
            unreadable file, a missing column (the available ones listed), an
            empty question or answer (the row named), a hub name that cannot be
            loaded.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    table = _read_table(path_or_name, split=split, config_name=config_name)
    source = str(path_or_name)
    if table.empty:
        raise DataError(f"{source} has no rows")
    wanted = [question_column, answer_column] + ([solution_column] if solution_column else [])
    for column in wanted:
        if column not in table.columns:
            available = ", ".join(map(str, table.columns))
            raise DataError(f"{source} has no column {column!r} (available: {available})")
    if limit is not None:
        table = table.iloc[:limit]

    examples = []
    # Rows are counted from 1, as an editor counts the lines of a JSONL file.
    for row_number, row in enumerate(table.itertuples(index=False), start=1):
        record = dict(zip(table.columns, row))
        for column in (question_column, answer_column):
            if _is_missing(record[column]):
                raise DataError(f"{source} row {row_number}: no {column!r} field")
        question = _cell_text(record[question_column])
        answer = _cell_text(record[answer_column])
        if not question:
            raise DataError(f"{source} row {row_number}: empty {question_column!r} value")
        if not answer:
            raise DataError(f"{source} row {row_number}: empty {answer_column!r} value")
        solution = _cell_text(record[solution_column]) if solution_column else None
        examples.append(
            Example(
                question=question,
                answer=answer,
                solution=solution or None,
                prompt_format=prompt_format,
            )
        )
    return examples


def _is_missing(value) -> bool:
    """A cell that holds no value at all (a key absent from a JSON line, null, NaN)."""
    return value is None or (pd.api.types.is_scalar(value) and pd.isna(value))


def _cell_text(value) -> str:
    """A cell as stripped text; missing values (None, NaN) become ``""``."""
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        # Parquet/JSON may store integer answers as floats (e.g. a column with gaps).
        return str(int(value))
    return str(value).strip()


def _read_table(path_or_name: str | Path, *, split: str, config_name: str | None) -> pd.DataFrame:
    path = Path(path_or_name).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if path.is_file():
        return _read_file(path)
    text = str(path_or_name)
    looks_like_path = (
        path.suffix.lower() in _FILE_SUFFIXES
        or text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
    )
    if looks_like_path:
        raise DataError(f"no such file or folder: {text}")
    return _read_hub_dataset(text, split, config_name)


def _read_file(path: Path) -> pd.DataFrame:
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_json_lines(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except DataError:
        raise
    except Exception as error:  # pandas/pyarrow raise many types for a bad file
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from error
    raise DataError(
        f"{path} has unsupported suffix {path.suffix!r} (use {', '.join(_FILE_SUFFIXES)})"
    )


def _read_json_lines(path: Path) -> pd.DataFrame:
    """JSON lines, one object per non-blank line; a bad line is named by line and column."""
    return pd.DataFrame.from_records([record for _, record in read_json_objects(path)])


def _read_json(path: Path) -> pd.DataFrame:
    """A ``.json`` file: a list of records, ``{"data": [...]}``, or JSON lines."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path} is empty")
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        # Not one JSON document: JSON lines under a .json name.
        return _read_json_lines(path)
    if isinstance(content, dict) and len(content) == 1:
        content = next(iter(content.values()))
    if not isinstance(content, list):
        raise DataError(f"{path} is not a list of records")
    return pd.DataFrame.from_records(content)


def _read_saved_dataset(path: Path, split: str) -> pd.DataFrame:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:
        raise DataError(
            f"{path} is not a folder saved with datasets' save_to_disk: {error}"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{path} has no split {split!r} (available: {', '.join(dataset)})")
        dataset = dataset[split]
    return dataset.to_pandas()


def _read_hub_dataset(name: str, split: str, config_name: str | None) -> pd.DataFrame:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config_name, split=split)
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            f"cannot load data set {name!r} (split {split!r}) from the hub and no such "
            f"local file or folder exists: {message}"
        ) from error
    return dataset.to_pandas()


class MathVerifyTask:
    """A task over real examples, verified with ``math_verify``.

    The completion's final answer is, in this order of preference: the last
    ``\\boxed{...}``, the last expression after ``"Answer:"``, the last number
    (math-verify's priorities with boxed first). It is then compared with the
    gold answer symbolically and numerically (``\\boxed{3/4}`` == ``0.75``).

    Args:
        train: Training examples.
        test: Held-out examples.
        timeout_seconds: Bound on each parse and each comparison, in whole
            seconds. math-verify enforces it with ``SIGALRM``, which only works
            in the main thread; in other threads it runs without a bound.
    """

    #: How its completions are checked (:mod:`workbench.measures.answers`), recorded in run.json.
    answer_check = "math"

    def __init__(self, train: list[Example], test: list[Example], timeout_seconds: int = 3):
        if not train:
            raise DataError("MathVerifyTask needs at least one training example")
        self._train = list(train)
        self._test = list(test)
        self.timeout_seconds = int(timeout_seconds)
        self._gold_cache: dict[str, list] = {}

    def train_examples(self) -> list[Example]:
        """The training examples (a new list each call)."""
        return list(self._train)

    def test_examples(self) -> list[Example]:
        """The held-out examples (a new list each call)."""
        return list(self._test)

    def extract_answer(self, completion: str) -> str | None:
        """The text of the completion's final answer as math-verify extracts it, or None."""
        parsed = math_parse(completion, self.timeout_seconds)
        return str(parsed[-1]) if parsed else None

    def reward(self, completion: str, example: Example) -> float:
        """1.0 if math-verify finds the completion's answer equal to the gold, else 0.0."""
        if example.answer not in self._gold_cache:  # each example's answer is parsed once
            self._gold_cache[example.answer] = math_gold(example.answer, self.timeout_seconds)
        return 1.0 if math_agree(completion, self._gold_cache[example.answer], self.timeout_seconds) else 0.0
