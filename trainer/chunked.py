"""The chunked full-vocabulary pass of the loss: every term that reads ``(n, V)`` logits is
computed row chunk by row chunk and recomputed in backward, so that no ``(n, V)`` tensor is
kept for backward (:func:`chunked_rows`). The terms themselves are in
:mod:`trainer.objectives`; the chunk size is the one decision of
:func:`workbench.models.readout.vocab_chunk_rows`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from workbench.errors import ConfigError

__all__ = ["ChunkInputs", "chunked_rows"]

ChunkInputs = dict[object, torch.Tensor]  # keyed by any hashable name


def chunked_rows(
    fn: Callable[[ChunkInputs], ChunkInputs],
    inputs: ChunkInputs,
    chunk_size: int,
) -> ChunkInputs:
    """``fn(inputs)`` over row chunks, so that no ``(n, V)`` tensor is kept for backward.

    Every full-vocabulary term (the policy's log-probs, OISD's JSD, SDPG's reverse KL,
    OPSD's JSD, a teacher's log-probs) is a per-token function of a few ``(n, d)``
    hidden states. ``fn`` maps a chunk of those rows to per-row outputs, reading the
    ``(m, V)`` logits out inside. Each chunk of ``chunk_size`` rows runs under
    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the forward keeps
    only the chunk's ``(m, d)`` inputs and its ``(m,)`` outputs, and backward recomputes
    the chunk's logits. Peak extra memory is then a few ``(chunk, V)`` float32
    tensors instead of several ``(n, V)`` ones, and values and gradients equal the
    unchunked ``fn(inputs)`` (tested); the price is one more read-out per chunk in
    backward.

    ``fn`` must be per-row (row ``i`` of an output depends on row ``i`` of the inputs
    only) and may compute teacher logits inside under ``torch.no_grad()``, so that a
    teacher's ``(n, V)`` logits never exist either.

    Args:
        fn: ``{name: (m, ...)} -> {name: (m,)}``.
        inputs: tensors with the same first dimension ``n``.
        chunk_size: rows per chunk; ``0`` runs ``fn`` once on all rows without
            checkpointing (faster when the ``(n, V)`` tensors fit in memory).

    Returns:
        ``{name: (n,)}``, the chunks' outputs concatenated.
    """
    if chunk_size < 0:
        raise ConfigError(f"chunk_size must be >= 0 (0 = no chunking); got {chunk_size}")
    sizes = {k: v.shape[0] for k, v in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"chunked inputs must share their first dimension; got {sizes}")
    n = next(iter(sizes.values()), 0)
    if chunk_size == 0 or n <= chunk_size:
        return fn(inputs)
    names = list(inputs)

    def run_chunk(*rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return fn(dict(zip(names, rows)))

    parts = []
    for start in range(0, n, chunk_size):
        rows = [inputs[k][start : start + chunk_size] for k in names]
        if torch.is_grad_enabled():
            parts.append(checkpoint(run_chunk, *rows, use_reentrant=False))
        else:
            parts.append(run_chunk(*rows))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
