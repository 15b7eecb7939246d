"""Trainer state inside a checkpoint, and loading it back for ``--resume``.

A checkpoint folder (written atomically by :func:`workbench.storage.checkpoints.write_checkpoint`,
manifest last) holds the HF model (``save_pretrained``: config + safetensors), the
tokenizer, and ``trainer_state.pt``: optimizer, scheduler, step, RNG states, the data
position, the non-finite counter, and the frozen teacher when the method has one (RLSD's
frozen copy: :func:`save_frozen_teacher`, also written into the TRL backend's checkpoints).

Randomness of rollouts and the prompt order are stateless functions of (seed, step)
(see :mod:`trainer.batching`), so the step alone fixes the data position; RNG states
are saved anyway for anything else that draws random numbers.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from workbench.errors import CheckpointError

STATE_FILE = "trainer_state.pt"
#: The frozen teacher's weights in a checkpoint (a method whose ``MethodSpec.needs_frozen_copy``).
TEACHER_FILE = "frozen_teacher.safetensors"
_OLD_TEACHER_FILE = "rlsd_teacher.safetensors"  # checkpoints written before 2026-12-06


def save_frozen_teacher(teacher: torch.nn.Module, folder: Path) -> None:
    """The frozen teacher's weights into ``folder`` (``TEACHER_FILE``), as they are now."""
    sd = {k: v.detach().contiguous().cpu() for k, v in teacher.state_dict().items()}
    save_file(_untie(sd), str(Path(folder) / TEACHER_FILE))


def load_frozen_teacher(teacher: torch.nn.Module, folder: Path, device: torch.device | str) -> None:
    """Restore the frozen teacher saved in ``folder`` by :func:`save_frozen_teacher`.

    Raises:
        CheckpointError: the checkpoint has no teacher, or it does not fit the model.
    """
    folder = Path(folder)
    path = next((folder / name for name in (TEACHER_FILE, _OLD_TEACHER_FILE) if (folder / name).is_file()), None)
    if path is None:
        raise CheckpointError(f"checkpoint '{folder}' has no {TEACHER_FILE} (needed by the frozen teacher)")
    _load_weights(teacher, _load_tensors(path, torch.device(device)), folder)


def save_checkpoint_fn(tr, step: int):
    """A ``save_fn(folder)`` for ``write_checkpoint`` that writes everything of ``tr``."""

    def save(folder: Path) -> None:
        model = tr.setup.accelerator.unwrap_model(tr.model)
        model.save_pretrained(folder, safe_serialization=True)
        tr.tok.save_pretrained(folder)
        state = {
            "step": step,
            "data_position": step * tr.cfg.rollout.prompts_per_step,
            "optimizer": tr.optimizer.state_dict(),
            "scheduler": tr.scheduler.state_dict(),
            "bad_steps": tr.bad_steps,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
        }
        torch.save(state, folder / STATE_FILE)
        if tr.loss.frozen_teacher is not None:
            save_frozen_teacher(tr.loss.frozen_teacher, folder)

    return save


def _untie(sd: dict) -> dict:
    """safetensors refuses shared storage (tied embeddings): give each tensor its own."""
    seen, out = set(), {}
    for k, v in sd.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def _load_weights(model: torch.nn.Module, weights: dict, source: Path) -> None:
    """``model.load_state_dict(weights)``, strict except for tied aliases.

    A tied parameter (``lm_head.weight`` sharing the embedding's storage) may be
    absent from the file: it is filled through the tensor it shares. Any other
    missing or unexpected key is a :class:`CheckpointError`.
    """
    own = model.state_dict()
    loaded_ptrs = {own[k].data_ptr() for k in weights if k in own}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{source}' does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")


def _plain_device(device: torch.device | str) -> str:
    """The device as safetensors and ``torch.load`` accept it: accelerate's device in a
    multi-process CPU run is "cpu:0", which both refuse; "cpu" is what they mean."""
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else str(device)


def _load_tensors(path: Path, device: torch.device) -> dict:
    """``safetensors.load_file`` onto ``device``."""
    return load_file(str(path), device=_plain_device(device))


def load_trainer_state(tr, folder: Path) -> int:
    """Restore model weights, optimizer, scheduler, RNG and teacher from ``folder``.

    Args:
        tr: the :class:`trainer.loop.Trainer` built for the same config.
        folder: a complete (verified) checkpoint folder.

    Returns:
        The step the checkpoint was written after (training continues with it).

    Raises:
        CheckpointError: the checkpoint's weights do not fit the model.
    """
    model = tr.setup.accelerator.unwrap_model(tr.model)
    _load_weights(model, _load_tensors(folder / "model.safetensors", tr.device), folder)
    state = torch.load(folder / STATE_FILE, map_location=_plain_device(tr.device), weights_only=False)
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    tr.bad_steps = state.get("bad_steps", 0)
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if tr.loss.frozen_teacher is not None:
        load_frozen_teacher(tr.loss.frozen_teacher, folder, tr.device)
    return int(state["step"])
