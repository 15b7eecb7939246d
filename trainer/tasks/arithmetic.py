"""Multi-step arithmetic: the embedded default task.

A question chains ``n_operands`` numbers of ``digits`` digits with operators
from ``operators``; the model should write one step per operator and then the
answer, e.g.::

    question:  Compute 23+45-17.
    solution:  23+45=68. 68-17=51.
    answer:    51
    reference: 23+45=68. 68-17=51. Answer: 51

Evaluation is always left to right, one step per operator. With ``+`` and
``-`` only that is the usual order. When ``*`` is allowed the usual precedence
would differ, so those questions say so: ``"Compute left to right: 2+3*4."``
(answer 20, not 14).

The split is deterministic: one ``random.Random(seed)`` draws distinct
questions; the first ``n_test`` are the test set and the next ``n_train`` the
training set, so the test set does not change when ``n_train`` does, and the two
never share a question.
"""

from __future__ import annotations

import random
from functools import cached_property

from trainer.tasks.base import DEFAULT_PROMPT_FORMAT, Example, PromptFormat
from workbench.errors import ConfigError
from workbench.measures.answers import canonical_integer, extract_integer_answer, integer_agree  # noqa: F401

# The embedded default, chosen by measurement (docs/calibration.md): three one-digit operands
# ("Compute 7+2-5.", two chain-of-thought steps). The tiny preset's warm start lands at about
# 45% held-out greedy accuracy, and GRPO then gains 10-17 points in about 100 steps; with four
# operands it gained 3-6 points in 150 steps at any learning rate that did not collapse it.
# The 1-digit, 3-operand, "+-" space holds 2,605 distinct questions: 500 held out, 2,000 to train.
EMBEDDED_TASK = dict(n_operands=3, digits=1, operators="+-", n_train=2000, n_test=500, seed=0)

# Attempts to draw one more distinct question before concluding that the knobs
# cannot give n_train + n_test of them (checked against the space size first).
_MAX_DRAWS_PER_EXAMPLE = 50


def _apply(left: int, operator: str, right: int) -> int:
    if operator == "+":
        return left + right
    if operator == "-":
        return left - right
    return left * right


class ArithmeticTask:
    """Left-to-right multi-step integer arithmetic with a step-by-step solution.

    Args:
        n_operands: Numbers per question (>= 2); one solution step per operator.
        digits: Digits per operand, 1..4 (1 digit: 0..9; d digits: 10^(d-1)..10^d - 1).
        operators: Allowed operators, a non-empty subset of ``"+-*"``.
        n_train: Training examples (>= 1).
        n_test: Test examples (>= 0).
        seed: Seed of the deterministic generator and split.
        allow_negative: If False, each step is drawn uniformly among the
            (operator, operand) pairs that keep the running value >= 0 (the
            expression is redrawn when there is none), so every intermediate
            result and the answer are >= 0.
        prompt_format: How prompts, hints and references are written.

    Raises:
        ConfigError: naming the knob, for a value out of range, or when the
            knobs admit fewer distinct questions than ``n_train + n_test``.
    """

    def __init__(
        self,
        n_operands: int = EMBEDDED_TASK["n_operands"],
        digits: int = EMBEDDED_TASK["digits"],
        operators: str = EMBEDDED_TASK["operators"],
        n_train: int = EMBEDDED_TASK["n_train"],
        n_test: int = EMBEDDED_TASK["n_test"],
        seed: int = EMBEDDED_TASK["seed"],
        allow_negative: bool = False,
        prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
    ):
        _check_int("n_operands", n_operands, minimum=2)
        _check_int("digits", digits, minimum=1, maximum=4)
        if (
            not isinstance(operators, str)
            or not operators
            or not set(operators) <= set("+-*")
            or len(set(operators)) != len(operators)
        ):
            raise ConfigError(
                f"operators must be a non-empty subset of '+-*' without repeats, got {operators!r}"
            )
        _check_int("n_train", n_train, minimum=1)
        _check_int("n_test", n_test, minimum=0)
        _check_int("seed", seed, minimum=None)
        if not isinstance(allow_negative, bool):
            raise ConfigError(f"allow_negative must be true or false, got {allow_negative!r}")
        self.n_operands = n_operands
        self.digits = digits
        self.operators = operators
        self.n_train = n_train
        self.n_test = n_test
        self.seed = seed
        self.allow_negative = allow_negative
        self.prompt_format = prompt_format
        self._low = 0 if digits == 1 else 10 ** (digits - 1)
        self._high = 10**digits - 1
        # Upper bound on distinct questions (ignores the non-negativity filter).
        space = (self._high - self._low + 1) ** n_operands * len(operators) ** (n_operands - 1)
        if n_train + n_test > space:
            raise ConfigError(
                f"n_train + n_test = {n_train + n_test} exceeds the {space} distinct questions "
                f"with n_operands={n_operands}, digits={digits}, operators={operators!r}"
            )

    def __repr__(self) -> str:
        return (
            f"ArithmeticTask(n_operands={self.n_operands}, digits={self.digits}, "
            f"operators={self.operators!r}, n_train={self.n_train}, n_test={self.n_test}, "
            f"seed={self.seed}, allow_negative={self.allow_negative})"
        )

    def train_examples(self) -> list[Example]:
        """``n_train`` examples, disjoint from the test set (a new list each call)."""
        return list(self._split[1])

    def test_examples(self) -> list[Example]:
        """``n_test`` held-out examples (a new list each call)."""
        return list(self._split[0])

    def extract_answer(self, completion: str) -> str | None:
        """The integer after the last ``"Answer:"``, canonicalised; None on junk."""
        return extract_integer_answer(completion)

    #: How its completions are checked (:mod:`workbench.measures.answers`), recorded in run.json.
    answer_check = "integer"

    def reward(self, completion: str, example: Example) -> float:
        """1.0 if the completion's final integer equals the example's answer, else 0.0."""
        return 1.0 if integer_agree(completion, example.answer) else 0.0

    @cached_property
    def _split(self) -> tuple[list[Example], list[Example]]:
        rng = random.Random(self.seed)
        needed = self.n_test + self.n_train
        seen: set[str] = set()
        examples: list[Example] = []
        draws = 0
        while len(examples) < needed:
            draws += 1
            if draws > _MAX_DRAWS_PER_EXAMPLE * needed + 1000:
                raise ConfigError(
                    f"could draw only {len(examples)} of n_train + n_test = {needed} distinct "
                    f"questions with n_operands={self.n_operands}, digits={self.digits}, "
                    f"operators={self.operators!r}, allow_negative={self.allow_negative}"
                )
            example = self._draw(rng)
            if example is not None and example.question not in seen:
                seen.add(example.question)
                examples.append(example)
        return examples[: self.n_test], examples[self.n_test :]

    def _draw(self, rng: random.Random) -> Example | None:
        """One random example, or None if the running value cannot stay >= 0."""
        value = rng.randint(self._low, self._high)
        expression = str(value)
        steps = []
        for _ in range(self.n_operands - 1):
            step = self._draw_step(rng, value)
            if step is None:
                return None
            operator, operand = step
            result = _apply(value, operator, operand)
            steps.append(f"{value}{operator}{operand}={result}.")
            expression += f"{operator}{operand}"
            value = result
        prefix = "Compute left to right: " if "*" in self.operators else "Compute "
        return Example(
            question=f"{prefix}{expression}.",
            answer=str(value),
            solution=" ".join(steps),
            prompt_format=self.prompt_format,
        )

    def _draw_step(self, rng: random.Random, value: int) -> tuple[str, int] | None:
        """An (operator, operand) pair, uniform over the pairs allowed after ``value``.

        With ``allow_negative=False`` this is exactly rejection sampling of a
        uniform pair until ``value op operand >= 0``, done in one draw: ``+`` and
        ``*`` keep a non-negative value non-negative for every operand, ``-``
        only for operands <= value. None when no pair is allowed.
        """
        width = self._high - self._low + 1
        if self.allow_negative:
            return rng.choice(self.operators), rng.randint(self._low, self._high)
        counts = [
            max(0, min(self._high, value) - self._low + 1) if operator == "-" else width
            for operator in self.operators
        ]
        total = sum(counts)
        if total == 0:
            return None
        pick = rng.randrange(total)
        for operator, count in zip(self.operators, counts):
            if pick < count:
                return operator, self._low + pick
            pick -= count
        raise AssertionError("unreachable: pick < total")


def _check_int(name: str, value, *, minimum: int | None, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
