"""``oisd demo``: the embedded default end to end, from nothing.

1. warm start of the tiny preset (reused when ``runs/warmstart-tiny`` already holds one);
2. short runs of GRPO, OISD and SDPG from that start with the same seed;
3. TransformerLens probing of every checkpoint;
4. a comparison table (accuracy before and after, entropy, top1_agree and
   attn_js_final at the OISD layer), then the command that opens the dashboard.

Every stage is resumable: a finished run is reused, an interrupted one resumes from
its newest checkpoint, an analysed checkpoint is skipped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)

CONFIG_OF = {"sdpg": "sdpg-ufkl"}  # method name -> bundled config
DEMO_STEPS = 40


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(root: str = "runs/demo", steps: int | None = None, seed: int = 0,
             methods: list[str] | None = None, warmstart_dir: str = "runs/warmstart-tiny") -> list[Path]:
    from trainer.loop import train
    from trainer.warmstart import WarmstartConfig, run_warmstart
    from workbench.analyzer import probe_run
    from workbench.compare import print_comparison
    from trainer.config import load_config
    from workbench.runstore import Run

    methods = methods or ["grpo", "oisd", "sdpg"]
    steps = steps or DEMO_STEPS
    t0 = time.time()
    root_p = Path(root)
    ws = Path(warmstart_dir)
    # Validate every config before the first minute of work is spent.
    configs = {}
    for m in methods:
        name = CONFIG_OF.get(m, m)
        run_dir = root_p / f"{name}-seed{seed}"
        configs[m] = load_config(name, [f"model.path={ws}", f"steps={steps}", f"seed={seed}",
                                        f"run_dir={run_dir}", f"checkpoint_every={max(1, steps // 4)}",
                                        f"probe_every={max(1, steps // 4)}", f"eval_every={max(1, steps // 2)}"])

    _stage(f"1/4 warm start ({ws})")
    if (ws / "warmstart.json").is_file():
        figures = json.loads((ws / "warmstart.json").read_text())
        print(f"reusing the warm start in {ws}: held-out accuracy {figures['heldout_accuracy']:.1%} "
              f"(student), {figures['heldout_accuracy_with_hint']:.1%} (with the hint)")
    else:
        run_warmstart(WarmstartConfig(out=str(ws), seed=seed))

    _stage(f"2/4 training {', '.join(methods)} for {steps} steps each")
    run_dirs = []
    for m, cfg in configs.items():
        run_dir = cfg.resolved_run_dir()
        run_dirs.append(run_dir)
        status = None
        if (run_dir / "run.json").is_file():
            try:
                status = Run.open(run_dir).status
            except WorkbenchError:
                status = None
        if status == "finished":
            print(f"{m}: {run_dir} already finished; reusing it")
            continue
        print(f"{m}: training into {run_dir}", flush=True)
        train(cfg, resume=(run_dir / "run.json").is_file())

    _stage("3/4 probing checkpoints with TransformerLens")
    for run_dir in run_dirs:
        report = probe_run(run_dir)
        print(report)

    _stage("4/4 comparison")
    print_comparison([str(d) for d in run_dirs])
    minutes = (time.time() - t0) / 60
    print(f"\ndemo finished in {minutes:.1f} min. Open the dashboard on these runs with:\n"
          f"  oisd dashboard {root_p}\n(then browse http://127.0.0.1:8501)")
    return run_dirs
