"""Early exit: can block l do the task? Decode greedily from blocks ``1..l`` read through the
model's own final norm and unembedding (the logit lens at l as the policy,
:func:`workbench.models.structure.exit_after`) and check the answers.

Per exit layer l, on the probe prompts (split ``greedy``, ``head = ref_layer = -1``):

- ``exit_accuracy``: share of prompts whose exit completion is correct (the task's verifier);
- ``exit_agree``: share of prompts whose exit answer equals the full model's greedy answer
  (both without an answer count as equal);
- ``exit_length``: mean completion length in tokens (EOS included when emitted).

Layer L is the full model (its ``exit_agree`` is 1). The trainer's built-in probes verify with
the task's reward; the analyzer, which has no task, with the probe record's ``answer`` or the
answer of its reference (:func:`reference_verifier`): on the embedded task both say the same
(tested). One greedy decode per exit layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from workbench.analysis.probe_runner import greedy_responses, special_ids
from workbench.errors import ConfigError
from workbench.measures.answers import answers_agree, final_answer, gold_answer
from workbench.models.structure import decoder_blocks, exit_after
from workbench.storage.schema import METRIC_COLUMNS

__all__ = ["EXIT_METRICS", "Verifier", "default_exit_layers", "exit_rows", "reference_verifier", "resolve_exit_layers"]

EXIT_METRICS = ("exit_accuracy", "exit_agree", "exit_length")
#: Models up to this depth exit at every layer by default.
EXIT_ALL_UP_TO = 8


@dataclass(frozen=True)
class Verifier:
    """How completions are checked: ``correct(record, text)`` against the prompt's gold, and
    ``answer(text)``, the final answer compared between an exit and the full model."""

    correct: Callable[[dict, str], bool]
    answer: Callable[[str], str | None]


def reference_verifier(check: str = "math") -> Verifier:
    """The analyzer's verifier: the probe record's gold answer (its ``answer``, else its
    reference's, :func:`workbench.measures.answers.gold_answer`) checked as ``check`` says (the
    run's ``answer_check``: what its task rewarded with)."""

    def correct(record: dict, text: str) -> bool:
        return answers_agree(text, gold_answer(record), check)

    return Verifier(correct=correct, answer=lambda text: final_answer(text, check))


def default_exit_layers(n_layers: int, oisd_layers: Sequence[int] = ()) -> list[int]:
    """Every layer of a model up to :data:`EXIT_ALL_UP_TO` blocks; deeper ones: the OISD layers,
    the quarter, half and three-quarter depths, and L."""
    if n_layers <= EXIT_ALL_UP_TO:
        return list(range(1, n_layers + 1))
    spread = {max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75)}
    return sorted({int(x) for x in oisd_layers if 1 <= int(x) <= n_layers} | spread | {n_layers})


def resolve_exit_layers(layers: Sequence[int | float] | None, n_layers: int,
                        oisd_layers: Sequence[int] = (), key: str = "--exit-layers") -> list[int]:
    """``--exit-layers`` / ``probe.exit_layers``: block indices ``1..L`` or depth fractions in
    (0, 1) (rounded, at least 1); None or empty: :func:`default_exit_layers`. L is always included
    (the full model every exit is compared with).

    Raises:
        ConfigError: a layer out of ``1..L`` or a fraction out of (0, 1).
    """
    if not layers:
        return default_exit_layers(n_layers, oisd_layers)
    out = set()
    for x in layers:
        if isinstance(x, float) and not float(x).is_integer():
            if not 0.0 < x < 1.0:
                raise ConfigError(f"{key}: {x} is neither a block 1..{n_layers} nor a depth fraction in (0, 1)")
            out.add(max(1, round(x * n_layers)))
        elif not 1 <= int(x) <= n_layers:
            raise ConfigError(f"{key}: {int(x)} is not one of the model's blocks 1..{n_layers}")
        else:
            out.add(int(x))
    return sorted(out | {n_layers})


@torch.no_grad()
def exit_rows(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    layers: Sequence[int],
    *,
    verify: Verifier,
    run: str,
    step: int,
    source: str,
    max_new_tokens: int,
    full: list[list[int]] | None = None,
) -> pd.DataFrame:
    """The early-exit metrics of one checkpoint (``METRIC_COLUMNS``, split ``greedy``).

    Args:
        model: the HF causal LM, eval mode, eager attention (as the probes decode).
        records: the probe set.
        layers: exit layers (1..L); L is the full model.
        verify: how completions are checked (:class:`Verifier`).
        full: the full model's greedy completions when the caller has them (the greedy split).
    """
    pad_id, eos_id = special_ids(tokenizer)
    n_layers = len(decoder_blocks(model))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    if full is None:
        full = greedy_responses(model, records, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens)
    full_answers = [verify.answer(decode(r)) for r in full]
    rows = []
    for layer in sorted(set(layers)):
        if layer == n_layers:
            responses = full
        else:
            with exit_after(model, layer):
                responses = greedy_responses(model, records, pad_id=pad_id, eos_id=eos_id,
                                             max_new_tokens=max_new_tokens)
        texts = [decode(r) for r in responses]
        correct = [verify.correct(record, text) for record, text in zip(records, texts)]
        agree = [verify.answer(text) == answer for text, answer in zip(texts, full_answers)]
        values = {"exit_accuracy": sum(correct) / len(records), "exit_agree": sum(agree) / len(records),
                  "exit_length": sum(len(r) for r in responses) / len(records)}
        rows += [(run, step, layer, -1, -1, name, float(values[name]), "greedy", source) for name in EXIT_METRICS]
    return pd.DataFrame(rows, columns=METRIC_COLUMNS)
