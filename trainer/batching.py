"""From examples and rollouts to the tensors the objectives need.

Two facts shape everything here:

- Randomness is *stateless*: the prompts of step k and the sampling noise of each
  prompt's group are functions of ``(seed, step, prompt index)`` alone. A resumed
  run, a run split over several processes and an uninterrupted single-process run
  therefore see exactly the same prompts and draw exactly the same responses.
  Dynamic sampling's replacement prompts follow the same rule
  (:func:`replacement_stream`: a function of ``(seed, step, round, slot)``).
- Rollouts are left-padded prompts followed by right-padded responses, so every
  response token sits in the same columns ``P .. P+R-1`` of every row. The position
  that *predicts* response token j is column ``P-1+j``: those are the "scored"
  positions whose logits, hidden states and attention rows the losses use.
"""

from __future__ import annotations

import hashlib
import random
from typing import Sequence

import torch
from torch import Tensor

from trainer.tasks.base import Example


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from its parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class PromptStream:
    """Training prompts in a seeded order, epoch after epoch; position = a plain integer.

    ``take(position, n)`` is a pure function of (seed, position, n), so resuming needs
    only the position, and every process computes the same global order.
    """

    def __init__(self, examples: Sequence[Example], seed: int):
        if not examples:
            raise ValueError("no training examples")
        self.examples = list(examples)
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.examples)))
            random.Random(derive_seed(self.seed, "epoch", epoch)).shuffle(order)
            self._orders = {epoch: order}  # keep one epoch in memory
        return self._orders[epoch]

    def take(self, position: int, n: int) -> list[tuple[int, Example]]:
        """``n`` (global index, example) pairs starting at ``position``."""
        out = []
        size = len(self.examples)
        for p in range(position, position + n):
            epoch, i = divmod(p, size)
            out.append((p, self.examples[self._order(epoch)[i]]))
        return out


def replacement_stream(examples: Sequence[Example], seed: int, step: int) -> tuple[PromptStream, int]:
    """Dynamic sampling's replacement prompts for ``step``, and the seed of their noise.

    Each step gets its own seeded order of the training examples, so replacements
    are a pure function of ``(seed, step, position)`` and never depend on the run
    length or on how many resampling rounds an earlier step needed. The noise seed
    differs from the run seed, so a replacement group never reuses the sampling
    noise of a regular group with the same position.

    Returns:
        ``(stream, noise_seed)``: take replacement groups with
        ``stream.take(position, n)`` and sample them with
        ``group_noise(noise_seed, positions, ...)``.
    """
    noise_seed = derive_seed(seed, "replacements", step)
    return PromptStream(examples, noise_seed), noise_seed


def group_noise(seed: int, prompt_indices: Sequence[int], group_size: int, length: int) -> Tensor:
    """Uniform sampling noise ``(len(prompt_indices) * group_size, length)``, one seeded
    generator per prompt, so a group's responses do not depend on batch or process."""
    rows = []
    for p in prompt_indices:
        g = torch.Generator().manual_seed(derive_seed(seed, "rollout", p))
        rows.append(torch.rand(group_size, length, generator=g, dtype=torch.float64))
    return torch.cat(rows).float() if rows else torch.empty(0, length)


def scored_positions(response_mask: Tensor, prompt_width: int) -> Tensor:
    """``(B, P + R)`` bool: column ``P-1+j`` is scored when response token j is real.

    The last column (which would predict a token after the response) is never scored.
    """
    b, r = response_mask.shape
    scored = torch.zeros(b, prompt_width + r, dtype=torch.bool, device=response_mask.device)
    scored[:, prompt_width - 1 : prompt_width - 1 + r] = response_mask.bool()
    return scored


def to_grid(values: Tensor, response_mask: Tensor) -> Tensor:
    """Scatter per-scored-token values ``(n,)`` back to ``(B, R)`` (zeros elsewhere).

    Scored positions are enumerated row-major, exactly as response tokens are.
    """
    grid = values.new_zeros(response_mask.shape)
    grid[response_mask.bool()] = values
    return grid


def teacher_prompts(tokenizer, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """The distinct teacher prompts (with the privileged hint) of a batch, left-padded.

    A group's G responses share one teacher prompt, so each run of equal consecutive
    prompts is tokenised (and later scored) once; the teacher then scores the
    *student's* response tokens after it (docs/objectives.md, SDPG): only the prompt differs
    from the student's, by the sentinel and the hint.

    Returns:
        ``(ids (U, W), mask (U, W), prompt_of_row (B,))``: ``prompt_of_row[i]`` is the
        row of ``ids`` that holds ``prompts[i]``.
    """
    if not prompts:
        raise ValueError("teacher_prompts needs at least one prompt")
    firsts = [k for k in range(len(prompts)) if k == 0 or prompts[k] != prompts[k - 1]]
    prompt_of_row = torch.zeros(len(prompts), dtype=torch.long)
    for u, k in enumerate(firsts):
        prompt_of_row[k:] = u
    ids = [tokenizer(prompts[k], add_special_tokens=True)["input_ids"] for k in firsts]
    width = max(len(x) for x in ids)
    prompt = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for u, x in enumerate(ids):
        prompt[u, width - len(x) :] = torch.tensor(x)
        mask[u, width - len(x) :] = 1
    return prompt, mask, prompt_of_row
