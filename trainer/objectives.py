"""The training objectives of docs/objectives.md as small, pure functions of tensors.

Each function is one term of one method, named after it, with its equation in the
docstring. The training loop composes them; nothing here touches a model, an
optimiser or a config object.

Conventions (shared by every function):

- ``B``: number of sequences, group-contiguous (sequence ``i`` belongs to group
  ``i // G``); ``T``: padded response length; ``V``: vocabulary size; ``n``: a flat
  set of tokens (usually the response tokens of the batch).
- ``mask``: ``(B, T)`` bool or 0/1 float, 1 on response tokens.
- ``logp``: ``(B, T)`` log-probability of the sampled token.
- Advantages are ``(B,)`` per sequence (broadcast over tokens) or ``(B, T)``
  per token (RLSD's ``A_hat``). They are always treated as constants (``SG[A]``).
- Teachers are always detached (``SG[.]``) inside the function, so a caller cannot
  leak gradient into a teacher by forgetting to.
- Divergences come from :mod:`workbench.measures.divergence` (float32, ``-inf``-safe).

Papers: GRPO (arXiv 2402.03300), DAPO (arXiv 2503.14476), Dr. GRPO (arXiv
2503.20783), dual-clip PPO (arXiv 1912.09729), OISD (arXiv 2605.29089), SDPG
(arXiv 2606.04036), RLSD (arXiv 2604.03128), OPSD (arXiv 2601.18734).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from workbench.errors import ConfigError
from workbench.measures.divergence import js_divergence, student_divergence

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
ClipMode = Literal["ppo", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
OISDWeight = Literal["signed", "sign", "positive", "abs"]
UnnormalizedKL = Literal["ufkl", "urkl", "fkl", "rkl"]

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
CLIP_MODES = ("ppo", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
OISD_WEIGHTS = ("signed", "sign", "positive", "abs")
UNNORMALIZED_KLS = ("ufkl", "urkl", "fkl", "rkl")

ADVANTAGE_EPS = 1e-6  # the ``+ 1e-6`` of ``A = (R - mean) / (std + 1e-6)``, as in TRL
DELTA_CLAMP = 20.0  # RLSD clamps the teacher-student log-ratio to [-20, 20]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Detached advantages broadcast to ``like``'s ``(B, T)``: ``(B,)`` -> ``(B, 1)``."""
    advantages = advantages.detach()
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    if advantages.shape[0] != like.shape[0] or advantages.dim() != 2:
        raise ValueError(
            f"advantages must be (B,) or (B, T) with B={like.shape[0]}; "
            f"got {tuple(advantages.shape)}"
        )
    return advantages


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the tokens where ``mask`` is set (0 when the mask is empty)."""
    keep = mask.bool()
    return torch.where(keep, x, torch.zeros_like(x)).sum() / keep.sum().clamp(min=1)


# --------------------------------------------------------------------------- GRPO


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_rewards: ScaleRewards = "group"
) -> torch.Tensor:
    """Group-relative advantages (GRPO, arXiv 2402.03300; Dr. GRPO, arXiv 2503.20783).

    ``A_i = (R_i - mean_G R) / (std R + 1e-6)``, the mean always over the group of
    ``G`` responses to the same prompt. The std follows TRL: ``torch.std``, i.e. the
    *unbiased* (Bessel-corrected, ``/ (G - 1)``) estimate.

    Args:
        rewards: ``(B,)`` scalar reward per sequence, group-contiguous, ``B = n_groups * G``.
        group_size: ``G``, responses per prompt (>= 2).
        scale_rewards: ``"group"`` (default): std over the group; ``"batch"``: one std
            over the whole batch (the mean is still the group's); ``"none"`` (Dr. GRPO):
            no division.

    Returns:
        ``(B,)`` float32 advantages. Groups with equal rewards get ``A = 0``.
    """
    _check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    grouped = _grouped(rewards, group_size)  # (n_groups, G)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)  # (B,)
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    else:
        std = rewards.float().std()
    return centred / (std + ADVANTAGE_EPS)


def frac_zero_std(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal (TRL's ``frac_reward_zero_std``).

    Those groups have ``A = 0`` and give the GRPO term no signal.

    Args:
        rewards: ``(B,)`` rewards, group-contiguous.
        group_size: ``G``.

    Returns:
        The fraction in [0, 1].
    """
    std = _grouped(rewards, group_size).std(dim=1)  # (n_groups,)
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(B,)`` -> ``(B // G, G)`` float32, checking that the groups tile the batch."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,); got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ConfigError(f"group_size must be >= 2 (group std is undefined); got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"batch of {rewards.numel()} rewards is not a multiple of G={group_size}")
    return rewards.float().view(-1, group_size)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType = "token_mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar, as TRL's ``loss_type`` does.

    With ``m`` the mask, ``B`` sequences:

    - ``token_mean`` (DAPO, arXiv 2503.14476; default):
      ``sum_{i,t} m_{i,t} l_{i,t} / sum_{i,t} m_{i,t}``.
    - ``seq_mean_token_mean`` (original GRPO):
      ``(1/B) sum_i [sum_t m_{i,t} l_{i,t} / sum_t m_{i,t}]``.
    - ``seq_mean_token_sum_norm`` (Dr. GRPO, arXiv 2503.20783):
      ``(1/B) sum_i [sum_t m_{i,t} l_{i,t} / max_len]``.

    Every auxiliary term goes through this function too, so that it shares the
    GRPO term's normaliser (docs/objectives.md). Masked-out entries are *selected away*
    (not multiplied by 0), so a ``nan``/``inf`` on padding cannot leak into the value.

    Args:
        per_token: ``(B, T)`` loss per token.
        mask: ``(B, T)`` 1 on response tokens.
        loss_type: one of the three above.
        max_len: Dr. GRPO's constant normaliser (``max_completion_length``);
            default ``T``.

    Returns:
        Scalar loss. Empty sequences (or an empty batch) count as 0.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    _check_same_shape(per_token=per_token, mask=mask)
    keep = mask.bool()
    summed = torch.where(keep, per_token, torch.zeros_like(per_token))  # (B, T)
    if loss_type == "token_mean":
        return summed.sum() / keep.sum().clamp(min=1)
    if loss_type == "seq_mean_token_mean":
        return (summed.sum(-1) / keep.sum(-1).clamp(min=1)).mean()
    max_len = per_token.shape[-1] if max_len is None else max_len
    if max_len <= 0:
        raise ConfigError(f"max_len must be positive; got {max_len}")
    return (summed.sum(-1) / max_len).mean()


def grpo_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    clip: ClipMode = "ppo",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate per token (PPO arXiv 1707.06347; DAPO clip-higher).

    With ``rho = exp(logp - old_logp)`` and ``A = SG[A]``:

    - ``clip="ppo"``: ``l = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)``.
      Dual clip ``c > 1`` (Ye et al., arXiv 1912.09729), for ``A < 0`` only:
      ``l = min(max(-rho A, -clip(rho) A), -c A)``, i.e. the loss of a negative-advantage
      token is capped at ``c |A|`` so a huge ratio cannot blow it up (the form of
      verl's ``clip_ratio_c``; the capped tokens get no gradient).
    - ``clip="none"``: the on-policy REINFORCE surrogate ``l = -A logp`` (its gradient
      is ``-A d logp``; ``old_logp`` is not used).

    Args:
        logp: ``(B, T)`` log pi_theta of the sampled tokens (with gradient).
        old_logp: ``(B, T)`` log pi_old of the same tokens, or ``None`` for the
            on-policy case (``SG[logp]``, so ``rho = 1`` with the policy gradient).
        advantages: ``(B,)`` or ``(B, T)``.
        mask: ``(B, T)`` response tokens; padding gets loss 0 and its ratio is
            computed from a zero log-ratio, so garbage log-probs there cannot make
            ``inf``/``nan`` gradients.
        eps_low: lower clip range (ratio >= 1 - eps_low).
        eps_high: upper clip range (ratio <= 1 + eps_high); DAPO's clip-higher default 0.28.
        dual_clip: ``c`` of dual-clip PPO (must be > 1), or ``None`` (off).
        clip: ``"ppo"`` or ``"none"``.

    Returns:
        ``(per_token_loss, stats)``: per_token_loss ``(B, T)`` to be passed to
        :func:`aggregate`; stats, detached 0-dim tensors named as in TRL:
        ``clip_ratio/low_mean`` (``rho < 1 - eps_low`` and ``A < 0``),
        ``clip_ratio/high_mean`` (``rho > 1 + eps_high`` and ``A > 0``),
        ``clip_ratio/region_mean`` (either), each a token-mean over the mask;
        with dual clip also ``clip_ratio/dual_mean`` (``A < 0`` and ``rho > c``).
    """
    _check_choice("clip", clip, CLIP_MODES)
    _check_same_shape(logp=logp, mask=mask)
    if not (0.0 <= eps_low < 1.0 and eps_high >= 0.0):
        raise ConfigError(
            f"clip range needs 0 <= eps_low < 1 and eps_high >= 0; got {eps_low}, {eps_high}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ConfigError(f"dual_clip must be > 1; got {dual_clip}")
    keep = mask.bool()
    adv = _per_token(advantages, logp)  # (B, 1) or (B, T)
    zero = torch.zeros_like(logp)

    if clip == "none":
        per_token = torch.where(keep, -adv * logp, zero)
        zero_stat = zero.new_zeros(())
        stats = {f"clip_ratio/{k}_mean": zero_stat for k in ("low", "high", "region")}
        return per_token, stats

    old_logp = logp.detach() if old_logp is None else old_logp.detach()
    _check_same_shape(logp=logp, old_logp=old_logp)
    log_ratio = torch.where(keep, logp - old_logp, zero)  # (B, T)
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # (B, T)
    if dual_clip is not None:
        capped = torch.min(per_token, -dual_clip * adv)
        per_token = torch.where(adv < 0, capped, per_token)
    per_token = torch.where(keep, per_token, zero)

    with torch.no_grad():
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        stats = {
            "clip_ratio/low_mean": _masked_mean(low.float(), keep),
            "clip_ratio/high_mean": _masked_mean(high.float(), keep),
            "clip_ratio/region_mean": _masked_mean((low | high).float(), keep),
        }
        if dual_clip is not None:
            dual = (ratio > dual_clip) & (adv < 0)
            stats["clip_ratio/dual_mean"] = _masked_mean(dual.float(), keep)
    return per_token, stats


def reference_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3"
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token (Schulman 2020).

    With ``log r = ref_logp - logp`` (as in TRL and verl, ``y ~ pi_theta``):

    - ``k1 = -log r = logp - ref_logp`` (unbiased, high variance, can be negative);
    - ``k2 = 0.5 (log r)^2``;
    - ``k3 = exp(log r) - log r - 1`` (unbiased, >= 0; TRL's ``beta`` term).

    Reference: http://joschu.net/blog/kl-approx.html. The reference is detached.

    Args:
        logp: ``(B, T)`` log pi_theta of the sampled tokens.
        ref_logp: ``(B, T)`` log pi_ref of the same tokens.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``(B, T)`` per-token KL estimate (pass it to :func:`aggregate`).
    """
    _check_choice("estimator", estimator, KL_ESTIMATORS)
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    log_r = ref_logp.detach() - logp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r.square()
    return torch.exp(log_r) - log_r - 1.0


# --------------------------------------------------------------------------- OISD


def oisd_weights(advantages: torch.Tensor, mode: OISDWeight = "signed") -> torch.Tensor:
    """OISD's per-sequence weight ``w_i`` of the alignment terms (arXiv 2605.29089).

    *Reconstructed* from the abstract (the paper's code is not public), so all four
    are kept: ``signed``: ``w = A`` (default; correct responses pull the layer toward
    the final layer, wrong ones push it away, bounded since JSD <= ln 2);
    ``sign``: ``sign(A)``; ``positive``: ``max(A, 0)``; ``abs``: ``|A|``.

    Args:
        advantages: ``(B,)`` GRPO advantages.
        mode: one of the four above.

    Returns:
        ``(B,)`` detached weights.
    """
    _check_choice("oisd weight mode", mode, OISD_WEIGHTS)
    a = advantages.detach()
    if mode == "signed":
        return a
    if mode == "sign":
        return torch.sign(a)
    if mode == "positive":
        return a.clamp(min=0.0)
    return a.abs()


def oisd_logit_alignment(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """OISD logit alignment ("how to think"): ``J^l_t = JSD(p^l_t, SG[p^L_t])``.

    ``p^l_t = softmax(z^l_t / T)`` is the logit lens at layer ``l`` (the student),
    ``p^L_t`` the final layer's distribution (the teacher, detached here), full
    vocabulary, in float32 (arXiv 2605.29089).

    Args:
        student_logits: ``(n, V)`` (or ``(..., V)``) logit-lens logits of layer l.
        teacher_logits: ``(n, V)`` final-layer logits of the same tokens.
        temperature: sampling temperature ``T`` applied to both.

    Returns:
        ``(n,)`` JSD in nats, in [0, ln 2].
    """
    _check_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    _check_temperature(temperature)
    log_q = _log_softmax(teacher_logits.detach(), temperature)
    # JSD_0.5 is symmetric: the student form with weight 0.5 on the teacher is JSD(p, q).
    return student_divergence(student_logits, log_q, temperature, beta=0.5)


def oisd_attention_alignment(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, per_head: bool = False
) -> torch.Tensor:
    """OISD attention alignment ("where to look") between two layers' attention rows.

    Default (average heads first): ``K^l_t = JSD(mean_h a^l_{h,t}, SG[mean_h a^L_{h,t}])``.
    ``per_head``: ``K^l_t = mean_h JSD(a^l_{h,t}, SG[a^L_{h,t}])`` (needs the same head
    count in both layers). Rows are probabilities over keys ``<= t``; masked keys are
    exact zeros, which become ``log 0 = -inf`` with a zero (not ``nan``) gradient.

    Args:
        student_attn: ``(n, H, K)`` attention probabilities of layer l at n query tokens.
        teacher_attn: ``(n, H', K)`` the same for the final layer (``H' = H`` for per_head).
        per_head: compare head by head instead of head averages.

    Returns:
        ``(n,)`` JSD in nats, in [0, ln 2].
    """
    if student_attn.dim() != 3 or teacher_attn.dim() != 3:
        raise ValueError(
            "attention must be (n, H, K); got "
            f"{tuple(student_attn.shape)}, {tuple(teacher_attn.shape)}"
        )
    student, teacher = student_attn.float(), teacher_attn.detach().float()
    if per_head:
        _check_same_shape(student_attn=student, teacher_attn=teacher)
        return js_divergence(_safe_log(student), _safe_log(teacher)).mean(-1)  # (n, H) -> (n,)
    if student.shape[0] != teacher.shape[0] or student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"shape mismatch: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    return js_divergence(_safe_log(student.mean(1)), _safe_log(teacher.mean(1)))


def oisd_layer_loss(
    per_layer_divergence: torch.Tensor | Sequence[torch.Tensor],
    weights: torch.Tensor,
    mask: torch.Tensor,
    loss_type: LossType = "token_mean",
    max_len: int | None = None,
) -> torch.Tensor:
    """``L_think`` (or ``L_attn``) = ``aggregate(w_i * mean_{l in S} J^l_{i,t})``.

    Uses the GRPO term's normaliser (:func:`aggregate` with the same ``loss_type``),
    as docs/objectives.md requires for every auxiliary term.

    Args:
        per_layer_divergence: ``(B, T, |S|)`` J (or K) per selected layer, or a list
            of ``|S|`` tensors ``(B, T)``.
        weights: ``(B,)`` from :func:`oisd_weights` (detached here).
        mask: ``(B, T)`` response tokens.
        loss_type: the GRPO ``loss_type``.
        max_len: Dr. GRPO's normaliser (see :func:`aggregate`).

    Returns:
        Scalar loss.
    """
    if not torch.is_tensor(per_layer_divergence):
        if len(per_layer_divergence) == 0:
            raise ValueError("oisd_layer_loss needs at least one layer")
        per_layer_divergence = torch.stack(list(per_layer_divergence), dim=-1)
    if per_layer_divergence.dim() != 3:
        raise ValueError(
            f"per-layer divergence must be (B, T, |S|); got {tuple(per_layer_divergence.shape)}"
        )
    per_token = weights.detach().unsqueeze(-1) * per_layer_divergence.mean(-1)  # (B, T)
    return aggregate(per_token, mask, loss_type, max_len)


def attention_query_rescale(mask: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Rescale of ``L_attn`` when only every k-th response query is kept (``oisd.attn_query_stride``).

    K is zero on the queries that were not kept, so ``aggregate`` averages it over all
    ``sum m`` response tokens; multiplying by ``sum m / sum m_kept`` turns that into the
    mean over the kept queries, the same estimate of ``L_attn`` at a fraction of the cost:
    ``L_attn = (sum m / sum m_kept) * agg(w_i mean_l K^l)``.

    Args:
        mask: ``(B, T)`` response tokens.
        kept: ``(B, T)`` 1 on the kept query rows (a subset of ``mask``).

    Returns:
        Scalar ``sum m / max(sum m_kept, 1)``.
    """
    return mask.sum() / kept.sum().clamp(min=1)


# --------------------------------------------------------------------------- SDPG


def sdpg_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    clamp: float | None = 20.0,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
) -> torch.Tensor:
    """SDPG's on-policy distillation term ``l^OPD_t = min(KL(p_t || SG[q_t]), clamp)``.

    ``KL(p || q) = sum_a p(a) (log p(a) - log q(a))`` exact over the full vocabulary,
    p = student (no privileged context), q = teacher (same model with it), arXiv
    2606.04036. Tokens above the clamp give no gradient.

    Args:
        student_logits: ``(n, V)`` student logits.
        teacher_logits: ``(n, V)`` teacher logits (detached here).
        clamp: upper bound per token (paper 20), or ``None``.
        temperature: sampling temperature of the student, ``p = softmax(z_s / T)``.
        teacher_temperature: the teacher's, ``q = softmax(z_t / T_q)``; ``None`` = the
            student's ``T``. The public SDPG code divides the student's logits only,
            i.e. ``T_q = 1`` (identical at ``T = 1``).

    Returns:
        ``(n,)`` reverse KL in nats.
    """
    _check_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    _check_temperature(temperature)
    teacher_temperature = temperature if teacher_temperature is None else teacher_temperature
    _check_temperature(teacher_temperature)
    log_q = _log_softmax(teacher_logits.detach(), teacher_temperature)
    kl = student_divergence(student_logits, log_q, temperature)  # KL(p || q)
    return kl if clamp is None else kl.clamp(max=clamp)


def sdpg_gate(advantages: torch.Tensor) -> torch.Tensor:
    """SDPG's gate ``m_i = 1[A_i > 0]``: distil only verifier-endorsed responses.

    Args:
        advantages: ``(B,)`` advantages.

    Returns:
        ``(B,)`` float 0/1, detached. Gated-out tokens still count in the
        :func:`aggregate` denominator (apply it as a weight, not as a mask).
    """
    return (advantages.detach() > 0).float()


def sdpg_exclude_stop_tokens(
    per_token: torch.Tensor, tokens: torch.Tensor, stop_ids: Sequence[int]
) -> torch.Tensor:
    """SDPG's opt-in ``e_{i,t} l^OPD_{i,t}`` with ``e_{i,t} = 1[y_{i,t} not in S]``: the
    distillation KL set to 0 wherever the sampled token is a stop token.

    The public code's ``beta_distill_exclude_eos`` (``mask_distill_stop_tokens``,
    yifanzhang-pro/SDPG PR #3): a token-id match on the sampled token, not a position;
    a truncated response has nothing excluded. Applied as a weight, not as a mask: the
    stop token still counts in the :func:`aggregate` denominator, and the other terms
    (the GRPO term, ``L_K``) keep it.

    Args:
        per_token: ``(B, T)`` ``l^OPD`` (or any per-token value).
        tokens: ``(B, T)`` sampled token ids ``y_{i,t}``.
        stop_ids: the stop-token ids S; empty = no-op (``per_token`` itself is returned).

    Returns:
        ``(B, T)`` a new tensor, 0 (value and gradient) at stop tokens.
    """
    if not stop_ids:
        return per_token
    _check_same_shape(per_token=per_token, tokens=tokens)
    stop = torch.isin(tokens, torch.as_tensor(list(stop_ids), dtype=tokens.dtype, device=tokens.device))
    return per_token.masked_fill(stop, 0.0)


def sdpg_beta(
    step: int,
    *,
    beta_base: float = 1e-3,
    t_warm: int = 50,
    t_decay: int = 350,
    total_steps: int = 400,
) -> float:
    """SDPG's coefficient ``beta(k) = beta_base * min(1, k/T_warm) * min(1, (T - k)/T_decay)``.

    Linear warm-up from 0 over ``T_warm`` steps, linear decay to 0 at the last step
    ``T``, clipped at >= 0. ``t_warm = 0`` means no warm-up and ``t_decay = 0`` no decay
    (that factor is 1). Paper defaults: 1e-3, 50, 350, 400.

    Args:
        step: optimiser step ``k`` (>= 0).
        beta_base: peak coefficient.
        t_warm: warm-up length ``T_warm``.
        t_decay: decay length ``T_decay``.
        total_steps: ``T``, the last step.

    Returns:
        ``beta(k)``.
    """
    if step < 0 or t_warm < 0 or t_decay < 0:
        raise ConfigError(f"step, t_warm and t_decay must be >= 0; got {step}, {t_warm}, {t_decay}")
    warm = 1.0 if t_warm == 0 else min(1.0, step / t_warm)
    decay = 1.0 if t_decay == 0 else min(1.0, (total_steps - step) / t_decay)
    return max(0.0, beta_base * warm * decay)


def unnormalized_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, kind: UnnormalizedKL = "ufkl"
) -> torch.Tensor:
    """SDPG's ``L_K`` per sampled token, with ``log w = log pi_theta(y_t) - log pi_ref(y_t)``.

    - ``ufkl`` (paper's best): ``w^-1 + log w``. Unnormalised: its minimum is 1 at
      ``w = 1`` (not 0); only its gradient ``1 - w^-1`` matters. Kept as written.
    - ``urkl`` (public code default): ``0.5 (log w)^2``.
    - ``fkl``: ``w^-1``.
    - ``rkl``: ``0.5 (log w + 1)^2``.

    arXiv 2606.04036. The reference is detached.

    Args:
        logp: ``(B, T)`` log pi_theta of the sampled tokens.
        ref_logp: ``(B, T)`` log pi_ref (the frozen initial model) of the same tokens.
        kind: one of the four above.

    Returns:
        ``(B, T)`` per-token value (pass it to :func:`aggregate`).
    """
    _check_choice("unnormalized KL kind", kind, UNNORMALIZED_KLS)
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    log_w = logp - ref_logp.detach()
    if kind == "ufkl":
        return torch.exp(-log_w) + log_w
    if kind == "urkl":
        return 0.5 * log_w.square()
    if kind == "fkl":
        return torch.exp(-log_w)
    return 0.5 * (log_w + 1.0).square()


# --------------------------------------------------------------------------- RLSD


def rlsd_lambda(step: int, lambda_init: float = 0.5, decay_steps: int = 50) -> float:
    """RLSD's mixing weight: ``lambda(k) = lambda_init * max(0, 1 - k / decay_steps)``.

    Linear decay to 0 over the first ``decay_steps`` steps, after which RLSD is
    GRPO (arXiv 2604.03128). ``decay_steps = 0`` means no decay (constant
    ``lambda_init``), like ``t_decay = 0`` in :func:`sdpg_beta`.

    Args:
        step: optimiser step ``k`` (>= 0).
        lambda_init: ``lambda`` at step 0.
        decay_steps: steps to reach 0.

    Returns:
        ``lambda(k)``.
    """
    if step < 0 or decay_steps < 0:
        raise ConfigError(f"step and decay_steps must be >= 0; got {step}, {decay_steps}")
    if decay_steps == 0:
        return lambda_init
    return lambda_init * max(0.0, 1.0 - step / decay_steps)


def rlsd_token_advantages(
    advantages: torch.Tensor,
    teacher_logp: torch.Tensor,
    student_logp: torch.Tensor,
    lam: float,
    eps_w: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLSD's token-level advantage: the verifier sets the sign, the teacher the size.

    ``Delta_t = clamp(SG[log P_T(y_t) - log P_S(y_t)], -20, 20)``,
    ``w_t = exp(sign(A_i) Delta_t)``,
    ``A_hat_{i,t} = A_i ((1 - lambda) + lambda clip(w_t, 1 - eps_w, 1 + eps_w))``
    (arXiv 2604.03128). For ``A < 0`` a token the teacher finds *less* likely than
    the student does (``Delta < 0``) gets a larger penalty. ``A_hat`` replaces ``A`` in
    :func:`grpo_surrogate`.

    Args:
        advantages: ``(B,)`` sequence advantages.
        teacher_logp: ``(B, T)`` log-prob of the sampled token under the teacher
            (privileged context).
        student_logp: ``(B, T)`` the same under the current student.
        lam: ``lambda`` from :func:`rlsd_lambda`.
        eps_w: clip range of ``w``.

    Returns:
        ``(A_hat, w)``, both ``(B, T)`` and detached; ``w`` unclipped (for logging
        ``rlsd/w_mean``).
    """
    _check_same_shape(teacher_logp=teacher_logp, student_logp=student_logp)
    if not 0.0 <= eps_w < 1.0:
        raise ConfigError(f"eps_w must be in [0, 1); got {eps_w}")
    adv = _per_token(advantages, student_logp).float()  # (B, 1)
    delta = (teacher_logp.detach() - student_logp.detach()).float().clamp(-DELTA_CLAMP, DELTA_CLAMP)
    w = torch.exp(torch.sign(adv) * delta)  # (B, T)
    a_hat = adv * ((1.0 - lam) + lam * w.clamp(1.0 - eps_w, 1.0 + eps_w))
    return a_hat, w


# --------------------------------------------------------------------------- OPSD


def opsd_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """OPSD's generalised JSD ``JSD_beta(q, p) = beta KL(q || M) + (1 - beta) KL(p || M)``.

    ``M = beta q + (1 - beta) p``, q = teacher (detached), p = student, full vocabulary
    (arXiv 2601.18734). ``beta = 0.5`` is the symmetric JSD.

    Args:
        student_logits: ``(n, V)`` student logits (no privileged context).
        teacher_logits: ``(n, V)`` teacher logits (with the reference solution).
        beta: weight of the teacher in the mixture, in (0, 1).
        temperature: applied to both.

    Returns:
        ``(n,)`` divergence in nats.
    """
    _check_same_shape(student_logits=student_logits, teacher_logits=teacher_logits)
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"OPSD beta must be in (0, 1); got {beta}")
    _check_temperature(temperature)
    log_q = _log_softmax(teacher_logits.detach(), temperature)
    # beta is the teacher's weight, as in generalized_jsd(log_q, log_p, beta).
    return student_divergence(student_logits, log_q, temperature, beta=beta)


# ----------------------------------------------------------- chunked (large vocabularies)


def sampled_token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The log-probability of each sampled token, and the distribution's entropy.

    ``logp_t = log softmax(z_t / T)[y_t]`` (float32, with gradient: the policy term's
    ``log pi_theta``, or a teacher's / reference's ``log P(y_t)`` when ``z`` is
    detached) and ``H_t = -sum_a p_t(a) log p_t(a)`` (detached, the ``entropy`` metric).

    Args:
        logits: ``(n, V)`` logits (finite, as an unembedding gives them).
        tokens: ``(n,)`` sampled token ids.
        temperature: sampling temperature (logits are divided by it, as in TRL).
        with_entropy: also compute the entropy (one more pass over ``(n, V)``).

    Returns:
        ``(logp, entropy)``, both ``(n,)`` float32; entropy detached, ``None`` unless
        ``with_entropy``.
    """
    if tokens.shape != logits.shape[:1]:
        raise ValueError(f"tokens must be ({logits.shape[0]},); got {tuple(tokens.shape)}")
    log_probs = _log_softmax(logits, temperature)  # (n, V) float32
    selected = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (n,)
    if not with_entropy:
        return selected, None
    with torch.no_grad():
        # Finite log-probs (finite logits): H = -<p, log p> in one pass, no 0 log 0 guard.
        ent = -(log_probs.exp() * log_probs).sum(-1)
    return selected, ent


# --------------------------------------------------------------------------- helpers


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive; got {temperature}")


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(z / T)`` in float32 (bf16 logits lose too much for divergences)."""
    _check_temperature(temperature)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def _safe_log(probs: torch.Tensor) -> torch.Tensor:
    """``log p`` with ``log 0 = -inf`` and a zero gradient there (plain ``log`` gives nan)."""
    positive = probs > 0
    return torch.where(positive, torch.where(positive, probs, 1.0).log(), -math.inf)
