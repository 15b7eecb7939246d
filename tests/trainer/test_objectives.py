"""Each objective of docs/objectives.md against numbers worked out by hand (in comments)."""

import math

import pytest
import torch

from trainer import objectives as obj
from workbench.errors import ConfigError

LN2 = math.log(2.0)


def close(actual, expected, atol=1e-5):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(torch.as_tensor(actual).float(), expected, atol=atol, rtol=0)


def kl(p, q):
    """KL(p || q) of two short probability lists, by hand."""
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# --------------------------------------------------------------------------- GRPO


def test_group_advantages_group_scale_uses_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3); group 2: all equal.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    close(obj.group_advantages(rewards, 4, "group"), [a, -a, -a, a, 0, 0, 0, 0])


def test_group_advantages_batch_and_none():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    # batch: mean 0.75; squared deviations 6 * 0.0625 + 2 * 0.5625 = 1.5; unbiased var 1.5 / 7.
    a = 0.5 / (math.sqrt(1.5 / 7) + 1e-6)
    close(obj.group_advantages(rewards, 4, "batch"), [a, -a, -a, a, 0, 0, 0, 0])
    close(obj.group_advantages(rewards, 4, "none"), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    # integer rewards are accepted
    close(obj.group_advantages(torch.tensor([2, 0]), 2, "none"), [1.0, -1.0])


def test_frac_zero_std():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.0])
    assert obj.frac_zero_std(rewards, 2) == pytest.approx(0.5)  # groups 2 and 3 are constant
    assert obj.frac_zero_std(rewards, 4) == pytest.approx(0.0)


def test_group_advantages_bad_input():
    with pytest.raises(ConfigError, match="scale_rewards"):
        obj.group_advantages(torch.zeros(4), 2, "std")
    with pytest.raises(ValueError, match="multiple"):
        obj.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ConfigError, match="group_size"):
        obj.group_advantages(torch.zeros(4), 1)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
RAGGED = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_aggregate_three_loss_types():
    close(obj.aggregate(PER_TOKEN, RAGGED, "token_mean"), (1 + 2 + 3 + 5) / 4)  # 2.75
    close(obj.aggregate(PER_TOKEN, RAGGED, "seq_mean_token_mean"), (6 / 3 + 5 / 1) / 2)  # 3.5
    close(obj.aggregate(PER_TOKEN, RAGGED, "seq_mean_token_sum_norm"), (6 / 4 + 5 / 4) / 2)
    dr_grpo = obj.aggregate(PER_TOKEN, RAGGED, "seq_mean_token_sum_norm", max_len=8)
    close(dr_grpo, (6 / 8 + 5 / 8) / 2)
    # bool masks work, and padding values (even nan) never leak in
    poisoned = PER_TOKEN.clone()
    poisoned[0, 3] = float("nan")
    close(obj.aggregate(poisoned, RAGGED.bool(), "token_mean"), 2.75)


def test_aggregate_rejects_unknown_loss_type():
    with pytest.raises(ConfigError, match="loss_type"):
        obj.aggregate(PER_TOKEN, RAGGED, "bnpo_typo")


def _surrogate_case(ratios, advantages, **kwargs):
    old = torch.zeros(len(ratios), 1)
    logp = torch.log(torch.tensor(ratios)).unsqueeze(-1).requires_grad_(True)
    mask = torch.ones_like(old)
    loss, stats = obj.grpo_surrogate(logp, old, torch.tensor(advantages), mask, **kwargs)
    loss.sum().backward()
    return loss.squeeze(-1), logp.grad.squeeze(-1), stats


def test_grpo_surrogate_clip_regions():
    # (ratio, A): loss = -min(rA, clip(r, 0.8, 1.28) A), d loss / d logp = -A r when unclipped.
    loss, grad, stats = _surrogate_case([1.5, 0.5, 0.5, 1.5, 1.1], [1.0, 1.0, -1.0, -1.0, 2.0])
    close(loss, [-1.28, -0.5, 0.8, 1.5, -2.2])
    close(grad, [0.0, -0.5, 0.0, 1.5, -2.2])
    # TRL's stats: high = r > 1.28 with A > 0 (token 0); low = r < 0.8 with A < 0 (token 2).
    close(stats["clip_ratio/high_mean"], 1 / 5)
    close(stats["clip_ratio/low_mean"], 1 / 5)
    close(stats["clip_ratio/region_mean"], 2 / 5)
    assert "clip_ratio/dual_mean" not in stats


def test_grpo_surrogate_dual_clip():
    # c = 3: for A < 0, loss = min(max(-rA, -clip(r)A), -cA).
    loss, grad, stats = _surrogate_case([5.0, 2.0, 5.0], [-1.0, -1.0, 2.0], dual_clip=3.0)
    close(loss, [3.0, 2.0, -2.56])  # capped at 3|A|; below the cap; A > 0 untouched (-1.28*2)
    close(grad, [0.0, 2.0, 0.0])
    close(stats["clip_ratio/dual_mean"], 1 / 3)
    loss_no_dual, _, _ = _surrogate_case([5.0], [-1.0])
    close(loss_no_dual, [5.0])
    with pytest.raises(ConfigError, match="dual_clip"):
        _surrogate_case([1.0], [1.0], dual_clip=0.5)


def test_grpo_surrogate_stats_use_the_mask():
    logp = torch.log(torch.tensor([[1.5, 1.5, 1.5]]))
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    loss, stats = obj.grpo_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]), mask)
    close(stats["clip_ratio/high_mean"], 1.0)  # 1 of 1 response token, padding ignored
    close(loss, [[-1.28, 0.0, 0.0]])


def test_grpo_surrogate_none_is_reinforce():
    logp = torch.tensor([[-0.5, -1.0], [-2.0, -0.1]], requires_grad=True)
    adv = torch.tensor([0.7, -1.3], requires_grad=True)
    loss, stats = obj.grpo_surrogate(logp, None, adv, torch.ones(2, 2), clip="none")
    close(loss, [[0.35, 0.7], [-2.6, -0.13]])  # -A * logp
    loss.sum().backward()
    close(logp.grad, [[-0.7, -0.7], [1.3, 1.3]])  # -A d logp
    assert adv.grad is None  # SG[A]
    assert all(v.item() == 0 for v in stats.values())


def test_grpo_surrogate_on_policy_gradient_and_padding_safety():
    # old_logp = None means SG[logp]: ratio 1, gradient -A d logp.
    logp = torch.tensor([[-0.5, -1.0]], requires_grad=True)
    loss, _ = obj.grpo_surrogate(logp, None, torch.tensor([2.0]), torch.ones(1, 2))
    close(loss, [[-2.0, -2.0]])
    loss.sum().backward()
    close(logp.grad, [[-2.0, -2.0]])
    # garbage log-probs on padding cannot produce inf/nan gradients
    logp = torch.tensor([[-0.5, 80.0]], requires_grad=True)
    old = torch.tensor([[-0.5, -80.0]])
    loss, _ = obj.grpo_surrogate(logp, old, torch.tensor([-1.0]), torch.tensor([[1.0, 0.0]]))
    obj.aggregate(loss, torch.tensor([[1.0, 0.0]])).backward()
    assert torch.isfinite(logp.grad).all()
    close(logp.grad, [[1.0, 0.0]])


def test_grpo_surrogate_token_level_advantages():
    logp = torch.zeros(1, 2)
    loss, _ = obj.grpo_surrogate(logp, logp, torch.tensor([[1.0, -2.0]]), torch.ones(1, 2))
    close(loss, [[-1.0, 2.0]])


def test_reference_kl_estimators():
    # pi = 0.5, pi_ref = 0.25: log r = ref - logp = -ln 2.
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    close(obj.reference_kl(logp, ref, "k1"), [[LN2]])
    close(obj.reference_kl(logp, ref, "k2"), [[0.5 * LN2**2]])  # 0.2402
    close(obj.reference_kl(logp, ref, "k3"), [[0.5 + LN2 - 1.0]])  # 0.1931
    close(obj.reference_kl(ref, ref, "k3"), [[0.0]])


# --------------------------------------------------------------------------- OISD


def test_oisd_weights():
    a = torch.tensor([1.5, -0.5, 0.0])
    close(obj.oisd_weights(a, "signed"), [1.5, -0.5, 0.0])
    close(obj.oisd_weights(a, "sign"), [1.0, -1.0, 0.0])
    close(obj.oisd_weights(a, "positive"), [1.5, 0.0, 0.0])
    close(obj.oisd_weights(a, "abs"), [1.5, 0.5, 0.0])
    with pytest.raises(ConfigError):
        obj.oisd_weights(a, "relu")


# p = (0.5, 0.5) against q = (0.9, 0.1): M = (0.7, 0.3).
P, Q = [0.5, 0.5], [0.9, 0.1]
JSD_PQ = 0.5 * kl(P, [0.7, 0.3]) + 0.5 * kl(Q, [0.7, 0.3])  # 0.10175


def test_oisd_logit_alignment_value_and_gradient_flow():
    student = torch.log(torch.tensor([P])).requires_grad_(True)
    teacher = torch.log(torch.tensor([Q])).requires_grad_(True)
    j = obj.oisd_logit_alignment(student, teacher)
    close(j, [JSD_PQ])
    close(JSD_PQ, 0.10175, atol=1e-5)
    j.sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None  # SG[p^L]


def test_oisd_logit_alignment_temperature_and_bound():
    # temperature 2 on logits log(P), log(Q) is the same as comparing sqrt-normalised lists
    root = [math.sqrt(0.9), math.sqrt(0.1)]
    q2 = [r / sum(root) for r in root]
    m2 = [(0.5 + q2[0]) / 2, (0.5 + q2[1]) / 2]
    expected = 0.5 * kl(P, m2) + 0.5 * kl(q2, m2)
    student, teacher = torch.log(torch.tensor([P])), torch.log(torch.tensor([Q]))
    close(obj.oisd_logit_alignment(student, teacher, temperature=2.0), [expected])
    # disjoint supports reach the ln 2 bound
    far = obj.oisd_logit_alignment(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]))
    close(far, [LN2], atol=1e-4)


def test_oisd_attention_alignment_mean_heads_vs_per_head():
    # student heads (1, 0) and (0, 1) average to (0.5, 0.5) = the teacher's average.
    student = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], requires_grad=True)  # (n=1, H=2, K=2)
    teacher = torch.tensor([[[0.5, 0.5], [0.5, 0.5]]], requires_grad=True)
    close(obj.oisd_attention_alignment(student, teacher), [0.0])
    # per head: JSD((1, 0), (0.5, 0.5)), M = (0.75, 0.25), the same for both heads.
    per_head = 0.5 * kl([1.0, 0.0], [0.75, 0.25]) + 0.5 * kl([0.5, 0.5], [0.75, 0.25])
    close(per_head, 0.215762, atol=1e-6)
    k = obj.oisd_attention_alignment(student, teacher, per_head=True)
    close(k, [per_head])
    k.sum().backward()
    assert torch.isfinite(student.grad).all()  # exact zeros (masked keys) give no nan
    assert teacher.grad is None


def test_oisd_attention_alignment_masked_keys():
    # Causal masking: key 2 is 0 in both; the value is the JSD over the first two keys.
    student = torch.tensor([[[0.5, 0.5, 0.0]]], requires_grad=True)
    teacher = torch.tensor([[[0.9, 0.1, 0.0]]])
    k = obj.oisd_attention_alignment(student, teacher)
    close(k, [JSD_PQ])
    k.sum().backward()
    assert torch.isfinite(student.grad).all()
    close(student.grad[0, 0, 2], 0.0)


def test_oisd_layer_loss_uses_the_grpo_normaliser():
    # J for two layers, averaged: [[1, 2], [3, x]] with the second sequence's last token padded.
    j = torch.tensor([[[1.0, 3.0], [2.0, 2.0]], [[3.0, 3.0], [9.0, 9.0]]])  # (B=2, T=2, |S|=2)
    weights = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    # per token w * mean_l J: [[4, 4], [-3, pad]]; token mean = 5 / 3
    close(obj.oisd_layer_loss(j, weights, mask), 5 / 3)
    close(obj.oisd_layer_loss([j[..., 0], j[..., 1]], weights, mask), 5 / 3)
    close(obj.oisd_layer_loss(j, weights, mask, "seq_mean_token_mean"), (4 + -3) / 2)
    close(obj.oisd_layer_loss(j, weights, mask, "seq_mean_token_sum_norm"), (8 / 2 - 3 / 2) / 2)


# --------------------------------------------------------------------------- SDPG


def test_sdpg_reverse_kl_value_clamp_and_no_teacher_gradient():
    student = torch.log(torch.tensor([P])).requires_grad_(True)
    teacher = torch.log(torch.tensor([Q])).requires_grad_(True)
    value = obj.sdpg_reverse_kl(student, teacher)
    close(value, [kl(P, Q)])  # 0.5 ln(5/9) + 0.5 ln 5 = 0.5108
    close(kl(P, Q), 0.510826, atol=1e-6)
    value.sum().backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None

    # KL(p || q) ~ 30 nats here: clamped to 20, and no gradient beyond the clamp.
    student = torch.tensor([[30.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 30.0]])
    clamped = obj.sdpg_reverse_kl(student, teacher)
    close(clamped, [20.0])
    clamped.sum().backward()
    close(student.grad, [[0.0, 0.0]])
    close(obj.sdpg_reverse_kl(student, teacher, clamp=None), [30.0], atol=1e-4)


def test_sdpg_reverse_kl_teacher_temperature():
    # T = 0.5, z_s = z_t = [0, ln 2]. Student p = softmax([0, 2 ln 2]) = [1/5, 4/5].
    # Teacher at T (default): the same distribution, KL = 0. Teacher undivided (T_q = 1, the
    # public code): q = softmax([0, ln 2]) = [1/3, 2/3],
    # KL = 0.2 ln(0.6) + 0.8 ln(1.2) = -0.102165 + 0.145857 = 0.043692.
    z = torch.tensor([[0.0, LN2]])
    close(obj.sdpg_reverse_kl(z, z, temperature=0.5), [0.0])
    close(obj.sdpg_reverse_kl(z, z, temperature=0.5, teacher_temperature=1.0), [0.043692], atol=1e-6)
    close(kl([0.2, 0.8], [1 / 3, 2 / 3]), 0.043692, atol=1e-6)
    # At T = 1 both conventions are the same number.
    close(obj.sdpg_reverse_kl(torch.log(torch.tensor([P])), torch.log(torch.tensor([Q])), teacher_temperature=1.0),
          [kl(P, Q)])


def test_sdpg_exclude_stop_tokens_public_test_vectors():
    """The public code's own test vectors (tests/test_sdpg_eos_exclusion_on_cpu.py, SDPG PR #3)."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = obj.sdpg_exclude_stop_tokens(values, torch.tensor([[10, 2, 11], [2, 12, 13]]), [2])
    close(out, [[1.0, 0.0, 3.0], [0.0, 5.0, 6.0]])
    close(values, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # the input is not mutated
    # several stop ids: every sampled token equal to any of them, wherever it sits
    close(obj.sdpg_exclude_stop_tokens(torch.ones(1, 4), torch.tensor([[2, 7, 3, 9]]), (2, 3)), [[0.0, 1.0, 0.0, 1.0]])
    for empty in ([], ()):
        assert obj.sdpg_exclude_stop_tokens(values, torch.zeros(2, 3, dtype=torch.long), empty) is values
    # zero gradient at the stop token, 1 elsewhere
    leaf = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    obj.sdpg_exclude_stop_tokens(leaf, torch.tensor([[5, 2, 6]]), [2]).sum().backward()
    close(leaf.grad, [[1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="shape"):
        obj.sdpg_exclude_stop_tokens(values, torch.tensor([[2, 2]]), [2])


def test_sdpg_gate():
    close(obj.sdpg_gate(torch.tensor([0.5, 0.0, -0.2])), [1.0, 0.0, 0.0])


def test_sdpg_beta_paper_schedule():
    beta = [obj.sdpg_beta(k) for k in (0, 25, 50, 200, 400)]
    # 1e-3 * min(1, k/50) * min(1, (400 - k)/350)
    assert beta == pytest.approx([0.0, 5e-4, 1e-3, 1e-3 * 200 / 350, 0.0])
    assert obj.sdpg_beta(450) == 0.0  # clipped at 0 past the end
    assert obj.sdpg_beta(0, t_warm=0) == pytest.approx(1e-3)  # no warm-up
    assert obj.sdpg_beta(399, t_warm=0, t_decay=0) == pytest.approx(1e-3)  # constant


def test_unnormalized_kl_four_kinds():
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    logp = torch.log(torch.tensor([[0.25, 0.5]]))  # w = 1, 2
    close(obj.unnormalized_kl(logp, ref, "ufkl"), [[1.0, 0.5 + LN2]])
    close(obj.unnormalized_kl(logp, ref, "urkl"), [[0.0, 0.5 * LN2**2]])
    close(obj.unnormalized_kl(logp, ref, "fkl"), [[1.0, 0.5]])
    close(obj.unnormalized_kl(logp, ref, "rkl"), [[0.5, 0.5 * (LN2 + 1) ** 2]])


def test_unnormalized_kl_gradient_vanishes_at_the_reference():
    # d/d log w of ufkl = 1 - 1/w: 0 at w = 1, 0.5 at w = 2.
    logp = torch.log(torch.tensor([[0.25, 0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.25]])).requires_grad_(True)
    obj.unnormalized_kl(logp, ref, "ufkl").sum().backward()
    close(logp.grad, [[0.0, 0.5]])
    assert ref.grad is None


# --------------------------------------------------------------------------- RLSD


def test_rlsd_lambda_schedule():
    assert [obj.rlsd_lambda(k) for k in (0, 25, 50, 100)] == pytest.approx([0.5, 0.25, 0.0, 0.0])
    assert obj.rlsd_lambda(30, decay_steps=0) == 0.5


def test_rlsd_token_advantages_sign_and_clip():
    # Delta = ln 1.1, ln 1.5, ln 0.5 for three sequences with A = 1, -1, 0.
    delta = torch.log(torch.tensor([1.1, 1.5, 0.5]))
    teacher = delta.expand(3, 3).clone()
    student = torch.zeros(3, 3)
    a_hat, w = obj.rlsd_token_advantages(torch.tensor([1.0, -1.0, 0.0]), teacher, student, lam=0.5)
    # A = 1: w = 1.1, 1.5, 0.5 -> clipped 1.1, 1.2, 0.8 -> 0.5 + 0.5 w
    # A = -1: w = exp(-Delta) = 1/1.1, 2/3, 2 -> clipped 0.909, 0.8, 1.2 -> -(0.5 + 0.5 w)
    # A = 0: w = 1, A_hat = 0
    close(w, [[1.1, 1.5, 0.5], [1 / 1.1, 2 / 3, 2.0], [1.0, 1.0, 1.0]])
    close(a_hat, [[1.05, 1.1, 0.9], [-(0.5 + 0.5 / 1.1), -0.9, -1.1], [0.0, 0.0, 0.0]])
    # lambda = 0 is GRPO's advantage on every token
    a_hat0, _ = obj.rlsd_token_advantages(torch.tensor([1.0, -1.0, 0.0]), teacher, student, lam=0.0)
    close(a_hat0, [[1.0] * 3, [-1.0] * 3, [0.0] * 3])


def test_rlsd_delta_is_clamped_and_detached():
    teacher = torch.tensor([[100.0]], requires_grad=True)
    student = torch.tensor([[0.0]], requires_grad=True)
    a_hat, w = obj.rlsd_token_advantages(torch.tensor([1.0]), teacher, student, lam=1.0)
    close(w, [[math.exp(20.0)]], atol=1.0)
    close(a_hat, [[1.2]])
    assert not a_hat.requires_grad and not w.requires_grad


# --------------------------------------------------------------------------- OPSD


def test_opsd_jsd_beta_half_is_jsd():
    student = torch.log(torch.tensor([P])).requires_grad_(True)
    teacher = torch.log(torch.tensor([Q])).requires_grad_(True)
    value = obj.opsd_jsd(student, teacher)
    close(value, [JSD_PQ])
    value.sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_opsd_jsd_beta_weights_the_teacher():
    # q = teacher (0.9, 0.1), p = student (0.5, 0.5), beta = 0.9: M = 0.9 q + 0.1 p = (0.86, 0.14).
    m = [0.86, 0.14]
    expected = 0.9 * kl(Q, m) + 0.1 * kl(P, m)
    close(expected, 0.043073, atol=2e-6)
    value = obj.opsd_jsd(torch.log(torch.tensor([P])), torch.log(torch.tensor([Q])), beta=0.9)
    close(value, [expected])
    # the other argument order (beta weighting the student) would differ
    m_swapped = [0.54, 0.46]
    swapped = 0.9 * kl(P, m_swapped) + 0.1 * kl(Q, m_swapped)  # 0.033600
    assert abs(value.item() - swapped) > 5e-3


# ------------------------------------------------------------ coefficients at 0 = GRPO


def test_zero_coefficients_reproduce_grpo_exactly():
    torch.manual_seed(0)
    B, T, d, V, G = 4, 3, 8, 11, 2
    head = torch.nn.Linear(d, V, bias=False)
    hidden = torch.randn(B, T, d, requires_grad=True)  # final layer
    hidden_mid = torch.randn(B, T, d, requires_grad=True)  # selected layer
    tokens = torch.randint(V, (B, T))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    advantages = obj.group_advantages(rewards, G)

    def logp_of(h):
        return torch.log_softmax(head(h), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    def grpo_only():
        logp = logp_of(hidden)
        per_token, _ = obj.grpo_surrogate(logp, logp.detach() - 0.1, advantages, mask)
        return obj.aggregate(per_token, mask)

    def with_aux():
        logp = logp_of(hidden)
        per_token, _ = obj.grpo_surrogate(logp, logp.detach() - 0.1, advantages, mask)
        total = obj.aggregate(per_token, mask)
        final_logits, mid_logits = head(hidden), head(hidden_mid)
        j = obj.oisd_logit_alignment(mid_logits, final_logits)  # (B, T)
        think = obj.oisd_layer_loss(j.unsqueeze(-1), obj.oisd_weights(advantages), mask)
        opd = obj.aggregate(
            obj.sdpg_gate(advantages)[:, None] * obj.sdpg_reverse_kl(final_logits, mid_logits), mask
        )
        ref_kl = obj.aggregate(obj.unnormalized_kl(logp, logp.detach() + 0.3, "ufkl"), mask)
        k3 = obj.aggregate(obj.reference_kl(logp, logp.detach() + 0.3), mask)
        opsd = obj.aggregate(obj.opsd_jsd(final_logits, mid_logits), mask)
        return total + 0.0 * think + 0.0 * opd + 0.0 * ref_kl + 0.0 * k3 + 0.0 * opsd

    params = [hidden, hidden_mid, head.weight]
    base = grpo_only()
    base_grads = torch.autograd.grad(base, params, materialize_grads=True)
    combined = with_aux()
    combined_grads = torch.autograd.grad(combined, params, materialize_grads=True)
    assert torch.equal(base, combined)
    for g0, g1 in zip(base_grads, combined_grads):
        assert torch.equal(g0, g1)
    # and with the RLSD lambda at 0, A_hat is A and so is the loss
    a_hat, _ = obj.rlsd_token_advantages(advantages, torch.zeros(B, T), torch.ones(B, T), lam=0.0)
    logp = logp_of(hidden)
    rlsd, _ = obj.grpo_surrogate(logp, logp.detach() - 0.1, a_hat, mask)
    assert torch.equal(obj.aggregate(rlsd, mask), base)
