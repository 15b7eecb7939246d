"""The policy forward pass: one pass, only the pieces the objectives need.

The OISD loss (docs/objectives.md) needs, from the *same* forward pass that scores the
policy: the final layer's logits, the residual stream of a few intermediate
blocks, and the attention probabilities of those blocks and of the final block,
all at the *scored positions* (positions ``t`` whose next token is a response
token) and all with gradient. :func:`policy_forward` produces exactly that and
nothing more:

- logits: the base model runs once, the final hidden state is gathered at the
  scored positions and only then multiplied by ``lm_head``, so no ``(B, T, V)``
  tensor is ever built; with ``return_logits=False`` not even the ``(n, V)`` logits
  are: the training loss reads them out chunk by chunk from ``final_hidden``;
- hidden states: forward hooks on the decoder blocks gather block outputs at the
  scored positions (``(n, d)`` per layer, not ``(B, T, d)``);
- attention probabilities: fused kernels (SDPA, flash) never materialise them, and
  ``output_attentions=True`` would force eager attention in every layer. Instead
  :func:`enable_selective_attention` registers one attention function,
  ``"oisd_selective"``, with transformers' ``AttentionInterface``. Every layer
  still computes its output with SDPA; the layers asked for additionally compute
  ``softmax(Q K^T * scale + mask)`` for the captured query rows only (``(m, H, K)``
  instead of eager's ``(B, H, T, K)``). Because those rows are a differentiable
  function of the same ``Q`` and ``K`` that SDPA used, gradients of a loss on
  them reach the layer's query/key projections exactly as in eager attention.

Layer numbering follows docs/metrics.md: layer ``l`` (1-based) is the output of block
``l``, i.e. HF ``hidden_states[l]``, *before* the final norm. HF's
``hidden_states[L]`` is already normed; here ``hidden[L]`` is not, so that
``readout(model)(hidden[L], L) == logits`` like every other layer's logit lens.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from workbench.errors import ConfigError, DataError
from workbench.models.generation import position_ids_from_mask
from workbench.models.readout import LogitLens
from workbench.models.structure import decoder_blocks, decoder_stack

__all__ = [
    "SELECTIVE_ATTENTION",
    "PolicyForward",
    "enable_selective_attention",
    "num_layers",
    "policy_forward",
    "readout",
]

#: Name under which the selective attention function is registered.
SELECTIVE_ATTENTION = "oisd_selective"



@dataclass
class PolicyForward:
    """What one policy forward pass returns, all at the scored positions.

    ``n`` = number of scored positions, ``m`` = number of captured attention rows
    (``n`` unless ``attn_query_stride > 1``), ``H`` = query heads, ``K`` = sequence
    length ``T``.

    Attributes:
        logits: ``(n, V)`` final-layer logits, in the model's dtype (``None`` with
            ``return_logits=False``).
        final_hidden: ``(n, d)`` the final-normed last hidden state, so that
            ``logits == lm_head(final_hidden)``.
        hidden: layer ``l`` -> ``(n, d)`` output of block ``l`` (before the final norm).
        attentions: layer ``l`` -> ``(m, H, K)`` float32 attention probabilities of
            the captured query rows over all key positions; keys after the query
            and padding keys are exactly 0, each row sums to 1. Pre-dropout
            probabilities (a distribution) even when attention dropout is on.
        index: ``(batch_idx, pos_idx)``, each ``(n,)`` int64, of the scored
            positions in row-major order; row ``i`` of ``logits``/``hidden`` is
            position ``(batch_idx[i], pos_idx[i])``.
        attn_rows: ``(m,)`` int64 rows of ``logits``/``hidden``/``index`` that the
            attention rows correspond to (``arange(n)`` with stride 1). ``None``
            only for instances built by hand, meaning "every scored row".
    """

    logits: Tensor | None
    hidden: dict[int, Tensor]
    attentions: dict[int, Tensor]
    index: tuple[Tensor, Tensor]
    attn_rows: Tensor | None = field(default=None)
    final_hidden: Tensor | None = field(default=None)


# ---------------------------------------------------------------------------
# Finding the pieces of an HF causal LM
# ---------------------------------------------------------------------------


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks ``L`` of a causal LM (layers are numbered 1..L)."""
    return len(decoder_blocks(model))


def readout(model: nn.Module, detach: bool = False) -> LogitLens:
    """The model's logit lens ``lens(h, layer) = lm_head(final_norm(h))``, the read-out OISD's
    L_think aligns (:class:`workbench.models.readout.LogitLens`, the one the probes read through).

    Applied to the pre-norm output of the last block it reproduces the model's
    logits exactly; applied to an earlier block it is the logit lens of docs/metrics.md.

    Args:
        model: an HF causal LM (Llama/Qwen3 ``model.norm`` + ``lm_head``, GPT-2
            ``transformer.ln_f`` + ``lm_head``, ...).
        detach: use detached copies of the norm and ``lm_head`` parameters (OISD
            ``detach_readout``): gradients still flow into ``h`` but never reach
            the acting head's weights.

    Returns:
        A :class:`~workbench.models.readout.LogitLens`: ``(..., d)`` hidden states to ``(..., V)`` logits.
    """
    lens = LogitLens.of_model(model)  # the one lookup, shared with the built-in probes
    if not detach:
        return lens
    norm, head = lens.norm, lens.head

    norm_params, head_params = dict(norm.named_parameters()), dict(head.named_parameters())
    if any(hasattr(p, "ds_id") for p in (*norm_params.values(), *head_params.values())):
        # DeepSpeed ZeRO-3: the parameters are 0-element shards outside their module's
        # forward. Gather them once (every process builds the readout at the same point
        # of its forward) and keep detached copies: the gathered storage is freed on exit.
        from trainer.distributed import full_parameters

        with torch.no_grad(), full_parameters([*norm_params.values(), *head_params.values()]):
            norm_params = {name: p.detach().clone() for name, p in norm_params.items()}
            head_params = {name: p.detach().clone() for name, p in head_params.items()}

    # functional_call runs the modules' own forward with substituted parameters, so the
    # detached read-out is the same computation (bias, eps, weight offsets...) without a
    # path to the real weights.
    return LogitLens(
        lambda h: torch.func.functional_call(norm, {n: p.detach() for n, p in norm_params.items()}, (h,)),
        lambda h: torch.func.functional_call(head, {n: p.detach() for n, p in head_params.items()}, (h,)),
    )


# ---------------------------------------------------------------------------
# Selective attention: SDPA everywhere, explicit probabilities where asked
# ---------------------------------------------------------------------------


@dataclass
class _AttentionCapture:
    """Which layers and query rows to capture during one forward pass.

    The captured rows are laid out per sequence, padded to ``C`` slots, so that
    the score matmul is one batched ``(B, H, C, d) @ (B, H, d, K)``.

    Attributes:
        layers: 0-based ``layer_idx`` of the attention modules to capture.
        slot_positions: ``(B, C)`` query position held in each slot (0 in unused slots).
        rows: ``(batch_idx, slot_idx)``, each ``(m,)``, of the captured rows.
        store: filled during the forward: ``layer_idx`` -> ``(m, H, K)`` float32.
    """

    layers: frozenset[int]
    slot_positions: Tensor
    rows: tuple[Tensor, Tensor]
    store: dict[int, Tensor] = field(default_factory=dict)


_ACTIVE_CAPTURE: contextvars.ContextVar[_AttentionCapture | None] = contextvars.ContextVar(
    "oisd_attention_capture", default=None
)


def _attention_rows(
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None,
    capture: _AttentionCapture,
) -> Tensor:
    """Attention probabilities of the captured query rows, as eager attention computes them.

    Args:
        query: ``(B, H, T, d)`` queries after RoPE.
        key: ``(B, H_kv, K, d)`` keys after RoPE.
        attention_mask: ``(B or 1, 1, T, K)`` boolean (True = attend) or additive
            float mask, or ``None`` for a plain causal mask (no padding).
        scaling: score scale; ``None`` means ``d ** -0.5`` as in SDPA.
        capture: the rows to compute.

    Returns:
        ``(m, H, K)`` float32 probabilities.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    slot_positions = capture.slot_positions  # (B, C)
    slots = slot_positions.shape[1]
    scale = head_dim**-0.5 if scaling is None else scaling

    q_rows = query.gather(2, slot_positions[:, None, :, None].expand(batch, heads, slots, head_dim))
    # GQA without repeat_kv: query head h reads key head h // groups, which is
    # exactly the head order repeat_kv produces.
    groups = heads // kv_heads
    q_grouped = q_rows.view(batch, kv_heads, groups, slots, head_dim)
    scores = q_grouped @ key[:, :, None].transpose(-1, -2)  # (B, H_kv, groups, C, K)
    scores = scores.reshape(batch, heads, slots, kv_len).float() * scale  # (B, H, C, K)

    min_value = torch.finfo(scores.dtype).min
    if attention_mask is None:
        # SDPA's is_causal path: no padding, key j visible to query i iff j <= i.
        keys = torch.arange(kv_len, device=query.device)
        allowed = keys[None, None, None, :] <= slot_positions[:, None, :, None]  # (B, 1, C, K)
        scores = scores.masked_fill(~allowed, min_value)
    else:
        mask = attention_mask.expand(batch, -1, -1, -1)
        row_index = slot_positions[:, None, :, None].expand(batch, mask.shape[1], slots, kv_len)
        mask_rows = mask.gather(2, row_index)  # (B, 1, C, K)
        if mask_rows.dtype == torch.bool:
            # Same as eager's additive mask of finfo.min: masked keys get exactly 0.
            scores = scores.masked_fill(~mask_rows, min_value)
        else:
            scores = scores + mask_rows.float()
    probs = torch.softmax(scores, dim=-1)  # (B, H, C, K)
    batch_idx, slot_idx = capture.rows
    return probs[batch_idx, :, slot_idx]  # (m, H, K)


def selective_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention function registered as ``"oisd_selective"``.

    The output is always SDPA's. When a capture is active (inside
    :func:`policy_forward`) and this module's ``layer_idx`` is one of the requested
    layers, the attention probabilities of the captured query rows are also
    computed (float32 softmax, as eager) and stored with their autograd graph.
    Outside :func:`policy_forward` this is plain SDPA in every layer.

    Returns:
        ``(attn_output (B, T, H, d), None)`` exactly like ``sdpa_attention_forward``.
    """
    output, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    capture = _ACTIVE_CAPTURE.get()
    layer_idx = getattr(module, "layer_idx", None)
    if (
        capture is not None
        and layer_idx in capture.layers
        and not getattr(module, "is_cross_attention", False)
    ):
        capture.store[layer_idx] = _attention_rows(query, key, attention_mask, scaling, capture)
    return output, None


def enable_selective_attention(model: nn.Module) -> None:
    """Switch ``model`` to the ``"oisd_selective"`` attention implementation (idempotent).

    Registers the attention function and its mask (SDPA's boolean mask, or none
    when SDPA's causal kernel applies) with transformers, then sets the model's
    implementation. Afterwards every layer runs SDPA, in :func:`policy_forward`
    and in generation alike, except that requested layers also return their
    attention rows inside :func:`policy_forward`.

    Args:
        model: an HF causal LM whose attention goes through ``AttentionInterface``.
    """
    if SELECTIVE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention_forward)
        ALL_MASK_ATTENTION_FUNCTIONS.register(SELECTIVE_ATTENTION, sdpa_mask)
    if model.config._attn_implementation == SELECTIVE_ATTENTION:
        return
    # Private heuristic of transformers (source inspection); absent in some versions.
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise ConfigError(
            f"{type(model).__name__} does not use transformers' AttentionInterface, "
            "so its attention probabilities cannot be captured selectively"
        )
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(SELECTIVE_ATTENTION)
    else:
        model.config._attn_implementation = SELECTIVE_ATTENTION


# ---------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------


def _check_layers(layers: Iterable[int], total: int, what: str) -> tuple[int, ...]:
    layers = tuple(sorted({int(layer) for layer in layers}))
    bad = [layer for layer in layers if not 1 <= layer <= total]
    if bad:
        raise ConfigError(f"{what} {bad} out of range: layers are numbered 1..{total}")
    return layers


def _strided_rows(batch_idx: Tensor, stride: int) -> Tensor:
    """Rows (into the scored rows) kept by ``attn_query_stride``.

    Keeps the 1st, (1+stride)-th, ... scored position of every sequence.

    Args:
        batch_idx: ``(n,)`` sorted batch index of each scored row.
        stride: keep every ``stride``-th scored query of each sequence.

    Returns:
        ``(m,)`` int64 indices into the ``n`` scored rows.
    """
    rank = _rank_within_batch(batch_idx)
    return torch.nonzero(rank % stride == 0).squeeze(-1)


def _rank_within_batch(batch_idx: Tensor) -> Tensor:
    """``(n,)`` position of each row among the rows of its sequence (rows sorted by batch)."""
    n = batch_idx.numel()
    if n == 0:
        return batch_idx.clone()
    arange = torch.arange(n, device=batch_idx.device)
    starts = torch.ones_like(batch_idx, dtype=torch.bool)
    starts[1:] = batch_idx[1:] != batch_idx[:-1]
    # Index of the first row of each row's sequence, carried forward.
    first = torch.cummax(torch.where(starts, arange, torch.zeros_like(arange)), dim=0).values
    return arange - first


def policy_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    scored: Tensor,
    *,
    hidden_layers: Iterable[int] = (),
    attn_layers: Iterable[int] = (),
    position_ids: Tensor | None = None,
    attn_query_stride: int = 1,
    return_logits: bool = True,
) -> PolicyForward:
    """One forward pass returning logits, hidden states and attention at scored positions.

    Args:
        model: an HF causal LM. If ``attn_layers`` is non-empty it is switched to
            the ``"oisd_selective"`` attention implementation (see
            :func:`enable_selective_attention`) on first use.
        input_ids: ``(B, T)`` token ids, prompts left-padded.
        attention_mask: ``(B, T)`` 1 on real tokens, 0 on padding.
        scored: ``(B, T)`` bool, True at positions ``t`` whose next token is a
            response token (the positions whose next-token distribution is scored).
        hidden_layers: layers ``l`` (1..L) whose block outputs to return.
        attn_layers: layers ``l`` (1..L) whose attention probabilities to return.
        position_ids: ``(B, T)``; default ``cumsum(attention_mask) - 1`` clamped at
            0, the positions the rollouts used.
        attn_query_stride: capture attention only for every ``k``-th scored query
            of each sequence (cheaper on long responses); rows are listed in
            :attr:`PolicyForward.attn_rows`.
        return_logits: also apply ``lm_head`` (``(n, V)``); ``False`` leaves only
            :attr:`PolicyForward.final_hidden`, for callers that read out in chunks.

    Returns:
        A :class:`PolicyForward` with ``n = scored.sum()`` rows.

    Raises:
        DataError: if the input shapes disagree or a scored position is padding.
        ConfigError: if a layer is out of range, the stride is < 1, or attention
            is requested on a model with activation checkpointing.
    """
    shapes_agree = attention_mask.shape == input_ids.shape == scored.shape
    if input_ids.dim() != 2 or not shapes_agree:
        raise DataError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} "
            f"and scored {tuple(scored.shape)} must all be the same (B, T)"
        )
    scored = scored.bool()
    if bool((scored & (attention_mask == 0)).any()):
        raise DataError("scored positions include padding (attention_mask == 0)")
    if attn_query_stride < 1:
        raise ConfigError(f"attn_query_stride must be >= 1, got {attn_query_stride}")
    total = num_layers(model)
    hidden_layers = _check_layers(hidden_layers, total, "hidden_layers")
    attn_layers = _check_layers(attn_layers, total, "attn_layers")
    if attn_layers:
        if any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
            # The recomputation in backward would run outside the capture and
            # not rebuild the attention rows' graph.
            raise ConfigError(
                "attention capture (oisd attn_layers) does not support gradient checkpointing"
            )
        enable_selective_attention(model)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)

    batch_idx, pos_idx = torch.nonzero(scored, as_tuple=True)  # row-major, (n,) each

    # Block outputs, gathered at the scored positions as soon as they exist so
    # that only (n, d) per layer is kept beyond what backward needs anyway.
    hidden: dict[int, Tensor] = {}
    blocks = decoder_blocks(model)

    def make_hook(layer: int):
        def hook(_module, _args, output):
            states = output[0] if isinstance(output, tuple) else output
            hidden[layer] = states[batch_idx, pos_idx]

        return hook

    handles = [blocks[layer - 1].register_forward_hook(make_hook(layer)) for layer in hidden_layers]

    attn_rows = _strided_rows(batch_idx, attn_query_stride)
    capture = None
    if attn_layers:
        rows_b = batch_idx[attn_rows]
        rows_slot = _rank_within_batch(rows_b)
        slots = int(rows_slot.max()) + 1 if rows_slot.numel() else 0
        slot_positions = torch.zeros(  # (B, C); unused slots read position 0, never returned
            input_ids.shape[0], slots, dtype=torch.long, device=input_ids.device
        )
        slot_positions[rows_b, rows_slot] = pos_idx[attn_rows]
        capture = _AttentionCapture(
            layers=frozenset(layer - 1 for layer in attn_layers),
            slot_positions=slot_positions,
            rows=(rows_b, rows_slot),
        )
    token = _ACTIVE_CAPTURE.set(capture)
    try:
        outputs = decoder_stack(model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    finally:
        _ACTIVE_CAPTURE.reset(token)
        for handle in handles:
            handle.remove()

    # last_hidden_state is already final-normed: only lm_head remains.
    final = outputs.last_hidden_state[batch_idx, pos_idx]  # (n, d)
    logits = model.get_output_embeddings()(final) if return_logits else None  # (n, V)
    attentions: dict[int, Tensor] = {}
    if capture is not None:
        missing = [layer for layer in attn_layers if layer - 1 not in capture.store]
        if missing:
            raise ConfigError(
                f"attention of layers {missing} was not captured: their modules lack layer_idx"
            )
        attentions = {layer: capture.store[layer - 1] for layer in attn_layers}
    return PolicyForward(
        logits=logits,
        hidden=hidden,
        attentions=attentions,
        index=(batch_idx, pos_idx),
        attn_rows=attn_rows,
        final_hidden=final,
    )


# ---------------------------------------------------------------------------
# Frozen scoring with shared prompts: teachers and references
# ---------------------------------------------------------------------------


def unique_prompts(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct runs of equal consecutive prompt rows (a group's G responses share one).

    Args:
        prompt_ids: ``(B, W)`` left-padded prompt ids.
        prompt_mask: ``(B, W)`` 1 on real prompt tokens.

    Returns:
        ``(ids (U, W), mask (U, W), prompt_of_row (B,))`` with ``ids[prompt_of_row] == prompt_ids``.
    """
    rows = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)  # (B, 2W)
    unique, prompt_of_row = torch.unique_consecutive(rows, dim=0, return_inverse=True)
    width = prompt_ids.shape[1]
    return unique[:, :width], unique[:, width:].to(prompt_mask.dtype), prompt_of_row


@torch.no_grad()
def shared_prompt_hidden(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompt_of_row: Tensor,
    responses: Tensor,
    response_mask: Tensor,
) -> Tensor:
    """A frozen model's final hidden states at the response tokens, each prompt run once.

    The teachers and references of SDPG, RLSD and OPSD score the G responses of a group
    after one and the same prompt (the hinted teacher prompt, or the student's own), so
    the prompt is prefilled once per group into a KV cache, the cache rows are repeated
    to the group's responses, and only the responses run on top of it: ``U * W + B * R``
    token positions instead of ``B * (W + R)``. The rows returned are those
    :func:`policy_forward` returns for the same sequences (``(prompt, response)``
    concatenated, scored where the next token is a response token), equal to float
    tolerance (tested).

    Args:
        model: an HF causal LM (no gradient is taken).
        prompt_ids: ``(U, W)`` distinct left-padded prompts.
        prompt_mask: ``(U, W)`` 1 on real prompt tokens.
        prompt_of_row: ``(B,)`` the prompt of each response.
        responses: ``(B, R)`` response tokens (padding after EOS).
        response_mask: ``(B, R)`` 1 on real response tokens.

    Returns:
        ``(n, d)`` final-normed hidden states, ``n = response_mask.sum()``, row-major:
        row ``(i, j)`` is the state that predicts response token ``j`` of row ``i``.
    """
    from transformers import DynamicCache

    decoder = decoder_stack(model)
    prompt_positions = position_ids_from_mask(prompt_mask)  # (U, W)
    cache = DynamicCache(config=model.config)
    prefill = decoder(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=prompt_positions,
                      past_key_values=cache, use_cache=True)
    cache.batch_select_indices(prompt_of_row)  # (U, ...) -> (B, ...): each response its prompt's rows
    r = responses.shape[1]
    positions = prompt_positions[prompt_of_row, -1:] + 1 + torch.arange(r, device=responses.device)  # (B, R)
    mask = torch.cat([prompt_mask[prompt_of_row], response_mask.to(prompt_mask.dtype)], dim=1)  # (B, W + R)
    out = decoder(input_ids=responses, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True)
    last_prompt = prefill.last_hidden_state[prompt_of_row, -1:]  # (B, 1, d) predicts response token 0
    grid = torch.cat([last_prompt, out.last_hidden_state[:, :-1]], dim=1)  # (B, R, d): [i, j] predicts token j
    return grid[response_mask.bool()]
