"""Supervised warm start of a preset model on the embedded arithmetic task.

RL needs a partly competent policy to start from, and the privileged teacher of
SDPG and RLSD (the same model, shown the hint) must be clearly better than the
student, or there is nothing to distil. So the warm start trains on a mix of
plain prompts and hinted (teacher) prompts, with the loss on the completion only,
and stops on a fixed budget that leaves room for RL: the student is only partly
right, the hinted model nearly always.

Output: an HF folder (``config.json``, ``model.safetensors``, tokenizer files,
``warmstart.json`` with the figures) written atomically, which loads with
``AutoModelForCausalLM.from_pretrained`` and ``TransformerBridge.boot_transformers``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from trainer.evaluate import evaluate
from trainer.presets import PRESETS, preset_config
from trainer.tasks import ArithmeticTask
from trainer.tokenizer import build_char_tokenizer
from workbench.errors import ConfigError
from workbench.storage.paths import WARMSTART_DIR, RunPaths

log = logging.getLogger(__name__)

# Per-preset budgets, measured on 2 CPU cores: the tiny preset's default lands the
# student in the 30-80% band with the hinted model far above it (see the tests and
# the README). `small` gets more steps because it learns more per step but starts slower.
BUDGETS = {
    "tiny": dict(steps=220, batch_size=64, lr=3e-3),
    "small": dict(steps=400, batch_size=64, lr=1e-3),
}


@dataclass
class WarmstartConfig:
    """Warm start settings (``oisd warmstart --help`` documents the flags)."""

    preset: str = "tiny"
    out: str = WARMSTART_DIR
    steps: int = 220
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # Share of hinted (privileged-context) sequences per batch. High on purpose: copying the
    # hint is learned fast, the arithmetic slowly, so the teacher ends far above the student.
    hint_fraction: float = 0.6
    seed: int = 0
    task: dict = field(default_factory=dict)  # ArithmeticTask knobs
    eval_n: int = 200
    force: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset '{self.preset}' (choose from {', '.join(PRESETS)})")
        for name in ("steps", "batch_size", "eval_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"warmstart {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"warmstart lr must be > 0, got {self.lr}")
        if not 0.0 <= self.hint_fraction <= 1.0:
            raise ConfigError(f"warmstart hint_fraction must be in [0, 1], got {self.hint_fraction}")
        allowed = {"n_operands", "digits", "operators", "n_train", "n_test", "seed"}
        unknown = set(self.task) - allowed
        if unknown:
            raise ConfigError(f"unknown task knob '{sorted(unknown)[0]}' (known: {', '.join(sorted(allowed))})")

    @classmethod
    def from_args(cls, args) -> "WarmstartConfig":
        from trainer.config import parse_overrides

        budget = BUDGETS.get(args.preset, {})
        pick = lambda name: getattr(args, name) if getattr(args, name) is not None else budget.get(name)  # noqa: E731
        kw = dict(preset=args.preset, out=args.out, seed=args.seed, task=parse_overrides(args.set), force=args.force)
        for name in ("steps", "batch_size", "lr"):
            if pick(name) is not None:
                kw[name] = pick(name)
        if args.hint_fraction is not None:
            kw["hint_fraction"] = args.hint_fraction
        return cls(**kw)


def make_sft_batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded (prompt + completion + EOS) sequences, labels on the completion only.

    Args:
        pairs: ``(prompt, completion)`` strings.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` of shape ``(B, T)``; labels are
        -100 on the prompt and padding, so the loss is the completion's NLL.
    """
    rows, labels = [], []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))  # cosine to 10%

    return f


def run_warmstart(cfg: WarmstartConfig) -> dict:
    """Train, evaluate (student and hinted), save; returns the figures written to warmstart.json."""
    from transformers import AutoModelForCausalLM

    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        if RunPaths(out).warmstart.is_file():
            raise ConfigError(f"'{out}' already holds a warm start (use --force to overwrite)")
        if any(out.iterdir()):
            raise ConfigError(f"output folder '{out}' exists and is not empty (use --force to overwrite)")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    task = ArithmeticTask(**cfg.task)
    train, test = task.train_examples(), task.test_examples()
    tokenizer = build_char_tokenizer()
    model = AutoModelForCausalLM.from_config(preset_config(cfg.preset, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("warm start: preset %s (%.2fM parameters), %d steps x %d sequences, %d%% hinted",
             cfg.preset, n_params / 1e6, cfg.steps, cfg.batch_size, round(100 * cfg.hint_fraction))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    model.train()
    t0 = time.time()
    first_loss, ema = None, None
    bar = tqdm(range(cfg.steps), desc="warm start", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        exs = [train[rng.randrange(len(train))] for _ in range(cfg.batch_size)]
        pairs = [((e.teacher_prompt if rng.random() < cfg.hint_fraction else e.prompt), e.reference) for e in exs]
        batch = make_sft_batch(tokenizer, pairs)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        if step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    train_time = time.time() - t0

    eval_set = test[: cfg.eval_n]
    student = evaluate(model, tokenizer, task, eval_set)
    teacher = evaluate(model, tokenizer, task, eval_set, hint=True)
    figures = {
        "preset": cfg.preset,
        "parameters": n_params,
        "first_loss": first_loss,
        "final_loss": ema,
        "train_seconds": round(train_time, 1),
        "heldout_accuracy": student.accuracy,
        "heldout_accuracy_with_hint": teacher.accuracy,
        "eval_n": len(eval_set),
        "config": asdict(cfg),
        "task": repr(task),
    }
    _save_atomically(model, tokenizer, out, figures, force=cfg.force)
    print(f"warm start done in {train_time:.0f}s: loss {first_loss:.3f} -> {ema:.3f}")
    print(f"held-out greedy accuracy: {student.accuracy:.1%} (student)  "
          f"{teacher.accuracy:.1%} (with the privileged hint), n={len(eval_set)}")
    print(f"saved to {out}. Next: oisd train --config oisd --set model.path={out}")
    return figures


def _save_atomically(model, tokenizer, out: Path, figures: dict, *, force: bool) -> None:
    """Write into a sibling temp folder, then swap it in, so a kill never leaves half a model."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{random.getrandbits(32):08x}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    RunPaths(tmp).warmstart.write_text(json.dumps(figures, indent=2))
    if out.exists():
        if not force:
            shutil.rmtree(tmp)
            raise ConfigError(f"'{out}' appeared while training; not overwriting (use --force)")
        old = out.parent / f".old-{out.name}-{random.getrandbits(32):08x}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
