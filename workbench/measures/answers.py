"""Final answers of completions, and whether one answers a gold: the one implementation of
both checks the trainer's tasks reward with and the analyzer verifies early exits with.

- ``"integer"`` (the embedded arithmetic task, ``trainer.tasks.arithmetic``): the integer after
  the completion's last ``"Answer:"`` equals the gold (:func:`integer_agree`);
- ``"math"`` (real data, ``trainer.data.MathVerifyTask``): math-verify's extraction (the last
  ``\\boxed{}``, an expression after ``"Answer:"``, the last number) equals the gold
  symbolically or numerically (:func:`math_agree`).

The trainer records its task's check in run.json (``answer_check``), so the analyzer checks a
run's completions as its reward did (:func:`answers_agree`, gold from :func:`gold_answer`).
"""

from __future__ import annotations

import re
import threading

__all__ = ["ANSWER_CHECKS", "ANSWER_MARK", "answers_agree", "canonical_integer", "extract_integer_answer", "final_answer",
           "gold_answer", "integer_agree", "math_agree", "math_gold", "math_parse"]

ANSWER_MARK = "Answer:"
# After the last "Answer:": optional spaces, an optional sign, spaces, ASCII
# digits; the integer must not continue as a decimal ("51.5") or a digit
# group ("51,000"), but may be followed by anything else ("51.", "51<eos>").
_INTEGER_AFTER_MARK = re.compile(r"\s*([+-]?)\s*([0-9]+)(?![0-9]|[.,][0-9])", re.ASCII)


def canonical_integer(sign: str, digits: str) -> str:
    """The canonical spelling of an integer: no leading zeros or plus, no ``-0``.

    Works on strings so that arbitrarily long numbers compare exactly without
    Python's int/str conversion limit.
    """
    digits = digits.lstrip("0") or "0"
    return f"-{digits}" if sign == "-" and digits != "0" else digits


def extract_integer_answer(completion: str) -> str | None:
    """The integer after the last ``"Answer:"`` in a completion, canonicalised.

    Args:
        completion: Model output text; anything at all.

    Returns:
        E.g. ``"51"`` or ``"-5"``; None if there is no ``"Answer:"`` or no
        integer right after the last one.
    """
    if not isinstance(completion, str):
        return None
    position = completion.rfind(ANSWER_MARK)
    if position < 0:
        return None
    match = _INTEGER_AFTER_MARK.match(completion, position + len(ANSWER_MARK))
    if match is None:
        return None
    return canonical_integer(match.group(1), match.group(2))


def math_timeout(seconds: int) -> int | None:
    """math-verify's bound for this thread: it enforces it with ``SIGALRM``, which can only be
    installed from the main thread; elsewhere it runs without one."""
    return seconds if seconds > 0 and threading.current_thread() is threading.main_thread() else None


def math_parse(text: str | None, timeout_seconds: int = 3) -> list:
    """math-verify's extraction of a text's final answer, in this order of preference: the last
    ``\\boxed{...}``, the last expression after ``"Answer:"``, the last number; ``[]`` when it
    finds none (or cannot parse the text)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if not isinstance(text, str) or not text.strip():
        return []
    try:
        return parse(text, extraction_config=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
                     parsing_timeout=math_timeout(timeout_seconds))
    except Exception:  # noqa: BLE001 - an unparsable text has no answer
        return []


def math_gold(answer: str, timeout_seconds: int = 3) -> list:
    """A gold answer as math-verify parses it: the answer itself, else inside math delimiters
    (a bare LaTeX expression such as ``x^2+1`` is only found there)."""
    return math_parse(answer, timeout_seconds) or math_parse(f"${answer}$", timeout_seconds)


def math_agree(completion: str | None, gold: list, timeout_seconds: int = 3) -> bool:
    """Whether math-verify finds the completion's final answer equal to the parsed ``gold``
    (:func:`math_gold`), symbolically or numerically (``\\boxed{3/4}`` == ``0.75``)."""
    from math_verify import verify

    predicted = math_parse(completion, timeout_seconds)
    if not predicted or not gold:
        return False
    try:
        return bool(verify(gold, predicted, timeout_seconds=math_timeout(timeout_seconds)))
    except Exception:  # noqa: BLE001 - the verifier never stops the caller
        return False


def integer_agree(completion: str | None, answer: str) -> bool:
    """The embedded task's check: the completion's integer after its last ``"Answer:"`` equals
    the gold integer ``answer``."""
    predicted = extract_integer_answer(completion)
    return predicted is not None and predicted == extract_integer_answer(f"{ANSWER_MARK} {answer}")


#: How a task checks a completion (run.json's ``answer_check``): the embedded task's integer
#: after "Answer:", or math-verify (real data).
ANSWER_CHECKS = ("integer", "math")


def gold_answer(record: dict) -> str | None:
    """A probe record's gold answer: its ``answer``, else what follows the last ``"Answer:"``
    of its reference (the references of both task kinds end with ``"Answer: <answer>"``), else
    the whole reference; None without either."""
    if record.get("answer"):
        return str(record["answer"])
    reference = record.get("reference")
    if not reference:
        return None
    position = reference.rfind(ANSWER_MARK)
    return reference[position + len(ANSWER_MARK):].strip() if position >= 0 else reference


def final_answer(text: str | None, check: str = "integer") -> str | None:
    """A completion's final answer as ``check`` reads it: the canonical integer after its last
    ``"Answer:"``, or math-verify's last extraction as text."""
    if check == "integer":
        return extract_integer_answer(text)
    parsed = math_parse(text)
    return str(parsed[-1]) if parsed else None


def answers_agree(completion: str | None, gold: str | None, check: str = "integer") -> bool:
    """Whether a completion answers ``gold`` (a bare answer) under ``check``."""
    if not gold:
        return False
    return integer_agree(completion, gold) if check == "integer" else math_agree(completion, math_gold(gold))
