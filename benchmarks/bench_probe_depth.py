"""The analyzer at Qwen3-4B's depth and heads: time, peak memory and bytes per checkpoint.

A random-init Qwen3 with Qwen3-4B's 36 layers, 32 heads and 8 KV heads but a narrow width
(hidden 256, head_dim 64: about 30M parameters) and the character tokenizer, built here;
4 probe prompts whose reference completions make about 512 tokens. ``oisd probe MODEL
--out DIR --prompts FILE`` runs in a child process, as a user would run it; the parent
reports its wall time, the child's peak resident memory (``ru_maxrss`` of the children)
and the size of each analysis file of the checkpoint. Before the compact attention table
(``workbench.analysis.analyzer.ATTN_DETAIL_ROWS``) the same command grew to 24 GB and was killed.

Usage::

    python benchmarks/bench_probe_depth.py [--tokens 512] [--layers 36] [--heads 32] [--json FILE]
    python benchmarks/bench_probe_depth.py --smoke   # 2 layers x 2 heads, width 32, 64 tokens
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_MB = 100  # the bound on one checkpoint's analysis files


def build(folder: Path, layers: int, heads: int, kv_heads: int, hidden: int, tokens: int) -> Path:
    """The model folder and a prompts file of 4 prompts with ~``tokens``-token references."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    from trainer.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=2 * tokens,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = random.Random(0)
    rows = []
    for i in range(4):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"Question {i}: what is {a} + {b}? Show the work."
        steps = " ".join(f"step {j}: {a} + {j} = {a + j}." for j in range(200))
        reference = (steps[: tokens - len(prompt) - 20] + f" answer {a + b}")
        rows.append({"prompt": prompt, "reference": reference})
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def main(argv: list[str] | None = None) -> dict:
    """Build the model, run ``oisd probe`` on it in a child process, print and return the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=512, help="prompt + reference length of each probe prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy split length")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="2 layers x 2 heads, hidden 32, 64 tokens, 4 greedy tokens: checks the code runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.heads, args.kv_heads, args.hidden, args.tokens, args.max_new_tokens = 2, 2, 1, 32, 64, 4
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp), args.layers, args.heads, args.kv_heads, args.hidden, args.tokens)
        out = folder / "analysis"
        command = [sys.executable, "-m", "workbench.cli", "probe", str(folder / "model"), "--out", str(out),
                   "--prompts", str(folder / "prompts.jsonl"), "--max-new-tokens", str(args.max_new_tokens)]
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        if result.returncode != 0:
            raise SystemExit(f"oisd probe failed ({result.returncode}): {result.stderr.strip().splitlines()[-1]}")
        files = {p.name: p.stat().st_size for p in sorted(out.rglob("*.parquet"))}
        weights_mb = sum(p.stat().st_size for p in (folder / "model").glob("*.safetensors")) / 2**20
        from workbench.storage.atomic import read_provenance

        attn = next(p for p in out.rglob("*-attn.parquet"))
        info = read_provenance(attn)
    total_mb = sum(files.values()) / 2**20
    report = {"shape": {"layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "hidden": args.hidden,
                        "tokens": args.tokens, "prompts": 4},
              "seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb), "weights_mb": round(weights_mb, 1),
              "files_mb": {k: round(v / 2**20, 2) for k, v in files.items()}, "total_mb": round(total_mb, 2),
              "attn_top_k": info.get("attn_top_k"), "attn_mass_kept": info.get("attn_mass_kept"),
              "within_budget": total_mb <= BUDGET_MB}
    print(f"{args.layers} layers x {args.heads} heads, 4 prompts of {args.tokens} tokens: {seconds:.0f} s, "
          f"peak RSS {peak_mb:.0f} MB (weights {weights_mb:.0f} MB)")
    for name, size in files.items():
        print(f"  {name}: {size / 2**20:.2f} MB")
    print(f"  total {total_mb:.1f} MB (budget {BUDGET_MB} MB: {'met' if total_mb <= BUDGET_MB else 'MISSED'}); "
          f"attention: top {info.get('attn_top_k')} keys per query, holding "
          f"{100 * (info.get('attn_mass_kept') or 1):.1f}% of the weight")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
