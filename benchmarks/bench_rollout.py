"""Benchmark: ``workbench.models.generation.sample`` against ``model.generate`` on the same batch.

Both samplers run in one process on the same random-initialised Qwen3 models and
the same left-padded prompts, interleaved (ours, generate, ours, generate, ...)
so that drift in machine load hits both equally; the median wall time of each is
turned into generated tokens per second and the ratio ours / generate is printed
(> 1 means ours is faster).

EOS is id 1, which prompts never contain and the random models emit with
probability about 1/96 per step, so with the default batch almost every run
decodes all ``--new-tokens`` steps; throughput counts real response tokens
(up to and including EOS) for both samplers. Sampling mode is the training
default (temperature 1, no truncation); ``--greedy`` times greedy decoding.

Run: ``python benchmarks/bench_rollout.py [--batch 64] [--prompt-len 20]
[--new-tokens 48] [--repeats 7] [--sizes tiny,small]``; ``--smoke`` runs the same code
on the tiny model with 4 prompts of ~8 tokens, 8 new tokens and 1 repeat (a check that it
runs, not numbers to report).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from workbench.models.generation import left_pad, sample

# Model sizes: ~0.5M and ~5M parameters (vocab as a character-level tokenizer).
SIZES = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
    },
}
VOCAB_SIZE = 96


def build_model(size: str, seed: int) -> torch.nn.Module:
    """A random-initialised Qwen3 of the named size, in eval mode."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB_SIZE, max_position_embeddings=512, tie_word_embeddings=True, **SIZES[size]
    )
    return AutoModelForCausalLM.from_config(config).eval()


def make_prompts(batch: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Prompts of lengths spread around ``prompt_len`` (so left padding is exercised)."""
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, prompt_len - 5), prompt_len + 6, (batch,), generator=rng)
    return [torch.randint(3, VOCAB_SIZE, (int(n),), generator=rng).tolist() for n in lengths]


def time_ours(model, prompts, args, seed: int) -> tuple[float, int]:
    """Seconds for one call of :func:`sample`, and the tokens it generated."""
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    batch = sample(
        model,
        prompts,
        pad_id=0,
        eos_id=args.eos_id,
        max_new_tokens=args.new_tokens,
        greedy=args.greedy,
        generator=generator,
    )
    elapsed = time.perf_counter() - start
    return elapsed, int(batch.lengths.sum())


def time_generate(model, prompts, args, seed: int) -> tuple[float, int]:
    """Seconds for one ``model.generate`` call (padding included), and the tokens it generated."""
    torch.manual_seed(seed)
    # Plain sampling (no top-k/top-p warpers), as in ours; greedy takes no sampling flags.
    sampling = {} if args.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    config = GenerationConfig(
        do_sample=not args.greedy,
        max_new_tokens=args.new_tokens,
        pad_token_id=0,
        eos_token_id=args.eos_id,
        **sampling,
    )
    start = time.perf_counter()
    # Padding is part of the work both samplers do, so it is inside the timed region.
    input_ids, attention_mask = left_pad(prompts, pad_id=0)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )
    elapsed = time.perf_counter() - start
    responses = out[:, input_ids.shape[1] :]
    # Tokens up to and including the first EOS (pad after it does not count).
    is_eos = responses == args.eos_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return elapsed, int((~after_eos).sum())


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse arguments, time both samplers per model size, print a table of ratios; return
    one row per size (``size``, ``ours_tok_s``, ``generate_tok_s``, ``ratio``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="number of prompts")
    parser.add_argument(
        "--prompt-len", type=int, default=20, help="mean prompt length (tokens, +-5)"
    )
    parser.add_argument("--new-tokens", type=int, default=48, help="max_new_tokens")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed repeats of each sampler (interleaved)"
    )
    parser.add_argument(
        "--sizes", default="tiny,small", help=f"comma-separated from {sorted(SIZES)}"
    )
    parser.add_argument("--eos-id", type=int, default=1, help="EOS id (prompts use ids 3 and up)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, 4 prompts, 8 new tokens, 1 repeat: checks the code runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.prompt_len, args.new_tokens, args.repeats, args.sizes = 4, 8, 8, 1, "tiny"
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    prompts = make_prompts(args.batch, args.prompt_len, seed=0)
    print(
        f"batch={args.batch} prompt_len~{args.prompt_len} new_tokens={args.new_tokens} "
        f"repeats={args.repeats} mode={'greedy' if args.greedy else 'sample'} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'size':>6} {'params':>9} {'ours tok/s':>11} {'generate tok/s':>15} {'ratio':>6}")
    rows = []
    for size in args.sizes.split(","):
        model = build_model(size, seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        time_ours(model, prompts, args, seed=0)  # warm-up both paths (allocator, lazy inits)
        time_generate(model, prompts, args, seed=0)
        ours, theirs = [], []
        for repeat in range(args.repeats):
            seconds, tokens = time_ours(model, prompts, args, seed=repeat)
            ours.append(tokens / seconds)
            seconds, tokens = time_generate(model, prompts, args, seed=repeat)
            theirs.append(tokens / seconds)
        ours_median, theirs_median = statistics.median(ours), statistics.median(theirs)
        print(
            f"{size:>6} {n_params / 1e6:>8.2f}M {ours_median:>11.0f} {theirs_median:>15.0f} "
            f"{ours_median / theirs_median:>6.2f}"
        )
        rows.append({"size": size, "ours_tok_s": ours_median, "generate_tok_s": theirs_median,
                     "ratio": ours_median / theirs_median})
    return rows


if __name__ == "__main__":
    main()
