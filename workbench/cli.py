"""The ``oisd`` command line.

Subcommands (fixed spellings, docs/design.md, section "CLI"):
``warmstart | train | probe | dashboard | demo | compare | eval``.

Heavy imports (torch, transformers) happen inside each command so ``--help`` is instant.
A :class:`~workbench.errors.WorkbenchError` anywhere becomes ``error: <one line>`` on
stderr and exit status 2; nothing is half-written because every write is atomic.
"""

from __future__ import annotations

import argparse
import logging
import sys

from workbench import __version__
from workbench.errors import ConfigError, WorkbenchError
from workbench.storage.paths import WARMSTART_DIR
from workbench.storage.schema import DEFAULT_PROBE_MAX_NEW_TOKENS

EPILOG = "Docs: README.md. Every subcommand has --help."


def _cmd_warmstart(args: argparse.Namespace) -> int:
    from trainer.warmstart import WarmstartConfig, run_warmstart

    cfg = WarmstartConfig.from_args(args)
    run_warmstart(cfg)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import describe_config, load_config

    if args.help_config:
        print("\n".join(describe_config()))
        return 0
    # --run-dir and --backend are config keys: validated (one line naming the key) like any --set.
    flags = [f"run_dir={args.run_dir}"] * bool(args.run_dir) + [f"backend={args.backend}"] * bool(args.backend)
    cfg = load_config(args.config, [*args.set, *flags])
    from trainer.run import train

    train(cfg, resume=args.resume)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from workbench.analysis.external import (
        check_inputs,
        check_probe_args,
        load_prompts,
        plan_analysis_folder,
        reference_note,
        write_analysis_folder,
    )

    from workbench.analysis.processes import default_device, processes

    # Under accelerate launch / torchrun the checkpoints are spread over the processes, each on
    # its own device (workbench.analysis.processes); on one process this is process 0 of 1.
    procs = processes()
    if args.device_map is not None and (args.device or procs.world > 1):
        raise ConfigError("--device-map places each model itself: not with --device, nor with several processes "
                          "(each of which would spread its own copy over the same devices)")
    _device_map(args.device_map)  # checked before anything is written
    device = args.device or default_device(procs.local_rank)
    # Every argument, input, prompt and tokenizer is checked before anything is written.
    check_probe_args(max_new_tokens=args.max_new_tokens, detail_prompts=args.detail_prompts,
                     n_prompts=args.n_prompts, dtype=args.dtype, device=device)
    sources = check_inputs(args.paths, args.out)
    if args.base is not None:  # the start weights drift is measured from: a model folder
        from workbench.models.loading import require_model_folder

        require_model_folder(args.base)
    external = [s for s in sources if s.kind != "run"]
    if not external and (args.prompts or args.chat_template):
        flag = "--prompts" if args.prompts else "--chat-template"
        raise ConfigError(f"{flag} applies to inputs that are not run folders; "
                          "a run folder is probed with its own probe set")
    plans = {}
    if external:
        if args.prompts:
            prompts = load_prompts(args.prompts)
        else:  # the embedded task's held-out questions with their references
            from trainer.tasks import ArithmeticTask

            examples = ArithmeticTask().test_examples()
            if args.n_prompts > len(examples):
                raise ConfigError(f"--n-prompts {args.n_prompts} exceeds the embedded task's "
                                  f"{len(examples)} held-out questions")
            prompts = [{"prompt": e.prompt, "reference": e.reference} for e in examples[: args.n_prompts]]
        length = args.max_new_tokens or DEFAULT_PROBE_MAX_NEW_TOKENS
        plans = {id(s): plan_analysis_folder(s, args.out, prompts, chat_template=args.chat_template,
                                             max_new_tokens=length, base=args.base) for s in external}
        note = reference_note(prompts)
        if note and procs.main:
            print(note)
        if procs.main:  # an analysis folder's run.json and probe set: once, before anyone probes
            for source in external:
                write_analysis_folder(plans[id(source)])
        procs.barrier()

    from workbench.analysis.analyzer import probe_run

    failed = 0
    reports = []
    for source in sources:
        if source.kind == "run":
            folder, length = source.path, args.max_new_tokens
        else:
            plan = plans[id(source)]
            folder, length = plan.folder, plan.max_new_tokens
        reports.append(probe_run(folder, device=device, dtype=args.dtype, force=args.force,
                                 detail_prompts=args.detail_prompts, max_new_tokens=length, base=args.base,
                                 exit=args.exit or bool(args.exit_layers), exit_layers=args.exit_layers,
                                 learned_lens=args.learned_lens, patch=args.patch, processes=procs,
                                 device_map=_device_map(args.device_map)))
    if procs.world > 1:  # every process's report, printed once by process 0
        import torch.distributed as dist

        gathered = [None] * procs.world
        procs.barrier()
        dist.all_gather_object(gathered, reports)
        reports = [r.merged(others) for r, *others in zip(*gathered)]
        procs.close()
        if not procs.main:
            return 1 if any(r.skipped for r in reports) else 0
    for report in reports:
        print(report)
        failed += len(report.skipped)
    if failed:  # a checkpoint that could not be analysed is a failure, said in the last line
        print(f"error: {failed} checkpoint(s) could not be analysed (see the reasons above)", file=sys.stderr)
        return 1
    if external:
        print(f"analysis folders in {args.out}; browse them with: oisd dashboard {args.out}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from app.launch import DEFAULT_HOST, DEFAULT_PORT, launch

    return launch(args.runs_root, host=args.host or DEFAULT_HOST, port=args.port or DEFAULT_PORT,
                  headless=args.headless)


def _cmd_demo(args: argparse.Namespace) -> int:
    from trainer.demo import run_demo

    run_demo(root=args.root, steps=args.steps, seeds=args.seeds, methods=args.methods,
             warmstart_seeds=args.warmstart_seeds)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from workbench.compare import print_comparison

    print_comparison(args.run_dirs, layer=args.layer)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate_cli

    evaluate_cli(args)
    return 0


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(text: str | None) -> str | dict | None:
    """``--device-map``: one of HF's named strategies or a JSON object of module -> device.

    Raises:
        ConfigError: anything else (one line).
    """
    if text is None or text in DEVICE_MAPS:
        return text
    import json

    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ConfigError(f"--device-map {text}: use one of {', '.join(DEVICE_MAPS)} or a JSON object of "
                          'module -> device, e.g. \'{"": "cpu"}\'')
    return value


def _layer(text: str) -> int | float:
    """A layer argument: a block index (``6``) or a depth fraction (``0.25``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a block index or a depth fraction") from None
    return int(value) if value.is_integer() and value >= 1 else value


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors: ``error: <what>; see <prog> --help``
    on stderr and exit status 2 (not a usage block, then the error)."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="oisd",
        description="Workbench for RL post-training with intermediate-layer self-distillation: "
        "train (GRPO + OISD/SDPG/RLSD/OPSD), probe checkpoints with TransformerLens, browse results.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("warmstart", help="supervised warm start of a preset model on the embedded task",
                       description="Supervised warm start on the embedded arithmetic task, with a share of "
                       "hinted (privileged-context) examples. Writes an HF folder (safetensors + tokenizer).")
    p.add_argument("--preset", default="tiny", help="model preset: tiny | small (default tiny)")
    p.add_argument("--out", default=WARMSTART_DIR, help="output model folder")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's budget)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--hint-fraction", type=float, default=None, help="share of hinted examples")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="task knob, e.g. --set digits=2 (n_operands, digits, operators)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    p.set_defaults(func=_cmd_warmstart)

    p = sub.add_parser("train", help="RL training (GRPO + self-distillation) with built-in probes",
                       description="Train with one config-driven loop for every method. "
                       "See `oisd train --help-config` for every key.")
    p.add_argument("--config", default=None, help="YAML file or bundled config name (grpo, oisd, sdpg-ufkl, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set oisd.lambda_attn=0.2 (repeatable)")
    p.add_argument("--run-dir", default=None, help="run folder (overrides run_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--backend", default=None,
                   help="trainer (overrides `backend`; --help-config lists the choices): the built-in loop or TRL's "
                   "GRPOTrainer")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("probe", help="TransformerLens analysis of checkpoints (runs, model folders, trainer outputs)",
                       description="Probe every checkpoint of each PATH (incremental). PATH is a run folder "
                       "(analysed in place), an HF model folder or hub name, a TRL / HF Trainer output dir "
                       "(checkpoint-N/), or a verl checkpoint dir (global_step_N/actor/huggingface); the "
                       "last three are written to analysis folders under --out.")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--out", default=None, help="folder for the analysis folders of non-run inputs")
    p.add_argument("--prompts", default=None,
                   help="JSONL with 'prompt' and optional 'reference' (default: the embedded task's held-out questions)")
    p.add_argument("--n-prompts", type=int, default=16, help="embedded-task prompts when --prompts is not given")
    p.add_argument("--chat-template", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    p.add_argument("--device", default=None,
                   help="torch device (default: the process's GPU where there is CUDA, else cpu); under accelerate "
                        "launch / torchrun the checkpoints are spread over the processes")
    p.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread each model over several devices, for a model larger than one: auto, balanced, "
                        "balanced_low_0, sequential, or a JSON object of module -> device (HF's device_map); "
                        "not with --device, nor with several processes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--force", action="store_true", help="re-analyse checkpoints already analysed")
    p.add_argument("--detail-prompts", type=int, default=4, help="probe prompts kept in per-prompt detail")
    p.add_argument("--base", default=None,
                   help="the start model: weight drift is measured from it, and LoRA adapter checkpoints are "
                        "merged onto it (default: the run's start model, the adapters' base_model_name_or_path, "
                        "else the first checkpoint)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy completion length (default: a run's own; "
                   f"{DEFAULT_PROBE_MAX_NEW_TOKENS} for other inputs)")
    p.add_argument("--exit", action="store_true",
                   help="early exit: task accuracy of greedy decoding from block l through the final norm and head "
                        "(exit_accuracy, exit_agree, exit_length); one greedy decode per exit layer")
    p.add_argument("--exit-layers", nargs="+", type=_layer, default=None, metavar="L",
                   help="exit layers: blocks 1..L or depth fractions (default: every layer up to 8 blocks, else the "
                        "OISD layers, the quarters and L); implies --exit")
    p.add_argument("--learned-lens", action="store_true",
                   help="the learned-lens control: the lens metrics through an affine map fitted per layer "
                        "(lens 'affine', analysis/step-N-lens.parquet)")
    p.add_argument("--patch", action="store_true",
                   help="activation patching from the start model (--base) to each checkpoint, per layer and "
                        "component (block, attn, mlp): analysis/step-N-patch.parquet")
    p.set_defaults(func=_cmd_probe)

    p = sub.add_parser("dashboard", help="browse runs in a Streamlit web app",
                       description="Start the dashboard over RUNS_ROOT (read-only).")
    p.add_argument("runs_root", nargs="?", default="runs", metavar="RUNS_ROOT")
    p.add_argument("--host", default=None, help="bind address (default: this machine only, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="TCP port (default: Streamlit's own)")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    p.set_defaults(func=_cmd_dashboard)

    p = sub.add_parser("demo", help="the embedded default end to end",
                       description="Warm start (reused), GRPO / OISD (signed and positive) / SDPG runs from the same "
                       "start with two seeds each, probing, a per-method table with the seed spread (summary.json), "
                       "and the dashboard command.")
    p.add_argument("--root", default="runs/demo", help="folder for the demo's runs")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds per method (default 0 1)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods or bundled configs to compare (default: grpo oisd oisd-positive sdpg)")
    p.add_argument("--warmstart-seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="one warm start per seed (runs/warmstart-tiny-ws<s>), every method and seed from each, "
                        "the verdicts also from each start alone (default: the one warm start runs/warmstart-tiny)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("compare", help="comparison table of runs",
                       description="Accuracy before/after, entropy, top1_agree and attn_js_final at the OISD layer.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--layer", type=int, default=None, help="layer to report (default: the OISD layer)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("eval", help="held-out evaluation of a checkpoint",
                       description="Greedy accuracy and mean@k of CHECKPOINT_DIR on the held-out task or a data file.")
    p.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR")
    p.add_argument("--data", default=None, help="JSONL/Parquet file (default: the embedded held-out task)")
    p.add_argument("--question-column", default="question")
    p.add_argument("--answer-column", default="answer")
    p.add_argument("--n", type=int, default=200, help="questions")
    p.add_argument("--k", type=int, default=4, help="samples per question for mean@k")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task knob")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
