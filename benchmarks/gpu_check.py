"""One prepared GPU check: both backends' step time and peak memory at Qwen3-0.6B's body,
the analyzer against its floor, and the rank sync of a 2-process launch, in one run.

A GPU session is short and precious, so everything it should measure is in this one
script, rehearsed on CPU by ``--smoke`` (the same code paths at a tiny shape), and every
measurement is guarded: one that fails records its one-line error in the JSON and the
script goes on. The JSON is rewritten after every stage, so a killed run keeps what it
measured.

Stages, in order (``--budget-s``: no new stage starts once it is spent; a stage still
running at ``--deadline-s`` is stopped):

1. ``builtin/<method>``: the built-in backend (:class:`trainer.loop.Trainer`), ``--steps``
   whole training steps (rollout with the built-in sampler, then the update) for methods
   grpo, oisd and sdpg (configs ``grpo``, ``oisd``, ``sdpg-ufkl``).
2. ``trl/<method>``: the TRL backend (:class:`trainer.trl_backend.SelfDistillGRPOTrainer`)
   with ``transformers`` generation, the same steps.
3. ``analyzer``: one checkpoint of the same shape, 16 probe sequences of 64 tokens
   (``benchmarks/bench_probe.py``'s records): the analyzer's metric pass
   (``bench_probe.run_ours``: the cached TransformerBridge forward, every layer's lens
   and attention metrics), the whole per-checkpoint analysis apart from booting and
   greedy decoding (``probe_checkpoint`` with ``greedy=False``: metrics and drill-down
   tables), and the floor: one plain HF forward plus one lens read-out per layer
   (final norm, unembedding, log-softmax at the scored positions), the forward with eager
   attention so that it yields the attention patterns; bench_probe's plain (SDPA) forward
   beside it.
4. ``probe``: ``oisd probe`` (``probe_run``) on a run of one checkpoint of the same shape
   (16 prompts of the embedded task, the default greedy length), boot and greedy decode
   included, against its floor (``bench_probe.floor_pass``: the greedy decode, one forward
   per split yielding hidden states and attention patterns, one read-out per layer).
5. ``probe_processes``: with 2 or more GPUs, ``oisd probe`` of a run of 4 checkpoints by one
   process and by ``accelerate launch --num_processes 2``, each a fresh command: the wall
   times and the two analyses compared value for value.
6. ``rank_sync``: with 2 or more GPUs, ``accelerate launch --num_processes 2`` of
   ``oisd train --backend trl`` for 2 steps; run.json's ``distributed.weight_spread``
   must be 0.0. Skipped (and said so) on one GPU.
7. ``trl_vllm/<method>``: the TRL backend generating with vLLM colocated
   (``trl.use_vllm=true``, ``trl.vllm_mode=colocate``), when vLLM is installed; each in
   its own process (a vLLM engine does not give its memory back).

Shape: Qwen3-0.6B's body (hidden 1024, 28 layers, 16 heads, 8 KV heads, head_dim 128,
intermediate 3072, vocabulary 151,936, tied embeddings), random init, saved in bf16 by
this script with a character tokenizer extended to the whole vocabulary (every id
decodes to one character, so generation never meets an id the tokenizer lacks). Data:
the embedded arithmetic task. Batch: 8 prompts x 4 responses of 128 new tokens; a random
model almost never samples EOS, so every step generates the full 128. Every term is on
from step 0 (``sdpg.t_warm=0``; no gradient-share measurement, no warm-up of the rate).

Step time: the median over steps 2..N (step 1 is the warm-up), CUDA synchronised
around each step; with one step (``--smoke``) that step. Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` over the stage (its peak statistics reset at the
start; ``baseline_mib`` is what was allocated then, 0 when the previous stage freed
everything); on CPU the process's peak resident set over the stage (``VmHWM``, reset
through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is missing), which counts the
interpreter and libraries too.

Usage::

    python benchmarks/gpu_check.py --out RESULT_JSON  # prints the markdown tables: copy them into benchmarks/README.md
    python benchmarks/gpu_check.py --smoke          # the same code paths on CPU, about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_probe's records, forward and metric pass

import torch

from workbench.analysis.memory import status_kib  # noqa: E402

METHODS = ("grpo", "oisd", "sdpg")  # each by its bundled config
BACKENDS = ("builtin", "trl", "trl_vllm")
# Qwen3-0.6B's body (its config.json), and the smoke shape.
QWEN3_06B = dict(vocab_size=151_936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=4096)
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=512)
PLANS = {  # prompts x group responses of new_tokens; steps per run; repeats of the analyzer timings
    "full": dict(prompts=8, group=4, new_tokens=128, steps=3, repeats=3),
    "smoke": dict(prompts=2, group=2, new_tokens=8, steps=1, repeats=1),
}
RANK_SYNC_CONFIG, RANK_SYNC_STEPS = "oisd", 2


def log(start: float, message: str) -> None:
    print(f"[gpu_check +{time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr, flush=True)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


# ------------------------------------------------------------------------------- memory


class PeakMemory:
    """The peak memory of the code between ``__init__`` and :meth:`result` (see the module
    docstring for what is counted on CUDA and on CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.kind = "torch.cuda.max_memory_allocated"
            return
        rss = status_kib("VmRSS")
        self.baseline = (rss or 0) * 1024
        try:  # reset VmHWM to the current resident set
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "peak RSS (VmHWM)"
        except OSError:
            self.kind = "peak RSS (ru_maxrss, since process start)"

    def result(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            hwm = status_kib("VmHWM") if "VmHWM" in self.kind else None
            peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_mib": round(peak / 2**20, 1), "baseline_mib": round(self.baseline / 2**20, 1),
                "peak_kind": self.kind}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------- the model folder


def full_vocab_tokenizer(vocab_size: int):
    """The character tokenizer extended by one code point per id up to ``vocab_size``
    (surrogates skipped), so that every id a random model samples decodes."""
    from trainer.tokenizer import ALPHABET, SPECIAL_TOKENS, build_char_tokenizer

    need = vocab_size - len(SPECIAL_TOKENS) - len(ALPHABET)
    extra, code = [], 0x100
    while len(extra) < need:
        if not 0xD800 <= code <= 0xDFFF:
            extra.append(chr(code))
        code += 1
    tok = build_char_tokenizer("".join(extra))
    assert len(tok) == vocab_size, (len(tok), vocab_size)
    return tok


def build_model_folder(folder: Path, smoke: bool, dtype: str, device: str) -> dict:
    """A random-initialised Qwen3 of the check's shape with its tokenizer, saved to ``folder``."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from trainer.tokenizer import build_char_tokenizer

    if smoke:
        tok = build_char_tokenizer()
        shape = dict(SMOKE_SHAPE, vocab_size=len(tok))
    else:
        shape = dict(QWEN3_06B)
        tok = full_vocab_tokenizer(shape["vocab_size"])
    config = Qwen3Config(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU is much faster than on CPU
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    free_memory(device)
    return {**shape, "parameters": n_params, "dtype": dtype}


# ------------------------------------------------------------------------------- stages


def overrides(ctx: dict, run_dir: Path, extra: list[str] = ()) -> list[str]:
    plan = ctx["plan"]
    return [f"model.path={ctx['model']}", f"model.dtype={ctx['dtype']}", f"run_dir={run_dir}",
            f"steps={plan['steps']}", f"checkpoint_every={plan['steps']}", "probe_every=0", "eval_every=0",
            f"rollout.prompts_per_step={plan['prompts']}", f"rollout.group_size={plan['group']}",
            f"rollout.max_new_tokens={plan['new_tokens']}", "data.arithmetic.n_train=64",
            "data.arithmetic.n_test=16", "probe.n_prompts=2", "logging.progress=false",
            "logging.grad_share_every=0", "optim.warmup_steps=0", "sdpg.t_warm=0", *extra]


def step_summary(times: list[float]) -> dict:
    timed = times[1:] if len(times) > 1 else times  # step 1 is the warm-up
    return {"step_s": statistics.median(timed), "step_times_s": [round(t, 4) for t in times],
            "steps_timed": len(timed), "first_step_s": times[0]}


def stage_builtin(ctx: dict, method: str) -> dict:
    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.setup import prepare

    device = ctx["device"]
    mem = PeakMemory(device)
    cfg = load_config(method, overrides(ctx, Path(ctx["work"]) / f"builtin-{method}"))
    tr = Trainer(cfg, prepare(cfg))
    rollout_times: list[float] = []
    rollout = tr.rollout

    def timed_rollout():  # train_step calls self.rollout(): time it inside the step
        sync(device)
        start = time.perf_counter()
        out = rollout()
        sync(device)
        rollout_times.append(time.perf_counter() - start)
        return out

    tr.rollout = timed_rollout
    times = []
    for _ in range(ctx["plan"]["steps"]):
        sync(device)
        start = time.perf_counter()
        tr.train_step()
        tr.step += 1
        sync(device)
        times.append(time.perf_counter() - start)
    out = step_summary(times)
    out["rollout_s"] = statistics.median(rollout_times[1:] if len(rollout_times) > 1 else rollout_times)
    out["generation"] = "built-in sampler"
    out.update(mem.result())
    return out


def stage_trl(ctx: dict, method: str, vllm: bool) -> dict:
    if vllm:
        import vllm  # fail here, in one line, when it does not import
    from transformers import PrinterCallback, TrainerCallback

    from trainer.config import load_config
    from trainer.setup import prepare
    from trainer.trl_backend import SelfDistillGRPOTrainer, build_grpo_config, task_data

    device = ctx["device"]
    mem = PeakMemory(device)
    name = f"trl{'-vllm' if vllm else ''}-{method}"
    extra = ["backend=trl", f"trl.use_vllm={str(vllm).lower()}", "trl.vllm_mode=colocate"]
    cfg = load_config(method, overrides(ctx, Path(ctx["work"]) / name, extra))
    setup = prepare(cfg)
    setup.model.config.use_cache = True  # as train_trl: TRL's generate decodes with a KV cache
    dataset, rewards = task_data(cfg, setup.task)

    args = build_grpo_config(cfg, Path(ctx["work"]) / name / "trl", setup.accelerator.num_processes)
    args.save_strategy = "no"
    trainer = SelfDistillGRPOTrainer(model=setup.model, reward_funcs=rewards, args=args, train_dataset=dataset,
                                     processing_class=setup.tokenizer, workbench_config=cfg,
                                     reference=setup.reference, oisd_layers=setup.oisd_layers)
    trainer.remove_callback(PrinterCallback)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    if len(times) != ctx["plan"]["steps"]:
        raise RuntimeError(f"TRL ran {len(times)} steps, expected {ctx['plan']['steps']}")
    out = step_summary(times)
    out["generation"] = "vllm colocate" if vllm else "transformers generate"
    out.update(mem.result())
    return out


@torch.no_grad()
def run_floor(hf, batch: dict) -> torch.Tensor:
    """The floor of one checkpoint's metric pass: one forward that yields the hidden states and
    the attention patterns (``hf`` loaded with eager attention), then one lens read-out per
    layer (final norm, unembedding, log-softmax) at the scored positions."""
    n_layers = hf.config.num_hidden_layers
    out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
             position_ids=batch["position_ids"], output_hidden_states=True, output_attentions=True)
    scored = batch["scored"]
    total = out.logits[scored].float().log_softmax(-1).sum()  # layer L: the model's own logits
    norm, head = hf.model.norm, hf.get_output_embeddings()
    for h in out.hidden_states[1:n_layers]:  # blocks 0..L-2's residual outputs: layers 1..L-1
        total = total + head(norm(h[scored])).float().log_softmax(-1).sum()
    return total


def stage_analyzer(ctx: dict) -> dict:
    import bench_probe
    from transformers import AutoModelForCausalLM

    from workbench.analysis.analyzer import _boot, probe_checkpoint
    from workbench.analysis.probe_runner import probe_batch

    device, repeats = ctx["device"], ctx["plan"]["repeats"]
    dtype = getattr(torch, ctx["dtype"])
    folder = Path(ctx["model"])
    start = time.perf_counter()
    bridge, tokenizer = _boot(folder, device, dtype)  # as `oisd probe` boots a checkpoint
    boot_s = time.perf_counter() - start
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager").to(device).eval()
    records = bench_probe.make_records(hf.config.vocab_size)
    batch = {k: v.to(device) for k, v in probe_batch(records, pad_id=0).items()}

    variants = {
        "analyzer": lambda: bench_probe.run_ours(bridge, batch),
        "checkpoint": lambda: probe_checkpoint(bridge, tokenizer, records, run="gpu-check", step=0, greedy=False),
        "floor": lambda: run_floor(eager, batch),
        "forward": lambda: bench_probe.run_forward(hf, batch),
    }
    peaks = {}
    for name, fn in variants.items():  # warm-up, and each one's peak memory
        free_memory(device)
        mem = PeakMemory(device)
        fn()
        peaks[name] = mem.result()
    times: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    for r in range(repeats):  # interleaved, order rotated, as bench_probe times them
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    scored = int(batch["scored"].sum())
    return {
        "analyzer_s": med["analyzer"], "checkpoint_s": med["checkpoint"], "floor_s": med["floor"],
        "forward_s": med["forward"], "analyzer_over_floor": med["analyzer"] / med["floor"],
        "checkpoint_over_floor": med["checkpoint"] / med["floor"], "boot_s": boot_s, "repeats": repeats,
        "sequences": len(records), "tokens": int(batch["input_ids"].numel()), "scored_positions": scored,
        "peak_mib": peaks["analyzer"]["peak_mib"], "baseline_mib": peaks["analyzer"]["baseline_mib"],
        "peak_kind": peaks["analyzer"]["peak_kind"],
        "peaks_mib": {k: v["peak_mib"] for k, v in peaks.items()},
    }


PROBE_PROMPTS = 16  # the probe set of the `probe` stages: the embedded task's first held-out questions
PROBE_CHECKPOINTS = 4  # checkpoints of the run the 1- and 2-process probes share out


def probe_run_folder(ctx: dict, name: str, checkpoints: int) -> Path:
    """A run folder whose ``checkpoints`` checkpoints are copies of the check's model, with the
    probe set of the embedded task's first held-out questions (the model's tokenizer)."""
    import shutil

    from transformers import AutoTokenizer

    from trainer.tasks import ArithmeticTask
    from workbench.analysis.probe_runner import make_probe_set
    from workbench.storage.checkpoints import write_checkpoint
    from workbench.storage.runwriter import RunWriter

    run_dir = Path(ctx["work"]) / name
    tokenizer = AutoTokenizer.from_pretrained(ctx["model"])
    writer = RunWriter(run_dir, {"method": "grpo", "seed": 0}, resume=False)
    writer.write_probe_set(make_probe_set(ArithmeticTask().test_examples(), tokenizer, PROBE_PROMPTS))
    for step in range(1, checkpoints + 1):
        write_checkpoint(run_dir, step, lambda f: shutil.copytree(ctx["model"], f, dirs_exist_ok=True), keep_last=None)
    return run_dir


def stage_probe(ctx: dict) -> dict:
    """``oisd probe`` (``probe_run``, what the command runs) on one checkpoint, boot and greedy
    decode included, against the floor of the same splits (``bench_probe.floor_pass``: greedy
    decode, one forward with hidden states and attention patterns, one lens read-out per layer)."""
    import bench_probe
    from transformers import AutoModelForCausalLM

    from workbench.analysis.analyzer import probe_run
    from workbench.storage.runstore import Run
    from workbench.storage.schema import DEFAULT_PROBE_MAX_NEW_TOKENS

    device, dtype = ctx["device"], ctx["dtype"]
    run_dir = probe_run_folder(ctx, "probe-1", 1)
    run = Run.open(run_dir)
    sync(device)
    start = time.perf_counter()
    report = probe_run(run_dir, device=device, dtype=dtype, progress=False)
    sync(device)
    probe_s = time.perf_counter() - start
    if report.analysed != [1]:
        raise RuntimeError(f"the probe analysed {report.analysed}, skipped {report.skipped}")
    provenance = run.analysis_provenance("metrics")[1]
    stages = provenance["stage_seconds"]
    boot_s = stages.get("boot", 0.0)
    eager = AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=getattr(torch, dtype),
                                                 attn_implementation="eager").to(device).eval()
    free_memory(device)
    mem = PeakMemory(device)
    floor_stages = bench_probe.floor_pass(eager, run.probe_set(), max_new_tokens=DEFAULT_PROBE_MAX_NEW_TOKENS,
                                          device=device)
    floor_s = sum(floor_stages.values())
    return {"probe_s": probe_s, "boot_s": boot_s, "probe_without_boot_s": probe_s - boot_s,
            "floor_s": floor_s, "probe_over_floor": (probe_s - boot_s) / floor_s,
            "stage_seconds": stages, "floor_stages": floor_stages, "prompts": PROBE_PROMPTS,
            "max_new_tokens": DEFAULT_PROBE_MAX_NEW_TOKENS, "floor_peak_mib": mem.result()["peak_mib"]}


def stage_probe_processes(ctx: dict, timeout: float) -> dict:
    """``oisd probe`` of a run of ``PROBE_CHECKPOINTS`` checkpoints by one process and by
    ``accelerate launch --num_processes 2`` (each process on its own device), both as fresh
    commands: the wall times, and the two analyses compared value for value."""
    from workbench.storage.runstore import Run

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if ctx["device"] == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    out, tables = {"checkpoints": PROBE_CHECKPOINTS}, {}
    deadline = time.perf_counter() + timeout
    for processes in (1, 2):
        run_dir = probe_run_folder(ctx, f"probe-{processes}proc", PROBE_CHECKPOINTS)
        launcher = [sys.executable, "-m"] if processes == 1 else [*accelerate_launch(processes), "-m"]
        command = [*launcher, "workbench.cli", "probe", str(run_dir), "--dtype", ctx["dtype"]]
        start = time.perf_counter()
        result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=max(deadline - start, 30.0))
        if result.returncode != 0:
            raise RuntimeError(f"{processes}-process probe exited {result.returncode}: {last_line(result.stderr)}")
        out[f"seconds_{processes}proc"] = time.perf_counter() - start
        run = Run.open(run_dir)
        made_by = {step: p.get("process") for step, p in run.analysis_provenance("metrics").items()}
        out[f"made_by_{processes}proc"] = made_by
        tables[processes] = run.analysis("metrics").sort_values(["step", "split", "metric", "layer", "head",
                                                                   "ref_layer"]).reset_index(drop=True)
    a, b = (tables[n].drop(columns="run") for n in (1, 2))  # the run folders' names differ
    if len(a) != len(b) or not a.drop(columns="value").equals(b.drop(columns="value")):
        raise AssertionError("the 1- and 2-process probes wrote different metric rows")
    out["max_abs_diff"] = float((a["value"] - b["value"]).abs().max()) if len(a) else 0.0
    out["speedup"] = out["seconds_1proc"] / out["seconds_2proc"]
    if sorted(set(out["made_by_2proc"].values())) != [0, 1]:
        raise AssertionError(f"the 2-process probe did not share the checkpoints: {out['made_by_2proc']}")
    return out


def accelerate_launch(processes: int) -> list[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("accelerate")
    launcher = [str(exe)] if exe.is_file() else [sys.executable, "-m", "accelerate.commands.launch"]
    if exe.is_file():
        launcher.append("launch")
    return [*launcher, "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def stage_rank_sync(ctx: dict, timeout: float) -> dict:
    run_dir = Path(ctx["work"]) / "rank-sync"
    plan = dict(ctx["plan"], steps=RANK_SYNC_STEPS)
    keys = overrides(dict(ctx, plan=plan), run_dir)
    command = [*accelerate_launch(2), "-m", "workbench.cli", "train", "--backend", "trl",
               "--config", RANK_SYNC_CONFIG, *[x for k in keys for x in ("--set", k)]]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"accelerate launch exited {result.returncode}: {last_line(result.stderr)}")
    info = json.loads((run_dir / "run.json").read_text())
    dist = info.get("distributed", {})
    spread = dist.get("weight_spread")
    out = {"config": RANK_SYNC_CONFIG, "backend": "trl", "steps": RANK_SYNC_STEPS, "processes": dist.get("processes"),
           "distributed_type": dist.get("type"), "weight_spread": spread, "seconds": seconds,
           "run_status": info.get("status")}
    if spread != 0.0:
        raise AssertionError(f"distributed.weight_spread is {spread!r}, must be 0.0 ({json.dumps(out)})")
    return out


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(no output)"])[-1][:500]


# ------------------------------------------------------------------------------- the run


def run_stage(name: str, ctx: dict) -> dict:
    """Run one stage in this process (the ``--child`` entry point calls this too)."""
    if name == "analyzer":
        return stage_analyzer(ctx)
    if name == "probe":
        return stage_probe(ctx)
    backend, method = name.split("/")
    if backend == "builtin":
        return stage_builtin(ctx, method)
    return stage_trl(ctx, method, vllm=backend == "trl_vllm")


def run_isolated(name: str, ctx: dict, timeout: float) -> dict:
    """Run one stage in a fresh process (its memory, and a vLLM engine's, goes with it)."""
    with tempfile.TemporaryDirectory(dir=ctx["work"]) as tmp:
        ctx_file, out_file = Path(tmp) / "ctx.json", Path(tmp) / "out.json"
        ctx_file.write_text(json.dumps(ctx))
        result = subprocess.run([sys.executable, __file__, "--child", name, str(ctx_file), str(out_file)],
                                check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0 or not out_file.is_file():
            raise RuntimeError(f"stage process exited {result.returncode}: {last_line(result.stderr)}")
        return json.loads(out_file.read_text())


class StageTimeout(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise StageTimeout in this (main) thread after ``seconds`` (checked between Python
    bytecodes: a long CUDA or C call finishes first)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise StageTimeout(f"stopped at the deadline ({seconds:.0f} s left when the stage began)")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "trl", "accelerate", "transformer-lens", "vllm"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def plan_stages(smoke: bool, rank_sync_cpu: bool) -> list[tuple[str, str | None]]:
    """(stage, reason to skip it or None), in the order they run."""
    stages: list[tuple[str, str | None]] = [(f"builtin/{m}", None) for m in METHODS]
    stages += [(f"trl/{m}", None) for m in METHODS]
    stages += [("analyzer", None), ("probe", None)]
    gpus = torch.cuda.device_count() if not smoke else 0
    for name in ("rank_sync", "probe_processes"):
        if rank_sync_cpu and smoke:
            stages.append((name, None))
        else:
            stages.append((name, None if gpus >= 2 else f"needs >= 2 GPUs (found {gpus})"))
    if smoke:
        vllm_reason = "vLLM needs a GPU (smoke runs on CPU)"
    elif importlib.util.find_spec("vllm") is None:
        vllm_reason = "vllm is not installed (import vllm fails)"
    else:
        vllm_reason = None
    stages += [(f"trl_vllm/{m}", vllm_reason) for m in METHODS]
    return stages


def main(argv: list[str] | None = None) -> dict:
    from trainer.config import resolve_config_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results (default gpu_check.json)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown tables here")
    parser.add_argument("--smoke", action="store_true", help="the same code paths on CPU at a tiny shape, 1 step each")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new stage after this many seconds")
    parser.add_argument("--deadline-s", type=float, default=470.0, help="stop a stage still running at this time")
    parser.add_argument("--steps", type=int, default=None, help="steps per backend and method (default 3; smoke 1)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                        help="model dtype (default bfloat16; smoke float32)")
    parser.add_argument("--only", nargs="+", default=None, metavar="STAGE",
                        help="run only these stages (builtin/grpo, trl/oisd, analyzer, rank_sync, trl_vllm/sdpg, ...)")
    parser.add_argument("--isolate", action="store_true", help="run every stage in its own process")
    parser.add_argument("--rank-sync-cpu", action="store_true",
                        help="with --smoke: also run the 2-process checks (rank sync, probe) on CPU (slow)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "CTX", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()

    if args.child:  # one stage in a fresh process (run_isolated)
        stage, ctx_file, out_file = args.child
        result = run_stage(stage, json.loads(Path(ctx_file).read_text()))
        Path(out_file).write_text(json.dumps(result))
        return result

    start = time.perf_counter()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    plan = dict(PLANS["smoke" if args.smoke else "full"])
    if args.steps:
        plan["steps"] = args.steps
    dtype = args.dtype or ("float32" if args.smoke else "bfloat16")
    results: dict = {
        "smoke": args.smoke, "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "versions": versions(),
        "budget_s": args.budget_s, "deadline_s": args.deadline_s,
        "batch": {"prompts": plan["prompts"], "group_size": plan["group"], "max_new_tokens": plan["new_tokens"],
                  "steps": plan["steps"], "data": "embedded arithmetic task"},
        "methods": {m: resolve_config_path(m).stem for m in METHODS},
        "model": None,
        "steps": {b: {} for b in BACKENDS}, "analyzer": None, "probe": None, "rank_sync": None,
        "probe_processes": None, "stages": [],
        "complete": False,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log(start, f"device {device}{' (' + results['gpu'] + ')' if results['gpu'] else ''}, "
               f"{'smoke' if args.smoke else 'full'} run, results -> {args.out}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        try:
            results["model"] = build_model_folder(work / "model", args.smoke, dtype, device)
        except Exception as exc:  # noqa: BLE001 - without the model nothing else can run
            results["model"] = {"status": "failed", "error": first_line(exc)}
            write_json(args.out, results)
            log(start, f"model folder FAILED: {first_line(exc)}")
            emit(results, args.markdown)
            return results
        log(start, f"model folder: {results['model']['parameters']:,} parameters, {dtype}")
        ctx = {"model": str(work / "model"), "work": str(work), "device": device, "dtype": dtype, "plan": plan}
        for name, skip in plan_stages(args.smoke, args.rank_sync_cpu):
            if args.only and name not in args.only:
                continue
            elapsed = time.perf_counter() - start
            if skip is None and elapsed > args.budget_s:
                skip = f"budget of {args.budget_s:.0f} s spent ({elapsed:.0f} s elapsed)"
            if skip is not None:
                record(results, name, {"status": "skipped", "reason": skip})
                results["stages"].append({"stage": name, "status": "skipped", "seconds": 0.0, "reason": skip})
                log(start, f"{name}: skipped ({skip})")
                write_json(args.out, results)
                continue
            log(start, f"{name} ...")
            t0 = time.perf_counter()
            left = args.deadline_s - elapsed
            try:
                if name == "rank_sync":
                    out = stage_rank_sync(ctx, timeout=max(left, 30.0))
                elif name == "probe_processes":
                    out = stage_probe_processes(ctx, timeout=max(left, 30.0))
                elif args.isolate or name.startswith("trl_vllm/"):
                    out = run_isolated(name, ctx, timeout=max(left, 30.0))
                else:
                    with alarm(max(left, 30.0)):
                        out = run_stage(name, ctx)
                out = {"status": "ok", **out}
            except Exception as exc:  # noqa: BLE001 - one failed measurement must not end the session
                message = (f"TimeoutExpired: stopped at the deadline after {exc.timeout:.0f} s"
                           if isinstance(exc, subprocess.TimeoutExpired) else first_line(exc))
                out = {"status": "failed", "error": message}
            seconds = time.perf_counter() - t0
            free_memory(device)
            record(results, name, out)
            results["stages"].append({"stage": name, "status": out["status"], "seconds": round(seconds, 2),
                                      **({"error": out["error"]} if "error" in out else {})})
            results["elapsed_s"] = round(time.perf_counter() - start, 1)
            write_json(args.out, results)
            detail = (f"step {out['step_s']:.3f} s, peak {out['peak_mib']:.0f} MiB" if "step_s" in out else
                      f"analyzer {out['analyzer_s']:.3f} s vs floor {out['floor_s']:.3f} s" if "analyzer_s" in out else
                      f"probe {out['probe_s']:.3f} s (boot {out['boot_s']:.1f}) vs floor {out['floor_s']:.3f} s"
                      if "probe_s" in out else
                      f"1 process {out['seconds_1proc']:.1f} s, 2 processes {out['seconds_2proc']:.1f} s"
                      if "speedup" in out else
                      f"weight_spread {out.get('weight_spread')}" if name == "rank_sync" else out.get("error", ""))
            log(start, f"{name}: {out['status']} in {seconds:.1f} s ({detail})")
    results["complete"] = True
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    write_json(args.out, results)
    counts = {k: sum(s["status"] == k for s in results["stages"]) for k in ("ok", "failed", "skipped")}
    log(start, f"done in {results['elapsed_s']:.0f} s: {counts['ok']} ok, {counts['failed']} failed, "
               f"{counts['skipped']} skipped -> {args.out}")
    emit(results, args.markdown)
    return results


def record(results: dict, name: str, out: dict) -> None:
    if "/" in name:
        backend, method = name.split("/")
        results["steps"][backend][method] = out
    else:
        results[name] = out


def quiet_libraries() -> None:
    import logging
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# ------------------------------------------------------------------------------- markdown


def markdown(results: dict) -> str:
    b = results["batch"]
    where = results["gpu"] or results["device"]
    model = results.get("model") or {}
    lines = [f"GPU check on {where} ({'smoke, ' if results['smoke'] else ''}{results['started']}): "
             f"{model.get('parameters', 0):,}-parameter Qwen3, {model.get('dtype')}, "
             f"{b['prompts']} prompts x {b['group_size']} responses x {b['max_new_tokens']} new tokens, "
             + (f"{b['steps']} steps, median of steps 2..{b['steps']}." if b["steps"] > 1
                else "1 step per run (its time includes the warm-up)."), "",
             "| backend | generation | method | step s | steps timed | peak MiB | status |", "|---|---|---|---|---|---|---|"]
    gen = {"builtin": "built-in sampler", "trl": "transformers generate", "trl_vllm": "vLLM colocate"}
    for backend in BACKENDS:
        for method in METHODS:
            r = results["steps"][backend].get(method)
            if r is None:
                continue
            name = "built-in" if backend == "builtin" else "TRL"
            if r["status"] == "ok":
                lines.append(f"| {name} | {gen[backend]} | {method} | {r['step_s']:.3f} | {r['steps_timed']} | "
                             f"{r['peak_mib']:,.0f} | ok |")
            else:
                lines.append(f"| {name} | {gen[backend]} | {method} | - | - | - | {r['status']}: "
                             f"{_cell(r.get('error') or r.get('reason'))} |")
    a = results.get("analyzer")
    lines += ["", "| analyzer (one checkpoint) | s | x floor |", "|---|---|---|"]
    if a and a["status"] == "ok":
        lines += [f"| metric pass (`run_ours`) | {a['analyzer_s']:.4f} | {a['analyzer_over_floor']:.2f} |",
                  (f"| whole checkpoint, no greedy (`probe_checkpoint`) | {a['checkpoint_s']:.4f} | "
                   f"{a['checkpoint_over_floor']:.2f} |"),
                  f"| floor: forward with attention patterns + one lens read-out per layer | {a['floor_s']:.4f} | 1.00 |",
                  f"| plain forward | {a['forward_s']:.4f} | {a['forward_s'] / a['floor_s']:.2f} |",
                  "", (f"Analyzer: {a['sequences']} sequences, {a['scored_positions']} scored positions; "
                       f"metric pass peak {a['peak_mib']:,.0f} MiB ({a['peak_kind']}); boot {a['boot_s']:.1f} s.")]
    elif a:
        lines.append(f"| {a['status']}: {_cell(a.get('error') or a.get('reason'))} | - | - |")
    pr = results.get("probe")
    if pr and pr["status"] == "ok":
        probe_row = (f"| `oisd probe`, one checkpoint, boot excluded ({pr['prompts']} prompts, greedy "
                     f"{pr['max_new_tokens']} tokens) | {pr['probe_without_boot_s']:.4f} | {pr['probe_over_floor']:.2f} |")
        floor_row = ("| its floor: greedy decode + forward with attention patterns + one read-out per layer | "
                     f"{pr['floor_s']:.4f} | 1.00 |")
        lines += ["", "| `oisd probe` (one checkpoint) | s | x floor |", "|---|---|---|", probe_row, floor_row, "",
                  f"`oisd probe` boot {pr['boot_s']:.1f} s; stages {json.dumps(pr['stage_seconds'])}."]
    elif pr:
        lines += ["", f"`oisd probe`: {pr['status']}: {_cell(pr.get('error') or pr.get('reason'))}"]
    pp = results.get("probe_processes")
    if pp and pp["status"] == "ok":
        text = (f"Probe over processes ({pp['checkpoints']} checkpoints): 1 process {pp['seconds_1proc']:.1f} s, "
                f"2 processes {pp['seconds_2proc']:.1f} s ({pp['speedup']:.2f}x); "
                f"the analyses differ by at most {pp['max_abs_diff']:.3g}.")
        lines += ["", text]
    elif pp:
        lines += ["", f"Probe over processes: {pp['status']}: {_cell(pp.get('error') or pp.get('reason'))}"]
    rs = results.get("rank_sync")
    if rs:
        if rs["status"] == "ok":
            text = (f"ok: {rs['processes']} processes ({rs['distributed_type']}), TRL backend, {rs['config']}, "
                    f"{rs['steps']} steps, weight_spread {rs['weight_spread']}")
        else:
            text = f"{rs['status']}: {rs.get('error') or rs.get('reason')}"
        lines += ["", f"Rank sync: {text}"]
    return "\n".join(lines) + "\n"


def _cell(text) -> str:
    return str(text).replace("|", "/")[:200]


def emit(results: dict, path: Path | None) -> None:
    text = markdown(results)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


if __name__ == "__main__":
    main()
