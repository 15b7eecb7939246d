"""Cost of logging one probe step late in a long run: per-step files against one table.

The built-in probes of one step at Qwen3-4B's shape (36 layers x 32 heads, 4 splits: the
rows ``ProbeResult.to_frame`` makes, about 21k) are logged at step 1 and at step 200 of a
run that already holds the earlier steps, two ways side by side:

- ``parts``: ``RunWriter.log_probes``, one ``probes/step-NNNNNN.parquet`` per step, merged
  into a segment file every ``SEGMENT_STEPS`` (32) steps so that readers open few files;
- ``one table``: the earlier layout, read the whole ``probes.parquet``, append, rewrite.

Prints the seconds of each and the step-200 / step-1 ratio (1.0 = the cost does not grow);
for ``parts`` also the mean over every step and the slowest step (a merge).

    python benchmarks/bench_probe_log.py [--steps 200] [--layers 36] [--heads 32]
    python benchmarks/bench_probe_log.py --smoke   # 34 steps of 2 layers x 2 heads (one merge)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.storage.atomic import atomic_write_parquet  # noqa: E402
from workbench.measures.probing import LENS_STAT_NAMES, ProbeResult  # noqa: E402
from workbench.storage.runwriter import RunWriter  # noqa: E402
from workbench.storage.schema import SPLITS  # noqa: E402


def step_rows(step: int, layers: int, heads: int) -> pd.DataFrame:
    rng = np.random.default_rng(step)
    result = ProbeResult(
        n_layers=layers, n_positions=100, lens={m: rng.random(layers) for m in LENS_STAT_NAMES},
        prediction_depth=3.0, n_heads=heads, attn_js=rng.random((layers, layers)),
        attn_js_final_per_head=rng.random((layers, heads)), attn_entropy=rng.random((layers, heads)),
        bos_mass=rng.random((layers, heads)), attn_head_match=rng.random(layers),
        attn_head_identity=rng.random(layers), head_perm=np.tile(np.arange(heads), (layers, 1)))
    return pd.concat([result.to_frame("bench", step, split, "probe") for split in SPLITS], ignore_index=True)


def one_table(path: Path, rows: pd.DataFrame) -> None:
    """The layout before per-step files: read-modify-write of one table."""
    new = pd.concat([pd.read_parquet(path), rows], ignore_index=True) if path.exists() else rows
    atomic_write_parquet(path, new)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--smoke", action="store_true",
                        help="34 steps of 2 layers x 2 heads (one merge included): checks the code runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.layers, args.heads = 34, 2, 2
    rows = step_rows(1, args.layers, args.heads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        writer = RunWriter(Path(tmp) / "parts", {"method": "bench"}, resume=False)
        table = Path(tmp) / "one" / "probes.parquet"
        table.parent.mkdir()
        first_parts = timed(lambda: writer.log_probes(rows))
        first_table = timed(lambda: one_table(table, rows))
        every_step = [first_parts]
        for step in range(2, args.steps):  # the run so far (the one table untimed)
            later = rows.assign(step=step)
            every_step.append(timed(lambda: writer.log_probes(later)))
            one_table(table, later)
        last = rows.assign(step=args.steps)
        last_parts = timed(lambda: writer.log_probes(last))
        every_step.append(last_parts)
        last_table = timed(lambda: one_table(table, last))
        results = {"rows_per_step": len(rows), "steps": args.steps,
                   "parts": {"step_1_s": first_parts, f"step_{args.steps}_s": last_parts,
                             "ratio": last_parts / first_parts, "mean_s": float(np.mean(every_step)),
                             "max_s": float(np.max(every_step)),
                             "files": sum(1 for _ in (Path(tmp) / "parts" / "probes").iterdir())},
                   "one_table": {"step_1_s": first_table, f"step_{args.steps}_s": last_table,
                                 "ratio": last_table / first_table}}
    print(f"{len(rows)} probe rows per step ({args.layers} layers x {args.heads} heads, {len(SPLITS)} splits)")
    print(f"{'layout':<12} {'step 1 (s)':>11} {f'step {args.steps} (s)':>13} {'ratio':>7}")
    for name in ("parts", "one_table"):
        r = results[name]
        print(f"{name:<12} {r['step_1_s']:>11.5f} {r[f'step_{args.steps}_s']:>13.5f} {r['ratio']:>7.2f}")
    p = results["parts"]
    print(f"parts: mean {p['mean_s']:.4f} s per step, slowest {p['max_s']:.4f} s (the merges included), "
          f"{p['files']} files for {args.steps} steps")
    return results


if __name__ == "__main__":
    main()
