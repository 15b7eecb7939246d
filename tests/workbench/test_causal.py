"""The causal analyses against constructions whose answers are known: early exit on a model
whose last blocks are identities, the learned lens on a layer only a linear map can read,
activation patching between models that differ in one component of one block."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from trainer.presets import preset_config
from workbench.analysis.analyzer import _boot
from workbench.analysis.early_exit import (
    EXIT_METRICS,
    Verifier,
    default_exit_layers,
    exit_rows,
    reference_verifier,
    resolve_exit_layers,
)
from workbench.analysis.learned_lens import LEARNED_LENS, AffineFit, fit_affine, lens_frame
from workbench.analysis.patching import answer_positions, patch_batch, patch_rows
from workbench.analysis.probe_runner import eager_attention, greedy_responses, probe_batch
from workbench.errors import ConfigError
from workbench.measures.answers import answers_agree, extract_integer_answer, final_answer, gold_answer
from workbench.measures.probing import ProbeInputs, compute_probe_metrics
from workbench.models.readout import LogitLens
from workbench.models.structure import decoder_blocks, exit_after

PROMPTS = ["Compute 1+2-3.\n", "Compute 7-5+1.\n", "Compute 4+4-2.\n", "Compute 9-1-1.\n"]
REFERENCES = ["1+2=3. 3-3=0. Answer: 0", "7-5=2. 2+1=3. Answer: 3", "4+4=8. 8-2=6. Answer: 6",
              "9-1=8. 8-1=7. Answer: 7"]


def _records(tokenizer) -> list[dict]:
    return [{"index": i, "prompt": p, "reference": r, "prompt_ids": tokenizer(p)["input_ids"],
             "reference_ids": tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]}
            for i, (p, r) in enumerate(zip(PROMPTS, REFERENCES))]


def _identity_after(model, layer: int):
    """Blocks after ``layer`` add nothing to the residual stream (o_proj and down_proj at 0)."""
    with torch.no_grad():
        for block in list(decoder_blocks(model))[layer:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


# ----------------------------------------------------------------------------- answers


def test_answers_are_checked_as_the_tasks_reward():
    from trainer.data import MathVerifyTask
    from trainer.tasks import ArithmeticTask, Example

    assert extract_integer_answer("3+4=7. 7-2=5. Answer: 5") == "5"
    record = {"reference": "3+4=7. 7-2=5. Answer: 5"}
    assert gold_answer(record) == "5" and gold_answer({"answer": "3/4", "reference": "x"}) == "3/4"
    arithmetic, math = ArithmeticTask(n_train=20, n_test=5), MathVerifyTask([Example("q", "5", "")], [])
    for completion in ("x. Answer: 5", "Answer: 05", "3+4=7. 7-2=5", "Answer: 6", "", r"\boxed{5}"):
        for task in (arithmetic, math):  # the analyzer's verdict is the task's reward, for either check
            want = task.reward(completion, Example("q", "5", "")) > 0
            assert answers_agree(completion, gold_answer(record), task.answer_check) == want, (completion, task)
    assert not answers_agree("3+4=7. 7-2=5", "5", "integer") and answers_agree("3+4=7. 7-2=5", "5", "math")
    assert answers_agree(r"so \boxed{3/4}", "0.75", "math") and not answers_agree("Answer: 5", None)
    assert final_answer("... Answer: -3") == "-3" and final_answer("") is None


# ----------------------------------------------------------------------------- early exit


def test_exit_layers_default_and_checked():
    assert default_exit_layers(4) == [1, 2, 3, 4]
    assert default_exit_layers(28, [6]) == [6, 7, 14, 21, 28]
    assert resolve_exit_layers([0.5, 2], 4) == [2, 4]  # L is always there: the full model
    with pytest.raises(ConfigError, match="--exit-layers: 9 is not one of the model's blocks 1..4"):
        resolve_exit_layers([9], 4)
    with pytest.raises(ConfigError, match="neither a block"):
        resolve_exit_layers([1.5], 4)


def test_exit_after_the_last_real_block_is_the_full_model(coin_model_dir, char_tokenizer):
    model = _identity_after(AutoModelForCausalLM.from_pretrained(coin_model_dir), 2).eval()
    records = _records(char_tokenizer)
    full = torch.randint(0, 20, (1, 12))
    with torch.no_grad(), eager_attention(model):
        logits = model(full).logits
        with exit_after(model, 2):
            assert len(model.model.layers) == 2  # blocks 1-2 only, the same modules
            exited = model(full).logits
        assert len(decoder_blocks(model)) == 4  # put back
        torch.testing.assert_close(exited, logits, rtol=0, atol=1e-5)
        rows = exit_rows(model, char_tokenizer, records, [1, 2, 4], verify=reference_verifier(), run="r", step=3,
                         source="analyzer", max_new_tokens=24)
    table = rows.pivot_table(index="metric", columns="layer", values="value")
    assert table.loc["exit_accuracy", 2] == table.loc["exit_accuracy", 4]  # blocks 3-4 are identities
    assert table.loc["exit_agree", 2] == 1.0 and table.loc["exit_agree", 4] == 1.0
    assert table.loc["exit_length", 2] == table.loc["exit_length", 4]
    assert set(rows["split"]) == {"greedy"} and set(rows["source"]) == {"analyzer"}


def test_exit_accuracy_counts_correct_prompts(coin_model_dir, char_tokenizer):
    """A verifier that knows the answers: the accuracy is the share it accepts, by hand."""
    model = AutoModelForCausalLM.from_pretrained(coin_model_dir).eval()
    records = _records(char_tokenizer)
    with eager_attention(model):
        full = greedy_responses(model, records, pad_id=char_tokenizer.pad_token_id,
                                eos_id=char_tokenizer.eos_token_id, max_new_tokens=24)
        # Prompts 0 and 2 are "correct", whatever they say; answers are the first 3 characters.
        verifier = Verifier(correct=lambda record, text: record["index"] in (0, 2), answer=lambda text: text[:3])
        rows = exit_rows(model, char_tokenizer, records, [4], verify=verifier, run="r", step=0, source="probe",
                         max_new_tokens=24, full=full)
    values = dict(zip(rows["metric"], rows["value"]))
    assert values["exit_accuracy"] == 0.5 and values["exit_agree"] == 1.0
    assert values["exit_length"] == pytest.approx(np.mean([len(r) for r in full]))


# ----------------------------------------------------------------------------- the learned lens


def test_fit_affine_recovers_an_affine_map():
    torch.manual_seed(0)
    x = torch.randn(400, 6, dtype=torch.float64)
    m, c = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    y = x @ m.T + c
    xx = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], 1)
    weight, bias = fit_affine(xx.T @ xx, xx.T @ y, ridge=0.0)  # the translator: M - I
    torch.testing.assert_close(weight.double() + torch.eye(6, dtype=torch.float64), m, atol=1e-4, rtol=0)
    torch.testing.assert_close(bias.double(), c, atol=1e-4, rtol=0)


def _rotated_layer_inputs(n_seq=6, t=9, d=8, v=11, seed=0):
    """ProbeInputs of L = 2 where layer 1's output is layer 2's rotated: h_2 = h_1 Q^T. The final
    norm (RMSNorm) and head read h_2; a linear map reads h_1, the head alone does not."""
    g = torch.Generator().manual_seed(seed)
    h1 = torch.randn(n_seq, t, d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    h2 = h1 @ q.T
    norm = torch.nn.RMSNorm(d, elementwise_affine=False)
    head = torch.nn.Linear(d, v, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g) * 3)
    base = LogitLens(norm, head)
    with torch.no_grad():
        logits = head(norm(h2))
    mask = torch.zeros(n_seq, t, dtype=torch.bool)
    mask[:, 2:-1] = True
    inputs = ProbeInputs(hidden=[h1], final_logits=logits, lens=base, targets=logits.argmax(-1), mask=mask,
                         final_hidden=h2)
    return inputs, base


def test_the_learned_lens_reads_what_the_head_cannot():
    inputs, base = _rotated_layer_inputs()
    prompt_index = list(range(inputs.mask.shape[0]))
    fit = AffineFit(n_layers=2)
    fit.add(inputs, inputs.final_hidden, prompt_index)
    assert fit.cross_fitted and fit.positions == [18, 18]
    with torch.no_grad():
        learned = lens_frame(inputs, prompt_index, fit.lenses(base), run="r", step=1, split="reference",
                             source="analyzer")
        logit = compute_probe_metrics(inputs).to_frame("r", 1, "reference", "analyzer")
    at1 = lambda frame, metric: float(frame[(frame["layer"] == 1) & (frame["metric"] == metric)]["value"].iloc[0])  # noqa: E731
    assert at1(learned, "lens_kl") < 1e-4 and at1(learned, "top1_agree") == 1.0
    assert at1(logit, "lens_kl") > 0.5 and at1(logit, "top1_agree") < 0.8
    assert set(learned["lens"]) == {LEARNED_LENS}
    # Layer L is the model's own output under either lens.
    assert at1(learned.assign(layer=learned["layer"] - 1), "top1_agree") == 1.0  # layer 2


def test_the_learned_lens_is_the_identity_where_the_rest_adds_nothing(coin_model_dir, char_tokenizer, tmp_path):
    """Blocks after 2 are identities: h_L = h_2, so the map fitted at layer 2 is the identity and
    the learned lens there reads what the logit lens reads."""
    folder = tmp_path / "identity-after-2"
    _identity_after(AutoModelForCausalLM.from_pretrained(coin_model_dir), 2).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    from workbench.analysis.analyzer import bridge_probe_inputs

    bridge, _ = _boot(folder, "cpu", torch.float32)
    batch = probe_batch(_records(char_tokenizer), char_tokenizer.pad_token_id)
    inputs = bridge_probe_inputs(bridge, batch, patterns="final")
    fit = AffineFit(n_layers=4)
    fit.add(inputs, inputs.final_hidden, batch["prompt_index"].tolist())
    lenses = fit.lenses(LogitLens.of_bridge(bridge))
    for lens in lenses.values():
        weight, bias = lens.translators[2]
        assert float(weight.abs().max()) < 1e-3 and float(bias.abs().max()) < 1e-3
    learned = lens_frame(inputs, batch["prompt_index"].tolist(), lenses, run="r", step=0, split="reference",
                         source="analyzer")
    logit = compute_probe_metrics(inputs).to_frame("r", 0, "reference", "analyzer")
    key = ["layer", "metric"]
    both = learned.merge(logit, on=key, suffixes=("_learned", "_logit"))
    at2 = both[(both["layer"] == 2) & both["metric"].isin(["lens_kl", "top1_agree"])]
    np.testing.assert_allclose(at2["value_learned"], at2["value_logit"], atol=1e-3)


# ----------------------------------------------------------------------------- activation patching


def test_answer_positions():
    assert answer_positions([5, 6, 1, 2, 7, 8, 0], mark=[1, 2], eos_id=0) == [4, 5]
    assert answer_positions([5, 6, 7, 0], mark=[1, 2], eos_id=0) == [2]  # no mark: the last token before EOS


@pytest.fixture(scope="module")
def bridges(tmp_path_factory, char_tokenizer):
    """The tiny Qwen3 (A), the same with block 3's MLP changed (B_mlp), with block 3's attention
    changed (B_attn): booted bridges."""
    root = tmp_path_factory.mktemp("patch")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(preset_config("tiny", char_tokenizer))
    out = {}
    for name, change in (("A", None), ("B_mlp", "mlp"), ("B_attn", "attn")):
        model = copy.deepcopy(base)
        if change:
            block = decoder_blocks(model)[2]  # block 3
            module = block.mlp.down_proj if change == "mlp" else block.self_attn.o_proj
            with torch.no_grad():
                module.weight.add_(torch.randn_like(module.weight) * 0.5)
        model.save_pretrained(root / name)
        char_tokenizer.save_pretrained(root / name)
        out[name] = _boot(root / name, "cpu", torch.float32)[0]
    return out


def _patch(bridges, b: str, tokenizer) -> pd.DataFrame:
    records = _records(tokenizer)
    batch = patch_batch(records, [r["reference_ids"] for r in records], tokenizer.pad_token_id,
                        tokenizer.eos_token_id, tokenizer("Answer:", add_special_tokens=False)["input_ids"])
    return patch_rows(bridges["A"], bridges[b], batch, run="r", step=5, split="reference")


@pytest.mark.parametrize("changed", ["mlp", "attn"])
def test_patching_finds_the_one_changed_component(bridges, char_tokenizer, changed):
    rows = _patch(bridges, f"B_{changed}", char_tokenizer)
    curve = lambda component, metric="patch_recovered": rows[(rows["component"] == component)  # noqa: E731
                                                             & (rows["metric"] == metric)].set_index("layer")["value"]
    for metric in ("patch_recovered", "patch_recovered_logp"):
        block = curve("block", metric)
        np.testing.assert_allclose(block.loc[[1, 2]], 0.0, atol=1e-5)  # before block 3: nothing changed yet
        np.testing.assert_allclose(block.loc[[3, 4]], 1.0, atol=1e-4)  # from block 3 on: all of it
        assert curve(changed, metric).loc[3] == pytest.approx(1.0, abs=1e-4)
        for component in ("attn", "mlp"):
            np.testing.assert_allclose(curve(component, metric).loc[[1, 2]], 0.0, atol=1e-5)
    if changed == "mlp":  # the attention before it saw nothing change: its output recovers nothing
        assert curve("attn").loc[3] == pytest.approx(0.0, abs=1e-5)
        assert curve("attn", "patch_recovered_logp").loc[3] == pytest.approx(0.0, abs=1e-5)
    else:  # the MLP after a changed attention reads a changed input: its output carries part of it
        assert 0.0 < curve("mlp").loc[3] < 0.5
    kl = rows[rows["metric"] == "patch_kl_base"]["value"].iloc[0]
    assert kl > 1e-3  # the change is a real one


def test_a_model_patched_with_itself_has_no_share_to_recover(bridges, char_tokenizer):
    rows = _patch(bridges, "A", char_tokenizer)
    assert rows[rows["metric"] == "patch_kl_base"]["value"].iloc[0] == 0.0
    shares = rows[rows["metric"].isin(["patch_recovered", "patch_recovered_logp"])]["value"]
    assert len(shares) == 2 * 3 * 4 and all(math.isnan(v) for v in shares)  # undefined, not a number


# ----------------------------------------------------------------------------- end to end


def test_a_probe_with_every_causal_measure_and_the_trainer_agree(coin_model_dir, coin_data, tmp_path, run_overrides):
    """The trainer's built-in probes (``probe.exit_layers``) and ``oisd probe --exit`` agree on
    the early exit of the same checkpoint; ``--learned-lens`` and ``--patch`` write their tables."""
    from trainer.config import load_config
    from trainer.run import train
    from workbench.cli import main as cli_main
    from workbench.storage.runstore import Run

    run_dir = tmp_path / "run"
    cfg = load_config("oisd", run_overrides(coin_model_dir, run_dir, data=coin_data, steps=2, probe_every=2,
                                            checkpoint_every=2, probe__n_prompts=4, probe__exit_layers=[1, 0.5, 4],
                                            rollout__prompts_per_step=4))
    train(cfg)
    assert cli_main(["probe", str(run_dir), "--exit", "--exit-layers", "1", "0.5", "--learned-lens", "--patch"]) == 0
    run = Run.open(run_dir)
    assert run.info["answer_check"] == "math"  # the coin task's MathVerifyTask
    cols = ["layer", "metric", "split", "value"]
    probe = run.metric_rows("probe", step=[2], metric=list(EXIT_METRICS))[cols]
    analyzer = run.metric_rows("analyzer", step=[2], metric=list(EXIT_METRICS))[cols]
    assert sorted(set(analyzer["layer"])) == [1, 2, 4] and len(analyzer) == 9
    pd.testing.assert_frame_equal(analyzer.sort_values(cols).reset_index(drop=True),
                                  probe.sort_values(cols).reset_index(drop=True))
    accuracy = analyzer[analyzer["metric"] == "exit_accuracy"].set_index("layer")["value"]
    assert 0 < accuracy.loc[4] < 1  # the coin model is right on some prompts, not all: the check can fail

    lens = run.analysis("lens")
    assert set(lens["lens"]) == {LEARNED_LENS} and set(lens["step"]) == {2}
    assert {"reference", "greedy"} <= set(lens["split"]) and set(lens["layer"]) == {0, 1, 2, 3, 4}
    top1 = lens[(lens["metric"] == "top1_agree") & (lens["split"] == "reference")].set_index("layer")["value"]
    assert top1.loc[4] == 1.0 and 0 <= top1.loc[1] <= 1

    patch = run.analysis("patch")
    assert set(patch["component"]) == {"block", "attn", "mlp", "none"} and set(patch["step"]) == {2}
    shares = patch[patch["metric"].isin(["patch_recovered", "patch_recovered_logp"])]
    assert len(shares) == 2 * 3 * 4 and shares["value"].notna().all()  # training changed the model: all defined
    # The last block's output patched in still leaves out what training did to the final norm and the
    # (tied) unembedding: the block curve ends below 1 by exactly that.
    assert patch[patch["metric"] == "patch_kl_base"]["value"].iloc[0] > 0
    # Probing again is incremental: nothing is redone.
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "analysis").iterdir()}
    assert cli_main(["probe", str(run_dir), "--exit", "--exit-layers", "1", "0.5", "--learned-lens", "--patch"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "analysis").iterdir()} == before

    # oisd compare reads them at the OISD layer (block 1 of 4 in the bundled config).
    from workbench.compare import comparison_table

    row = comparison_table([run_dir]).iloc[0]
    assert row["layer"] == 1
    assert row["exit_accuracy_after"] == accuracy.loc[1]
    assert row["exit_accuracy_before"] == float(run.metric_rows("probe", step=[0], metric=["exit_accuracy"],
                                                               layer=[1])["value"].iloc[0])
    assert row["learned_top1_agree_after"] == top1.loc[1]
    reached = patch[(patch["component"] == "block") & (patch["metric"] == "patch_recovered")
                    & (patch["value"] >= 0.5)]["layer"]
    assert row["patch_half_layer"] == (float(reached.min()) if len(reached) else row["patch_half_layer"])
