"""Probing spread over processes: ``accelerate launch -m workbench.cli probe ...`` or
``torchrun --nproc_per_node N -m workbench.cli probe ...``.

Each launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; with ``WORLD_SIZE > 1``,
``oisd probe`` gives process r the checkpoints ``r, r + N, r + 2N, ...`` of each run (in step
order), each on its own device (``cuda:LOCAL_RANK`` where there is CUDA), and every
checkpoint's analysis files are written once, atomically, by the process that made them. What
is written for a whole run or analysis folder (an analysis folder's run.json and probe set) is
written by process 0 before the others start, behind a barrier; the summary is printed once,
after every process finished. The result is the same as one process's, file for file and value
for value; a killed probe relaunched continues where it stopped (each process skips what is
analysed). The processes meet through ``torch.distributed`` (gloo on CPU, NCCL on GPUs) only at
those barriers: no tensor travels between them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["Processes", "default_device", "processes"]


@dataclass(frozen=True)
class Processes:
    """This process's place among those probing: ``rank`` of ``world``, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's items of a list: every ``world``-th one from ``rank``."""
        return items[self.rank :: self.world]

    def barrier(self) -> None:
        """Every process waits for the others (a no-op on one process)."""
        if self.world > 1:
            _group()
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear the process group down once every process got here (a no-op on one process)."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def processes() -> Processes:
    """This process's place, from the launcher's environment (one process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    return Processes(rank=int(os.environ.get("RANK", "0")), world=world,
                     local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _group() -> None:
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def default_device(local_rank: int = 0) -> str:
    """The device a probe runs on unless ``--device`` says: the process's GPU where there is
    CUDA (``cuda:LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"
