"""``oisd demo``: the embedded default end to end, from nothing, with error bars.

1. warm start of the tiny preset (reused when ``runs/warmstart-tiny`` already holds one), or
   one warm start per seed of ``--warmstart-seeds`` (``runs/warmstart-tiny-ws<s>``), the
   stand-in for another machine: a different CPU moves the warm start as a different seed does;
2. GRPO, OISD (signed and positive weights) and SDPG from each start, two seeds each
   (two runs at a time on two cores);
3. TransformerLens probing of every checkpoint, sampled splits included, with the causal
   analyses at the OISD layer: early exit, the learned-lens control, activation patching
   from the start model (docs/metrics.md);
4. per method: held-out accuracy before and after (mean ± std over every run), top1_agree
   and its correct-minus-wrong gap at the OISD layer, the causal read-outs, the gain from
   each warm start, and, in words, whether each method's difference from GRPO is larger than
   the spread, pooled and from each warm start alone; ``summary.json`` in the root; then the
   command that opens the dashboard.

Every stage is reused or resumed (:func:`workbench.api.experiment`).
"""

from __future__ import annotations

import time
from pathlib import Path

from workbench.storage.atomic import atomic_write_json
from workbench.storage.paths import WARMSTART_DIR, warmstart_folder

#: Every variant the demo and ``benchmarks/bench_methods.py`` compare: a method (its bundled
#: config, ``trainer.methods.MethodSpec.config``) or ``(label, config, overrides)``. OISD twice:
#: its default signed weight (w = A, as the contract reconstructs it) and the positive weight
#: (w = max(A, 0): only correct responses pull the layer), whose effect on the OISD layer
#: differs (docs/calibration.md). Labels name the runs.
VARIANTS: tuple = ("grpo", "oisd", ("oisd-positive", "oisd", ["oisd.weight=positive"]), "sdpg", "rlsd")
DEMO_METHODS = ("grpo", "oisd", "oisd-positive", "sdpg")
DEMO_SEEDS = (0, 1)
#: The analyzer's options in the demo: the causal analyses at every exit layer, the learned
#: lens and patching from the start model.
DEMO_PROBE = {"exit": True, "learned_lens": True, "patch": True}
#: The demo's runs also exit early in their built-in probes (the final layer is always one),
#: so that step 0, the start model, has its exit accuracy: the "before" of the table.
DEMO_OVERRIDES = ("probe.exit_layers=[0.25,0.5,0.75]",)


def label_of(entry) -> str:
    """The label of a :data:`VARIANTS` entry (a method's name, or a variant's label)."""
    return entry if isinstance(entry, str) else entry[0]


def variant(label: str):
    """What :func:`workbench.api.experiment` takes for ``label``: the :data:`VARIANTS` entry of
    that label, anything else (a method or bundled config name) as is."""
    return next((entry for entry in VARIANTS if label_of(entry) == label), label)


def run_experiments(root: str | Path, labels, seeds, *, warmstart_dir: str | Path = WARMSTART_DIR,
                    warmstart_seeds=None, overrides=(), **options) -> tuple[list[Path], dict[str, float]]:
    """Train and probe ``labels`` x ``seeds`` from one warm start (``warmstart_seeds`` None: the
    folder ``warmstart_dir``, runs ``<label>-seed<k>``) or from one per warm-start seed
    (``<warmstart_dir>-ws<s>``, runs ``<label>-ws<s>-seed<k>``), all under ``root``.
    Returns the run folders and the seconds per stage, summed over the warm starts."""
    from workbench.api import experiment

    methods = [variant(m) for m in labels]
    run_dirs, seconds = [], {}
    for start in (None,) if warmstart_seeds is None else list(warmstart_seeds):
        if start is not None:
            print(f"--- from warm start seed {start} ---", flush=True)
        exp = experiment(root, methods, list(seeds), warmstart=warmstart_folder(warmstart_dir, start),
                         overrides=list(overrides), warmstart_seed=start, **options)
        run_dirs += exp.run_dirs
        for stage, s in exp.seconds.items():
            seconds[stage] = seconds.get(stage, 0.0) + s
    return run_dirs, seconds


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(root: str = "runs/demo", steps: int | None = None, seeds: list[int] | None = None,
             methods: list[str] | None = None, warmstart_dir: str = WARMSTART_DIR,
             warmstart_seeds: list[int] | None = None) -> dict:
    """Run the demo; returns the summary written to ``<root>/summary.json``."""
    from workbench.compare import method_summary, print_summary

    labels = list(methods or DEMO_METHODS)
    seeds = list(DEMO_SEEDS if seeds is None else seeds)
    t0 = time.time()
    starts = "" if warmstart_seeds is None else f" from warm starts {', '.join(map(str, warmstart_seeds))}"
    _stage(f"warm start, then {', '.join(labels)} x seeds {', '.join(map(str, seeds))}{starts}, then probing")
    run_dirs, seconds = run_experiments(root, labels, seeds, warmstart_dir=warmstart_dir,
                                        warmstart_seeds=warmstart_seeds,
                                        overrides=[*DEMO_OVERRIDES, *([f"steps={steps}"] if steps else [])],
                                        probe_options=DEMO_PROBE)
    print("stage times: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))

    _stage("comparison")
    summary = method_summary(run_dirs)
    summary["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    print_summary(summary)
    path = Path(root) / "summary.json"
    atomic_write_json(path, summary)
    minutes = (time.time() - t0) / 60
    print(f"\ndemo finished in {minutes:.1f} min; {path} holds these figures. Open the dashboard on these runs:\n"
          f"  oisd dashboard {root}\n(it prints the address to browse)")
    return summary
