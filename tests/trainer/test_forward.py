"""Tests for trainer.forward: one policy pass against HF's own full outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config

import trainer.forward as forward_module
from trainer.forward import (
    PolicyForward,
    enable_selective_attention,
    num_layers,
    policy_forward,
    readout,
)
from workbench.errors import ConfigError, DataError

ATOL = 1e-5
SMALL = dict(
    vocab_size=50,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA: 2 query heads per key/value head
    head_dim=16,
    max_position_embeddings=256,
)
CONFIGS = {"qwen3": Qwen3Config, "llama": LlamaConfig}


def make_model(arch: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](**SMALL), attn_implementation=attn)
    return model.eval()  # from_config leaves train mode on; no dropout here anyway


def make_batch(padded: bool = True, seed: int = 1):
    """Two left-padded rows: prompt then a 5-token response; scored = positions before it."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 50, (2, 12), generator=generator)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    if padded:
        attention_mask[0, :4] = 0  # 4 pad tokens on the left of row 0
    scored = torch.zeros(2, 12, dtype=torch.bool)
    scored[:, 6:11] = True  # tokens 7..11 are the response
    return input_ids, attention_mask, scored


def hf_reference(model, input_ids, attention_mask):
    """The model's full outputs with the same left-padding position ids."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        output_attentions=model.config._attn_implementation == "eager",
    )


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("reference_attn", ["eager", "sdpa"])
def test_logits_equal_full_logits_at_scored_positions(arch, reference_attn):
    reference = make_model(arch, reference_attn)
    model = copy.deepcopy(reference)
    input_ids, attention_mask, scored = make_batch()
    full = hf_reference(reference, input_ids, attention_mask).logits  # (B, T, V)

    out = policy_forward(model, input_ids, attention_mask, scored, attn_layers=(2,))
    batch_idx, pos_idx = out.index
    assert out.logits.shape == (10, 50)
    # row-major order of the scored positions
    assert batch_idx.tolist() == [0] * 5 + [1] * 5
    assert pos_idx.tolist() == [6, 7, 8, 9, 10] * 2
    torch.testing.assert_close(out.logits, full[batch_idx, pos_idx], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_hidden_states_and_final_layer_readout(arch):
    model = make_model(arch)
    input_ids, attention_mask, scored = make_batch()
    states = hf_reference(model, input_ids, attention_mask).hidden_states  # L + 1 of (B, T, d)
    out = policy_forward(model, input_ids, attention_mask, scored, hidden_layers=(1, 3, 4))
    index = out.index
    assert num_layers(model) == 4
    for layer in (1, 3):
        torch.testing.assert_close(out.hidden[layer], states[layer][index], atol=ATOL, rtol=0)
    # HF's hidden_states[L] is already final-normed; ours is the raw block output.
    final_norm = model.model.norm
    assert (out.hidden[4] - states[4][index]).abs().max() > 0.1
    torch.testing.assert_close(final_norm(out.hidden[4]), states[4][index], atol=ATOL, rtol=0)
    # The readout of the pre-norm final block is the model's logits, exactly.
    torch.testing.assert_close(readout(model)(out.hidden[4], 4), out.logits, atol=ATOL, rtol=0)
    # Logit lens of layer 1 = lm_head(norm(h^1)) computed by hand.
    lens = model.lm_head(final_norm(states[1][index]))
    torch.testing.assert_close(readout(model)(out.hidden[1], 1), lens, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("padded", [True, False], ids=["left_padded", "unpadded"])
def test_attentions_equal_eager_weights(arch, padded):
    eager = make_model(arch)
    model = copy.deepcopy(eager)
    input_ids, attention_mask, scored = make_batch(padded)
    reference = hf_reference(eager, input_ids, attention_mask).attentions  # L of (B, H, T, T)
    out = policy_forward(model, input_ids, attention_mask, scored, attn_layers=(2, 4))
    batch_idx, pos_idx = out.index
    assert set(out.attentions) == {2, 4}
    for layer in (2, 4):
        rows = out.attentions[layer]  # (n, H, K)
        assert rows.shape == (10, 4, 12) and rows.dtype == torch.float32
        expected = reference[layer - 1][batch_idx, :, pos_idx]
        torch.testing.assert_close(rows, expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(rows.sum(-1), torch.ones(10, 4), atol=ATOL, rtol=0)
        keys = torch.arange(12)
        future = keys[None, :] > pos_idx[:, None]  # (n, K)
        assert rows.masked_select(future[:, None, :].expand_as(rows)).abs().max() == 0
        if padded:
            assert rows[batch_idx == 0][..., :4].abs().max() == 0  # padding keys of row 0


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_gradients_equal_eager_for_a_combined_loss(arch):
    """A loss on logits, a hidden state and attention rows has eager's gradients."""
    eager = make_model(arch)
    model = copy.deepcopy(eager)
    input_ids, attention_mask, scored = make_batch()
    weights = torch.linspace(-1.0, 1.0, 12)  # fixed non-uniform weights over keys

    def loss_of(logits, hidden, attn_a, attn_b):
        return (
            logits.log_softmax(-1)[:, 3].mean()
            + hidden.square().mean()
            + (attn_a * weights).sum(-1).mean()
            + (attn_b * weights).square().sum(-1).mean()
        )

    ref = hf_reference(eager, input_ids, attention_mask)
    index = scored.nonzero(as_tuple=True)
    batch_idx, pos_idx = index
    loss_of(
        ref.logits[index],
        ref.hidden_states[2][index],
        ref.attentions[0][batch_idx, :, pos_idx],
        ref.attentions[3][batch_idx, :, pos_idx],
    ).backward()

    out = policy_forward(
        model, input_ids, attention_mask, scored, hidden_layers=(2,), attn_layers=(1, 4)
    )
    loss_of(out.logits, out.hidden[2], out.attentions[1], out.attentions[4]).backward()

    for (name, p_ref), (_, p) in zip(eager.named_parameters(), model.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_loss_reaches_query_key_projections_only():
    model = make_model("qwen3")
    input_ids, attention_mask, scored = make_batch()
    out = policy_forward(model, input_ids, attention_mask, scored, attn_layers=(3,))
    (out.attentions[3] * torch.arange(12.0)).sum().backward()
    attn = model.model.layers[2].self_attn
    assert attn.q_proj.weight.grad.abs().sum() > 0
    assert attn.k_proj.weight.grad.abs().sum() > 0
    # Probabilities do not depend on values, nor on anything above layer 3.
    assert attn.v_proj.weight.grad is None
    assert model.model.layers[3].self_attn.q_proj.weight.grad is None
    assert model.lm_head.weight.grad is None


def test_unselected_layers_run_sdpa_only(monkeypatch):
    model = make_model("qwen3", "sdpa")
    input_ids, attention_mask, scored = make_batch()
    sdpa_layers, explicit_rows = [], []
    real_sdpa, real_rows = forward_module.sdpa_attention_forward, forward_module._attention_rows

    def counting_sdpa(module, *args, **kwargs):
        sdpa_layers.append(module.layer_idx)
        return real_sdpa(module, *args, **kwargs)

    def counting_rows(query, *args, **kwargs):
        probs = real_rows(query, *args, **kwargs)
        explicit_rows.append(tuple(probs.shape))
        return probs

    monkeypatch.setattr(forward_module, "sdpa_attention_forward", counting_sdpa)
    monkeypatch.setattr(forward_module, "_attention_rows", counting_rows)
    out = policy_forward(model, input_ids, attention_mask, scored, attn_layers=(2, 4))
    assert model.config._attn_implementation == "oisd_selective"
    assert sdpa_layers == [0, 1, 2, 3]  # every layer's output comes from SDPA
    # Probabilities computed twice (layers 2 and L = 4), for the 10 scored rows only.
    assert explicit_rows == [(10, 4, 12), (10, 4, 12)]
    assert set(out.attentions) == {2, 4}

    # Outside policy_forward the model is plain SDPA everywhere, same logits as before.
    sdpa_layers.clear(), explicit_rows.clear()
    reference = make_model("qwen3", "sdpa")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    assert sdpa_layers == [0, 1, 2, 3] and explicit_rows == []
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_enable_selective_attention_is_idempotent():
    model = make_model("llama", "eager")
    enable_selective_attention(model)
    enable_selective_attention(model)
    assert model.config._attn_implementation == "oisd_selective"


def test_readout_detach_blocks_gradient_to_norm_and_head():
    model = make_model("qwen3")
    hidden = torch.randn(3, 64, requires_grad=True)
    attached, detached = readout(model)(hidden, 1), readout(model, detach=True)(hidden, 1)
    torch.testing.assert_close(detached, attached, atol=0, rtol=0)
    detached.log_softmax(-1)[:, 0].sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0
    assert model.model.norm.weight.grad is None
    assert model.lm_head.weight.grad is None
    # The attached readout does reach them.
    attached.log_softmax(-1)[:, 0].sum().backward()
    assert model.model.norm.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_gpt2_style_model():
    """transformer.h / transformer.ln_f layout, learned absolute positions."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_embd=32, n_layer=3, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    eager = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model = copy.deepcopy(eager)
    input_ids, attention_mask, scored = make_batch()
    ref = hf_reference(eager, input_ids, attention_mask)
    out = policy_forward(
        model, input_ids, attention_mask, scored, hidden_layers=(1, 3), attn_layers=(3,)
    )
    b, t = out.index
    assert num_layers(model) == 3
    torch.testing.assert_close(out.logits, ref.logits[b, t], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.hidden[1], ref.hidden_states[1][b, t], atol=ATOL, rtol=0)
    torch.testing.assert_close(readout(model)(out.hidden[3], 3), out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.attentions[3], ref.attentions[2][b, :, t], atol=ATOL, rtol=0)


def test_attn_query_stride_keeps_every_kth_query_of_each_sequence():
    model = make_model("qwen3")
    input_ids, attention_mask, scored = make_batch()
    scored[1, 10] = False  # row 0 has 5 scored positions, row 1 has 4
    full = policy_forward(model, input_ids, attention_mask, scored, attn_layers=(4,))
    strided = policy_forward(
        model, input_ids, attention_mask, scored, attn_layers=(4,), attn_query_stride=2
    )
    # rows 0..4 are sequence 0 (positions 6..10), rows 5..8 sequence 1 (6..9)
    assert strided.attn_rows.tolist() == [0, 2, 4, 5, 7]
    assert full.attn_rows.tolist() == list(range(9))
    assert strided.logits.shape[0] == 9
    expected = full.attentions[4][strided.attn_rows]
    torch.testing.assert_close(strided.attentions[4], expected, atol=ATOL, rtol=0)


def test_no_scored_positions_gives_empty_rows():
    model = make_model("qwen3")
    input_ids, attention_mask, scored = make_batch()
    nothing = torch.zeros_like(scored)
    out = policy_forward(
        model, input_ids, attention_mask, nothing, hidden_layers=(2,), attn_layers=(2,)
    )
    assert isinstance(out, PolicyForward)
    assert out.logits.shape == (0, 50)
    assert out.hidden[2].shape == (0, 64)
    assert out.attentions[2].shape == (0, 4, 12)


def test_bad_inputs_raise_one_line_errors():
    model = make_model("qwen3")
    input_ids, attention_mask, scored = make_batch()
    with pytest.raises(ConfigError, match=r"attn_layers \[5\] out of range"):
        policy_forward(model, input_ids, attention_mask, scored, attn_layers=(5,))
    with pytest.raises(ConfigError, match="hidden_layers"):
        policy_forward(model, input_ids, attention_mask, scored, hidden_layers=(0,))
    with pytest.raises(ConfigError, match="attn_query_stride"):
        policy_forward(model, input_ids, attention_mask, scored, attn_query_stride=0)
    with pytest.raises(DataError, match="same"):
        policy_forward(model, input_ids, attention_mask, scored[:, :5])
    padded_scored = scored.clone()
    padded_scored[0, 0] = True  # row 0 is left-padded there
    with pytest.raises(DataError, match="padding"):
        policy_forward(model, input_ids, attention_mask, padded_scored)
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        policy_forward(model, input_ids, attention_mask, scored, attn_layers=(2,))


# ------------------------------------------------------------------ shared-prompt scoring


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_shared_prompt_hidden_equals_the_full_forward(arch):
    """Groups of responses after one prompt each (left-padded prompts of three lengths,
    responses ending early): prefilling each prompt once gives the rows policy_forward
    gives on the concatenated sequences."""
    from trainer.batching import scored_positions
    from trainer.forward import shared_prompt_hidden, unique_prompts

    model = make_model(arch, attn="sdpa")
    prompts = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5], [0, 3, 4, 5, 6]]).repeat_interleave(2, dim=0)
    prompt_mask = (prompts != 0).long()
    generator = torch.Generator().manual_seed(3)
    responses = torch.randint(3, 50, (6, 7), generator=generator)
    response_mask = torch.ones(6, 7)
    response_mask[1, 4:] = 0  # ended early: padding after EOS
    response_mask[5, 2:] = 0
    responses[response_mask == 0] = 0

    ids, mask, prompt_of_row = unique_prompts(prompts, prompt_mask)
    assert ids.shape == (3, 5) and prompt_of_row.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(ids[prompt_of_row], prompts) and torch.equal(mask[prompt_of_row], prompt_mask)

    shared = shared_prompt_hidden(model, ids, mask, prompt_of_row, responses, response_mask)
    full = policy_forward(model, torch.cat([prompts, responses], 1),
                          torch.cat([prompt_mask, response_mask.long()], 1),
                          scored_positions(response_mask, 5), return_logits=False).final_hidden
    assert shared.shape == full.shape == (int(response_mask.sum()), 64)
    torch.testing.assert_close(shared, full, atol=ATOL, rtol=0)
    assert not shared.requires_grad
    # The rows are aligned, not merely equal as a set: one row off differs.
    assert (shared[1:] - full[:-1]).abs().max() > 0.1


def test_teacher_prompts_tokenises_each_group_once():
    from trainer.batching import teacher_prompts
    from trainer.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    prompts = ["Compute 1+2.|Hint: 3"] * 3 + ["Compute 4-1.|Hint: 1"] * 2 + ["Compute 1+2.|Hint: 3"]
    ids, mask, prompt_of_row = teacher_prompts(tok, prompts)
    assert prompt_of_row.tolist() == [0, 0, 0, 1, 1, 2]  # consecutive runs, not a global set
    for i, text in enumerate(prompts):
        row = ids[prompt_of_row[i]][mask[prompt_of_row[i]].bool()].tolist()
        assert row == tok(text, add_special_tokens=True)["input_ids"]
    assert mask[:, -1].all()  # left-padded: every prompt ends in the last column
