"""Weight drift per block and module kind, on hand-made checkpoints with known changes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import CheckpointError
from workbench.measures.drift import most_moved_block, parameter_group, weight_drift


def _save(folder, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture()
def start(tmp_path, tiny_qwen3_dir):
    # Every start value is exact in bfloat16, so a change below half a bf16 step changes no bf16 value.
    weights = {k: v.to(torch.bfloat16).float() for k, v in load_file(tiny_qwen3_dir / "model.safetensors").items()}
    return weights, _save(tmp_path / "start", weights)


def test_parameter_groups_of_qwen3_and_gpt2_names():
    assert parameter_group("model.layers.0.self_attn.q_proj.weight", 4) == ("block", 1, "attention")
    assert parameter_group("model.layers.3.mlp.down_proj.weight", 4) == ("block", 4, "mlp")
    assert parameter_group("model.layers.1.post_attention_layernorm.weight", 4) == ("block", 2, "norm")
    assert parameter_group("model.embed_tokens.weight", 4) == ("embeddings", 0, "embedding")
    assert parameter_group("model.norm.weight", 4) == ("final_norm", 5, "norm")
    assert parameter_group("lm_head.weight", 4) == ("head", 6, "head")
    assert parameter_group("transformer.h.2.attn.c_attn.weight", 4) == ("block", 3, "attention")
    assert parameter_group("transformer.h.2.mlp.c_fc.weight", 4) == ("block", 3, "mlp")
    assert parameter_group("transformer.h.2.ln_1.weight", 4) == ("block", 3, "norm")
    assert parameter_group("transformer.ln_f.weight", 4) == ("final_norm", 5, "norm")


def test_known_changes_give_known_drift(start, tmp_path):
    w0, start_dir = start
    now = {k: v.clone() for k, v in w0.items()}
    down = "model.layers.1.mlp.down_proj.weight"  # block 2
    now[down][:2] += 1.0  # two rows moved by 1: every one of their entries changes in bf16
    q = "model.layers.2.self_attn.q_proj.weight"  # block 3: a change below half a bf16 step
    now[q] *= 1 + 1e-6
    drift = weight_drift(start_dir, _save(tmp_path / "now", now), n_layers=4)
    row = drift.set_index(["module", "block", "kind"])

    mlp = [f"model.layers.1.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    base = math.sqrt(sum(float((w0[k].double() ** 2).sum()) for k in mlp))
    moved = now[down].shape[1] * 2
    assert row.loc[("block", 2, "mlp"), "rel_change"] == pytest.approx(math.sqrt(moved) / base, rel=1e-9)
    assert row.loc[("block", 2, "mlp"), "changed_bf16"] == pytest.approx(moved / sum(w0[k].numel() for k in mlp))
    block2 = [k for k in w0 if k.startswith("model.layers.1.")]
    assert row.loc[("block", 2, "all"), "n_params"] == sum(w0[k].numel() for k in block2)
    assert row.loc[("block", 2, "all"), "rel_change"] == pytest.approx(
        math.sqrt(moved) / math.sqrt(sum(float((w0[k].double() ** 2).sum()) for k in block2)), rel=1e-9)
    assert row.loc[("block", 2, "attention"), "rel_change"] == 0.0
    # Block 3 moved (1e-6 relative) but no bf16 value changed.
    attn = [k for k in w0 if k.startswith("model.layers.2.self_attn.")]
    moved_q = math.sqrt(float(((now[q].double() - w0[q].double()) ** 2).sum()))  # about 1e-6 of q (fp32 rounding)
    expected = moved_q / math.sqrt(sum(float((w0[k].double() ** 2).sum()) for k in attn))
    assert 0 < row.loc[("block", 3, "attention"), "rel_change"] == pytest.approx(expected, rel=1e-9)
    assert row.loc[("block", 3, "attention"), "changed_bf16"] == 0.0
    assert row.loc[("block", 1, "all"), "rel_change"] == 0.0 and row.loc[("embeddings", 0, "all"), "rel_change"] == 0.0
    assert most_moved_block(drift) == (2, pytest.approx(row.loc[("block", 2, "all"), "rel_change"]))


def test_different_parameters_are_one_line_errors(start, tmp_path):
    w0, start_dir = start
    fewer = {k: v for k, v in w0.items() if "layers.3." not in k}
    with pytest.raises(CheckpointError, match="different parameters"):
        weight_drift(start_dir, _save(tmp_path / "fewer", fewer), n_layers=4)
    with pytest.raises(CheckpointError, match="no safetensors"):
        weight_drift(start_dir, tmp_path, n_layers=4)
