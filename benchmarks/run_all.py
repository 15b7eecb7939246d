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
   model, prompts, group size and lengths (needs TRL: ``pip install
   'oisd-workbench[bench]'``; without it the harness fails: ``--skip trl`` leaves it out).

``--smoke`` (or ``--quick``) runs instead every benchmark of this folder with its own
``--smoke`` (the same code at a tiny shape, 1 repeat: a check that each still runs, not
numbers to report), each in its own process, one thread each unless ``OMP_NUM_THREADS``
says otherwise, and prints the seconds and outcome of each; the exit status is non-zero
when any of them failed.

Usage::

    python benchmarks/run_all.py [--skip rollout step trl]
    python benchmarks/run_all.py --smoke [--only NAME ...] [--skip NAME ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark modules

BENCHES = ("rollout", "step", "trl")  # the performance harness
# Every benchmark of this folder, by its --smoke (bench_<name>.py, and gpu_check.py).
SMOKES = ("attention", "dashboard", "methods", "probe", "probe_depth", "probe_log", "rollout", "step", "trl",
          "trl_backend", "gpu_check")


def smoke_command(name: str, tmp: Path) -> list[str]:
    """The command line of benchmark ``name``'s smoke run (its files, if any, under ``tmp``)."""
    if name == "gpu_check":
        return [sys.executable, str(HERE / "gpu_check.py"), "--smoke", "--out", str(tmp / "gpu_check.json")]
    return [sys.executable, str(HERE / f"bench_{name}.py"), "--smoke"]


def run_smokes(names: list[str]) -> int:
    """Each benchmark's ``--smoke`` in its own process, its output passed through; prints a
    summary line per benchmark and returns the number that failed."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        for name in names:
            print(f"\n=== {name} (smoke) " + "=" * 52, flush=True)
            start = time.perf_counter()
            rc = subprocess.run(smoke_command(name, Path(tmp)), check=False, cwd=HERE.parent, env=env).returncode
            outcomes.append((name, time.perf_counter() - start, rc))
    print("\n=== smoke summary " + "=" * 53)
    for name, seconds, rc in outcomes:
        print(f"smoke {name:<12} {seconds:6.1f} s  {'ok' if rc == 0 else f'FAILED (exit status {rc})'}")
    failed = [name for name, _, rc in outcomes if rc]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} smoke runs passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return len(failed)


def main(argv: list[str] | None = None) -> int:
    """Run the harness (or every smoke run); the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", "--quick", action="store_true",
                        help="every benchmark's --smoke, each in its own process: checks that each runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=SMOKES)
    parser.add_argument("--only", nargs="*", default=None, choices=SMOKES, help="only these (default: all)")
    args = parser.parse_args(argv)
    if args.smoke:
        names = [n for n in SMOKES if n not in args.skip and (args.only is None or n in args.only)]
        return 1 if run_smokes(names) else 0
    for name in BENCHES:
        if name in args.skip or (args.only is not None and name not in args.only):
            continue
        print(f"\n=== {name} " + "=" * 60, flush=True)
        start = time.perf_counter()
        if name == "rollout":
            import bench_rollout

            bench_rollout.main([])
        elif name == "step":
            import bench_step

            bench_step.main([])
        else:
            import bench_trl

            bench_trl.main([])
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
