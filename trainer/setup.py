"""Everything a run needs, validated before any work starts.

Each check below fails with a one-line :class:`~workbench.errors.WorkbenchError`
naming the problem: a layer that does not exist, a method that needs a hint on data
without one, a batch that does not divide into groups or processes, a model folder
that is not one, a run folder that already holds a run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.tasks.base import Task
from workbench.errors import ConfigError, DataError
from workbench.storage.paths import is_run_folder

log = logging.getLogger(__name__)


@dataclass
class TrainSetup:
    """Everything :func:`prepare` validated and loaded, for either backend."""

    accelerator: object  # accelerate.Accelerator
    model: torch.nn.Module  # the policy (trainable)
    tokenizer: object
    reference: torch.nn.Module | None  # frozen initial model, only when a term uses it
    task: Task
    num_layers: int  # L, decoder blocks
    oisd_layers: list[int]  # S, resolved block indices (empty unless OISD is on)
    run_dir: Path
    probe_records: list[dict]  # the fixed probe set (workbench.analysis.probe_runner.make_probe_set)
    exit_layers: list[int] = field(default_factory=list)  # probe.exit_layers resolved (empty: no early exit)


def resolve_layers(spec: list, num_layers: int, key: str = "oisd.layers") -> list[int]:
    """Block indices (1..L-1) or depth fractions in (0, 1) -> sorted unique block indices.

    A fraction f picks block ``round(f * L)`` clamped to 1..L-1 (0.5 of 4 blocks = block 2).
    The final layer L is the teacher and cannot be selected.
    """
    out = []
    for x in spec:
        if isinstance(x, float):
            out.append(min(max(1, round(x * num_layers)), num_layers - 1))
        elif 1 <= x <= num_layers - 1:
            out.append(int(x))
        else:
            raise ConfigError(
                f"config key '{key}': layer {x} does not exist or is the final layer "
                f"(the model has {num_layers} blocks; choose 1..{num_layers - 1})"
            )
    return sorted(set(out))


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (TRL's ``disable_dropout``).

    RL scores the sampled tokens with the policy in train mode; with dropout on, the
    log-probs of the loss differ from those of the sampler, so the ratio and every KL
    are noisy even at the first step (on a GPT-2 folder: a ref KL of 1.00175 instead of 1).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key, value in list(vars(module).items()):  # e.g. Qwen3/Llama attention's float `attention_dropout`
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)
    for key, value in list(model.config.to_dict().items()):
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            setattr(model.config, key, 0.0)


def build_task(cfg: TrainConfig) -> Task:
    """The embedded arithmetic task, or a data file with math-verify answers."""
    d = cfg.data
    if d.path is None:
        from trainer.tasks import ArithmeticTask

        a = d.arithmetic
        return ArithmeticTask(n_operands=a.n_operands, digits=a.digits, operators=a.operators,
                              n_train=a.n_train, n_test=a.n_test, seed=a.seed)
    import random

    from trainer.data import MathVerifyTask, load_examples

    kw = dict(question_column=d.question_column, answer_column=d.answer_column,
              solution_column=d.solution_column, split=d.split)
    train = load_examples(d.path, limit=d.limit, **kw)
    if d.test_path:
        test = load_examples(d.test_path, **kw)
    else:
        order = list(range(len(train)))
        random.Random(d.arithmetic.seed).shuffle(order)
        n_test = max(1, int(len(train) * d.test_fraction))
        if len(train) - n_test < 1:
            raise DataError(f"data file '{d.path}' has {len(train)} rows: too few to split off a test set")
        test = [train[i] for i in order[:n_test]]
        train = [train[i] for i in order[n_test:]]
    return MathVerifyTask(train=train, test=test)


def check_batch(cfg: TrainConfig, num_processes: int) -> None:
    """The step's batch must split into whole groups: over processes, then mini-batches.

    Each process holds ``prompts_per_step / num_processes`` groups of G sequences,
    and each of its ``optim.mini_batches`` optimizer updates uses the same number of
    whole groups. (``micro_batch_size`` needs no check: micro-batches only
    accumulate gradients, a ragged last one included.)
    """
    P, n_mb = cfg.rollout.prompts_per_step, cfg.optim.mini_batches
    if P % num_processes:
        raise ConfigError(
            f"config key 'rollout.prompts_per_step': {P} prompts do not divide over {num_processes} processes "
            "(each process must hold whole groups)"
        )
    groups = P // num_processes
    if groups % n_mb:
        G = cfg.rollout.group_size
        raise ConfigError(
            f"config key 'optim.mini_batches': {groups} groups of {G} per process do not divide into "
            f"{n_mb} mini-batches of whole groups"
        )


def prepare(cfg: TrainConfig, *, resume: bool = False) -> TrainSetup:
    """Validate the config against the model and data, then load them. No run files are
    written here; a failed check leaves nothing behind."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from workbench.analysis.early_exit import resolve_exit_layers
    from workbench.analysis.probe_runner import make_probe_set
    from workbench.models.loading import load_model_and_tokenizer, load_model_config

    hf_cfg = load_model_config(cfg.model.path)  # cheap: the folder is checked first
    L = int(hf_cfg.num_hidden_layers)
    spec = cfg.spec
    oisd_layers = resolve_layers(cfg.oisd.layers, L) if spec.oisd else []
    exit_layers = (resolve_exit_layers(cfg.probe.exit_layers, L, oisd_layers, key="probe.exit_layers")
                   if cfg.probe.exit_layers else [])
    accelerator = Accelerator(mixed_precision=cfg.precision.mixed, cpu=not torch.cuda.is_available())
    check_batch(cfg, accelerator.num_processes)
    task = build_task(cfg)
    train_examples = task.train_examples()
    if not train_examples:
        raise DataError("no training examples")
    if spec.needs_solution and not any(e.solution for e in train_examples):
        raise ConfigError(
            f"method '{cfg.method}' needs reference solutions as the teacher's privileged context, but the data has "
            "none (set data.solution_column)"
        )
    if spec.needs_hint and not all(e.answer for e in train_examples):
        raise ConfigError(f"method '{cfg.method}' needs a hint (the reference answer), but some examples have none")
    n_test = len(task.test_examples())
    if cfg.probe.n_prompts > n_test:
        raise ConfigError(f"config key 'probe.n_prompts': {cfg.probe.n_prompts} probe prompts exceed the "
                          f"{n_test} held-out examples")

    run_dir = cfg.resolved_run_dir()
    if not resume and is_run_folder(run_dir):
        raise ConfigError(f"run folder '{run_dir}' already holds a run (use --resume, or another --run-dir)")
    if resume and not is_run_folder(run_dir):
        log.warning("--resume: '%s' holds no run yet; starting a new one", run_dir)
    # Every process has looked at the run folder before the main one creates run.json.
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(
        cfg.model.path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation
    )
    if cfg.model.disable_dropout:
        disable_dropout(model)
    model.to(accelerator.device)
    model.config.use_cache = False
    probe_records = make_probe_set(task.test_examples(), tokenizer, cfg.probe.n_prompts)
    reference = None
    if spec.needs_reference(cfg):
        reference, _ = load_model_and_tokenizer(cfg.model.path, dtype=cfg.model.dtype,
                                                attn_implementation=cfg.model.attn_implementation)
        reference.to(accelerator.device).eval().requires_grad_(False)
    return TrainSetup(accelerator, model, tokenizer, reference, task, L, oisd_layers, run_dir, probe_records,
                      exit_layers)
