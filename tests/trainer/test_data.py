"""Tests for trainer.data: loading real question/answer data and math-verify rewards."""

import json
import threading
import time

import datasets
import pandas as pd
import pytest

from trainer.data import MathVerifyTask, load_examples
from trainer.tasks import Example, PromptFormat, Task
from workbench.errors import DataError

ROWS = [
    {"question": "What is 3/4 as a decimal?", "answer": "0.75", "steps": "3/4 = 0.75."},
    {"question": "Compute 2+2.", "answer": 4, "steps": None},
    {"question": "Half of 9?", "answer": "\\frac{9}{2}", "steps": "9/2."},
]


def _check_rows(examples):
    assert [e.question for e in examples] == [r["question"] for r in ROWS]
    assert [e.answer for e in examples] == ["0.75", "4", "\\frac{9}{2}"]
    assert [e.solution for e in examples] == ["3/4 = 0.75.", None, "9/2."]
    assert examples[0].reference == "3/4 = 0.75. Answer: 0.75"
    assert examples[1].reference == "Answer: 4"
    assert examples[1].prompt == "Compute 2+2.\n"


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl(tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", ROWS)
    _check_rows(load_examples(path, solution_column="steps"))
    # Without a solution column, no example has a solution.
    assert all(e.solution is None for e in load_examples(str(path)))


def test_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS))
    _check_rows(load_examples(path, solution_column="steps"))


def test_parquet(tmp_path):
    path = tmp_path / "data.parquet"
    pd.DataFrame(ROWS).astype({"answer": str}).to_parquet(path)
    _check_rows(load_examples(path, solution_column="steps"))


def test_save_to_disk_folder_and_dataset_dict(tmp_path):
    rows = [{**row, "answer": str(row["answer"])} for row in ROWS]
    dataset = datasets.Dataset.from_list(rows)
    dataset.save_to_disk(str(tmp_path / "single"))
    _check_rows(load_examples(tmp_path / "single", solution_column="steps"))

    datasets.DatasetDict({"train": dataset, "test": dataset.select([2])}).save_to_disk(
        str(tmp_path / "splits")
    )
    test = load_examples(tmp_path / "splits", split="test")
    assert [e.answer for e in test] == ["\\frac{9}{2}"]
    with pytest.raises(DataError, match="no split 'validation'.*train, test"):
        load_examples(tmp_path / "splits", split="validation")


def test_custom_columns_limit_and_prompt_format(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": f"Q{i}", "gold": i} for i in range(5)])
    prompt_format = PromptFormat(template="Problem: {question}\n")
    examples = load_examples(
        path, question_column="problem", answer_column="gold", limit=2, prompt_format=prompt_format
    )
    assert [(e.question, e.answer) for e in examples] == [("Q0", "0"), ("Q1", "1")]
    assert examples[1].prompt == "Problem: Q1\n"
    assert examples[1].teacher_prompt == "Problem: Q1|Hint: Answer: 1.\n"


def test_missing_column_names_it_and_lists_the_available(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    expected = r"no column 'problem' \(available: question, answer, steps\)"
    with pytest.raises(DataError, match=expected):
        load_examples(path, question_column="problem")
    with pytest.raises(DataError, match="'solution'"):
        load_examples(path, solution_column="solution")


def test_empty_files(tmp_path):
    for name in ("empty.jsonl", "empty.json", "empty.parquet"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match="empty"):
            load_examples(tmp_path / name)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="blank.jsonl"):
        load_examples(tmp_path / "blank.jsonl")


def test_empty_answer_names_the_row(tmp_path):
    # Rows count from 1 (line 2 of the file is row 2); an absent field is not an empty one.
    rows = [{"question": "a", "answer": "1"}, {"question": "b", "answer": "  "}]
    with pytest.raises(DataError, match="row 2: empty 'answer' value"):
        load_examples(_write_jsonl(tmp_path / "d.jsonl", rows))
    rows = [{"question": "a", "answer": None}]
    with pytest.raises(DataError, match="row 1: no 'answer' field"):
        load_examples(_write_jsonl(tmp_path / "e.jsonl", rows))
    rows = [{"question": "a", "answer": "1"}, {"question": "b"}]
    with pytest.raises(DataError, match="row 2: no 'answer' field"):
        load_examples(_write_jsonl(tmp_path / "f.jsonl", rows))


def test_bad_json_line_is_located_by_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": 2,}\n')
    with pytest.raises(DataError, match=r"bad.jsonl line 3, column 31: invalid JSON"):
        load_examples(path)


def test_missing_file_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read"):
        load_examples(tmp_path / "bad.parquet")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported suffix"):
        load_examples(tmp_path / "data.txt")
    with pytest.raises(DataError, match="limit"):
        load_examples(tmp_path / "data.txt", limit=0)


def test_hub_failure_is_one_line_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line of detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as caught:
        load_examples("someone/some-math-set", split="test")
    message = str(caught.value)
    assert "\n" not in message
    assert "someone/some-math-set" in message and "Couldn't reach the Hub" in message


# ---------------------------------------------------------------- MathVerifyTask


@pytest.fixture(scope="module")
def task():
    train = [Example("q", "\\boxed{3/4}"), Example("q", "0.75"), Example("q", "72")]
    return MathVerifyTask(train=train, test=[Example("t", "-3")])


@pytest.mark.parametrize(
    "answer, completion, reward",
    [
        ("\\boxed{3/4}", "so the answer is 0.75", 1.0),
        ("0.75", "Therefore \\boxed{\\frac{3}{4}}", 1.0),
        ("0.75", "Answer: 3/4", 1.0),
        ("0.75", "Answer: 0.7", 0.0),
        ("72", "First 70, then 72", 1.0),  # the last number
        ("72", "Answer: 72. Then I double-check with 5", 1.0),  # "Answer:" beats a later number
        ("72", "\\boxed{72}, though Answer: 5", 1.0),  # \boxed beats "Answer:"
        ("72", "\\boxed{5} was my first try but it is wrong: \\boxed{72}", 1.0),  # the last
        ("72", "\\boxed{72} was my first try but it is wrong: \\boxed{5}", 0.0),
        # math-verify reads boxes close together as one answer set {5, 72}.
        ("72", "\\boxed{5} then \\boxed{72}", 0.0),
        ("72", "Answer: 71", 0.0),
        ("-3", "Answer: -3", 1.0),
        ("-3", "Answer: 3", 0.0),
        ("72", "", 0.0),
        ("72", "no numbers at all", 0.0),
        ("72", "\\boxed{\\frac{1}{0}} }{ $$ \x00 🙂", 0.0),
    ],
)
def test_math_verify_reward(task, answer, completion, reward):
    assert task.reward(completion, Example("q", answer)) == reward


def test_math_verify_never_raises_on_junk():
    task = MathVerifyTask(train=[Example("q", "72")], test=[], timeout_seconds=1)
    example = Example("q", "72")
    for junk in [None, 12, "\\frac{" * 500, "9" * 5000, "\\boxed{" + "(" * 300 + "}"]:
        assert task.reward(junk, example) == 0.0
    assert task.reward("Answer: 72", Example("q", "\\frac{")) == 0.0  # unparsable gold


def test_math_verify_timeout_cuts_a_parse_that_would_hang(monkeypatch):
    # A parser that would spin for a minute: the 1 s SIGALRM bound must cut it off. The
    # margin (30 s against 1 s) keeps the check meaningful on a loaded machine without
    # making it a timing test: only a missing timeout can take that long.
    import math_verify.parser

    def spin(*args, **kwargs):
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pass
        return []

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", spin)
    task = MathVerifyTask(train=[Example("q", "72")], test=[], timeout_seconds=1)
    start = time.monotonic()
    assert task.reward("Answer: 72", Example("q", "72")) == 0.0
    assert time.monotonic() - start < 30


def test_math_verify_extract_answer_and_protocol(task):
    assert isinstance(task, Task)
    assert task.extract_answer("Answer: 1/2") == "1/2"
    assert task.extract_answer("so \\boxed{72}") == "72"
    assert task.extract_answer("nothing here") is None
    assert [e.answer for e in task.train_examples()] == ["\\boxed{3/4}", "0.75", "72"]
    assert [e.answer for e in task.test_examples()] == ["-3"]


def test_math_verify_works_outside_the_main_thread(task):
    # math-verify's timer uses SIGALRM, which only the main thread may set.
    results = []
    worker = threading.Thread(
        target=lambda: results.append(task.reward("\\boxed{3/4}", Example("q", "0.75")))
    )
    worker.start()
    worker.join()
    assert results == [1.0]


def test_loaded_examples_verify_end_to_end(tmp_path):
    examples = load_examples(_write_jsonl(tmp_path / "d.jsonl", ROWS), solution_column="steps")
    task = MathVerifyTask(train=examples, test=[])
    assert [task.reward(e.reference, e) for e in examples] == [1.0, 1.0, 1.0]
    assert task.reward("Answer: 4.5", examples[2]) == 1.0
    assert task.reward("Answer: 5", examples[2]) == 0.0
