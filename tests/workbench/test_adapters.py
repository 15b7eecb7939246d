"""LoRA checkpoints are probed as full models: a hand-made adapter-only series (TRL / PEFT
``checkpoint-N`` folders) probes exactly like the same weights merged by hand, and the merge
of a live LoRA policy (what a LoRA run's checkpoints hold) equals peft's own merge."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import peft  # the peft extra, which `make test` installs
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from workbench.analysis.analyzer import probe_run
from workbench.analysis.external import plan_analysis_folder, prepare_analysis_folder, resolve_source
from workbench.errors import ConfigError
from workbench.models.adapters import is_adapter_folder, merged_lora_state_dict
from workbench.storage.runstore import Run


PROMPTS = [{"prompt": "Compute 1+2.\n", "reference": "1+2=3. Answer: 3"},
           {"prompt": "Compute 7-5.\n", "reference": "7-5=2. Answer: 2"}]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _lora(base: Path, seed: int, r: int = 4, alpha: int = 8, rslora: bool = False):
    """The base model with a LoRA adapter whose B is not zero (a fresh adapter is the identity)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, use_rslora=rslora, task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return adapted


def _hand_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """W + (alpha / r) B A for every adapted weight, from the adapter's files alone."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    weights = load_file(base / "model.safetensors")
    lora = load_file(adapter / "adapter_model.safetensors")
    for key in [k for k in lora if ".lora_A." in k]:
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        a, b = lora[key], lora[key.replace(".lora_A.", ".lora_B.")]
        weights[f"{module}.weight"] = weights[f"{module}.weight"] + scale * (b @ a)
    return weights


@pytest.fixture
def series(tmp_path, tiny_qwen3_dir, char_tokenizer):
    """A TRL-style output dir of two LoRA adapters (checkpoint-1, checkpoint-2) over the tiny
    Qwen3, and the same two checkpoints merged by hand into full model folders."""
    adapters, merged = tmp_path / "lora-out", tmp_path / "merged-out"
    for step in (1, 2):
        folder = adapters / f"checkpoint-{step}"
        _lora(tiny_qwen3_dir, seed=step).save_pretrained(folder)
        char_tokenizer.save_pretrained(folder)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        full = merged / f"checkpoint-{step}"
        model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir)
        model.load_state_dict(_hand_merge(tiny_qwen3_dir, folder), strict=False)
        model.save_pretrained(full)
        char_tokenizer.save_pretrained(full)
        (full / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return adapters, merged


def test_an_adapter_series_probes_like_the_same_weights_merged_by_hand(series, tiny_qwen3_dir, tmp_path):
    adapters, merged = series
    assert all(is_adapter_folder(p) for p in adapters.glob("checkpoint-*"))
    source = resolve_source(adapters)
    assert source.kind == "trainer" and source.adapters and [s for s, _, _ in source.checkpoints] == [1, 2]
    out = tmp_path / "analysis"
    folder_a = prepare_analysis_folder(source, out, PROMPTS, base=str(tiny_qwen3_dir))
    folder_b = prepare_analysis_folder(resolve_source(merged), out, PROMPTS)
    reports = [probe_run(f, progress=False, detail_prompts=1, base=str(tiny_qwen3_dir)) for f in (folder_a, folder_b)]
    assert [r.analysed for r in reports] == [[1, 2], [1, 2]] and not any(r.skipped for r in reports)
    assert not list(folder_a.glob(".merged-*"))  # the temporary merges are gone
    a, b = (Run.open(f).analysis("metrics").drop(columns="run") for f in (folder_a, folder_b))
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True), rtol=1e-5, atol=1e-6)
    # The adapters changed the model: its lens differs from the base's, and drift sees the change
    # exactly where LoRA acted.
    drift = Run.open(folder_a).analysis("drift")
    moved = drift[(drift["module"] == "block") & (drift["kind"] == "all")]
    assert (moved["rel_change"] > 0).all()
    still = drift[drift["module"].isin(["embeddings", "final_norm"])]
    assert (still["rel_change"] == 0).all()
    assert json.loads((folder_a / "run.json").read_text())["external"]["checkpoints"][0] == {
        "step": 1, "path": str(adapters / "checkpoint-1"), "origin": f"checkpoint-1 of {adapters}", "adapter": True,
        "base": str(tiny_qwen3_dir)}


def test_an_adapter_without_a_base_is_one_line(series, tmp_path):
    adapters, _ = series
    for folder in adapters.glob("checkpoint-*"):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = None
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="names no base model; give --base"):
        plan_analysis_folder(resolve_source(adapters), tmp_path / "out", PROMPTS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_of_a_live_lora_policy_equals_peft_merge(tiny_qwen3_dir, rslora):
    adapted = _lora(tiny_qwen3_dir, seed=3, r=4, alpha=16, rslora=rslora)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    ours = merged_lora_state_dict(adapted)
    assert all(torch.equal(before[k], v) for k, v in adapted.state_dict().items())  # the policy is untouched
    theirs = adapted.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)
    start = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir).state_dict()
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], start["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(ours["model.layers.0.self_attn.k_proj.weight"], start["model.layers.0.self_attn.k_proj.weight"])
