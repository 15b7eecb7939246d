"""``oisd demo``: the embedded default end to end, from nothing, with error bars.

1. warm start of the tiny preset (reused when ``runs/warmstart-tiny`` already holds one);
2. GRPO, OISD (signed and positive weights) and SDPG from that start, two seeds each
   (two runs at a time on two cores);
3. TransformerLens probing of every checkpoint, sampled splits included;
4. per method: held-out accuracy before and after (mean ± std over seeds), top1_agree
   and its correct-minus-wrong gap at the OISD layer, and, in words, whether each
   method's difference from GRPO is larger than the seed spread; ``summary.json`` in
   the root; then the command that opens the dashboard.

Every stage is reused or resumed (:func:`workbench.api.experiment`).
"""

from __future__ import annotations

import time
from pathlib import Path

from workbench.storage.atomic import atomic_write_json
from workbench.storage.paths import WARMSTART_DIR

# OISD twice: its default signed weight (w = A, as the contract reconstructs it) and the
# positive weight (w = max(A, 0): only correct responses pull the layer), whose effect on the
# OISD layer differs (docs/calibration.md). Labels name the runs.
DEMO_METHODS = ("grpo", "oisd", ("oisd-positive", "oisd", ["oisd.weight=positive"]), "sdpg")
DEMO_SEEDS = (0, 1)


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(root: str = "runs/demo", steps: int | None = None, seeds: list[int] | None = None,
             methods: list[str] | None = None, warmstart_dir: str = WARMSTART_DIR) -> dict:
    """Run the demo; returns the summary written to ``<root>/summary.json``."""
    from workbench.api import experiment
    from workbench.compare import method_summary, print_summary

    variants = {m[0]: m for m in DEMO_METHODS if not isinstance(m, str)}
    methods = [variants.get(m, m) if isinstance(m, str) else m for m in (methods or DEMO_METHODS)]
    labels = [m if isinstance(m, str) else m[0] for m in methods]
    seeds = list(DEMO_SEEDS if seeds is None else seeds)
    t0 = time.time()
    _stage(f"warm start, then {', '.join(labels)} x seeds {', '.join(map(str, seeds))}, then probing")
    exp = experiment(root, methods, seeds, warmstart=warmstart_dir,
                     overrides=[f"steps={steps}"] if steps else [])
    print("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in exp.seconds.items()))

    _stage("comparison")
    summary = method_summary(exp.run_dirs)
    summary["seconds"] = {k: round(v, 1) for k, v in exp.seconds.items()}
    print_summary(summary)
    path = Path(root) / "summary.json"
    atomic_write_json(path, summary)
    minutes = (time.time() - t0) / 60
    print(f"\ndemo finished in {minutes:.1f} min; {path} holds these figures. Open the dashboard on these runs:\n"
          f"  oisd dashboard {root}\n(it prints the address to browse)")
    return summary
