"""Tests for trainer.tasks: the example contract, the arithmetic task and its verifier."""

import re
import time

import pytest

from trainer.tasks import (
    SENTINEL,
    ArithmeticTask,
    Example,
    PromptFormat,
    Task,
    student_prompt_from_teacher,
)
from workbench.errors import ConfigError, DataError

# ---------------------------------------------------------------- Example / prompts


def test_example_strings_follow_the_contract():
    example = Example("Compute 23+45-17.", "51", "23+45=68. 68-17=51.")
    assert example.prompt == "Compute 23+45-17.\n"
    assert example.teacher_prompt == (
        f"Compute 23+45-17.{SENTINEL}Hint: 23+45=68. 68-17=51. Answer: 51.\n"
    )
    assert example.reference == "23+45=68. 68-17=51. Answer: 51"


def test_example_without_solution():
    example = Example("What is 2+2?", "4", None)
    assert example.teacher_prompt == f"What is 2+2?{SENTINEL}Hint: Answer: 4.\n"
    assert example.reference == "Answer: 4"


def test_student_prompt_is_teacher_prompt_cut_at_sentinel():
    for example in ArithmeticTask(n_train=50, n_test=10).train_examples():
        teacher = example.teacher_prompt
        cut = teacher.index(SENTINEL)
        assert teacher[:cut] + "\n" == example.prompt
        assert student_prompt_from_teacher(teacher) == example.prompt


def test_custom_prompt_format_keeps_the_relationship():
    prompt_format = PromptFormat(
        template="Q: {question}\nA:", response_start="\nA:", sentinel="@@",
        hint_template="(sol {solution}; ans \\boxed{{{answer}}})",
    )
    example = Example("1+1?", "2", "1+1=2.", prompt_format)
    assert example.prompt == "Q: 1+1?\nA:"
    assert example.teacher_prompt == "Q: 1+1?@@(sol 1+1=2.; ans \\boxed{2})\nA:"
    assert student_prompt_from_teacher(example.teacher_prompt, prompt_format) == example.prompt


def test_solution_with_braces_is_inserted_verbatim():
    example = Example("Simplify.", "\\frac{3}{4}", "It is \\frac{6}{8}={answer}.")
    assert example.reference == "It is \\frac{6}{8}={answer}. Answer: \\frac{3}{4}"


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        ({"template": "no field\n"}, "template"),
        ({"template": "{question}"}, "response_start"),
        ({"hint_template": "Hint: {solution}"}, "hint_template"),
        ({"hint_template": "Hint: {oops} {answer}"}, "hint_template"),
        ({"sentinel": ""}, "sentinel"),
    ],
)
def test_bad_prompt_format_raises_config_error(kwargs, knob):
    with pytest.raises(ConfigError, match=knob):
        PromptFormat(**kwargs)


def test_question_containing_sentinel_is_rejected():
    with pytest.raises(DataError, match="sentinel"):
        Example(f"What is |x| for x={SENTINEL}3?", "3")


# ---------------------------------------------------------------- ArithmeticTask


def _evaluate_steps(example: Example, allow_negative: bool) -> None:
    """Check every step's arithmetic and that the steps chain the question's operands."""
    expression = re.fullmatch(r"Compute (?:left to right: )?(.*)\.", example.question).group(1)
    tokens = re.findall(r"\d+|[+\-*]", expression)
    operands, operators = [int(t) for t in tokens[::2]], tokens[1::2]
    steps = example.solution.split(" ")
    assert len(steps) == len(operators)
    value = operands[0]
    for step, operator, operand in zip(steps, operators, operands[1:]):
        left, op, right, result = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)\.", step).groups()
        assert (int(left), op, int(right)) == (value, operator, operand)
        expected = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        assert int(result) == expected
        if not allow_negative:
            assert expected >= 0
        value = expected
    assert example.answer == str(value)
    assert example.reference == f"{example.solution} Answer: {value}"


def test_known_first_example_and_arithmetic():
    task = ArithmeticTask(n_operands=3, digits=2, n_train=300, n_test=50, seed=0)
    examples = task.train_examples() + task.test_examples()
    assert len(task.train_examples()) == 300 and len(task.test_examples()) == 50
    for example in examples:
        assert re.fullmatch(r"Compute \d\d[+-]\d\d[+-]\d\d\.", example.question)
        _evaluate_steps(example, allow_negative=False)
    # The embedded default: three one-digit operands, two chain-of-thought steps.
    for example in ArithmeticTask(n_train=300, n_test=50).train_examples():
        assert re.fullmatch(r"Compute \d[+-]\d[+-]\d\.", example.question)
        assert example.solution.count("=") == 2
        _evaluate_steps(example, allow_negative=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"operators": "+-*", "n_operands": 4, "digits": 1, "allow_negative": True},
        {"operators": "-", "n_operands": 2, "digits": 3, "allow_negative": True},
        {"operators": "-*", "n_operands": 5, "digits": 2},
    ],
)
def test_arithmetic_is_right_for_other_knobs(kwargs):
    task = ArithmeticTask(n_train=200, n_test=20, seed=3, **kwargs)
    examples = task.train_examples() + task.test_examples()
    for example in examples:
        _evaluate_steps(example, allow_negative=kwargs.get("allow_negative", False))
    if "*" in kwargs["operators"]:
        assert all(e.question.startswith("Compute left to right: ") for e in examples)
    if kwargs.get("allow_negative"):
        assert any(int(e.answer) < 0 for e in examples)


def test_left_to_right_with_multiplication():
    task = ArithmeticTask(n_train=500, n_test=0, operators="+*", n_operands=3, digits=1, seed=1)
    plus_then_times = [
        e for e in task.train_examples() if re.search(r"\d\+\d\*\d", e.question)
    ]
    assert plus_then_times
    for example in plus_then_times:
        a, b, c = map(int, re.findall(r"\d", example.question))
        assert example.answer == str((a + b) * c)  # e.g. 2+3*4 = 20, not 14
    # The usual precedence would give a different answer for most of them.
    assert any(str(a + b * c) != e.answer for e in plus_then_times
               for a, b, c in [map(int, re.findall(r"\d", e.question))])


def test_split_is_deterministic_disjoint_and_seeded():
    first = ArithmeticTask(n_train=1000, n_test=200, seed=7)
    again = ArithmeticTask(n_train=1000, n_test=200, seed=7)
    other = ArithmeticTask(n_train=1000, n_test=200, seed=8)
    assert first.train_examples() == again.train_examples()
    assert first.test_examples() == again.test_examples()
    train_questions = {e.question for e in first.train_examples()}
    test_questions = {e.question for e in first.test_examples()}
    assert len(train_questions) == 1000 and len(test_questions) == 200
    assert not train_questions & test_questions
    assert first.train_examples() != other.train_examples()
    assert first.test_examples() != other.test_examples()
    # The test set depends only on the seed, not on n_train.
    assert ArithmeticTask(n_train=10, n_test=200, seed=7).test_examples() == first.test_examples()


def test_default_generation_is_fast():
    start = time.perf_counter()
    task = ArithmeticTask()
    assert len(task.train_examples()) == 2000
    assert len(task.test_examples()) == 500
    assert time.perf_counter() - start < 1.0


def test_arithmetic_task_implements_task_protocol():
    assert isinstance(ArithmeticTask(n_train=5, n_test=1), Task)


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        ({"n_operands": 1}, "n_operands"),
        ({"digits": 0}, "digits"),
        ({"digits": 5}, "digits"),
        ({"operators": "+/"}, "operators"),
        ({"operators": ""}, "operators"),
        ({"n_train": 0}, "n_train"),
        ({"n_test": -1}, "n_test"),
        ({"n_operands": 2.5}, "n_operands"),
        ({"allow_negative": "no"}, "allow_negative"),
        ({"n_operands": 2, "digits": 1, "operators": "+", "n_train": 100, "n_test": 1}, "n_train"),
    ],
)
def test_bad_knobs_raise_config_error_naming_the_knob(kwargs, knob):
    with pytest.raises(ConfigError, match=knob):
        ArithmeticTask(**kwargs)


def test_impossible_non_negative_request_raises_instead_of_looping():
    # 2-digit "a-b-...-h" >= 0 needs a >= 70: valid questions are very rare.
    task = ArithmeticTask(n_operands=8, digits=2, operators="-", n_train=1000, n_test=0)
    with pytest.raises(ConfigError, match="n_train"):
        task.train_examples()


# ---------------------------------------------------------------- verifier

EXAMPLE = Example("Compute 23+45-17.", "51", "23+45=68. 68-17=51.")
NEGATIVE = Example("Compute 12-45.", "-33", "12-45=-33.")


@pytest.mark.parametrize(
    "completion, extracted, reward",
    [
        ("23+45=68. 68-17=51. Answer: 51", "51", 1.0),
        ("Answer: 51.", "51", 1.0),
        ("Answer:51<eos>junk", "51", 1.0),
        ("Answer:   +051 and more text", "51", 1.0),
        ("Answer: 52", "52", 0.0),
        ("Answer: 51.5", None, 0.0),
        ("Answer: 51,000", None, 0.0),
        ("Answer: 5 1", "5", 0.0),
        ("Answer: 51 Answer: 7", "7", 0.0),  # the last Answer: wins
        ("Answer: 7 Answer: 51", "51", 1.0),
        ("Answer: 51 Answer: nothing", None, 0.0),
        ("51", None, 0.0),
        ("", None, 0.0),
        ("Answer:", None, 0.0),
        ("Answer: -", None, 0.0),
        ("Answer: ٥١", None, 0.0),  # non-ASCII digits are not an answer
        ("\x00\uffff🙂 Answer: 🙂", None, 0.0),
        ("answer: 51", None, 0.0),
        ("Answer: " + "9" * 10000, "9" * 10000, 0.0),
    ],
)
def test_verifier(completion, extracted, reward):
    task = ArithmeticTask(n_train=5, n_test=1)
    assert task.extract_answer(completion) == extracted
    assert task.reward(completion, EXAMPLE) == reward


def test_verifier_negative_answers():
    task = ArithmeticTask(n_train=5, n_test=1)
    assert task.extract_answer("12-45=-33. Answer: -33") == "-33"
    assert task.reward("12-45=-33. Answer: -33", NEGATIVE) == 1.0
    assert task.reward("Answer: - 33.", NEGATIVE) == 1.0
    assert task.reward("Answer: 33", NEGATIVE) == 0.0
    assert task.extract_answer("Answer: -0") == "0"


def test_verifier_never_raises_on_non_strings():
    task = ArithmeticTask(n_train=5, n_test=1)
    assert task.extract_answer(None) is None
    assert task.reward(None, EXAMPLE) == 0.0


def test_every_reference_earns_reward_one():
    task = ArithmeticTask(n_train=200, n_test=50, operators="+-*", allow_negative=True)
    for example in task.train_examples() + task.test_examples():
        assert task.reward(example.reference, example) == 1.0
        assert task.reward(example.reference + "<eos>", example) == 1.0
