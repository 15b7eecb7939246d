"""The training loop end to end, and the loss it builds, on tiny random models.

- every method trains 2 steps on Qwen3 and Llama folders: the metric names of docs/objectives.md,
  loadable checkpoints, probe rows;
- every method with its auxiliary coefficients at 0 *is* GRPO: the loop's own
  ``Trainer.micro_loss`` gives the same loss and bit-identical gradients;
- OISD's terms send no gradient into the teacher side (blocks after the selected
  layer, the detached readout, the final layer's attention);
- bad input fails in one line before any work; the non-finite guard; dynamic sampling.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import trainer.objectives as objectives
from trainer.config import load_config
from trainer.loop import NonFiniteError, Trainer
from trainer.methods import METHOD_NAMES, METHODS, spec_of
from trainer.run import train
from trainer.setup import check_batch, prepare, resolve_layers
from workbench.cli import main as cli_main
from workbench.errors import ConfigError
from workbench.storage.checkpoints import write_checkpoint
from workbench.storage.runstore import Run

# Names every training step logs, and those each method adds (docs/objectives.md, "Per-step metrics").
COMMON = {"reward", "reward_std", "frac_reward_zero_std", "accuracy", "completions/mean_length",
          "completions/clipped_ratio", "entropy", "loss", "perf/step_time", "perf/tokens_per_s"}
GRPO_TERM = {"loss/policy", "clip_ratio/region_mean"}
SDPG = GRPO_TERM | {"loss/opd", "loss/ref_kl", "kl", "sched/beta", "sdpg/gate_fraction"}
OISD = GRPO_TERM | {"loss/think", "loss/attn"}
# What a method's own terms log beyond its kind's (its schedule's names come from the table).
OWN_LOGS = {"rlsd": {"rlsd/w_mean"}, "opsd": {"kl"}}


def expected_logs(method: str) -> set[str]:
    """The metric names a training step of ``method`` logs beyond COMMON, from its row of the
    method table: the reward term's, OISD's, SDPG's, its schedule's, and its own."""
    spec = spec_of(method)
    names = set(GRPO_TERM) if spec.reward_term else {"loss/policy"}
    names |= (OISD if spec.oisd else set()) | (SDPG if spec.sdpg else set())
    names |= set(spec.schedule(load_config(method), 1))
    return names | OWN_LOGS.get(method, set())
# Small arithmetic split (the default 20000 questions cost time to build).
SMALL_TASK = {"data.arithmetic.n_train": 200, "data.arithmetic.n_test": 20}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_two_steps(method, arch, request, tmp_path, run_overrides):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    run_dir = tmp_path / "run"
    # t_warm 0: beta(0) > 0, so the OPD term is computed (and logged) from the first step.
    cfg = load_config(method, run_overrides(model_dir, run_dir, **SMALL_TASK, sdpg__t_warm=0))
    assert train(cfg) == run_dir

    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["config"]["method"] == method
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # oisd.layers [0.25] of 4 blocks in the bundled configs: block 1; the middle block for every other method
    layer = 1 if spec_of(method).oisd else 2
    for r in (rows[0], rows[2]):  # eval and probes at step 0 and at the last step
        assert {"eval/accuracy", f"probe/top1_agree/layer{layer}", f"probe/lens_js/layer{layer}",
                f"probe/attn_js_final/layer{layer}"} <= r.keys()
    for r in rows[1:]:
        want = COMMON | expected_logs(method)
        assert want <= r.keys(), sorted(want - r.keys())
        assert all(isinstance(r[k], float) and r[k] == r[k] for k in want)  # numbers, no NaN
        assert r["nonfinite_skipped"] == 0.0
        assert r["frac_reward_zero_std"] == 1.0  # a random model never earns a reward
    if spec_of(method).reward_term:  # OPSD's loss needs no reward; the others log a clip ratio of 0 here
        assert rows[1]["clip_ratio/region_mean"] == 0.0

    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-000001", "step-000002"]
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-000002")
    assert type(loaded).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert loaded.config.num_hidden_layers == 4
    assert (run_dir / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()

    probes = Run.open(run_dir).probes()
    assert sorted(probes["step"].unique()) == [0, 2]
    assert {1, 2, 3, 4} <= set(probes["layer"])
    assert {"lens_kl", "lens_js", "top1_agree", "attn_js_final"} <= set(probes["metric"])
    final = probes[(probes["metric"] == "lens_kl") & (probes["layer"] == 4) & (probes["head"] == -1)]
    assert (final["value"].abs() < 1e-6).all()  # the final layer against itself


@pytest.mark.parametrize("method, terms", [("oisd", {"policy", "think", "attn"}),
                                           ("sdpg", {"policy", "opd", "ref_kl"})])
def test_gradient_share_of_every_term_is_logged(method, terms, coin_model_dir, coin_data, tmp_path,
                                                run_overrides):
    # The coin task earns rewards (advantages != 0), so every term has a gradient.
    cfg = load_config(method, run_overrides(coin_model_dir, tmp_path / "r", data=coin_data, steps=2,
                                                    rollout__prompts_per_step=4, probe_every=0, eval_every=0,
                                                    sdpg__t_warm=0, sdpg__gate=False, logging__grad_share_every=2))
    train(cfg)
    first, second = _metrics(tmp_path / "r")
    shares = {k.removeprefix("grad_share/"): v for k, v in first.items() if k.startswith("grad_share/")}
    assert set(shares) == terms
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    # At the first step the policy is the reference, so L_K's gradient (1 - w^-1) is exactly 0;
    # every other term moves the parameters.
    assert {k for k, v in shares.items() if v == 0.0} == ({"ref_kl"} if method == "sdpg" else set())
    assert all(0.0 <= v < 1.0 for v in shares.values())
    assert not any(k.startswith("grad_share/") for k in second)  # every 2 steps: steps 0, 2, ...


def test_outcome_probes_and_resolved_facts_are_written(tiny_qwen3_dir, tmp_path, run_overrides):
    run_dir = tmp_path / "r"
    cfg = load_config("oisd", run_overrides(tiny_qwen3_dir, run_dir, **SMALL_TASK, steps=1, probe_every=1,
                                            eval_every=0, probe__samples_per_prompt=3, probe__n_prompts=2))
    train(cfg)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["num_layers"] == 4 and info["oisd_layers"] == [1] and info["probe_max_new_tokens"] == 16
    samples = pd.read_parquet(run_dir / "probe_samples.parquet")
    assert sorted(samples["step"].unique()) == [0, 1]
    assert len(samples) == 2 * 2 * 3  # 2 probe points x 2 prompts x 3 samples
    assert not samples["correct"].any()  # a random model never answers right
    probes = Run.open(run_dir).probes()
    n = probes[probes["metric"] == "n_samples"].set_index(["step", "split"])["value"]
    assert n[(1, "sampled_wrong")] == 6 and n[(1, "sampled_correct")] == 0
    wrong = probes[(probes["split"] == "sampled_wrong") & (probes["metric"] == "top1_agree")]
    assert set(wrong["layer"]) == {1, 2, 3, 4}
    assert probes[(probes["split"] == "sampled_correct") & (probes["metric"] != "n_samples")].empty


def test_dropout_is_off_while_scoring(tmp_path, char_tokenizer, run_overrides):
    """GPT-2 with dropout 0.1, SDPG: at step 1 the policy equals the reference, so L_K (ufkl,
    w = 1) is exactly 1; with dropout on while scoring it was 1.00175."""
    from transformers import GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(char_tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=char_tokenizer.bos_token_id,
                        eos_token_id=char_tokenizer.eos_token_id, pad_token_id=char_tokenizer.pad_token_id)
    folder = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    cfg = load_config("sdpg-ufkl", run_overrides(folder, tmp_path / "r", **SMALL_TASK, steps=1, probe_every=0,
                                                 eval_every=0, sdpg__t_warm=0))
    train(cfg)
    (row,) = _metrics(tmp_path / "r")
    assert row["loss/ref_kl"] == pytest.approx(1.0, abs=1e-6)
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)


def test_sdpg_opd_term_off_during_warmup_is_not_logged(tiny_qwen3_dir, tmp_path, run_overrides):
    """With the paper's warm-up, beta(0) = 0: no teacher forward, no loss/opd, beta logged as 0."""
    cfg = load_config("sdpg-ufkl", run_overrides(tiny_qwen3_dir, tmp_path / "r", **SMALL_TASK, steps=1,
                                            probe_every=0, eval_every=0))
    train(cfg)
    (row,) = _metrics(tmp_path / "r")
    assert row["sched/beta"] == 0.0 and "loss/opd" not in row


# ----------------------------------------------------------------------------- the loss


def _trainer(model_dir, tmp_path, run_overrides, data, method, **keys) -> Trainer:
    """A Trainer on a validated setup (``prepare`` writes nothing, so runs may share a path)."""
    cfg = load_config(method, run_overrides(model_dir, tmp_path / method, data=data, **keys))
    return Trainer(cfg, prepare(cfg))


def _loss_and_grads(tr: Trainer, sb) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tr.model.zero_grad(set_to_none=True)
    rows = torch.arange(sb.input_ids.shape[0])
    loss, _, _ = tr.micro_loss(sb, rows, None, tr.normalisers(sb, rows))
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in tr.model.named_parameters()}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def coin_batch(coin_model_dir, coin_data, tmp_path_factory, run_overrides):
    """One step batch of the coin task (4 prompts x 2), with fixed non-zero advantages."""
    tr = _trainer(coin_model_dir, tmp_path_factory.mktemp("batch"), run_overrides, coin_data, "grpo",
                  rollout__prompts_per_step=4)
    sb, _ = tr.rollout()
    sb.advantages = torch.tensor([1.0, -0.5, 0.8, -0.3, -0.7, 0.4, 0.2, 0.0])
    return sb


# Every method with auxiliary terms (the table's MethodSpec.coefficients): those weights at 0...
ZERO_AUX = {m: {k.replace(".", "__"): 0.0 for k in spec.coefficients} for m, spec in METHODS.items()
            if spec.coefficients}
# ...and the same methods with their terms on (SDPG's from step 0, on every response): the
# comparison must be able to fail.
SOME_AUX = {m: {k.replace(".", "__"): 0.5 for k in spec.coefficients} | {"sdpg__t_warm": 0, "sdpg__gate": False}
            for m, spec in METHODS.items() if spec.coefficients}


@pytest.mark.parametrize("method", sorted(ZERO_AUX))
def test_zero_auxiliary_coefficients_reproduce_grpo_exactly(method, coin_model_dir, coin_data, coin_batch,
                                                            tmp_path, run_overrides):
    grpo = _trainer(coin_model_dir, tmp_path / "g", run_overrides, coin_data, "grpo")
    loss_g, grads_g = _loss_and_grads(grpo, coin_batch)
    assert loss_g != 0 and all(g.abs().sum() > 0 for g in grads_g.values())

    off = _trainer(coin_model_dir, tmp_path / "off", run_overrides, coin_data, method, **ZERO_AUX[method])
    loss_m, grads_m = _loss_and_grads(off, coin_batch)
    assert torch.equal(loss_m, loss_g)
    assert grads_m.keys() == grads_g.keys()
    for name in grads_g:
        assert torch.equal(grads_m[name], grads_g[name]), name

    on = _trainer(coin_model_dir, tmp_path / "on", run_overrides, coin_data, method, **SOME_AUX[method])
    loss_on, grads_on = _loss_and_grads(on, coin_batch)
    assert not torch.equal(loss_on, loss_g) or any(not torch.equal(grads_on[n], grads_g[n]) for n in grads_g)


# Each method with every term it has switched on (the KL to the reference too), so chunking covers them all.
EVERY_TERM = {m: SOME_AUX.get(m, {}) | {"grpo__kl_coef": 0.1} for m in METHOD_NAMES}


def _vocab_rows(tr: Trainer, sb) -> tuple[list[int], list[int]]:
    """For one micro-batch forward and backward: the rows of every activation that autograd
    saves whose last dimension is the vocabulary (weights such as lm_head's, transposed for
    its input gradient, are not counted; checkpointed chunks keep only their inputs), and
    the rows of every call of the policy's lm_head, backward's recomputation included."""
    weights = {p.untyped_storage().data_ptr() for p in tr.model.parameters()}
    saved, calls = [], []

    def pack(t):
        if t.dim() == 2 and t.shape[-1] == tr.vocab_size and t.untyped_storage().data_ptr() not in weights:
            saved.append(t.shape[0])
        return t

    head = tr.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    rows = torch.arange(sb.input_ids.shape[0])
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _, _ = tr.micro_loss(sb, rows, None, tr.normalisers(sb, rows))
        loss.backward()
    finally:
        handle.remove()
    return saved, calls


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_chunked_vocabulary_terms_equal_unchunked(method, coin_model_dir, coin_data, coin_batch, tmp_path,
                                                  run_overrides):
    """optim.vocab_chunk_size: the loss and every gradient equal the unchunked ones to float
    tolerance, while no (n, V) tensor is kept for backward (the unchunked path keeps some)."""
    keys = EVERY_TERM[method]
    full = _trainer(coin_model_dir, tmp_path / "f", run_overrides, coin_data, method, optim__vocab_chunk_size=0,
                    **keys)
    chunked = _trainer(coin_model_dir, tmp_path / "c", run_overrides, coin_data, method,
                       optim__vocab_chunk_size=5, **keys)
    loss_f, grads_f = _loss_and_grads(full, coin_batch)
    loss_c, grads_c = _loss_and_grads(chunked, coin_batch)
    assert loss_f != 0
    torch.testing.assert_close(loss_c, loss_f, atol=1e-6, rtol=1e-5)
    for name in grads_f:
        torch.testing.assert_close(grads_c[name], grads_f[name], atol=1e-6, rtol=1e-5, msg=name)

    n = int(coin_batch.response_mask.sum())
    assert n > 10  # several chunks of 5
    saved, calls = _vocab_rows(full, coin_batch)
    assert max(saved) == n and n in calls  # the check can fail: unchunked keeps (n, V)
    saved, calls = _vocab_rows(chunked, coin_batch)
    assert saved == [] and max(calls) <= 5 and sum(calls) >= 2 * n  # forward, then recompute


def test_oisd_terms_send_no_gradient_to_the_teacher_side(tiny_llama_dir, coin_data, tmp_path, run_overrides):
    """Untied Llama, 4 blocks, S = {2}. The teacher (final layer's logits and attention)
    is detached, so an OISD term's gradient reaches only blocks 1..2 (and the embedding),
    plus the readout unless ``detach_readout``. Each trainer's gradients are compared
    with plain GRPO's on the same batch: a parameter the term cannot reach must have a
    bit-identical gradient; one it does reach must differ (so the test can fail)."""
    base = dict(oisd__layers=[2], oisd__lambda_logit=0.0, oisd__lambda_attn=0.0, rollout__prompts_per_step=4)

    def trainer(**keys) -> Trainer:
        return _trainer(tiny_llama_dir, tmp_path, run_overrides, coin_data, "oisd", **{**base, **keys})

    def grads(**keys):
        tr = trainer(**keys)
        if keys.get("oisd__lambda_attn"):
            assert tr.model.config._attn_implementation == "oisd_selective"
        return tr, _loss_and_grads(tr, batch)[1]

    batch, _ = trainer().rollout()
    batch.advantages = torch.tensor([1.0, -0.5, 0.8, -0.3, -0.7, 0.4, 0.2, 0.0])
    _, g_grpo = grads()

    after = [n for n in g_grpo if n.startswith(("model.layers.2.", "model.layers.3."))]
    readout = ["model.norm.weight", "lm_head.weight"]
    upto = [n for n in g_grpo if n.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens"))]
    assert len(after) == 18 and len(upto) == 19

    def same(g, names):
        return [n for n in names if torch.equal(g[n], g_grpo[n])]

    # L_think with a detached readout: nothing after block 2, not the norm, not lm_head.
    _, g = grads(oisd__lambda_logit=1.0, oisd__detach_readout=True)
    assert same(g, after + readout) == after + readout
    assert same(g, upto) == []
    # Without detach_readout the term does train the readout (but still no later block).
    _, g = grads(oisd__lambda_logit=1.0, oisd__detach_readout=False)
    assert same(g, after) == after and same(g, readout) == []

    # L_attn: the final layer's attention a^L is the detached teacher, so its q/k (and every
    # other weight after block 2, and the readout) get exactly GRPO's gradient. The selective
    # attention path is on in this trainer; its GRPO-only twin uses it too, so forwards agree.
    from trainer.forward import enable_selective_attention

    tr_attn, g = grads(oisd__lambda_attn=1.0)
    tr_ref, _ = grads()
    enable_selective_attention(tr_ref.model)
    g_grpo = _loss_and_grads(tr_ref, batch)[1]
    final_qk = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight"]
    assert same(g, final_qk) == final_qk
    assert same(g, after + readout) == after + readout
    # Layer 2's attention depends on its own q/k: those move. Its v/o do not shape a^2.
    assert same(g, ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"]) == []
    assert same(g, ["model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight"]) == [
        "model.layers.1.self_attn.v_proj.weight", "model.layers.1.self_attn.o_proj.weight"]


# ----------------------------------------------------------------------------- bad input


def test_resolve_layers_and_check_batch():
    assert resolve_layers([0.5], 4) == [2]
    assert resolve_layers([0.9, 1, 1], 4) == [1, 3]  # round(3.6) = 4 is the final layer: clamped to 3
    for bad in ([9], [4]):
        with pytest.raises(ConfigError, match=r"oisd.layers.*layer \d+ does not exist"):
            resolve_layers(bad, 4)

    def cfg(**keys):
        return load_config(None, [f"{k.replace('__', '.')}={v}" for k, v in keys.items()])

    check_batch(cfg(rollout__prompts_per_step=4, optim__mini_batches=2), num_processes=2)  # 1+1 groups
    check_batch(cfg(rollout__prompts_per_step=4, optim__mini_batches=4), num_processes=1)
    with pytest.raises(ConfigError, match="'optim.mini_batches': 2 groups of 8 per process do not divide into 4"):
        check_batch(cfg(rollout__prompts_per_step=4, optim__mini_batches=4), num_processes=2)
    with pytest.raises(ConfigError, match="'optim.mini_batches'"):
        check_batch(cfg(rollout__prompts_per_step=6, optim__mini_batches=4), num_processes=1)
    with pytest.raises(ConfigError, match="'rollout.prompts_per_step': 3 prompts do not divide over 2"):
        check_batch(cfg(rollout__prompts_per_step=3), num_processes=2)


@pytest.fixture()
def no_solution_data(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"{i}+1", "answer": str(i + 1)}) + "\n" for i in range(20)))
    return path


@pytest.mark.parametrize("case", ["layer", "no_solution", "mini_batches", "not_a_model", "probe_set"])
def test_bad_input_is_one_line_before_any_work(case, tiny_qwen3_dir, no_solution_data, tmp_path, capsys,
                                               run_overrides):
    run_dir = tmp_path / "run"
    model_dir = tiny_qwen3_dir
    config, keys, data = "oisd", {}, None
    if case == "layer":
        keys, expect = {"oisd__layers": [9]}, "config key 'oisd.layers': layer 9 does not exist"
    elif case == "no_solution":
        config, expect = "opsd", "method 'opsd' needs reference solutions"
        keys = {"data__path": str(no_solution_data)}
    elif case == "mini_batches":
        keys, expect = {"optim__mini_batches": 3}, "config key 'optim.mini_batches'"
    elif case == "not_a_model":
        model_dir = tmp_path / "empty"
        model_dir.mkdir()
        expect = "is not a model folder (no config.json)"
    else:
        keys, expect = {"probe__n_prompts": 50}, "config key 'probe.n_prompts': 50 probe prompts exceed"
    argv = ["train", "--config", config]
    for item in run_overrides(model_dir, run_dir, data=data, **SMALL_TASK, **keys):
        argv += ["--set", item]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expect in err and "\n" not in err, err
    assert not run_dir.exists()


def test_eval_refuses_a_truncated_checkpoint(tiny_qwen3_dir, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir)

    def save(folder):
        model.save_pretrained(folder)

    ckpt = write_checkpoint(tmp_path, 1, save, keep_last=None)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli_main(["eval", str(ckpt), "--n", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint") and "size mismatch for model.safetensors" in err and "\n" not in err


# ----------------------------------------------------------------------------- guards


def test_nonfinite_steps_are_skipped_then_stop_the_run(coin_model_dir, coin_data, tmp_path, run_overrides,
                                                        monkeypatch):
    """OPSD (always a gradient, even without reward). The objective returns NaN at step
    index 1, then from index 3 on: step 2 is skipped (weights unchanged), step 3 trains,
    steps 4 and 5 are skipped, and with max_bad_steps 2 the run stops after step 5."""
    calls = {}
    real = objectives.opsd_jsd

    def flaky(*args, **kwargs):
        out = real(*args, **kwargs)
        return out * float("nan") if calls["tr"].step in (1, 3, 4) else out

    real_step = Trainer.train_step

    def tracked(self):
        calls["tr"] = self
        return real_step(self)

    monkeypatch.setattr(objectives, "opsd_jsd", flaky)
    monkeypatch.setattr(Trainer, "train_step", tracked)
    run_dir = tmp_path / "run"
    cfg = load_config("opsd", run_overrides(coin_model_dir, run_dir, data=coin_data, steps=8,
                                             optim__max_bad_steps=2, keep_last=10, probe_every=0,
                                             eval_every=0))
    with pytest.raises(NonFiniteError, match="stopped at step 5 after 2 consecutive non-finite steps"):
        train(cfg)
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["nonfinite_skipped"] for r in rows] == [0.0, 1.0, 0.0, 1.0, 1.0]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "non-finite" in info["error"]

    def weights(step):
        return load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors")

    w1, w2, w3, w4 = (weights(s) for s in (1, 2, 3, 4))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step left every weight alone
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)  # a good step moves them
    assert all(torch.equal(w3[k], w4[k]) for k in w3)
    assert not (run_dir / "checkpoints" / "step-000005").exists()  # stopped before checkpointing


def test_dynamic_sampling_replaces_zero_variance_groups(coin_model_dir, coin_data, tmp_path, run_overrides):
    keys = dict(rollout__prompts_per_step=4, steps=3)
    plain = _trainer(coin_model_dir, tmp_path / "a", run_overrides, coin_data, "grpo", **keys)
    dyn = _trainer(coin_model_dir, tmp_path / "b", run_overrides, coin_data, "grpo",
                   rollout__dynamic_sampling=True, **keys)
    none_left = _trainer(coin_model_dir, tmp_path / "c", run_overrides, coin_data, "grpo",
                         rollout__dynamic_sampling=True, rollout__max_resample=0, **keys)
    checked = 0
    for step in range(3):
        for tr in (plain, dyn, none_left):
            tr.step = step
        sb0, s0 = plain.rollout()
        zero = int(round(s0["frac_reward_zero_std"] * 4))
        sb, s = dyn.rollout()
        assert s["dynamic_sampling/dropped_groups"] + s["dynamic_sampling/unfilled_groups"] == zero
        assert sb.input_ids.shape[0] == 8 and sb.advantages.shape == (8,)  # the batch keeps its size
        # Groups kept from the step's own prompts are unchanged, replacements are informative.
        assert s["frac_reward_zero_std"] == s["dynamic_sampling/unfilled_groups"] / 4
        if zero < 4:  # some group is informative: advantages are not all 0
            assert sb.advantages.abs().sum() > 0
        assert len(sb.teacher_prompts) == 8
        checked += zero > 0
        # No resampling rounds allowed: the batch as sampled, nothing dropped.
        sb_n, s_n = none_left.rollout()
        assert torch.equal(sb_n.input_ids, sb0.input_ids) and torch.equal(sb_n.advantages, sb0.advantages)
        assert s_n["dynamic_sampling/dropped_groups"] == 0 and s_n["dynamic_sampling/unfilled_groups"] == zero
    assert checked > 0  # some step had zero-variance groups to replace

    # Through the loop: the counts land in metrics.jsonl.
    cfg = load_config("grpo", run_overrides(coin_model_dir, tmp_path / "run", data=coin_data,
                                            rollout__dynamic_sampling=True, probe_every=0, eval_every=0, **keys))
    train(cfg)
    rows = _metrics(tmp_path / "run")
    assert all("dynamic_sampling/dropped_groups" in r for r in rows)
    assert sum(r["dynamic_sampling/dropped_groups"] for r in rows) > 0


def test_bf16_autocast_loss_is_close_to_float32(coin_model_dir, coin_data, coin_batch, tmp_path, run_overrides):
    """precision.mixed bf16 (the GPU setting; CPU autocast runs the same code path): every
    term of oisd+sdpg is finite and the loss is within bf16 rounding of the float32 one."""
    from accelerate.state import AcceleratorState

    keys = EVERY_TERM["oisd+sdpg"]
    fp32 = _trainer(coin_model_dir, tmp_path / "f", run_overrides, coin_data, "oisd+sdpg", **keys)
    loss_32, _ = _loss_and_grads(fp32, coin_batch)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one state per process
    try:
        bf16 = _trainer(coin_model_dir, tmp_path / "b", run_overrides, coin_data, "oisd+sdpg",
                        precision__mixed="bf16", **keys)
        assert bf16.setup.accelerator.mixed_precision == "bf16"
        rows = torch.arange(coin_batch.input_ids.shape[0])
        loss_16, logs, _ = bf16.micro_loss(coin_batch, rows, None, bf16.normalisers(coin_batch, rows))
        loss_16.backward()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert {"loss/policy", "loss/think", "loss/attn", "loss/opd", "loss/ref_kl"} <= logs.keys()
    assert all(torch.isfinite(v) for v in logs.values())
    assert all(torch.isfinite(p.grad).all() for p in bf16.model.parameters() if p.grad is not None)
    loss_16 = float(loss_16.detach())
    assert loss_16 != float(loss_32)  # autocast did run in bf16: the check has teeth
    assert abs(loss_16 - float(loss_32)) <= 0.05 * abs(float(loss_32)) + 1e-3
