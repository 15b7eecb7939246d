"""``oisd probe PATH... --out DIR`` on checkpoints this project did not train: TRL-style
output dirs, verl actor folders, plain HF model folders (random-init Qwen3, Llama,
Mistral, Gemma, GPT-2 made here), free prompts; one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MistralConfig

from trainer.presets import preset_config
from trainer.tokenizer import build_char_tokenizer
from workbench.analysis.analyzer import probe_run
from workbench.analysis.external import load_prompts, prepare_analysis_folder, resolve_source
from workbench.errors import ConfigError, DataError
from workbench.storage.runstore import Run

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [{"prompt": "Compute 1+2.\n", "reference": "1+2=3. Answer: 3"},
           {"prompt": "Compute 7-5.\n", "reference": "7-5=2. Answer: 2"}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def _config(arch: str, tokenizer):
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    small = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **special)
    return {
        "qwen3": lambda: preset_config("tiny", tokenizer),
        "llama": lambda: LlamaConfig(**small),
        "mistral": lambda: MistralConfig(**small, sliding_window=None),
        "gemma2": lambda: Gemma2Config(**small, head_dim=8, query_pre_attn_scalar=8, final_logit_softcapping=None,
                                       attn_logit_softcapping=None),
        "gpt2": lambda: GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                   **special),
    }[arch]()


def _save(folder: Path, arch: str, tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_kinds_are_recognised(tmp_path, tokenizer):
    trl = tmp_path / "trl-out"
    for step in (2, 4):
        _save(trl / f"checkpoint-{step}", "qwen3", tokenizer, seed=step)
    (trl / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    (trl / "runs").mkdir()  # TensorBoard logs and other clutter are ignored
    source = resolve_source(trl)
    assert source.kind == "trainer" and [s for s, _, _ in source.checkpoints] == [2, 4]
    assert source.checkpoints[0][2] == f"checkpoint-2 of {trl}"

    verl = tmp_path / "verl"
    for step in (10, 20):
        _save(verl / f"global_step_{step}" / "actor" / "huggingface", "qwen3", tokenizer)
    assert resolve_source(verl).kind == "verl" and [s for s, _, _ in resolve_source(verl).checkpoints] == [10, 20]

    model = _save(tmp_path / "plain", "qwen3", tokenizer)
    assert resolve_source(model).kind == "model"
    assert resolve_source("Qwen/Qwen3-0.6B").kind == "hub"


@pytest.mark.parametrize("make, message", [
    (lambda p: (p / "empty").mkdir() or p / "empty", "is none of the accepted inputs"),
    (lambda p: p / "missing", "no such folder"),
])
def test_a_path_of_no_kind_names_the_accepted_kinds(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message) as info:
        resolve_source(make(tmp_path))
    text = str(info.value)
    assert "\n" not in text and "checkpoint-N/" in text and "global_step_N/actor/huggingface" in text


def test_trainer_output_dir_probes_into_an_analysis_folder(tmp_path, tokenizer):
    trl = tmp_path / "trl-out"
    for step in (2, 4):
        _save(trl / f"checkpoint-{step}", "qwen3", tokenizer, seed=step)
    out = tmp_path / "analysis"
    folder = prepare_analysis_folder(resolve_source(trl), out, PROMPTS, max_new_tokens=12)
    report = probe_run(folder, progress=False)
    assert report.analysed == [2, 4] and not report.skipped

    run = Run.open(folder)
    assert run.info["external"]["kind"] == "trainer" and run.info["probe_max_new_tokens"] == 12
    assert [c["origin"] for c in run.info["external"]["checkpoints"]] == [f"checkpoint-{s} of {trl}" for s in (2, 4)]
    metrics = run.analysis("metrics")
    assert set(metrics["step"]) == {2, 4} and set(metrics["split"]) == {"reference", "greedy"}
    # The checkpoints differ (different seeds), so the tables do too.
    lens = metrics[(metrics["metric"] == "lens_js") & (metrics["layer"] == 1) & (metrics["split"] == "reference")]
    assert lens["value"].nunique() == 2
    again = probe_run(folder, progress=False)  # incremental
    assert again.up_to_date == [2, 4]
    # The dashboard lists it like any run.
    from workbench.api import runs
    assert runs(out)["name"].tolist() == ["trl-out"]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "mistral", "gemma2", "gpt2"])
def test_architectures_probe_with_free_prompts_without_references(tmp_path, tokenizer, arch):
    model = _save(tmp_path / arch, arch, tokenizer)
    prompts = [{"prompt": p["prompt"]} for p in PROMPTS]
    folder = prepare_analysis_folder(resolve_source(model), tmp_path / "out", prompts, max_new_tokens=8)
    report = probe_run(folder, progress=False)
    assert report.analysed == [0], report.skipped
    metrics = Run.open(folder).analysis("metrics")
    assert set(metrics["split"]) == {"greedy"}  # no references: the model's own completions only
    assert set(Run.open(folder).analysis("topk")["prompt"]) == {0, 1}


def test_cli_probes_two_model_folders_and_a_trainer_dir(tmp_path, tokenizer):
    a, b = _save(tmp_path / "base", "qwen3", tokenizer, 1), _save(tmp_path / "tuned", "qwen3", tokenizer, 2)
    trl = tmp_path / "trl"
    _save(trl / "checkpoint-2", "qwen3", tokenizer, 3)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = tmp_path / "analysis"
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "probe", str(a), str(b), str(trl), "--out", str(out),
                             "--prompts", str(prompts), "--max-new-tokens", "10"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["base", "trl", "tuned"]
    assert f"oisd dashboard {out}" in result.stdout
    for name in ("base", "tuned"):
        assert not Run.open(out / name).analysis("metrics").empty


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"prompt": "a"}\n{"reference": "b"}\n', "line 2: needs a non-empty string 'prompt'"),
    ('{"prompt": "a"\n', "line 1, column"),
])
def test_bad_prompts_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, tokenizer):
    model = _save(tmp_path / "m", "qwen3", tokenizer)
    cases = [([str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")], "is none of the accepted inputs"),
             ([str(model)], "external checkpoints need --out DIR"),
             ([str(model), "--out", str(tmp_path / "o"), "--prompts", str(tmp_path / "none.jsonl")], "does not exist")]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "workbench.cli", "probe", *args], cwd=REPO, capture_output=True,
                                text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_an_architecture_transformerlens_cannot_boot_is_named(tmp_path, tokenizer, monkeypatch):
    """TransformerLens 4 boots every architecture these tests can build (Bloom, MPT, Falcon,
    CodeGen included), so its refusal is simulated with its own kind of error; what is
    tested is that the refusal reaches the user as one line naming the folder and the cause."""
    from transformer_lens.model_bridge import TransformerBridge

    def refuse(path, **kwargs):
        raise ValueError("Unsupported architecture: MadeUpForCausalLM.\nSupported: ...")

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(refuse))
    folder = _save(tmp_path / "m", "qwen3", tokenizer)
    out = prepare_analysis_folder(resolve_source(folder), tmp_path / "out", PROMPTS, max_new_tokens=4)
    report = probe_run(out, progress=False)
    (step, reason), = report.skipped
    assert reason == f"TransformerLens cannot load {folder}: ValueError: Unsupported architecture: MadeUpForCausalLM."



def _trl_copies(root: Path, model: Path, steps=(2, 4)) -> Path:
    """A plain TRL output dir: ``checkpoint-N/`` copies of one model folder."""
    import shutil

    for step in steps:
        shutil.copytree(model, root / f"checkpoint-{step}")
    return root


def test_references_of_some_prompts_make_a_reference_split_of_those(tmp_path, tiny_qwen3_dir, capsys):
    """Only some --prompts rows have a reference: each keeps its own, the reference split is
    scored on those prompts (said in one line), the greedy split on all; compare reads it."""
    from workbench.analysis.probe_runner import probe_splits
    from workbench.cli import main
    from workbench.compare import comparison_table

    items = [{"prompt": f"Compute {a}+{b}.\n"} | ({"reference": f"{a}+{b}={a + b}. Answer: {a + b}"} if a % 2 else {})
             for a, b in ((1, 2), (2, 3), (3, 4), (4, 5), (5, 1))]  # references on prompts 0, 2, 4
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in items))
    trl = _trl_copies(tmp_path / "trl-out", tiny_qwen3_dir)
    out = tmp_path / "analysis"
    assert main(["probe", str(trl), "--out", str(out), "--prompts", str(prompts), "--max-new-tokens", "6"]) == 0
    assert "reference split: 3 of 5 prompts have a reference" in capsys.readouterr().out

    run = Run.open(out / "trl-out")
    records = run.probe_set()
    assert [r["reference"] for r in records] == [p.get("reference") for p in items]
    assert [bool(r["reference_ids"]) for r in records] == [True, False, True, False, True]
    assert [(split, [r["index"] for r in rs]) for split, rs, _ in probe_splits(records, greedy=[[1]] * 5)] == [
        ("reference", [0, 2, 4]), ("greedy", [0, 1, 2, 3, 4])]
    metrics = run.analysis("metrics")
    assert set(metrics["split"]) == {"reference", "greedy"} and set(metrics["step"]) == {2, 4}
    row = comparison_table([out / "trl-out"]).iloc[0]
    assert row["probe_step"] == 4 and not pd.isna(row["top1_agree_after"]) and not pd.isna(row["attn_js_final_after"])
    assert main(["compare", str(out / "trl-out")]) == 0
    assert "note: trl-out: reference split over the 3 of 5 probe prompts that have a reference" in capsys.readouterr().out


def test_compare_says_why_a_folder_without_references_reads_dashes(tmp_path, tiny_qwen3_dir):
    from workbench.compare import reference_notes

    prompts = [{"prompt": p["prompt"]} for p in PROMPTS]
    folder = prepare_analysis_folder(resolve_source(tiny_qwen3_dir), tmp_path / "out", prompts, max_new_tokens=4)
    expected = (f"{folder.name}: no probe prompt has a reference, so there is no reference split and its "
                "alignment columns read '-' (its greedy split is in the dashboard)")
    assert reference_notes([folder]) == [expected]


def test_a_trainer_dir_analysis_folder_counts_its_steps_and_checkpoints(tmp_path, tiny_qwen3_dir, capsys):
    """Probed from a plain TRL output dir (checkpoint-2/, checkpoint-4/): compare, the notebook
    API and the dashboard's Runs table say steps 4 and 2 checkpoints, not 0 and 0."""
    from workbench.api import runs
    from workbench.cli import main
    from workbench.storage.runstore import run_summary

    trl = _trl_copies(tmp_path / "trl-out", tiny_qwen3_dir)
    out = tmp_path / "analysis"
    assert main(["probe", str(trl), "--out", str(out), "--max-new-tokens", "4", "--n-prompts", "2"]) == 0
    folder = out / "trl-out"
    summary = run_summary(Run.open(folder))
    assert (summary["steps"], summary["checkpoints"]) == (4, 2)
    table = runs(out)
    assert (table.iloc[0]["steps"], table.iloc[0]["checkpoints"]) == (4, 2)

    capsys.readouterr()
    assert main(["compare", str(folder)]) == 0
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.lstrip("│┃ ").startswith("trl-out"))
    cells = [c.strip() for c in row.strip("│┃ ").split("│")]
    assert cells[0] == "trl-out" and cells[3] == "4", printed  # run, method, seed, steps
    assert cells[-1] == "4 (analyzer)", printed  # probe step
