"""Divergences between categorical distributions given as log-probabilities.

The one implementation used by the metrics (logit lens, attention similarity) and
by the training objectives (OISD, SDPG, OPSD). All math is done in float32 (or
wider, if given) and reduces over the last dimension.

Zero-probability entries are handled exactly: ``0 * log 0 = 0``, so attention rows
with masked keys (log-prob ``-inf``) are valid inputs.
"""

from __future__ import annotations

import math

import torch

LN2 = math.log(2.0)


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
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
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


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``H(p) = -sum_a p(a) log p(a)`` in nats, ``(..., V) -> (...)``."""
    logp = _f32(logp)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
