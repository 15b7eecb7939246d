"""The example and task contract shared by warm start, the trainer and the probes.

An :class:`Example` is a question, its canonical final answer and (when the data
has them) solution steps. From these it derives three strings:

- ``prompt``: what the student policy sees, ``"{question}\\n"``;
- ``teacher_prompt``: the same text up to the response-start separator, then
  :data:`SENTINEL` and a hint holding the privileged context (solution and
  answer), then the same separator. The student prompt is therefore the
  teacher prompt cut at the sentinel with the separator kept
  (:func:`student_prompt_from_teacher`), as SDPG/RLSD/OPSD require;
- ``reference``: the reference completion (steps, then ``"Answer: 51"``),
  without an end-of-sequence token; the caller appends the tokenizer's EOS.

A :class:`Task` supplies train/test examples and a verifier reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from workbench.errors import ConfigError, DataError

SENTINEL = "|"
"""Marks where the privileged context starts in a teacher prompt."""


@dataclass(frozen=True)
class PromptFormat:
    """How questions, hints and reference completions are written out.

    Attributes:
        template: Student prompt; must contain ``{question}`` and end with
            ``response_start``.
        response_start: The separator after which the response begins; it ends
            both the student and the teacher prompt.
        sentinel: Inserted before the hint in the teacher prompt. Must not occur
            in a rendered question (checked per example), so that the student
            prompt can be recovered from the teacher prompt.
        hint_template: The privileged context when the example has a solution;
            fields ``{solution}`` and ``{answer}``.
        hint_template_no_solution: The privileged context without a solution;
            field ``{answer}``.
        reference_template: The reference completion with a solution.
        reference_template_no_solution: The reference completion without one.
    """

    template: str = "{question}\n"
    response_start: str = "\n"
    sentinel: str = SENTINEL
    hint_template: str = "Hint: {solution} Answer: {answer}."
    hint_template_no_solution: str = "Hint: Answer: {answer}."
    reference_template: str = "{solution} Answer: {answer}"
    reference_template_no_solution: str = "Answer: {answer}"

    def __post_init__(self):
        if "{question}" not in self.template:
            raise ConfigError(f"prompt_format.template {self.template!r} lacks '{{question}}'")
        if not self.response_start or not self.template.endswith(self.response_start):
            raise ConfigError(
                f"prompt_format.template {self.template!r} must end with "
                f"prompt_format.response_start {self.response_start!r}"
            )
        if not self.sentinel:
            raise ConfigError("prompt_format.sentinel must be a non-empty string")
        if self.sentinel in self.template.replace("{question}", ""):
            raise ConfigError(
                f"prompt_format.sentinel {self.sentinel!r} occurs in prompt_format.template"
            )
        # Templates are str.format strings (literal braces doubled); try each
        # once so that a bad field fails here and not in the middle of a run.
        for name in (
            "template",
            "hint_template",
            "hint_template_no_solution",
            "reference_template",
            "reference_template_no_solution",
        ):
            try:
                rendered = getattr(self, name).format(question="", solution="", answer="\0")
            except (KeyError, IndexError, ValueError) as error:
                raise ConfigError(f"prompt_format.{name} is not a valid template: {error!r}")
            if name != "template" and "\0" not in rendered:
                raise ConfigError(f"prompt_format.{name} lacks '{{answer}}'")

    def student_prompt(self, question: str) -> str:
        """The prompt the policy sees: ``template`` filled with the question."""
        return self.template.format(question=question)

    def hint(self, answer: str, solution: str | None) -> str:
        """The privileged context: solution steps (if any) and the answer."""
        if solution is None:
            return self.hint_template_no_solution.format(answer=answer)
        return self.hint_template.format(solution=solution, answer=answer)

    def teacher_prompt(self, question: str, answer: str, solution: str | None) -> str:
        """Student prompt without its separator, sentinel, hint, separator."""
        body = self.student_prompt(question)[: -len(self.response_start)]
        return f"{body}{self.sentinel}{self.hint(answer, solution)}{self.response_start}"

    def reference(self, answer: str, solution: str | None) -> str:
        """The reference completion (no EOS)."""
        if solution is None:
            return self.reference_template_no_solution.format(answer=answer)
        return self.reference_template.format(solution=solution, answer=answer)

    def student_prompt_from_teacher(self, teacher_prompt: str) -> str:
        """Cut a teacher prompt at the first sentinel and restore the separator.

        Raises:
            ValueError: if the teacher prompt has no sentinel.
        """
        cut = teacher_prompt.find(self.sentinel)
        if cut < 0:
            raise ValueError(f"teacher prompt has no sentinel {self.sentinel!r}")
        return teacher_prompt[:cut] + self.response_start


DEFAULT_PROMPT_FORMAT = PromptFormat()


def student_prompt_from_teacher(
    teacher_prompt: str, prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT
) -> str:
    """The student prompt is the teacher prompt up to the sentinel, plus the separator.

    Args:
        teacher_prompt: A prompt built by :meth:`PromptFormat.teacher_prompt`.
        prompt_format: The format it was built with.

    Returns:
        The student prompt, identical to :attr:`Example.prompt`.
    """
    return prompt_format.student_prompt_from_teacher(teacher_prompt)


@dataclass(frozen=True)
class Example:
    """One question with its canonical answer and optional solution steps.

    Attributes:
        question: E.g. ``"Compute 23+45-17."``.
        answer: Canonical final answer, e.g. ``"51"``.
        solution: Steps, e.g. ``"23+45=68. 68-17=51."``; None if the data has none.
        prompt_format: How the derived strings are written.
    """

    question: str
    answer: str
    solution: str | None = None
    prompt_format: PromptFormat = field(default=DEFAULT_PROMPT_FORMAT, repr=False)

    def __post_init__(self):
        # The sentinel must be unambiguous: the student prompt is recovered by
        # cutting the teacher prompt at its first sentinel.
        if self.prompt_format.sentinel in self.question:
            raise DataError(
                f"question {self.question[:60]!r} contains the prompt sentinel "
                f"{self.prompt_format.sentinel!r}; choose another PromptFormat.sentinel"
            )

    @property
    def prompt(self) -> str:
        """The student prompt the policy sees."""
        return self.prompt_format.student_prompt(self.question)

    @property
    def teacher_prompt(self) -> str:
        """The student prompt with the sentinel and the privileged hint before the separator."""
        return self.prompt_format.teacher_prompt(self.question, self.answer, self.solution)

    @property
    def hint(self) -> str:
        """The privileged context alone."""
        return self.prompt_format.hint(self.answer, self.solution)

    @property
    def reference(self) -> str:
        """The reference completion (chain of thought + ``"Answer: ..."``), without EOS."""
        return self.prompt_format.reference(self.answer, self.solution)


@runtime_checkable
class Task(Protocol):
    """A source of examples with a verifier.

    ``reward`` returns 1.0 for a correct completion and 0.0 otherwise; it never
    raises, whatever the completion holds. ``answer_check`` names the check it applies
    (``workbench.measures.answers.ANSWER_CHECKS``: ``"integer"`` or ``"math"``), which run.json
    records so that the analyzer checks completions the same way.
    """

    answer_check: str

    def train_examples(self) -> list[Example]:
        """The training examples, in a fixed order."""
        ...

    def test_examples(self) -> list[Example]:
        """The held-out examples, disjoint from the training ones."""
        ...

    def reward(self, completion: str, example: Example) -> float:
        """1.0 if the completion's final answer matches ``example.answer``, else 0.0."""
        ...

    def extract_answer(self, completion: str) -> str | None:
        """The completion's final answer in canonical form, or None if it has none."""
        ...
