"""The metric definitions of DESIGN.md, as pure functions of tensors.

One implementation of each logit-lens and attention metric, shared by the
trainer's built-in probes, the TransformerLens analyzer, the dashboard and the
notebooks. :mod:`workbench.probing` turns model internals into these inputs and
aggregates the results into the tidy table; nothing here knows about models.

Conventions:

- Lens inputs are log-probabilities ``(n, V)`` of ``n`` positions, at the same
  temperature for every layer. ``p^l`` is layer ``l``'s distribution, ``p^L`` the
  final layer's (the model's own output).
- Attention inputs are probabilities ``(H, Q, K)`` of one layer: ``H`` heads, ``Q``
  query rows, ``K`` keys. Keys a query cannot see (causal future, padding) carry
  exactly 0 weight; every row sums to 1 over its valid keys.
- All math is float32 (float64 inputs stay float64); divergences come from
  :mod:`workbench.divergence`, which treats ``0 log 0`` as 0, so zero attention
  weights are valid inputs.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from workbench.divergence import entropy, js_divergence, kl_divergence

__all__ = [
    "masked_mean",
    "lens_position_stats",
    "prediction_depth",
    "causal_key_mask",
    "attn_js",
    "attn_js_per_head",
    "attn_js_matrix",
    "attn_entropy",
    "bos_mass",
    "head_js_matrix",
    "match_heads",
    "head_match",
]


def _float(x: torch.Tensor) -> torch.Tensor:
    """Promote half precisions to float32; float32/float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_mean(
    values: torch.Tensor, mask: torch.Tensor | None = None, dim: int | None = None
) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is True.

    Masked-out entries are excluded even when they hold ``nan`` or ``inf`` (they are
    replaced, not multiplied by zero).

    Args:
        values: ``(...)`` values.
        mask: boolean tensor broadcastable to ``values``; None means every entry.
        dim: dimension to reduce; None reduces over all entries.

    Returns:
        The mean, a scalar tensor (``dim=None``) or ``values`` with ``dim`` removed.
        ``nan`` where the mask selects nothing (a mean of no values is undefined).
    """
    values = _float(values)
    if mask is None:
        return values.mean() if dim is None else values.mean(dim)
    mask = mask.to(torch.bool).expand_as(values)
    kept = torch.where(mask, values, torch.zeros_like(values))
    count = mask.to(values.dtype)
    if dim is None:
        return kept.sum() / count.sum()
    return kept.sum(dim) / count.sum(dim)


def _rank_of(logp: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Rank (0 = top) of ``token`` under ``logp``: the number of tokens with strictly
    greater probability, so tied tokens share the better rank. ``(n, V), (n,) -> (n,)``."""
    score = logp.gather(-1, token.unsqueeze(-1))  # (n, 1)
    return (logp > score).sum(-1).to(logp.dtype)


def lens_position_stats(
    logp_l: torch.Tensor, logp_final: torch.Tensor, targets: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-position logit-lens statistics of one layer against the final layer.

    Args:
        logp_l: ``(n, V)`` log-probabilities ``log p^l`` of layer l.
        logp_final: ``(n, V)`` log-probabilities ``log p^L`` of the final layer, at the
            same temperature as ``logp_l``.
        targets: ``(n,)`` ids of the actual next token (must lie in ``[0, V)``).

    Returns:
        Dict of ``(n,)`` tensors:

        - ``lens_kl``: ``KL(p^L || p^l)``, the tuned-lens direction (final layer first).
        - ``lens_js``: ``JSD(p^l, p^L)``, in ``[0, ln 2]``.
        - ``top1_agree``: 1.0 where ``argmax p^l == argmax p^L``, else 0.0.
        - ``final_rank``: rank (0 = top) of ``argmax p^L`` under ``p^l``; ties count
          only strictly more probable tokens.
        - ``target_rank``: rank of the target under ``p^l`` (same tie rule).
        - ``target_nll``: ``-log p^l(target)`` in nats.
        - ``entropy``: ``H(p^l)`` in nats.
        - ``argmax``: ``argmax p^l`` (long), the input of :func:`prediction_depth`.
    """
    logp_l, logp_final = _float(logp_l), _float(logp_final)
    if logp_l.shape != logp_final.shape:
        raise ValueError(
            f"logp_l {tuple(logp_l.shape)} and logp_final {tuple(logp_final.shape)} differ"
        )
    targets = targets.long()
    argmax_l = logp_l.argmax(-1)  # (n,)
    argmax_final = logp_final.argmax(-1)  # (n,)
    return {
        "lens_kl": kl_divergence(logp_final, logp_l),
        "lens_js": js_divergence(logp_l, logp_final),
        "top1_agree": (argmax_l == argmax_final).to(logp_l.dtype),
        "final_rank": _rank_of(logp_l, argmax_final),
        "target_rank": _rank_of(logp_l, targets),
        "target_nll": -logp_l.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "entropy": entropy(logp_l),
        "argmax": argmax_l,
    }


def prediction_depth(argmax_by_layer: torch.Tensor) -> torch.Tensor:
    """Prediction depth per position: the smallest layer from which the top-1 token
    never changes again.

    ``depth = min { l : argmax p^m == argmax p^L for every m >= l }`` (1-based), so
    ``depth == L`` when only the final layer has its own top-1 and ``depth == 1`` when
    every layer agrees.

    Args:
        argmax_by_layer: ``(L, n)`` ``argmax p^l`` for layers ``1..L`` (row ``L-1`` is the
            final layer).

    Returns:
        ``(n,)`` long depths in ``[1, L]``.
    """
    n_layers = argmax_by_layer.shape[0]
    agree = argmax_by_layer == argmax_by_layer[-1:]  # (L, n)
    # Count the unbroken run of agreeing layers from the top: cumprod over the
    # reversed layer axis stays 1 until the first disagreement.
    trailing = agree.flip(0).long().cumprod(0).sum(0)  # (n,), >= 1 (layer L agrees with itself)
    return n_layers - trailing + 1


def causal_key_mask(
    query_positions: torch.Tensor, n_keys: int, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Which keys each query may attend to under a causal mask (plus padding).

    Args:
        query_positions: ``(Q,)`` sequence positions of the queries.
        n_keys: number of keys ``K`` (the sequence length).
        key_valid: optional ``(K,)`` bool, False at padding keys.

    Returns:
        ``(Q, K)`` bool, True where ``key <= query`` and the key is valid.
    """
    keys = torch.arange(n_keys, device=query_positions.device)
    mask = keys.unsqueeze(0) <= query_positions.unsqueeze(1)  # (Q, K)
    if key_valid is not None:
        mask = mask & key_valid.to(torch.bool).unsqueeze(0)
    return mask


def _log_probs(a: torch.Tensor) -> torch.Tensor:
    """Log of attention probabilities; exact zeros (masked keys) become ``-inf``."""
    return _float(a).clamp_min(0).log()


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def attn_js(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """JSD between head-averaged attention rows: ``JSD(mean_h a_h, mean_h b_h)``.

    Args:
        a: ``(H, Q, K)`` attention probabilities of one layer.
        b: ``(H', Q, K)`` attention probabilities of another layer (head counts may
            differ: each side is averaged over its own heads).

    Returns:
        ``(Q,)`` JSD per query, in nats, in ``[0, ln 2]``.
    """
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"attention maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return js_divergence(_log_probs(_float(a).mean(0)), _log_probs(_float(b).mean(0)))


def attn_js_per_head(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """JSD between the rows of head h of ``a`` and head h of ``b``.

    Args:
        a: ``(H, Q, K)`` attention probabilities.
        b: ``(H, Q, K)`` attention probabilities.

    Returns:
        ``(H, Q)`` JSD per head and query.
    """
    _check_same_shape(a, b)
    return js_divergence(_log_probs(a), _log_probs(b))


def attn_js_matrix(layers: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The layer x layer matrix of :func:`attn_js`, per query.

    Head averages are taken once per layer; the matrix is symmetric (JSD is) with an
    exactly zero diagonal, so only the upper triangle is computed.

    Args:
        layers: ``L`` tensors ``(H, Q, K)``, the attention of layers ``1..L``.

    Returns:
        ``(L, L, Q)`` with entry ``[l, m, q] = JSD(mean_h a^l_{h,q}, mean_h a^m_{h,q})``.
    """
    logs = [_log_probs(_float(a).mean(0)) for a in layers]  # L x (Q, K)
    n_layers, n_queries = len(logs), logs[0].shape[0]
    out = logs[0].new_zeros(n_layers, n_layers, n_queries)
    for i in range(n_layers):
        for j in range(i + 1, n_layers):
            out[i, j] = out[j, i] = js_divergence(logs[i], logs[j])
    return out


def attn_entropy(a: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each attention row normalised by ``log(number of valid keys)``.

    1 means uniform over the keys the query can see, 0 means all weight on one key.
    A query with a single valid key has no choice: its value is defined as 0.

    Args:
        a: ``(H, Q, K)`` attention probabilities.
        key_mask: ``(Q, K)`` bool, the keys each query may see. None means causal with
            the queries at the last ``Q`` key positions (query i at key ``K - Q + i``),
            i.e. the usual square causal map when ``Q == K``.

    Returns:
        ``(H, Q)`` normalised entropy in ``[0, 1]``.
    """
    n_queries, n_keys = a.shape[-2], a.shape[-1]
    if key_mask is None:
        positions = torch.arange(n_keys - n_queries, n_keys, device=a.device)
        key_mask = causal_key_mask(positions, n_keys)
    count = key_mask.to(torch.bool).sum(-1)  # (Q,)
    h = entropy(_log_probs(a))  # (H, Q)
    norm = torch.log(count.to(h.dtype).clamp_min(2.0))  # clamp only avoids 0/0; masked below
    return torch.where(count > 1, h / norm, torch.zeros_like(h))


def bos_mass(a: torch.Tensor, first_key: int = 0) -> torch.Tensor:
    """Attention weight on the first token (the usual attention sink).

    Args:
        a: ``(H, Q, K)`` attention probabilities.
        first_key: key index of the first real token (non-zero under left padding).

    Returns:
        ``(H, Q)`` weight on key ``first_key``.
    """
    return _float(a)[..., first_key]


def head_js_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise JSD between every head of ``a`` and every head of ``b``, per query.

    Loops over the heads of ``a`` so that at most ``(H', Q, K)`` is live at once.

    Args:
        a: ``(H, Q, K)`` attention probabilities.
        b: ``(H', Q, K)`` attention probabilities.

    Returns:
        ``(H, H', Q)`` with entry ``[h, g, q] = JSD(a_{h,q}, b_{g,q})``.
    """
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"attention maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    log_a, log_b = _log_probs(a), _log_probs(b)
    return torch.stack([js_divergence(log_a[h].unsqueeze(0), log_b) for h in range(log_a.shape[0])])


def match_heads(cost: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Hungarian matching of heads on a cost matrix (scipy's ``linear_sum_assignment``).

    Args:
        cost: ``(H, H)`` with ``cost[h, g]`` the mean JSD between head h of one layer and
            head g of the other.

    Returns:
        ``(perm, matched, identity)``: ``perm`` ``(H,)`` long, head h matched to head
        ``perm[h]`` (minimising the summed cost); ``matched`` the mean cost over matched
        pairs; ``identity`` the mean cost with head h paired to head h (the diagonal).

    Raises:
        ValueError: if the cost matrix is not square (different head counts).
    """
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(
            f"head matching needs equal head counts, got cost matrix {tuple(cost.shape)}"
        )
    c = cost.detach().double().cpu().numpy()
    rows, cols = linear_sum_assignment(c)
    perm = torch.as_tensor(cols, dtype=torch.long)[torch.as_tensor(rows).argsort()]
    matched = float(c[rows, cols].mean())
    identity = float(c.diagonal().mean())
    return perm, matched, identity


def head_match(
    a: torch.Tensor, b: torch.Tensor, query_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, float, float]:
    """Match the heads of ``a`` to the heads of ``b`` by attention similarity.

    Cost ``C[h, g]`` = mean over (selected) queries of ``JSD(a_h, b_g)``; heads are then
    matched one-to-one with the Hungarian algorithm (:func:`match_heads`).

    Args:
        a: ``(H, Q, K)`` attention probabilities of one layer.
        b: ``(H, Q, K)`` attention probabilities of another layer.
        query_mask: optional ``(Q,)`` bool, the queries to average over.

    Returns:
        ``(perm, matched_jsd, identity_jsd)`` as in :func:`match_heads`.

    Raises:
        ValueError: if the two layers have different head counts or shapes.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"head matching needs equal head counts, got {a.shape[0]} and {b.shape[0]}"
        )
    cost = masked_mean(head_js_matrix(a, b), query_mask, dim=-1)  # (H, H)
    return match_heads(cost)

