"""Tests for workbench.models.generation: batched KV-cache sampling against generate and a full forward."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from workbench.errors import ConfigError, DataError
from workbench.models.generation import RolloutBatch, _truncate_logits, left_pad, sample

PAD = 0
PROMPTS = [
    [5, 6, 7, 8, 9, 10],
    [11, 12],
    [13, 14, 15, 16],
    [17],
    [18, 19, 20, 21, 22, 23],
    [24, 25, 26],
]


def _qwen3() -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return AutoModelForCausalLM.from_config(config).eval()


MODELS = {"qwen3": _qwen3, "llama": _llama}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request) -> torch.nn.Module:
    return MODELS[request.param]()


@pytest.fixture(scope="module")
def qwen3() -> torch.nn.Module:
    return _qwen3()


def _peaked(scale: float) -> torch.nn.Module:
    """The test Qwen3 with its LM head scaled, so that p is far from uniform."""
    sharp = _qwen3()
    with torch.no_grad():
        sharp.lm_head.weight.mul_(scale)
    return sharp


def _generate(model, prompts, eos_id, max_new_tokens):
    input_ids, attention_mask = left_pad(prompts, PAD)
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=eos_id,
    )


def test_greedy_matches_generate_with_early_eos(model):
    # First run with an EOS id that never appears in the output, to pick a real EOS:
    # the token row 0 produces greedily at step 2, so row 0 stops at its first occurrence.
    free_run = sample(model, PROMPTS, pad_id=PAD, eos_id=1, max_new_tokens=12, greedy=True)
    assert not (free_run.responses == 1).any()
    eos_id = int(free_run.responses[0, 2])
    assert eos_id != PAD

    ours = sample(model, PROMPTS, pad_id=PAD, eos_id=eos_id, max_new_tokens=12, greedy=True)
    reference = _generate(model, PROMPTS, eos_id, 12)
    assert torch.equal(ours.input_ids, reference)
    assert ours.lengths[0] == free_run.responses[0].tolist().index(eos_id) + 1 <= 3
    # Some rows stop early and some run to the end, so both paths were exercised.
    assert (ours.lengths < ours.responses.shape[1]).any()
    assert ours.truncated.any() or ours.responses.shape[1] < 12


def test_prefill_once_then_one_token_per_step(qwen3):
    shapes = []
    handle = qwen3.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        batch = sample(qwen3, PROMPTS, pad_id=PAD, eos_id=1, max_new_tokens=5, greedy=True)
    finally:
        handle.remove()
    # One batched prefill over (B, P), then B x 1 decode steps through the cache; the
    # fifth token needs no forward after it.
    assert shapes == [(6, 6)] + [(6, 1)] * 4
    assert batch.prompt_length == 6


def test_finished_rows_leave_the_forward(qwen3):
    free_run = sample(qwen3, PROMPTS, pad_id=PAD, eos_id=1, max_new_tokens=6, greedy=True)
    eos_id = int(
        free_run.responses[2, 0]
    )  # row 2 (and any row whose first token is it) stops at once
    n_stop_at_first = int((free_run.responses[:, 0] == eos_id).sum())
    batch_sizes = []
    handle = qwen3.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    try:
        batch = sample(qwen3, PROMPTS, pad_id=PAD, eos_id=eos_id, max_new_tokens=6, greedy=True)
    finally:
        handle.remove()
    assert batch.lengths[2] == 1
    assert batch_sizes[:2] == [6, 6 - n_stop_at_first]
    # Each decode forward runs exactly the rows that had not finished before it.
    alive_before_step = (batch.response_mask[:, 1:] == 1).sum(0).tolist()
    assert batch_sizes[1:] == alive_before_step


def test_logprobs_match_one_full_forward(model):
    temperature = 0.7
    generator = torch.Generator().manual_seed(3)
    batch = sample(
        model,
        PROMPTS,
        pad_id=PAD,
        eos_id=2,
        max_new_tokens=10,
        temperature=temperature,
        top_k=20,
        top_p=0.9,
        generator=generator,
    )
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits  # (B, P + R, V)
    P, R = batch.prompt_length, batch.responses.shape[1]
    # Logits at position P - 1 + t predict response token t; untruncated, tempered.
    logp = (logits[:, P - 1 : P - 1 + R].float() / temperature).log_softmax(-1)
    expected = logp.gather(-1, batch.responses[..., None]).squeeze(-1) * batch.response_mask
    torch.testing.assert_close(batch.logprobs, expected, atol=1e-5, rtol=0)
    assert (batch.logprobs[batch.response_mask == 0] == 0).all()


def test_masks_lengths_truncated_and_pad_after_eos(qwen3):
    eos_id, max_new = 7, 30
    # Temperature 3 makes every token about 1/50 likely per step, so some rows hit EOS
    # within 30 steps and some do not (fixed seed: both cases are present).
    batch = sample(
        qwen3,
        PROMPTS * 3,
        pad_id=PAD,
        eos_id=eos_id,
        max_new_tokens=max_new,
        temperature=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert isinstance(batch, RolloutBatch)
    responses = batch.responses
    B, R = responses.shape
    assert batch.input_ids.shape == (B, batch.prompt_length + R)
    assert batch.truncated.any() and (~batch.truncated).any()
    for row in range(B):  # reference computed row by row, independently of the batched code
        tokens = responses[row].tolist()
        length = tokens.index(eos_id) + 1 if eos_id in tokens else R
        assert batch.lengths[row] == length
        assert batch.truncated[row] == (eos_id not in tokens)
        if batch.truncated[row]:
            assert length == max_new
        assert all(t == PAD for t in tokens[length:])
        assert batch.response_mask[row].tolist() == [1] * length + [0] * (R - length)
    prompt_ids, prompt_mask = left_pad(PROMPTS * 3, PAD)
    assert torch.equal(batch.input_ids[:, : batch.prompt_length], prompt_ids)
    assert torch.equal(batch.attention_mask, torch.cat([prompt_mask, batch.response_mask], dim=1))
    assert R == int(batch.lengths.max())


def test_same_seed_same_samples_and_different_seed_differs(qwen3):
    def run(seed):
        return sample(
            qwen3,
            PROMPTS,
            pad_id=PAD,
            eos_id=2,
            max_new_tokens=16,
            temperature=1.3,
            top_p=0.95,
            generator=torch.Generator().manual_seed(seed),
        )

    first, second, other = run(11), run(11), run(12)
    assert torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.logprobs, second.logprobs)
    assert not torch.equal(first.input_ids, other.input_ids)


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_one_and_tiny_top_p_equal_greedy(qwen3, truncation):
    greedy = sample(
        qwen3, PROMPTS, pad_id=PAD, eos_id=2, max_new_tokens=12, greedy=True, temperature=0.8
    )
    sampled = sample(
        qwen3,
        PROMPTS,
        pad_id=PAD,
        eos_id=2,
        max_new_tokens=12,
        temperature=0.8,
        generator=torch.Generator().manual_seed(5),
        **truncation,
    )
    assert torch.equal(sampled.input_ids, greedy.input_ids)
    torch.testing.assert_close(sampled.logprobs, greedy.logprobs, atol=1e-6, rtol=0)


def _first_token_check(model, temperature, n, expected_support=None, **truncation):
    """Empirical first-token frequencies over n samples vs the expected distribution."""
    prompt = [5, 9, 14, 3]
    batch = sample(
        model,
        [prompt] * n,
        pad_id=PAD,
        eos_id=2,
        max_new_tokens=1,
        temperature=temperature,
        generator=torch.Generator().manual_seed(0),
        **truncation,
    )
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    scores = _truncate_logits(
        (logits / temperature)[None], truncation.get("top_k", 0), truncation.get("top_p", 1.0)
    )[0]
    expected = scores.softmax(-1)
    counts = torch.bincount(batch.responses[:, 0], minlength=logits.shape[-1]).float()
    empirical = counts / n
    # Binomial standard error per token; 5 sigma plus a small floor.
    tolerance = 5 * (expected * (1 - expected) / n).sqrt() + 2e-3
    assert ((empirical - expected).abs() <= tolerance).all()
    assert (empirical[expected == 0] == 0).all()
    return expected


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_first_token_frequencies_follow_tempered_softmax(temperature):
    model = _peaked(scale=40.0)
    expected = _first_token_check(model, temperature, n=4000)
    # The check is informative: the distribution is far from uniform.
    assert expected.max() > 3 / 50


def test_first_token_frequencies_follow_truncated_distribution():
    model = _peaked(scale=40.0)
    expected = _first_token_check(model, 1.0, n=3000, top_k=10, top_p=0.6)
    kept = int((expected > 0).sum())
    assert 1 <= kept <= 10


def test_truncate_logits_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    scores = probs.log()[:, [2, 0, 3, 1]]  # shuffled so that vocabulary order != rank order

    def kept(**kw):
        out = _truncate_logits(scores, kw.get("top_k", 0), kw.get("top_p", 1.0))
        return torch.isfinite(out)[0].tolist()

    # vocabulary order holds probabilities [0.15, 0.5, 0.05, 0.3]
    assert kept(top_p=0.4) == [False, True, False, False]  # top token alone (0.5 >= 0.4)
    assert kept(top_p=0.7) == [False, True, False, True]  # 0.5 + 0.3 >= 0.7
    assert kept(top_p=0.9) == [True, True, False, True]  # 0.95 >= 0.9
    assert kept(top_p=1e-9) == [False, True, False, False]  # the top token is always kept
    assert kept(top_k=3) == [True, True, False, True]
    assert kept(top_k=3, top_p=0.7) == [False, True, False, True]
    assert kept() == [True] * 4
    # Masked entries are -inf; kept entries are unchanged.
    out = _truncate_logits(scores, 2, 1.0)
    assert out[0, 1] == scores[0, 1] and out[0, 0] == -math.inf


def test_outputs_are_trainable_tensors_and_mode_is_restored(qwen3):
    qwen3.train()
    try:
        batch = sample(
            qwen3,
            PROMPTS,
            pad_id=PAD,
            eos_id=2,
            max_new_tokens=4,
            generator=torch.Generator().manual_seed(0),
        )
        assert qwen3.training
        assert not batch.input_ids.is_inference() and not batch.logprobs.is_inference()
        # A training forward on the rollout (embedding saves its indices for backward).
        logits = qwen3(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits
        (logits.mean() * batch.logprobs.sum()).backward()
    finally:
        qwen3.eval()
        qwen3.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"temperature": 0.0}, ConfigError, "temperature"),
        ({"top_p": 0.0}, ConfigError, "top_p"),
        ({"top_p": 1.5}, ConfigError, "top_p"),
        ({"top_k": -1}, ConfigError, "top_k"),
        ({"max_new_tokens": 0}, ConfigError, "max_new_tokens"),
        ({"eos_id": 50}, ConfigError, "eos_id"),
        ({"pad_id": -1}, ConfigError, "pad_id"),
        ({"prompt_ids": []}, DataError, "no prompts"),
        ({"prompt_ids": [[3], []]}, DataError, "prompt 1 is empty"),
    ],
)
def test_bad_arguments_raise_one_line_errors(qwen3, kwargs, error, words):
    arguments = {"prompt_ids": PROMPTS, "pad_id": PAD, "eos_id": 2, "max_new_tokens": 4} | kwargs
    prompt_ids = arguments.pop("prompt_ids")
    with pytest.raises(error, match=words) as raised:
        sample(qwen3, prompt_ids, **arguments)
    assert "\n" not in str(raised.value)
