"""The TransformerLens analyzer against the trainer's HF probes, on random-init tiny
Qwen3, Llama and GPT-2 checkpoints; incremental runs and broken checkpoints."""

import logging
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from trainer.presets import preset_config
from trainer.tasks import ArithmeticTask
from trainer.tokenizer import build_char_tokenizer
from workbench.analysis.analyzer import PROCESSING_MODE, bridge_probe_inputs, probe_run
from workbench.analysis.probe_runner import make_probe_set, probe_batch, run_builtin_probes
from workbench.errors import WorkbenchError
from workbench.storage.atomic import read_provenance
from workbench.storage.checkpoints import write_checkpoint
from workbench.storage.runstore import Run
from workbench.storage.runwriter import RunWriter
from workbench.storage.schema import ATTN_COLUMNS, CELL_COLUMNS, METRIC_COLUMNS, TOPK_COLUMNS

KEYS = ["step", "layer", "head", "ref_layer", "metric", "split"]


def _configs(tokenizer):
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "qwen3": preset_config("tiny", tokenizer),
        "llama": LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, **special,
        ),
        "gpt2": GPT2Config(
            vocab_size=len(tokenizer), n_embd=64, n_layer=3, n_head=4, n_positions=256, **special
        ),
    }


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def records(tokenizer):
    task = ArithmeticTask(n_operands=2, digits=1, n_train=20, n_test=6, seed=0)
    return make_probe_set(task.test_examples(), tokenizer, 5)


def _model(config, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform layers; larger weights make the lens metrics
    # (ranks, argmaxes, attention) differ across layers so the comparison has teeth.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return model.eval()


def _make_run(root, tokenizer, records, models_by_step, extra=None):
    """A run folder with one checkpoint per (step, model); ``extra`` step -> save_fn."""
    run_dir = root / "run"
    writer = RunWriter(run_dir, {"method": "grpo", "seed": 0}, resume=False)
    writer.write_probe_set(records)
    for step, model in models_by_step.items():
        def save(folder, model=model):
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        write_checkpoint(run_dir, step, save, keep_last=None)
    for step, save in (extra or {}).items():
        write_checkpoint(run_dir, step, save, keep_last=None)
    return run_dir


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_analyzer_agrees_with_builtin_probes(tmp_path, tokenizer, records, arch):
    model = _model(_configs(tokenizer)[arch])
    run_dir = _make_run(tmp_path, tokenizer, records, {10: model})
    report = probe_run(run_dir, progress=False, max_new_tokens=12)
    assert report.analysed == [10] and not report.skipped

    run = Run.open(run_dir)
    analyzer = run.analysis("metrics")
    assert list(analyzer.columns) == METRIC_COLUMNS
    assert set(analyzer["source"]) == {"analyzer"}
    assert set(analyzer["split"]) == {"reference", "greedy"}
    probes = run_builtin_probes(
        model, tokenizer, records, run="run", step=10, max_new_tokens=12
    )
    assert set(probes["source"]) == {"probe"}
    merged = probes.merge(analyzer, on=KEYS, suffixes=("_hf", "_tl"), validate="one_to_one")
    assert len(merged) == len(probes) == len(analyzer)
    assert (merged["value_hf"] - merged["value_tl"]).abs().max() <= 1e-4
    # The metrics are not degenerate: layers differ from the final layer.
    lens_js = probes[(probes.metric == "lens_js") & (probes.split == "reference")]
    assert lens_js[lens_js.layer < lens_js.layer.max()]["value"].max() > 1e-3

    provenance = read_provenance(run.analysis_path(10, "metrics"))
    assert provenance["processing_mode"] == PROCESSING_MODE
    assert provenance["model_class"] == type(model).__name__
    assert provenance["probe_set_hash"] == run.info["probe_set_hash"]
    assert len(provenance["checkpoint_manifest_sha256"]) == 64


def test_bridge_last_layer_reproduces_hf_logits(tmp_path, tokenizer, records):
    from transformer_lens.model_bridge import TransformerBridge

    model = _model(_configs(tokenizer)["qwen3"])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu", dtype=torch.float32)
    bridge.eval()
    batch = probe_batch(records, tokenizer.pad_token_id)
    inputs = bridge_probe_inputs(bridge, batch)
    with torch.no_grad():
        hf_logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        # The lens read-out applied to the last block's residual (cached beside the
        # others) is the model's own output.
        _, cache = bridge.run_with_cache(
            batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"], names_filter=["blocks.3.hook_resid_post"],
        )
        readout_last = inputs.lens(cache["blocks.3.hook_resid_post"], 4)
    real = batch["attention_mask"].bool()
    assert (inputs.final_logits - hf_logits)[real].abs().max() <= 1e-5
    assert (readout_last - hf_logits)[real].abs().max() <= 1e-5


def test_broken_checkpoints_are_skipped_and_runs_are_incremental(
    tmp_path, tokenizer, records, caplog
):
    model = _model(_configs(tokenizer)["qwen3"])

    def not_a_model(folder):
        (folder / "notes.txt").write_text("not a model\n")

    run_dir = _make_run(tmp_path, tokenizer, records, {10: model, 20: model},
                        extra={30: not_a_model})
    weights = run_dir / "checkpoints" / "step-000020" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different sha256
    weights.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="workbench.analysis.analyzer"):
        report = probe_run(run_dir, progress=False, greedy=False, detail_prompts=2)
    assert report.analysed == [10]
    assert [step for step, _ in report.skipped] == [20, 30]
    reasons = dict(report.skipped)
    assert "sha256 mismatch for model.safetensors" in reasons[20]
    assert "not a model folder" in reasons[30]
    assert all("\n" not in reason for reason in reasons.values())
    warned = [r.getMessage() for r in caplog.records if r.name == "workbench.analysis.analyzer"]
    assert len(warned) == 2 and all("\n" not in m for m in warned)

    run = Run.open(run_dir)
    for kind, columns in (("topk", TOPK_COLUMNS), ("cells", CELL_COLUMNS), ("attn", ATTN_COLUMNS)):
        table = run.analysis(kind)
        assert list(table.columns) == columns
        assert set(table["prompt"]) == {0, 1} and set(table["step"]) == {10}
    topk = run.analysis("topk")
    # Labels decode with the checkpoint's tokenizer: single characters or special tokens.
    assert all(len(t) == 1 or t.startswith("<") for t in topk["token"])
    assert set(run.analysis("metrics")["split"]) == {"reference"}

    metrics_file = run.analysis_path(10, "metrics")
    written = metrics_file.stat().st_mtime_ns
    again = probe_run(run_dir, progress=False, greedy=False)
    assert again.analysed == [] and again.up_to_date == [10]
    assert metrics_file.stat().st_mtime_ns == written
    forced = probe_run(run_dir, progress=False, greedy=False, force=True)
    assert forced.analysed == [10]
    assert metrics_file.stat().st_mtime_ns != written


def test_not_a_run_is_one_line_error(tmp_path):
    with pytest.raises(WorkbenchError, match="not a run folder"):
        probe_run(tmp_path, progress=False)


def test_notebook_api(tmp_path, tokenizer, records):
    from workbench import api

    run_dir = _make_run(tmp_path, tokenizer, records, {5: _model(_configs(tokenizer)["llama"])})
    writer = RunWriter(run_dir, {"method": "grpo", "seed": 0}, resume=True, resume_step=5)
    writer.log_metrics(1, {"accuracy": 0.25, "reward": 0.5})
    writer.log_metrics(5, {"accuracy": 0.75, "reward": 1.0})
    writer.log_probes(pd.DataFrame(
        [["run", 5, 1, -1, -1, "lens_js", 0.1, "reference", "probe"],
         ["run", 5, 1, -1, -1, "entropy", 2.0, "reference", "probe"]], columns=METRIC_COLUMNS,
    ))
    (tmp_path / "not-a-run").mkdir()

    table = api.runs(tmp_path)
    assert table["name"].tolist() == ["run"]
    row = table.iloc[0]
    assert (row.method, row.status, row.steps, row.last_step, row.checkpoints) == (
        "grpo", "training", 5, 5, 1  # steps: the last step reached, as in the dashboard's Runs table
    )
    assert row.last_accuracy == 0.75 and row.last_reward == 1.0
    assert api.metrics(run_dir)["accuracy"].tolist() == [0.25, 0.75]
    assert api.probes(run_dir, metric="entropy")["value"].tolist() == [2.0]

    run = api.load_run(run_dir)
    report = api.analyze(run, progress=False, greedy=False, detail_prompts=1)
    assert report.analysed == [5]
    assert set(api.analysis(run)["step"]) == {5}
    assert set(api.analysis(run_dir, kind="attn")["prompt"]) == {0}


def test_analyzer_agrees_on_sampled_splits_and_long_greedy(tmp_path, tokenizer, records):
    """The stored sampled completions, split by the verifier's verdict, and greedy
    completions of up to 60 tokens (the run's length, from run.json) score the same through
    TransformerLens as through the built-in probes, to 1e-4."""
    from workbench.analysis.probe_runner import sample_probe_completions

    model = _model(_configs(tokenizer)["qwen3"])
    run_dir = _make_run(tmp_path, tokenizer, records, {10: model})
    # A verdict the test controls: even-length completions count as correct.
    samples = sample_probe_completions(model, tokenizer, records, step=10, k=3,
                                       verify=lambda record, ids: len(ids) % 2 == 0, seed=0, max_new_tokens=60)
    assert len(samples) == 3 * len(records) and 0 < samples["correct"].sum() < len(samples)
    assert samples["response_ids"].map(len).max() > 40  # longer than the bundled configs' 40
    writer = RunWriter(run_dir, {"method": "grpo", "seed": 0}, resume=True, resume_step=10)
    writer.log_samples(samples)
    writer.record(probe_max_new_tokens=60)

    report = probe_run(run_dir, progress=False)  # greedy length and samples from the run folder
    assert report.analysed == [10]
    analyzer = Run.open(run_dir).analysis("metrics")
    assert set(analyzer["split"]) == {"reference", "greedy", "sampled_correct", "sampled_wrong"}
    probes = run_builtin_probes(model, tokenizer, records, run="run", step=10, max_new_tokens=60,
                                samples=samples)
    merged = probes.merge(analyzer, on=KEYS, suffixes=("_hf", "_tl"), validate="one_to_one")
    assert len(merged) == len(probes) == len(analyzer)
    assert (merged["value_hf"] - merged["value_tl"]).abs().max() <= 1e-4
    n = analyzer[analyzer["metric"] == "n_samples"].set_index("split")["value"]
    assert n["sampled_correct"] == samples["correct"].sum() and n["sampled_wrong"] == (~samples["correct"]).sum()


def test_outcome_split_scores_exactly_its_sequences(tokenizer, records):
    """A hand-made split: two known sequences marked correct, one wrong. The split's
    final-layer target_nll equals the mean surprisal of its own response tokens, computed
    here with one plain unpadded forward per sequence."""
    model = _model(_configs(tokenizer)["llama"])
    responses = {0: [5, 6, 7, 2], 1: [8, 9, 2], 2: [10, 11, 12, 13, 2]}
    samples = pd.DataFrame([
        {"step": 0, "prompt": records[0]["index"], "sample": 0, "response_ids": responses[0], "correct": True},
        {"step": 0, "prompt": records[1]["index"], "sample": 0, "response_ids": responses[1], "correct": True},
        {"step": 0, "prompt": records[2]["index"], "sample": 0, "response_ids": responses[2], "correct": False},
    ])
    table = run_builtin_probes(model, tokenizer, records, run="r", step=0, greedy=False, samples=samples)

    def surprisal(index: int) -> list[float]:
        prompt = list(records[index]["prompt_ids"])
        ids = torch.tensor([prompt + responses[index]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        start = len(prompt) - 1
        return [-float(logp[start + j, t]) for j, t in enumerate(responses[index])]

    final = table[(table["metric"] == "target_nll") & (table["layer"] == table["layer"].max())
                  & (table["head"] == -1)].set_index("split")["value"]
    correct = surprisal(0) + surprisal(1)
    assert final["sampled_correct"] == pytest.approx(sum(correct) / len(correct), abs=1e-5)
    assert final["sampled_wrong"] == pytest.approx(sum(surprisal(2)) / len(surprisal(2)), abs=1e-5)
    n = table[table["metric"] == "n_samples"].set_index("split")["value"]
    assert n.to_dict() == {"sampled_correct": 2.0, "sampled_wrong": 1.0}


def test_cli_probe_exits_1_with_a_final_line_when_a_checkpoint_is_skipped(tmp_path, tokenizer, records):
    import subprocess
    import sys
    from pathlib import Path

    def not_a_model(folder):
        (folder / "notes.txt").write_text("not a model\n")

    run_dir = _make_run(tmp_path, tokenizer, records, {}, extra={30: not_a_model})
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "workbench.cli", "probe", str(run_dir)], cwd=root,
                            capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert result.returncode == 1
    assert "skipped 1" in result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: 1 checkpoint(s) could not be analysed (see the reasons above)")


def test_attention_table_keeps_top_k_keys_beyond_its_budget(tmp_path, tokenizer, records, monkeypatch):
    """Beyond ``ATTN_DETAIL_ROWS`` each query keeps its heaviest keys: the table stays within
    the budget, the file says how many keys and how much weight they hold, and the kept
    rows are the full table's heaviest ones with their exact weights."""
    from workbench.analysis import analyzer
    from workbench.storage.atomic import read_provenance

    model = _model(_configs(tokenizer)["qwen3"])
    full_dir = _make_run(tmp_path / "full", tokenizer, records, {5: model})
    probe_run(full_dir, progress=False, greedy=False, detail_prompts=2)
    full = pd.read_parquet(Run.open(full_dir).analysis_path(5, "attn"))
    info_full = read_provenance(Run.open(full_dir).analysis_path(5, "attn"))
    assert info_full["attn_top_k"] is None and info_full["attn_mass_kept"] == 1.0
    assert full["weight"].dtype == "float16" and full["key"].dtype == "int16"

    budget = len(full) // 3
    monkeypatch.setattr(analyzer, "ATTN_DETAIL_ROWS", budget)
    small_dir = _make_run(tmp_path / "small", tokenizer, records, {5: model})
    probe_run(small_dir, progress=False, greedy=False, detail_prompts=2)
    path = Run.open(small_dir).analysis_path(5, "attn")
    small, info = pd.read_parquet(path), read_provenance(path)
    k = info["attn_top_k"]
    queries = full.drop_duplicates(["prompt", "layer", "head", "query"])
    assert k == budget // len(queries) and len(small) <= budget
    keys = ["prompt", "layer", "head", "query", "key"]
    expected = (full.sort_values(keys).sort_values("weight", ascending=False, kind="stable")
                .groupby(["prompt", "layer", "head", "query"]).head(k))
    merged = small.merge(full, on=keys, suffixes=("", "_full"))
    assert len(merged) == len(small) == len(expected)  # every kept row exists in the full table
    assert (merged["weight"] == merged["weight_full"]).all()
    assert set(map(tuple, small[keys].to_numpy())) == set(map(tuple, expected[keys].to_numpy()))
    kept = small.astype({"weight": "float64"}).groupby(["prompt", "layer", "head", "query"])["weight"].sum()
    assert info["attn_mass_kept"] == pytest.approx(float(kept.mean()), abs=2e-3) and info["attn_mass_kept"] < 1


def test_streamed_attention_equals_the_held_patterns(tmp_path, tokenizer, records, monkeypatch):
    """Patterns that fit ``HELD_PATTERN_BYTES`` are read from the one cached forward; beyond
    it a second forward streams them layer by layer. Both give the same tables, value for
    value, and the budget decides which path runs."""
    from workbench.analysis import analyzer

    model = _model(_configs(tokenizer)["qwen3"])
    streams = []
    real_stream = analyzer.stream_attention
    monkeypatch.setattr(analyzer, "stream_attention", lambda *a, **k: streams.append(1) or real_stream(*a, **k))
    tables = {}
    for name, budget in [("held", analyzer.HELD_PATTERN_BYTES), ("streamed", 0)]:
        monkeypatch.setattr(analyzer, "HELD_PATTERN_BYTES", budget)
        run_dir = _make_run(tmp_path / name, tokenizer, records, {5: model})
        probe_run(run_dir, progress=False, max_new_tokens=8, detail_prompts=2)
        tables[name] = {kind: Run.open(run_dir).analysis(kind) for kind in ("metrics", "attn", "cells", "topk")}
        assert len(streams) == (0 if name == "held" else 2)  # one second forward per split
    for kind, held in tables["held"].items():
        pd.testing.assert_frame_equal(held, tables["streamed"][kind])
    attn = tables["held"]["metrics"]
    assert attn[attn.metric == "attn_js_final"]["value"].max() > 1e-3  # the patterns differ by layer


def test_probe_measures_weight_drift_from_the_start_model(tmp_path, tokenizer, records, monkeypatch):
    """``oisd probe`` writes each checkpoint's drift from the run's start model; a block moved
    by hand is the one compare names, and the dashboard's alignment view draws it. Here the
    analysis is merged into segments of 2 checkpoints (32 by default), so everything below
    reads segments: the drift, compare's line, and the up-to-date check of a second probe."""
    import copy
    import functools

    from workbench.analysis import analyzer
    from workbench.compare import drift_lines
    from workbench.storage.runwriter import RunWriter, merge_analysis_files

    monkeypatch.setattr(analyzer, "merge_analysis_files", functools.partial(merge_analysis_files, size=2))

    start = _model(_configs(tokenizer)["qwen3"])
    start_dir = tmp_path / "start"
    start.save_pretrained(start_dir)
    tokenizer.save_pretrained(start_dir)
    moved = copy.deepcopy(start)
    with torch.no_grad():
        moved.model.layers[2].mlp.down_proj.weight.mul_(1.5)  # block 3: ||dW|| = 0.5 ||W||
    run_dir = _make_run(tmp_path, tokenizer, records, {5: start, 10: moved})
    writer = RunWriter(run_dir, {"method": "grpo", "seed": 0, "model": {"path": str(start_dir)}}, resume=True,
                       append=True)
    writer.record(num_layers=4)
    report = probe_run(run_dir, progress=False, greedy=False, detail_prompts=0)
    segments = sorted(p.name for p in (run_dir / "analysis").glob("steps-*"))
    assert segments == ["steps-000005-000010-drift.parquet", "steps-000005-000010-metrics.parquet"]
    assert set(report.files) >= {run_dir / "analysis" / name for name in segments}
    assert all(f.exists() for f in report.files)
    drift = Run.open(run_dir).analysis("drift")
    assert sorted(drift["step"].unique()) == [5, 10]
    blocks = drift[(drift["kind"] == "all") & (drift["module"] == "block")].set_index(["step", "block"])
    assert (blocks.loc[5, "rel_change"] == 0).all() and (blocks.loc[5, "changed_bf16"] == 0).all()
    mlp = drift[(drift["step"] == 10) & (drift["block"] == 3) & (drift["kind"] == "mlp")].iloc[0]
    names = [f"model.layers.2.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    weights = dict(start.named_parameters())
    expected = 0.5 * float(weights[names[2]].double().norm()) / math.sqrt(
        sum(float(weights[n].double().norm() ** 2) for n in names))
    assert mlp["rel_change"] == pytest.approx(expected, rel=1e-6)
    assert [b for b in blocks.loc[10].index if blocks.loc[(10, b), "rel_change"] > 0] == [3]
    (line,) = drift_lines([run_dir])
    assert "at step 10: block 3 moved most" in line
    # Probing again computes nothing new.
    again = probe_run(run_dir, progress=False, greedy=False, detail_prompts=0)
    assert again.files == [] and sorted(again.up_to_date) == [5, 10]


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gpt2"])
def test_greedy_decoder_shares_the_bridge_weights(tmp_path, tokenizer, arch):
    """The analyzer's greedy decoder takes the tensors of the model the bridge wraps (the
    weights are in memory once): every parameter is the same storage, nothing is left on
    the meta device, and it decodes token for token as a decoder loaded on its own."""
    from workbench.analysis.analyzer import _boot, load_decoder

    model = _model(_configs(tokenizer)[arch])
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    bridge, _ = _boot(str(tmp_path / "m"), "cpu", torch.float32)
    shared = load_decoder(str(tmp_path / "m"), "cpu", torch.float32, share_with=bridge.original_model)
    alone = load_decoder(str(tmp_path / "m"), "cpu", torch.float32)
    storage = {p.data_ptr() for p in bridge.original_model.parameters()}
    assert all(p.data_ptr() in storage for p in shared.parameters())
    assert not any(t.is_meta for t in [*shared.parameters(), *shared.buffers()])
    ids = torch.tensor([[1, 5, 7, 9, 3, 4]])
    with torch.no_grad():
        assert torch.equal(shared(ids).logits, alone(ids).logits)
        out = shared.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(out, alone.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_stage_seconds_attributes_the_peak_memory_to_the_stage_that_raised_it():
    """A stage that touches 600 MB raises the recorded peak by about what it adds above the
    previous peak (600 MB less the gap between the peak and the resident memory when it
    starts, read from /proc); a stage that allocates nothing new raises it by (almost)
    nothing. In a fresh process started by this (large) one: the peak is the child's own,
    not the parent's that ``ru_maxrss`` would carry across fork + exec."""
    import json
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    code = """
import json, numpy as np
from workbench.analysis.memory import StageSeconds

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

stages = StageSeconds()
gap = status("VmHWM:") - status("VmRSS:")
with stages("big"):
    block = np.ones(600 * 2**20 // 8)  # 600 MB, written so that it is resident
    del block
with stages("small"):
    sum(range(1000))
print(json.dumps([dict(stages), stages.peak_growth_mb, gap]))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    seconds, growth, gap = json.loads(out.strip().splitlines()[-1])
    assert seconds["big"] > 0 and seconds["small"] >= 0
    assert growth["big"] == pytest.approx(max(0.0, 600 - gap), abs=40)
    assert growth["small"] < 5


def test_the_analyzer_fixes_glibc_malloc_threshold_once():
    """On glibc the analyzer serves allocations of 1 MiB and more from their own mappings:
    a freed 16 MiB tensor is given back to the system at once, where glibc's own dynamic
    threshold (raised by a freed 30 MiB block) keeps it on the heap, resident. In fresh
    processes, one each way."""
    import json
    import subprocess
    import sys

    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    code = """
import json, sys, torch
from workbench.analysis.memory import fix_malloc_threshold

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

fixed = [fix_malloc_threshold(), fix_malloc_threshold()] if sys.argv[1] == "fix" else []
y = torch.ones(30 * 2**18)  # a 30 MiB block, freed: glibc raises its threshold to it
del y
before = rss()
x = torch.ones(4 * 2**20)  # 16 MiB
pin = torch.ones(1000)  # a small block after it on the heap
held = rss() - before
del x
print(json.dumps([fixed, held, rss() - before]))
"""
    runs = {}
    for way in ("fix", "glibc"):
        out = subprocess.run([sys.executable, "-c", code, way], check=True, capture_output=True, text=True).stdout
        runs[way] = json.loads(out.strip().splitlines()[-1])
    fixed, held, left = runs["fix"]
    assert fixed == [True, True] and held > 15 and left < 1
    _, held, left = runs["glibc"]
    assert held > 15 and left > 15  # what the fix is for


def test_probing_reads_each_earlier_result_at_most_once(tmp_path, tokenizer, records, monkeypatch):
    """Linear in checkpoints: probing N checkpoints opens each analysis file at most once
    (the up-to-date check reads footers once before the loop, never once per checkpoint), on a
    fresh probe and on one that adds a checkpoint to an analysed run."""
    import collections

    import pyarrow.parquet as pq

    model = _model(_configs(tokenizer)["qwen3"])
    run_dir = _make_run(tmp_path, tokenizer, records, {s: model for s in (10, 20, 30, 40, 50)})
    opened = collections.Counter()
    analysis = (run_dir / "analysis").resolve()
    for name in ("read_schema", "read_table", "read_metadata", "ParquetFile"):
        real = getattr(pq, name)

        def counting(source, *args, _real=real, **kwargs):
            path = Path(str(source)).resolve()
            if analysis in path.parents:
                opened[path] += 1
            return _real(source, *args, **kwargs)

        monkeypatch.setattr(pq, name, counting)

    assert probe_run(run_dir, progress=False, greedy=False, detail_prompts=1).analysed == [10, 20, 30, 40, 50]
    assert max(opened.values(), default=0) <= 1, {p.name: n for p, n in opened.items() if n > 1}
    # A sixth checkpoint arrives; the probe analyses it alone, reading each earlier footer once.
    write_checkpoint(run_dir, 60, lambda f: (model.save_pretrained(f), tokenizer.save_pretrained(f)), keep_last=None)
    opened.clear()
    report = probe_run(run_dir, progress=False, greedy=False, detail_prompts=1)
    assert report.analysed == [60] and report.up_to_date == [10, 20, 30, 40, 50]
    assert {p.name for p in opened} >= {f"step-{s:06d}-metrics.parquet" for s in (10, 20, 30, 40, 50)}
    assert max(opened.values()) == 1, {p.name: n for p, n in opened.items() if n > 1}
