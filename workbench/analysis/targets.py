"""What an analysis walks over: a run's checkpoints (its own ``checkpoints/step-*`` folders,
verified against their manifests, or the external ones an analysis folder lists, LoRA
adapters among them), and the model the run started from (the reference that drift,
patching and the learned lens compare each checkpoint with).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import CheckpointError
from workbench.measures.drift import tensor_files
from workbench.models.adapters import ADAPTER_CONFIG, adapter_base, is_adapter_folder, merged_adapter
from workbench.models.loading import is_local_path, require_model_folder
from workbench.storage.checkpoints import list_checkpoints, verify_checkpoint
from workbench.storage.runstore import Run

__all__ = ["Target", "checkpoint_targets", "start_model"]


@dataclass(frozen=True)
class Target:
    """One checkpoint to analyse: a run's own ``checkpoints/step-*`` folder (verified
    against its manifest), a model folder found elsewhere, a hub name, or a LoRA adapter
    folder (``adapter``: merged onto ``base`` while it is analysed)."""

    step: int
    location: str  # a folder or a hub name
    origin: str  # where it came from, for provenance (e.g. "checkpoint-500 of runs/trl-out")
    managed: bool = False  # a run's own checkpoint, with a manifest
    adapter: bool = False  # an adapter-only folder (adapter_config.json + adapter weights)
    base: str | None = None  # the adapter's base model (None: its adapter_config.json's)

    def check(self) -> None:
        if self.managed:
            verify_checkpoint(self.location, full=True)
        if self.adapter:
            if not is_adapter_folder(self.location):
                raise CheckpointError(f"{self.location} is not an adapter folder (no {ADAPTER_CONFIG} with weights)")
        elif self.managed or Path(self.location).exists() or is_local_path(self.location):
            require_model_folder(self.location)

    @contextmanager
    def model_folder(self, work: Path):
        """The model folder to boot: the checkpoint itself, or, for an adapter, the adapter
        merged onto its base in a temporary folder under ``work`` (removed on exit)."""
        with (merged_adapter(self.location, self.base, work) if self.adapter else nullcontext(self.location)) as f:
            yield str(f)


def checkpoint_targets(run: Run) -> list[Target]:
    """What :func:`probe_run` analyses: the run's own checkpoints, every step-* folder (a
    broken one is reported rather than silently absent), or, for an analysis folder of
    external checkpoints (``oisd probe PATH --out DIR``), the ones its run.json lists."""
    external = run.info.get("external")
    if isinstance(external, dict):
        return [Target(int(c["step"]), str(c["path"]), str(c.get("origin", c["path"])),
                       adapter=bool(c.get("adapter")), base=c.get("base"))
                for c in external.get("checkpoints", [])]
    return [Target(c.step, str(c.path), f"{c.path.name} of {run.path}", managed=True)
            for c in list_checkpoints(run.path, verify=False)]


def start_model(run: Run) -> str | None:
    """The model a run started from, as drift, patching and the learned lens compare with it:
    run.json's ``config.model.path`` when it is a local folder with safetensors weights; for
    a series of LoRA adapters, the base they adapt (a local folder); else the first
    checkpoint (for a series trained elsewhere, ``oisd probe --base`` names the start)."""
    config = run.info.get("config") or {}
    start = (config.get("model") or {}).get("path")
    if start and Path(start).is_dir():
        try:
            tensor_files(Path(start))
            return str(start)
        except CheckpointError:
            pass
    targets = checkpoint_targets(run)
    if targets and targets[0].adapter:
        base = targets[0].base or adapter_base(targets[0].location)
        return base if base and Path(base).is_dir() else None
    return targets[0].location if targets and Path(targets[0].location).is_dir() else None
