"""Warm start: the loss falls, the output folder loads everywhere it must, bad input is one line."""

import json
import time

import pytest
import torch

from trainer.tokenizer import build_char_tokenizer
from trainer.warmstart import WarmstartConfig, make_sft_batch, run_warmstart
from workbench.errors import ConfigError


def test_sft_batch_puts_labels_on_the_completion_only():
    tok = build_char_tokenizer()
    b = make_sft_batch(tok, [("1+2\n", "3"), ("10+20\n", "30")])
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    # row 0: <bos> 1 + 2 \n | 3 <eos> | pad pad
    assert ids.shape == (2, 10)
    assert labels[0].tolist()[:5] == [-100] * 5
    assert tok.decode(labels[0][5:6].tolist()) == "3" and labels[0][6] == tok.eos_token_id
    assert labels[0][7:].tolist() == [-100] * 3 and mask[0].tolist() == [1] * 7 + [0] * 3
    assert tok.decode([t for t in labels[1].tolist() if t >= 0], skip_special_tokens=True) == "30"


def test_tiny_warmstart_loss_falls_and_folder_loads(tmp_path):
    out = tmp_path / "ws"
    figures = run_warmstart(WarmstartConfig(out=str(out), steps=40, batch_size=16, lr=3e-3, eval_n=8,
                                            progress=False, task={"n_train": 500, "n_test": 20}))
    assert figures["final_loss"] < 0.75 * figures["first_loss"]
    saved = json.loads((out / "warmstart.json").read_text())
    assert saved["heldout_accuracy"] == figures["heldout_accuracy"]
    assert 0.0 <= saved["heldout_accuracy_with_hint"] <= 1.0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen3" and len(tok) == model.config.vocab_size
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(out), device="cpu")
    ids = torch.tensor([tok("Compute 1+2-3.\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(bridge(ids), model(ids).logits, atol=1e-4)
    assert not list(tmp_path.glob(".tmp-*"))  # written atomically, nothing left behind


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "warmstart.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a warm start"):
        run_warmstart(WarmstartConfig(out=str(tmp_path / "ws"), steps=1, progress=False))


@pytest.mark.parametrize("kw, key", [({"preset": "huge"}, "unknown preset 'huge'"),
                                     ({"hint_fraction": 1.5}, "hint_fraction"),
                                     ({"steps": 0}, "steps"),
                                     ({"task": {"digitz": 2}}, "unknown task knob 'digitz'")])
def test_bad_warmstart_settings(kw, key):
    with pytest.raises(ConfigError, match=key):
        WarmstartConfig(**kw)


@pytest.mark.slow
def test_default_warmstart_meets_the_targets(tmp_path):
    """The issue's bar: <= 5 min on 2 cores, student 30-80%, hinted at least 30 points higher."""
    t0 = time.time()
    figures = run_warmstart(WarmstartConfig(out=str(tmp_path / "ws"), progress=False))
    assert time.time() - t0 <= 300
    assert 0.30 <= figures["heldout_accuracy"] <= 0.80
    assert figures["heldout_accuracy_with_hint"] >= figures["heldout_accuracy"] + 0.30
