"""The training-performance harness: every table, one command (``make bench``).

Runs, in one process run and in this order, each benchmark measuring its variants
side by side (interleaved, medians, ratios; absolute times on a shared machine mean
little):

1. ``bench_rollout``: our KV-cache sampler against ``transformers``' ``generate`` on
   the same batch (tokens/s and their ratio).
2. ``bench_step``: each method's update (loss, teacher and reference forwards,
   backward, AdamW) and whole step against GRPO's on the same rollouts, and peak
   memory, on the tiny preset and at the real vocabulary (151,936 tokens, 512-token
   responses), chunked and unchunked.
3. ``bench_trl``: one full GRPO step against TRL's ``GRPOTrainer`` on the same tiny
   model, prompts, group size and lengths (skipped, with a note, when TRL is not
   installed: ``pip install 'oisd-workbench[bench]'``).

``--quick`` cuts repeats (a smoke run of the harness, not numbers to report).

Usage::

    python benchmarks/run_all.py [--quick] [--skip rollout step trl]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

BENCHES = ("rollout", "step", "trl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: checks the harness runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=BENCHES)
    args = parser.parse_args(argv)
    repeats = ["--repeats", "1"] if args.quick else []
    for name in BENCHES:
        if name in args.skip:
            continue
        print(f"\n=== {name} " + "=" * 60, flush=True)
        start = time.perf_counter()
        if name == "rollout":
            import bench_rollout

            bench_rollout.main(repeats)
        elif name == "step":
            import bench_step

            bench_step.main(repeats + (["--sizes", "tiny"] if args.quick else []))
        else:
            import bench_trl

            bench_trl.main(repeats)
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
