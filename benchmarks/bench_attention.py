"""Cost of capturing attention probabilities for OISD: selective vs SDPA vs eager.

Times one forward + backward of the policy pass on random Qwen3 models, three ways:

- ``sdpa``: :func:`trainer.forward.policy_forward` with no attention capture (SDPA
  in every layer): the floor, what GRPO alone pays.
- ``selective``: ``policy_forward`` capturing attention of one OISD layer (the
  middle block) and the final layer, SDPA everywhere else.
- ``eager``: the naive way, eager attention in every layer with
  ``output_attentions=True``, rows gathered at the same positions.

The loss is the same for ``selective`` and ``eager`` (a log-prob term plus a
term on both layers' attention rows); ``sdpa`` has the log-prob term only.
Variants run interleaved (one of each per repeat, order rotated) so that
background load affects them alike; the median is reported, with ratios to ``sdpa``.

Usage::

    python benchmarks/bench_attention.py [--sizes tiny medium] [--repeats 7] [--device cpu]
    python benchmarks/bench_attention.py --smoke   # the same code at a 2-layer toy shape, 1 repeat
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.forward import num_layers, policy_forward  # noqa: E402

SIZES = {
    # name: (model config kwargs, batch, prompt length, response length)
    "tiny": (
        dict(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        8, 32, 96,
    ),
    "medium": (
        dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, head_dim=64),
        2, 128, 384,
    ),
    # --smoke: the same code paths in a second (not numbers to report).
    "smoke": (
        dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=16),
        2, 8, 8,
    ),
}


def make_batch(batch: int, prompt: int, response: int, vocab: int, device: str):
    """Left-padded prompts of varying length followed by a response; scored = response positions."""
    total = prompt + response
    input_ids = torch.randint(0, vocab, (batch, total), device=device)
    attention_mask = torch.ones(batch, total, dtype=torch.long, device=device)
    for row in range(batch):
        attention_mask[row, : (row * prompt) // (2 * batch)] = 0  # up to half the prompt is padding
    scored = torch.zeros(batch, total, dtype=torch.bool, device=device)
    scored[:, prompt - 1 : total - 1] = True
    return input_ids, attention_mask, scored


def attention_term(rows: torch.Tensor) -> torch.Tensor:
    """A loss on attention rows that needs their full gradient, (m, H, K) -> scalar."""
    return (rows.mean(1).clamp_min(1e-9).log() * rows.mean(1)).sum(-1).mean()


def step_sdpa(model, input_ids, attention_mask, scored, layers):
    out = policy_forward(model, input_ids, attention_mask, scored)
    out.logits.float().log_softmax(-1)[:, 0].mean().backward()


def step_selective(model, input_ids, attention_mask, scored, layers):
    out = policy_forward(model, input_ids, attention_mask, scored, attn_layers=layers)
    loss = out.logits.float().log_softmax(-1)[:, 0].mean()
    loss = loss + sum(attention_term(out.attentions[layer]) for layer in layers)
    loss.backward()


def step_eager(model, input_ids, attention_mask, scored, layers):
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_attentions=True,
        use_cache=False,
    )
    batch_idx, pos_idx = scored.nonzero(as_tuple=True)
    logits = model.lm_head(out.last_hidden_state[batch_idx, pos_idx])
    loss = logits.float().log_softmax(-1)[:, 0].mean()
    for layer in layers:  # HF's attentions tuple is 0-based
        loss = loss + attention_term(out.attentions[layer - 1][batch_idx, :, pos_idx].float())
    loss.backward()


def bench(size: str, repeats: int, device: str, dtype: torch.dtype) -> dict[str, float]:
    config_kwargs, batch, prompt, response = SIZES[size]
    config = Qwen3Config(**config_kwargs, max_position_embeddings=prompt + response)
    torch.manual_seed(0)
    selective = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    selective = selective.to(device, dtype)
    # A config of its own: switching `selective` to "oisd_selective" edits its config.
    eager_config = Qwen3Config(**config_kwargs, max_position_embeddings=prompt + response)
    eager = AutoModelForCausalLM.from_config(eager_config, attn_implementation="eager")
    eager = eager.to(device, dtype)
    eager.load_state_dict(selective.state_dict())
    total_layers = num_layers(selective)
    layers = (total_layers // 2, total_layers)  # one OISD layer + the final layer
    inputs = make_batch(batch, prompt, response, config.vocab_size, device)

    variants = {
        "sdpa": lambda: step_sdpa(selective, *inputs, layers),
        "selective": lambda: step_selective(selective, *inputs, layers),
        "eager": lambda: step_eager(eager, *inputs, layers),
    }
    for run in variants.values():  # warm-up (and the one-time attention setup)
        run()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            selective.zero_grad(set_to_none=True)
            eager.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            variants[name]()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{size:>7}: B={batch} T={prompt + response} L={total_layers} attn layers {layers}  "
        + "  ".join(f"{name} {1e3 * t:9.2f} ms" for name, t in medians.items())
        + f"  | selective/sdpa {medians['selective'] / medians['sdpa']:.2f}x"
        + f"  eager/sdpa {medians['eager'] / medians['sdpa']:.2f}x"
        + f"  selective/eager {medians['selective'] / medians['eager']:.2f}x"
    )
    return medians


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Time every size; print one line each; return size -> variant -> median seconds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--smoke", action="store_true", help="the smoke size, 1 repeat: checks the code runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats = ["smoke"], 1
    print(f"device {args.device}, dtype {args.dtype}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats} interleaved repeats "
          "(forward + backward)")
    return {size: bench(size, args.repeats, args.device, getattr(torch, args.dtype)) for size in args.sizes}


if __name__ == "__main__":
    main()
