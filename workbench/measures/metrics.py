"""The metric definitions of docs/metrics.md, as pure functions of tensors.

One implementation of each logit-lens and attention metric, shared by the
trainer's built-in probes, the TransformerLens analyzer, the dashboard and the
notebooks. :mod:`workbench.measures.probing` turns model internals into these inputs and
aggregates the results into the tidy table; nothing here knows about models.

Conventions:

- Lens inputs are log-probabilities ``(n, V)`` of ``n`` positions, at the same
  temperature for every layer. ``p^l`` is layer ``l``'s distribution, ``p^L`` the
  final layer's (the model's own output).
- Attention inputs are probabilities ``(H, Q, K)`` of one layer: ``H`` heads, ``Q``
  query rows, ``K`` keys. Keys a query cannot see (causal future, padding) carry
  exactly 0 weight; every row sums to 1 over its valid keys.
- All math is float32 (float64 inputs stay float64); divergences come from
  :mod:`workbench.measures.divergence`, which treats ``0 log 0`` as 0, so zero attention
  weights are valid inputs.

Speed: these run over every scored position x vocabulary (lens) and every head pair
x query x key (head matching), so each statistic is built from per-distribution sums
computed once (``sum p log p``, ``sum p^L log p^L``) plus one pass per pair of
distributions (see :mod:`workbench.measures.divergence`), and batched over heads, layers and
queries instead of Python loops. Broadcast pairwise work is split over queries so
that no intermediate exceeds ``PAIR_BUDGET`` elements.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import linear_sum_assignment

from workbench.measures.divergence import js_divergence_probs, kl_divergence, row_dot, sum_xlogx

__all__ = [
    "masked_mean",
    "LensReference",
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


# Largest number of elements of one broadcast pairwise intermediate (M of all head
# pairs x queries x keys): 4M float32 = 16 MiB, two of them live at once.
PAIR_BUDGET = 4 * 2**20


class LensReference:
    """The final layer's side of the logit-lens statistics for one chunk of positions.

    Everything that depends only on ``p^L`` (its probabilities, ``sum p^L log p^L``,
    argmax, the targets) is computed once here and reused for every layer l, so a
    layer costs a handful of passes over ``(n, V)``: ``exp`` (unless ``p^l`` is given),
    ``sum p^l log p^l``, ``sum p^L log p^l``, the mixture and its log for the JSD, one
    comparison for both ranks, and the argmax.

    Args:
        logp_final: ``(n, V)`` log-probabilities ``log p^L``.
        targets: ``(n,)`` ids of the actual next token (in ``[0, V)``).
        p_final: optional ``(n, V)`` ``p^L = exp(log p^L)`` if already computed.
    """

    def __init__(
        self, logp_final: torch.Tensor, targets: torch.Tensor, p_final: torch.Tensor | None = None
    ) -> None:
        self.logp = _float(logp_final)
        self.p = self.logp.exp() if p_final is None else _float(p_final)
        self.targets = targets.long()
        self.argmax = self.logp.argmax(-1)  # (n,)
        # sum p^L log p^L with the given logs: KL(p^L || p^L) is then exactly 0. A zero
        # of p^L at a -inf log-prob makes it nan; compare() falls back for such rows.
        self.p_logp = row_dot(self.p, self.logp)  # (n,)
        # The same sum with 0 log 0 = 0 (finite for every row), for the JSD and entropy.
        self.xlogx = torch.where(self.p_logp.isnan(), sum_xlogx(self.p), self.p_logp)

    def compare(
        self,
        logp_l: torch.Tensor,
        p_l: torch.Tensor | None = None,
        *,
        scratch: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-position statistics of layer l against the final layer.

        Args:
            logp_l: ``(n, V)`` log-probabilities ``log p^l`` at the same temperature.
            p_l: optional ``(n, V)`` ``exp(log p^l)`` if already computed.
            scratch: optional ``(2, n, V)`` buffer of ``logp_l``'s dtype (overwritten),
                to avoid allocating temporaries.

        Returns:
            The dict of :func:`lens_position_stats`.
        """
        logp_l = _float(logp_l)
        if logp_l.shape != self.logp.shape:
            raise ValueError(
                f"logp_l {tuple(logp_l.shape)} and logp_final {tuple(self.logp.shape)} differ"
            )
        if p_l is None:
            p_l = logp_l.exp()
        if scratch is None:
            scratch = logp_l.new_empty((2, *logp_l.shape))
        # sum p^l log p^l = -H(p^l) from the given logs (one pass, no log); rows with an
        # exact zero (0 * -inf = nan) take the 0 log 0 = 0 path.
        x_l = row_dot(p_l, logp_l, scratch=scratch[0])  # (n,)
        zero_rows = x_l.isnan()
        if bool(zero_rows.any()):
            x_l[zero_rows] = sum_xlogx(p_l[zero_rows])
        # KL(p^L || p^l) = sum p^L log p^L - sum p^L log p^l. A zero of p^L against a
        # -inf of either log-prob makes 0 * -inf = nan: such rows (only possible with
        # exact zeros in the inputs, never for a finite-logit softmax) are recomputed
        # with the select-based definition, which gives 0 log 0 = 0 exactly.
        kl = self.p_logp - row_dot(self.p, logp_l, scratch=scratch[0])
        bad = kl.isnan()
        if bool(bad.any()):
            kl[bad] = kl_divergence(self.logp[bad], logp_l[bad])
        js = js_divergence_probs(
            p_l, self.p, p_xlogx=x_l, q_xlogx=self.xlogx, out=(scratch[0], scratch[1])
        )
        # Both ranks in one comparison pass: count tokens strictly more probable than the
        # final top-1 (row 0) and than the target (row 1). Comparing into float and
        # summing is several times faster than summing a bool tensor.
        scores = logp_l.gather(-1, torch.stack([self.argmax, self.targets], -1))  # (n, 2)
        ranks = torch.gt(logp_l.unsqueeze(0), scores.T.unsqueeze(-1), out=scratch).sum(-1)
        return {
            "lens_kl": kl,
            "lens_js": js,
            "top1_agree": self._top1_agree(logp_l, scores[:, 0], ranks[0], scratch[0]),
            "final_rank": ranks[0],
            "target_rank": ranks[1],
            "target_nll": -scores[:, 1],
            "entropy": -x_l,
        }

    def _top1_agree(self, logp_l: torch.Tensor, score: torch.Tensor, rank: torch.Tensor,
                    scratch: torch.Tensor) -> torch.Tensor:
        """``1.0`` where ``argmax p^l == argmax p^L`` (the first maximal index, as ``argmax``
        has it), without an argmax pass over ``(n, V)`` (on CPU one costs as much as four
        other passes): they agree exactly when ``argmax p^L``'s log-prob ``score`` is the only
        one at least as large (one comparison with the next float below it); a tie at the
        top (``rank`` 0, more than one such token) is settled by ``argmax`` over those rows."""
        below = torch.nextafter(score, score.new_tensor(-math.inf)).unsqueeze(-1)
        at_least = torch.gt(logp_l, below, out=scratch).sum(-1)  # (n,) tokens >= score
        agree = at_least == 1
        tied = (rank == 0) & (at_least > 1)
        if bool(tied.any()):
            agree[tied] = logp_l[tied].argmax(-1) == self.argmax[tied]
        return agree.to(logp_l.dtype)

    def final_stats(self, scratch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """:meth:`compare` of the final layer with itself, without the passes whose
        results are known: ``lens_kl = lens_js = 0``, ``top1_agree = 1``,
        ``final_rank = 0`` (nothing is strictly more probable than the maximum)."""
        zeros = torch.zeros_like(self.p_logp)
        score = self.logp.gather(-1, self.targets.unsqueeze(-1))  # (n, 1)
        out = None if scratch is None else scratch[0]
        target_rank = torch.gt(self.logp, score, out=out).sum(-1).to(self.logp.dtype)
        return {
            "lens_kl": zeros,
            "lens_js": zeros.clone(),
            "top1_agree": torch.ones_like(zeros),
            "final_rank": zeros.clone(),
            "target_rank": target_rank,
            "target_nll": -score.squeeze(-1),
            "entropy": -self.xlogx,
        }


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

    ``top1_agree`` over layers ``1..L`` is the input of :func:`prediction_depth`.

    To compare many layers against one final layer, build one :class:`LensReference`
    and call its ``compare`` per layer (what :mod:`workbench.measures.probing` does).
    """
    logp_l, logp_final = _float(logp_l), _float(logp_final)
    if logp_l.shape != logp_final.shape:
        raise ValueError(
            f"logp_l {tuple(logp_l.shape)} and logp_final {tuple(logp_final.shape)} differ"
        )
    return LensReference(logp_final, targets).compare(logp_l)


def prediction_depth(agree_by_layer: torch.Tensor) -> torch.Tensor:
    """Prediction depth per position: the smallest layer from which the top-1 token
    never changes again.

    ``depth = min { l : argmax p^m == argmax p^L for every m >= l }`` (1-based), so
    ``depth == L`` when only the final layer has its own top-1 and ``depth == 1`` when
    every layer agrees.

    Args:
        agree_by_layer: ``(L, n)`` ``1[argmax p^l == argmax p^L]`` (bool or 0/1, the
            ``top1_agree`` of :meth:`LensReference.compare`) for layers ``1..L``; row
            ``L-1``, the final layer, agrees with itself.

    Returns:
        ``(n,)`` long depths in ``[1, L]``.
    """
    n_layers = agree_by_layer.shape[0]
    agree = agree_by_layer.bool()  # (L, n)
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
        key_valid: optional bool, False at padding keys: ``(K,)`` shared by every query,
            or ``(Q, K)`` per query (queries gathered from several sequences).

    Returns:
        ``(Q, K)`` bool, True where ``key <= query`` and the key is valid.
    """
    keys = torch.arange(n_keys, device=query_positions.device)
    mask = keys.unsqueeze(0) <= query_positions.unsqueeze(1)  # (Q, K)
    if key_valid is not None:
        key_valid = key_valid.to(torch.bool)
        mask = mask & (key_valid.unsqueeze(0) if key_valid.ndim == 1 else key_valid)
    return mask


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def _query_chunk(pairs: int, n_keys: int) -> int:
    """Queries per chunk so that ``pairs x chunk x n_keys <= PAIR_BUDGET`` (at least 1)."""
    return max(1, PAIR_BUDGET // max(1, pairs * n_keys))


def _pairwise_js(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """JSD between every row group of ``a`` and every row group of ``b``, per query.

    One broadcast op per chunk of queries; ``sum p log p`` of each side is computed
    once, not once per pair.

    Args:
        a: ``(A, Q, K)`` probabilities.
        b: ``(B, Q, K)`` probabilities.

    Returns:
        ``(A, B, Q)`` with entry ``[i, j, q] = JSD(a_{i,q}, b_{j,q})``.
    """
    a, b = _float(a), _float(b)
    xa, xb = sum_xlogx(a), sum_xlogx(b)  # (A, Q), (B, Q)
    n_a, n_b = a.shape[0], b.shape[0]
    n_queries, n_keys = a.shape[-2], a.shape[-1]
    step = _query_chunk(n_a * n_b, n_keys)
    out = a.new_empty(n_a, n_b, n_queries)
    buffers = a.new_empty(2, n_a, n_b, min(step, n_queries), n_keys)
    for start in range(0, n_queries, step):
        q = slice(start, start + step)
        width = min(step, n_queries - start)
        out[:, :, q] = js_divergence_probs(
            a[:, None, q], b[None, :, q],
            p_xlogx=xa[:, None, q], q_xlogx=xb[None, :, q],
            out=(buffers[0, :, :, :width], buffers[1, :, :, :width]),
        )
    return out


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
    return js_divergence_probs(_float(a).mean(0), _float(b).mean(0))


def attn_js_per_head(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """JSD between the rows of head h of ``a`` and head h of ``b``.

    Args:
        a: ``(H, Q, K)`` attention probabilities.
        b: ``(H, Q, K)`` attention probabilities.

    Returns:
        ``(H, Q)`` JSD per head and query.
    """
    _check_same_shape(a, b)
    return js_divergence_probs(_float(a), _float(b))


def attn_js_matrix(layers: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The layer x layer matrix of :func:`attn_js`, per query.

    Head averages are taken once per layer and every pair is computed in one broadcast
    op (per chunk of queries). The result is exactly symmetric (``(x + y) / 2`` is
    commutative) with an exactly zero diagonal (the mixture of a row with itself is
    that row).

    Args:
        layers: ``L`` tensors ``(H, Q, K)``, the attention of layers ``1..L``.

    Returns:
        ``(L, L, Q)`` with entry ``[l, m, q] = JSD(mean_h a^l_{h,q}, mean_h a^m_{h,q})``.
    """
    means = torch.stack([_float(a).mean(0) for a in layers])  # (L, Q, K)
    return _pairwise_js(means, means)


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
    h = -sum_xlogx(_float(a))  # (H, Q)
    norm = torch.log(count.to(h.dtype).clamp_min(2.0))  # clamp only avoids 0/0; masked below
    return torch.where(count > 1, h / norm, torch.zeros_like(h))


def bos_mass(a: torch.Tensor, first_key: int | torch.Tensor = 0) -> torch.Tensor:
    """Attention weight on the first token (the usual attention sink).

    Args:
        a: ``(H, Q, K)`` attention probabilities.
        first_key: key index of the first real token (non-zero under left padding):
            an int for every query, or a ``(Q,)`` long tensor per query (queries
            gathered from several sequences).

    Returns:
        ``(H, Q)`` weight on key ``first_key``.
    """
    a = _float(a)
    if isinstance(first_key, int):
        return a[..., first_key]
    index = first_key.long().to(a.device).view(1, -1, 1).expand(a.shape[0], -1, 1)
    return a.gather(-1, index).squeeze(-1)


def head_js_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise JSD between every head of ``a`` and every head of ``b``, per query.

    All head pairs in one broadcast op per chunk of queries (at most ``PAIR_BUDGET``
    elements live per intermediate).

    Args:
        a: ``(H, Q, K)`` attention probabilities.
        b: ``(H', Q, K)`` attention probabilities.

    Returns:
        ``(H, H', Q)`` with entry ``[h, g, q] = JSD(a_{h,q}, b_{g,q})``.
    """
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"attention maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return _pairwise_js(a, b)


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

