"""Benchmark: one GRPO step of ``trainer.loop.Trainer`` against one of TRL's ``GRPOTrainer``.

Both trainers run in one process, on CPU, on the same model folder (a seeded,
random-initialised ``tiny`` Qwen3 with the char tokenizer, or ``--model DIR``,
e.g. a folder from ``oisd warmstart``), the same prompts, the same group size and
the same generation length, and their optimizer steps are interleaved so that
drift in machine load hits both alike. The table shows the median wall time of
a step, split into its rollout part and its update part, the mean completion
length each side generated (random models rarely emit EOS, so both should be at
``--new-tokens``), completion tokens per second, and the ratio ours / TRL
(< 1 means ours is faster).

Setup (defaults: 8 prompts x 8 completions, 40 new tokens, one thread):

- Same prompts, step by step: the dataset handed to TRL is the sequence of
  prompts our ``PromptStream`` yields for steps 0, 1, ...; with
  ``shuffle_dataset=False`` TRL's ``RepeatSampler`` gives its step k exactly our
  step k's prompts, each repeated ``num_generations`` times.
- Same verifier: TRL's reward function calls ``task.reward(completion, example)``
  (the example looked up by prompt), as our loop does (no format bonus).
- One optimizer step consumes 8 x 8 completions on both sides: TRL has
  ``per_device_train_batch_size = generation_batch_size = 64``,
  ``gradient_accumulation_steps = steps_per_generation = num_iterations = 1``.
  Ours has ``optim.mini_batches = 1`` and no micro-batching.
- Same objective: ours ``grpo.loss_type = token_mean`` (eps 0.2 / 0.28, no KL,
  no reference model); TRL ``loss_type = "dapo"`` (token-level loss over the
  global token count), ``epsilon = 0.2``, ``epsilon_high = 0.28``, ``beta = 0``
  (no reference model is built). Sampling at temperature 1, top-p 1, top-k off,
  KV cache on both sides; TRL uses plain ``model.generate`` (no vLLM, no
  continuous batching). fp32, no mixed precision. TRL's gradient checkpointing
  (on by default in ``GRPOConfig``) is turned off, and its optimizer is
  ``adamw_torch`` (the plain ``torch.optim.AdamW``, as ours; its default on new
  torch is the fused kernel). Learning rate, Adam betas, warm-up (5 steps, then
  constant), weight decay 0 and gradient clipping at 1.0 match.

What each timed step contains:

- ours: ``Trainer.train_step()``: tokenise the step's prompts, per-group
  sampling noise, KV-cache sampling (``workbench.models.generation.sample``, which also
  keeps the sampled tokens' log-probs), decode, verifier rewards, group
  advantages and rollout stats; then one policy forward over prompt + response
  and the log-probs and entropy of the response tokens (``micro_loss``: at the
  time of writing a chunked full-vocabulary pass from the final hidden states,
  logits recomputed in backward), the clipped surrogate, backward,
  gradient-norm clipping, the non-finite guard, AdamW, the LR scheduler step,
  and the step's logs.
- TRL: from ``on_step_begin`` to ``on_step_end`` of ``Trainer.train()`` with
  ``max_steps``: ``training_step`` (``_generate_and_score_completions``:
  tokenise, left-pad, ``model.generate``, EOS masking, decode, reward,
  advantages, metrics; then ``compute_loss``: a forward through TRL's fused
  LM head returning log-probs and entropies of the completion tokens, the
  clipped surrogate, clip-ratio metrics; backward), FLOP and token counting,
  gradient clipping and norm, AdamW, scheduler step and ``zero_grad``. Not
  timed: fetching the step's 64 prompt strings from the dataloader, and the
  log / save / evaluate hook (all off). TRL always computes its metrics
  (reward stats, clip ratios, entropy), as ours always computes its logs.
  With these settings TRL does not recompute old log-probs (the step is
  on-policy: ``old = logp.detach()``, as ours).

Differences that are part of what is measured: our sampler drops finished rows
from the KV cache and from later decode forwards, while ``model.generate``
keeps decoding finished rows (as padding) until every row has stopped; so the
more completions end early, the more this favours ours. The two sides draw
different random numbers, so their completions (and EOS positions) differ;
"mean len" shows how much, and tok/s counts each side's own completion tokens
(up to and including EOS).

"rollout" is ``Trainer.rollout()`` for ours and
``GRPOTrainer._generate_and_score_completions`` for TRL (both wrapped on the
instance, nothing else changed); "update" is the step minus its rollout.

Interleaving: TRL drives the loop and a callback runs our step next to each TRL
step, alternating the order (ours, TRL | TRL, ours | ours, TRL ...). Step 0 of
each is a warm-up and is not counted; medians are over the next ``--repeats``.
Absolute times are noisy on a shared CPU; the ratio is the number to read.

Run from the repo root: ``python benchmarks/bench_trl.py [--repeats 5]
[--model DIR] [--prompts 8] [--group 8] [--new-tokens 40] [--threads 1]
[--seed 0]``; ``--smoke`` runs the same code with 2 prompts x 2 completions of 8 tokens
and 1 timed step (a check that it runs, not numbers to report). Needs TRL
(``pip install 'oisd-workbench[bench]'``): without it the script exits with an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

N_TRAIN, N_TEST = 200, 20  # arithmetic questions (the step's prompts come from the train split)


def make_model_dir(folder: Path, seed: int) -> Path:
    """Save a random-initialised ``tiny`` Qwen3 and the char tokenizer into ``folder``."""
    from transformers import AutoModelForCausalLM

    from trainer.presets import preset_config
    from trainer.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(preset_config("tiny", tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_ours(model_dir: Path, run_dir: Path, args):
    """Our GRPO ``Trainer`` on ``model_dir`` (validated by ``prepare``; writes nothing)."""
    from trainer.loop import Trainer
    from trainer.setup import prepare
    from trainer.config import load_config

    overrides = [
        f"model.path={model_dir}",
        f"run_dir={run_dir}",
        f"seed={args.seed}",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.group_size={args.group}",
        f"rollout.max_new_tokens={args.new_tokens}",
        "rollout.temperature=1.0",
        f"data.arithmetic.n_train={N_TRAIN}",
        f"data.arithmetic.n_test={N_TEST}",
        "probe_every=0",
        "eval_every=0",
        "logging.progress=false",
    ]
    cfg = load_config("grpo", overrides)
    return Trainer(cfg, prepare(cfg))


def build_trl(model_dir: Path, out_dir: Path, ours, n_steps: int, args):
    """TRL's ``GRPOTrainer`` on the same model folder, prompts, verifier and batch shape."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    cfg, task = ours.cfg, ours.setup.task
    P, G = args.prompts, args.group
    # Our stream's prompts of steps 0..n_steps-1, in order: TRL's step k gets our step k's.
    examples = [e for k in range(n_steps) for _, e in ours.stream.take(k * P, P)]
    by_prompt = {e.prompt: e for e in task.train_examples()}
    dataset = Dataset.from_dict({"prompt": [e.prompt for e in examples]})

    def arithmetic_reward(prompts, completions, **kwargs):
        """The task's verifier, as our loop calls it."""
        return [task.reward(c, by_prompt[p]) for p, c in zip(prompts, completions)]

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    config = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        max_steps=n_steps,
        per_device_train_batch_size=P * G,
        gradient_accumulation_steps=1,
        generation_batch_size=P * G,
        num_generations=G,
        num_iterations=1,
        max_completion_length=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.0,
        loss_type="dapo",
        epsilon=cfg.grpo.eps_low,
        epsilon_high=cfg.grpo.eps_high,
        scale_rewards="group",
        shuffle_dataset=False,
        gradient_checkpointing=False,
        learning_rate=cfg.optim.lr,
        adam_beta1=cfg.optim.beta1,
        adam_beta2=cfg.optim.beta2,
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.max_grad_norm,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=cfg.optim.warmup_steps,
        optim="adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
    )
    trainer.remove_callback(PrinterCallback)  # with tqdm off it would print the end-of-run summary
    return trainer


def timed_method(obj, name: str, sink: list) -> None:
    """Wrap ``obj.name`` on the instance so that each call's seconds are appended to ``sink``."""
    inner = getattr(obj, name)

    def wrapper(*a, **kw):
        start = time.perf_counter()
        out = inner(*a, **kw)
        sink.append((time.perf_counter() - start, a, out))
        return out

    setattr(obj, name, wrapper)


def run_interleaved(ours, trl_trainer, n_steps: int) -> tuple[list[dict], list[dict]]:
    """Run ``n_steps`` steps of each, alternating the order; per-step records of each side."""
    from transformers import TrainerCallback

    ours_rollouts, trl_rollouts = [], []
    timed_method(ours, "rollout", ours_rollouts)
    timed_method(trl_trainer, "_generate_and_score_completions", trl_rollouts)
    ours_steps: list[dict] = []
    trl_steps: list[dict] = []
    P, G = ours.cfg.rollout.prompts_per_step, ours.cfg.rollout.group_size

    def step_prompts(k: int) -> list[str]:
        """Our step k's prompts, each G times, sorted (to check TRL's step k against)."""
        return sorted(e.prompt for _, e in ours.stream.take(k * P, P) for _ in range(G))

    def ours_step() -> None:
        ours.step = len(ours_steps)
        start = time.perf_counter()
        logs = ours.train_step()
        seconds = time.perf_counter() - start
        rollout_s = ours_rollouts[-1][0]
        mean_len = logs["completions/mean_length"]
        ours_steps.append(
            {
                "step_s": seconds,
                "rollout_s": rollout_s,
                "mean_len": mean_len,
                "tokens": mean_len * P * G,
            }
        )

    class Interleave(TrainerCallback):
        """Times each TRL optimizer step and runs our step before (even steps) or after (odd) it."""

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step % 2 == 0:
                ours_step()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            seconds = time.perf_counter() - self.start
            rollout_s, (inputs,), out = trl_rollouts[-1]
            k = state.global_step - 1
            if sorted(x["prompt"] for x in inputs) != step_prompts(k):
                raise RuntimeError(f"TRL step {k} did not get our step {k}'s prompts")
            mask = out["completion_mask"]
            tokens = float(mask.sum())
            trl_steps.append(
                {
                    "step_s": seconds,
                    "rollout_s": rollout_s,
                    "mean_len": tokens / mask.shape[0],
                    "tokens": tokens,
                }
            )
            if (state.global_step - 1) % 2 == 1:  # global_step was incremented before this hook
                ours_step()

    trl_trainer.add_callback(Interleave())
    trl_trainer.train()
    if len(trl_steps) != n_steps or len(ours_steps) != n_steps:
        raise RuntimeError(
            f"expected {n_steps} steps each, got ours {len(ours_steps)}, TRL {len(trl_steps)}"
        )
    return ours_steps, trl_steps


def summarise(side: str, steps: list[dict]) -> dict:
    """Medians over the timed steps (the warm-up step already dropped)."""
    step_s = statistics.median(s["step_s"] for s in steps)
    rollout_s = statistics.median(s["rollout_s"] for s in steps)
    update_s = statistics.median(s["step_s"] - s["rollout_s"] for s in steps)
    return {
        "side": side,
        "step_s": step_s,
        "rollout_s": rollout_s,
        "update_s": update_s,
        "mean_len": statistics.mean(s["mean_len"] for s in steps),
        "tokens_per_s": statistics.median(s["tokens"] / s["step_s"] for s in steps),
    }


def print_table(rows: list[dict]) -> None:
    """The rows as a fixed-width table."""
    print(f"{'':>9} {'step s':>8} {'rollout s':>10} {'update s':>9} {'mean len':>9} {'tok/s':>8}")
    for r in rows:
        ratio = r["side"] == "ours/trl"  # ratios get two decimals everywhere
        t, n, v = (".2f", ".2f", ".2f") if ratio else (".3f", ".1f", ".0f")
        print(
            f"{r['side']:>9} {r['step_s']:>8{t}} {r['rollout_s']:>10{t}} {r['update_s']:>9{t}} "
            f"{r['mean_len']:>9{n}} {r['tokens_per_s']:>8{v}}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, time both trainers interleaved, print and return the table rows.

    Rows: ``ours``, ``trl`` (medians) and ``ours/trl`` (ratios of each column; a
    step-time ratio < 1 means ours is faster). Exits with an error when TRL is not installed.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed steps of each trainer (after 1 warm-up step each)",
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model folder (HF save_pretrained + tokenizer); default: a random tiny Qwen3",
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=40, help="max new tokens per completion")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random model and of both runs"
    )
    parser.add_argument("--smoke", action="store_true",
                        help="2 prompts x 2 completions of 8 tokens, 1 timed step: checks the code runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.group, args.new_tokens, args.repeats = 2, 2, 8, 1
    try:
        import trl
    except ImportError:
        raise SystemExit("bench_trl: cannot measure: TRL is not installed (pip install 'oisd-workbench[bench]')")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    for name in ("transformers", "trl", "accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    n_steps = 1 + args.repeats
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from transformers / TRL
        tmp = Path(tmp)
        model_dir = args.model or make_model_dir(tmp / "model", args.seed)
        ours = build_ours(model_dir, tmp / "ours-run", args)
        trl_trainer = build_trl(model_dir, tmp / "trl-out", ours, n_steps, args)
        n_params = sum(p.numel() for p in ours.model.parameters())
        print(
            f"model={args.model or 'random tiny'} params={n_params / 1e6:.2f}M "
            f"prompts={args.prompts} group={args.group} new_tokens={args.new_tokens} "
            f"repeats={args.repeats} threads={torch.get_num_threads()} trl={trl.__version__}"
        )
        ours_steps, trl_steps = run_interleaved(ours, trl_trainer, n_steps)

    rows = [summarise("ours", ours_steps[1:]), summarise("trl", trl_steps[1:])]
    a, b = rows
    columns = ("step_s", "rollout_s", "update_s", "mean_len", "tokens_per_s")
    rows.append({"side": "ours/trl", **{k: a[k] / b[k] for k in columns}})
    print_table(rows)
    print(f"step-time ratio ours/trl = {rows[2]['step_s']:.2f} (< 1: ours is faster)")
    return rows


if __name__ == "__main__":
    main()
