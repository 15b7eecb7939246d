"""Held-out evaluation: greedy accuracy and mean@k.

Used by the warm start (to report student and privileged-teacher accuracy), by the
training loop every ``eval_every`` steps, and by ``oisd eval CHECKPOINT_DIR``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from trainer.tasks.base import Example, Task
from workbench.models.generation import sample

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    accuracy: float  # greedy accuracy
    mean_at_k: float | None  # mean accuracy of k samples per question (None when k = 0)
    n: int
    completions: list[str]  # greedy completions, in question order

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {f"{prefix}accuracy": self.accuracy}
        if self.mean_at_k is not None:
            out[f"{prefix}mean_at_k"] = self.mean_at_k
        return out


def encode_prompts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of prompts as the model sees them (BOS where the tokenizer adds one)."""
    return [tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]


def decode_responses(tokenizer, responses: torch.Tensor, lengths: torch.Tensor) -> list[str]:
    return [
        tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
        for row, n in zip(responses, lengths)
    ]


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    k: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    batch_size: int = 128,
    hint: bool = False,
    seed: int = 0,
) -> EvalResult:
    """Greedy accuracy (and mean@k when ``k > 0``) on ``examples``.

    Args:
        hint: Prompt with the privileged teacher prompt instead of the student prompt.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    prompts = [e.teacher_prompt if hint else e.prompt for e in examples]
    correct, sampled_correct, completions = 0.0, 0.0, []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        ids = encode_prompts(tokenizer, prompts[start : start + batch_size])
        out = sample(model, ids, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                     max_new_tokens=max_new_tokens, greedy=True)
        texts = decode_responses(tokenizer, out.responses, out.lengths)
        completions.extend(texts)
        correct += sum(task.reward(t, e) for t, e in zip(texts, chunk))
        if k > 0:
            ids_k = [p for p in ids for _ in range(k)]
            out_k = sample(model, ids_k, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                           max_new_tokens=max_new_tokens, temperature=temperature, generator=generator)
            texts_k = decode_responses(tokenizer, out_k.responses, out_k.lengths)
            sampled_correct += sum(task.reward(t, chunk[i // k]) for i, t in enumerate(texts_k))
    if was_training:
        model.train()
    n = max(len(examples), 1)
    return EvalResult(
        accuracy=correct / n,
        mean_at_k=(sampled_correct / (n * k)) if k > 0 else None,
        n=len(examples),
        completions=completions,
    )


def evaluate_cli(args) -> None:
    """``oisd eval CHECKPOINT_DIR``: greedy accuracy and mean@k, printed and returned."""
    from trainer.config import parse_overrides
    from trainer.data import MathVerifyTask, load_examples
    from trainer.tasks import ArithmeticTask
    from workbench.models.loading import load_model_and_tokenizer
    from workbench.storage.checkpoints import has_manifest, verify_checkpoint

    path = args.checkpoint_dir
    if has_manifest(path):
        verify_checkpoint(path)
    model, tokenizer = load_model_and_tokenizer(path)
    if args.data:
        examples = load_examples(args.data, question_column=args.question_column,
                                 answer_column=args.answer_column)
        task: Task = MathVerifyTask(train=[], test=examples)
    else:
        knobs = parse_overrides(args.set)
        task = ArithmeticTask(**knobs)  # same split as training: same knobs and seed
        examples = task.test_examples()
    examples = examples[: args.n]
    res = evaluate(model, tokenizer, task, examples, k=args.k, max_new_tokens=args.max_new_tokens)
    hinted = evaluate(model, tokenizer, task, examples, k=0, max_new_tokens=args.max_new_tokens, hint=True)
    print(f"{path}: n={res.n} greedy accuracy {res.accuracy:.3f}  mean@{args.k} {res.mean_at_k:.3f}"
          f"  (with the privileged hint: {hinted.accuracy:.3f})")
