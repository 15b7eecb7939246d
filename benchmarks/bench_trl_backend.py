"""The TRL backend's step time: OISD and SDPG inside TRL against TRL's plain GRPO, and
against the built-in backend, on the same model, prompts and batch shape.

Every variant trains the same warm-started (or random) tiny model for ``--steps`` steps in
this process, one after the other, and each step is timed by a callback (TRL) or around
``train_step`` (built-in); the first step is dropped and medians are reported, with each
variant's ratio to TRL's plain ``GRPOTrainer``. Targets (issue): OISD <= 1.15x, SDPG <= 1.5x.

    python benchmarks/bench_trl_backend.py --steps 8 --threads 1
    python benchmarks/bench_trl_backend.py --smoke   # 2 steps of 2 prompts x 2 samples, 8 tokens

``--smoke`` is a check that the code runs, not numbers to report. Needs TRL
(``pip install 'oisd-workbench[bench]'``): without it the script exits with an error.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script from a checkout

VARIANTS = ("trl grpo (plain GRPOTrainer)", "trl backend grpo", "trl backend oisd", "trl backend sdpg",
            "built-in grpo", "built-in oisd", "built-in sdpg")
METHODS = ("grpo", "oisd", "sdpg")  # each by its bundled config
# --smoke: the bundled configs' batch (32 prompts x 8 samples of 40 tokens) made tiny.
SMOKE_BATCH = ("rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8")


def _cfg(method: str, model: str, run_dir: Path, steps: int, batch: tuple[str, ...] = ()):
    from trainer.config import load_config

    return load_config(method, [f"model.path={model}", f"run_dir={run_dir}", f"steps={steps}",
                                         "probe_every=0", "eval_every=0", f"checkpoint_every={steps}",
                                         "logging.progress=false", "sdpg.t_warm=0", "logging.grad_share_every=0",
                                         *batch])


def time_trl(method: str | None, model: str, root: Path, steps: int, batch: tuple[str, ...] = ()) -> list[float]:
    """Seconds per step of a TRL run: ``method`` None = TRL's plain GRPOTrainer."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from trainer.setup import prepare
    from trainer.trl_backend import SelfDistillGRPOTrainer, build_grpo_config

    cfg = _cfg(method or "grpo", model, root / (method or "plain"), steps, batch)
    setup = prepare(cfg)
    setup.model.config.use_cache = True
    examples = setup.task.train_examples()
    dataset = Dataset.from_list([{"prompt": e.prompt, "teacher_prompt": e.teacher_prompt, "example": i}
                                 for i, e in enumerate(examples)])

    def accuracy(prompts, completions, example, **kwargs):
        return [float(setup.task.reward(c, examples[int(i)])) for c, i in zip(completions, example)]

    args = build_grpo_config(cfg, root / "trl-out", 1)
    args.save_strategy = "no"
    kw = dict(model=setup.model, reward_funcs=[accuracy], args=args, train_dataset=dataset,
              processing_class=setup.tokenizer)
    trainer = (GRPOTrainer(**kw) if method is None
               else SelfDistillGRPOTrainer(**kw, workbench_config=cfg, reference=setup.reference))
    trainer.remove_callback(PrinterCallback)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    return times[1:]


def time_builtin(method: str, model: str, root: Path, steps: int, batch: tuple[str, ...] = ()) -> list[float]:
    from trainer.loop import Trainer
    from trainer.setup import prepare

    cfg = _cfg(method, model, root / f"builtin-{method}", steps, batch)
    tr = Trainer(cfg, prepare(cfg))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tr.train_step()
        tr.step += 1
        times.append(time.perf_counter() - start)
    return times[1:]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Time every variant; print the table; return variant -> median seconds per step."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--model", default=None, help="model folder (default: a random tiny Qwen3)")
    parser.add_argument("--smoke", action="store_true",
                        help="2 steps (1 timed) of 2 prompts x 2 samples of 8 tokens: checks the code runs")
    args = parser.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("bench_trl_backend: cannot measure: TRL is not installed (pip install 'oisd-workbench[bench]')")
    batch = SMOKE_BATCH if args.smoke else ()
    if args.smoke:
        args.steps = 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model
        if model is None:
            from transformers import AutoModelForCausalLM

            from trainer.presets import preset_config
            from trainer.tokenizer import build_char_tokenizer

            tok = build_char_tokenizer()
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(preset_config("tiny", tok)).save_pretrained(root / "model")
            tok.save_pretrained(root / "model")
            model = str(root / "model")
        results = {}
        for name in VARIANTS:
            method = name.split()[-1] if "plain" not in name else None
            if name.startswith("built-in"):
                results[name] = time_builtin(method, model, root, args.steps, batch)
            else:
                results[name] = time_trl(method, model, root, args.steps, batch)
    base = statistics.median(results[VARIANTS[0]])
    print(f"{'variant':<30} {'median step s':>14} {'x TRL GRPO':>11}")
    medians = {}
    for name, times in results.items():
        medians[name] = statistics.median(times)
        print(f"{name:<30} {medians[name]:>14.3f} {medians[name] / base:>11.2f}")
    return medians


if __name__ == "__main__":
    main()
