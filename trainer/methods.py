"""The method table: what each objective needs, and its whole loss on one screen.

Every method is one :class:`MethodSpec` in :data:`METHODS`: which auxiliary terms it
has, who its teacher is, whether it keeps the reward term, and its *composer*, a
function that adds up the pure objective functions of :mod:`trainer.objectives` into
named, weighted loss terms. Both backends call the same composer, through
:meth:`trainer.loss.LossComputer.micro_loss`, on the output of the chunked
full-vocabulary pass, so no term has a second copy. The equations, symbols and
defaults are in ``docs/objectives.md``.

A composer takes a :class:`LossInputs` and returns ``{name: Term}``; the loss is
``sum(term.coef * term.value)``, ``loss/<name>`` logs ``term.value`` and the gradient
share ``grad_share/<name>`` is measured per term (:func:`gradient_shares`).
No code outside this module branches on a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from trainer import objectives as obj

Teacher = Literal["none", "current_hinted", "frozen_copy_hinted", "initial_hinted"]


@dataclass(frozen=True)
class Term:
    """One weighted loss term: it contributes ``coef * value`` to the loss."""

    coef: float
    value: torch.Tensor  # scalar, this micro-batch's share of the mini-batch aggregate


@dataclass
class LossInputs:
    """Everything a composer reads, as ``(b, R)`` grids over one micro-batch's responses.

    Attributes:
        cfg: the run's :class:`~trainer.config.TrainConfig`.
        logp: log pi_theta of each sampled token (with gradient).
        old_logp: log pi_old of the same tokens (``SG[logp]`` when on-policy).
        mask: 1 on response tokens.
        advantages: ``(b,)`` group advantages A_i.
        aggregate: the GRPO ``loss_type`` aggregate times ``scale`` (every term shares
            the GRPO normaliser).
        scale: this micro-batch's count over the global mini-batch's (tokens for
            token-mean, sequences otherwise): micro-batch aggregates times it add up to
            the mini-batch aggregate.
        vocab: per-token outputs of the chunked full-vocabulary pass, by name:
            ``teacher`` (the method's teacher term), ``ref_logp`` (the reference's
            log-prob of the sampled token).
        lens: OISD's J^l per selected layer l (``{l: (b, R)}``), or ``{}``.
        attn: OISD's K^l per selected layer (zeros on queries not kept), or ``[]``.
        attn_rescale: ``attention_query_rescale`` of the kept queries (1 without a stride).
        schedules: this step's scheduled weights, by metric name (``sched/beta``, ...).
        tokens_share: this micro-batch's share of the mini-batch's response tokens
            (token-mean metrics add up over micro-batches with it).
        seq_share: the same for sequences.
        logs: metrics the composer adds (detached scalars).
        tokens: the sampled response token ids ``y_{i,t}`` (pad after EOS), or None.
        stop_ids: the stop-token ids (:func:`stop_token_ids`): SDPG's ``exclude_eos``.
    """

    cfg: object
    logp: torch.Tensor
    old_logp: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    aggregate: Callable[[torch.Tensor], torch.Tensor]
    scale: torch.Tensor | float
    vocab: dict[str, torch.Tensor]
    lens: dict[int, torch.Tensor] = field(default_factory=dict)
    attn: list[torch.Tensor] = field(default_factory=list)
    attn_rescale: torch.Tensor | float = 1.0
    schedules: dict[str, float] = field(default_factory=dict)
    tokens_share: torch.Tensor | float = 1.0
    seq_share: torch.Tensor | float = 1.0
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    stop_ids: tuple[int, ...] = ()


Terms = dict[str, Term]


# --------------------------------------------------------------------------- building blocks


def grpo_terms(x: LossInputs, advantages: torch.Tensor | None = None) -> Terms:
    """``L_GRPO = agg(-min(rho A, clip(rho, 1-eps_low, 1+eps_high) A)) [+ kl_coef agg(KL_est)]``.

    ``advantages`` replaces A (RLSD's per-token A_hat). The KL to the frozen reference
    is logged as ``kl`` whenever a reference exists, and is a term only when
    ``grpo.kl_coef > 0``.
    """
    g = x.cfg.grpo
    A = x.advantages if advantages is None else advantages
    per_tok, stats = obj.grpo_surrogate(x.logp, x.old_logp, A, x.mask, eps_low=g.eps_low,
                                        eps_high=g.eps_high, dual_clip=g.dual_clip, clip=g.clip)
    x.logs["clip_ratio/region_mean"] = stats["clip_ratio/region_mean"] * x.tokens_share
    return {"policy": Term(1.0, x.aggregate(per_tok))} | reference_kl_terms(x)


def reference_kl_terms(x: LossInputs) -> Terms:
    """``kl_coef agg(KL_est(pi_theta || pi_ref))`` on the sampled token (``grpo.kl_estimator``).

    Logged as ``kl`` whenever a reference exists; a term only when ``grpo.kl_coef > 0``.
    """
    if "ref_logp" not in x.vocab:
        return {}
    g = x.cfg.grpo
    kl = x.aggregate(obj.reference_kl(x.logp, x.vocab["ref_logp"], g.kl_estimator))
    x.logs["kl"] = kl.detach()
    return {"kl": Term(g.kl_coef, kl)} if g.kl_coef > 0 else {}


def oisd_terms(x: LossInputs) -> Terms:
    """``lambda_logit L_think + lambda_attn L_attn`` (arXiv 2605.29089).

    ``L_think = agg(w_i mean_{l in S} JSD(p^l, SG[p^L]))``,
    ``L_attn = agg(w_i mean_{l in S} JSD(mean_h a^l, SG[mean_h a^L])) * rescale``,
    with ``w_i`` = :func:`~trainer.objectives.oisd_weights` (``oisd.weight``) and the
    rescale of :func:`~trainer.objectives.attention_query_rescale` for strided queries.
    """
    c, g = x.cfg.oisd, x.cfg.grpo
    w = obj.oisd_weights(x.advantages, c.weight)
    terms = {}
    think = [x.lens[l] for l in sorted(x.lens)]
    if think:
        terms["think"] = Term(c.lambda_logit,
                              obj.oisd_layer_loss(think, w, x.mask, g.loss_type, x.cfg.rollout.max_new_tokens) * x.scale)
    if x.attn:
        terms["attn"] = Term(c.lambda_attn, obj.oisd_layer_loss(x.attn, w, x.mask, g.loss_type, x.cfg.rollout.max_new_tokens)
                             * x.scale * x.attn_rescale)
    return terms


def sdpg_terms(x: LossInputs) -> Terms:
    """``beta(k) L_OPD+ + alpha L_K`` (arXiv 2606.04036).

    ``L_OPD+ = agg(1[A_i > 0] e_{i,t} min(KL(p || SG[q]), 20))`` with q the current model
    given the hint (gate off: every response), ``e_{i,t} = 0`` where the sampled token is a
    stop token and ``sdpg.exclude_eos`` is on, else 1 (the stop token stays in the
    denominator); ``L_K = agg(unnormalised KL(pi_theta, pi_ref))`` on the sampled token
    (``sdpg.ref_kl``), never masked.
    """
    c = x.cfg.sdpg
    beta = x.schedules["sched/beta"]
    gate = obj.sdpg_gate(x.advantages) if c.gate else torch.ones_like(x.advantages)
    x.logs["sdpg/gate_fraction"] = gate.mean() * x.seq_share
    if c.exclude_eos:
        if x.tokens is None or not x.stop_ids:
            raise ValueError("sdpg.exclude_eos needs the sampled tokens and the stop-token ids in LossInputs")
        stop = torch.isin(x.tokens, torch.as_tensor(x.stop_ids, dtype=x.tokens.dtype, device=x.tokens.device))
        x.logs["sdpg/stop_fraction"] = (stop * x.mask).sum() / x.mask.sum().clamp(min=1) * x.tokens_share
    terms = {}
    if beta > 0:
        opd = x.vocab["teacher"]
        if c.exclude_eos:
            opd = obj.sdpg_exclude_stop_tokens(opd, x.tokens, x.stop_ids)
        terms["opd"] = Term(beta, x.aggregate(gate[:, None] * opd))
    if c.alpha > 0:
        terms["ref_kl"] = Term(c.alpha, x.aggregate(obj.unnormalized_kl(x.logp, x.vocab["ref_logp"], c.ref_kl)))
    return terms


# --------------------------------------------------------------------------- composers (one per method)


def compose_grpo(x: LossInputs) -> Terms:
    """GRPO: ``L = L_GRPO``."""
    return grpo_terms(x)


def compose_oisd(x: LossInputs) -> Terms:
    """OISD: ``L = L_GRPO + lambda_logit L_think + lambda_attn L_attn``."""
    return grpo_terms(x) | oisd_terms(x)


def compose_sdpg(x: LossInputs) -> Terms:
    """SDPG: ``L = L_GRPO + beta(k) L_OPD+ + alpha L_K``."""
    return grpo_terms(x) | sdpg_terms(x)


def compose_oisd_sdpg(x: LossInputs) -> Terms:
    """OISD + SDPG: ``L = L_GRPO + beta(k) L_OPD+ + alpha L_K + lambda_logit L_think + lambda_attn L_attn``."""
    return grpo_terms(x) | sdpg_terms(x) | oisd_terms(x)


def compose_rlsd(x: LossInputs) -> Terms:
    """RLSD (arXiv 2604.03128): ``L = L_GRPO`` with ``A_hat = A ((1-lambda) + lambda clip(exp(sign(A) Delta), 1 +- eps_w))``,
    ``Delta = SG[log P_T(y_t) - log P_S(y_t)]``, teacher = a frozen copy given the hint."""
    A_hat, w = obj.rlsd_token_advantages(x.advantages, x.vocab["teacher"], x.logp.detach(),
                                         x.schedules["sched/lambda"], x.cfg.rlsd.eps_w)
    x.logs["rlsd/w_mean"] = (w * x.mask).sum() / x.mask.sum().clamp(min=1) * x.tokens_share
    return grpo_terms(x, A_hat)


def compose_opsd(x: LossInputs) -> Terms:
    """OPSD (arXiv 2601.18734): ``L = agg(JSD_beta(SG[q], p))``, q = the initial model given the
    solution; no reward term."""
    return {"policy": Term(1.0, x.aggregate(x.vocab["teacher"]))} | reference_kl_terms(x)


# --------------------------------------------------------------------------- teacher terms (per token, full vocabulary)


def _sdpg_teacher(z, q, tokens, cfg, T):
    return obj.sdpg_reverse_kl(z, q, clamp=cfg.sdpg.kl_clamp, temperature=T,
                               teacher_temperature=cfg.sdpg.teacher_temperature)


def _rlsd_teacher(z, q, tokens, cfg, T):
    return obj.sampled_token_logprobs(q, tokens, T, with_entropy=False)[0]


def _opsd_teacher(z, q, tokens, cfg, T):
    return obj.opsd_jsd(z, q, beta=cfg.opsd.beta, temperature=T)


def _sdpg_schedule(cfg, step: int) -> dict[str, float]:
    s = cfg.sdpg
    return {"sched/beta": obj.sdpg_beta(step + s.step_offset, beta_base=s.beta_base, t_warm=s.t_warm, t_decay=s.t_decay,
                                        total_steps=s.total_steps or cfg.steps)}


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """The stop-token ids S of SDPG's ``exclude_eos``, as the public code collects them
    (``RayPPOTrainer._stop_token_ids``): ``tokenizer.eos_token_id`` and, if the tokenizer
    carries one, its ``generation_config.eos_token_id``; either may be a list. In order,
    without repeats or None."""
    ids: list[int] = []
    for src in (getattr(tokenizer, "eos_token_id", None),
                getattr(getattr(tokenizer, "generation_config", None), "eos_token_id", None)):
        if src is not None:
            ids.extend(src if isinstance(src, (list, tuple)) else [src])
    return tuple(dict.fromkeys(int(t) for t in ids if t is not None))


def _rlsd_schedule(cfg, step: int) -> dict[str, float]:
    return {"sched/lambda": obj.rlsd_lambda(step, cfg.rlsd.lambda_init, cfg.rlsd.lambda_decay_steps)}


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class MethodSpec:
    """One method.

    Attributes:
        name: the config's ``method``.
        loss: the composer.
        oisd: has OISD's intermediate-layer terms (``oisd.*`` keys apply).
        sdpg: has SDPG's gated OPD and L_K terms (``sdpg.*`` keys apply).
        teacher: who scores the student's response with privileged context:
            ``current_hinted`` (the policy itself, no gradient), ``frozen_copy_hinted``
            (a copy re-synced every ``rlsd.sync_every`` steps), ``initial_hinted``
            (the frozen initial model), or ``none``.
        needs_solution: the teacher's context is the worked solution, not only the answer.
        teacher_term: per-token function ``(z, q, tokens, cfg, T) -> (m,)`` of the student's
            logits z and the teacher's q, computed in the chunked vocabulary pass.
        schedule: ``(cfg, step) -> {metric: weight}``, the step's scheduled weights.
        reward_term: the loss keeps GRPO's reward term (OPSD's does not).
        coefficients: the config keys weighting its auxiliary terms; with all of them 0 the
            method's loss and gradients are GRPO's exactly (tested for every method that has any).
        baseline: the plain RL baseline the other methods are compared with (run.json's
            ``baseline``; ``oisd compare`` and the dashboard read it, never the name).
        config: the bundled config (``configs/<config>.yaml``) the method's name stands for
            (``--config sdpg``, the demo, the benchmarks); its own name when None.
    """

    name: str
    loss: Callable[[LossInputs], Terms]
    oisd: bool = False
    sdpg: bool = False
    teacher: Teacher = "none"
    needs_solution: bool = False
    teacher_term: Callable | None = None
    schedule: Callable[[object, int], dict[str, float]] = lambda cfg, step: {}
    reward_term: bool = True
    coefficients: tuple[str, ...] = ()
    baseline: bool = False
    config: str | None = None

    @property
    def needs_hint(self) -> bool:
        return self.teacher != "none"

    @property
    def needs_frozen_copy(self) -> bool:
        """The teacher is a frozen copy of the policy, re-synced every :meth:`sync_every` steps;
        it is part of the trainer state (saved with every checkpoint, restored on resume)."""
        return self.teacher == "frozen_copy_hinted"

    def sync_every(self, cfg) -> int | None:
        """Steps between re-syncs of the frozen-copy teacher from the policy (``rlsd.sync_every``);
        None for a method without one."""
        return cfg.rlsd.sync_every if self.needs_frozen_copy else None

    def needs_reference(self, cfg) -> bool:
        """A frozen initial model is kept only when a term uses it."""
        return cfg.grpo.kl_coef > 0 or (self.sdpg and cfg.sdpg.alpha > 0) or self.teacher == "initial_hinted"

    def uses_lens(self, cfg) -> bool:
        """OISD's logit alignment is on: the selected blocks' hidden states are read out."""
        return self.oisd and cfg.oisd.lambda_logit > 0

    def uses_attention(self, cfg) -> bool:
        """OISD's attention alignment is on: the selected blocks' (and the final block's)
        attention rows are computed (``trainer.forward.enable_selective_attention``)."""
        return self.oisd and cfg.oisd.lambda_attn > 0

    def teacher_model(self, policy: torch.nn.Module, frozen_copy: torch.nn.Module | None,
                      reference: torch.nn.Module | None) -> torch.nn.Module:
        """The model that plays this method's teacher (given the hint)."""
        model = {"current_hinted": policy, "frozen_copy_hinted": frozen_copy,
                 "initial_hinted": reference}[self.teacher]
        if model is None:
            raise ValueError(f"method '{self.name}': its teacher ({self.teacher}) was not built")
        return model

    def teacher_active(self, cfg, schedules: dict[str, float]) -> bool:
        """Whether this step needs the teacher forward (SDPG's teacher is idle while beta = 0)."""
        return self.needs_hint and schedules.get("sched/beta", 1.0) > 0


_OISD_COEFS = ("oisd.lambda_logit", "oisd.lambda_attn")
_SDPG_COEFS = ("sdpg.beta_base", "sdpg.alpha")

METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("grpo", compose_grpo, baseline=True),
        MethodSpec("oisd", compose_oisd, oisd=True, coefficients=_OISD_COEFS),
        # SDPG is bundled in two L_K forms; the name stands for the paper's best, ufkl.
        MethodSpec("sdpg", compose_sdpg, sdpg=True, teacher="current_hinted", teacher_term=_sdpg_teacher,
                   schedule=_sdpg_schedule, coefficients=_SDPG_COEFS, config="sdpg-ufkl"),
        MethodSpec("rlsd", compose_rlsd, teacher="frozen_copy_hinted", teacher_term=_rlsd_teacher,
                   schedule=_rlsd_schedule, coefficients=("rlsd.lambda_init",)),
        MethodSpec("opsd", compose_opsd, teacher="initial_hinted", needs_solution=True, teacher_term=_opsd_teacher,
                   reward_term=False),
        MethodSpec("oisd+sdpg", compose_oisd_sdpg, oisd=True, sdpg=True, teacher="current_hinted",
                   teacher_term=_sdpg_teacher, schedule=_sdpg_schedule, coefficients=_OISD_COEFS + _SDPG_COEFS),
    )
}
METHOD_NAMES = tuple(METHODS)


def spec_of(method: str) -> MethodSpec:
    return METHODS[method]


# --------------------------------------------------------------------------- gradient shares


def gradient_shares(terms: Terms, params: list[torch.nn.Parameter]) -> dict[str, float]:
    """Each term's share of the gradient over ``params``: ``||g_k|| / sum_j ||g_j||``.

    ``g_k`` is the gradient of ``coef_k * value_k`` alone. The shares add up to 1; a
    term whose share is 0.01 moves the parameters a hundredth as much as all terms
    together would if their gradients were aligned. Terms with no path to ``params``
    count as 0. The graph is kept (``retain_graph``) for the real backward.

    Returns:
        ``{name: share}`` for every term with a non-zero coefficient.
    """
    norms = {}
    for name, t in terms.items():
        if t.coef == 0 or not t.value.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(t.coef * t.value, params, retain_graph=True, allow_unused=True)
        sq = sum(float((g.detach().float() ** 2).sum()) for g in grads if g is not None)
        norms[name] = sq ** 0.5
    total = sum(norms.values())
    return {name: (n / total if total > 0 else 0.0) for name, n in norms.items()}
