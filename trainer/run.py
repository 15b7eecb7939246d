"""``train(cfg)``: validate, then hand the run to its backend.

Two backends write the same run folder (:mod:`trainer.recorder`) with the same loss
(:class:`trainer.loss.LossComputer`): the built-in loop (:mod:`trainer.loop`, ``backend:
builtin``) and TRL's ``GRPOTrainer`` (:mod:`trainer.trl_backend`, ``backend: trl``). Neither
imports the other; this module picks one.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from trainer.config import BACKENDS, SHARDING_BACKENDS, TrainConfig
from trainer.distributed import close_processes
from workbench.errors import ConfigError

#: The environment ``accelerate launch`` sets for a sharded launch -> its name.
SHARDED_LAUNCHES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_FSDP": "FSDP"}


def sharded_launch() -> str | None:
    """``"DeepSpeed"`` or ``"FSDP"`` when ``accelerate launch`` was asked to shard, else None."""
    for key, name in SHARDED_LAUNCHES.items():
        if os.environ.get(key, "").lower() in ("1", "true", "yes"):
            return name
    return None


def train(cfg: TrainConfig, *, resume: bool = False) -> Path:
    """Run ``cfg`` to completion (or resume it); returns the run folder.

    Everything is validated (:func:`trainer.setup.prepare`) before the run folder is
    created. With ``resume``, training continues from the newest complete checkpoint and
    metrics/probe rows after it are dropped, so the run's tables match an uninterrupted
    run; a finished run says so and trains nothing.

    Raises:
        WorkbenchError: bad input (config, data, model folder, launch), before any work.
        trainer.loop.NonFiniteError: ``optim.max_bad_steps`` consecutive non-finite steps.
    """
    from trainer.setup import prepare

    sharding = sharded_launch()
    if sharding and cfg.backend not in SHARDING_BACKENDS:
        raise ConfigError(f"backend '{cfg.backend}' runs plain data parallel only; this {sharding} launch needs "
                          f"--backend {SHARDING_BACKENDS[0]} (TRL's trainer shards the model)")
    setup = prepare(cfg, resume=resume)  # validates everything before any work
    if sharding == "FSDP" and setup.accelerator.distributed_type.name != "FSDP":
        raise ConfigError("this FSDP launch would run as plain data parallel: accelerate shards with FSDP only "
                          f"on GPUs (here: {setup.accelerator.distributed_type.value}); on CPU launch without FSDP")
    module, _, function = BACKENDS[cfg.backend].partition(":")
    run_dir = getattr(importlib.import_module(module), function)(cfg, setup, resume=resume)
    close_processes()  # only once every process got here: a failed run raises past it
    return run_dir
