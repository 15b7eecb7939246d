"""Divergences between categorical distributions given as log-probabilities.

The one implementation used by the metrics (logit lens, attention similarity) and
by the training objectives (OISD, SDPG, OPSD). All math is done in float32 (or
wider, if given) and reduces over the last dimension.

Zero-probability entries are handled exactly: ``0 * log 0 = 0``, so attention rows
with masked keys (log-prob ``-inf``) are valid inputs.

Three families:

- :func:`kl_divergence`, :func:`generalized_jsd`, :func:`js_divergence`,
  :func:`entropy` take log-probabilities, are differentiable and make no assumption
  about the inputs (the OISD attention term back-propagates through them).
- :func:`student_divergence`: the same KL and generalised JSD for the training
  objectives' full-vocabulary terms (OISD's logit JSD, SDPG's KL, OPSD's JSD), from
  finite student logits against a constant teacher, with the gradient in closed form
  (two saved ``(n, V)`` tensors instead of a dozen).
- The fast path for the no-grad metrics over large vocabularies:
  :func:`log_softmax_and_probs`, :func:`sum_xlogx`, :func:`row_dot` and
  :func:`js_divergence_probs`. Each elementwise op over a ``(n, V)`` tensor is a full
  pass through memory, and fresh ``(n, V)`` allocations cost as much as the math
  (page faults), so these functions write into caller-provided buffers and split
  the divergences into per-distribution sums that are computed once and reused:
  ``JSD(p, q) = H(M) - (H(p) + H(q)) / 2`` needs one pass over ``M`` per pair, given
  the entropies. They are not meant for gradients (the clamp below has none).
"""

from __future__ import annotations

import math

import torch

# Smallest normal float32. ``log(max(p, TINY))`` is finite, and at ``p == 0`` the term
# ``p * log(max(p, TINY))`` is exactly 0, i.e. ``0 log 0 = 0`` without a select pass.
_TINY = torch.finfo(torch.float32).tiny


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_a p(a) (log p(a) - log q(a)).

    Args:
        logp: ``(..., V)`` log-probabilities of p.
        logq: ``(..., V)`` log-probabilities of q.

    Returns:
        ``(...)`` KL in nats. Terms with p(a) = 0 contribute 0.
    """
    logp, logq = _f32(logp), _f32(logq)
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, 0.0)  # 0 * (-inf - -inf) would be nan
    return (p * diff).sum(-1)


def generalized_jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (OPSD, GKD).

    ``JSD_beta(p, q) = beta KL(p || M) + (1 - beta) KL(q || M)``, ``M = beta p + (1 - beta) q``.
    With beta = 0.5 this is the symmetric JSD, bounded by ln 2.

    Args:
        logp: ``(..., V)`` log-probabilities of p.
        logq: ``(..., V)`` log-probabilities of q.
        beta: mixture weight of p, in (0, 1).

    Returns:
        ``(...)`` divergence in nats.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    logp, logq = _f32(logp), _f32(logq)
    # log M = logsumexp(log beta + log p, log(1-beta) + log q), stable for -inf entries.
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    return beta * kl_divergence(logp, logm) + (1.0 - beta) * kl_divergence(logq, logm)


def js_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence ``0.5 KL(p || M) + 0.5 KL(q || M)``, ``M = (p + q) / 2``.

    Args:
        logp: ``(..., V)`` log-probabilities.
        logq: ``(..., V)`` log-probabilities.

    Returns:
        ``(...)`` JSD in nats, in [0, ln 2].
    """
    return generalized_jsd(logp, logq, 0.5)


class _StudentDivergence(torch.autograd.Function):
    """``D(softmax(z / T), q)`` for a constant ``q``, with the gradient in closed form.

    For ``p = softmax(z / T)`` and any ``D(p, q)``, ``dD/dz = p * (g - <p, g>) / T`` with
    ``g = dD/dp`` (the softmax Jacobian). Both of our divergences have a short ``g``:

    - ``beta is None``: ``KL(p || q)``, ``g = log p - log q`` (the ``+1`` cancels);
    - else ``JSD_beta(q, p) = beta KL(q || M) + (1 - beta) KL(p || M)``,
      ``M = beta q + (1 - beta) p``: ``g = (1 - beta) (log p - log M)``.

    Autograd through the elementwise formulas keeps a dozen ``(n, V)`` intermediates
    and makes as many passes over them; this keeps two (``p`` and ``g``) and makes a
    few passes each way, which matters at real vocabulary sizes (tested against
    autograd of :func:`kl_divergence` / :func:`generalized_jsd`, and with gradcheck).
    Logits must be finite (they are: they come from an unembedding).
    """

    @staticmethod
    def forward(ctx, logits, log_q, temperature, beta):
        z = _f32(logits)
        if temperature != 1.0:
            z = z / temperature
        log_p = torch.log_softmax(z, dim=-1)
        p = log_p.exp()
        log_q = log_q.to(log_p.dtype)
        if beta is None:
            g = log_p - log_q
            value = row_dot(p, g)
        else:
            log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
            value = beta * row_dot(log_q.exp(), log_q - log_m)
            g = log_p.sub_(log_m)  # log p is not needed any more: reuse its memory
            value = value + (1.0 - beta) * row_dot(p, g)
            g.mul_(1.0 - beta)
        ctx.save_for_backward(p, g)
        ctx.temperature = temperature
        ctx.logits_dtype = logits.dtype
        return value

    @staticmethod
    def backward(ctx, grad_value):
        p, g = ctx.saved_tensors
        centred = g - row_dot(p, g).unsqueeze(-1)  # (..., V)
        grad = centred.mul_(p).mul_((grad_value / ctx.temperature).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def student_divergence(
    logits: torch.Tensor, log_q: torch.Tensor, temperature: float = 1.0, beta: float | None = None
) -> torch.Tensor:
    """A divergence of the student ``p = softmax(z / T)`` from a fixed teacher ``q``.

    ``beta=None``: ``KL(p || q)`` (SDPG's reverse KL). ``beta`` in (0, 1): the
    generalised JSD with weight ``beta`` on the teacher, ``beta KL(q || M) + (1 - beta)
    KL(p || M)``, ``M = beta q + (1 - beta) p`` (OPSD; ``beta = 0.5`` is OISD's symmetric
    JSD). Values equal :func:`kl_divergence` / :func:`generalized_jsd` on the
    log-softmax; the gradient (to ``z`` only; ``q`` is a constant) is computed in closed
    form, with far fewer ``(n, V)`` passes and tensors (see ``_StudentDivergence``).

    Args:
        logits: ``(..., V)`` student logits ``z`` (finite; half precision is computed in float32).
        log_q: ``(..., V)`` teacher log-probabilities (no gradient flows into them).
        temperature: ``T > 0`` applied to the student logits.
        beta: ``None`` for the reverse KL, else the teacher's mixture weight.

    Returns:
        ``(...)`` divergence in nats.
    """
    if beta is not None and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if logits.shape != log_q.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and log_q {tuple(log_q.shape)} differ in shape")
    return _StudentDivergence.apply(logits, log_q.detach(), float(temperature), beta)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``H(p) = -sum_a p(a) log p(a)`` in nats, ``(..., V) -> (...)``."""
    logp = _f32(logp)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


def log_softmax_and_probs(
    logits: torch.Tensor, temperature: float = 1.0, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(z / T)`` and ``softmax(z / T) = exp(log softmax(z / T))``, float32.

    The values are bit for bit those of ``torch.log_softmax(z.float() / T, -1)`` and its
    ``exp``; the point is that both may be written to reused buffers (the ``z / T``
    temporary goes to the ``p`` buffer before it is overwritten).

    Args:
        logits: ``(..., V)`` logits ``z`` (half precisions are promoted to float32).
        temperature: ``T > 0``.
        out: optional ``(logp, p)`` buffers of ``logits``' shape and float dtype.

    Returns:
        ``(logp, p)``, both ``(..., V)``.
    """
    x = _f32(logits)
    logp_out, p_out = out if out is not None else (None, None)
    if temperature != 1.0:  # z / 1 == z exactly: skip the pass
        x = torch.div(x, temperature, out=p_out)
    logp = torch.log_softmax(x, -1, out=logp_out)
    return logp, torch.exp(logp, out=p_out)


def row_dot(a: torch.Tensor, b: torch.Tensor, *, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_a a(..., a) b(..., a)``: ``(..., V), (..., V) -> (...)``; shapes must match.

    The product, then the sum (what ``torch.linalg.vecdot`` does, to the same bits): on CPU
    2-3x faster than a batched matrix product ``(n, 1, V) @ (n, V, 1)`` on chunk-sized rows.
    Given ``scratch`` (``a``'s shape and dtype, overwritten; it may be ``a`` or ``b``
    itself), the product is written there: a fresh chunk-sized temporary costs its page
    faults, 1.85 against 1.29 ms on ``(27, 151936)``.
    """
    if a.shape != b.shape:
        raise ValueError(f"row_dot needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if scratch is None:
        return torch.linalg.vecdot(a, b)
    return torch.mul(a, b, out=scratch).sum(-1)


def sum_xlogx(p: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_a p(a) log p(a)`` (``= -H(p)``) from probabilities, with ``0 log 0 = 0``.

    Args:
        p: ``(..., V)`` probabilities (exact zeros allowed).
        out: optional scratch buffer of ``p``'s shape and dtype (overwritten).

    Returns:
        ``(...)`` in nats, <= 0.
    """
    log_p = torch.clamp(p, min=_TINY, out=out).log_()
    return row_dot(p, log_p, scratch=None if out is None else log_p)


def js_divergence_probs(
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    p_xlogx: torch.Tensor | None = None,
    q_xlogx: torch.Tensor | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Jensen-Shannon divergence from probabilities, broadcasting leading dimensions.

    ``JSD(p, q) = H(M) - (H(p) + H(q)) / 2`` with ``M = (p + q) / 2``: the same value as
    :func:`js_divergence` on the logs, with one pass over ``M`` per pair once the
    per-distribution sums ``sum p log p`` are known (pass them in to reuse them across
    many pairs). Identical inputs give exactly 0 (``M`` is then ``p`` bit for bit);
    tiny negative rounding is clamped to 0.

    Args:
        p: ``(..., V)`` probabilities.
        q: ``(..., V)`` probabilities, broadcastable against ``p``.
        p_xlogx: optional ``sum_xlogx(p)``, ``p.shape[:-1]``.
        q_xlogx: optional ``sum_xlogx(q)``, ``q.shape[:-1]``.
        out: optional two scratch buffers of the broadcast shape (overwritten).

    Returns:
        ``(...)`` JSD in nats, in ``[0, ln 2]``, of the broadcast leading shape.
    """
    m_out, log_out = out if out is not None else (None, None)
    m = torch.add(p, q, out=m_out).mul_(0.5)  # (..., V) mixture
    m_xlogx = sum_xlogx(m, out=log_out)
    if p_xlogx is None:
        p_xlogx = sum_xlogx(p)
    if q_xlogx is None:
        q_xlogx = sum_xlogx(q)
    return (0.5 * (p_xlogx + q_xlogx) - m_xlogx).clamp_min_(0.0)
