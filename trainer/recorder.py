"""The run recorder: everything a run folder holds, written the same way by both backends.

A backend trains; :class:`RunRecorder` writes what it did. It opens the run folder
(run.json with the config and the resolved facts every reader needs, the probe set),
evaluates and probes the policy at the steps they are due, logs each step's metrics
(metrics.jsonl, TensorBoard when asked), writes ``checkpoints/step-N`` atomically, and
marks the run finished or failed. The built-in loop (:mod:`trainer.loop`) and the TRL
backend (:mod:`trainer.trl_backend`) both call it, so a run folder does not depend on
which backend wrote it (``backend`` in run.json says which did).

Only the main process writes; on the other processes every method is a no-op, so a
backend calls the recorder on every process without branching.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.config import TrainConfig, config_to_dict
from trainer.setup import TrainSetup
from workbench.errors import first_line

log = logging.getLogger(__name__)


class RunRecorder:
    """The run folder of one training run (``setup.run_dir``).

    Args:
        cfg: the run's config.
        setup: what :func:`trainer.setup.prepare` validated and loaded.
        resume: continue a run (metrics and probe rows after ``resume_step`` are dropped).
        resume_step: the step of the checkpoint training continues from; -1 when
            resuming without a checkpoint (every logged row is dropped).
        facts: facts of the backend recorded in run.json beside the shared ones (the backend
            itself, the processes, the layer count): e.g. ``trl_version``.
    """

    def __init__(self, cfg: TrainConfig, setup: TrainSetup, *, resume: bool, resume_step: int, facts: dict):
        from workbench.storage.runwriter import RunWriter

        self.cfg, self.setup = cfg, setup
        self.main = setup.accelerator.is_main_process
        self.writer = None
        self.tensorboard = None
        self._test_examples = setup.task.test_examples()[: cfg.eval.n]
        self._probe_examples = dict(enumerate(setup.task.test_examples()[: len(setup.probe_records)]))
        if not self.main:
            return
        self.writer = RunWriter(setup.run_dir, config_to_dict(cfg), resume=resume, resume_step=resume_step)
        self.writer.write_probe_set(setup.probe_records)
        acc = setup.accelerator
        # Resolved facts every reader needs, so none of them re-derives them from the config.
        self.writer.record(num_layers=setup.num_layers, oisd_layers=setup.oisd_layers,
                           probe_max_new_tokens=cfg.rollout.max_new_tokens, backend=cfg.backend,
                           baseline=cfg.spec.baseline, answer_check=setup.task.answer_check,
                           distributed={"type": acc.distributed_type.value.lower(),
                                        "processes": acc.num_processes}, **facts)
        self.tensorboard = _tensorboard(cfg, setup.run_dir)

    # ---------------------------------------------------------------- schedule
    def _due(self, every: int, step: int) -> bool:
        return bool(every) and (step % every == 0 or step == self.cfg.steps)

    def checkpoint_due(self, step: int) -> bool:
        return self._due(self.cfg.checkpoint_every, step)

    def extras_due(self, step: int) -> bool:
        """Whether :meth:`extras` evaluates or probes at ``step`` (the same on every process)."""
        return self._due(self.cfg.eval_every, step) or self._due(self.cfg.probe_every, step)

    # ---------------------------------------------------------------- evaluation and probes
    def extras(self, model: torch.nn.Module, step: int, *, every_process: bool = False) -> dict:
        """Held-out evaluation and the built-in probes due at ``step`` (every ``eval_every``
        and ``probe_every`` steps, and at the last step), on the unwrapped policy ``model``.
        Probe rows and samples go to the run folder; the returned metrics
        (``eval/*``, ``probe/*`` at the report layers) go into the step's row.

        ``every_process``: every process runs the same forwards (DeepSpeed ZeRO-3, whose
        engine keeps a collective at the start of each forward of the model, even with its
        weights gathered); only the main process writes and gets the metrics."""
        if not self.main and not every_process:
            return {}
        from trainer.evaluate import evaluate
        import pandas as pd

        from workbench.analysis.early_exit import Verifier, exit_rows
        from workbench.analysis.probe_runner import eager_attention, run_builtin_probes, sample_probe_completions
        from workbench.measures.summary import probe_summary, report_layers

        cfg, s, out = self.cfg, self.setup, {}
        tok = s.tokenizer
        was_training = model.training
        if self._due(cfg.eval_every, step):
            res = evaluate(model, tok, s.task, self._test_examples, k=cfg.eval.k, temperature=cfg.eval.temperature,
                           max_new_tokens=cfg.rollout.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.seed)
            out.update(res.as_metrics())
        if self._due(cfg.probe_every, step):
            records = s.probe_records
            samples = None
            if cfg.probe.samples_per_prompt:
                def verify(record: dict, response_ids: list[int]) -> bool:
                    text = tok.decode(response_ids, skip_special_tokens=True)
                    return s.task.reward(text, self._probe_examples[int(record["index"])]) > 0

                samples = sample_probe_completions(
                    model, tok, records, step=step, k=cfg.probe.samples_per_prompt, verify=verify, seed=cfg.seed,
                    temperature=cfg.probe.sample_temperature, max_new_tokens=cfg.rollout.max_new_tokens)
                if self.main:
                    self.writer.log_samples(samples)
            df = run_builtin_probes(model, tok, records, run=s.run_dir.name, step=step, greedy=cfg.probe.greedy,
                                    chunk_size=cfg.probe.chunk_size, max_new_tokens=cfg.rollout.max_new_tokens,
                                    samples=samples)
            if s.exit_layers:  # the task's own verifier; the analyzer checks against the references
                verifier = Verifier(correct=lambda record, text: s.task.reward(
                    text, self._probe_examples[int(record["index"])]) > 0, answer=s.task.extract_answer)
                model.eval()
                with eager_attention(model):  # as the greedy probes decode
                    exits = exit_rows(model, tok, records, s.exit_layers, verify=verifier, run=s.run_dir.name,
                                      step=step, source="probe", max_new_tokens=cfg.rollout.max_new_tokens)
                df = pd.concat([df, exits], ignore_index=True)
            if self.main:
                self.writer.log_probes(df)
                out.update(probe_summary(df, report_layers(s.oisd_layers, s.num_layers)))
        model.train(was_training)
        return out if self.main else {}

    def start(self, model: torch.nn.Module, *, every_process: bool = False) -> None:
        """Before the first step of a new run: evaluation and probes of the initial model (step 0)."""
        first = self.extras(model, 0, every_process=every_process)
        if first:
            self.log(0, first)

    # ---------------------------------------------------------------- rows, checkpoints, status
    def log(self, step: int, values: dict) -> None:
        """The step's row of metrics.jsonl (and TensorBoard's scalars)."""
        if not self.main:
            return
        self.writer.log_metrics(step, values)
        if self.tensorboard is not None:
            for key, v in values.items():
                self.tensorboard.add_scalar(key, v, step)

    def checkpoint(self, step: int, save: Callable[[Path], None]) -> None:
        """``checkpoints/step-N``, written atomically by ``save(folder)`` (manifest last); old
        ones beyond ``keep_last`` pruned. Main process only: the caller syncs processes."""
        if not self.main:
            return
        from workbench.storage.checkpoints import write_checkpoint

        write_checkpoint(self.setup.run_dir, step, save, keep_last=self.cfg.keep_last)

    def finish(self, model: torch.nn.Module) -> None:
        """The run is finished. Every process calls it: with several processes, run.json's
        ``distributed.weight_spread`` records how far apart the processes' weights ended
        (:func:`~trainer.distributed.weight_spread` of the unwrapped policy ``model``;
        0.0 when data parallelism kept them identical, as it must; null under ZeRO-3, with
        ``weight_spread_note`` saying why)."""
        from trainer.distributed import ZERO3_SPREAD_NOTE, weight_spread

        acc = self.setup.accelerator
        spread = weight_spread(model, acc.device) if acc.num_processes > 1 else 0.0
        if self.writer is not None:
            if acc.num_processes > 1:
                facts = {"weight_spread": spread} | ({"weight_spread_note": ZERO3_SPREAD_NOTE} if spread is None else {})
                self.writer.record(distributed={**self.writer.info["distributed"], **facts})
                if spread:
                    log.warning("the %d processes ended with different weights (fingerprint spread %.3g): their "
                                "gradients were not synchronised", acc.num_processes, spread)
            self.writer.set_status("finished")
        self._close()

    def fail(self, exc: BaseException) -> None:
        """run.json says ``failed`` with the error's first line."""
        if self.writer is not None:
            self.writer.set_status("failed", error=first_line(exc))
        self._close()

    def _close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _tensorboard(cfg: TrainConfig, run_dir: Path):
    if not cfg.logging.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("logging.tensorboard is on but tensorboard is not installed (pip install 'oisd-workbench[tensorboard]')")
        return None
    from workbench.storage.paths import RunPaths

    return SummaryWriter(str(RunPaths(run_dir).events))
