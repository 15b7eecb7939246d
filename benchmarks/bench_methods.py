"""Methods compared from the same warm start: GRPO, OISD, SDPG (ufkl) and RLSD.

Each (method, seed) trains from the warm start for a fixed wall-clock budget (default
3 minutes on one core; runs go two at a time on a 2-core machine), then the table
prints held-out greedy accuracy before and after (mean and spread over seeds),
final entropy, and top1_agree at the OISD layer (built-in probes, reference split).

    python benchmarks/bench_methods.py --warmstart runs/warmstart-tiny --minutes 3 --seeds 0 1 2

Targets (issue): every method gains >= 10 accuracy points; OISD's top1_agree at its
layer clearly above GRPO's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable as a plain script from a checkout
CONFIGS = {"grpo": "grpo", "oisd": "oisd", "sdpg": "sdpg-ufkl", "rlsd": "rlsd"}


def run_one(method: str, seed: int, args) -> Path:
    run_dir = Path(args.out) / f"{method}-seed{seed}"
    if (run_dir / "run.json").exists() and json.loads((run_dir / "run.json").read_text()).get("status") == "finished":
        return run_dir
    steps = args.max_steps  # the wall-clock budget stops the run earlier (see --minutes)
    cmd = [sys.executable, "-m", "workbench.cli", "train", "--config", CONFIGS[method],
           "--set", f"model.path={args.warmstart}", "--set", f"seed={seed}", "--set", f"steps={steps}",
           "--set", f"eval_every={args.eval_every}", "--set", f"probe_every={args.eval_every}",
           "--set", f"checkpoint_every={args.eval_every}", "--set", "logging.progress=false",
           "--set", f"eval.n={args.eval_n}", "--run-dir", str(run_dir)]
    if (run_dir / "run.json").exists():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=args.minutes * 60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # budget spent: the last eval/probe step is the "after" point
        proc.wait()
    return run_dir


def summarize(run_dirs: list[Path], layer: int | None) -> None:
    import pandas as pd

    from workbench.compare import comparison_table

    table = comparison_table([str(d) for d in run_dirs], layer=layer)
    print(table.to_string(index=False))
    agg = comparison_table([str(d) for d in run_dirs], layer=layer, aggregate=True)
    print()
    with pd.option_context("display.width", 200):
        print(agg.to_string(index=False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--warmstart", default="runs/warmstart-tiny")
    p.add_argument("--out", default="runs/bench-methods")
    p.add_argument("--methods", nargs="+", default=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget per run")
    p.add_argument("--max-steps", type=int, default=400, help="step cap (the budget stops runs first: ~350 steps in 3 min)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-n", type=int, default=500, help="held-out questions per evaluation (500: the whole test split)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--layer", type=int, default=None)
    args = p.parse_args()
    if not (Path(args.warmstart) / "config.json").is_file():
        sys.exit(f"error: no warm start in {args.warmstart} (run: oisd warmstart --out {args.warmstart})")
    jobs = [(m, s) for s in args.seeds for m in args.methods]
    t0 = time.time()
    with ThreadPoolExecutor(args.parallel) as pool:
        run_dirs = list(pool.map(lambda ms: run_one(ms[0], ms[1], args), jobs))
    print(f"{len(jobs)} runs in {(time.time() - t0) / 60:.1f} min "
          f"({args.minutes} min budget each, {args.parallel} at a time)\n")
    summarize(run_dirs, args.layer)


if __name__ == "__main__":
    main()
