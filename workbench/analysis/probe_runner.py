"""The probe runner: probe plumbing shared by the trainer's built-in probes and the analyzer
(the metrics themselves are :mod:`workbench.measures.probing`).

The metric set of docs/metrics.md from HF internals: the trainer calls
:func:`run_builtin_probes` every ``probe_every`` steps on a fixed probe set
(:func:`make_probe_set`, written once to ``probe_set.jsonl``), after sampling the
outcome-conditioned completions (:func:`sample_probe_completions`). One
forward pass with ``output_hidden_states`` and ``output_attentions`` fills a
:class:`workbench.measures.probing.ProbeInputs`; the metrics themselves come from
:func:`workbench.measures.probing.compute_probe_metrics`, the same code the
TransformerLens analyzer (``workbench.analysis.analyzer``) uses, so the two agree to float
precision on the same checkpoint. The analyzer builds its batches with
:func:`probe_splits` and :func:`probe_batch` from here: one construction for both.

Layout of one probe sequence (P prompt tokens incl. BOS, R response tokens incl.
EOS), left-padded to the batch width T::

    [pad ... pad | prompt (P) | response (R)]

Position t predicts token t + 1, so the scored positions (those predicting a
response token) are ``P-1 .. P+R-2`` in unpadded coordinates. Position ids are
``cumsum(attention_mask) - 1`` clamped at 0, as in the rollouts, so a probe
position sees exactly what it saw while sampling.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn

from workbench.errors import CheckpointError, ConfigError, DataError
from workbench.measures.probing import ProbeInputs, compute_probe_metrics
from workbench.models.generation import position_ids_from_mask, sample
from workbench.models.readout import LogitLens
from workbench.storage.schema import (
    DEFAULT_PROBE_MAX_NEW_TOKENS,
    METRIC_COLUMNS,
    N_SAMPLES,
    OUTCOME_SPLITS,
    SAMPLE_COLUMNS,
)

__all__ = [
    "make_probe_set",
    "probe_batch",
    "eager_attention",
    "hf_probe_inputs",
    "greedy_responses",
    "run_builtin_probes",
    "sample_probe_completions",
    "probe_splits",
    "special_ids",
]

def make_probe_set(examples: Sequence, tokenizer, n: int) -> list[dict]:
    """The fixed probe set: the first ``n`` held-out examples, tokenised.

    Deterministic in its inputs (no sampling), so every checkpoint and every run
    built from the same test split gets the same records, and the same
    ``probe_set_hash``.

    Args:
        examples: held-out examples with ``.prompt`` and ``.reference`` strings
            (``trainer.tasks.Example``).
        tokenizer: the run's HF tokenizer (must have an EOS token).
        n: number of probe prompts (>= 1, at most ``len(examples)``).

    Returns:
        ``n`` records ``{"index", "prompt", "reference", "prompt_ids", "reference_ids"}``:
        ``prompt_ids`` = ``tokenizer(prompt, add_special_tokens=True)`` (BOS included
        where the tokenizer adds one); ``reference_ids`` =
        ``tokenizer(reference, add_special_tokens=False)`` followed by EOS.

    Raises:
        ConfigError: ``n`` < 1 or more than the examples available.
        DataError: the tokenizer has no EOS token, or a prompt encodes to nothing.
    """
    if n < 1:
        raise ConfigError(f"probe set size must be >= 1, got {n}")
    if n > len(examples):
        raise ConfigError(f"probe set size {n} exceeds the {len(examples)} held-out examples")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; probe references need one")
    records = []
    for index, example in enumerate(examples[:n]):
        prompt_ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
        if not prompt_ids:
            raise DataError(f"probe prompt {index} encodes to no tokens")
        reference_ids = list(tokenizer(example.reference, add_special_tokens=False)["input_ids"])
        records.append(
            {
                "index": index,
                "prompt": example.prompt,
                "reference": example.reference,
                "prompt_ids": prompt_ids,
                "reference_ids": reference_ids + [int(eos)],
            }
        )
    return records


def record_prompt_ids(tokenizer, record: dict) -> list[int]:
    """The token ids of a probe record's prompt under ``tokenizer``, as the probe set made them:
    the tokenizer's chat template when the record says so, else ``tokenizer(prompt)`` with
    special tokens (BOS where the tokenizer adds one)."""
    if record.get("chat_template"):
        text = tokenizer.apply_chat_template([{"role": "user", "content": record["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(record["prompt"], add_special_tokens=True)["input_ids"])


def prompt_records(items: Sequence[dict], tokenizer, *, chat_template: bool = False) -> list[dict]:
    """A probe set from free prompts (``oisd probe --prompts FILE``): ``{"prompt", "reference"?}``.

    Prompts are tokenised with :func:`record_prompt_ids`; a reference, where given, becomes
    that prompt's ``reference_ids`` (its tokens and EOS) and is teacher-forced in the
    ``reference`` split. A prompt without one (absent, None or empty) has ``reference`` and
    ``reference_ids`` None: the ``reference`` split holds the prompts that have one
    (:func:`probe_splits`), the ``greedy`` split (the model's own completions) all of them.

    Raises:
        DataError: no prompts, an empty prompt, a chat template the tokenizer does not have.
    """
    if not items:
        raise DataError("the prompts file holds no prompts")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; probe references need one")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError("--chat-template: the tokenizer has no chat template")
    records = []
    for index, item in enumerate(items):
        reference = item.get("reference") or None
        record = {"index": index, "prompt": item["prompt"], "reference": reference,
                  "chat_template": bool(chat_template)}
        record["prompt_ids"] = record_prompt_ids(tokenizer, record)
        if not record["prompt_ids"]:
            raise DataError(f"prompt {index + 1} encodes to no tokens")
        record["reference_ids"] = (list(tokenizer(reference, add_special_tokens=False)["input_ids"])
                                   + [int(eos)]) if reference is not None else None
        records.append(record)
    return records


def probe_batch(
    records: Sequence[dict], pad_id: int, responses: Sequence[Sequence[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded teacher-forced batch of probe sequences, with the scored positions.

    Args:
        records: probe records (:func:`make_probe_set`), each with ``prompt_ids`` and
            ``reference_ids``.
        pad_id: id written into the padding.
        responses: optional ``N`` response id lists that replace the references (the
            ``"greedy"`` split: the model's own completions).

    Returns:
        Dict of ``(N, T)`` tensors: ``input_ids`` (long), ``attention_mask`` (long, 1 on
        real tokens), ``position_ids`` (long, ``cumsum(mask) - 1`` clamped at 0),
        ``scored`` (bool, positions whose next token is a response token) and
        ``targets`` (long, the token at ``t + 1``; ``pad_id`` at the last position); and
        ``prompt_index`` ``(N,)``, each row's probe record ``index`` (its position in the
        probe set when the records have none).

    Raises:
        DataError: no records, a record with an empty prompt or response, or a
            ``responses`` list of the wrong length.
    """
    if len(records) == 0:
        raise DataError("the probe set is empty")
    if responses is not None and len(responses) != len(records):
        raise DataError(f"got {len(responses)} responses for {len(records)} probe prompts")
    sequences, prompt_lengths = [], []
    for i, record in enumerate(records):
        prompt = list(record["prompt_ids"])
        response = list(record["reference_ids"] if responses is None else responses[i])
        if not prompt or not response:
            raise DataError(f"probe record {i} has an empty prompt or response")
        sequences.append(prompt + response)
        prompt_lengths.append(len(prompt))
    width = max(len(s) for s in sequences)
    n = len(sequences)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    scored = torch.zeros((n, width), dtype=torch.bool)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        offset = width - len(seq)  # left padding
        input_ids[i, offset:] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, offset:] = 1
        # Unpadded t = P-1 .. P+R-2 predict the R response tokens.
        scored[i, offset + p - 1 : width - 1] = True
    targets = torch.cat([input_ids[:, 1:], torch.full((n, 1), pad_id, dtype=torch.long)], dim=1)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "scored": scored,
        "targets": targets,
        "prompt_index": torch.tensor([int(r.get("index", i)) for i, r in enumerate(records)], dtype=torch.long),
    }


@contextmanager
def eager_attention(model: nn.Module):
    """Run ``model`` with eager attention inside the block, restoring it after.

    Fused kernels (SDPA, flash) do not return attention probabilities; eager does.
    Switching is a runtime dispatch choice, the weights are untouched.
    """
    previous = getattr(model.config, "_attn_implementation", None)
    if previous == "eager" or previous is None:
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def hf_probe_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> ProbeInputs:
    """One HF forward over a probe batch, as :class:`ProbeInputs`.

    ``hidden`` is ``hidden_states[1..L-1]`` (block outputs before the final norm);
    ``hidden_states[L]`` is skipped because HF has already put it through the final
    norm (docs/metrics.md): layer L is the model's own logits. The forward runs with eager
    attention (switched temporarily) so that attention weights are returned.

    Args:
        model: an HF causal LM.
        batch: from :func:`probe_batch`.

    Returns:
        The inputs of :func:`workbench.measures.probing.compute_probe_metrics`, on the model's device.
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with eager_attention(model):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            output_hidden_states=True,
            output_attentions=True,
            use_cache=False,
        )
    hidden_states = out.hidden_states  # L + 1 tensors (N, T, d), index 0 = embeddings
    n_layers = len(hidden_states) - 1
    if out.attentions is None or any(a is None for a in out.attentions):
        raise CheckpointError(f"{type(model).__name__} returned no attention weights in eager mode")
    return ProbeInputs(
        hidden=list(hidden_states[1:n_layers]),
        final_logits=out.logits,
        lens=LogitLens.of_model(model),
        targets=batch["targets"],
        mask=batch["scored"],
        attentions=list(out.attentions),
        attention_mask=batch["attention_mask"].bool(),
        input_ids=batch["input_ids"],
    )


def greedy_responses(
    model: nn.Module, records: Sequence[dict], *, pad_id: int, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """The model's own greedy completions of the probe prompts (EOS kept when emitted).

    Uses :func:`workbench.models.generation.sample`, the rollout code of training, so the greedy
    split is what the policy would answer at temperature 0.
    """
    rollout = sample(
        model,
        [list(r["prompt_ids"]) for r in records],
        pad_id=pad_id,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        greedy=True,
    )
    responses = rollout.responses.cpu()
    lengths = rollout.lengths.cpu().tolist()
    return [responses[i, :n].tolist() for i, n in enumerate(lengths)]


def special_ids(tokenizer) -> tuple[int, int]:
    """``(pad_id, eos_id)`` of a tokenizer; pad falls back to EOS.

    Raises:
        DataError: the tokenizer has no EOS token (probe completions end with one).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; probes need one")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(pad), int(eos)


def derive_probe_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s sampled probe completions: fixed per (run seed, step),
    so a resumed run samples the same sequences at the same step."""
    digest = hashlib.sha256(f"probe-samples:{seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample_probe_completions(
    model: nn.Module,
    tokenizer,
    records: Sequence[dict],
    *,
    step: int,
    k: int,
    verify: Callable[[dict, list[int]], bool],
    seed: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = DEFAULT_PROBE_MAX_NEW_TOKENS,
) -> pd.DataFrame:
    """``k`` sampled completions per probe prompt, verified: the outcome-conditioned probe set.

    Sampled with the rollout sampler at ``temperature`` from noise seeded by
    :func:`derive_probe_seed` (so the draws do not depend on batch, device or process),
    in eval mode. Every completion is checked by ``verify(record, response_ids)``.

    Returns:
        ``workbench.storage.schema.SAMPLE_COLUMNS`` rows, prompt-major: ``step``, ``prompt``
        (the record's index), ``sample`` (0..k-1), ``response_ids`` (EOS kept when
        emitted), ``correct``.
    """
    if k < 1:
        raise ConfigError(f"samples per probe prompt must be >= 1, got {k}")
    pad_id, eos_id = special_ids(tokenizer)
    prompts = [list(r["prompt_ids"]) for r in records for _ in range(k)]
    generator = torch.Generator().manual_seed(derive_probe_seed(seed, step))
    noise = torch.rand(len(prompts), max_new_tokens, generator=generator, dtype=torch.float64).float()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = sample(model, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens,
                     temperature=temperature, noise=noise.to(device))
    finally:
        model.train(was_training)
    responses, lengths = out.responses.cpu(), out.lengths.cpu().tolist()
    rows = []
    for i, n in enumerate(lengths):
        record = records[i // k]
        ids = responses[i, :n].tolist()
        rows.append({"step": int(step), "prompt": int(record["index"]), "sample": i % k,
                     "response_ids": ids, "correct": bool(verify(record, ids))})
    return pd.DataFrame(rows, columns=SAMPLE_COLUMNS)


def probe_splits(
    records: Sequence[dict],
    *,
    greedy: Sequence[Sequence[int]] | None = None,
    samples: pd.DataFrame | None = None,
) -> list[tuple[str, list[dict], list[list[int]] | None]]:
    """The splits one probe point scores, as ``(split, records, responses)``.

    ``reference`` (responses None: the records' references) over the records that have
    one (free prompts may lack them; when none has one there is no reference split),
    ``greedy`` when given (every record),
    and, from ``samples`` (one step's :func:`sample_probe_completions` rows),
    ``sampled_correct`` and ``sampled_wrong``: each sampled sequence with its prompt's
    record. A split with no sequence is returned with empty lists (it gets only its
    ``n_samples`` row). The trainer's probes and the analyzer both build their batches
    from this, so they score the same sequences.
    """
    splits: list[tuple[str, list[dict], list[list[int]] | None]] = []
    with_reference = [r for r in records if r.get("reference_ids")]  # free prompts may lack references
    if with_reference:
        splits.append(("reference", with_reference, None))
    if greedy is not None:
        splits.append(("greedy", list(records), [list(r) for r in greedy]))
    if samples is not None:
        by_index = {int(r["index"]): r for r in records}
        for split, want in zip(OUTCOME_SPLITS, (True, False)):
            rows = samples[samples["correct"] == want].sort_values(["prompt", "sample"])
            unknown = set(rows["prompt"].astype(int)) - set(by_index)
            if unknown:
                raise DataError(f"sampled probe completions name prompt {min(unknown)}, which is not in the probe set")
            splits.append((split, [by_index[int(p)] for p in rows["prompt"]],
                           [list(map(int, ids)) for ids in rows["response_ids"]]))
    return splits


def n_samples_frame(run: str, step: int, split: str, n: int, source: str) -> pd.DataFrame:
    """The ``n_samples`` row of a split (layer 0, head -1): how many sequences it holds."""
    return pd.DataFrame([[run, step, 0, -1, -1, N_SAMPLES, float(n), split, source]], columns=METRIC_COLUMNS)


def split_batches(
    records: Sequence[dict], pad_id: int, *, run: str, step: int, source: str,
    greedy: Sequence[Sequence[int]] | None = None, samples: pd.DataFrame | None = None,
) -> Iterator[tuple[str, dict[str, torch.Tensor] | None, pd.DataFrame | None]]:
    """The one loop over a probe point's splits, for the built-in probes and the analyzer:
    ``(split, batch, count)`` per split of :func:`probe_splits`, where ``batch`` is its
    :func:`probe_batch` (None for an outcome split that holds no sequence) and ``count`` its
    ``n_samples`` row (:func:`n_samples_frame`; None for the reference and greedy splits)."""
    for split, split_records, responses in probe_splits(records, greedy=greedy, samples=samples):
        count = n_samples_frame(run, step, split, len(split_records), source) if split in OUTCOME_SPLITS else None
        batch = probe_batch(split_records, pad_id, responses) if split_records else None
        yield split, batch, count


@torch.no_grad()
def run_builtin_probes(
    model: nn.Module,
    tokenizer,
    records: Sequence[dict],
    *,
    run: str,
    step: int,
    greedy: bool = True,
    chunk_size: int | None = None,
    max_new_tokens: int = DEFAULT_PROBE_MAX_NEW_TOKENS,
    samples: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """The built-in probe table of one training step.

    Split ``"reference"``: teacher-forced reference completions. Split ``"greedy"``
    (when ``greedy``): the model's own greedy completions of the same prompts. Splits
    ``"sampled_correct"`` and ``"sampled_wrong"`` (when ``samples`` are given, from
    :func:`sample_probe_completions`): the sampled completions by outcome, with an
    ``n_samples`` row each. All are scored by :func:`workbench.measures.probing.compute_probe_metrics`
    (:func:`probe_splits` builds them). The whole call runs in eval mode with eager
    attention (greedy decoding included, so that the analyzer, which runs eager,
    decodes the same tokens); both are restored afterwards.

    Args:
        model: the HF causal LM (unwrapped from DDP/FSDP wrappers by the caller).
        tokenizer: its tokenizer (for the pad and EOS ids).
        records: the probe set (:func:`make_probe_set`).
        run: run name written in the table.
        step: training step written in the table.
        greedy: also probe the greedy completions.
        chunk_size: positions per logit-lens read-out chunk (bounds memory).
        max_new_tokens: longest greedy completion.
        samples: this step's sampled completions (``SAMPLE_COLUMNS``), or None.

    Returns:
        Rows with columns ``workbench.storage.schema.METRIC_COLUMNS``, ``source = "probe"``.
    """
    pad_id, eos_id = special_ids(tokenizer)
    was_training = model.training
    model.eval()
    frames = []
    try:
        with eager_attention(model):
            greedy_ids = None
            if greedy:
                greedy_ids = greedy_responses(
                    model, records, pad_id=pad_id, eos_id=eos_id, max_new_tokens=max_new_tokens
                )
            for split, batch, count in split_batches(records, pad_id, run=run, step=step, source="probe",
                                                     greedy=greedy_ids, samples=samples):
                frames += [count] if count is not None else []
                if batch is None:
                    continue
                inputs = hf_probe_inputs(model, batch)
                result = compute_probe_metrics(inputs, chunk_size=chunk_size)
                frames.append(result.to_frame(run, step, split, "probe"))
                del inputs
    finally:
        model.train(was_training)
    return pd.concat(frames, ignore_index=True)[METRIC_COLUMNS]
