"""The trainer's built-in probes: probe set records, batch layout, HF internals and
the probe table (values recomputed by hand from the model's own modules)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from trainer.presets import preset_config
from trainer.tasks import Example
from trainer.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_char_tokenizer
from workbench.analysis.probe_runner import (
    eager_attention,
    hf_probe_inputs,
    make_probe_set,
    probe_batch,
    run_builtin_probes,
)
from workbench.errors import ConfigError, DataError
from workbench.models.structure import find_readout
from workbench.storage.paths import probe_set_hash
from workbench.storage.schema import METRIC_COLUMNS


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def examples():
    return [
        Example(question="1+2", answer="3", solution="1+2=3."),
        Example(question="4-3", answer="1"),
        Example(question="9+9", answer="18"),
    ]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(
        preset_config("tiny", tokenizer), attn_implementation="sdpa"
    )
    return m


def test_make_probe_set_records(tokenizer, examples):
    records = make_probe_set(examples, tokenizer, 2)
    assert [r["index"] for r in records] == [0, 1]
    first = records[0]
    assert first["prompt"] == "1+2\n"
    assert first["reference"] == "1+2=3. Answer: 3"
    # Char tokenizer: BOS then one id per character; the reference ends with EOS.
    assert first["prompt_ids"] == [BOS_ID] + [tokenizer.convert_tokens_to_ids(c) for c in "1+2\n"]
    assert first["reference_ids"][-1] == EOS_ID
    assert len(first["reference_ids"]) == len("1+2=3. Answer: 3") + 1
    assert tokenizer.decode(first["reference_ids"][:-1]) == first["reference"]
    # Deterministic: the same records (and hash) every time.
    assert probe_set_hash(make_probe_set(examples, tokenizer, 2)) == probe_set_hash(records)
    with pytest.raises(ConfigError, match="exceeds"):
        make_probe_set(examples, tokenizer, 4)
    with pytest.raises(ConfigError, match=">= 1"):
        make_probe_set(examples, tokenizer, 0)


def test_probe_batch_layout():
    records = [
        {"prompt_ids": [1, 10, 11], "reference_ids": [20, 2]},  # P=3, R=2, length 5
        {"prompt_ids": [1, 12], "reference_ids": [21, 22, 23, 2]},  # P=2, R=4, length 6
    ]
    batch = probe_batch(records, pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 1, 10, 11, 20, 2], [1, 12, 21, 22, 23, 2]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1] * 6]
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    # Scored: positions whose next token is a response token (padded coordinates).
    assert batch["scored"].tolist() == [
        [False, False, False, True, True, False],
        [False, True, True, True, True, False],
    ]
    targets = batch["targets"][batch["scored"]].tolist()
    assert targets == [20, 2, 21, 22, 23, 2]

    greedy = probe_batch(records, pad_id=0, responses=[[30], [31, 2]])
    assert greedy["input_ids"].tolist() == [[1, 10, 11, 30], [1, 12, 31, 2]]
    assert greedy["targets"][greedy["scored"]].tolist() == [30, 31, 2]
    with pytest.raises(DataError, match="2 probe prompts"):
        probe_batch(records, pad_id=0, responses=[[30]])
    with pytest.raises(DataError, match="empty"):
        probe_batch([], pad_id=0)


def test_find_readout_and_eager_switch(model, tokenizer):
    norm, head = find_readout(model)
    assert norm is model.model.norm and head is model.lm_head
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    )
    norm, head = find_readout(gpt2)
    assert norm is gpt2.transformer.ln_f and head is gpt2.lm_head
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"


def test_hf_probe_inputs_match_model(model, tokenizer, examples):
    records = make_probe_set(examples, tokenizer, 3)
    batch = probe_batch(records, PAD_ID)
    model.eval()
    inputs = hf_probe_inputs(model, batch)
    assert model.config._attn_implementation == "sdpa"  # restored
    n_layers = model.config.num_hidden_layers
    assert inputs.n_layers == n_layers and len(inputs.attentions) == n_layers
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"], output_hidden_states=True,
        )
        real = batch["attention_mask"].bool()
        # SDPA vs eager kernels: equal up to float rounding on real tokens.
        assert torch.allclose(inputs.final_logits[real], out.logits[real], atol=1e-5)
        # The lens of layer L-1 is lm_head(norm(hidden_states[L-1])); hidden_states[L]
        # (already normed by HF) is not in ``hidden``.
        assert len(inputs.hidden) == n_layers - 1
        manual = model.lm_head(model.model.norm(out.hidden_states[n_layers - 1]))
        assert torch.allclose(inputs.lens(inputs.hidden[-1], inputs.n_layers - 1)[real], manual[real], atol=1e-5)
    # Attention rows of real queries are distributions with zero weight on padding.
    for i in range(real.shape[0]):
        rows = inputs.attentions[0][i][:, real[i]]  # (H, real queries, T)
        assert torch.allclose(rows.sum(-1), torch.ones(rows.shape[:2]), atol=1e-5)
        assert float(rows[..., ~real[i]].abs().sum()) == 0.0
    assert not real.all()  # the batch does have padding


def test_run_builtin_probes_table(model, tokenizer, examples):
    records = make_probe_set(examples, tokenizer, 3)
    model.train()
    table = run_builtin_probes(model, tokenizer, records, run="r", step=7, max_new_tokens=5)
    assert model.training and model.config._attn_implementation == "sdpa"  # restored
    assert list(table.columns) == METRIC_COLUMNS
    assert set(table["split"]) == {"reference", "greedy"}
    assert set(table["source"]) == {"probe"} and set(table["step"]) == {7}
    ref = table[table.split == "reference"].set_index(["metric", "layer", "head", "ref_layer"])
    n_layers = model.config.num_hidden_layers
    assert ref.loc[("lens_kl", n_layers, -1, -1), "value"] == 0.0
    assert ref.loc[("top1_agree", n_layers, -1, -1), "value"] == 1.0

    # The final layer's target_nll is the model's mean cross-entropy on the
    # reference tokens, computed here directly from the logits.
    batch = probe_batch(records, PAD_ID)
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    logp = logits[batch["scored"]].log_softmax(-1)
    nll = -logp.gather(-1, batch["targets"][batch["scored"]][:, None]).mean().item()
    assert math.isclose(ref.loc[("target_nll", n_layers, -1, -1), "value"], nll, rel_tol=1e-5)

    # Greedy split: the final layer ranks its own greedy tokens first, so the target
    # rank (and final rank) of layer L is 0 at every position.
    greedy = table[table.split == "greedy"].set_index(["metric", "layer", "head", "ref_layer"])
    assert greedy.loc[("target_rank", n_layers, -1, -1), "value"] == 0.0

    no_greedy = run_builtin_probes(model, tokenizer, records, run="r", step=7, greedy=False)
    assert set(no_greedy["split"]) == {"reference"}
