"""The method table: one spec per method, composers that add up named terms, and the
gradient share of each term (against gradients worked out by hand)."""

from pathlib import Path

import pytest
import torch

from trainer.methods import METHOD_NAMES, METHODS, Term, gradient_shares, spec_of

REPO = Path(__file__).resolve().parents[2]


def test_table_rows_of_the_paper_methods():
    """The rows of the methods this project implements (a new method adds a row; these stay)."""
    assert METHOD_NAMES[:6] == ("grpo", "oisd", "sdpg", "rlsd", "opsd", "oisd+sdpg")
    assert [spec_of(m).name for m in METHOD_NAMES] == list(METHOD_NAMES)
    known = {m: METHODS[m] for m in METHOD_NAMES[:6]}
    assert {m for m, s in known.items() if s.oisd} == {"oisd", "oisd+sdpg"}
    assert {m for m, s in known.items() if s.sdpg} == {"sdpg", "oisd+sdpg"}
    assert {m: s.teacher for m, s in known.items()} == {
        "grpo": "none", "oisd": "none", "sdpg": "current_hinted", "rlsd": "frozen_copy_hinted",
        "opsd": "initial_hinted", "oisd+sdpg": "current_hinted"}
    assert [m for m, s in known.items() if s.baseline] == ["grpo"]
    assert [m for m, s in known.items() if not s.reward_term] == ["opsd"]
    assert {m: s.coefficients for m, s in known.items() if s.coefficients} == {
        "oisd": ("oisd.lambda_logit", "oisd.lambda_attn"), "sdpg": ("sdpg.beta_base", "sdpg.alpha"),
        "rlsd": ("rlsd.lambda_init",),
        "oisd+sdpg": ("oisd.lambda_logit", "oisd.lambda_attn", "sdpg.beta_base", "sdpg.alpha")}
    # Every method with a teacher says what it computes from the teacher's logits.
    assert all((s.teacher_term is not None) == s.needs_hint for s in METHODS.values())


def test_gradient_shares_of_two_terms_with_known_gradients():
    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.zeros(1))
    terms = {
        # d/dw of 2 * (3 w0 + 4 w1) = (6, 8): norm 10
        "a": Term(2.0, 3 * w[0] + 4 * w[1]),
        # d/dw of 0.5 * (10 w1) = (0, 5) and d/dv of 0.5 * 0 v = 0: norm 5
        "b": Term(0.5, 10 * w[1] + 0 * v.sum()),
        # switched off: no gradient, share 0
        "c": Term(0.0, 7 * v.sum()),
    }
    shares = gradient_shares(terms, [w, v])
    assert shares == pytest.approx({"a": 10 / 15, "b": 5 / 15, "c": 0.0}, abs=1e-12)
    assert w.grad is None and v.grad is None  # measuring leaves the real backward to the caller


def test_gradient_share_of_a_term_without_gradient_is_zero():
    w = torch.nn.Parameter(torch.ones(3))
    shares = gradient_shares({"policy": Term(1.0, (w ** 2).sum()), "const": Term(1.0, torch.tensor(3.0))}, [w])
    assert shares == {"policy": 1.0, "const": 0.0}


def test_capabilities_answered_by_the_table():
    from types import SimpleNamespace

    cfg = SimpleNamespace(oisd=SimpleNamespace(lambda_logit=1.0, lambda_attn=0.0))
    assert spec_of("oisd").uses_lens(cfg) and not spec_of("oisd").uses_attention(cfg)
    assert not spec_of("sdpg").uses_lens(cfg)
    cfg.oisd.lambda_attn = 2.0
    assert spec_of("oisd+sdpg").uses_attention(cfg) and not spec_of("grpo").uses_attention(cfg)
    policy, frozen, reference = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    assert spec_of("sdpg").teacher_model(policy, None, reference) is policy
    assert spec_of("rlsd").teacher_model(policy, frozen, reference) is frozen
    assert spec_of("opsd").teacher_model(policy, None, reference) is reference
    assert [m for m in METHODS if METHODS[m].needs_frozen_copy] == ["rlsd"]
    with pytest.raises(ValueError, match="rlsd"):
        spec_of("rlsd").teacher_model(policy, None, reference)


# --------------------------------------------------------------------------- SDPG knobs against hand values


def _sdpg_inputs(exclude_eos: bool, gate: bool, beta: float = 0.5):
    """The grid of docs/objectives.md's exclude_eos example: 2 responses x 3 positions, stop id 2.

    tokens = [[10, 2, 11], [2, 12, 13]], mask = [[1, 1, 0], [1, 1, 1]] (5 tokens),
    l^OPD = [[1, 2, 3], [4, 5, 6]], A = [+1, -1]; logp = ref_logp, so ufkl = 1 per token.
    """
    from trainer import objectives as obj
    from trainer.config import TrainConfig
    from trainer.methods import LossInputs

    cfg = TrainConfig.model_validate({"method": "sdpg", "rollout": {"max_new_tokens": 3},
                                      "sdpg": {"exclude_eos": exclude_eos, "gate": gate, "alpha": 0.1}})
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    l_opd = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    logp = torch.log(torch.full((2, 3), 0.25))
    x = LossInputs(cfg=cfg, logp=logp, old_logp=logp, mask=mask, advantages=torch.tensor([1.0, -1.0]),
                   aggregate=lambda t: obj.aggregate(t, mask, "token_mean", 3), scale=1.0,
                   vocab={"teacher": l_opd, "ref_logp": logp.clone()}, schedules={"sched/beta": beta},
                   tokens=torch.tensor([[10, 2, 11], [2, 12, 13]]), stop_ids=(2,))
    return x, l_opd


@pytest.mark.parametrize("gate, exclude_eos, opd, grad", [
    # gate on: only row 0 (A = +1). Excluded: (1 + 0) / 5 = 0.2 (the 3 is padding). Kept: (1 + 2) / 5 = 0.6.
    (True, True, 0.2, [[0.2, 0.0, 0.0], [0.0, 0.0, 0.0]]),
    (True, False, 0.6, [[0.2, 0.2, 0.0], [0.0, 0.0, 0.0]]),
    # gate off: (1 + 0 + 0 + 5 + 6) / 5 = 2.4, and (1 + 2 + 4 + 5 + 6) / 5 = 3.6.
    (False, True, 2.4, [[0.2, 0.0, 0.0], [0.0, 0.2, 0.2]]),
    (False, False, 3.6, [[0.2, 0.2, 0.0], [0.2, 0.2, 0.2]]),
])
def test_sdpg_exclude_eos_hand_grid(gate, exclude_eos, opd, grad):
    from trainer.methods import sdpg_terms

    x, l_opd = _sdpg_inputs(exclude_eos, gate)
    terms = sdpg_terms(x)
    assert terms["opd"].coef == 0.5
    assert float(terms["opd"].value.detach()) == pytest.approx(opd)
    # The stop token stays in the denominator (5 tokens either way), and L_K is never masked:
    # ufkl at w = 1 is 1 on every token, so L_K = 1.
    assert terms["ref_kl"].coef == 0.1 and float(terms["ref_kl"].value) == pytest.approx(1.0)
    terms["opd"].value.backward()
    torch.testing.assert_close(l_opd.grad, torch.tensor(grad))
    # 2 of the 5 response tokens are stop tokens; logged only when the exclusion is on.
    assert ("sdpg/stop_fraction" in x.logs) == exclude_eos
    if exclude_eos:
        assert float(x.logs["sdpg/stop_fraction"]) == pytest.approx(0.4)


def test_sdpg_exclude_eos_default_off_and_needs_the_tokens():
    from trainer.config import TrainConfig
    from trainer.methods import sdpg_terms

    s = TrainConfig().sdpg
    assert (s.exclude_eos, s.step_offset, s.teacher_temperature) == (False, 0, None)
    x, _ = _sdpg_inputs(exclude_eos=True, gate=True)
    x.tokens = None
    with pytest.raises(ValueError, match="exclude_eos"):
        sdpg_terms(x)


def test_stop_token_ids_as_the_public_code_collects_them():
    from types import SimpleNamespace

    from trainer.methods import stop_token_ids

    assert stop_token_ids(SimpleNamespace(eos_token_id=2)) == (2,)
    # eos id(s) of the tokenizer, then its generation_config's; lists allowed; no repeats, no None
    tok = SimpleNamespace(eos_token_id=[7, 2], generation_config=SimpleNamespace(eos_token_id=[2, 9, None]))
    assert stop_token_ids(tok) == (7, 2, 9)
    assert stop_token_ids(SimpleNamespace(eos_token_id=None)) == ()


@pytest.mark.parametrize("offset, expected", [
    # beta(k) = 1e-3 min(1, k/50) min(1, (400 - k)/350) at k = step + offset, for the updates
    # j = 1, 50, 399, 400 (step = j - 1).
    (0, [0.0, 1e-3 * 49 / 50, 1e-3 * 2 / 350, 1e-3 * 1 / 350]),
    (1, [1e-3 * 1 / 50, 1e-3, 1e-3 * 1 / 350, 0.0]),  # the public code: its step counter starts at 1
])
def test_sdpg_schedule_step_offset(offset, expected):
    from trainer.config import TrainConfig

    cfg = TrainConfig.model_validate({"method": "sdpg", "steps": 400, "sdpg": {"step_offset": offset}})
    spec = spec_of("sdpg")
    assert [spec.schedule(cfg, j - 1)["sched/beta"] for j in (1, 50, 399, 400)] == pytest.approx(expected, abs=1e-15)
    # beta = 0 skips the teacher: with the offset, at the last update instead of the first.
    assert spec.teacher_active(cfg, spec.schedule(cfg, 0)) == (offset == 1)
    assert spec.teacher_active(cfg, spec.schedule(cfg, 399)) == (offset == 0)


def test_sdpg_exclude_eos_through_the_loss_computer(coin_model_dir, coin_data, tmp_path, run_overrides, monkeypatch):
    """The loss computer passes the sampled response tokens and the tokenizer's eos id: the
    excluded positions are exactly each stopped response's EOS, and loss/opd equals the
    hand formula sum(m e l) / sum(m) on the per-token KL it computed."""
    from trainer import objectives as obj
    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.setup import prepare

    seen = []
    original = obj.sdpg_exclude_stop_tokens
    monkeypatch.setattr(obj, "sdpg_exclude_stop_tokens",
                        lambda v, t, s: seen.append((v.detach().clone(), t.clone(), s)) or original(v, t, s))

    def trainer(**keys):
        cfg = load_config("sdpg-ufkl", run_overrides(coin_model_dir, tmp_path / "r", data=coin_data,
                                                     rollout__prompts_per_step=4, sdpg__t_warm=0, sdpg__gate=False,
                                                     **keys))
        return Trainer(cfg, prepare(cfg))

    on = trainer(sdpg__exclude_eos=True)
    sb, _ = on.rollout()
    rows = torch.arange(sb.input_ids.shape[0])
    _, logs, _ = on.micro_loss(sb, rows, None, on.normalisers(sb, rows))
    (l_opd, tokens, stop_ids), = seen
    eos = on.loss.tokenizer.eos_token_id
    assert stop_ids == (eos,)
    torch.testing.assert_close(tokens, sb.input_ids[:, sb.prompt_width:])
    mask = sb.response_mask
    lengths = mask.sum(1).long()
    stopped = (tokens[rows, lengths - 1] == eos) & (mask.sum(1) > 0)
    assert stopped.any(), "the tiny model should end some responses with EOS"
    stop = (tokens == eos) & mask.bool()
    assert stop.sum(1).tolist() == stopped.long().tolist()  # one EOS per stopped response, at its end
    expected = (l_opd * mask * (~stop)).sum() / mask.sum()
    assert float(logs["loss/opd"]) == pytest.approx(float(expected), rel=1e-5)

    off = trainer()
    _, logs_off, _ = off.micro_loss(sb, rows, None, off.normalisers(sb, rows))
    assert len(seen) == 1  # not called with the exclusion off
    assert float(logs_off["loss/opd"]) == pytest.approx(float((l_opd * mask).sum() / mask.sum()), rel=1e-5)
