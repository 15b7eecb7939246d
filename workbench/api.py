"""The notebook API: run folders as pandas DataFrames.

A thin layer over :mod:`workbench.storage.runstore` for Jupyter::

    from workbench.api import runs, metrics, probes, analyze, analysis

    runs("runs/")                                   # one row per run
    metrics("runs/oisd-tiny")                       # training curves
    probes("runs/oisd-tiny", metric="lens_js")      # read the built-in probes (HF, probes.parquet)
    analyze("runs/oisd-tiny")                       # run the TransformerLens analyzer (writes analysis/)
    analysis("runs/oisd-tiny", kind="metrics")      # read its tables
    experiment("runs/demo", ["grpo", "oisd"], seeds=[0, 1])   # warm start + runs + probing

Every function takes a :class:`~workbench.storage.runstore.Run` or a path. Importing this
module is cheap (no torch, no TransformerLens): :func:`analyze` imports the analyzer
and :func:`experiment` the trainer when they are called (this module is an entry
point, like the command line: the only place the analysis side reaches the trainer).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.storage.paths import WARMSTART_DIR, RunPaths, is_run_folder, run_name
from workbench.storage.runstore import BrokenRun, Run, list_runs, run_summary

if TYPE_CHECKING:
    from workbench.analysis.analyzer import ProbeReport

__all__ = ["load_run", "runs", "metrics", "probes", "analyze", "analysis", "experiment", "Experiment"]

RunLike = Run | str | os.PathLike

RUN_COLUMNS = [
    "name", "method", "status", "live", "steps", "last_step", "checkpoints",
    "last_accuracy", "last_reward", "start_time", "path", "error",
]


def load_run(path: str | os.PathLike) -> Run:
    """Open a run folder (raises WorkbenchError, one line, when it is not a run)."""
    return Run.open(path)


def _run(run: RunLike) -> Run:
    return run if isinstance(run, Run) else Run.open(run)


def runs(root: str | os.PathLike) -> pd.DataFrame:
    """One row per run under ``root`` (``root`` itself if it is a run).

    Columns (from :func:`workbench.storage.runstore.run_summary`, as the dashboard's Runs table):
    ``name, method, status, live, steps`` (the last step the run reached: its last logged
    step, or an analysis folder's last checkpoint), ``last_step`` (the last logged step;
    None when nothing is logged), ``checkpoints`` (complete step folders, sizes checked,
    or the checkpoints an analysis folder lists), ``last_accuracy``, ``last_reward``,
    ``start_time``, ``path``, ``error`` (the one-line reason for a run folder that cannot
    be opened; None otherwise).
    """
    rows = []
    for run in list_runs(root):
        if isinstance(run, BrokenRun):
            rows.append({"name": run.name, "path": str(run.path), "error": run.error})
            continue
        row = run_summary(run)
        rows.append({**row, "last_step": row["last_logged_step"], "error": None})
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def metrics(run: RunLike) -> pd.DataFrame:
    """Training metrics, one row per step (``metrics.jsonl``; names in docs/objectives.md)."""
    return _run(run).metrics()


def probes(run: RunLike, metric: str | None = None) -> pd.DataFrame:
    """The trainer's built-in probes (``probes.parquet``), optionally one metric only."""
    table = _run(run).probes()
    if metric is not None:
        table = table[table["metric"] == metric].reset_index(drop=True)
    return table


def analysis(run: RunLike, kind: str = "metrics") -> pd.DataFrame:
    """Analyzer tables of one kind (``metrics``, ``topk``, ``cells``, ``attn``, ``drift``), all steps."""
    return _run(run).analysis(kind)


def analyze(run: RunLike, **kwargs) -> ProbeReport:
    """Run the TransformerLens analyzer on a run (:func:`workbench.analysis.analyzer.probe_run`, what
    ``oisd probe`` does): writes ``analysis/``, which :func:`analysis` reads.

    Keyword arguments (``device``, ``dtype``, ``force``, ``detail_prompts``,
    ``progress``, ...) are passed through.
    """
    from workbench.analysis.analyzer import probe_run

    path = run.path if isinstance(run, Run) else run
    return probe_run(path, **kwargs)


# ---------------------------------------------------------------------------
# Experiments: a warm start and a grid of (method, seed) runs, made or reused
# ---------------------------------------------------------------------------



@dataclass
class Experiment:
    """What :func:`experiment` made or reused.

    Attributes:
        root: the folder holding the runs.
        warmstart: the warm-start model folder every run starts from.
        runs: ``(method, seed)`` -> run folder, in the order asked for.
        seconds: wall time per stage (``warmstart``, ``train``, ``probe``).
    """

    root: Path
    warmstart: Path
    runs: dict[tuple[str, int], Path]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def run_dirs(self) -> list[Path]:
        return list(self.runs.values())


def _quiet_transformers() -> None:
    """No per-file "Loading weights" / "Writing model shards" bars: one bar per stage."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _train_job(config: dict, resume: bool, threads: int) -> str:
    """One training run in a worker process (spawned: a fresh torch with its own thread count)."""
    import logging

    import torch

    torch.set_num_threads(threads)
    _quiet_transformers()
    logging.getLogger().setLevel(logging.WARNING)
    from trainer.config import validate_config
    from trainer.run import train

    with contextlib.redirect_stdout(open(os.devnull, "w")):  # one bar per stage, from the parent
        return str(train(validate_config(config), resume=resume))


def experiment(
    root: str | os.PathLike = "runs/demo",
    methods: Sequence[str | tuple[str, str, Sequence[str]]] = ("grpo", "oisd", "sdpg"),
    seeds: Sequence[int] = (0, 1),
    *,
    warmstart: str | os.PathLike = WARMSTART_DIR,
    overrides: Sequence[str] = (),
    probe: bool = True,
    workers: int | None = None,
    progress: bool = True,
    warmstart_options: dict | None = None,
    probe_options: dict | None = None,
    warmstart_seed: int | None = None,
) -> Experiment:
    """Make (or reuse) a warm start and one run per (method, seed), then probe them.

    The one orchestration the demo and every notebook call. Each stage is reused or
    resumed: an existing warm start is kept, a finished run is kept, an interrupted run
    resumes from its newest checkpoint, an analysed checkpoint is skipped. Every config
    is validated before the first minute of work. Runs are named ``<label>-seed<seed>``
    under ``root``. Each entry of ``methods`` is a method name (its bundled config,
    ``sdpg`` stands for ``sdpg-ufkl``), a bundled config name, or ``(label, config, overrides)`` for a
    variant, e.g. ``("oisd-positive", "oisd", ["oisd.weight=positive"])``.

    Args:
        root: folder for the runs.
        methods: what to train, e.g. ``("grpo", "oisd", "sdpg")``.
        seeds: run seeds; every method gets each.
        warmstart: the warm-start folder (made with the tiny preset when missing).
        overrides: ``key=value`` config overrides applied to every run (after the
            experiment's own ``model.path``, ``seed`` and ``run_dir``).
        probe: run the TransformerLens analyzer on every checkpoint afterwards.
        workers: training processes at once, each with ``cpus // workers`` threads
            (default: 2 when there are at least 2 cores and 2 runs, else 1: in this process,
            with its own thread count, ``torch.get_num_threads()``).
        progress: one progress bar per stage.
        warmstart_options: :class:`~trainer.warmstart.WarmstartConfig` fields for a new
            warm start (``steps``, ``eval_n``, ...).
        probe_options: :func:`~workbench.analysis.analyzer.probe_run` keywords (``detail_prompts``,
            ``greedy``, ``device``, ``exit``, ``learned_lens``, ``patch``, ...).
        warmstart_seed: one of several warm starts: a new warm start is made with this seed, and
            the runs are named ``<label>-ws<seed>-seed<k>`` (:func:`workbench.storage.paths.run_name`),
            so that runs from several warm starts share one root and one summary.

    Returns:
        An :class:`Experiment`.

    Raises:
        WorkbenchError: a bad config or override, before any work.
    """
    import time

    from tqdm.auto import tqdm

    from trainer.config import config_to_dict, load_config
    from trainer.warmstart import WarmstartConfig, run_warmstart

    _quiet_transformers()
    root_p, ws = Path(root), Path(warmstart)
    configs = {}
    for entry in methods:
        label, name, own = (entry, entry, []) if isinstance(entry, str) else entry
        for seed in seeds:
            run_dir = root_p / run_name(label, seed, warmstart_seed)
            cfg = load_config(name, [*overrides, *own, f"model.path={ws}", f"seed={seed}", f"run_dir={run_dir}",
                                     "logging.progress=false"])
            configs[(label, seed)] = cfg
    exp = Experiment(root_p, ws, {key: cfg.resolved_run_dir() for key, cfg in configs.items()})

    t0 = time.time()
    if not RunPaths(ws).warmstart.is_file():
        seed = {} if warmstart_seed is None else {"seed": warmstart_seed}
        run_warmstart(WarmstartConfig(**{"out": str(ws), "progress": progress, **seed, **(warmstart_options or {})}))
    exp.seconds["warmstart"] = time.time() - t0

    t0 = time.time()
    todo = []
    for key, cfg in configs.items():
        run_dir = exp.runs[key]
        exists = is_run_folder(run_dir)
        if exists and _status(run_dir) == "finished":
            continue
        todo.append((config_to_dict(cfg), exists))
    cpus = os.cpu_count() or 1
    if workers is None:
        workers = 2 if cpus >= 2 and len(todo) >= 2 else 1
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="train", unit="run",
               disable=not progress, dynamic_ncols=True)
    if workers <= 1:
        for config, resume in todo:
            import torch

            _train_job(config, resume, threads=torch.get_num_threads())
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, cpus // workers)
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            with _sigterm_as_interrupt():
                futures = [pool.submit(_train_job, config, resume, threads) for config, resume in todo]
                for future in as_completed(futures):
                    future.result()  # a failed run raises here, with its one-line error
                    bar.update()
        except BaseException:
            # Ctrl-C, SIGTERM or a failed run: stop the other workers too, or they train on
            # after the parent is gone. Each run resumes from its newest checkpoint next time.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    bar.close()
    exp.seconds["train"] = time.time() - t0

    t0 = time.time()
    if probe:
        from workbench.analysis.analyzer import probe_run

        for run_dir in tqdm(exp.run_dirs, desc="probe", unit="run", disable=not progress, dynamic_ncols=True):
            report = probe_run(run_dir, **{"progress": False, **(probe_options or {})})
            for step, reason in report.skipped:
                print(f"warning: {run_dir} step {step} not analysed: {reason}")
    exp.seconds["probe"] = time.time() - t0
    return exp


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Inside the block, SIGTERM raises KeyboardInterrupt (so cleanup runs), in the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _status(run_dir: Path) -> str | None:
    try:
        return Run.open(run_dir).status
    except WorkbenchError:
        return None
