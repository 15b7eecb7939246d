"""Step cost of each method against GRPO on the same rollouts: time and peak memory.

Every method's update runs :meth:`trainer.loop.Trainer.update`, the code training runs
after its rollout: the loss with its teacher and reference forwards, backward,
gradient clipping and AdamW. Each size gets one rollout batch, built once and given to
every method: the task's prompts, random response tokens with no EOS (so every response
is full length), and fixed advantages of both signs (so every gated or weighted term is
active). Every term is on at step 0: SDPG with ``t_warm 0`` (beta > 0, so its teacher
forward runs), RLSD at lambda 0.5, OISD on its bundled layer.

Sizes:

- ``tiny``: the embedded tiny preset (Qwen3, 4 blocks, the 101-character vocabulary),
  8 prompts x 8 responses of 40 tokens (the bundled configs train 32 prompts x 8 since 2026-12-06;
  the figures in benchmarks/README.md are per step of 8 x 8).
- ``real``: a random Qwen3 with the real vocabulary (151,936 tokens, tied embeddings),
  4 blocks of width 256, one group of 2 responses of 512 tokens: the loss path at
  real vocabulary size, where the ``(tokens, V)`` logits dominate memory. The readout
  is most of this model's compute, so every extra full-vocabulary read-out (OISD's
  lens, a teacher's, a reference's) weighs far more in its time than in a real model's.
- ``4b-shape``: the time split of a real model: Qwen3-4B's ratio of block FLOPs to
  readout FLOPs per token (about 9:1), at width 256 (8 blocks, vocabulary 2,848),
  2 groups of 4 responses of 256 tokens.

Both run with the default chunking of the full-vocabulary terms
(``optim.vocab_chunk_size`` auto: 128 MiB chunks) and, marked ``unchunked``, with
``vocab_chunk_size 0`` (the whole ``(n, V)`` logits kept for backward).

Time: variants interleaved (order rotated every repeat) so that background load hits
them alike; median of ``--repeats`` after one warm-up update each; ``ratio`` is the
median over GRPO's. ``step ratio`` adds the rollout of the same batch (timed once per
size with the trainer's own sampler: the rollout is the same for every method, since
all sample from the final layer), so it is the ratio of whole training steps.

Memory: each variant in a fresh subprocess. ``resident`` is what the method holds before
its update (policy, frozen reference or teacher copies, AdamW state after a warm-up
update) above the process after imports; ``update peak`` is the high-water mark during
one update above the resident set (``VmHWM``, reset through ``/proc/self/clear_refs``;
glibc's mmap threshold is fixed so freed tensors leave the resident set). ``total`` is
their sum, and ``mem ratio`` is that over GRPO's. On CUDA the same from
``torch.cuda.memory_allocated`` / ``max_memory_allocated``.

``--smoke`` runs the same code on the tiny preset with 2 prompts x 2 responses of 8 tokens,
1 repeat, the memory of every variant measured in one subprocess one after the other (a
check that it runs, not numbers to report).

Usage::

    python benchmarks/bench_step.py [--sizes tiny real] [--repeats 5] [--threads 1] [--device cpu]
    python benchmarks/bench_step.py --smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from a checkout

from trainer.batching import scored_positions  # noqa: E402
from trainer.loop import StepBatch, Trainer  # noqa: E402
from workbench.models.generation import left_pad, sample  # noqa: E402
from workbench.analysis.memory import status_kib  # noqa: E402
from trainer.setup import prepare  # noqa: E402
from trainer.tokenizer import build_char_tokenizer  # noqa: E402
from trainer.config import load_config  # noqa: E402

METHODS = ("grpo", "oisd", "sdpg", "rlsd", "opsd")  # each by its bundled config
# Every term on at step 0 (see the module docstring).
ALWAYS = ["sdpg.t_warm=0", "data.arithmetic.n_train=200", "data.arithmetic.n_test=20",
          "logging.progress=false", "optim.warmup_steps=0"]
SIZES = {
    # name: (model config kwargs, prompts, group size, response length)
    "tiny": (None, 8, 8, 40),
    "real": (dict(vocab_size=151_936, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                  max_position_embeddings=1024), 1, 2, 512),
    # Qwen3-4B's split of per-token FLOPs between the blocks and the readout, shrunk: blocks
    # 2 L d (4 d + 3 ffn) over readout 2 d V is 9.3 there (d 2560, ffn 9728, 36 blocks,
    # V 151,936) and 9.4 here (d 256, ffn 768, 8 blocks, V 2,848).
    "4b-shape": (dict(vocab_size=2_848, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                      max_position_embeddings=1024), 2, 4, 256),
    "smoke": (None, 2, 2, 8),  # --smoke: the tiny preset, a toy batch
}
VARIANTS = {  # name: (method, vocab_chunk_size override or None for the default)
    "grpo": ("grpo", None), "oisd": ("oisd", None), "sdpg": ("sdpg", None), "rlsd": ("rlsd", None),
    "opsd": ("opsd", None), "grpo unchunked": ("grpo", 0), "oisd unchunked": ("oisd", 0),
}


def model_folder(size: str, root: Path) -> Path:
    """A random-initialised model of ``size`` with the character tokenizer, saved once."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from trainer.presets import preset_config

    folder = root / size
    if (folder / "config.json").exists():
        return folder
    tok = build_char_tokenizer()
    kwargs = SIZES[size][0]
    config = preset_config("tiny", tok) if kwargs is None else Qwen3Config(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_trainer(size: str, variant: str, folder: Path) -> Trainer:
    method, chunk = VARIANTS[variant]
    _, prompts, group, length = SIZES[size]
    keys = [f"model.path={folder}", f"run_dir={folder.parent / 'runs' / variant.replace(' ', '-')}",
            f"rollout.prompts_per_step={prompts}", f"rollout.group_size={group}",
            f"rollout.max_new_tokens={length}", *ALWAYS]
    if chunk is not None:
        keys.append(f"optim.vocab_chunk_size={chunk}")
    cfg = load_config(method, keys)
    return Trainer(cfg, prepare(cfg))  # accelerate picks the device: CUDA when there is one


def make_batch(tr: Trainer, seed: int = 0) -> StepBatch:
    """The shared rollout batch: task prompts, random full-length responses, fixed advantages."""
    cfg = tr.cfg
    P, G, R = cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.max_new_tokens
    examples = tr.setup.task.train_examples()[:P]
    prompt_ids = [tr.tok(e.prompt, add_special_tokens=True)["input_ids"] for e in examples for _ in range(G)]
    prompts, prompt_mask = left_pad(prompt_ids, tr.tok.pad_token_id)
    B = len(prompt_ids)
    g = torch.Generator().manual_seed(seed)
    responses = torch.randint(3, tr.vocab_size, (B, R), generator=g)  # 0-2: pad, BOS, EOS
    response_mask = torch.ones(B, R)
    dev = tr.device
    return StepBatch(
        input_ids=torch.cat([prompts, responses], 1).to(dev),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], 1).to(dev),
        scored=scored_positions(response_mask, prompts.shape[1]).to(dev),
        response_mask=response_mask.to(dev),
        sample_logprobs=torch.zeros(B, R, device=dev),
        advantages=torch.linspace(-1.0, 1.0, B).roll(1).to(dev),  # both signs, none exactly 0 for B even
        teacher_prompts=[e.teacher_prompt for e in examples for _ in range(G)],
        prompt_width=prompts.shape[1],
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_rollout(tr: Trainer, device: str, repeats: int) -> float:
    """Median time of sampling the batch's prompts with the trainer's sampler.

    The random models emit EOS with probability about 1/V per token, so almost every
    response runs to full length, like the batch the updates train on."""
    cfg = tr.cfg
    examples = tr.setup.task.train_examples()[: cfg.rollout.prompts_per_step]
    prompt_ids = [tr.tok(e.prompt, add_special_tokens=True)["input_ids"]
                  for e in examples for _ in range(cfg.rollout.group_size)]
    times = []
    for r in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        sample(tr.model, prompt_ids, pad_id=tr.tok.pad_token_id, eos_id=tr.tok.eos_token_id,
               max_new_tokens=cfg.rollout.max_new_tokens, generator=torch.Generator(device=device).manual_seed(r))
        sync(device)
        if r:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_variants(size: str, variants: list[str], folder: Path, device: str, repeats: int) -> dict:
    trainers = {v: make_trainer(size, v, folder) for v in variants}
    batch = make_batch(next(iter(trainers.values())))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for v in variants:  # warm-up: allocates AdamW state, first-call overheads
        trainers[v].update(batch, {})
    for r in range(repeats):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            sync(device)
            start = time.perf_counter()
            trainers[v].update(batch, {})
            sync(device)
            times[v].append(time.perf_counter() - start)
    rollout = time_rollout(trainers[variants[0]], device, max(1, repeats // 2))
    return {"update": {v: statistics.median(t) for v, t in times.items()}, "rollout": rollout,
            "tokens": int(batch.response_mask.sum())}


# ------------------------------------------------------------------------------- memory


def child_memory(size: str, variant: str, folder: Path, device: str) -> None:
    """Run in a fresh process: print the variant's resident and update-peak bytes as JSON."""
    gc.collect()  # a variant measured before in this process (--smoke) is freed
    cuda = device.startswith("cuda")
    base = torch.cuda.memory_allocated() if cuda else status_kib("VmRSS") * 1024
    tr = make_trainer(size, variant, folder)
    batch = make_batch(tr)
    tr.update(batch, {})  # warm-up: AdamW state exists from here on
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    tr.update(batch, {})
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024
    print(json.dumps({"variant": variant, "resident": before - base, "update_peak": peak - before}), flush=True)


def measure_memory(size: str, variants: list[str], folder: Path, device: str, threads: int) -> dict:
    """variant -> its ``resident`` and ``update_peak`` bytes, measured by ``child_memory`` in
    one subprocess for all ``variants``, one after the other (a fresh process each: pass one)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--child", size, ",".join(variants), str(folder), "--device", device,
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {row.pop("variant"): row for row in rows}


# ------------------------------------------------------------------------------- main


def run(sizes: list[str], repeats: int, device: str, threads: int, root: Path) -> list[dict]:
    """Time and measure every variant of each size; one row per (size, variant)."""
    rows = []
    for size in sizes:
        folder = model_folder(size, root)
        variants = [v for v in VARIANTS if size == "real" or "unchunked" not in v]  # chunking matters at real V
        print(f"[{size}] timing {len(variants)} variants x {repeats} repeats ...", file=sys.stderr, flush=True)
        timed = time_variants(size, variants, folder, device, repeats)
        mem = {}
        if size == "smoke":  # one subprocess for all: seconds, not the numbers of a fresh process each
            print(f"[{size}] memory of {len(variants)} variants in one process ...", file=sys.stderr, flush=True)
            mem = measure_memory(size, variants, folder, device, threads)
        for v in variants:
            if v not in mem:
                print(f"[{size}] memory of {v} ...", file=sys.stderr, flush=True)
                mem.update(measure_memory(size, [v], folder, device, threads))
        t_g = timed["update"]["grpo"]
        m_g = mem["grpo"]["resident"] + mem["grpo"]["update_peak"]
        for v in variants:
            t = timed["update"][v]
            total = mem[v]["resident"] + mem[v]["update_peak"]
            rows.append({
                "size": size, "variant": v, "tokens": timed["tokens"], "update_s": t, "ratio": t / t_g,
                "step_ratio": (t + timed["rollout"]) / (t_g + timed["rollout"]), "rollout_s": timed["rollout"],
                "resident_mib": mem[v]["resident"] / 2**20, "update_peak_mib": mem[v]["update_peak"] / 2**20,
                "total_mib": total / 2**20, "mem_ratio": total / m_g,
            })
    return rows


def print_table(rows: list[dict]) -> None:
    head = (f"{'size':>5} {'variant':>15} {'tokens':>6} {'update s':>9} {'ratio':>6} {'step ratio':>10} "
            f"{'resident MiB':>12} {'update peak MiB':>15} {'total MiB':>9} {'mem ratio':>9}")
    print(head)
    for r in rows:
        print(f"{r['size']:>5} {r['variant']:>15} {r['tokens']:>6} {r['update_s']:>9.3f} {r['ratio']:>6.2f} "
              f"{r['step_ratio']:>10.2f} {r['resident_mib']:>12.0f} {r['update_peak_mib']:>15.0f} "
              f"{r['total_mib']:>9.0f} {r['mem_ratio']:>9.2f}")
    for size in dict.fromkeys(r["size"] for r in rows):
        rollout = next(r["rollout_s"] for r in rows if r["size"] == size)
        print(f"({size}: rollout of the same batch {rollout:.3f} s, in every step ratio)")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "real", "4b-shape"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where accelerate puts the models (CUDA whenever there is one)")
    parser.add_argument("--root", type=Path, default=None, help="folder for the random models (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smoke size (tiny preset, 2 x 2 responses of 8 tokens), 1 repeat: checks the code runs")
    parser.add_argument("--child", nargs=3, metavar=("SIZE", "VARIANTS", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats = ["smoke"], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        size, variants, folder = args.child
        for variant in variants.split(","):
            child_memory(size, variant, Path(folder), args.device)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.sizes, args.repeats, args.device, args.threads, args.root or Path(tmp))
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
