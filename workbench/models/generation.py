"""Batched sampling from a causal LM with a KV cache: the rollouts of RL training.

Rollouts are sampled from the model's final layer (the acting policy). One
batched prefill runs over the left-padded prompts, then tokens are decoded one
step at a time through the model's ``transformers.DynamicCache``. The loop is
over decode steps only; every operation inside a step is batched.

Log-probabilities (``RolloutBatch.logprobs``) are taken under the *tempered,
untruncated* distribution ``softmax(logits / T)``, not under the top-k/top-p
truncated distribution the token was actually drawn from. This is the
convention of TRL and verl, which recompute the "old" log-probabilities of the
PPO/GRPO ratio with a plain forward pass over the rollout (logits / T, no
truncation); reporting the same quantity here means the ratio is exactly 1 at
the first optimiser step on a rollout.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from workbench.errors import ConfigError, DataError

__all__ = ["RolloutBatch", "check_max_new_tokens", "left_pad", "position_ids_from_mask", "sample"]


@dataclass
class RolloutBatch:
    """A batch of sampled responses with everything the objectives need.

    Layout of one row of ``input_ids`` (P = ``prompt_length``, R = response width)::

        [pad ... pad  prompt tokens | response tokens ... EOS  pad ... pad]
         <------------ P ----------> <------------------ R --------------->

    Attributes:
        input_ids: ``(B, P + R)`` left-padded prompts followed by the responses,
            right-padded with ``pad_id``.
        attention_mask: ``(B, P + R)`` 1 on real prompt and response tokens
            (including the EOS token), 0 on padding.
        response_mask: ``(B, R)`` 1 on response tokens (including EOS), 0 after.
        prompt_length: P, the padded prompt width.
        logprobs: ``(B, R)`` float32 log-probability of each sampled token under
            ``log_softmax(logits / temperature)`` before top-k/top-p truncation
            (see the module docstring); 0 where ``response_mask`` is 0.
        lengths: ``(B,)`` response lengths (number of response tokens incl. EOS).
        truncated: ``(B,)`` bool, True where the response hit ``max_new_tokens``
            without emitting EOS.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_length: int
    logprobs: Tensor
    lengths: Tensor
    truncated: Tensor

    @property
    def responses(self) -> Tensor:
        """``(B, R)`` the response token ids (pad after EOS)."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def position_ids(self) -> Tensor:
        """``(B, P + R)`` position ids for a full forward pass over ``input_ids``.

        ``cumsum(attention_mask) - 1`` clamped at 0, the same positions the
        tokens had while being sampled (padding gets position 0; it is masked).
        """
        return position_ids_from_mask(self.attention_mask)

    def select(self, rows: Tensor) -> "RolloutBatch":
        """The sub-batch of ``rows`` (same prompt and response widths)."""
        return RolloutBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            response_mask=self.response_mask[rows],
            prompt_length=self.prompt_length,
            logprobs=self.logprobs[rows],
            lengths=self.lengths[rows],
            truncated=self.truncated[rows],
        )


def concat_batches(batches: list["RolloutBatch"], pad_id: int) -> RolloutBatch:
    """Stack batches of possibly different prompt and response widths.

    Prompts are re-padded on the left to the widest prompt, responses on the right
    to the widest response, so the layout of :class:`RolloutBatch` still holds.
    """
    P = max(b.prompt_length for b in batches)
    R = max(b.response_mask.shape[1] for b in batches)

    def widen(b: RolloutBatch) -> RolloutBatch:
        dp, dr = P - b.prompt_length, R - b.response_mask.shape[1]
        pad = torch.nn.functional.pad
        return RolloutBatch(
            input_ids=pad(b.input_ids, (dp, dr), value=pad_id),
            attention_mask=pad(b.attention_mask, (dp, dr), value=0),
            response_mask=pad(b.response_mask, (0, dr), value=0),
            prompt_length=P,
            logprobs=pad(b.logprobs, (0, dr), value=0.0),
            lengths=b.lengths,
            truncated=b.truncated,
        )

    wide = [widen(b) for b in batches]
    return RolloutBatch(
        input_ids=torch.cat([b.input_ids for b in wide]),
        attention_mask=torch.cat([b.attention_mask for b in wide]),
        response_mask=torch.cat([b.response_mask for b in wide]),
        prompt_length=P,
        logprobs=torch.cat([b.logprobs for b in wide]),
        lengths=torch.cat([b.lengths for b in wide]),
        truncated=torch.cat([b.truncated for b in wide]),
    )


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids for left-padded sequences: ``cumsum(mask) - 1`` clamped at 0.

    Args:
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding.

    Returns:
        ``(B, T)`` int64 positions; the first real token of each row is 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def left_pad(
    prompt_ids: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists into a batch.

    Args:
        prompt_ids: B lists of token ids, each non-empty.
        pad_id: id written into the padding.
        device: where to put the tensors.

    Returns:
        ``(input_ids, attention_mask)``, both ``(B, P)`` int64 with P the longest prompt.

    Raises:
        DataError: if there are no prompts or a prompt is empty.
    """
    if len(prompt_ids) == 0:
        raise DataError("sample: no prompts given (prompt_ids is empty)")
    lengths = [len(p) for p in prompt_ids]
    if min(lengths) == 0:
        raise DataError(
            f"sample: prompt {lengths.index(0)} is empty; every prompt needs at least one token"
        )
    width = max(lengths)
    # Build on the host in one go (a Python loop over prompts is unavoidable when the
    # input is a list of lists) and copy to the device once.
    flat = [[pad_id] * (width - len(p)) + list(p) for p in prompt_ids]
    input_ids = torch.tensor(flat, dtype=torch.long)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    attention_mask = (torch.arange(width) >= (width - lengths_t)[:, None]).long()
    return input_ids.to(device), attention_mask.to(device)


def check_max_new_tokens(value: int | None, name: str = "max_new_tokens") -> None:
    """A completion length must be at least one token (None: the caller's default).

    Raises:
        ConfigError: ``"<name> must be >= 1, got <value>"``.
    """
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def _check_arguments(
    model: torch.nn.Module,
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
) -> None:
    """Raise a one-line ConfigError for out-of-range sampling arguments."""
    check_max_new_tokens(max_new_tokens, "sample: max_new_tokens")
    if not temperature > 0:
        raise ConfigError(f"sample: temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"sample: top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ConfigError(f"sample: top_k must be >= 0 (0 disables it), got {top_k}")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    for name, value in (("pad_id", pad_id), ("eos_id", eos_id)):
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            raise ConfigError(f"sample: {name}={value} is outside the vocabulary [0, {vocab_size})")


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (skip the LM head on the prompt)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _truncate_logits(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask tokens outside the top-k and the top-p nucleus with -inf.

    Args:
        scores: ``(B, V)`` tempered logits (``logits / T``); not modified.
        top_k: keep the k highest scores (0 = no top-k).
        top_p: keep the smallest set of highest-probability tokens whose mass is
            >= top_p (1.0 = no top-p). The top token is always kept.

    Returns:
        ``(B, V)`` scores with the removed tokens set to -inf.
    """
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, dim=-1, descending=True)  # (B, V)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Mass strictly before each token: a token is dropped once the tokens ranked
        # above it already reach top_p. The top token has mass-before 0 < top_p, so it stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove_sorted = mass_before >= top_p
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)  # back to vocab order
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> RolloutBatch:
    """Sample one response per prompt from a Hugging Face causal LM.

    One prefill over the left-padded prompts (position ids ``cumsum(mask) - 1``),
    then one forward per new token through a ``DynamicCache``, with the growing
    attention mask and the next position ids. Sampling order (as in
    ``model.generate``): temperature, then top-k, then top-p, then a draw from
    the renormalised distribution. A sequence that has emitted ``eos_id`` is
    padded with ``pad_id`` afterwards (masked out) and is dropped from the KV
    cache and from later forwards, so finished rows cost nothing (``generate``
    keeps computing them). Decoding stops as soon as every sequence has
    finished, so the response width R is the longest response, at most
    ``max_new_tokens``.

    The model is put in eval mode for the call (no dropout while acting) and
    restored to its previous mode afterwards. The returned tensors are ordinary
    tensors (not inference tensors), safe to feed to a training forward.

    Args:
        model: a causal LM whose forward takes ``input_ids``, ``attention_mask``,
            ``position_ids``, ``past_key_values`` and ``use_cache`` and returns
            ``.logits`` of shape ``(B, T, V)``.
        prompt_ids: B prompts as lists of token ids (different lengths allowed).
        pad_id: id of the padding token (left of prompts, right of responses).
        eos_id: id that ends a response; it is kept in the response.
        max_new_tokens: most tokens generated per prompt.
        temperature: logits are divided by it before sampling and before the
            log-probabilities are taken.
        top_p: nucleus sampling threshold in (0, 1]; 1 disables it.
        top_k: keep only the k most likely tokens; 0 disables it.
        greedy: take the argmax instead of sampling (temperature, top-k and top-p
            then do not change the tokens; logprobs are still under logits / T).
        noise: optional ``(B, max_new_tokens)`` uniform numbers in [0, 1); row i's
            token at step j is the inverse-CDF draw at ``noise[i, j]``. Used by the
            trainer so that a group's responses do not depend on which other rows
            share the batch (resume and multi-process runs then sample identically).
            Overrides ``generator``.
        generator: source of randomness for reproducible draws; must be on the
            model's device. None uses the global RNG.

    Returns:
        A :class:`RolloutBatch`; ``logprobs`` are under ``log_softmax(logits / T)``
        before truncation (see the module docstring for why).

    Raises:
        ConfigError: a sampling argument out of range.
        DataError: no prompts, or an empty prompt.
    """
    _check_arguments(
        model,
        pad_id=pad_id,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
    device = next(model.parameters()).device
    prompt_input_ids, prompt_mask = left_pad(prompt_ids, pad_id, device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            tensors = _decode(
                model,
                prompt_input_ids,
                prompt_mask,
                pad_id=pad_id,
                eos_id=eos_id,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                greedy=greedy,
                generator=generator,
                noise=noise,
            )
    finally:
        model.train(was_training)
    # Tensors made under inference_mode cannot be saved for backward (an embedding
    # lookup on them would fail in training); a clone outside the mode is ordinary.
    input_ids, attention_mask, response_mask, logprobs, lengths, truncated = (
        t.clone() for t in tensors
    )
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        prompt_length=prompt_input_ids.shape[1],
        logprobs=logprobs,
        lengths=lengths,
        truncated=truncated,
    )


def _decode(
    model: torch.nn.Module,
    prompt_input_ids: Tensor,
    prompt_mask: Tensor,
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    greedy: bool,
    generator: torch.Generator | None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The prefill + decode loop of :func:`sample` (runs under inference mode).

    A row that emits EOS is dropped from the KV cache and from every later
    forward (``Cache.batch_select_indices``), so finished responses cost nothing
    while the rest keep decoding; ``rows`` maps cache rows back to batch rows.
    """
    batch_size, prompt_length = prompt_input_ids.shape
    device = prompt_input_ids.device
    total = prompt_length + max_new_tokens

    # Preallocated outputs: each step writes one column, so the loop allocates
    # nothing for ids, masks or log-probabilities; cells never written (after EOS) stay pad / 0.
    input_ids = torch.full((batch_size, total), pad_id, dtype=torch.long, device=device)
    input_ids[:, :prompt_length] = prompt_input_ids
    logprobs = torch.zeros((batch_size, max_new_tokens), dtype=torch.float32, device=device)
    response_mask = torch.zeros((batch_size, max_new_tokens), dtype=torch.bool, device=device)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    # The attention mask the model sees: every row in the cache is still generating,
    # so all response columns are real; each step passes a growing view of it.
    model_mask = torch.ones((batch_size, total), dtype=torch.long, device=device)
    model_mask[:, :prompt_length] = prompt_mask

    prompt_positions = position_ids_from_mask(prompt_mask)  # (B, P)
    next_position = prompt_positions[:, -1:] + 1  # (B, 1)
    rows = torch.arange(batch_size, device=device)  # batch row of each cache row
    inverse_temperature = 1.0 / temperature
    truncating = (top_k > 0 or top_p < 1.0) and not greedy

    cache = DynamicCache(config=model.config)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    logits = model(
        input_ids=prompt_input_ids,
        attention_mask=prompt_mask,
        position_ids=prompt_positions,
        past_key_values=cache,
        use_cache=True,
        **extra,
    ).logits[:, -1, :]  # (n, V), n = rows still generating

    steps = 0
    for step in range(max_new_tokens):
        scores = logits.float() * inverse_temperature  # (n, V) logits / T
        step_logprobs = scores.log_softmax(dim=-1)  # untruncated, tempered
        if greedy:
            tokens = scores.argmax(dim=-1)  # (n,)
        else:
            if truncating:
                probs = _truncate_logits(scores, top_k, top_p).softmax(dim=-1)
            else:
                probs = step_logprobs.exp()
            if noise is not None:
                # Inverse-CDF draw with this row's own uniform number: the token a row
                # draws then depends only on its noise, not on the rest of the batch.
                cdf = probs.cumsum(dim=-1)  # (n, V)
                u = noise[rows, step].to(cdf.dtype)[:, None] * cdf[:, -1:]
                tokens = torch.searchsorted(cdf, u).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
            else:
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (n,)
        column = prompt_length + step
        input_ids[rows, column] = tokens
        response_mask[rows, step] = True
        logprobs[rows, step] = step_logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        done = tokens == eos_id  # (n,)
        steps = step + 1
        # One host sync per step (generate's stopping criteria need one too).
        n_done = int(done.sum())
        if n_done == len(rows) or steps == max_new_tokens:
            finished[rows[done]] = True
            break
        if n_done > 0:
            finished[rows[done]] = True
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tokens, next_position, model_mask = (
                rows[keep],
                tokens[keep],
                next_position[keep],
                model_mask[keep],
            )
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=model_mask[:, : column + 1],
            position_ids=next_position,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1, :]
        next_position += 1

    response_mask = response_mask[:, :steps]
    input_ids = input_ids[:, : prompt_length + steps]
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    lengths = response_mask.sum(dim=-1)
    return input_ids, attention_mask, response_mask.long(), logprobs[:, :steps], lengths, ~finished
