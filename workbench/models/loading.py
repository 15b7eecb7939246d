"""Model folders and loading: any local HF folder or hub name, the same way.

One place decides what a model folder is (:func:`is_model_folder`,
:func:`require_model_folder`) and how a model is loaded, so the trainer, the
evaluator and the analyzer's provenance agree on it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workbench.errors import CheckpointError, first_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a ``config.json`` and model weights (safetensors or .bin,
    single-file, sharded with an index, or any ``*.safetensors`` / ``*.bin``)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        return False
    return (any((folder / w).is_file() for w in _WEIGHT_FILES) or any(folder.glob("*.safetensors"))
            or any(folder.glob("*.bin")))


def require_model_folder(path: str | os.PathLike) -> Path:
    """Return ``path`` if it is a model folder, else raise a one-line CheckpointError."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"model folder '{folder}' does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a model folder (not a folder)")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a model folder (no config.json)")
    if not is_model_folder(folder):
        raise CheckpointError(
            f"{folder} is not a model folder (no *.safetensors or pytorch_model.bin weights)"
        )
    return folder


def is_local_path(name: str | os.PathLike) -> bool:
    """True when ``name`` names (or looks like) a local folder rather than a hub id."""
    s = str(name)
    return Path(s).exists() or s.startswith((".", "/", "~")) or s.count("/") > 1


def check_model_source(name: str | os.PathLike) -> None:
    """Fail early, in one line, when a local path is not a model folder."""
    if not is_local_path(name):
        return
    require_model_folder(name)


def load_model_config(name: str | os.PathLike):
    """The HF config only (cheap): used to validate layer choices before any work."""
    from transformers import AutoConfig

    check_model_source(name)
    try:
        return AutoConfig.from_pretrained(str(name))
    except Exception as exc:  # noqa: BLE001 - any loading failure becomes one line
        raise CheckpointError(f"cannot read model config from '{name}': {first_line(exc)}") from None


def load_model_and_tokenizer(
    name: str | os.PathLike, *, dtype: str = "float32", attn_implementation: str = "sdpa", device=None
):
    """Load an HF causal LM and its tokenizer from a folder or hub name.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (EOS if it had none) and
        pads on the left (rollouts append to the right end of every prompt).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name))
        model = AutoModelForCausalLM.from_pretrained(
            str(name), dtype=DTYPES[dtype], attn_implementation=attn_implementation
        )
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot load model from '{name}': {first_line(exc)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if device is not None:
        model.to(device)
    return model, tokenizer
