"""Tasks: examples with prompts, hints and reference completions, and their verifiers."""

from trainer.tasks.arithmetic import ArithmeticTask, extract_integer_answer
from trainer.tasks.base import (
    DEFAULT_PROMPT_FORMAT,
    SENTINEL,
    Example,
    PromptFormat,
    Task,
    student_prompt_from_teacher,
)

__all__ = [
    "ArithmeticTask",
    "DEFAULT_PROMPT_FORMAT",
    "Example",
    "PromptFormat",
    "SENTINEL",
    "Task",
    "extract_integer_answer",
    "student_prompt_from_teacher",
]
